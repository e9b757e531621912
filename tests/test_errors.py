"""Bad input gets an exception that names the argument, and that is an instance of
the type Captum raises in the same case (so `except` clauses written for Captum
still work)."""

import warnings

import numpy as np
import pytest
import torch

import igfast

captum_attr = pytest.importorskip("captum.attr")


class Linear3(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x, y=None):
        return self.lin(x if y is None else x + y)


X = torch.randn(5, 4)

# (case id, inputs, attribute kwargs, words the message must contain,
#  whether Captum raises too)
CASES = [
    ("baseline_count", (X, X), dict(baselines=(0, 0, 0), target=0), ["baselines", "3", "2"], True),
    ("baseline_shape", X, dict(baselines=torch.zeros(2, 4), target=0), ["baselines", "(2, 4)"], True),
    ("baseline_type", X, dict(baselines="zero", target=0), ["baselines", "str"], True),
    ("target_out_of_range_int", X, dict(target=3), ["target", "3", "out of range"], True),
    ("target_out_of_range_list", X, dict(target=[0, 1, 2, 3, 0]), ["target", "3", "out of range"], True),
    ("target_out_of_range_tensor", X, dict(target=torch.tensor([0, 1, 2, 7, 0])), ["target", "7"], True),
    ("target_float", X, dict(target=1.0), ["target", "float"], True),
    ("target_2d_tensor", X, dict(target=torch.zeros(5, 1, dtype=torch.long)), ["target", "(5, 1)"], True),
    ("target_too_many_indices", X, dict(target=(0, 1)), ["target"], True),
    ("target_missing", X, dict(), ["target", "Target not provided"], True),
    ("unknown_method", X, dict(target=0, method="simpson"), ["method", "simpson"], True),
    ("n_steps_zero", X, dict(target=0, n_steps=0), ["n_steps", ">= 1"], True),
    ("n_steps_one_riemann", X, dict(target=0, n_steps=1, method="riemann_left"), ["n_steps", ">= 2"], True),
    ("n_steps_negative", X, dict(target=0, n_steps=-3), ["n_steps"], True),
    ("bool_inputs", X > 0, dict(target=0), ["inputs", "bool"], True),
    ("batch_mismatch", (X, torch.randn(3, 4)), dict(target=0), ["inputs", "(5, 4)", "(3, 4)"], True),
    ("baseline_does_not_broadcast", X, dict(baselines=torch.zeros(1, 7), target=0), ["baselines", "(1, 7)"], True),
    ("n_steps_float", X, dict(target=0, n_steps=5.0), ["n_steps", "5.0"], True),
    ("target_list_mixing_ints_and_tuples", torch.randn(5, 4), dict(target=[0, (1,), 2, 0, 1]), ["target"], True),
    ("internal_batch_size_nan", X, dict(target=0, internal_batch_size=float("nan")), ["internal_batch_size", "finite"], False),
    ("internal_batch_size_string", X, dict(target=0, internal_batch_size="7"), ["internal_batch_size", "'7'"], True),
    ("inputs_list", [X], dict(target=0), ["inputs", "list"], True),
    ("inputs_tuple_holding_a_number", (X, 3), dict(target=0), ["inputs[1]", "int"], True),
    ("inputs_0_dim", torch.tensor(1.0), dict(target=0), ["inputs", "0-dim"], True),
    # Captum: TypeError, from calling the model without an input.
    ("inputs_empty_tuple", (), dict(target=0), ["inputs", "empty tuple"], True),
]


@pytest.mark.parametrize("inputs, kwargs, words, captum_raises",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(inputs, kwargs, words, captum_raises):
    model = Linear3()
    with pytest.raises(Exception) as ours:
        igfast.IntegratedGradients(model).attribute(inputs, **kwargs)
    assert isinstance(ours.value, (ValueError, TypeError)), type(ours.value)
    message = str(ours.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    if captum_raises:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(Exception) as theirs:
                captum_attr.IntegratedGradients(model).attribute(inputs, **kwargs)
        assert isinstance(ours.value, type(theirs.value)), (
            f"Captum raises {type(theirs.value).__name__}, igfast {type(ours.value).__name__}"
        )


@pytest.mark.parametrize("inputs, kwargs", [
    (X.long(), dict(target=0)),  # Captum's path is in the default dtype
    (X, dict(target=0, internal_batch_size=-1)),  # Captum warns and runs a step per chunk
    (X, dict(target=(torch.tensor(1),))),  # 0-dim tensors index as ints
    (X, dict(target=0, n_steps=torch.tensor(7))),
    (X, dict(target=0, n_steps=torch.tensor([7]))),  # one element counts as 7 (Captum: gausslegendre only)
    (X, dict(target=0, n_steps=torch.tensor([[6]]))),
    (X, dict(target=0, internal_batch_size=2.5)),  # Captum: max(1, 2.5 // 5) steps per batch
    (X, dict(target=0, internal_batch_size=7.0)),
    (X, dict(target=0, internal_batch_size=torch.tensor(9.5))),
    (X, dict(target=0, internal_batch_size=True)),  # a bool is an int (Captum: a step per chunk)
    (X, dict(target=0, internal_batch_size=False)),
    (X, dict(target=0, baselines=torch.full((1, 1), 0.3))),  # one row broadcasts
    (X, dict(target=0, baselines=torch.tensor([0.3]))),
    (X, dict(target=0, baselines=torch.linspace(-1, 1, 4).view(1, 4))),
])
def test_forms_captum_accepts_that_look_odd(inputs, kwargs):
    model = Linear3()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = captum_attr.IntegratedGradients(model).attribute(inputs, **kwargs)
        ours = igfast.IntegratedGradients(model).attribute(inputs, **kwargs)
    assert ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("explainer", ["ig", "lig"])
@pytest.mark.parametrize("float_batch_size", [14.0, np.float32(23.9), torch.tensor([12.5])])
def test_a_float_internal_batch_size_counts_as_its_floor(explainer, float_batch_size):
    """Captum fails on these (it slices with ``14.0 // 5``), where its int counterparts
    run: igfast takes them, as their floor (several steps per chunk)."""
    model = Linear3()
    floor = int(float_batch_size)
    kwargs = dict(target=1, n_steps=9, method="riemann_middle")
    if explainer == "ig":
        ours = igfast.IntegratedGradients(model).attribute(X, internal_batch_size=float_batch_size, **kwargs)
        theirs = captum_attr.IntegratedGradients(model).attribute(X, internal_batch_size=floor, **kwargs)
    else:
        ours = igfast.LayerIntegratedGradients(model, model.lin).attribute(
            X, internal_batch_size=float_batch_size, **kwargs)
        theirs = captum_attr.LayerIntegratedGradients(model, model.lin).attribute(
            X, internal_batch_size=floor, **kwargs)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_a_per_channel_baseline_broadcasts_over_the_image():
    """A mean image (1, C, 1, 1) as baseline for (B, C, H, W) inputs, as Captum takes it."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3))
    x = torch.randn(2, 3, 6, 6)
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    kwargs = dict(target=1, n_steps=16, return_convergence_delta=True)
    ours, delta = igfast.IntegratedGradients(model).attribute(x, baselines=mean, **kwargs)
    expanded, expanded_delta = captum_attr.IntegratedGradients(model).attribute(x, baselines=mean.expand_as(x), **kwargs)
    theirs = captum_attr.IntegratedGradients(model).attribute(x, baselines=mean, target=1, n_steps=16)
    torch.testing.assert_close(ours, expanded, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(delta, expanded_delta, rtol=1e-4, atol=1e-6)


def test_forward_returning_a_scalar_is_rejected():
    ig = igfast.IntegratedGradients(lambda x: x.sum())
    with pytest.raises(igfast.ArgumentError, match="one output row per input row"):
        ig.attribute(X)


def test_forward_returning_a_tuple_is_rejected():
    ig = igfast.IntegratedGradients(lambda x: (x.sum(1),))
    with pytest.raises(igfast.ArgumentError, match="must return a torch.Tensor"):
        ig.attribute(X)


def test_forward_func_must_be_callable():
    with pytest.raises(igfast.ArgumentError, match="forward_func") as ours:
        igfast.IntegratedGradients(42)
    with pytest.raises(Exception) as theirs:  # Captum: when it calls it
        captum_attr.IntegratedGradients(42).attribute(X, target=0)
    assert isinstance(ours.value, type(theirs.value))


@pytest.mark.parametrize("inputs", [(X, 3), torch.tensor(1.0)], ids=["tuple_holding_a_number", "0_dim"])
def test_noise_tunnels_input_errors_are_of_captums_class(inputs):
    errors = []
    for lib in (captum_attr, igfast):
        with pytest.raises(Exception) as raised:
            lib.NoiseTunnel(lib.IntegratedGradients(Linear3())).attribute(inputs, target=0)
        errors.append(raised.value)
    assert isinstance(errors[1], igfast.ArgumentError) and isinstance(errors[1], type(errors[0])), errors


def test_delta_with_mismatched_attributions():
    ig = igfast.IntegratedGradients(Linear3())
    with pytest.raises(AssertionError, match="end_point"):
        ig.compute_convergence_delta(torch.zeros(3, 4), None, X, target=0)


def test_empty_batch_gives_empty_attributions():
    empty = torch.randn(0, 4)
    result = igfast.IntegratedGradients(Linear3()).attribute(empty, target=0)
    assert result.shape == (0, 4)
    # The piece methods too (they failed inside torch.cat).
    relu = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    for method in ("exact", "gausslegendre_pieces"):
        attributions, delta = igfast.IntegratedGradients(relu).attribute(
            empty, target=0, method=method, return_convergence_delta=True)
        assert attributions.shape == (0, 4) and attributions.dtype == torch.float32 and delta.shape == (0,)
        layer = igfast.LayerIntegratedGradients(relu, relu[1]).attribute(empty, target=0, method=method)
        assert layer.shape == (0, 8)


def test_a_complex_output_is_an_error_not_its_real_parts_attributions():
    """Captum: autograd's RuntimeError; igfast returned the IG of the real part, with a
    complex convergence delta."""
    model = torch.nn.Linear(4, 2)

    def complex_output(x):
        return torch.view_as_complex(model(x).contiguous())

    for explainer in (igfast.IntegratedGradients(complex_output), captum_attr.IntegratedGradients(complex_output)):
        with pytest.raises(RuntimeError) as raised:
            explainer.attribute(X)
        assert raised.value is not None
    for kwargs in ({}, {"n_steps": "auto"}, {"memory_budget": "1MB"}):
        with pytest.raises(igfast.ArgumentError, match="must return a real tensor; got torch.complex64"):
            igfast.IntegratedGradients(complex_output).attribute(X, **kwargs)


class _Words(torch.nn.Module):
    """Token ids -> embeddings (+ position embeddings computed per call, not per row)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.pos = torch.nn.Embedding(20, 8), torch.nn.Embedding(5, 8)
        self.lin, self.unused = torch.nn.Linear(8, 3), torch.nn.Linear(8, 8)

    def forward(self, ids):
        return self.lin(torch.tanh(self.emb(ids) + self.pos(torch.arange(ids.shape[1]))).mean(1))


IDS = torch.randint(1, 20, (3, 5))
LAYER_CASES = {
    "token_ids_into_the_layer": lambda m: (m.emb, dict(attribute_to_layer_input=True)),
    "a_listed_layer_never_called": lambda m: ([m.emb, m.unused], {}),
    "the_same_layer_twice": lambda m: ([m.emb, m.emb], {}),
    "a_string_for_a_layer": lambda m: ("emb", {}),
    "n_steps_a_string": lambda m: (m.emb, dict(n_steps="10")),
    "activations_not_batch_first": lambda m: (m.pos, {}),
    "no_layer": lambda m: (None, {}),
}


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_layer_errors_are_of_captums_class(case):
    model = _Words().eval()
    layer, kwargs = LAYER_CASES[case](model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as theirs:
            captum_attr.LayerIntegratedGradients(model, layer).attribute(IDS, target=0, **kwargs)
        with pytest.raises(igfast.ArgumentError) as ours:
            igfast.LayerIntegratedGradients(model, layer).attribute(IDS, target=0, **kwargs)
    assert isinstance(ours.value, type(theirs.value)), (type(ours.value), type(theirs.value))
    assert "layer" in str(ours.value) or "n_steps" in str(ours.value)


class _Sequences(torch.nn.Module):
    """Layers whose output is not a tensor or a flat tuple of tensors: an LSTM gives
    (output, (h, c)) and MultiheadAttention without weights (output, None)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lstm = torch.nn.LSTM(4, 8, batch_first=True)
        self.attention = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        hidden, _ = self.lstm(x)
        mixed, _ = self.attention(hidden, hidden, hidden, need_weights=False)
        return self.head(mixed.mean(1))


@pytest.mark.parametrize("layer_name", ["lstm", "attention"])
def test_a_layer_giving_nested_or_none_outputs_is_captums_class(layer_name):
    """Captum raises AttributeError here; igfast raised a ValueError/AssertionError
    that an ``except AttributeError`` missed."""
    model = _Sequences().eval()
    layer = getattr(model, layer_name)
    inputs = torch.randn(2, 5, 4)
    with pytest.raises(AttributeError):
        captum_attr.LayerIntegratedGradients(model, layer).attribute(inputs, target=0)
    with pytest.raises(igfast.LayerError, match="must be a tensor or a tuple of tensors") as ours:
        igfast.LayerIntegratedGradients(model, layer).attribute(inputs, target=0)
    assert isinstance(ours.value, AttributeError)


def test_a_model_without_autograd_through_it_is_an_error_not_zeros():
    """A dynamically quantized Linear has no autograd formula: igfast returned zero
    attributions (delta = -(F(x) - F(x'))); Captum raises RuntimeError."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    inputs = torch.randn(4, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # autograd's notice about the missing kernel
        with pytest.raises(RuntimeError):
            captum_attr.IntegratedGradients(quantized).attribute(inputs, target=1, n_steps=5)
        for call in (lambda: igfast.IntegratedGradients(quantized).attribute(inputs, target=1, n_steps=5),
                     lambda: igfast.IntegratedGradients(quantized).attribute(inputs, target=1, n_steps="auto"),
                     lambda: igfast.NoiseTunnel(igfast.IntegratedGradients(quantized)).attribute(
                         inputs, target=1, n_steps=5, nt_samples=2)):
            with pytest.raises(igfast.GradientError, match="does not reach any input") as ours:
                call()
            assert isinstance(ours.value, RuntimeError)


def test_target_errors_name_the_output_shape_per_row():
    """Per-example int targets on a model with one output per row: the message quoted the
    shape of one chunk of path rows, (50,) for fixed n_steps and (45,) for auto, numbers
    the caller never gave. It names the rows N, the same for every method."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    x = torch.randn(5, 4)
    for kwargs in ({"n_steps": 10}, {"n_steps": "auto"}, {"method": "exact"}):
        with pytest.raises(igfast.TargetError, match=r"forward output has shape \(N,\)"):
            igfast.IntegratedGradients(lambda v: model(v).squeeze(1)).attribute(x, target=[0, 1, 0, 1, 0], **kwargs)
