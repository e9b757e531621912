"""How far attributions are from completeness, sum(A) = F(x) - F(x'), relative to a
scale that keeps a near-zero difference from asking for accuracy no float has.

n_steps="auto" judges its levels and its walked examples by it; method="exact"
checks its result with it (exact IG meets completeness to rounding).
"""

from typing import Tuple

import torch

# An example whose output barely moves along the path (|F(x) - F(x')| tiny next to
# F itself) is judged against 1% of its output's magnitude instead: a tolerance
# relative to a near-zero difference would ask for accuracy no float can give.
SCALE_FLOOR = 1e-2
TINY_SCALE = 1e-12


def completeness_scale(start_values: torch.Tensor, end_values: torch.Tensor) -> torch.Tensor:
    """Per example: max(|F(x) - F(x')|, SCALE_FLOOR * max(|F(x)|, |F(x')|), TINY_SCALE),
    in float64; the attributions' L2 norm joins it in relative_completeness."""
    start, end = start_values.double(), end_values.double()
    floor = SCALE_FLOOR * torch.maximum(start.abs(), end.abs())
    return torch.maximum(torch.maximum((end - start).abs(), floor), torch.full_like(start, TINY_SCALE))


def relative_completeness(gradient_integrals: Tuple[torch.Tensor, ...], differences: Tuple[torch.Tensor, ...],
                          value_change: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per example: |sum(A) - (F(x) - F(x'))| / max(scale, ||A||_2), with A the global
    attributions (gradient integral times (x - x')). The norm keeps attributions that
    cancel (||A||_2 >> |F(x) - F(x')|) from being held to more accuracy in their sum
    than in themselves."""
    total = squared_norm = 0.0
    for integral, difference in zip(gradient_integrals, differences):
        attributions = (integral.double() * difference.double()).flatten(1)
        total = total + attributions.sum(1)
        squared_norm = squared_norm + attributions.square().sum(1)
    norm = torch.as_tensor(squared_norm).sqrt()
    return (total - value_change.double()).abs() / torch.maximum(scale, norm)
