"""Captum's wrappers accept igfast's IntegratedGradients and give Captum's results:
NoiseTunnel (which calls attribute.__wrapped__) and LayerIntegratedGradients (which
also replaces gradient_func)."""

import numpy as np
import pytest
import torch

import igfast
from models import MLP, MultiInputModel

captum_attr = pytest.importorskip("captum.attr")


def _noise_tunnel(ig_class, model, inputs, seed, **kwargs):
    # Captum draws noise with torch and baselines from a distribution with numpy.
    torch.manual_seed(seed)
    np.random.seed(seed)
    return captum_attr.NoiseTunnel(ig_class(model)).attribute(inputs, **kwargs)


def _close(a, b, tolerance=1e-5):
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        assert (x - y).abs().max().item() <= tolerance


@pytest.mark.parametrize("nt_type", ["smoothgrad", "smoothgrad_sq", "vargrad"])
@pytest.mark.parametrize("nt_samples_batch_size", [None, 2])
@pytest.mark.parametrize("with_delta", [False, True])
def test_noise_tunnel_matches_captum(nt_type, nt_samples_batch_size, with_delta):
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(4, 6)
    kwargs = dict(nt_type=nt_type, nt_samples=5, nt_samples_batch_size=nt_samples_batch_size,
                  stdevs=0.3, target=torch.tensor([0, 1, 2, 3]), n_steps=8,
                  return_convergence_delta=with_delta)
    ours = _noise_tunnel(igfast.IntegratedGradients, model, x, 7, **kwargs)
    theirs = _noise_tunnel(captum_attr.IntegratedGradients, model, x, 7, **kwargs)
    if with_delta:
        _close(ours[0], theirs[0])
        _close(ours[1], theirs[1])
    else:
        _close(ours, theirs)


def test_noise_tunnel_multi_input_with_baseline_distribution():
    torch.manual_seed(0)
    model = MultiInputModel().eval()
    inputs = (torch.randn(3, 4), torch.randn(3, 3, 2))
    distribution = (torch.randn(6, 4), torch.randn(6, 3, 2))
    kwargs = dict(nt_type="smoothgrad", nt_samples=4, stdevs=(0.2, 0.1), target=1,
                  baselines=distribution, draw_baseline_from_distrib=True, n_steps=6)
    ours = _noise_tunnel(igfast.IntegratedGradients, model, inputs, 3, **kwargs)
    theirs = _noise_tunnel(captum_attr.IntegratedGradients, model, inputs, 3, **kwargs)
    _close(ours, theirs)


class TokenModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = torch.nn.Embedding(20, 8)
        self.lin = torch.nn.Linear(8, 3)

    def forward(self, tokens, scale=1.0):
        return self.lin(torch.tanh(self.embedding(tokens)).mean(1)) * scale


@pytest.mark.parametrize("internal_batch_size", [None, 6])
@pytest.mark.parametrize("multiply_by_inputs", [True, False])
def test_captum_layer_ig_runs_on_igfast_ig(internal_batch_size, multiply_by_inputs):
    model = TokenModel().eval()
    tokens = torch.randint(1, 20, (3, 5), generator=torch.Generator().manual_seed(1))
    baseline_tokens = torch.zeros_like(tokens)
    kwargs = dict(baselines=baseline_tokens, target=2, n_steps=9,
                  additional_forward_args=(2.0,), internal_batch_size=internal_batch_size,
                  return_convergence_delta=True)
    theirs_lig = captum_attr.LayerIntegratedGradients(model, model.embedding,
                                                      multiply_by_inputs=multiply_by_inputs)
    ours_lig = captum_attr.LayerIntegratedGradients(model, model.embedding,
                                                    multiply_by_inputs=multiply_by_inputs)
    ours_lig.ig = igfast.IntegratedGradients(model, multiply_by_inputs)
    ours, ours_delta = ours_lig.attribute(tokens, **kwargs)
    theirs, theirs_delta = theirs_lig.attribute(tokens, **kwargs)
    _close(ours, theirs)
    _close(ours_delta, theirs_delta)


def test_attribute_exposes_wrapped_for_captum():
    ig = igfast.IntegratedGradients(MLP())
    x = torch.randn(2, 6)
    direct = ig.attribute(x, target=0, n_steps=5)
    unwrapped = ig.attribute.__wrapped__(ig, x, target=0, n_steps=5)
    assert torch.equal(direct, unwrapped)
    assert ig.has_convergence_delta() and ig.multiplies_by_inputs
    assert not igfast.IntegratedGradients(MLP(), multiply_by_inputs=False).multiplies_by_inputs
