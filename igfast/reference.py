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


def accumulate_steps(
    accumulator: torch.Tensor, grads: torch.Tensor, weights: torch.Tensor
) -> None:
    """accumulator += sum_k weights[k] * grads[k] (in place), as one reduction."""
    steps = weights.shape[0]
    grads_by_step = grads.reshape(steps, -1).to(accumulator.dtype)
    # A matrix-vector product sums over steps without a (k, b, ...) temporary.
    accumulator.view(-1).addmv_(grads_by_step.t(), weights.to(accumulator.dtype))


def scale_by_difference(
    accumulator: torch.Tensor, inputs: torch.Tensor, baselines: torch.Tensor
) -> torch.Tensor:
    """The attributions when multiplying by inputs: accumulator * (x - x')."""
    # (x - x') in the input dtype first, as Captum forms it.
    return accumulator * (inputs - baselines)
