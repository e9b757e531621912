"""igfast.info(): which implementation runs, and why."""

from typing import Any, Dict

import torch

from . import _ext, ops


def info() -> Dict[str, Any]:
    """Versions, the kernels in use, and the path igfast takes on each device.

    Returns a dict with ``igfast`` and ``torch`` versions, ``extension`` (whether
    igfast._C loaded), ``kernels`` ({"cpu": bool, "cuda": bool}: built, loaded and
    not disabled), ``path`` ("kernels" or "pure-pytorch", on the CPU) and ``reason``
    (why that path runs), and ``cuda_path`` / ``cuda_reason`` likewise when a GPU is
    visible; ``exact_walk_kernels`` ({"cpu": bool, "cuda": bool}): whether the walk of
    method="exact" runs its kernels (ops.WALK_OP_NAMES: ReLU-like ops, max-pools and the
    cut into pieces; CPU only, elsewhere its PyTorch code runs).
    """
    from . import __version__

    state: Dict[str, Any] = {
        "igfast": __version__,
        "torch": torch.__version__,
        "extension": _ext.extension_loaded(),
        "kernels": {device: ops.kernels_available(device) for device in ("cpu", "cuda")},
        "exact_walk_kernels": {device: ops.walk_kernels_available(device) for device in ("cpu", "cuda")},
    }
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        prefix = "" if device == "cpu" else "cuda_"
        reason = ops.why_not_kernels(device)
        state[prefix + "path"] = "pure-pytorch" if reason else "kernels"
        state[prefix + "reason"] = reason or f"igfast._C provides the {device} kernels"
    return state
