"""The fused ops of igfast: the compiled kernels (torch.ops.igfast.*) where the
extension provides them for a tensor's device, the pure-PyTorch reference elsewhere.

Each op has a fake (meta) implementation so ``torch.compile(fullgraph=True)`` can
trace it, and the two pure functions have autograd formulas. ``accumulate_steps``
and ``interpolate_path_into`` write in place and are not differentiable (the first
ends the pipeline, the second fills a buffer that becomes a leaf of the graph).

``scalar_kinks`` and ``overtakings`` serve the walk of method="exact"
(piecewise.BreakpointMode) at ReLU-like ops and max-pools, ``cut_at_kinks`` its cut of
segments into parts (exact._cut_at_kinks); they have CPU kernels only, and the
data-dependent outputs (the kinks found, the parts) fakes with a dynamic size.

``kernels_available(device)`` and ``why_not_kernels(device)`` say which path runs;
``kernels_disabled()`` forces the reference path (tests, benchmarks).
"""

import contextlib
from functools import lru_cache
from typing import Iterator, Optional

import torch

from . import _ext, reference
from .dtypes import dtype_policy

OP_NAMES = ("interpolate_path", "interpolate_path_into", "accumulate_steps", "scale_by_difference")
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_enabled = True


@lru_cache(maxsize=None)
def _registered_op(op: str, device_type: str) -> bool:
    key = _DISPATCH_KEYS.get(device_type)
    return (_ext.extension_loaded() and key is not None
            and torch._C._dispatch_has_kernel_for_dispatch_key(f"igfast::{op}", key))


def _registered(device_type: str) -> bool:
    return all(_registered_op(op, device_type) for op in OP_NAMES)


def kernels_available(device) -> bool:
    """Whether the compiled kernels run for tensors on ``device``."""
    return _enabled and _registered(device.type if isinstance(device, torch.device) else torch.device(device).type)


def why_not_kernels(device) -> Optional[str]:
    """None when the kernels run on ``device``, else the reason."""
    device_type = torch.device(device).type
    if not _ext.extension_loaded():
        return _ext.why_not_loaded()
    if not _enabled:
        return "kernels disabled by igfast.ops.kernels_disabled()"
    if not _registered(device_type):
        return f"igfast._C was built without {device_type} kernels"
    return None


@contextlib.contextmanager
def kernels_disabled() -> Iterator[None]:
    """Run the pure-PyTorch path inside this block, even when kernels are built."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


def _without_kernels(device) -> None:
    """The reference path runs: say so once, unless kernels_disabled() asked for it."""
    if _enabled:
        _ext.warn_once_without_kernels(why_not_kernels(device))


def interpolate_path(inputs, baselines, alphas, step_begin: int, step_end: int) -> torch.Tensor:
    """Path points of steps [step_begin, step_end), (k * B, ...) step-major."""
    if kernels_available(inputs.device):
        return torch.ops.igfast.interpolate_path(inputs, baselines, alphas, step_begin, step_end)
    _without_kernels(inputs.device)
    return reference.interpolate_path(inputs, baselines, alphas, step_begin, step_end)


def interpolate_path_into(out, inputs, baselines, alphas, step_begin: int, step_end: int) -> None:
    """interpolate_path written into ``out`` (a reused buffer), not allocated."""
    if kernels_available(inputs.device):
        torch.ops.igfast.interpolate_path_into(out, inputs, baselines, alphas, step_begin, step_end)
    else:
        _without_kernels(inputs.device)
        reference.interpolate_path_into(out, inputs, baselines, alphas, step_begin, step_end)


def accumulate_steps(accumulator, grads, weights) -> None:
    """accumulator += sum_k weights[k] * grads[k], in place."""
    if kernels_available(accumulator.device):
        torch.ops.igfast.accumulate_steps(accumulator, grads, weights)
    else:
        _without_kernels(accumulator.device)
        reference.accumulate_steps(accumulator, grads, weights)


def scale_by_difference(accumulator, inputs, baselines) -> torch.Tensor:
    """accumulator * (inputs - baselines)."""
    if kernels_available(inputs.device):
        return torch.ops.igfast.scale_by_difference(accumulator, inputs, baselines)
    _without_kernels(inputs.device)
    return reference.scale_by_difference(accumulator, inputs, baselines)


# The exact walk's ops (piecewise.BreakpointMode): CPU kernels only.
WALK_OP_NAMES = ("scalar_kinks", "overtakings", "cut_at_kinks")


def walk_kernels_available(device) -> bool:
    """Whether the exact walk's kernels run for tensors on ``device`` (else their
    reference, the walk's PyTorch code)."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return _enabled and all(_registered_op(op, device_type) for op in WALK_OP_NAMES)


def scalar_kinks(primal, tangent, kink: float, margin: float, rows: int, window=None,
                 factors=(-1.0, 0.0, 1.0)):
    """The walk of method="exact" at an op whose units each have one kink at ``kink``
    (reference.scalar_kinks): each unit's factor (``factors`` = (below, at, above) its
    kink just after the point; by default the side's sign) in primal's dtype, the
    tangent times it, and with ``window`` = (low, high) the tuple (kink rows, kink
    steps, nearest ahead, nearest behind, near) of reference.window_kinks, else None.
    The kernel is CPU only: elsewhere the reference runs (the walk's own code before it)."""
    low, high = window if window is not None else (None, None)
    if walk_kernels_available(primal.device):
        factor, scaled_tangent, *found = torch.ops.igfast.scalar_kinks(primal, tangent, kink, margin, rows, low, high,
                                                                       *factors)
    else:
        factor, scaled_tangent, *found = reference.scalar_kinks(primal, tangent, kink, margin, rows, low, high,
                                                                *factors)
    return factor, scaled_tangent, (tuple(found) if window is not None else None)


def overtakings(values, rates, winner_values, winner_rates, margin: float):
    """Per window of a max-pool in the walk of method="exact" (values and rates float64,
    (elements, ...) with the windows' elements first; the winners' (...)): the signed
    steps of reference.overtakings, (..., 3). The kernel is CPU only."""
    if walk_kernels_available(values.device):
        return torch.ops.igfast.overtakings(values, rates, winner_values, winner_rates, margin)
    return reference.overtakings(values, rates, winner_values, winner_rates, margin)[1]


def cut_at_kinks(low, high, middle, piece_start, piece_end, kink_rows, kink_steps, margin: float):
    """The parts of the exact walk's segments cut at their kinks (reference.cut_at_kinks):
    (segment, part_low, part_high, holds_point). The kernel is CPU only."""
    if walk_kernels_available(low.device):
        return torch.ops.igfast.cut_at_kinks(low, high, middle, piece_start, piece_end, kink_rows, kink_steps, margin)
    return reference.cut_at_kinks(low, high, middle, piece_start, piece_end, kink_rows, kink_steps, margin)


def _sum_to_baseline(grad: torch.Tensor, baselines: torch.Tensor) -> torch.Tensor:
    """Reduce a (B, ...) gradient to the baseline's (B or 1, ...) shape and dtype."""
    if baselines.shape[0] == 1 and grad.shape[0] != 1:
        grad = grad.sum(0, keepdim=True)
    return grad.to(baselines.dtype)


def _register_fake_and_autograd() -> None:
    @torch.library.register_fake("igfast::interpolate_path")
    def _(inputs, baselines, alphas, step_begin, step_end):
        steps = step_end - step_begin
        return inputs.new_empty((steps * inputs.shape[0],) + tuple(inputs.shape[1:]))

    @torch.library.register_fake("igfast::interpolate_path_into")
    def _(out, inputs, baselines, alphas, step_begin, step_end):
        return None

    @torch.library.register_fake("igfast::accumulate_steps")
    def _(accumulator, grads, weights):
        return None

    @torch.library.register_fake("igfast::scale_by_difference")
    def _(accumulator, inputs, baselines):
        return torch.empty_like(accumulator)

    @torch.library.register_fake("igfast::overtakings")
    def _(values, rates, winner_values, winner_rates, margin):
        return values.new_empty((*winner_values.shape, 3))

    @torch.library.register_fake("igfast::cut_at_kinks")
    def _(low, high, middle, piece_start, piece_end, kink_rows, kink_steps, margin):
        parts = torch.library.get_ctx().new_dynamic_size()
        return (kink_rows.new_empty(parts), low.new_empty(parts), low.new_empty(parts),
                low.new_empty(parts, dtype=torch.bool))

    @torch.library.register_fake("igfast::scalar_kinks")
    def _(primal, tangent, kink, margin, rows, low, high, below, at, above):
        per_row = rows if low is not None else 0
        found = torch.library.get_ctx().new_dynamic_size() if low is not None else 0
        return (torch.empty_like(primal), torch.empty_like(primal), primal.new_empty(found, dtype=torch.long),
                primal.new_empty(found, dtype=torch.float64), primal.new_empty(per_row, dtype=torch.float64),
                primal.new_empty(per_row, dtype=torch.float64), primal.new_empty(per_row, dtype=torch.bool))

    # d path / d x = alpha_k and d path / d x' = 1 - alpha_k: both gradients are
    # weighted sums over steps, which is exactly what accumulate_steps computes.
    def interpolate_setup(ctx, inputs, output):
        x, baselines, alphas, step_begin, step_end = inputs
        ctx.save_for_backward(x, baselines, alphas)
        ctx.steps = (step_begin, step_end)

    def interpolate_backward(ctx, grad_path):
        x, baselines, alphas = ctx.saved_tensors
        step_begin, step_end = ctx.steps
        accumulate = dtype_policy(x.dtype).accumulate
        chunk_alphas = alphas[step_begin:step_end].to(accumulate)
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            total = torch.zeros(x.shape, dtype=accumulate, device=x.device)
            torch.ops.igfast.accumulate_steps(total, grad_path, chunk_alphas)
            grad_x = total.to(x.dtype)
        if ctx.needs_input_grad[1]:
            total = torch.zeros(x.shape, dtype=accumulate, device=x.device)
            torch.ops.igfast.accumulate_steps(total, grad_path, 1 - chunk_alphas)
            grad_b = _sum_to_baseline(total, baselines)
        return grad_x, grad_b, None, None, None

    torch.library.register_autograd(
        "igfast::interpolate_path", interpolate_backward, setup_context=interpolate_setup
    )

    def scale_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def scale_backward(ctx, grad):
        accumulator, x, baselines = ctx.saved_tensors
        grad_accumulator = grad * (x - baselines) if ctx.needs_input_grad[0] else None
        grad_x = (grad * accumulator).to(x.dtype) if ctx.needs_input_grad[1] else None
        grad_b = _sum_to_baseline(-grad * accumulator, baselines) if ctx.needs_input_grad[2] else None
        return grad_accumulator, grad_x, grad_b

    torch.library.register_autograd(
        "igfast::scale_by_difference", scale_backward, setup_context=scale_setup
    )


if _ext.extension_loaded() and hasattr(torch.ops.igfast, "interpolate_path"):
    _register_fake_and_autograd()
