"""Targets: which output value per example is attributed, in Captum's forms.

Forms (Captum 0.9): None (the forward returns one value per example); an int (column
of a (N, C) output, or last index of a higher-rank one); a tuple of indices (outputs
with more than two dimensions); a list or 1-D tensor with one target per example
(ints, or tuples for higher-rank outputs).

``normalize_target`` checks the form once per call; ``expand_target`` gives the target
of a chunk's rows, still in a Captum form (so Captum code that replaces
``gradient_func`` receives what it expects); ``select_targets`` applies it to an
output, vectorised, with range checks that name ``target``.
"""

import numbers
from typing import Any, List, Tuple, Union

import torch

from ..chunking import Chunk
from ..dtypes import integer_item, is_integer_dtype
from ..errors import TargetError

Target = Union[None, int, Tuple, torch.Tensor, List[Tuple]]


def _is_index(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def normalize_target(target: Any, batch_size: int, device: torch.device) -> Target:
    """Check ``target``'s form; per-example int targets become a long tensor."""
    if target is None or _is_index(target):
        return None if target is None else int(target)
    if isinstance(target, tuple):
        # 0-dim integer tensors index as ints do (Captum indexes with the tuple as given).
        target = tuple(integer_item(t) for t in target)
        if not all(_is_index(t) or isinstance(t, slice) for t in target):
            raise TargetError(f"A tuple `target` must hold ints; got {target!r}.")
        return target
    if isinstance(target, torch.Tensor):
        if not is_integer_dtype(target.dtype):
            raise TargetError(f"A tensor `target` must hold integers; got dtype {target.dtype}.")
        if target.numel() == 1:
            return int(target.item())
        if target.dim() != 1 or target.numel() != batch_size:
            raise TargetError(
                "A tensor `target` must be one integer, or 1-D with one target per "
                f"example ({batch_size}); got shape {tuple(target.shape)}."
            )
        return target.to(device=device, dtype=torch.long)
    if isinstance(target, list):
        if len(target) != batch_size:
            raise TargetError(
                f"A list `target` must have one entry per example ({batch_size}); "
                f"got {len(target)}."
            )
        if all(_is_index(t) for t in target):
            return torch.tensor(target, dtype=torch.long, device=device)
        if all(isinstance(t, tuple) and all(_is_index(i) for i in t) for t in target):
            if len({len(t) for t in target}) != 1:
                raise TargetError("The tuples of a list `target` must all have the same length.")
            return list(target)
        raise TargetError(
            "A list `target` must hold ints (one class per example) or tuples of ints; "
            f"got element types {sorted({type(t).__name__ for t in target})}."
        )
    raise TargetError(
        "`target` must be None, an int, a tuple, a list or a tensor; "
        f"got {type(target).__name__}."
    )


def expand_target(target: Target, chunk: Chunk) -> Target:
    """The target of a chunk's rows (step-major), in the same form."""
    if isinstance(target, torch.Tensor):
        rows = target[chunk.example_begin:chunk.example_end]
        return rows.expand(chunk.steps, rows.shape[0]).reshape(-1)  # faster than repeat
    if isinstance(target, list):
        return target[chunk.example_begin:chunk.example_end] * chunk.steps
    return target


def _out_of_range(index: int, dim: int, shape: torch.Size) -> TargetError:
    return TargetError(
        f"`target` index {index} is out of range for dimension {dim} of the "
        f"forward output, of size {shape[dim]} (an output row has shape {tuple(shape[1:])})."
    )


def _check_index(index: int, size: int, dim: int, shape: torch.Size) -> None:
    if not -size <= index < size:
        raise _out_of_range(index, dim, shape)


def _check_indices(indices: torch.Tensor, low: int, size: int, dim: int, shape: torch.Size) -> None:
    """Vectorised range check of per-example indices: one reduction (a device sync)."""
    if not indices.numel():
        return
    smallest, largest = torch.stack(torch.aminmax(indices)).tolist()  # one transfer, not one per value
    if smallest < low or largest >= size:
        raise _out_of_range(smallest if smallest < low else largest, dim, shape)


def _select_columns(output: torch.Tensor, indices: Tuple) -> torch.Tensor:
    if len(indices) > output.dim() - 1:
        raise TargetError(
            f"`target` {indices!r} has more indices than the forward output "
            f"{tuple(output.shape)} has dimensions after the batch."
        )
    for dim, index in enumerate(indices, start=1):
        if not isinstance(index, slice):
            _check_index(index, output.shape[dim], dim, output.shape)
    return output[(slice(None), *indices)]


def _rows_shape(output: torch.Tensor) -> str:
    """The output's shape with its rows as N: the rows of one chunk of path points (or of
    n_steps="auto"'s round), not a number the caller knows (auto's said (45,))."""
    return "(" + ", ".join(["N"] + [str(size) for size in output.shape[1:]]) + (",)" if output.dim() == 1 else ")")


def select_targets(output: torch.Tensor, target: Any, check_range: bool = True) -> torch.Tensor:
    """The output values the target designates, one row per output row.

    ``check_range=False`` skips the range check of per-example targets (a reduction,
    and a device synchronisation on a GPU) for rows whose targets were checked already.
    """
    if target is None:
        return output
    if _is_index(target):
        return _select_columns(output, (int(target),))
    if isinstance(target, tuple):
        return _select_columns(output, target)
    rows = output.shape[0]
    if isinstance(target, torch.Tensor) and target.numel() == 1 and not target.dtype.is_floating_point:
        return _select_columns(output, (int(target.item()),))
    if isinstance(target, list) and target and all(_is_index(t) for t in target):
        target = torch.tensor(target, dtype=torch.long)
    if isinstance(target, torch.Tensor):
        if target.dim() != 1 or target.numel() != rows:
            raise TargetError(
                f"A tensor `target` must have one entry per example; got shape "
                f"{tuple(target.shape)} for an output of shape {_rows_shape(output)}."
            )
        if output.dim() != 2:
            raise TargetError(
                "Per-example int targets need a 2-D (batch, classes) output; the "
                f"forward output has shape {_rows_shape(output)} (use tuple targets)."
            )
        target = target.to(output.device)
        if target.is_inference() and not torch.is_inference_mode_enabled():
            # Made under the caller's torch.inference_mode(): gather saves its index for
            # backward, which an inference tensor refuses outside that mode.
            target = target.clone()
        # gather accepts no negative indices, as in Captum.
        if check_range:
            _check_indices(target, 0, output.shape[1], 1, output.shape)
        return output.gather(1, target.view(rows, 1)).squeeze(1)
    if isinstance(target, list):
        if len(target) != rows:
            raise TargetError(
                f"A list `target` must have one entry per example; got {len(target)} "
                f"for an output with {rows} rows."
            )
        index = torch.tensor(target, dtype=torch.long, device=output.device)
        if index.shape[1] > output.dim() - 1:
            raise TargetError(
                f"`target` tuples of length {index.shape[1]} do not fit the forward "
                f"output of shape {_rows_shape(output)}."
            )
        for dim in range(index.shape[1] if check_range else 0):
            size = output.shape[dim + 1]
            _check_indices(index[:, dim], -size, size, dim + 1, output.shape)
        rows_index = torch.arange(rows, device=output.device)
        return output[(rows_index, *index.unbind(1))]
    raise TargetError(f"`target` of type {type(target).__name__} is not valid.")
