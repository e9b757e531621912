"""The fused operations of igfast in plain PyTorch.

These functions are the fallback when the compiled extension is missing and the
oracle every kernel is tested against. Each one is vectorised: one tensor expression
over all steps and examples of a chunk, no Python loop.

Shapes (``b`` examples in the chunk, ``k`` steps, ``...`` the feature shape):
    inputs     (b, ...)       the end points x
    baselines  (b or 1, ...)  the start points x', broadcast over the batch when 1
    alphas     (n,)           all path positions of the method
    path       (k * b, ...)   step-major: row ``s * b + i`` is x'_i + alpha_{k0+s} (x_i - x'_i)
    grads      (k * b, ...)   gradients of the chunk, same layout as the path
    weights    (k,)           the quadrature weights of the chunk's steps
    accumulator (b, ...)      running sum of w_k * grad_k, in the accumulation dtype
"""

import math
from typing import Optional

import torch

from .dtypes import dtype_policy


def _steps_view(steps: int, like: torch.Tensor) -> tuple:
    return (steps,) + (1,) * like.dim()


def _path_points(inputs, baselines, alphas, step_begin, step_end, out=None) -> torch.Tensor:
    """baseline + alpha * (input - baseline) in the compute dtype, shaped (k, b, ...);
    written into ``out`` when given (its dtype must be the compute dtype)."""
    policy = dtype_policy(inputs.dtype)
    steps = step_end - step_begin
    difference = (inputs - baselines).to(policy.compute)
    chunk_alphas = alphas[step_begin:step_end].to(policy.compute)
    # Rounded as Captum's baseline + alpha * (input - baseline), two ops: the product to
    # the input dtype, then the sum. A fused addcmul rounds once, and put a point that
    # Captum rounds to exactly 0 (or to a clamp's bound) 1 ulp off it.
    alphas_view = chunk_alphas.view(_steps_view(steps, inputs))
    if policy.compute == inputs.dtype:  # (in ``out`` when given: no second buffer of the chunk's size)
        return torch.mul(alphas_view, difference.unsqueeze(0), out=out).add_(baselines.unsqueeze(0))
    product = (alphas_view * difference.unsqueeze(0)).to(inputs.dtype)
    return torch.add(baselines.to(policy.compute).unsqueeze(0), product.to(policy.compute), out=out)


def interpolate_path(
    inputs: torch.Tensor,
    baselines: torch.Tensor,
    alphas: torch.Tensor,
    step_begin: int,
    step_end: int,
) -> torch.Tensor:
    """The path points of steps [step_begin, step_end) for every example, step-major."""
    path = _path_points(inputs, baselines, alphas, step_begin, step_end)
    steps = step_end - step_begin
    return path.to(inputs.dtype).reshape((steps * inputs.shape[0],) + inputs.shape[1:])


def interpolate_path_into(
    out: torch.Tensor,
    inputs: torch.Tensor,
    baselines: torch.Tensor,
    alphas: torch.Tensor,
    step_begin: int,
    step_end: int,
) -> None:
    """interpolate_path written into ``out``, shaped (k * b, ...)."""
    steps = step_end - step_begin
    expected = (steps * inputs.shape[0],) + tuple(inputs.shape[1:])
    if tuple(out.shape) != expected or out.dtype != inputs.dtype:
        raise ValueError(
            f"`out` must be {inputs.dtype} with shape {expected}; got {out.dtype} {tuple(out.shape)}"
        )
    if dtype_policy(inputs.dtype).compute != inputs.dtype:
        # Half types are computed in float32 and rounded: no buffer of theirs can hold that.
        out.copy_(interpolate_path(inputs, baselines, alphas, step_begin, step_end))
        return
    _path_points(inputs, baselines, alphas, step_begin, step_end, out=out.view((steps,) + tuple(inputs.shape)))


# Steps summed in the accumulation dtype before the float64 sum over the chunk (see
# accumulate_steps); a sum of 16 float32 products loses at most a few units in the
# last place, and 1/16 of the chunk's gradients is all the extra memory it needs.
STEPS_PER_PARTIAL_SUM = 16


def accumulate_steps(
    accumulator: torch.Tensor, grads: torch.Tensor, weights: torch.Tensor
) -> None:
    """accumulator += sum_k weights[k] * grads[k] (in place, in the accumulation dtype).

    The chunk's steps are summed in float64 and added once: a running float32 sum over
    thousands of steps drifted (riemann_left, n_steps=10000: 6.9e-5 relative error,
    against 1.1e-7 for Captum's cascaded sum). Converting the gradients to float64
    would double their memory, so groups of STEPS_PER_PARTIAL_SUM steps are summed in
    the accumulation dtype (one batched matrix product) and only those partial sums
    in float64."""
    steps = weights.shape[0]
    grads_by_step = grads.reshape(steps, -1).to(accumulator.dtype)
    weights = weights.to(accumulator.dtype)
    grouped = steps - steps % STEPS_PER_PARTIAL_SUM
    total = torch.zeros(grads_by_step.shape[1], dtype=torch.float64, device=accumulator.device)
    if grouped:
        groups = grouped // STEPS_PER_PARTIAL_SUM
        partial = torch.bmm(
            weights[:grouped].reshape(groups, 1, STEPS_PER_PARTIAL_SUM),
            grads_by_step[:grouped].reshape(groups, STEPS_PER_PARTIAL_SUM, -1),
        )
        total += partial.sum((0, 1), dtype=torch.float64)
    if grouped < steps:
        total += grads_by_step[grouped:].t() @ weights[grouped:]
    accumulator.view(-1).copy_(total.add_(accumulator.view(-1)))


def scale_by_difference(
    accumulator: torch.Tensor, inputs: torch.Tensor, baselines: torch.Tensor
) -> torch.Tensor:
    """The attributions when multiplying by inputs: accumulator * (x - x')."""
    # (x - x') in the input dtype first, as Captum forms it.
    return accumulator * (inputs - baselines)


# -- the walk of method="exact" (piecewise.BreakpointMode) ---------------------------------
# Shapes: ``rows`` path rows, each with ``units`` units of one piecewise-linear op
# (the op's tensor reshaped to (rows, units)); steps are along the path from each row's
# point, in units of its whole length, float64.


def window_kinks(steps: torch.Tensor, margin: float, low: torch.Tensor, high: torch.Tensor):
    """The kinks of one op that lie inside each row's window (low, high), from its
    units' signed steps to their kinks ((rows, units); inf, -inf or nan where a unit
    has none): steps within ``margin`` of the window's ends are the kinks that bound
    it, and a unit within ``margin`` of its kink is on it at the point, not ahead.

    Returns the found kinks' rows and steps (row-major, as nonzero orders them), and
    per row the nearest found kink ahead (inf where none) and behind (-inf), and
    whether some unit is on its kink at the point (``near``). A nan step (0 / 0: a unit
    on its kink that stays there, such as a ReLU's dead output going into another ReLU)
    is on no side: never a kink, nor near one (counted near, every piece behind a point
    was halved down to the margin: 353 pieces for 10 on a ReLU after a ReLU)."""
    distance = steps.abs()
    clear = distance > margin
    inside = clear & (steps > (low + margin).view(-1, 1)) & (steps < (high - margin).view(-1, 1))
    found = inside.nonzero()
    rows, found_steps = found[:, 0], steps[found[:, 0], found[:, 1]]
    ahead = torch.full_like(low, math.inf).scatter_reduce(
        0, rows, torch.where(found_steps > 0, found_steps, math.inf), "amin")
    behind = torch.full_like(low, -math.inf).scatter_reduce(
        0, rows, torch.where(found_steps < 0, found_steps, -math.inf), "amax")
    return rows, found_steps, ahead, behind, (distance <= margin).any(1)


def scalar_kinks(primal: torch.Tensor, tangent: torch.Tensor, kink: float, margin: float, rows: int,
                 low: Optional[torch.Tensor] = None, high: Optional[torch.Tensor] = None,
                 below: float = -1.0, at: float = 0.0, above: float = 1.0):
    """One op whose units each have one kink at the value ``kink`` (ReLU, LeakyReLU,
    PReLU, abs), read at the rows' points: primal z and tangent dz (the op's input and
    its derivative along the path, any float dtype, rows along dim 0).

    Returns the op's factor per unit, ``below``, ``at`` or ``above`` as z + margin dz
    (the side of its kink the unit is on just after the point) is below, at or above
    ``kink``, in z's dtype (the defaults give the side's sign); the tangent times it;
    and, with a window (low, high), window_kinks of the units' steps (kink - z) / dz
    (without one, empty tensors). In float64: a unit's side and its step to the kink
    must agree to the last bit."""
    z, dz = primal.detach().double(), tangent.detach().double()
    side = torch.add(z, dz, alpha=margin)
    # (Formed in float64, as the walk's factor was, then rounded once to z's dtype.)
    factor = torch.where(side > kink, above, torch.where(side < kink, below, torch.full_like(z, at))).to(primal.dtype)
    scaled_tangent = tangent.detach() * factor
    if low is None or high is None:
        empty = z.new_empty(0)
        return factor, scaled_tangent, empty.long(), empty, empty, empty, empty.bool()
    steps = (z.neg() if kink == 0 else torch.rsub(z, kink)).div_(dz).reshape(rows, -1)
    return (factor, scaled_tangent, *window_kinks(steps, margin, low, high))


def overtakings(values: torch.Tensor, rates: torch.Tensor, winner_values: torch.Tensor, winner_rates: torch.Tensor,
                margin: float, dim: int = 0):
    """The steps at which an element of a window (along ``dim`` of values, float64, with
    its derivative along the path, ``rates``) overtakes the window's winner (winner_values
    and winner_rates, broadcast along ``dim``): elements at -inf (a max-pool's padding,
    rate 0) give infinite or nan steps, and so does the winner itself, never a kink.

    Returns each element's step ahead to its overtaking (inf where none), and per window
    (``dim`` reduced, last) three signed steps: the nearest overtaking ahead, the nearest
    behind, and 0 where an element is level with the winner at the point (else inf).
    Those are the envelope's kinks that are exact (later crossings with the winner are
    no kinks: the envelope has moved on), and a tie at the point (the winner taken is
    the one rising)."""
    rate = rates - winner_rates  # > 0: gaining on the winner
    crossings = (winner_values - values).div_(rate)
    ahead = torch.where((rate > 0) & (crossings > margin), crossings, math.inf)
    before = torch.where((rate < 0) & (crossings < -margin), crossings, -math.inf).amax(dim)
    tied = torch.nan_to_num(crossings.abs_(), nan=math.inf).amin(dim) <= margin
    signed = torch.stack([ahead.amin(dim), torch.where(torch.isfinite(before), before, math.inf),
                          torch.where(tied, 0.0, math.inf).to(before.dtype)], -1)
    return ahead, signed


def cut_at_kinks(low: torch.Tensor, high: torch.Tensor, middle: torch.Tensor, piece_start: torch.Tensor,
                 piece_end: torch.Tensor, kink_rows: torch.Tensor, kink_steps: torch.Tensor, margin: float):
    """The parts of the walk's segments [low, high] (float64, one per row; evaluated at
    ``middle``) cut at the ends of the piece around the middle (piece_start, piece_end)
    and at the kinks ``middle[kink_rows] + kink_steps``: (segment, part_low, part_high,
    holds_point), ordered by segment, then along the path. Cuts within ``margin`` of the
    cut before them (in that order) are one: no sliver of a piece between units that
    cross a rounding apart."""
    count = low.numel()
    segment = torch.arange(count, device=low.device)
    owner = torch.cat([segment, segment, segment, segment, kink_rows])
    t = torch.cat([low, high, piece_start, piece_end, middle[kink_rows] + kink_steps])
    order = torch.argsort(t, stable=True)
    order = order[torch.argsort(owner[order], stable=True)]
    owner, t = owner[order], t[order]
    distinct = torch.ones_like(owner, dtype=torch.bool)
    distinct[1:] = (owner[1:] != owner[:-1]) | (t[1:] - t[:-1] > margin)
    owner, t = owner[distinct], t[distinct]
    within = owner[1:] == owner[:-1]
    part_segment, part_low, part_high = owner[:-1][within], t[:-1][within], t[1:][within]
    holds = (part_low <= middle[part_segment]) & (middle[part_segment] < part_high)
    return part_segment, part_low, part_high, holds
