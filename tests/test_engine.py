"""The streaming engine: the schedule covers the grid exactly once for any row
limit, results do not depend on the chunking (chunks smaller than the batch
included), and out-of-memory chunks are retried smaller without losing work."""

import random
import weakref

import pytest
import torch

from igfast.attr._forms import expand_additional_forward_args
from igfast.attr._gradients import gradients_and_outputs
from igfast.attr._target import expand_target
from igfast import engine
from igfast.chunking import ChunkSchedule, RowLimit
from igfast.engine import integrate_gradients
from igfast.quadrature import PathNodes, path_nodes
from models import AdditionalArgsModel


@pytest.mark.parametrize("n_nodes, batch", [(7, 5), (1, 1), (50, 4), (3, 17)])
@pytest.mark.parametrize("seed", range(4))
def test_schedule_covers_grid_once_under_changing_limits(n_nodes, batch, seed):
    rng = random.Random(seed)
    schedule = ChunkSchedule(n_nodes, batch)
    seen = torch.zeros(n_nodes, batch, dtype=torch.int64)
    while not schedule.done:
        limit = rng.choice([1, 2, 3, batch, 2 * batch + 1, n_nodes * batch])
        chunk = schedule.next_chunk(limit)
        assert 1 <= chunk.rows <= limit
        if rng.random() < 0.2:
            continue  # a chunk that failed is proposed again (here with a new limit)
        seen[chunk.step_begin:chunk.step_end, chunk.example_begin:chunk.example_end] += 1
        schedule.complete(chunk)
    assert torch.equal(seen, torch.ones_like(seen))
    assert schedule.remaining_rows == 0


def test_schedule_keeps_captum_whole_steps_when_the_limit_fits_the_batch():
    schedule = ChunkSchedule(10, 4)
    chunks = []
    while not schedule.done:
        chunks.append(schedule.next_chunk(12))
        schedule.complete(chunks[-1])
    assert [(c.step_begin, c.step_end) for c in chunks] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert all(c.covers_batch for c in chunks)


class _Model(AdditionalArgsModel):
    """Counts forward calls and can refuse chunks above a row count, like a GPU that
    runs out of memory."""

    def __init__(self, max_rows=None):
        torch.manual_seed(1)  # the same weights in every instance
        super().__init__()
        self.max_rows = max_rows
        self.calls = []

    def forward(self, x, *args):
        self.calls.append(x.shape[0])
        if self.max_rows is not None and x.shape[0] > self.max_rows:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (simulated, {x.shape[0]} rows)")
        return super().forward(x, *args)


def _integrate(model, x, baseline, target, extra, row_limit, with_endpoints=False):
    nodes = path_nodes("gausslegendre", 20)
    if with_endpoints:  # alpha 0 and 1 evaluated for their F values only (zero weight)
        nodes = PathNodes(torch.cat([nodes.alphas, torch.tensor([0.0, 1.0], dtype=nodes.alphas.dtype)]),
                          nodes.weights, start_node=20, end_node=21)

    def gradients_at(path, chunk, with_outputs):
        grads, outputs = gradients_and_outputs(
            model, path, expand_target(target, chunk), expand_additional_forward_args(extra, chunk)
        )
        return grads, outputs if with_outputs else None

    return integrate_gradients((x,), (baseline,), nodes, gradients_at, row_limit)


def _problem():
    torch.manual_seed(0)
    x = torch.randn(6, 5)
    baseline = torch.randn(1, 5)
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    extra = (torch.linspace(0.5, 1.5, 6).unsqueeze(1), torch.tensor(0.1), "tanh")
    return x, baseline, target, extra


@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 13, 40, 119, 120, 1000])
def test_chunk_invariance(rows):
    x, baseline, target, extra = _problem()
    model = _Model().eval()
    whole = _integrate(model, x, baseline, target, extra, RowLimit(120), True)
    chunked = _integrate(model, x, baseline, target, extra, RowLimit(rows), True)
    assert whole.gradient_sums[0].abs().max() > 0
    torch.testing.assert_close(chunked.gradient_sums[0], whole.gradient_sums[0], rtol=1e-6, atol=1e-7)
    # The endpoint values are F(x') and F(x), whatever chunk they fell in.
    with torch.no_grad():
        f_x = model(x, *extra).gather(1, target[:, None]).squeeze(1)
        f_b = model(baseline.expand_as(x), *extra).gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(chunked.end_values, f_x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked.start_values, f_b, rtol=1e-6, atol=1e-6)
    assert all(c.rows <= rows for c in chunked.chunks)
    assert sum(c.rows for c in chunked.chunks) == 22 * 6


@pytest.mark.parametrize("max_rows", [1, 5, 9, 30, 64])
def test_out_of_memory_halves_the_chunk_and_keeps_the_work(max_rows):
    x, baseline, target, extra = _problem()
    expected = _integrate(_Model().eval(), x, baseline, target, extra, RowLimit(120)).gradient_sums[0]
    model = _Model(max_rows).eval()
    with pytest.warns(RuntimeWarning, match="out of memory on a chunk of 120 path rows"):
        result = _integrate(model, x, baseline, target, extra, RowLimit(120))
    torch.testing.assert_close(result.gradient_sums[0], expected, rtol=1e-6, atol=1e-7)
    assert result.out_of_memory >= 1
    assert result.forward_calls == len(model.calls)
    # Every completed chunk fits, and nothing was computed twice.
    assert all(c.rows <= max_rows for c in result.chunks)
    assert sum(c.rows for c in result.chunks) == 20 * 6


def test_out_of_memory_at_one_row_is_raised():
    x, baseline, target, extra = _problem()
    model = _Model(max_rows=0).eval()
    with pytest.warns(RuntimeWarning), pytest.raises(torch.cuda.OutOfMemoryError):
        _integrate(model, x, baseline, target, extra, RowLimit(4))
    assert model.calls[-1] == 1


def test_cpu_allocation_failure_counts_as_out_of_memory():
    x, baseline, target, extra = _problem()
    model = _Model().eval()
    original = model.forward

    def forward(x, *args):
        if x.shape[0] > 10:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return original(x, *args)

    model.forward = forward
    with pytest.warns(RuntimeWarning):
        result = _integrate(model, x, baseline, target, extra, RowLimit(120))
    assert all(c.rows <= 10 for c in result.chunks)


def test_other_errors_are_not_retried():
    x, baseline, target, extra = _problem()
    model = _Model().eval()

    def broken(x, *args):
        model.calls.append(x.shape[0])
        raise RuntimeError("shape mismatch")

    model.forward = broken
    with pytest.raises(RuntimeError, match="shape mismatch"):
        _integrate(model, x, baseline, target, extra, RowLimit(120))
    assert model.calls == [120]


def test_each_chunk_gets_its_own_path_memory():
    """A model that keeps the inputs it was given (to log the path, in a hook) keeps
    the path points it evaluated: a reused buffer overwrote them with later chunks'."""
    x, baseline, target, extra = _problem()
    kept = []

    class Keeping(_Model):
        def forward(self, x, *args):
            kept.append(x)
            return super().forward(x, *args)

    chunks = _integrate(Keeping().eval(), x, baseline, target, extra, RowLimit(18)).chunks
    assert len(kept) == len(chunks) == 7
    assert len({k.untyped_storage().data_ptr() for k in kept}) == 7
    alphas = path_nodes("gausslegendre", 20).alphas  # as _integrate
    for points, chunk in zip(kept, chunks):  # rows: step-major (steps, examples)
        steps = alphas[chunk.step_begin:chunk.step_end].to(x.dtype).view(-1, 1, 1)
        examples = x[chunk.example_begin:chunk.example_end]
        expected = baseline + steps * (examples - baseline)
        torch.testing.assert_close(points.detach(), expected.reshape(points.shape), rtol=0, atol=1e-6)


def test_path_buffer_that_does_not_fit_is_retried_smaller(monkeypatch):
    """An out-of-memory error while allocating the path rows themselves backs off
    like one inside the model."""
    x, baseline, target, extra = _problem()
    expected = _integrate(_Model().eval(), x, baseline, target, extra, RowLimit(120)).gradient_sums[0]
    original = engine._PathBuffers.reserve

    def reserve(self, rows):
        if rows > 30:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (simulated, {rows} path rows)")
        return original(self, rows)

    monkeypatch.setattr(engine._PathBuffers, "reserve", reserve)
    model = _Model().eval()
    with pytest.warns(RuntimeWarning, match="out of memory on a chunk of 120 path rows"):
        result = _integrate(model, x, baseline, target, extra, RowLimit(120))
    torch.testing.assert_close(result.gradient_sums[0], expected, rtol=1e-6, atol=1e-7)
    assert result.out_of_memory == 2 and all(c.rows <= 30 for c in result.chunks)
    assert len(model.calls) == len(result.chunks)  # the model never saw the failed chunks


def test_retry_after_out_of_memory_does_not_keep_the_large_buffer():
    x, baseline, target, extra = _problem()
    sizes = []

    class Recording(_Model):
        def forward(self, x, *args):
            sizes.append(x.untyped_storage().nbytes())
            return super().forward(x, *args)

    with pytest.warns(RuntimeWarning):
        _integrate(Recording(max_rows=30).eval(), x, baseline, target, extra, RowLimit(120))
    row = 5 * 4  # bytes of one path row
    assert sizes == [120 * row, 60 * row] + [30 * row] * 4  # each retry in a buffer of its own size


def test_the_last_chunks_buffer_is_freed_before_the_next_one(monkeypatch):
    """One path buffer at a time (unless the model kept one): the previous chunk's is
    released before the next is allocated."""
    buffers = engine._PathBuffers((torch.randn(4, 1000),))
    buffers.reserve(10)
    old = weakref.ref(buffers._buffers[0])
    freed_before_allocating = []
    allocate = torch.empty

    def empty(*args, **kwargs):
        freed_before_allocating.append(old() is None)
        return allocate(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    buffers.reserve(30)
    assert freed_before_allocating == [True]
    assert buffers._buffers[0].numel() == 30 * 1000


def test_quadrature_tables_are_copied_to_a_device_once():
    """The engine keeps the device copies of the shared quadrature tables (an H2D copy
    per table per call was host time on the GPU); a table it holds no copy of, or a
    large one (auto's tables are built afresh), is copied. The meta device stands in
    for a GPU."""
    from igfast import engine
    from igfast.quadrature import alphas_and_weights

    meta = torch.device("meta")
    alphas, weights = alphas_and_weights("gausslegendre", 50)
    first = engine._on_device(alphas, meta)
    assert first.device == meta and first.shape == alphas.shape
    assert engine._on_device(alphas, meta) is first
    assert engine._on_device(alphas_and_weights("gausslegendre", 50)[0], meta) is first  # the cached table
    assert engine._on_device(weights, meta) is not first
    assert engine._on_device(alphas, torch.device("cpu")) is alphas
    large = torch.zeros(engine._DEVICE_COPY_MAX_ELEMENTS + 1, dtype=torch.float64)
    assert engine._on_device(large, meta) is not engine._on_device(large, meta)
    for n in range(2, 2 + 2 * engine._DEVICE_COPIES_KEPT):
        engine._on_device(torch.zeros(n), meta)
    assert len(engine._device_copies) <= engine._DEVICE_COPIES_KEPT
