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
    # One fused pass: baseline + alpha * difference, broadcast to (k, b, ...).
    return torch.addcmul(
        baselines.to(policy.compute).unsqueeze(0),
        chunk_alphas.view(_steps_view(steps, inputs)),
        difference.unsqueeze(0),
        out=out,
    )


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
