"""n_steps="auto": error-controlled path integration, refined per example.

The integral is estimated with nested Clenshaw-Curtis rules of 5, 9, 17, ... nodes
(quadrature.nested_levels). Round 0 evaluates the 9 nodes of every example, which
gives the 5- and 9-node estimates at once; each later round doubles the rule of the
examples that have not converged, evaluating only its new nodes. Every evaluation is
reused by all finer levels, and an example that has converged costs nothing more.
Each round is one pass of the streaming engine over the active examples, chunked to
the memory budget like a fixed n_steps; the engine sums every level's rule from the
same gradients (a (levels, nodes) weight table), so no per-node gradient is stored.

The error estimate of an example at level L is the larger of two relative errors:

- completeness: |sum(A_L) - (F(x) - F(x'))| / s, with A_L the global attributions
  (gradient integral times (x - x')) of level L and the scale
  s = max(|F(x) - F(x')|, SCALE_FLOOR * max(|F(x)|, |F(x')|), ||A_L||_2, TINY_SCALE).
  The floors keep a near-zero difference from asking for accuracy no float has, and
  attributions that cancel (||A_L||_2 >> |F(x) - F(x')|) from being held to more
  accuracy in their sum than in themselves. This term is exact: F(x) and F(x') are
  nodes of every rule, so it is measured, not estimated.
- change: ||A_L - A_{L-1}||_2 / ||A_L||_2, how far the attributions moved at the last
  doubling. Relative to the attributions' own norm, not to |F(x) - F(x')|: where
  attributions cancel (||A||_2 much larger than |F(x) - F(x')|, as in a transformer's
  thousands of token features) a change measured against |F(x) - F(x')| would ask
  for far more accuracy than the attributions have meaning.

For a converging sequence the change is about the error of the coarser level, so it
overstates the error of the finer level that is returned; it is not a bound. An
integrand with features narrower than the node spacing (a ReLU network's gradient is
piecewise constant along the path and jumps at every kink) can look converged when
both levels miss the same jump; completeness is still checked exactly, and tests
compare the estimate and the result with a 4096-node reference.
"""

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from .chunking import choose_row_limit
from .dtypes import dtype_policy
from .engine import PathIntegral
from .errors import ArgumentError
from .quadrature import (
    DEFAULT_MAX_STEPS, NestedLevels, PathNodes, nested_levels, validate_max_steps,
    validate_method_and_steps,
)

DEFAULT_TOLERANCE = 1e-3
# An example whose output barely moves along the path (|F(x) - F(x')| tiny next to
# F itself) is judged against 1% of its output's magnitude instead: a tolerance
# relative to a near-zero difference would ask for accuracy no float can give.
SCALE_FLOOR = 1e-2
TINY_SCALE = 1e-12

# run_round(examples, nodes) -> the engine's pass over those examples (a long index
# tensor into the batch) with those nodes.
RunRound = Callable[[torch.Tensor, PathNodes], PathIntegral]


@dataclass(frozen=True)
class AdaptiveSettings:
    tolerance: float
    max_steps: int

    @property
    def levels(self) -> NestedLevels:
        return nested_levels(self.max_steps)


@dataclass
class AdaptiveInfo:
    """What n_steps="auto" did, per example."""

    evaluations: torch.Tensor  # (B,) int64: path points evaluated (model forward+backward rows)
    error_estimate: torch.Tensor  # (B,): the relative error estimate of the returned attributions
    completeness_error: torch.Tensor  # (B,): |sum(attributions) - (F(x) - F(x'))| / scale, exact
    converged: torch.Tensor  # (B,) bool: error_estimate <= tolerance (else max_steps was reached)
    tolerance: float


def adaptive_settings(n_steps, method: str, tolerance, max_steps,
                      return_adaptive_info: bool) -> Optional[AdaptiveSettings]:
    """The settings for n_steps="auto", None for a fixed n_steps (whose method and
    count are checked here too); clear errors for arguments that do not fit together."""
    if not (isinstance(n_steps, str) and n_steps == "auto"):
        if isinstance(n_steps, str):
            raise ArgumentError(f"`n_steps` must be an integer or 'auto'; got {n_steps!r}.")
        validate_method_and_steps(method, n_steps)
        for name, value in (("tolerance", tolerance), ("max_steps", max_steps)):
            if value is not None:
                raise ArgumentError(
                    f"`{name}` applies to n_steps='auto' only; got {name}={value!r} with "
                    f"n_steps={n_steps!r}."
                )
        if return_adaptive_info:
            raise ArgumentError("`return_adaptive_info` needs n_steps='auto'.")
        return None
    if method not in ("gausslegendre", "clenshaw_curtis"):
        raise ArgumentError(
            "n_steps='auto' refines nested Clenshaw-Curtis rules (Gauss-Legendre nodes are "
            f"not nested; Riemann rules converge too slowly to control): method={method!r} "
            "cannot be refined. Leave `method` at its default or give 'clenshaw_curtis'."
        )
    tolerance = DEFAULT_TOLERANCE if tolerance is None else tolerance
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0:
        raise ArgumentError(f"`tolerance` must be a number > 0; got {tolerance!r}.")
    max_steps = DEFAULT_MAX_STEPS if max_steps is None else validate_max_steps(max_steps)
    return AdaptiveSettings(float(tolerance), max_steps)


def refuse_several_targets(settings: Optional[AdaptiveSettings], many: Optional[list]) -> None:
    if settings is not None and many is not None:
        raise ArgumentError(
            "n_steps='auto' refines one target per example; give a fixed n_steps with "
            "several targets.")


def round_row_limit(settings: AdaptiveSettings, internal_batch_size, memory_budget,
                    inputs: Tuple[torch.Tensor, ...], nodes: PathNodes):
    """The RowLimit of one round: the budget holds the engine's accumulators and the
    driver's, one per level each."""
    return choose_row_limit(internal_batch_size, memory_budget, inputs, nodes.count,
                            target_count=2 * len(settings.levels.steps))


@dataclass
class AdaptiveIntegral:
    """The result of integrate_adaptively, shaped like one pass of the engine."""

    gradient_sums: Tuple[torch.Tensor, ...]
    start_values: torch.Tensor
    end_values: torch.Tensor
    info: AdaptiveInfo
    rounds: List[PathIntegral]

    @property
    def forward_calls(self) -> int:
        return sum(r.forward_calls for r in self.rounds)


def integrate_adaptively(
    ends: Tuple[torch.Tensor, ...],
    starts: Tuple[torch.Tensor, ...],
    settings: AdaptiveSettings,
    run_round: RunRound,
    start_values: Optional[torch.Tensor] = None,
    end_values: Optional[torch.Tensor] = None,
) -> AdaptiveIntegral:
    """Integrate the path gradients of every example to its tolerance.

    ends / starts are the path's ends (inputs and baselines, or a layer's
    activations), starts with batch size B or 1. F values at both ends are read from
    round 0 (which has alpha 0 and 1) unless given.
    """
    levels = settings.levels
    batch_size = ends[0].shape[0]
    device = ends[0].device
    differences = tuple(e - s for e, s in zip(ends, starts))
    results = [torch.empty_like(d, dtype=dtype_policy(d.dtype).accumulate) for d in differences]
    evaluations = torch.zeros(batch_size, dtype=torch.long, device=device)
    estimate = torch.zeros(batch_size, dtype=torch.float64, device=device)
    completeness = torch.zeros(batch_size, dtype=torch.float64, device=device)
    converged = torch.zeros(batch_size, dtype=torch.bool, device=device)
    rounds: List[PathIntegral] = []
    active = torch.arange(batch_size, device=device)
    sums: Optional[Tuple[torch.Tensor, ...]] = None  # (levels, active, ...) per input
    keep = scale = None
    for round_index in range(levels.rounds):
        if active.numel() == 0:
            break
        nodes = levels.round_nodes(round_index)
        integral = run_round(active, nodes)
        rounds.append(integral)
        first_level = levels.first_level_of_round(round_index)
        if sums is None:
            sums = integral.gradient_sums
            if end_values is None:
                start_values, end_values = integral.start_values, integral.end_values
            scale = _scale(start_values, end_values)
        else:
            sums = tuple(s[:, keep] for s in sums)  # drop the rows of last round's finished examples
            for s, new in zip(sums, integral.gradient_sums):
                s[first_level:] += new
        evaluations[active] += nodes.count
        level = first_level + 1 if round_index == 0 else first_level
        change, complete, norm = _estimates(sums, level, differences, active,
                                            end_values[active] - start_values[active])
        relative_completeness = complete / torch.maximum(scale[active], norm)
        estimate[active] = torch.maximum(change, relative_completeness)
        completeness[active] = relative_completeness
        done = estimate[active] <= settings.tolerance
        last = round_index == levels.rounds - 1
        finishing = torch.ones_like(done) if last else done
        for result, s in zip(results, sums):
            result[active[finishing]] = s[level][finishing].to(result.dtype)
        converged[active[done]] = True
        keep = ~finishing
        active = active[keep]
    if end_values is None:  # an empty batch runs no round
        start_values = end_values = torch.zeros(0, device=device)
    info = AdaptiveInfo(evaluations, estimate, completeness, converged, settings.tolerance)
    return AdaptiveIntegral(tuple(results), start_values, end_values, info, rounds)


def _scale(start_values: torch.Tensor, end_values: torch.Tensor) -> torch.Tensor:
    """Per example: the completeness scale before the attributions' norm joins it
    (see the module docstring)."""
    start, end = start_values.double(), end_values.double()
    floor = SCALE_FLOOR * torch.maximum(start.abs(), end.abs())
    return torch.maximum(torch.maximum((end - start).abs(), floor), torch.full_like(start, TINY_SCALE))


def _estimates(sums, level: int, differences, active: torch.Tensor, value_change: torch.Tensor):
    """Per active example: ||A_level - A_{level-1}||_2 / ||A_level||_2 (0 where both are
    0), |sum(A_level) - (F(x) - F(x'))| and ||A_level||_2."""
    squared_change = squared_norm = 0.0
    total = 0.0
    for s, difference in zip(sums, differences):
        d = difference[active]
        finer = (s[level] * d).flatten(1).double()
        coarser = (s[level - 1] * d).flatten(1).double()
        squared_change = squared_change + (finer - coarser).square().sum(1)
        squared_norm = squared_norm + finer.square().sum(1)
        total = total + finer.sum(1)
    change = torch.as_tensor(squared_change).sqrt()
    norm = torch.as_tensor(squared_norm).sqrt()
    relative = torch.where(norm > 0, change / norm.clamp_min(torch.finfo(norm.dtype).tiny), change)
    return relative, (total - value_change.double()).abs(), norm
