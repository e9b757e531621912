"""Captum's argument forms: inputs, baselines and additional forward arguments.

Each function accepts every form ``captum.attr.IntegratedGradients`` accepts and
turns it into the one canonical form the engine uses, or raises an error that names
the argument and the expected form.
"""

import numbers
from typing import Any, Optional, Tuple

import torch

from ..dtypes import dtype_policy, is_integer_dtype
from ..chunking import Chunk
from ..errors import ArgumentError, ArgumentTypeError, ShapeError


def format_inputs(inputs: Any, floating: bool = True) -> Tuple[Tuple[torch.Tensor, ...], bool]:
    """(tuple of detached input tensors, whether the caller passed a tuple).

    ``floating``: the inputs are the path's ends, so they need a floating dtype. The
    model inputs of LayerIntegratedGradients may be anything (token ids, masks).
    """
    is_tuple = isinstance(inputs, tuple)
    formatted = inputs if is_tuple else (inputs,)
    if not formatted:
        # Captum: TypeError, from calling the model without an input.
        raise ArgumentTypeError("`inputs` must hold at least one tensor; got an empty tuple.")
    checked = []
    for index, tensor in enumerate(formatted):
        name = f"inputs[{index}]" if is_tuple else "inputs"
        if not isinstance(tensor, torch.Tensor):  # Captum: AttributeError, reading .shape
            raise ArgumentTypeError(
                f"`{name}` must be a torch.Tensor (or `inputs` a tuple of tensors); "
                f"got {type(tensor).__name__}."
            )
        if floating and is_integer_dtype(tensor.dtype):
            # Captum's path (x' + alpha (x - x'), alpha a Python float) is in the default
            # dtype for integer inputs, and so are its attributions.
            tensor = tensor.to(torch.get_default_dtype())
        if floating:
            dtype_policy(tensor.dtype, name)
        if tensor.dim() == 0:  # Captum: RuntimeError (IndexError under NoiseTunnel)
            raise ShapeError(
                f"`{name}` must have a batch dimension (dim 0 indexes examples); "
                "got a 0-dim tensor."
            )
        checked.append(tensor)
    batch_sizes = {t.shape[0] for t in checked}
    if len(batch_sizes) > 1:
        shapes = ", ".join(str(tuple(t.shape)) for t in checked)
        raise ShapeError(
            "All `inputs` must have the same number of examples (dim 0); "
            f"got shapes {shapes}."
        )
    return tuple(t.detach() for t in checked), is_tuple


def promote_to_baselines(inputs: Tuple[torch.Tensor, ...], baselines: Any) -> Tuple[torch.Tensor, ...]:
    """The inputs in the dtype of Captum's path, x' + alpha (x - x'): where a baseline
    is a tensor of a wider floating dtype than its input (float64 for float32 inputs,
    float32 for float16 ones), the path and the attributions are in that dtype.
    Baselines that are numbers (or not tensors, refused later) leave the input as it is."""
    given = baselines if isinstance(baselines, tuple) else (baselines,)
    if len(given) != len(inputs):
        return inputs  # format_baselines says what is wrong
    promoted = []
    for x, baseline in zip(inputs, given):
        if isinstance(baseline, torch.Tensor) and baseline.dim() > 0 and baseline.dtype.is_floating_point:
            x = x.to(torch.promote_types(x.dtype, baseline.dtype))
        promoted.append(x)
    return tuple(promoted)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, torch.Tensor)


def format_baselines(
    baselines: Any, inputs: Tuple[torch.Tensor, ...], argument: str = "baselines"
) -> Tuple[torch.Tensor, ...]:
    """One baseline tensor per input, shaped (B, ...) or (1, ...), in the input's
    dtype and on its device. Scalars become (1, ...) tensors."""
    if baselines is None:
        baselines = (0.0,) * len(inputs)
    elif not isinstance(baselines, tuple):
        baselines = (baselines,)
    if len(baselines) != len(inputs):
        raise ArgumentError(
            f"`{argument}` must give one baseline per input tensor: got "
            f"{len(baselines)} baselines for {len(inputs)} inputs."
        )
    formatted = []
    for index, (baseline, x) in enumerate(zip(baselines, inputs)):
        name = f"{argument}[{index}]" if len(inputs) > 1 else argument
        feature_shape = tuple(x.shape[1:])
        if _is_number(baseline) or (
            isinstance(baseline, torch.Tensor) and baseline.dim() == 0
        ):
            value = baseline.item() if isinstance(baseline, torch.Tensor) else baseline
            formatted.append(
                torch.full((1,) + feature_shape, value, dtype=x.dtype, device=x.device)
            )
            continue
        if not isinstance(baseline, torch.Tensor):
            raise ArgumentTypeError(
                f"`{name}` must be a number or a torch.Tensor; "
                f"got {type(baseline).__name__}."
            )
        if tuple(baseline.shape) != tuple(x.shape):
            # As in Captum: a baseline of one row (dim 0 of size 1) broadcasts to the
            # input, e.g. a per-channel mean (1, C, 1, 1) for images (B, C, H, W).
            if baseline.shape[0] != 1 or not _broadcasts_to(baseline.shape, x.shape):
                raise ShapeError(
                    f"`{name}` must have the input's shape {tuple(x.shape)}, or one row "
                    f"(dim 0 of size 1) that broadcasts to it, such as {(1,) + feature_shape}; "
                    f"got {tuple(baseline.shape)}."
                )
            baseline = baseline.broadcast_to(x.shape)[:1].contiguous()
        formatted.append(baseline.detach().to(device=x.device, dtype=x.dtype))
    return tuple(formatted)


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    try:
        return tuple(torch.broadcast_shapes(shape, target)) == tuple(target)
    except RuntimeError:
        return False


def repeat_rows(tensor: torch.Tensor, chunk: Chunk) -> torch.Tensor:
    """The chunk's examples of a (B, ...) tensor, repeated for each of its steps
    (step-major, the order of the path rows)."""
    rows = tensor if chunk.covers_batch else tensor[chunk.example_begin:chunk.example_end]
    return rows.repeat((chunk.steps,) + (1,) * (rows.dim() - 1))


def full_batch(baseline: torch.Tensor, batch_size: int) -> torch.Tensor:
    """A (B, ...) contiguous tensor from a (B or 1, ...) baseline, for model calls."""
    if baseline.shape[0] == batch_size:
        return baseline
    return baseline.expand((batch_size,) + tuple(baseline.shape[1:])).contiguous()


def format_additional_forward_args(args: Any) -> Optional[Tuple[Any, ...]]:
    """None, or a tuple of arguments passed after the inputs (Captum wraps a single
    non-tuple argument)."""
    if args is None:
        return None
    return args if isinstance(args, tuple) else (args,)


def expand_additional_forward_args(
    args: Optional[Tuple[Any, ...]], chunk: Chunk
) -> Optional[Tuple[Any, ...]]:
    """The arguments for a chunk's rows: tensors with a dimension are repeated for
    every step (step-major, as Captum repeats them); everything else passes as is."""
    if args is None:
        return None
    expanded = []
    for index, arg in enumerate(args):
        if not isinstance(arg, torch.Tensor) or arg.dim() == 0:
            expanded.append(arg)
            continue
        if not chunk.covers_batch:
            if arg.shape[0] != chunk.batch_size:
                raise ArgumentError(
                    f"`additional_forward_args[{index}]` must have one row per example "
                    f"({chunk.batch_size}) when chunks split the batch; "
                    f"got shape {tuple(arg.shape)}."
                )
        expanded.append(repeat_rows(arg, chunk))
    return tuple(expanded)


def select_examples(value: Any, index: torch.Tensor, batch_size: int) -> Any:
    """Rows ``index`` of a per-example value: a tensor with batch_size rows, or a list
    of batch_size entries (per-example targets). Anything else applies to every
    example and passes as is; so does everything when index keeps the whole batch."""
    if _whole_batch(index, batch_size):
        return value
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch_size:
        return value[index.to(value.device)]
    if isinstance(value, list) and len(value) == batch_size:
        return [value[i] for i in index.tolist()]
    return value


def _whole_batch(index: torch.Tensor, batch_size: int) -> bool:
    # method="exact" selects rows with repeats (one per piece of a path), which may
    # number batch_size without being the batch.
    return index.numel() == batch_size and bool((index == torch.arange(batch_size, device=index.device)).all())


def select_additional_forward_args(
    args: Optional[Tuple[Any, ...]], index: torch.Tensor, batch_size: int
) -> Optional[Tuple[Any, ...]]:
    """The arguments of examples ``index`` (n_steps='auto' refines a subset of the
    batch, method='exact' walks one): tensors with a dimension must have one row per
    example."""
    if args is None or _whole_batch(index, batch_size):
        return args
    for position, arg in enumerate(args):
        if isinstance(arg, torch.Tensor) and arg.dim() and arg.shape[0] != batch_size:
            raise ArgumentError(
                f"`additional_forward_args[{position}]` must have one row per example "
                f"({batch_size}) with n_steps='auto' or method='exact', which evaluate some "
                f"examples only; "
                f"got shape {tuple(arg.shape)}."
            )
    return tuple(select_examples(arg, index, batch_size) if isinstance(arg, torch.Tensor) else arg
                 for arg in args)
