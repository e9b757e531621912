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


def test_igfast_classes_pass_captums_type_checks():
    """Captum 0.9 checks types in LLMGradientAttribution (SUPPORTED_METHODS) and in
    NoiseTunnel (is_gradient_method): igfast's classes are instances of Captum's."""
    model = TokenModel().eval()
    ig = igfast.IntegratedGradients(model)
    lig = igfast.LayerIntegratedGradients(model, model.embedding)
    nt = igfast.NoiseTunnel(ig)
    assert isinstance(ig, captum_attr.IntegratedGradients) and isinstance(ig, captum_attr.GradientAttribution)
    assert isinstance(lig, captum_attr.LayerIntegratedGradients)
    assert isinstance(lig, captum_attr.LLMGradientAttribution.SUPPORTED_METHODS)
    assert isinstance(nt, captum_attr.NoiseTunnel)
    assert captum_attr.NoiseTunnel(ig).is_gradient_method
    assert igfast.attr._captum_protocol.why_no_captum() is None
    # igfast's methods come first: Captum's attribute never runs on igfast's objects.
    assert type(ig).attribute is not captum_attr.IntegratedGradients.attribute
    assert type(lig).attribute is not captum_attr.LayerIntegratedGradients.attribute


def test_the_members_every_captum_attribution_has():
    """get_name, LayerAttribution.interpolate and LLMGradientAttribution's class
    attributes and flags read as on Captum's objects (without Captum too: see
    test_igfast_works_without_captum)."""
    from igfast.examples.hf_causal_lm import byte_level_tokenizer, random_causal_lm

    for name in ("IntegratedGradients", "LayerIntegratedGradients", "NoiseTunnel", "LLMGradientAttribution"):
        assert getattr(igfast, name).get_name() == getattr(captum_attr, name).get_name()
    torch.manual_seed(0)
    layer_map = torch.randn(2, 3, 5, 7)
    for size, mode in (((10, 14), "nearest"), ((9, 4), "bilinear"), (8, "area")):
        assert torch.equal(igfast.LayerIntegratedGradients.interpolate(layer_map, size, mode),
                           captum_attr.LayerIntegratedGradients.interpolate(layer_map, size, mode))
    tokenizer = byte_level_tokenizer()
    lm = random_causal_lm("gpt2", tokenizer)
    ours = igfast.LLMGradientAttribution(igfast.LayerIntegratedGradients(lm, lm.get_input_embeddings()), tokenizer)
    theirs = captum_attr.LLMGradientAttribution(captum_attr.LayerIntegratedGradients(lm, lm.get_input_embeddings()),
                                                tokenizer)
    assert (ours.has_convergence_delta(), ours.multiplies_by_inputs) == (
        theirs.has_convergence_delta(), theirs.multiplies_by_inputs)
    # Captum's LLM input takes TextTokenInput only; igfast's takes both of its classes.
    inp = igfast.TextTokenInput("Dave lives in Palm Coast", tokenizer)
    assert isinstance(inp, ours.SUPPORTED_INPUTS) and isinstance(inp, theirs.SUPPORTED_INPUTS)
    assert igfast.TextTemplateInput in ours.SUPPORTED_INPUTS
    assert isinstance(ours.attr_method, ours.SUPPORTED_METHODS)


def test_tcav_with_igfast_layer_ig(tmp_path):
    """Captum's TCAV sets `layer` on the layer method before each call and calls
    attribute.__wrapped__: with igfast's LayerIG its scores equal Captum's."""
    pytest.importorskip("sklearn")
    from captum.concept import TCAV, Concept

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 3)).eval()

    def concept(index, name, shift):
        rows = torch.randn(12, 6, generator=torch.Generator().manual_seed(index)) + shift
        return Concept(index, name, [rows[:6], rows[6:]])  # two batches of examples

    concepts = [[concept(0, "up", 1.0), concept(1, "down", -1.0)]]
    inputs = torch.randn(5, 6, generator=torch.Generator().manual_seed(9))
    scores = {}
    for name, method in (("captum", captum_attr.LayerIntegratedGradients(model, None, multiply_by_inputs=False)),
                         ("igfast", igfast.LayerIntegratedGradients(model, None, multiply_by_inputs=False))):
        tcav = TCAV(model, layers=["1", "3"], layer_attr_method=method, save_path=str(tmp_path))
        scores[name] = tcav.interpret(inputs, experimental_sets=concepts, target=0, n_steps=8)
    first, second = (scores["captum"]["0-1"][layer]["magnitude"] for layer in ("1", "3"))
    assert not torch.allclose(first, second)  # the layers differ, so following `layer` matters
    for key, layers in scores["captum"].items():
        for layer, values in layers.items():
            for score, value in values.items():
                torch.testing.assert_close(scores["igfast"][key][layer][score], value, rtol=1e-5, atol=1e-6)


BLOCKED_CAPTUM = """
import importlib.abc, json, sys
class NoCaptum(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "captum" or name.startswith("captum."):
            raise ImportError("captum is blocked in this test")
sys.meta_path.insert(0, NoCaptum())
import torch, igfast
from igfast.examples.hf_causal_lm import byte_level_tokenizer, random_causal_lm
assert "captum" not in sys.modules
torch.manual_seed(0)
mlp = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
x = torch.randn(4, 6)
ig = igfast.IntegratedGradients(mlp).attribute(x, target=1, n_steps=10)
nt = igfast.NoiseTunnel(igfast.IntegratedGradients(mlp)).attribute(x, target=1, n_steps=10, nt_samples=3, stdevs=0.1)
tokenizer = byte_level_tokenizer()
lm = random_causal_lm("gpt2", tokenizer)
inp = igfast.TextTokenInput("Dave lives in Palm Coast", tokenizer, skip_tokens=["<s>"])
explainer = igfast.LLMGradientAttribution(igfast.LayerIntegratedGradients(lm, lm.get_input_embeddings()), tokenizer)
result = explainer.attribute(inp, target=" is a lawyer", n_steps=8)
template = explainer.attribute(igfast.TextTemplateInput("{} lives in Palm Coast and is a {}", ["He", "sad"],
                                                        mask=[1, 0]), target=" is a lawyer", n_steps=8)
import matplotlib
matplotlib.use("Agg")
figure, _ = result.plot_token_attr()
print(json.dumps({
    "bases": [[k.__module__ for k in c.__mro__] for c in (igfast.IntegratedGradients, igfast.LayerIntegratedGradients,
                                                        igfast.NoiseTunnel, igfast.LLMGradientAttribution)],
    "names": [c.get_name() for c in (igfast.IntegratedGradients, igfast.LayerIntegratedGradients, igfast.NoiseTunnel,
                                     igfast.LLMGradientAttribution)],
    "interpolated": list(igfast.LayerIntegratedGradients.interpolate(torch.ones(1, 2, 3, 3), (6, 6)).shape),
    "why": igfast.attr._captum_protocol.why_no_captum(),
    "classes": [type(result).__module__, igfast.TextTokenInput.__module__],
    "ig": ig.tolist(), "nt_shape": list(nt.shape),
    "input_tokens": result.input_tokens, "output_tokens": result.output_tokens,
    "token_attr": result.token_attr.tolist(), "seq_attr": result.seq_attr.tolist(),
    "template": template.token_attr.tolist(), "captum_loaded": "captum" in sys.modules,
}))
"""


def test_igfast_works_without_captum():
    """In a process where importing captum fails: igfast imports, its classes have no
    Captum base, IG/NoiseTunnel/LLM attribution run (igfast's input and result
    classes) and give what they give with Captum installed."""
    import json
    import os
    import subprocess
    import sys

    completed = subprocess.run([sys.executable, "-c", BLOCKED_CAPTUM], capture_output=True, text=True,
                               env=dict(os.environ), timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    seen = json.loads(completed.stdout.strip().splitlines()[-1])
    # No Captum class in any MRO, yet the members Captum's objects have are there.
    assert not any(module.startswith("captum") for mro in seen["bases"] for module in mro)
    assert seen["names"] == [c.get_name() for c in (captum_attr.IntegratedGradients, captum_attr.LayerIntegratedGradients,
                                                     captum_attr.NoiseTunnel, captum_attr.LLMGradientAttribution)]
    assert seen["interpolated"] == [1, 2, 6, 6]
    assert "blocked" in seen["why"] and not seen["captum_loaded"]
    assert seen["classes"] == ["igfast.attr.llm_result", "igfast.attr.llm_inputs"]
    from igfast.examples.hf_causal_lm import byte_level_tokenizer, random_causal_lm

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x = torch.randn(4, 6)
    torch.testing.assert_close(torch.tensor(seen["ig"]), igfast.IntegratedGradients(mlp).attribute(x, target=1, n_steps=10))
    tokenizer = byte_level_tokenizer()
    lm = random_causal_lm("gpt2", tokenizer)
    inp = captum_attr.TextTokenInput("Dave lives in Palm Coast", tokenizer, skip_tokens=["<s>"])
    layer_ig = captum_attr.LayerIntegratedGradients(lm, lm.get_input_embeddings())
    theirs = captum_attr.LLMGradientAttribution(layer_ig, tokenizer).attribute(inp, target=" is a lawyer", n_steps=8)
    assert seen["input_tokens"] == theirs.input_tokens and seen["output_tokens"] == theirs.output_tokens
    torch.testing.assert_close(torch.tensor(seen["token_attr"]), theirs.token_attr, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.tensor(seen["seq_attr"]), theirs.seq_attr, rtol=1e-5, atol=1e-7)
    with_captum = igfast.LLMGradientAttribution(igfast.LayerIntegratedGradients(lm, lm.get_input_embeddings()),
                                                tokenizer).attribute(
        captum_attr.TextTemplateInput("{} lives in Palm Coast and is a {}", ["He", "sad"], mask=[1, 0]),
        target=" is a lawyer", n_steps=8)
    torch.testing.assert_close(torch.tensor(seen["template"]), with_captum.token_attr, rtol=1e-5, atol=1e-7)
