"""Many targets in one pass: which targets a call asks for.

``targets=[t1, ..., tK]`` (each in any of Captum's target forms), ``target="all"``
(every column of a (batch, classes) output) or ``target="topk:k"`` (per example,
its k largest outputs at the inputs, in decreasing order). The attributions then
get a leading K dimension; the engine shares each path point's forward pass among
the K targets and runs one backward per target.
"""

import re
from typing import Any, Callable, List, Optional

import torch

from ..errors import ArgumentError, TargetError
from ._target import normalize_target

_TOPK = re.compile(r"^topk:(\d+)$")


def wants_outputs(target: Any) -> bool:
    """Whether resolving ``target`` needs the model's output at the inputs."""
    return isinstance(target, str)


def resolve_targets(
    target: Any,
    targets: Any,
    batch_size: int,
    device: torch.device,
    outputs_at_inputs: Optional[Callable[[], torch.Tensor]] = None,
) -> Optional[List[Any]]:
    """The K normalised targets of a many-target call, or None for a single target."""
    if targets is not None:
        if target is not None:
            raise ArgumentError("Give either `target` (one) or `targets` (several), not both.")
        if not isinstance(targets, (list, tuple)) or not targets:
            raise TargetError(
                "`targets` must be a non-empty list of targets (each in any form `target` "
                f"accepts); got {targets!r}."
            )
        return [normalize_target(t, batch_size, device) for t in targets]
    if not isinstance(target, str):
        return None
    top = _TOPK.match(target)
    if target != "all" and not top:
        raise TargetError(
            f"A string `target` must be 'all' or 'topk:K' (K >= 1); got {target!r}."
        )
    outputs = outputs_at_inputs()
    if outputs.dim() != 2:
        raise TargetError(
            f"target={target!r} needs a (batch, classes) output; the forward output has "
            f"shape {tuple(outputs.shape)}."
        )
    classes = outputs.shape[1]
    if target == "all":
        return list(range(classes))
    k = int(top.group(1))
    if not 1 <= k <= classes:
        raise TargetError(
            f"target={target!r} asks for {k} targets; 'topk:K' needs 1 <= K <= {classes}, the "
            "number of classes of the output."
        )
    order = outputs.topk(k, dim=1).indices
    return [order[:, j].to(device=device, dtype=torch.long) for j in range(k)]
