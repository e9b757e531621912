"""The streaming engine: results do not depend on the chunking, including chunks
that split the batch; the plan tiles the grid exactly once."""

import pytest
import torch

from igfast.attr._forms import expand_additional_forward_args
from igfast.attr._gradients import compute_gradients
from igfast.attr._target import expand_target
from igfast.engine import integrate_gradients, plan_chunks
from igfast.quadrature import alphas_and_weights
from models import AdditionalArgsModel


@pytest.mark.parametrize("n_steps, batch, steps_per_chunk, examples_per_chunk",
                         [(7, 5, 7, 5), (7, 5, 3, 5), (7, 5, 1, 1), (7, 5, 2, 3), (50, 4, 16, 4)])
def test_plan_tiles_grid_once(n_steps, batch, steps_per_chunk, examples_per_chunk):
    seen = torch.zeros(n_steps, batch, dtype=torch.int64)
    for chunk in plan_chunks(n_steps, batch, steps_per_chunk, examples_per_chunk):
        assert chunk.steps <= steps_per_chunk and chunk.examples <= examples_per_chunk
        seen[chunk.step_begin:chunk.step_end, chunk.example_begin:chunk.example_end] += 1
    assert torch.equal(seen, torch.ones_like(seen))


def _integrate(model, x, baseline, target, extra, steps_per_chunk, examples_per_chunk):
    alphas, weights = alphas_and_weights("gausslegendre", 20)

    def gradients_at(path, chunk):
        return compute_gradients(model, path, expand_target(target, chunk),
                                 expand_additional_forward_args(extra, chunk))

    chunks = plan_chunks(20, x.shape[0], steps_per_chunk, examples_per_chunk)
    return integrate_gradients((x,), (baseline,), alphas, weights, gradients_at, chunks)[0]


@pytest.mark.parametrize("steps_per_chunk, examples_per_chunk",
                         [(20, 3), (20, 1), (7, 2), (1, 6), (3, 4), (1, 1)])
def test_chunk_invariance(steps_per_chunk, examples_per_chunk):
    torch.manual_seed(0)
    model = AdditionalArgsModel().eval()
    x = torch.randn(6, 5)
    baseline = torch.randn(1, 5)
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    extra = (torch.linspace(0.5, 1.5, 6).unsqueeze(1), torch.tensor(0.1), "tanh")
    whole = _integrate(model, x, baseline, target, extra, 20, 6)
    chunked = _integrate(model, x, baseline, target, extra, steps_per_chunk, examples_per_chunk)
    assert whole.abs().max() > 0
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-7)
