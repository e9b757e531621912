"""The streaming engine: integrates path gradients chunk by chunk.

Every attribution method of igfast reduces to the same loop: for each chunk of
(path nodes x examples), write the interpolated inputs into a new buffer, run
the model forward and backward, and add the weighted gradients into a (batch, ...)
accumulator. Nothing of size n_steps x input outlives a chunk, and the chunking
decides memory, never results (beyond float summation order).

The chunk size comes from a ``RowLimit``. When a chunk runs out of memory the
limit is halved and the chunk is tried again; everything accumulated before it
is kept.
"""

import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import ops
from .chunking import Chunk, ChunkSchedule, RowLimit
from .dtypes import dtype_policy
from .errors import warn_to_caller
from .memory import PeakMeter
from .quadrature import PathNodes

# gradients_at(path, chunk, with_outputs) returns the gradients of the output with
# respect to every path tensor, and, when with_outputs, the output value of every
# row (one per row, detached); else None. With K targets (target_count=K) each
# gradient has a leading K dimension and the values are shaped (K, rows).
GradientsAt = Callable[
    [Tuple[torch.Tensor, ...], Chunk, bool],
    Tuple[Sequence[torch.Tensor], Optional[torch.Tensor]],
]


@dataclass
class PathIntegral:
    """What one pass over the path gives."""

    gradient_sums: Tuple[torch.Tensor, ...]  # sum_k w_k grad F(path_k), per input ((K,) + input shape for K targets)
    start_values: Optional[torch.Tensor]  # F(x') per example ((K, B)), when the nodes have alpha 0
    end_values: Optional[torch.Tensor]  # F(x) per example ((K, B)), when the nodes have alpha 1
    chunks: List[Chunk]  # the chunks that ran, in order (model calls = len + out_of_memory)
    out_of_memory: int  # chunks that ran out of memory and were retried smaller

    @property
    def forward_calls(self) -> int:
        return len(self.chunks) + self.out_of_memory

    def spent(self) -> "PathIntegral":
        """This pass's record without its gradient sums: what a caller that runs many
        passes (method="exact" runs one per group of pieces) keeps once it has summed
        them, so the passes' gradients do not pile up for the whole call."""
        return dataclasses.replace(self, gradient_sums=())


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA/accelerator out-of-memory, or the CPU allocator refusing a block."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


class _PathBuffers:
    """One flat buffer per input and chunk, allocated before the chunk's peak meter
    starts (its bytes are added to the measured peak).

    Each chunk gets new memory, as each of Captum's forward calls gets a new tensor:
    a model or hook that keeps the inputs it was given (to log the path points, say)
    would otherwise see them overwritten by the next chunk. The previous chunk's
    buffer is released first, so unless something kept it, the peak is one buffer;
    its graph is gone by then (the engine drops the chunk's gradients and outputs)."""

    def __init__(self, inputs: Tuple[torch.Tensor, ...]) -> None:
        self._inputs = inputs
        self._buffers: List[Optional[torch.Tensor]] = [None] * len(inputs)

    def reserve(self, rows: int) -> None:
        self.release()
        self._buffers = [torch.empty(rows * x[0].numel() if x.shape[0] else 0, dtype=x.dtype, device=x.device)
                         for x in self._inputs]

    def release(self) -> None:
        """Free the buffers (after an out-of-memory error: the retry needs fewer rows)."""
        self._buffers = [None] * len(self._inputs)

    def bytes_for(self, rows: int) -> int:
        return sum(rows * x[0].numel() * x.element_size() for x in self._inputs if x.shape[0])

    def path(self, chunk: Chunk, baselines: Tuple[torch.Tensor, ...], alphas: Sequence[torch.Tensor]):
        rows = slice(chunk.example_begin, chunk.example_end)
        path = []
        for buffer, x, b, a in zip(self._buffers, self._inputs, baselines, alphas):
            shape = (chunk.rows,) + tuple(x.shape[1:])
            out = buffer[: chunk.rows * x[0].numel()].view(shape)
            ops.interpolate_path_into(
                out, x[rows], b if b.shape[0] == 1 else b[rows], a, chunk.step_begin, chunk.step_end
            )
            # A fresh leaf over the buffer: the graph of the previous chunk is gone.
            path.append(out.detach().requires_grad_())
        return tuple(path)


# Copies of quadrature tables on other devices, by (id of the CPU table, device). The
# fixed rules' tables are cached and shared (quadrature.alphas_and_weights), so a call
# reuses their copies instead of copying them again: on the H200 the host-to-device
# copies were about 14 us of host time each, four per call of one input. An entry keeps
# its CPU table alive, so its id cannot be reused while the entry stands. Only small
# tables are kept (at most 64 x 4096 float64s): n_steps="auto" builds its (levels, n)
# tables afresh each round, and those would only fill the cache.
_device_copies: Dict[Tuple[int, torch.device], Tuple[torch.Tensor, torch.Tensor]] = {}
_DEVICE_COPIES_KEPT = 64
_DEVICE_COPY_MAX_ELEMENTS = 4096


def _on_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``table`` on ``device``, which no caller writes into."""
    if table.device == device:
        return table
    if table.numel() > _DEVICE_COPY_MAX_ELEMENTS:
        return table.to(device)
    key = (id(table), device)
    kept = _device_copies.get(key)
    if kept is not None and kept[0] is table:
        return kept[1]
    copy = table.to(device)
    if len(_device_copies) >= _DEVICE_COPIES_KEPT:
        _device_copies.pop(next(iter(_device_copies)))  # the oldest
    _device_copies[key] = (table, copy)
    return copy


def outside_inference_mode(integrate: Callable) -> Callable:
    """Run ``integrate`` with inference mode off, whatever the caller's. Under
    torch.inference_mode() forward-mode AD carries no tangents, so the exact walk and
    auto's probe saw no piecewise-linear op (auto took a ReLU network for smooth and
    missed its tolerance), and the walk's records, made before an engine pass, were
    inference tensors that the pass (which leaves inference mode for its gradients)
    could not write."""

    @functools.wraps(integrate)
    def run(*args, **kwargs):
        with torch.inference_mode(False):
            return integrate(*args, **kwargs)

    return run


def integrate_gradients(
    inputs: Tuple[torch.Tensor, ...],
    baselines: Tuple[torch.Tensor, ...],
    nodes: PathNodes,
    gradients_at: GradientsAt,
    row_limit: RowLimit,
    target_count: Optional[int] = None,
    gradient_shapes: Optional[Sequence[Tuple[int, ...]]] = None,
) -> PathIntegral:
    """sum_k w_k * grad F(x' + alpha_k (x - x')) for every input, chunk by chunk.

    inputs and baselines are detached; baselines have batch size B or 1. The
    accumulators are shaped like the inputs, in the accumulation dtype of each;
    with ``target_count`` K, one per target: (K,) + input shape. The K targets share
    every forward pass; only the backward passes are per target. A (levels, n)
    weight table in ``nodes`` likewise gives one accumulator per level: every level's
    rule is summed from the same gradients. ``gradient_shapes`` (per input, the shape
    of what gradients_at returns for B rows) lets gradients_at reduce each gradient
    before it is accumulated (LLM attribution contracts it with the input difference
    at once, so the accumulators do not grow with the layer's width); default: the
    inputs' own shapes.
    """
    assert target_count is None or nodes.rule_count is None, "targets and nested rules do not mix"
    leading = next(((count,) for count in (target_count, nodes.rule_count) if count is not None), ())
    batch_size = inputs[0].shape[0]
    device = inputs[0].device
    schedule = ChunkSchedule(nodes.count, batch_size)
    done: List[Chunk] = []
    failed = 0
    values = {}  # node index -> (B,) output values, for the endpoint nodes
    endpoint_nodes = {k for k in (nodes.start_node, nodes.end_node) if k is not None}
    # Gradients are needed even when the caller is under no_grad or inference_mode
    # (the accumulators are written in place, so they must not be inference tensors).
    with torch.inference_mode(False), torch.enable_grad():
        shapes = [tuple(x.shape) for x in inputs] if gradient_shapes is None else gradient_shapes
        accumulators = tuple(
            torch.zeros(leading + tuple(shape), dtype=dtype_policy(x.dtype).accumulate, device=x.device)
            for x, shape in zip(inputs, shapes)
        )
        alphas_on = [_on_device(nodes.alphas, x.device) for x in inputs]
        weights_on = [_on_device(nodes.weights, x.device) for x in inputs]
        buffers = _PathBuffers(inputs)
        while not schedule.done:
            chunk = schedule.next_chunk(row_limit.rows, balanced=row_limit.balanced)
            # The last chunk's peak sizes nothing in this pass, so it is not measured,
            # unless later passes reuse the limit.
            measure = row_limit.measures and (chunk.rows < schedule.remaining_rows or row_limit.reused_by_later_passes)
            try:
                buffers.reserve(chunk.rows)
            except Exception as error:  # the path rows alone may not fit either
                if not is_out_of_memory(error) or not row_limit.shrink(chunk.rows):
                    raise
                failed += 1
                _retry_smaller(chunk.rows, row_limit, buffers, device)
                continue
            meter = PeakMeter(device) if measure else contextlib.nullcontext()
            with meter:
                if measure:
                    # The path, and per target its gradient and (K > 1) their stacked copy.
                    gradient_copies = 1 if target_count is None else 2 * target_count
                    meter.add_estimate((1 + gradient_copies) * buffers.bytes_for(chunk.rows))
                chunk_endpoints = [k for k in endpoint_nodes if chunk.step_begin <= k < chunk.step_end]
                try:
                    grads, outputs = gradients_at(
                        buffers.path(chunk, baselines, alphas_on), chunk, bool(chunk_endpoints)
                    )
                except Exception as error:
                    if not is_out_of_memory(error) or not row_limit.shrink(chunk.rows):
                        raise
                    failed_rows = chunk.rows
                else:
                    failed_rows = 0
                    _accumulate(accumulators, grads, weights_on, chunk, nodes.quadrature_count,
                                per_target=target_count is not None)
                    for k in chunk_endpoints:
                        _record_values(values, k, outputs, chunk)
                    del grads, outputs
            if failed_rows:
                failed += 1
                _retry_smaller(failed_rows, row_limit, buffers, device)
                continue
            schedule.complete(chunk)
            done.append(chunk)
            if measure and meter.measured:
                # The buffer was reserved before the meter started: add its rows.
                row_limit.observe(chunk.rows, meter.peak + (buffers.bytes_for(chunk.rows) if meter.exact else 0),
                                  meter.weight_bytes)
    return PathIntegral(
        accumulators, values.get(nodes.start_node), values.get(nodes.end_node), done, failed
    )


def _retry_smaller(failed_rows: int, row_limit: RowLimit, buffers: _PathBuffers, device: torch.device) -> None:
    """After a chunk ran out of memory (the limit is already lowered): say so, and free
    what the failed chunk held, its larger path buffer too."""
    buffers.release()
    warn_to_caller(
        f"igfast: out of memory on a chunk of {failed_rows} path rows; retrying with "
        f"{row_limit.rows} rows (what was accumulated is kept). Give `memory_budget` "
        "(or a smaller `internal_batch_size`) to size chunks in advance.",
        RuntimeWarning,
    )
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _accumulate(accumulators, grads, weights_on, chunk: Chunk, quadrature_count: int,
                per_target: bool = False) -> None:
    """Add the chunk's weighted gradients; rows of endpoint-only nodes carry no weight.
    Per target: gradient k into accumulator k; per rule (2-D weights): the same
    gradient into accumulator l with weight row l."""
    quadrature_end = min(chunk.step_end, quadrature_count)
    if quadrature_end <= chunk.step_begin:
        return
    rows = slice(chunk.example_begin, chunk.example_end)
    weighted_rows = (quadrature_end - chunk.step_begin) * chunk.examples
    for accumulator, grad, w in zip(accumulators, grads, weights_on):
        if w.dim() == 2:
            for rule_sum, rule_weights in zip(accumulator, w):
                ops.accumulate_steps(
                    rule_sum[rows], grad[:weighted_rows], rule_weights[chunk.step_begin:quadrature_end]
                )
            continue
        if not per_target:
            ops.accumulate_steps(
                accumulator[rows], grad[:weighted_rows], w[chunk.step_begin:quadrature_end]
            )
            continue
        for target_sum, target_grad in zip(accumulator, grad):  # K targets
            ops.accumulate_steps(
                target_sum[rows], target_grad[:weighted_rows], w[chunk.step_begin:quadrature_end]
            )


def _record_values(values: dict, node: int, outputs: torch.Tensor, chunk: Chunk) -> None:
    """Keep the output values of the node's rows: (B,), or (K, B) for K targets."""
    offset = (node - chunk.step_begin) * chunk.examples
    rows = outputs[..., offset:offset + chunk.examples]
    if node not in values:
        values[node] = torch.empty(
            tuple(rows.shape[:-1]) + (chunk.batch_size,), dtype=rows.dtype, device=rows.device
        )
    values[node][..., chunk.example_begin:chunk.example_end] = rows
