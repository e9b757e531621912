"""From a path integral to attributions, and the completeness check on them.

Shared by IntegratedGradients and LayerIntegratedGradients: what differs between
them is only where the path lies (inputs or a layer's activations).
"""

import functools
import math
import operator
from typing import Tuple

import torch

from .. import ops
from ..engine import PathIntegral


def attributions_from(
    integral: PathIntegral,
    ends: Tuple[torch.Tensor, ...],
    starts: Tuple[torch.Tensor, ...],
    multiply_by_inputs: bool,
) -> Tuple[torch.Tensor, ...]:
    """The integrated gradients, times (end - start) for global attributions."""
    if not multiply_by_inputs:
        return integral.gradient_sums
    return tuple(
        ops.scale_by_difference(total, end, start) if total.dim() == end.dim() else _per_target(total, end, start)
        for total, end, start in zip(integral.gradient_sums, ends, starts)
    )


def _per_target(totals: torch.Tensor, end: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """K targets' attributions, written into one tensor as each is made: a stack of the
    K scaled copies held them twice (ten targets of an MLP: 2.5x a budget). One copy is
    held beside them (the budget reserves it: result_count)."""
    result = None
    for k, total in enumerate(totals):
        scaled = ops.scale_by_difference(total, end, start)
        if result is None:
            result = scaled.new_empty((totals.shape[0],) + scaled.shape)
        result[k] = scaled
    return result if result is not None else totals.new_empty((0,) + end.shape)


def convergence_delta(
    attributions: Tuple[torch.Tensor, ...], start_values: torch.Tensor, end_values: torch.Tensor
) -> torch.Tensor:
    """sum(attributions) - (F(end) - F(start)) per example, in Captum's order of operations."""
    batch_size = attributions[0].shape[0]

    def per_example(tensor: torch.Tensor) -> torch.Tensor:
        # reshape(batch_size, -1) cannot infer -1 for an empty batch.
        return tensor.reshape(batch_size, math.prod(tensor.shape[1:])).sum(1)

    attribution_sums = functools.reduce(operator.add, (per_example(a) for a in attributions))
    return attribution_sums - (per_example(end_values) - per_example(start_values))


def convergence_delta_per_target(
    attributions: Tuple[torch.Tensor, ...], start_values: torch.Tensor, end_values: torch.Tensor
) -> torch.Tensor:
    """convergence_delta for K targets: attributions (K, B, ...), values (K, B) -> (K, B)."""
    return torch.stack([
        convergence_delta(tuple(a[k] for a in attributions), start_values[k], end_values[k])
        for k in range(start_values.shape[0])
    ])
