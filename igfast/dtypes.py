"""The dtype table: how each floating dtype is interpolated and accumulated.

One place decides the arithmetic of every path (pure PyTorch and the kernels):

* ``compute``: the dtype in which ``alpha * (x - x')`` is formed. PyTorch multiplies a
  half tensor by a Python float in float32 ("opmath") and rounds once to half; Captum
  builds its path exactly that way, so parity needs the same.
* ``accumulate``: the dtype of the weighted sum over steps and of the attributions.
  Captum multiplies half gradients by float32 step sizes, which promotes to float32,
  so half and bfloat16 inputs get float32 attributions; float64 stays float64.
"""

from dataclasses import dataclass
from typing import Any

import torch

from .errors import InputTypeError


@dataclass(frozen=True)
class DtypePolicy:
    compute: torch.dtype
    accumulate: torch.dtype


_POLICIES = {
    torch.float16: DtypePolicy(compute=torch.float32, accumulate=torch.float32),
    torch.bfloat16: DtypePolicy(compute=torch.float32, accumulate=torch.float32),
    torch.float32: DtypePolicy(compute=torch.float32, accumulate=torch.float32),
    torch.float64: DtypePolicy(compute=torch.float64, accumulate=torch.float64),
}

SUPPORTED_DTYPES = tuple(_POLICIES)


def is_integer_dtype(dtype: torch.dtype) -> bool:
    """An integer dtype (bool is not one: it has no arithmetic Captum's path could use)."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def integer_item(value: Any, any_shape: bool = False) -> Any:
    """A 0-dim integer tensor as its int (Captum indexes and loops with one as with an
    int: n_steps, tuple targets); with ``any_shape``, a
    one-element integer tensor of any shape too (Captum counts steps with
    ``torch.tensor([5])`` as with 5, where a target of that form would index
    differently); anything else as given."""
    if (isinstance(value, torch.Tensor) and (value.dim() == 0 or (any_shape and value.numel() == 1))
            and is_integer_dtype(value.dtype)):
        return int(value.item())
    return value


def dtype_policy(dtype: torch.dtype, argument: str = "inputs") -> DtypePolicy:
    """The policy for ``dtype``; a clear error for dtypes without gradients."""
    try:
        return _POLICIES[dtype]
    except KeyError:
        names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        raise InputTypeError(
            f"`{argument}` must be floating point tensors ({names}) so that gradients "
            f"exist along the path; got dtype {dtype}. Convert integer or boolean "
            "inputs to a floating dtype (or attribute to an embedding layer instead)."
        ) from None
