"""The streaming engine: integrates path gradients chunk by chunk.

Every attribution method of igfast reduces to the same loop: for each chunk of
(path steps x examples), build the interpolated inputs, run the model forward and
backward, and add the weighted gradients into a (batch, ...) accumulator. Nothing of
size n_steps x input outlives a chunk. The chunking decides memory, never results
(beyond float summation order).
"""

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from . import ops
from .dtypes import dtype_policy


@dataclass(frozen=True)
class Chunk:
    """Steps [step_begin, step_end) of examples [example_begin, example_end)."""

    step_begin: int
    step_end: int
    example_begin: int
    example_end: int
    batch_size: int

    @property
    def steps(self) -> int:
        return self.step_end - self.step_begin

    @property
    def examples(self) -> int:
        return self.example_end - self.example_begin

    @property
    def rows(self) -> int:
        return self.steps * self.examples

    @property
    def covers_batch(self) -> bool:
        return self.examples == self.batch_size


def plan_chunks(
    n_steps: int,
    batch_size: int,
    steps_per_chunk: int,
    examples_per_chunk: Optional[int] = None,
) -> List[Chunk]:
    """Tile the (steps x examples) grid; examples outermost so each accumulator slice
    is finished before the next begins."""
    if batch_size == 0:
        return []
    examples_per_chunk = examples_per_chunk or batch_size
    assert steps_per_chunk >= 1 and examples_per_chunk >= 1
    return [
        Chunk(k0, min(k0 + steps_per_chunk, n_steps), i0,
              min(i0 + examples_per_chunk, batch_size), batch_size)
        for i0 in range(0, batch_size, examples_per_chunk)
        for k0 in range(0, n_steps, steps_per_chunk)
    ]


# gradients_at(path, chunk) returns d(output)/d(path) for every path tensor.
GradientsAt = Callable[[Tuple[torch.Tensor, ...], Chunk], Sequence[torch.Tensor]]


def integrate_gradients(
    inputs: Tuple[torch.Tensor, ...],
    baselines: Tuple[torch.Tensor, ...],
    alphas: torch.Tensor,
    weights: torch.Tensor,
    gradients_at: GradientsAt,
    chunks: Sequence[Chunk],
) -> Tuple[torch.Tensor, ...]:
    """sum_k w_k * grad F(x' + alpha_k (x - x')) for every input, chunk by chunk.

    inputs and baselines are detached; baselines have batch size B or 1. Returns one
    accumulator per input, shaped like it, in the accumulation dtype of its dtype.
    """
    # Gradients are needed even when the caller is under no_grad or inference_mode
    # (the accumulators are written in place, so they must not be inference tensors).
    with torch.inference_mode(False), torch.enable_grad():
        accumulators = tuple(
            torch.zeros(x.shape, dtype=dtype_policy(x.dtype).accumulate, device=x.device)
            for x in inputs
        )
        alphas_on = [alphas.to(x.device) for x in inputs]
        weights_on = [weights.to(x.device) for x in inputs]
        for chunk in chunks:
            rows = slice(chunk.example_begin, chunk.example_end)
            path = tuple(
                ops.interpolate_path(
                    x[rows], b if b.shape[0] == 1 else b[rows], a,
                    chunk.step_begin, chunk.step_end,
                ).requires_grad_()
                for x, b, a in zip(inputs, baselines, alphas_on)
            )
            grads = gradients_at(path, chunk)
            for accumulator, grad, w in zip(accumulators, grads, weights_on):
                ops.accumulate_steps(
                    accumulator[rows], grad, w[chunk.step_begin:chunk.step_end]
                )
            del path, grads
    return accumulators
