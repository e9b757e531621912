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

Before round 0, one forward with tangents on one example (exact.ExactRoute
.estimate_pieces, counted as an evaluation) tells how the network bends the path.
A smooth network (no piecewise-linear op: GELU, tanh, attention, ...) starts from
the 3- and 5-node levels, and where its changes fell geometrically at the last two
doublings, faster at the later, the estimate is extrapolated from the convergence
ratio (_smooth_estimate; elsewhere the change counts twice); a network of ELU, CELU or
SELU is smooth but not analytic at 0 (its rule's error falls algebraically) and gets
neither, and SELU's jumps get the strict estimate below. Piecewise-linear
networks (ReLU, max-pool, ...; see exact.py) get two things, once the same forward
per example has predicted each path's pieces:

- a switch to method="exact" for an example whose exact cost (1 evaluation per
  piece, 4 with a smooth head) is below what refining its rule is predicted to cost
  (_ExactSwitch: the rule's error falls as 1/n on such a network), unless the walk's
  rows and sequential rounds (about one per piecewise-linear op, each timed by the
  probe) would take longer than the rule's remaining rows (timed in round 0): the
  choice depends on measured times. Without a smooth head the walk may stop an example
  short of its last pieces, once the stretches it has not reached are estimated within
  tolerance (exact._GapFill: 87 to 115 rows for igfast bench's MLP of 118.5 pieces).
  A path of a few pieces (FEW_PIECES) is walked even where the rule says it is done;
- a stricter estimate, measured against exact IG: below ASYMPTOTIC_STEPS nodes the
  change counts PRE_ASYMPTOTIC_FACTOR times, and it never falls below half the last
  level's change (on these networks, calibrated on 800 random ones: no example converges
  at round 0, the factor holds below PIECEWISE_ASYMPTOTIC_STEPS nodes, and the
  completeness error counts twice). So does every network whose integrand may jump and
  that cannot be walked, without those three: SELU; one the probe cannot read (a ReLU
  inside an autograd Function) and a compiled model (no probe runs), with a floor that
  does not compound (half the last change measured), since such a model may as well be
  smooth (where its changes fall as 1/n it is judged as a mixed network is, at every
  level: UNREAD_JUMPS_FACTOR); and a mixed network (below), with that floor too.
  One exception on walked networks: on a path the probe predicts to cross thousands of
  kinks, from 129 nodes on, the change (floored as above) overstates the error by a
  steady factor, so it is divided by it, unless the last two changes share a direction
  (a few dominant jumps), where it counts 1.5 times; the completeness error still counts
  twice (MANY_PIECES).

A mixed network (smooth ops before kinks: tanh then ReLU, a transformer's ReLU
feed-forward block) cannot take the exact walk, but its pieces can be followed as
method="gausslegendre_pieces" does: the probe counts their kinks as if the units were
straight, and an example switches as above, judged from ASYMPTOTIC_STEPS nodes on and
with the rule's order read from its last doubling (1 to 2); a path of a few pieces
(FEW_PIECES) switches at once. Its pieces are integrated by adaptive Gauss quadrature
(a Gauss pair per piece, the pieces that carry the error bisected until the estimate is
within tolerance: exact._refine_pieces). Its integrand jumps at the kinks, so nested
levels can agree by chance: calibrated on random mixed nets as the walked networks'
estimate was, its change and its completeness error count twice at every level
(MIXED_ASYMPTOTIC_STEPS). Its floor does not compound: the smooth stretches resolve
faster than 1/n first (a ReLU-FFN encoder layer's changes fall from 2.9 to 0.68 at 9
to 33 nodes), and a compounding floor held that for many levels (4097 evaluations at
1e-2, where 514 meet it).
"""

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import torch

from .chunking import choose_row_limit
from .completeness import completeness_scale, relative_completeness
from .dtypes import dtype_policy
from .engine import PathIntegral, outside_inference_mode
from .errors import (
    ArgumentError, ArgumentTypeError, NotPiecewiseLinearError, ToleranceNotReachedWarning, warn_to_caller,
)
from .exact import GAP_COMPLETENESS_ALLOWANCE, ExactRoute, SmoothNetworkError, hidden_kinks, warn_of_non_finite_ends
from .quadrature import (
    DEFAULT_MAX_STEPS, FIRST_ROUND_STEPS, SMOOTH_SMALLEST_LEVEL_STEPS, NestedLevels, PathNodes, nested_levels,
    validate_max_steps, validate_method_and_steps,
)

DEFAULT_TOLERANCE = 1e-3

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

    # (B,) int64: path points evaluated (model forward+backward rows), with the probe's
    # forward (one, for each example it read: a rule may end at max_steps + 1)
    evaluations: torch.Tensor
    error_estimate: torch.Tensor  # (B,): the relative error estimate of the returned attributions
    completeness_error: torch.Tensor  # (B,): |sum(attributions) - (F(x) - F(x'))| / scale, exact
    converged: torch.Tensor  # (B,) bool: error_estimate <= tolerance (else max_steps was reached)
    tolerance: float
    # (B,) bool: integrated by method="exact" (on a mixed network: by Gauss pairs on the
    # pieces of method="gausslegendre_pieces") after the rule's first rounds (see
    # integrate_adaptively); their error_estimate is that integral's own.
    exact: Optional[torch.Tensor] = None
    # Why no example could switch to the exact rule (the network is not piecewise
    # linear, ...); None when the switch was open or never needed.
    exact_unavailable: Optional[str] = None


def warn_if_not_converged(info: AdaptiveInfo) -> None:
    """Say so when examples come back unconverged and the caller sees no AdaptiveInfo:
    their attributions are not within the tolerance asked for."""
    missed = ~info.converged
    if not bool(missed.any()):
        return
    # (An estimate within tolerance unconverged: round 0's alone, on a network auto can walk.)
    unjudged = bool((info.error_estimate[missed] <= info.tolerance).any())
    warn_to_caller(
        f"n_steps='auto': {int(missed.sum())} of {missed.numel()} examples did not reach tolerance "
        f"{info.tolerance:g} within max_steps (error estimate up to {float(info.error_estimate.max()):.2e}); "
        + ("on a piecewise-linear network the first round's estimate is not trusted, and a max_steps of at "
           f"least {2 * FIRST_ROUND_STEPS - 1} lets auto check it; " if unjudged else "")
        + "raise max_steps or the tolerance, or pass return_adaptive_info=True to see which examples "
        "(AdaptiveInfo.converged).", ToleranceNotReachedWarning)


def adaptive_settings(n_steps, method: str, tolerance, max_steps,
                      return_adaptive_info: bool) -> Optional[AdaptiveSettings]:
    """The settings for n_steps="auto", None for a fixed n_steps (whose method and
    count are checked here too); clear errors for arguments that do not fit together."""
    if not (isinstance(n_steps, str) and n_steps == "auto"):
        if isinstance(n_steps, str):
            raise ArgumentTypeError(f"`n_steps` must be an integer or 'auto'; got {n_steps!r}.")
        validate_method_and_steps(method, n_steps)
        for name, value in (("tolerance", tolerance), ("max_steps", max_steps)):
            if value is not None:
                raise ArgumentError(
                    f"`{name}` applies to n_steps='auto', method='exact' and method='gausslegendre_pieces' "
                    f"only; got {name}={value!r} with n_steps={n_steps!r} and method={method!r}."
                )
        if return_adaptive_info:
            raise ArgumentError("`return_adaptive_info` needs n_steps='auto', method='exact' or "
                                "method='gausslegendre_pieces'.")
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
                    inputs: Tuple[torch.Tensor, ...], nodes: PathNodes, held_bytes: int = 0):
    """The RowLimit of one round: the budget holds the engine's accumulators and the
    driver's, one per level each (and ``held_bytes`` the caller holds, see choose_row_limit)."""
    return choose_row_limit(internal_batch_size, memory_budget, inputs, nodes.count,
                            target_count=2 * len(settings.levels.steps), held_bytes=held_bytes)


@dataclass
class AdaptiveIntegral:
    """The result of integrate_adaptively, shaped like one pass of the engine."""

    gradient_sums: Tuple[torch.Tensor, ...]
    start_values: torch.Tensor
    end_values: torch.Tensor
    info: AdaptiveInfo
    rounds: List[Any]  # the engine passes (PathIntegral), and any exact integral's

    @property
    def forward_calls(self) -> int:
        return sum(r.forward_calls for r in self.rounds)


@outside_inference_mode
def integrate_adaptively(
    ends: Tuple[torch.Tensor, ...],
    starts: Tuple[torch.Tensor, ...],
    settings: AdaptiveSettings,
    run_round: RunRound,
    start_values: Optional[torch.Tensor] = None,
    end_values: Optional[torch.Tensor] = None,
    exact_route: Optional[ExactRoute] = None,
    no_route_because: Optional[str] = None,
) -> AdaptiveIntegral:
    """Integrate the path gradients of every example to its tolerance.

    ends / starts are the path's ends (inputs and baselines, or a layer's
    activations), starts with batch size B or 1. F values at both ends are read from
    round 0 (which has alpha 0 and 1) unless given. With ``exact_route``, examples
    whose exact integral costs fewer evaluations than refining their rule further
    switch to it (see _ExactSwitch); ``no_route_because`` says why there is none.
    """
    levels = settings.levels
    batch_size = ends[0].shape[0]
    warn_of_non_finite_ends(ends, starts, "n_steps='auto'")
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
    last_change = torch.zeros(batch_size, dtype=torch.float64, device=device)
    # the change's fall at the last doubling (change / the change before); inf before two changes
    last_ratio = torch.full((batch_size,), math.inf, dtype=torch.float64, device=device)
    last_measured = torch.zeros(batch_size, dtype=torch.float64, device=device)  # before any floor
    keep = scale = switch = None
    if exact_route is not None and batch_size:
        switch = _ExactSwitch(exact_route, settings, differences, results, evaluations, estimate,
                              completeness, converged)
        # One forward with tangents, on one example, tells how the network bends the
        # path: a smooth one starts from lower levels.
        switch.probe(active[:1])
        if switch.smooth:
            levels = nested_levels(settings.max_steps, SMOOTH_SMALLEST_LEVEL_STEPS)
        switch.levels = levels
    for round_index in range(levels.rounds):
        if active.numel() == 0:
            break
        nodes = levels.round_nodes(round_index)
        started = _seconds(device)
        integral = run_round(active, nodes)
        # (Its gradient sums become the driver's `sums` or are added into them: the record
        # keeps the calls only, else every round's accumulators stayed held to the end.)
        rounds.append(integral.spent())
        # The time of a rule row, from the latest round: round 0 of a fresh process's first
        # call also pays its setup (bench_exact's MLP, float64: 6.1e-4 s a row against
        # 1.3e-5 in round 1 and 7e-6 warm), which makes the rule look dearer than the walk.
        # (The switch after round 0 has only round 0's time: in a call that paid the setup it
        # waits for round 1's, see _ExactSwitch.take.)
        row_seconds = (_seconds(device) - started) / max(1, nodes.count * active.numel())
        first_level = levels.first_level_of_round(round_index)
        if sums is None:
            sums = integral.gradient_sums
            if end_values is None:
                start_values, end_values = integral.start_values, integral.end_values
            scale = completeness_scale(start_values, end_values)
            if switch is not None:
                switch.value_change, switch.scale = end_values - start_values, scale
        else:
            sums = tuple(s[:, keep] for s in sums)  # drop the rows of last round's finished examples
            for s, new in zip(sums, integral.gradient_sums):
                s[first_level:] += new
        evaluations[active] += nodes.count
        level = first_level + 1 if round_index == 0 else first_level
        change, complete, norm = _estimates(sums, level, differences, active,
                                            end_values[active] - start_values[active])
        relative_completeness = complete / torch.maximum(scale[active], norm)
        if switch is not None:
            switch.row_seconds, switch.timed_round = row_seconds, round_index
            # Probe whether the network is piecewise linear (one forward per example that
            # may still refine) before judging the examples: its estimate is stricter.
            could_refine = torch.maximum(change * PRE_ASYMPTOTIC_FACTOR, relative_completeness) > settings.tolerance
            switch.probe(active[could_refine])
        # Without a probe (a compiled model) nothing says the integrand is smooth.
        strict = switch is None or switch.strict
        measured, previous_measured = change, last_measured[active]
        if strict:
            # Where the integrand is known to jump (error ~ 1/n) the floor compounds: half the
            # last floored change. Where the network is not known, the rule may converge much
            # faster once resolved, and a compounding floor would hold large early changes for
            # many levels (a compiled GELU MLP: 157 evaluations, not converged, at 1e-4 where
            # 17 suffice): half the last measured change.
            floor = last_change if switch is not None and switch.compounding_floor else last_measured
            change = torch.maximum(change, floor[active] / 2)
        last_measured[active] = measured
        raw_change = change
        if switch is not None and switch.smooth and round_index > 0:
            ratio = _change_ratio(change, last_change[active])
            change = _smooth_estimate(change, ratio, last_ratio[active])
            last_ratio[active] = ratio
        last_change[active] = raw_change
        piecewise_linear = switch is not None and switch.piecewise_linear
        # A path across thousands of kinks: the change overstates the finer level's error
        # by a steady factor, and is divided by it, unless the last two changes share a
        # direction: a few dominant jumps, whose error the change may understate (see
        # MANY_PIECES).
        many = switch.many_pieces(active, levels.steps[level]) if piecewise_linear else torch.zeros_like(change,
                                                                                                     dtype=torch.bool)
        dominated = torch.zeros_like(many)
        if bool(many.any()):
            aligned = _change_cosine(sums, level, differences, active).abs() > MANY_PIECES_CHANGE_COSINE
            dominated, many = many & aligned, many & ~aligned
        change = torch.where(many, change / MANY_PIECES_CHANGE_OVER_ERROR, change)
        # The error the rule is predicted to have at this level; the estimate that judges
        # it is stricter at coarse levels where the integrand may jump (see above).
        predicted = torch.maximum(change, relative_completeness)
        mixed = switch is not None and switch.mixed
        if piecewise_linear:
            completeness_factor, asymptotic_steps = PIECEWISE_COMPLETENESS_FACTOR, PIECEWISE_ASYMPTOTIC_STEPS
        elif mixed:
            completeness_factor, asymptotic_steps = MIXED_COMPLETENESS_FACTOR, MIXED_ASYMPTOTIC_STEPS
        else:
            completeness_factor, asymptotic_steps = 1.0, ASYMPTOTIC_STEPS
        if strict and levels.steps[level] < asymptotic_steps:
            change = change * PRE_ASYMPTOTIC_FACTOR
        elif strict and not (piecewise_linear or mixed):
            # An integrand that jumps (SELU) or may (an op the probe cannot read, a compiled
            # model): where its changes fall no faster than a smooth rule's do once resolved
            # (GEOMETRIC_RATIO), it converges as 1/n, as a mixed network's, and is judged as one.
            algebraic = measured > GEOMETRIC_RATIO * previous_measured
            change = torch.where(algebraic, change * UNREAD_JUMPS_FACTOR, change)
            completeness_factor = torch.where(algebraic, UNREAD_JUMPS_FACTOR, 1.0)
        change = torch.where(dominated, change * MANY_PIECES_ALIGNED_FACTOR, change)
        judged_completeness = relative_completeness * completeness_factor
        estimate[active] = torch.maximum(change, judged_completeness)
        if mixed:  # its factors hold at every level: the rule stops only once its estimate does
            predicted = estimate[active]
        completeness[active] = relative_completeness
        done = estimate[active] <= settings.tolerance
        if piecewise_linear and round_index < PIECEWISE_FIRST_CONVERGING_ROUND:
            done = torch.zeros_like(done)
        last = round_index == levels.rounds - 1
        walked = torch.zeros_like(done)
        # A path of a few pieces is walked even where the rule says it is done: nested levels
        # can miss the same jump of a path with 2 or 3 kinks (see FEW_PIECES).
        few = switch.few_pieces(active, done) if switch is not None else torch.zeros_like(done)
        if switch is not None and not last and not bool((done & ~few).all()):
            switch.route.held_beside = sum(t.numel() * t.element_size() for t in (*sums, *results, *differences))
            walked = switch.take(active, ~done | few, predicted, level, rounds, always=few)
        finishing = torch.ones_like(done) if last else done | walked
        for result, s in zip(results, sums):
            quadrature = finishing & ~walked
            result[active[quadrature]] = s[level][quadrature].to(result.dtype)
        converged[active[done & ~walked]] = True  # (the switch judged the walked examples)
        keep = ~finishing
        active = active[keep]
    if end_values is None:  # an empty batch runs no round
        start_values = end_values = torch.zeros(0, device=device)
    info = AdaptiveInfo(evaluations, estimate, completeness, converged, settings.tolerance)
    if switch is not None:
        info.exact, info.exact_unavailable = switch.walked, switch.unavailable
    else:
        info.exact, info.exact_unavailable = torch.zeros_like(converged), no_route_because
    return AdaptiveIntegral(tuple(results), start_values, end_values, info, rounds)


# On a piecewise-linear network the integrand is piecewise constant and every rule's
# error falls as 1/n once the nodes are finer than most pieces. Measured on ReLU MLPs
# against exact IG, the change alone let about 1 in 200 converged examples past their
# tolerance, by up to 1.7x, always at the coarse levels:
# - below ASYMPTOTIC_STEPS nodes the change is multiplied by PRE_ASYMPTOTIC_FACTOR;
# - a change that fell by more than half since the last level is taken for the two
#   levels' errors happening to coincide, not for convergence: half the last change
#   stays the floor (on the MLP of igfast bench, the largest true error over this
#   estimate went from 1.12 to 0.99).
ASYMPTOTIC_STEPS = 33
PRE_ASYMPTOTIC_FACTOR = 2.0
# Where the probe has walked the network (piecewise linear: method="exact" could run it)
# three more things, calibrated against exact IG on random ReLU, LeakyReLU, abs and
# hardtanh MLPs and residual nets of 2 to 64 features, 8 to 512 units and 2 to 6 layers,
# 16 examples each, baselines at zero, near zero, near the input or at its negation
# (tests/test_adaptive.py: sweep_network). With the rules above alone, on 800 nets
# (9205 paths of more than 8 pieces) 27 converged examples were above tolerance 1e-2 (up
# to 1.87x), 3 above 1e-3 (1.10x) and 1 above 1e-4 (1.20x); on 400 more (4644 paths), 15,
# 8 and 0 (up to 2.75x). With these and FEW_PIECES at 16, none of either (at most
# 0.94x), nor of 300 nets held out until then (2760 paths of more than 16 pieces: 6 at
# 1e-2 before, up to 1.33x; at most 0.92x now):
# - no example converges before round PIECEWISE_FIRST_CONVERGING_ROUND (17 nodes): the
#   5- and 9-node levels of paths of 10 and 166 pieces agreed to 1e-3 and 4e-3 where
#   the 9-node level was 1.4x and 1.9x the tolerance off;
# - the pre-asymptotic factor holds below PIECEWISE_ASYMPTOTIC_STEPS nodes: a path of
#   tens to hundreds of pieces is not resolved by 33 or 65 nodes, and its nested levels
#   can agree by chance (2.75x at 33 nodes, 1.35x at 65);
# - the completeness error counts PIECEWISE_COMPLETENESS_FACTOR times: it measures the
#   error of one projection (the attributions' sum) exactly, and an error spread over
#   the features shows there at a fraction of its size (without the factor, 4 of the
#   800 nets' examples stayed above 1e-2, up to 1.25x).
# On igfast bench's workloads this costs evaluations only where the rule runs on the
# MLP (at 1e-2: 150 against 143; with a softmax head 154 against 148); none on the CNN.
PIECEWISE_FIRST_CONVERGING_ROUND = 1
PIECEWISE_ASYMPTOTIC_STEPS = 129
PIECEWISE_COMPLETENESS_FACTOR = 2.0
# A mixed network (kinks after smooth ops: tanh then ReLU) was calibrated the same way,
# against gausslegendre_pieces with 8 Gauss nodes per piece, on 300 of the sweep's nets
# with tanh first (tests/test_adaptive.py: mixed_sweep_network; 4800 paths). With the
# strict estimate of a network the probe cannot read (the factor below ASYMPTOTIC_STEPS,
# completeness once), the rule alone reported 23, 29 and 13 examples converged above
# tolerance 1e-2, 1e-3 and 1e-4 (up to 3.4x, 4.7x, 1.8x), at every level from 33 nodes
# to 4097: the error of a rule on a jumping integrand falls as 1/n, and at a doubling the
# change is then about the finer level's error itself, not an overestimate. Now
# - its change counts PRE_ASYMPTOTIC_FACTOR times at every level (below
#   MIXED_ASYMPTOTIC_STEPS nodes); to 129 nodes only, 5, 7 and 7 stayed above (1.27x,
#   1.67x, 1.77x); to 129 and 1.5 times beyond, 0, 3 and 0 (1.26x);
# - its completeness error counts MIXED_COMPLETENESS_FACTOR times; once, 3, 2 and 0
#   (1.09x, 1.26x);
# - a path of at most FEW_PIECES pieces is walked at once: with both factors one path of
#   6 pieces was still 1.26x off at 1e-3 (513 nodes);
# which leaves none (at most 0.83x, 0.63x at 1e-2 and 1e-4), nor on 300 nets held out
# until then (seeds 6000-6299: 23, 30 and 9 before, up to 2.3x; at most 0.64x, 0.96x and
# 0.57x now, the rule alone). It costs the rule evaluations: at 1e-2, 587 on average
# where it ran alone, against 333 (held out: 706 against 445); on bench_exact's
# tanh-then-ReLU MLP 202 against 94, where GL needs 66. At 1e-3 the switch, which weighs
# the rule's judged estimate on such a network (the one it stops on), walks that MLP's
# pieces after 33 nodes: 471.9 evaluations (GL 480), where the rule would take 1954 and
# about twice the time (see predicted_walk_seconds). A compounding floor as well left
# none either, but held bench_exact's encoder layer at 4097 evaluations at 1e-2 (the
# module docstring).
MIXED_ASYMPTOTIC_STEPS = math.inf
MIXED_COMPLETENESS_FACTOR = 2.0
# A network whose integrand jumps but that cannot be walked (SELU and ELU with alpha != 1,
# whose slopes jump; an op the probe cannot read, such as cummax, median or a ReLU inside
# an autograd Function; a compiled model) had the strict estimate below ASYMPTOTIC_STEPS
# only, since it may as well be smooth. Beyond, on a jumping integrand the change is
# about the finer level's error, not more: on 25 random nets each of Linear(8, 16), one
# of those five ops, Linear(16, 4) (6 examples, tolerances 1e-2, 3e-3 and 1e-3, against a
# 100000-node reference) 20 of 2,237 converged examples were above tolerance, up to 1.45x.
# Where an example's changes fall no faster than GEOMETRIC_RATIO (as 1/n, not as a smooth
# rule's once resolved) its change and its completeness error now count this many times:
# 1 of 2,175 above (1.45x: cummax at 1e-3, two levels whose errors agreed to 3%), at
# 1.4 to 2.1 times the evaluations on those nets; none on 25 nets of atan, smooth but
# unread (9.2 to 13.8 evaluations, as before).
UNREAD_JUMPS_FACTOR = 2.0
# A path of at most this many pieces (as its probe predicts) is walked even where the
# rule says it is done, which costs no more rows than the rule's round 1 (17 nodes; on
# such a network no example converges before it, PIECEWISE_FIRST_CONVERGING_ROUND): a
# 6-layer ReLU MLP on 2 features with a baseline near the input had a path of 3 pieces,
# and its levels of 9 and 17 nodes agreed on an answer 5.9x its tolerance (1e-2) off;
# on a path of 10 pieces the rule's error went from 1.3e-2 at 65 nodes to 1.7e-2 at
# 129, where the estimate said 7.8e-3 (one of the 400 more nets above). On a mixed
# network such a path is walked at once, whatever its rule says (_ExactSwitch.few_pieces).
FEW_PIECES = 16
# A path across thousands of kinks (as its probe predicts) has a rule error that is the
# sum of thousands of jumps' small errors, each placed at random against the nodes: the
# errors of consecutive levels are neither one vector shrinking nor independent, and the
# change at a doubling is a steady multiple of the finer level's error, q. Measured
# against exact IG (bench_jump_errors; a helper's sweep of 2026-12-07 over random ReLU
# CNNs and MLPs, levels of 33 to 2049 nodes):
# - igfast bench's CNN (about 11,000 pieces, 3,072 features): q 1.60 to 1.85 at every
#   level to 8193 nodes, two seeds; its MLP (about 118 pieces): 0.89 to 3.3;
# - q needs many pieces and many features: on paths of 2,000 pieces or more, CNNs of
#   1,024 to 3,072 features had q of at least 1.43 (322 example-levels), but MLPs of 16
#   to 512 features went down to 0.83 (3,900 pieces, 16 features) and 1.15 (512);
# - and no jump that dominates: CNNs of 1,728 features and 6,000 to 19,000 pieces plus
#   two ReLU units with big weights had q down to 1.00. There the last two changes share
#   a direction (|cosine| 0.57 to 1.0, against at most 0.22 on eight plain CNNs), and
#   where it is at most MANY_PIECES_CHANGE_COSINE q was at least 1.44;
# - heavy tails (helpers' sweeps of 2026-12-08: 99 CNNs of 1,026 to 3,072 features and
#   2,000 to 8,600 pieces, Cauchy, Student-t or |Cauchy|^2 weights on the head, the
#   second conv or a hidden layer): at 65 nodes one example's change was 0.65 of its
#   error (its error stalled between 33 and 65 nodes), so the sharper estimate waits
#   for the levels the plain rule trusts (MANY_PIECES_STEPS); from 129 nodes with
#   |cosine| at most MANY_PIECES_CHANGE_COSINE q was at least 1.13 on 761 of 765
#   example-levels, but above it down to 0.80 (1,094): a few dominant jumps, whose
#   error can stall for a level while the change shrinks;
# - the other four (q 0.08 to 0.85), and six more above the cosine, were on CNNs with
#   Cauchy weights in two layers whose levels miss a narrow spike: an error that stays
#   at 3e-3 to 5e-3 from 129 to 2049 nodes while the change falls to 1e-4. No change
#   shows it, only completeness (6.5e-3 off at 2049 nodes), which counts twice;
# - end to end (40 of those CNNs, 4 examples, tol 1e-2, 3e-3, 1e-3, the walk kept
#   out): worst converged error 0.92 of tolerance; with the aligned change taken as it
#   is, 1.04 (and 1.035 on another at 4.3e-3), for 15% to 25% fewer evaluations.
# So from MANY_PIECES predicted pieces, MANY_PIECES_FEATURES moved features and
# MANY_PIECES_STEPS nodes on, the change (floored as above) is divided by
# MANY_PIECES_CHANGE_OVER_ERROR, below every q measured there, where the last two
# changes' |cosine| is at most MANY_PIECES_CHANGE_COSINE, and multiplied by
# MANY_PIECES_ALIGNED_FACTOR where it is above (at least 1.2 times every error measured
# there). igfast bench's CNN then stops at 1025 nodes for 1e-3 (2049 before; estimates
# 9.3e-4 and 9.8e-4); at 1e-4 its estimate at 8193 (1.17e-4) stays above tolerance.
MANY_PIECES = 2000
MANY_PIECES_FEATURES = 1000
MANY_PIECES_STEPS = PIECEWISE_ASYMPTOTIC_STEPS
MANY_PIECES_CHANGE_OVER_ERROR = 1.1
MANY_PIECES_CHANGE_COSINE = 0.4
MANY_PIECES_ALIGNED_FACTOR = 1.5


# On a smooth network the error of nested Clenshaw-Curtis rules falls geometrically
# once the rule resolves the integrand, so the change at the last doubling (about the
# coarser level's error) overstates the finer level's by the convergence ratio. Where
# the change fell by at least GEOMETRIC_RATIO since the last level (faster than any
# n^-3: a kink gives n^-2, a jump n^-1, so a nearly-kinked smooth unit that is not yet
# resolved keeps the plain change) the estimate is SMOOTH_SAFETY * change^2 / last
# change. Measured on MiniLM's embeddings (LayerIG) the true error was at most 0.76x
# of change^2 / last change (at 33 nodes); on MLPs with tanh, GELU, SiLU, softplus and
# softplus(beta=50), 3200 converged examples from tolerance 1e-1 to 1e-6 stay within it
# (without the ratio test, two of softplus(beta=50)'s exceeded it by up to 1.3x).
#
# A second sweep (a helper's, 2026-12-07: MLPs of softplus(beta=50 and 100), SiLU and
# GELU with weights x5-6 and tanh with weights x4-8, the steep units of real nets; 300
# nets of 4 examples each, tolerances 1e-2 to 1e-4, against a 32000-node reference)
# found 30 of 28,000 converged examples above tolerance, up to 4.95x: a fall of 1/8 at
# one doubling can be a coarse level catching up (softplus(beta=100): changes 0.15,
# 8.5e-3 at 5 and 9 nodes, the 9-node level 2.4x its estimate off), and two levels that
# miss the same nearly-kinked unit change little (errors 1.8e-2 and 1.4e-2 at 9 and 17
# nodes, a change of 8.6e-3). Now the rule counts as resolved only where the change fell
# by GEOMETRIC_RATIO at the last two doublings and faster at the later one (a geometric
# rule's fall squares at each doubling: a fall that holds is algebraic), and elsewhere
# the change counts UNRESOLVED_FACTOR times, as a jumping integrand's does.
SMOOTH_SAFETY = 2.0
GEOMETRIC_RATIO = 1 / 8
UNRESOLVED_FACTOR = 2.0


def _change_ratio(change: torch.Tensor, last_change: torch.Tensor) -> torch.Tensor:
    return torch.where(last_change > 0, change / last_change.clamp_min(torch.finfo(change.dtype).tiny),
                       torch.ones_like(change))


def _smooth_estimate(change: torch.Tensor, ratio: torch.Tensor, last_ratio: torch.Tensor) -> torch.Tensor:
    """The change extrapolated by its fall where the rule has resolved the integrand (see
    SMOOTH_SAFETY), else UNRESOLVED_FACTOR times the change."""
    geometric = (ratio <= GEOMETRIC_RATIO) & (last_ratio <= GEOMETRIC_RATIO) & (ratio <= last_ratio)
    return torch.where(geometric, torch.minimum(change, SMOOTH_SAFETY * change * ratio), UNRESOLVED_FACTOR * change)


class _ExactSwitch:
    """Moves examples from the nested rule to method="exact" where walking the pieces of
    their path is predicted to cost fewer evaluations than the rule's remaining levels.

    On a piecewise-linear network the integrand is piecewise constant, so every rule's
    error falls as 1/n: an example whose estimate is e at n nodes needs about
    n e / tolerance nodes, i.e. the first level at least that fine (or never converges
    below max_steps). Its exact cost is predicted from one forward with tangents at the
    path's start (ExactRoute.estimate_pieces, counted as one evaluation). An example
    switches when that prediction is below the rule's cost to go and within what is left
    of max_steps; the prediction is not a bound, so an exact example may end above
    max_steps. The first probe that finds the network cannot be walked closes the switch
    for the call, and says why (AdaptiveInfo.exact_unavailable). A mixed network's
    examples switch to adaptive Gauss pairs on their pieces (ExactRoute.curved; see the
    module docstring for how its decision differs).
    """

    def __init__(self, route: ExactRoute, settings: AdaptiveSettings, differences, results, evaluations,
                 estimate, completeness, converged) -> None:
        self.route, self.settings = route, settings
        self.levels = settings.levels  # the driver's, once it has chosen them
        self.differences, self.results = differences, results
        self.evaluations, self.estimate, self.completeness, self.converged = evaluations, estimate, completeness, converged
        # Set after round 0: F(x) - F(x') and the completeness scale per example.
        self.value_change: Optional[torch.Tensor] = None
        self.scale: Optional[torch.Tensor] = None
        self.smooth = False  # the probe met no piecewise-linear op, and no non-analytic one
        # The network cannot be walked, and its integrand jumps: the probe met an op whose
        # slope jumps (SELU, ...); or it may jump: the probe met an op it cannot read.
        self.jumps = False
        self.unreadable = False
        batch_size = evaluations.shape[0]
        self.walked = torch.zeros(batch_size, dtype=torch.bool, device=evaluations.device)
        self.exact_cost: Optional[torch.Tensor] = None  # (B,) predicted evaluations, -1 until probed
        self.pieces: Optional[torch.Tensor] = None  # (B,) predicted pieces
        self.walk_rows: Optional[torch.Tensor] = None  # (B,) of exact_cost, the rows with tangents
        # (B,) the features each path moves (nonzero x - x'), for the many-pieces estimate.
        self.moved_features = sum(d.flatten(1).ne(0).sum(1) for d in differences)
        # A mixed network: the rule's predicted error at the last level, per example.
        self.previous_predicted = torch.zeros(batch_size, dtype=torch.float64, device=evaluations.device)
        self.unavailable: Optional[str] = None
        # Seconds of one forward+backward row, from the latest rule round, and the probes'
        # times, which predict the walk's (see take).
        self.row_seconds, self.timed_round = 0.0, 0
        self.probe_clock = ProbeClock()

    def probe(self, examples: torch.Tensor) -> None:
        """Predict the exact cost of the examples not probed yet (one forward each), or
        find that the network cannot be walked."""
        if self.unavailable is not None:
            return
        if self.exact_cost is None:
            self.exact_cost = torch.full_like(self.evaluations, -1)
            self.pieces = torch.zeros_like(self.evaluations)
            self.walk_rows = torch.zeros_like(self.evaluations)
        unprobed = examples[self.exact_cost[examples] < 0]
        first = bool(self.exact_cost.max() < 0)
        try:
            for group in self.probe_clock.groups(unprobed, first):
                if group.numel():
                    self.evaluations[group] += 1  # the model ran, whatever the probe finds
                    started, curved = _seconds(group.device), self.route.curved
                    try:
                        estimate = self.route.estimate_pieces(group)
                    finally:
                        if self.route.curved != curved:  # the walk of exact refused: walked again, curved
                            self.evaluations[group] += 1
                    self.probe_clock.add(group.numel(), _seconds(group.device) - started, first)
                    first = False
                    self.exact_cost[group] = estimate.evaluations
                    self.pieces[group] = estimate.pieces
                    self.walk_rows[group] = estimate.walk_rows
        except NotPiecewiseLinearError as error:
            self.unavailable = str(error)
            # Only an analytic integrand gets the lower levels and the extrapolated estimate;
            # one that jumps (SELU) or may jump (any network the probe cannot read: a ReLU
            # inside an autograd Function, ...) gets the strict estimate (see strict).
            smooth = isinstance(error, SmoothNetworkError)
            self.smooth = smooth and error.analytic
            self.jumps = smooth and error.slope_jumps
            self.unreadable = not smooth

    @property
    def strict(self) -> bool:
        """Whether the integrand jumps, so that coarse rules may miss its jumps: the
        stricter estimate (see ASYMPTOTIC_STEPS) applies."""
        return self.found_kinks or self.jumps or self.unreadable

    @property
    def found_kinks(self) -> bool:
        """Whether a probe followed the path's pieces: walked the network as method="exact"
        does (piecewise_linear), or found kinks after smooth ops (a mixed network,
        ExactRoute.curved). Either way the integrand jumps at the kinks, so nested levels
        can agree by chance: on tanh-then-ReLU MLPs the plain change let converged examples
        reach 2.0x their tolerance (3e-3); the strict estimate, calibrated for each kind
        (PIECEWISE_ASYMPTOTIC_STEPS, MIXED_ASYMPTOTIC_STEPS), none."""
        return self.unavailable is None and self.exact_cost is not None and bool((self.exact_cost >= 0).any())

    @property
    def compounding_floor(self) -> bool:
        """Whether the integrand is known to jump (its rule's error falls as 1/n), so the
        strict floor may compound."""
        return self.piecewise_linear or self.jumps

    @property
    def mixed(self) -> bool:
        """Whether a probe found kinks after smooth ops (ExactRoute.curved): the integrand
        is smooth between jumps, and its rule converges as 1/n once the smooth stretches
        are resolved."""
        return self.route.curved and self.found_kinks

    @property
    def piecewise_linear(self) -> bool:
        """Whether a probe has walked the network as method="exact" does (so its integrand
        is piecewise constant, or smooth with jumps, and every rule converges as 1/n)."""
        return not self.route.curved and self.found_kinks

    def many_pieces(self, active: torch.Tensor, steps: int) -> torch.Tensor:
        """Per active example: whether a probe predicted its path to cross at least
        MANY_PIECES kinks and the path moves at least MANY_PIECES_FEATURES features, on a
        walked network, at a level of at least MANY_PIECES_STEPS nodes: there the rule's
        change is a sharper estimate (see MANY_PIECES)."""
        if not self.piecewise_linear or steps < MANY_PIECES_STEPS:
            return torch.zeros_like(active, dtype=torch.bool)
        return ((self.exact_cost[active] >= 0) & (self.pieces[active] >= MANY_PIECES)
                & (self.moved_features[active] >= MANY_PIECES_FEATURES))

    def few_pieces(self, active: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        """Per active example: whether its path is to be walked because a probe predicted
        at most FEW_PIECES pieces with a kink (on one piece every rule is exact). On a
        piecewise-linear network, a walk of at most that many rows, once the rule says the
        example is ``done`` (a walk of a few rows, where it is not, is cheaper than the
        rule anyway); on a mixed network at once, at any level: its walk costs a few rows
        per piece (CURVED_WALK_ROWS_PER_PIECE and a Gauss pair), and once its rule said
        done at 129 nodes, a walk of 6 pieces added 50 evaluations to its 130."""
        if self.unavailable is not None or self.exact_cost is None or not (self.piecewise_linear or self.mixed):
            return torch.zeros_like(active, dtype=torch.bool)
        probed = self.exact_cost[active] >= 0
        if self.piecewise_linear:
            return done & probed & (self.exact_cost[active] <= FEW_PIECES) & (self.pieces[active] >= 2)
        return probed & (self.pieces[active] >= 2) & (self.pieces[active] <= FEW_PIECES)

    def take(self, active: torch.Tensor, undone: torch.Tensor, predicted: torch.Tensor, level: int,
             rounds: list, always: torch.Tensor) -> torch.Tensor:
        """Integrate exactly the undone active examples for which it is cheaper, and those
        ``always`` marks (paths of a few pieces); returns the mask (over ``active``) of
        those it took."""
        taken = torch.zeros_like(undone)
        candidates = active[undone]
        self.probe(candidates)
        if self.unavailable is not None:
            return taken
        order = torch.ones_like(predicted)
        forced = always[undone]
        early = False  # a mixed network's rule is judged from ASYMPTOTIC_STEPS nodes on
        if self.route.curved:
            # A mixed network's rule converges faster than 1/n once its smooth stretches
            # are resolved (bench_exact's encoder layer: error 2.9 at 9 nodes, 0.69 at
            # 33, within 1e-3 at 2049): its order is read from the last doubling,
            # between 1 and 2, and only from ASYMPTOTIC_STEPS nodes on; before, only the
            # paths of a few pieces switch.
            previous = self.previous_predicted[active]
            self.previous_predicted[active] = predicted
            early = self.levels.steps[level] < ASYMPTOTIC_STEPS
            if early and not bool(forced.any()):
                return taken
            ratio = predicted / previous.clamp_min(torch.finfo(torch.float64).tiny)
            order = torch.where(previous > 0, torch.log2(1 / ratio.clamp_min(1e-300)), order).clamp(1.0, 2.0)
        steps = torch.tensor(self.levels.steps, dtype=torch.float64, device=active.device)
        needed = steps[level] * (predicted[undone] / self.settings.tolerance) ** (1 / order[undone])
        # An example whose estimate is NaN (a NaN or inf input) never reaches tolerance.
        needed = torch.where(torch.isnan(needed), math.inf, needed)
        reachable = needed <= steps[-1]
        finer = torch.searchsorted(steps, needed.clamp(max=float(steps[-1])))
        to_go = torch.where(reachable, steps[finer] - steps[level], torch.full_like(needed, math.inf))
        exact_cost = self.exact_cost[candidates].double()
        left = self.settings.max_steps - self.evaluations[candidates]
        cheaper = forced.clone() if early else (exact_cost < to_go) & (exact_cost <= left) | forced
        if not bool(cheaper.any()):
            return taken
        chosen = candidates[cheaper]
        # In time, the walk also pays its sequential rounds (a curved walk: a few per piece
        # of its longest path): a few examples of a small model may walk for longer than
        # the rule takes to refine them.
        walk_rounds = self.route.walk_rounds(int(self.pieces[chosen].max()))
        walk_rows = float(self.walk_rows[chosen].sum())
        walk_seconds = predicted_walk_seconds(walk_rounds, walk_rows, float(exact_cost[cheaper].sum()) - walk_rows,
                                              self.row_seconds, self.probe_clock, self.route.curved)
        # A call that paid the process's setup (the first probe took COLD_FACTOR times a
        # later one) paid it in round 0 too: its rows' time does not judge the rule until
        # a later round's does (igfast bench's CNN, batch 2, at 1e-4: round 0's rows took
        # 40 times a warm row, and the walk taken then took 22 s where the rule took 8 s).
        cold = self.timed_round == 0 and self.probe_clock.cold()
        if cold or walk_seconds > float(to_go[cheaper & ~forced].sum()) * self.row_seconds:
            if not bool(forced.any()):
                return taken
            cheaper = forced
            chosen = candidates[cheaper]
        # A smooth head's pieces get 3 Gauss nodes first (ample on bench_exact's softmax
        # MLP: estimate 1.2e-5), and only examples whose estimate is above tolerance are
        # integrated again, refined to it: refining all at once cost 721 evaluations per
        # example at 1e-3 against 484. A mixed network's pieces are refined at once.
        tolerance = self.settings.tolerance if self.route.curved else None
        try:
            # (A walk without a head may stop an example short of its last pieces, once
            # the stretches left are estimated within tolerance: exact._GapFill.)
            integral = self.route.integrate(chosen, tolerance,
                                            stop_within=None if self.route.curved else self.settings.tolerance)
        except NotPiecewiseLinearError as error:
            # The walk's gradient rounds need more than the probe's forward (forward-mode AD
            # through a backward: SiLU, GroupNorm), or its layout check refused (a
            # sequence-first layer): the rule goes on, strictly judged (the probe found kinks).
            self.unavailable, self.unreadable = str(error), True
            checked = self.route.refused_check_rows
            if checked is not None:  # (the rows of the check's forwards that ran)
                self.evaluations.index_add_(0, checked, torch.ones_like(checked))
            return taken
        rounds.append(integral)
        if self._hidden_kinks(chosen, integral):
            return taken
        # A walk stopped short whose completeness error is above its filled stretches'
        # estimate (GAP_COMPLETENESS_ALLOWANCE times) proves the estimate wrong: that example
        # is walked again to every piece (a random ReLU residual net whose last stretch hid
        # a jump: 1.9x its tolerance). So is one whose completeness error, counted as the
        # rule's is (PIECEWISE_COMPLETENESS_FACTOR times), is above tolerance: two deep
        # narrow nets of the rule's sweep (paths of 23 and 66 pieces) had stopped 1.29x
        # and 1.11x their tolerance (1e-3) off, within that allowance.
        rewalk = None
        complete = self._completeness(chosen, integral)
        gap = integral.info.gap_error_estimate
        if gap is not None:
            gap = gap.to(complete)
            judged = complete * PIECEWISE_COMPLETENESS_FACTOR > self.settings.tolerance
            contradicted = chosen[(gap > 0) & ((complete > GAP_COMPLETENESS_ALLOWANCE * gap) | judged)]
            if contradicted.numel():
                rewalk = self.route.integrate(contradicted, tolerance)
                rounds.append(rewalk)
                if self._hidden_kinks(contradicted, rewalk):
                    return taken
        self._record(chosen, integral, complete)
        if rewalk is not None:
            self._record(contradicted, rewalk)  # (its evaluations add to the first walk's)
        head = integral.info.head_error_estimate
        if tolerance is None and head is not None:
            coarse = chosen[head.to(self.estimate.device) > self.settings.tolerance]
            if coarse.numel():
                refined = self.route.integrate(coarse, self.settings.tolerance)
                rounds.append(refined)
                self._record(coarse, refined)  # (its evaluations add to the first pass's)
        taken[undone.nonzero()[:, 0][cheaper]] = True
        return taken

    def _hidden_kinks(self, chosen: torch.Tensor, integral) -> bool:
        """Whether the walk missed completeness where it reached every piece (a ReLU hidden
        in a custom Function: the walk was far off): then the switch closes for the call
        and the rule goes on."""
        why = hidden_kinks(integral, tuple(e[chosen] for e in self.route.ends),
                           tuple(s[chosen] if s.shape[0] != 1 else s for s in self.route.starts),
                           self.value_change[chosen], self.scale[chosen])
        if why is not None:
            self.unavailable, self.unreadable = why, True
        return why is not None

    def _completeness(self, chosen: torch.Tensor, integral) -> torch.Tensor:
        return relative_completeness(integral.gradient_sums, tuple(d[chosen] for d in self.differences),
                                     self.value_change[chosen], self.scale[chosen])

    def _record(self, chosen: torch.Tensor, integral, complete: Optional[torch.Tensor] = None) -> None:
        for result, exact_sums in zip(self.results, integral.gradient_sums):
            result[chosen] = exact_sums.to(result.dtype)
        if complete is None:
            complete = self._completeness(chosen, integral)
        # With Gauss nodes on the pieces (a smooth head, or a mixed network's pieces
        # integrated adaptively), their own error estimate joins the completeness error.
        estimate = complete
        for part in (integral.info.head_error_estimate, integral.info.gap_error_estimate):
            if part is not None:
                estimate = torch.maximum(estimate, part.to(complete))
        self.evaluations[chosen] += integral.info.evaluations
        self.completeness[chosen] = complete
        self.estimate[chosen] = estimate
        self.converged[chosen] = estimate <= self.settings.tolerance
        self.walked[chosen] = True


class ProbeClock:
    """The probes' times (rows, seconds), which predict a walk's: a walk round is a probe
    over its rows (a forward with tangents), so one probe's time is a round's latency
    plus its rows' cost. Two probes of different sizes tell the two apart; one cannot.

    The first probe of a call (one example: a network that cannot be walked costs one
    row) also pays the call's setup, up to seconds: it counts only where no other probe
    ran (a batch of one). The next one, over the examples the rule may still refine, is
    split in two when they are at least SPLIT_AT: one more forward's latency (1.5 ms on
    igfast bench's MLP, in calls of 40 to 200 ms) for a reading of the rows' cost."""

    SPLIT_AT = 8
    # The second size is at least this many times the first, so that the rows' cost is
    # read across a span of rows larger than the two probes' noise (on the MLP 0.1 to
    # 0.3 ms a probe, of 16 and 47 rows).
    SPAN = 2
    # The first probe of a warm call took 0.8 to 1.6 times the next one on igfast bench's
    # MLP and CNN; of a process's first call, 85 times (the CNN: 257 ms against 3 ms).
    COLD_FACTOR = 4.0

    def __init__(self) -> None:
        self.times: List[Tuple[int, float]] = []
        self.first: Optional[Tuple[int, float]] = None

    def groups(self, unprobed: torch.Tensor, first: bool) -> Tuple[torch.Tensor, ...]:
        """The probes to run over the examples not probed yet."""
        if first:
            return unprobed[:1], unprobed[1:]
        if not self.times and unprobed.numel() >= self.SPLIT_AT:
            quarter = unprobed.numel() // 4
            return unprobed[:quarter], unprobed[quarter:]
        return (unprobed,)

    def add(self, rows: int, seconds: float, first: bool = False) -> None:
        if first:
            self.first = (rows, seconds)
        else:
            self.times.append((rows, seconds))

    def cold(self) -> bool:
        """Whether the first probe took COLD_FACTOR times any later one: the call paid
        the process's setup (the first call of a process, a new model's first)."""
        return self.first is not None and any(self.first[1] > self.COLD_FACTOR * seconds for _, seconds in self.times)

    def largest(self) -> Tuple[int, float]:
        """(rows, seconds) of the probe over the most rows, the first only where it is
        the only one; (0, 0.0) before any."""
        return max(self.times, default=self.first or (0, 0.0))

    def latency_and_row_cost(self, least_row_seconds: float) -> Optional[Tuple[float, float]]:
        """(seconds of a probe over no rows, seconds per row) from the smallest and the
        largest probe, the cost at least ``least_row_seconds``; None without two probes
        SPAN apart in size. Where the rows cost less than the probes' noise the larger
        probe may take less time (on the MLP, 48 rows in 0.95 to 1.47 ms after 15 in 1.07
        to 1.91: the first probe of the two pays for warming up): the cost is then the
        least."""
        if len(self.times) < 2:
            return None
        (small_rows, small), (large_rows, large) = min(self.times), max(self.times)
        if large_rows < self.SPAN * small_rows:
            return None
        row_cost = max((large - small) / (large_rows - small_rows), least_row_seconds)
        return max(0.0, small - row_cost * small_rows), row_cost


def predicted_walk_seconds(rounds: float, walk_rows: float, plain_rows: float, row_seconds: float,
                           probes: ProbeClock, curved: bool) -> float:
    """The predicted time of walking some examples' pieces (ExactRoute.integrate).

    The walk's rows run with tangents through BreakpointMode: each costs a probe's row
    (a forward with tangents) on top of a rule's row (forward and backward; igfast
    bench's CNN at dd8df99: 1.7 ms against 0.5 ms). The Gauss nodes of a smooth head or
    of a mixed network's pieces are plain rule rows. The walk's rounds wait on each
    other: each pays a probe's latency, twice for method="exact"'s rounds (a forward
    with tangents, then a backward of the same rows; a curved walk's rounds are forwards).

    Where two probes tell a probe's latency from its rows' cost (ProbeClock), each is
    charged where it is paid; a row's tangents cost at least half a rule row (the work
    of a forward, whose backward costs about as much). On igfast bench's MLP at
    tolerance 3e-3 (64 examples, 7400 walk rows in 4 rounds) this predicts 44 to 58 ms
    for walks that took 43 to 56 ms, where the rule took 110 ms. Without them
    (batches under ProbeClock.SPLIT_AT), whatever the split, the tangents take no longer
    than the dearer reading of the largest probe: every round its whole time, or every
    walk row its time per example; on that MLP 0.25 to 0.30 s, which kept the rule."""
    fit = probes.latency_and_row_cost(row_seconds / 2)
    if fit is None:
        probe_rows, probe_seconds = probes.largest()
        tangents = max(rounds * probe_seconds, walk_rows * probe_seconds / max(1, probe_rows))
    else:
        latency, row_cost = fit
        tangents = rounds * latency * (1 if curved else 2) + walk_rows * row_cost
    return tangents + (walk_rows + plain_rows) * row_seconds


def _seconds(device: torch.device) -> float:
    """A wall-clock reading after the device's queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _change_cosine(sums, level: int, differences, active: torch.Tensor) -> torch.Tensor:
    """Per active example: the cosine between the attributions' last two changes,
    A_level - A_{level-1} and A_{level-1} - A_{level-2} (0 where either is 0)."""
    dot = squared_last = squared_before = 0.0
    for s, difference in zip(sums, differences):
        d = difference[active]
        last = ((s[level] - s[level - 1]) * d).flatten(1).double()
        before = ((s[level - 1] - s[level - 2]) * d).flatten(1).double()
        dot = dot + (last * before).sum(1)
        squared_last, squared_before = squared_last + last.square().sum(1), squared_before + before.square().sum(1)
    norms = torch.as_tensor(squared_last).sqrt() * torch.as_tensor(squared_before).sqrt()
    return torch.where(norms > 0, torch.as_tensor(dot) / norms.clamp_min(torch.finfo(norms.dtype).tiny),
                       torch.zeros_like(norms))


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
