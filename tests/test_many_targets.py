"""Many targets in one pass: every slice equals the single-target igfast result and
Captum's, for IG and LayerIG, in every target form; the K targets share each
forward call; memory stays within a budget; the generated-token form equals
per-token IG over growing prefixes; bad input."""


import pytest
import torch

import igfast
from igfast.attr.generated_tokens import GeneratedTokenLogProbs, attribute_generated_tokens
from igfast.examples.tiny_causal_lm import TinyCausalLM
from igfast.bench.peak import peak_of
from models import MLP, ThreeDimOutputModel, counted, on
from test_layer_integrated_gradients import TokenClassifier, token_batch

captum_attr = pytest.importorskip("captum.attr")


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid"])
@pytest.mark.parametrize("internal_batch_size", [None, 8])
def test_integrated_gradients_slices_equal_single_targets(method, internal_batch_size, device):
    torch.manual_seed(0)
    model = MLP(num_out=5).eval().to(device)
    x = torch.randn(4, 6).to(device)
    targets = [0, 3, [1, 2, 3, 4], torch.tensor([4, 0, 0, 2], device=device)]
    kwargs = dict(n_steps=7, method=method, internal_batch_size=internal_batch_size,
                  return_convergence_delta=True)
    many, deltas = igfast.IntegratedGradients(model).attribute(x, targets=targets, **kwargs)
    assert many.shape == (4, 4, 6) and deltas.shape == (4, 4)
    for k, target in enumerate(targets):
        single, delta = igfast.IntegratedGradients(model).attribute(x, target=target, **kwargs)
        theirs, theirs_delta = captum_attr.IntegratedGradients(model).attribute(
            x, target=target, **kwargs)
        torch.testing.assert_close(many[k], single, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(many[k], theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(deltas[k], delta, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(deltas[k], theirs_delta, rtol=1e-4, atol=1e-5)


def test_all_and_topk_and_tuple_inputs(device):
    torch.manual_seed(1)
    model = MLP(num_out=4).double().eval().to(device)
    x = torch.randn(3, 6, dtype=torch.float64).to(device)
    every = igfast.IntegratedGradients(model).attribute(x, target="all", n_steps=6)
    assert every.shape == (4, 3, 6)
    for k in range(4):
        torch.testing.assert_close(every[k], captum_attr.IntegratedGradients(model).attribute(
            x, target=k, n_steps=6), rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        order = model(x).topk(2, dim=1).indices
    top = igfast.IntegratedGradients(model).attribute(x, target="topk:2", n_steps=6)
    for j in range(2):
        torch.testing.assert_close(top[j], captum_attr.IntegratedGradients(model).attribute(
            x, target=order[:, j], n_steps=6), rtol=1e-10, atol=1e-12)
    # Tuple targets of a higher-rank output, and a tuple of inputs.
    three = ThreeDimOutputModel().double().eval().to(device)
    x3 = torch.randn(2, 5, dtype=torch.float64).to(device)
    many = igfast.IntegratedGradients(three).attribute((x3,), targets=[(0, 1), (2, 3)], n_steps=5)
    assert isinstance(many, tuple) and many[0].shape == (2, 2, 5)
    torch.testing.assert_close(many[0][1], captum_attr.IntegratedGradients(three).attribute(
        (x3,), target=(2, 3), n_steps=5)[0], rtol=1e-10, atol=1e-12)


def test_targets_share_every_forward_call():
    torch.manual_seed(2)
    model = MLP(num_out=6).eval()
    x = torch.randn(5, 6)
    forward, calls = counted(model)
    ig = igfast.IntegratedGradients(forward)
    ig.attribute(x, target="all", n_steps=10, internal_batch_size=10, return_convergence_delta=True)
    chunks = len(ig.last_integral.chunks)
    # The output at the inputs for "all", one per chunk, and F at both ends for the delta.
    assert calls[0] == 1 + chunks + 2
    calls[0] = 0
    ig.attribute(x, target=0, n_steps=10, internal_batch_size=10, return_convergence_delta=True)
    assert calls[0] == len(ig.last_integral.chunks) + 2 == chunks + 2


@pytest.mark.parametrize("internal_batch_size", [None, 6])
def test_layer_integrated_gradients_slices(internal_batch_size, device):
    torch.manual_seed(3)
    model = TokenClassifier().eval().to(device)
    ids, mask = on(device, token_batch(3))
    kwargs = dict(baselines=0, additional_forward_args=(mask,), n_steps=6,
                  internal_batch_size=internal_batch_size, return_convergence_delta=True)
    lig = igfast.LayerIntegratedGradients(model, model.words)
    many, deltas = lig.attribute(ids, target="all", **kwargs)
    assert many.shape == (3,) + ids.shape + (8,) and deltas.shape == (3, 3)
    for k in range(3):
        theirs, theirs_delta = captum_attr.LayerIntegratedGradients(model, model.words).attribute(
            ids, target=k, **kwargs)
        torch.testing.assert_close(many[k], theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(deltas[k], theirs_delta, rtol=1e-4, atol=1e-5)
    # Several layers: a list of (K, B, ...) tensors.
    with pytest.warns(UserWarning):
        two = igfast.LayerIntegratedGradients(model, [model.words, model.positions])
    per_layer = two.attribute(ids, targets=[0, 2], baselines=0, additional_forward_args=(mask,),
                              n_steps=5)
    assert isinstance(per_layer, list) and per_layer[1].shape == (2,) + ids.shape + (8,)


def test_memory_stays_within_the_budget(device):
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 10)).eval().to(device)
    x = torch.randn(16, 64).to(device)
    budget = 400_000
    ig = igfast.IntegratedGradients(model)
    ig.attribute(x, target=0, n_steps=2)  # what stays allocated after a first call (CUDA workspaces)
    bounded, peak = peak_of(lambda: ig.attribute(x, target="all", n_steps=64, memory_budget=budget), device)
    assert peak <= budget and len(ig.last_integral.chunks) > 4
    whole = igfast.IntegratedGradients(model).attribute(x, target="all", n_steps=64)
    torch.testing.assert_close(bounded, whole, rtol=1e-5, atol=1e-6)


def test_generated_tokens_equal_per_token_runs(device):
    lm = TinyCausalLM(vocabulary=40, width=32).to(device)
    prompt = torch.randint(1, 40, (2, 5), generator=torch.Generator().manual_seed(5)).to(device)
    generated = lm.generate(prompt, 4)
    together, deltas = attribute_generated_tokens(lm, lm.tokens, prompt, generated, baseline_token_id=0,
                                                  n_steps=12, return_convergence_delta=True)
    assert together.shape == (4, 2, 9, 32) and deltas.shape == (4, 2)
    for t in range(4):
        length = 5 + t + 1
        ids = torch.cat([prompt, generated[:, :t + 1]], 1)
        baseline = torch.cat([torch.zeros_like(prompt), generated[:, :t + 1]], 1)
        alone, delta = igfast.LayerIntegratedGradients(GeneratedTokenLogProbs(lm, 5 + t), lm.tokens).attribute(
            ids, baselines=baseline, n_steps=12, return_convergence_delta=True)
        torch.testing.assert_close(together[t, :, :length], alone[..., :length, :], rtol=1e-5, atol=1e-6)
        assert float(together[t, :, length:].abs().sum()) == 0.0
        torch.testing.assert_close(deltas[t], delta.reshape(-1), rtol=1e-4, atol=1e-5)
    # And against Captum for the last token.
    ids = torch.cat([prompt, generated], 1)
    theirs = captum_attr.LayerIntegratedGradients(GeneratedTokenLogProbs(lm, 8), lm.tokens).attribute(
        ids, baselines=torch.cat([torch.zeros_like(prompt), generated], 1), n_steps=12)
    torch.testing.assert_close(together[3], theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(targets=[]), "non-empty list"),
    (dict(targets=[0, 9]), "`targets\\[1\\]` index 9 is out of range"),  # named as given, not `target`
    (dict(targets=[(0,), (2, 1)]), "`targets\\[1\\]` \\(2, 1\\) has more indices"),
    (dict(target="topk:0"), "asks for 0 targets; 'topk:K' needs 1 <= K <= 5"),
    (dict(target="topk:6"), "asks for 6 targets; 'topk:K' needs 1 <= K <= 5"),
    (dict(target="best"), "must be 'all' or 'topk:K'"),
    (dict(target=1, targets=[0]), "not both"),
])
def test_bad_targets(kwargs, message):
    model = MLP(num_out=5).eval()
    with pytest.raises(ValueError, match=message):
        igfast.IntegratedGradients(model).attribute(torch.randn(2, 6), n_steps=4, **kwargs)
    layer = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    with pytest.raises(ValueError, match=message):
        igfast.LayerIntegratedGradients(model, layer).attribute(torch.randn(2, 6), n_steps=4, **kwargs)


def test_generated_tokens_bad_input():
    lm = TinyCausalLM(vocabulary=40, width=32)
    prompt = torch.randint(1, 40, (2, 5))
    with pytest.raises(ValueError, match="same batch"):
        attribute_generated_tokens(lm, lm.tokens, prompt, torch.randint(1, 40, (3, 2)), 0)
    with pytest.raises(ValueError, match="at least one token"):
        attribute_generated_tokens(lm, lm.tokens, prompt, torch.zeros(2, 0, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="tensor of token ids"):
        attribute_generated_tokens(lm, lm.tokens, prompt.float(), prompt, 0)
    # These gave torch's bare IndexError / TypeError, or (1.5) were silently truncated.
    generated = torch.randint(1, 40, (2, 2))
    for bad in (None, 1.5):
        with pytest.raises(ValueError, match="`baseline_token_id` must be an integer"):
            attribute_generated_tokens(lm, lm.tokens, prompt, generated, bad)
    with pytest.raises(IndexError, match=r"`baseline_token_id` must hold token ids in \[0, 40\)"):
        attribute_generated_tokens(lm, lm.tokens, prompt, generated, -1)
    with pytest.raises(IndexError, match=r"`generated_ids` must hold token ids in \[0, 40\)"):
        attribute_generated_tokens(lm, lm.tokens, prompt, generated + 40, 0)
    # An embedding of another model: named as the caller's argument (it named `layer` and
    # the internal wrapper).
    with pytest.raises(ValueError, match=r"`embedding_layer` \(Embedding\) is not a submodule of `model`"):
        attribute_generated_tokens(lm, torch.nn.Embedding(40, 32), prompt, generated, 0)
    # Rules that follow one target's path, with several generated tokens: said in this
    # function's terms (it said "with several targets", which the caller never gave).
    for kwargs in (dict(n_steps="auto"), dict(method="exact")):
        with pytest.raises(ValueError, match="2 generated tokens are 2 targets"):
            attribute_generated_tokens(lm, lm.tokens, prompt, generated, 0, **kwargs)


def test_one_generated_token_takes_every_rule():
    """One generated token is one target: n_steps="auto" works (it was refused), and the
    shapes keep the leading T = 1; fixed n_steps equals the several-token call's slice."""
    lm = TinyCausalLM(vocabulary=40, width=32)
    prompt = torch.randint(1, 40, (2, 5), generator=torch.Generator().manual_seed(6))
    generated = lm.generate(prompt, 3)
    several = attribute_generated_tokens(lm, lm.tokens, prompt, generated, 0, n_steps=64)
    one = attribute_generated_tokens(lm, lm.tokens, prompt, generated[:, :1], 0, n_steps=64)
    assert one.shape == (1, 2, 6, 32)
    torch.testing.assert_close(one[0], several[0, :, :6], rtol=1e-5, atol=1e-6)
    refined, delta = attribute_generated_tokens(lm, lm.tokens, prompt, generated[:, :1], 0, n_steps="auto",
                                                return_convergence_delta=True)
    assert refined.shape == (1, 2, 6, 32) and delta.shape == (1, 2)
    reference = attribute_generated_tokens(lm, lm.tokens, prompt, generated[:, :1], 0, n_steps=1024)
    error = (refined - reference).flatten(2).norm(dim=2) / reference.flatten(2).norm(dim=2)
    assert float(error.max()) < 1e-3  # auto's default tolerance


def test_generated_tokens_of_a_function_or_a_hugging_face_style_output():
    """A plain function (as the docstring allows) was refused as a layer outside the
    wrapper; an output with .logits failed on .dim()."""
    lm = TinyCausalLM(vocabulary=40, width=32)
    prompt, generated = torch.randint(1, 40, (2, 5)), torch.randint(1, 40, (2, 3))
    expected = attribute_generated_tokens(lm, lm.tokens, prompt, generated, 0, n_steps=8)

    class Output:
        def __init__(self, logits):
            self.logits = logits

    for model in (lambda ids: lm(ids), lambda ids: Output(lm(ids))):
        torch.testing.assert_close(attribute_generated_tokens(model, lm.tokens, prompt, generated, 0, n_steps=8),
                                   expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_compiled_backward_that_cannot_keep_its_graph(backend):
    """A torch.compile'd backward with donated buffers refuses retain_graph (after the
    model has run a plain forward+backward): each target then builds its own graph. It
    raised instead."""
    torch.manual_seed(1)
    model = MLP(num_out=3).eval()
    compiled = torch.compile(model, backend=backend)
    inputs = torch.randn(4, 6)
    compiled(inputs.clone().requires_grad_()).sum().backward()
    ours = igfast.IntegratedGradients(compiled).attribute(inputs, targets=[0, 2], n_steps=10)
    for k, target in enumerate([0, 2]):
        single = captum_attr.IntegratedGradients(model).attribute(inputs, target=target, n_steps=10)
        torch.testing.assert_close(ours[k], single, rtol=1e-5, atol=1e-6)
