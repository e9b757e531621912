"""igfast.LayerIntegratedGradients against captum.attr.LayerIntegratedGradients:
embedding layers fed token ids, a conv layer, several layers, layers with tuple
outputs, attribution to a layer's inputs; every method, chunking and baseline form;
model calls counted for both; bad input."""

import itertools
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import igfast
from conftest import PARITY_COMPARISONS
from models import SmallConvNet, counted, on

captum_attr = pytest.importorskip("captum.attr")

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


class TokenClassifier(nn.Module):
    """Token ids and an attention mask in, (B, 3) logits out; two embedding tables
    (words and positions) that feed the rest side by side."""

    def __init__(self, vocabulary=30, width=8, length=6):
        super().__init__()
        self.words = nn.Embedding(vocabulary, width, padding_idx=0)
        self.positions = nn.Embedding(length, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, 3)

    def forward(self, ids, mask):
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        hidden = self.words(ids) + self.positions(positions)
        hidden = torch.tanh(self.mix(hidden)) * mask.unsqueeze(-1)
        return self.head(hidden.sum(1) / mask.sum(1, keepdim=True))


class PairLayer(nn.Module):
    """A layer with a tuple output."""

    def __init__(self, width):
        super().__init__()
        self.left = nn.Linear(width, width)
        self.right = nn.Linear(width, 2)

    def forward(self, x):
        return torch.sigmoid(self.left(x)), self.right(x)


class Combine(nn.Module):
    """A layer with two positional inputs."""

    def forward(self, a, b):
        return a * b[:, :1] + b[:, 1:]


class TupleModel(nn.Module):
    def __init__(self, width=5):
        super().__init__()
        self.pair = PairLayer(width)
        self.combine = Combine()
        self.out = nn.Linear(width, 4)

    def forward(self, x):
        a, b = self.pair(x)
        return self.out(F.softplus(self.combine(a, b)))


def token_batch(seed, batch=3, length=6, vocabulary=30):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocabulary, (batch, length), generator=generator)
    mask = torch.ones(batch, length)
    mask[0, -2:] = 0  # a padded example
    return ids, mask


def assert_same(ours, theirs, dtype=torch.float32):
    if isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            assert_same(a, b, dtype)
        return
    assert type(ours) is type(theirs)
    pairs = zip(ours, theirs) if isinstance(theirs, tuple) else [(ours, theirs)]
    for a, b in pairs:
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    PARITY_COMPARISONS["count"] += 1


def both(model, layer, inputs, multiply_by_inputs=True, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Captum's and our warnings about several layers
        ours = igfast.LayerIntegratedGradients(model, layer, multiply_by_inputs=multiply_by_inputs)
        theirs = captum_attr.LayerIntegratedGradients(
            model, layer, multiply_by_inputs=multiply_by_inputs
        )
        return ours.attribute(inputs, **kwargs), theirs.attribute(inputs, **kwargs)


def compare(model, layer, inputs, dtype=torch.float32, multiply_by_inputs=True, **kwargs):
    ours, theirs = both(model, layer, inputs, multiply_by_inputs, **kwargs)
    if kwargs.get("return_convergence_delta"):
        assert_same(ours[0], theirs[0], dtype)
        torch.testing.assert_close(ours[1], theirs[1], rtol=1e-4, atol=TOLERANCE[dtype] * 10)
    else:
        assert_same(ours, theirs, dtype)


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_left", "riemann_right",
                                    "riemann_middle", "riemann_trapezoid"])
@pytest.mark.parametrize("internal_batch_size", [None, 4, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_embedding_layer_matches_captum(method, internal_batch_size, dtype, device):
    torch.manual_seed(1)
    model = TokenClassifier().to(dtype).eval().to(device)
    ids, mask = on(device, token_batch(2))
    for multiply_by_inputs, with_delta, target in itertools.product(
        (True, False), (False, True), (1, [0, 2, 1], torch.tensor([2, 2, 0], device=device))
    ):
        compare(model, model.words, ids, dtype, multiply_by_inputs, baselines=0, target=target,
                additional_forward_args=(mask.to(dtype),), n_steps=6, method=method,
                internal_batch_size=internal_batch_size, return_convergence_delta=with_delta)


@pytest.mark.parametrize("baselines", ["none", "scalar", "broadcast", "full"])
def test_token_baseline_forms(baselines, device):
    torch.manual_seed(2)
    model = TokenClassifier().eval().to(device)
    ids, mask = on(device, token_batch(3))
    form = on(device, {
        "none": None, "scalar": 3, "broadcast": torch.full((1, 6), 5),
        "full": torch.randint(1, 30, ids.shape, generator=torch.Generator().manual_seed(4)),
    }[baselines])
    compare(model, model.words, ids, baselines=form, target=0,
            additional_forward_args=(mask,), n_steps=5, return_convergence_delta=True)


@pytest.mark.parametrize("attribute_to_layer_input", [False, True])
@pytest.mark.parametrize("internal_batch_size", [None, 3])
def test_conv_layer_matches_captum(attribute_to_layer_input, internal_batch_size, device):
    torch.manual_seed(3)
    model = SmallConvNet().eval().to(device)
    x = torch.randn(4, 3, 8, 8).to(device)
    compare(model, model.conv, x, baselines=torch.randn(1, 3, 8, 8).to(device), target=[0, 1, 2, 3],
            n_steps=7, internal_batch_size=internal_batch_size, return_convergence_delta=True,
            attribute_to_layer_input=attribute_to_layer_input)


def test_several_layers_match_captum(device):
    torch.manual_seed(4)
    model = TokenClassifier().eval().to(device)
    ids, mask = on(device, token_batch(5))
    for with_delta in (False, True):
        compare(model, [model.words, model.positions], ids, baselines=0, target=2,
                additional_forward_args=(mask,), n_steps=8, return_convergence_delta=with_delta)


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid"])
def test_tuple_outputs_and_layer_inputs_match_captum(method, device):
    torch.manual_seed(5)
    model = TupleModel().eval().to(device)
    x = torch.randn(3, 5).to(device)
    for layer, to_input in ((model.pair, False), (model.combine, True), (model.combine, False)):
        compare(model, layer, x, baselines=0.25, target=1, n_steps=6, method=method,
                return_convergence_delta=True, attribute_to_layer_input=to_input)
    # A list of layers mixing a tuple output and a single one.
    compare(model, [model.pair], x, target=3, n_steps=5)


def test_memory_budget_and_split_batches_keep_results(device):
    torch.manual_seed(6)
    model = TokenClassifier().eval().to(device)
    ids, mask = on(device, token_batch(6, batch=5))
    kwargs = dict(baselines=0, target=1, additional_forward_args=(mask,), n_steps=9,
                  return_convergence_delta=True)
    theirs = captum_attr.LayerIntegratedGradients(model, model.words).attribute(ids, **kwargs)
    lig = igfast.LayerIntegratedGradients(model, model.words)
    ours = lig.attribute(ids, memory_budget="40KB", **kwargs)
    assert any(not chunk.covers_batch for chunk in lig.last_integral.chunks)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-4, atol=1e-4)


def test_delta_is_completeness_error(device):
    """The delta from the batched call equals sum(attributions) - (F(x) - F(x'))."""
    torch.manual_seed(7)
    model = TokenClassifier().double().eval().to(device)
    ids, mask = on(device, token_batch(7))
    lig = igfast.LayerIntegratedGradients(model, model.words)
    attributions, delta = lig.attribute(ids, baselines=0, target=0, n_steps=40,
                                        additional_forward_args=(mask.double(),),
                                        return_convergence_delta=True)
    with torch.no_grad():
        rise = model(ids, mask.double())[:, 0] - model(torch.zeros_like(ids), mask.double())[:, 0]
    torch.testing.assert_close(delta, attributions.sum((1, 2)) - rise, rtol=0, atol=1e-12)
    assert delta.abs().max() < 1e-3


@pytest.mark.parametrize("internal_batch_size", [None, 6])
@pytest.mark.parametrize("with_delta", [False, True])
def test_model_calls_against_captum(internal_batch_size, with_delta):
    """igfast: one call per end of the path (which also gives F there) plus one per
    chunk. Captum: one per end, one per chunk, and two more for the delta."""
    torch.manual_seed(8)
    model = TokenClassifier().eval()
    ids, mask = token_batch(8)
    kwargs = dict(baselines=0, target=1, additional_forward_args=(mask,), n_steps=8,
                  internal_batch_size=internal_batch_size, return_convergence_delta=with_delta)
    (ours_forward, ours_calls), (theirs_forward, theirs_calls) = counted(model), counted(model)
    lig = igfast.LayerIntegratedGradients(ours_forward, model.words)
    lig.attribute(ids, **kwargs)
    captum_attr.LayerIntegratedGradients(theirs_forward, model.words).attribute(ids, **kwargs)
    chunks = 1 if internal_batch_size is None else -(-8 // (internal_batch_size // 3))
    assert len(lig.last_integral.chunks) == chunks
    assert ours_calls[0] == 2 + chunks
    assert theirs_calls[0] == 2 + chunks + (2 if with_delta else 0)


def test_captum_noise_tunnel_wraps_igfast_layer_ig():
    torch.manual_seed(9)
    model = SmallConvNet().eval()
    x = torch.randn(2, 3, 8, 8)
    results = []
    for lib in (igfast, captum_attr):
        torch.manual_seed(11)
        tunnel = captum_attr.NoiseTunnel(lib.LayerIntegratedGradients(model, model.conv))
        results.append(tunnel.attribute(x, nt_type="smoothgrad_sq", nt_samples=3, stdevs=0.1,
                                        target=0, n_steps=5))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)


# Bad input: clear errors that name the argument.

def test_layer_outside_the_model():
    model = TokenClassifier()
    ids, mask = token_batch(1)
    # As Captum: found when the forward runs without it (a layer need not be registered).
    explainer = igfast.LayerIntegratedGradients(model, nn.Linear(2, 2))
    with pytest.raises(ValueError, match="was not called by `forward_func`"):
        explainer.attribute(ids, additional_forward_args=(mask,), target=0)
    with pytest.raises(ValueError, match="`layer` must be a torch.nn.Module"):
        igfast.LayerIntegratedGradients(model, "words")
    with pytest.raises(ValueError, match="non-empty list"):
        igfast.LayerIntegratedGradients(model, [])


def test_a_layer_of_a_model_its_wrapper_does_not_register_matches_captum():
    """A wrapper module that keeps the model in a plain list (its parameters hidden):
    Captum hooks the layer and attributes to it; igfast refused it as not a submodule."""

    class Holder(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.models = [model]

        def forward(self, ids, mask):
            return self.models[0](ids, mask)

    model = TokenClassifier()
    ids, mask = token_batch(3)
    results = [lib.LayerIntegratedGradients(Holder(model), model.words).attribute(
        ids, additional_forward_args=(mask,), target=1, n_steps=7) for lib in (igfast, captum_attr)]
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_layer_the_forward_never_calls():
    model = TokenClassifier()
    unused = nn.Linear(8, 8)
    model.unused = unused
    ids, mask = token_batch(1)
    with pytest.raises(ValueError, match="was not called by `forward_func`"):
        igfast.LayerIntegratedGradients(model, unused).attribute(
            ids, additional_forward_args=(mask,), target=0)
    # A plain function cannot be checked up front; the first call finds it.
    with pytest.raises(ValueError, match="was not called by `forward_func`"):
        igfast.LayerIntegratedGradients(lambda i, m: model(i, m), nn.Linear(2, 2)).attribute(
            ids, additional_forward_args=(mask,), target=0)


def test_baselines_that_do_not_fit_the_inputs():
    model = TokenClassifier()
    ids, mask = token_batch(1)
    lig = igfast.LayerIntegratedGradients(model, model.words)
    with pytest.raises(ValueError, match=r"`baselines` must have the input's shape \(3, 6\)"):
        lig.attribute(ids, baselines=torch.zeros(3, 5, dtype=torch.long),
                      additional_forward_args=(mask,), target=0)
    with pytest.raises(ValueError, match="one baseline per input tensor"):
        lig.attribute(ids, baselines=(0, 0), additional_forward_args=(mask,), target=0)


def test_activations_that_cannot_be_a_path():
    model = TokenClassifier()
    ids, mask = token_batch(1)
    # The embedding's input is token ids: integers cannot be interpolated.
    with pytest.raises(ValueError, match="dtype torch.int64: only floating"):
        igfast.LayerIntegratedGradients(model, model.words).attribute(
            ids, additional_forward_args=(mask,), target=0, attribute_to_layer_input=True)

    class SequenceFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4)

        def forward(self, x):
            return self.inner(x.transpose(0, 1)).sum((0, 2)).unsqueeze(1)

    seq_first = SequenceFirst()
    with pytest.raises(ValueError, match="dim 0 must index the examples"):
        igfast.LayerIntegratedGradients(seq_first, seq_first.inner).attribute(torch.randn(2, 5, 4))


def test_a_layer_called_with_keyword_arguments_only_has_no_input_to_replace():
    """Hugging Face's BertEmbeddings is called as embeddings(input_ids=...): its
    positional input is empty. Captum fails reading it (IndexError); igfast says why, in
    an error of that class too."""

    class KeywordCalled(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(5)
            self.inner, self.out = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.out(self.inner(input=x))

    model = KeywordCalled()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(6))
    with pytest.raises(IndexError):
        captum_attr.LayerIntegratedGradients(model, model.inner).attribute(x, target=1, attribute_to_layer_input=True)
    with pytest.raises(IndexError, match="keyword arguments"):
        igfast.LayerIntegratedGradients(model, model.inner).attribute(x, target=1, attribute_to_layer_input=True)
    # Its output can be attributed to, as in Captum.
    torch.testing.assert_close(
        igfast.LayerIntegratedGradients(model, model.inner).attribute(x, target=1),
        captum_attr.LayerIntegratedGradients(model, model.inner).attribute(x, target=1), rtol=1e-5, atol=1e-6)


def test_target_and_method_errors_as_in_integrated_gradients():
    model = TokenClassifier()
    ids, mask = token_batch(1)
    lig = igfast.LayerIntegratedGradients(model, model.words)
    with pytest.raises(IndexError, match="out of range"):
        lig.attribute(ids, additional_forward_args=(mask,), target=7)
    with pytest.raises(AssertionError):  # Captum's type for a missing target
        lig.attribute(ids, additional_forward_args=(mask,))
    with pytest.raises(ValueError, match="method"):
        lig.attribute(ids, additional_forward_args=(mask,), target=0, method="simpson")


def test_data_parallel_on_several_devices_is_refused():
    model = TokenClassifier()
    ids, mask = token_batch(1)
    lig = igfast.LayerIntegratedGradients(model, model.words, device_ids=[0, 1])
    with pytest.raises(ValueError, match="DataParallel"):
        lig.attribute(ids, additional_forward_args=(mask,), target=0)


def test_a_layer_the_model_runs_under_no_grad():
    """A frozen backbone run under torch.no_grad() in the model's forward, its features
    taken by a trained head: Captum attributes to the backbone's output (its hook returns
    the path tensor); igfast's clone of the path, made under no_grad, cut the gradient
    (UnusedLayerError). Also under a memory_budget and n_steps="auto"."""

    class FrozenBackbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            with torch.no_grad():
                features = self.backbone(x)
            return self.head(torch.tanh(features))

    torch.manual_seed(0)
    model = FrozenBackbone().double()
    x = torch.randn(3, 8, dtype=torch.float64)
    theirs = captum_attr.LayerIntegratedGradients(model, model.backbone).attribute(x, target=1, n_steps=10)
    ours = igfast.LayerIntegratedGradients(model, model.backbone)
    torch.testing.assert_close(ours.attribute(x, target=1, n_steps=10, method="riemann_trapezoid"),
                               captum_attr.LayerIntegratedGradients(model, model.backbone).attribute(
                                   x, target=1, n_steps=10, method="riemann_trapezoid"), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours.attribute(x, target=1, n_steps=10), theirs, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours.attribute(x, target=1, n_steps=10, memory_budget="16KB"), theirs,
                               rtol=1e-12, atol=1e-14)
    reference = captum_attr.LayerIntegratedGradients(model, model.backbone).attribute(x, target=1, n_steps=200)
    auto = ours.attribute(x, target=1, n_steps="auto", tolerance=1e-6)
    assert float(((auto - reference).norm(dim=1) / reference.norm(dim=1)).max()) < 1e-5
    assert float(theirs.abs().max()) > 0


def test_in_place_ops_after_the_layer_and_inference_mode():
    """The path reaches the model as a copy, so in-place ops after the layer work
    (Captum's leaf raises there); calls under inference_mode or no_grad work."""

    class AfterLayer(nn.Module):
        def __init__(self, in_place):
            super().__init__()
            torch.manual_seed(12)
            self.inner, self.out, self.in_place = nn.Linear(4, 6), nn.Linear(6, 2), in_place

        def forward(self, x):
            hidden = self.inner(x)
            hidden = hidden.relu_() if self.in_place else hidden.relu()
            return self.out(hidden)

    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(13))
    in_place, plain = AfterLayer(True), AfterLayer(False)
    ours = igfast.LayerIntegratedGradients(in_place, in_place.inner)
    theirs = captum_attr.LayerIntegratedGradients(plain, plain.inner).attribute(
        x, target=1, n_steps=6)
    torch.testing.assert_close(ours.attribute(x, target=1, n_steps=6), theirs)
    with torch.inference_mode():
        torch.testing.assert_close(ours.attribute(x, target=1, n_steps=6), theirs)
    with torch.no_grad():
        torch.testing.assert_close(ours.attribute(x, target=1, n_steps=6), theirs)


def test_an_unused_tensor_of_one_layers_tuple_is_named():
    """MultiheadAttention's attention weights, which the model ignores: Captum raises
    (an unused tensor); igfast's message spoke of "another layer of the list" where no
    list was given, and did not say which tensor of the tuple went unused."""

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(6, 2, batch_first=True)
            self.out = nn.Linear(6, 3)

        def forward(self, x):
            return self.out(self.attention(x, x, x)[0].mean(1))

    torch.manual_seed(0)
    model = Attention().eval()
    x = torch.randn(2, 5, 6)
    with pytest.raises(RuntimeError):
        captum_attr.LayerIntegratedGradients(model, model.attention).attribute(x, target=1, n_steps=5)
    with pytest.raises(igfast.UnusedLayerError) as raised:
        igfast.LayerIntegratedGradients(model, model.attention).attribute(x, target=1, n_steps=5)
    message = str(raised.value)
    assert "output tensor 1 (of 2) of `layer` (MultiheadAttention)" in message
    assert "list" not in message
    listed = r"output tensor 0 \(of 2\) of `layer\[1\]`.*another layer of the list"
    with pytest.raises(igfast.UnusedLayerError, match=listed):
        igfast.LayerIntegratedGradients(model, [model.out, model.attention]).attribute(x, target=1, n_steps=5)


def test_a_layer_of_a_dynamically_quantized_model_names_the_quantized_modules():
    """Quantized ops have no autograd formula, so no layer reaches the output: the message
    listed causes that did not apply and never said "quantized" (IG's did)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).eval()
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    with pytest.raises(igfast.UnusedLayerError, match=r"quantized modules, such as 0 \(torch\.ao\.nn\.quantized"):
        igfast.LayerIntegratedGradients(quantized, quantized[0]).attribute(torch.randn(4, 6), target=1)
