"""igfast.info(): which implementation runs, and why."""

from typing import Any, Dict

import torch

from . import _ext


def _fused_kernels_registered() -> bool:
    return _ext.extension_loaded() and hasattr(torch.ops.igfast, "interpolate_path")


def info() -> Dict[str, Any]:
    """Versions and the path igfast takes on this machine.

    Returns a dict with ``torch``, ``extension`` (bool), ``path`` ("kernels" or
    "pure-pytorch") and ``reason`` (why that path runs).
    """
    from . import __version__

    if not _ext.extension_loaded():
        path, reason = "pure-pytorch", _ext.why_not_loaded()
    elif not _fused_kernels_registered():
        path, reason = "pure-pytorch", "igfast._C is loaded but registers no fused kernels"
    else:
        path, reason = "kernels", "igfast._C is loaded"
    return {
        "igfast": __version__,
        "torch": torch.__version__,
        "extension": _ext.extension_loaded(),
        "path": path,
        "reason": reason,
    }
