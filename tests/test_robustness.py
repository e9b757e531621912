"""Regression tests for models and arguments that once crashed igfast or made it differ
from Captum silently: autograd Functions under the peak meter, train-mode and
observing layers, layers that feed one another, the delta against
compute_convergence_delta, Captum's internal_batch_size forms, Captum's error
classes, empty batches, and LayerIntegratedGradients from several threads."""

import threading
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import igfast
from igfast import BatchDependenceWarning
from igfast.memory import PeakMeter
from models import MLP, IdentityFunction, MultiInputModel
from test_layer_integrated_gradients import TokenClassifier, token_batch

captum_attr = pytest.importorskip("captum.attr")


def _close(ours, theirs, rtol=1e-5, atol=1e-6):
    ours = ours if isinstance(ours, (tuple, list)) else (ours,)
    theirs = theirs if isinstance(theirs, (tuple, list)) else (theirs,)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_autograd_function_runs_under_the_peak_meter():
    """The CPU meter once held c10's debug-info slot, where Function.apply fails."""
    with PeakMeter(torch.device("cpu")):
        out = IdentityFunction.apply(torch.randn(3, requires_grad=True))
    assert out.shape == (3,)


# ------------------------------------------------------------- train mode ---

def _bn_model(track_running_stats=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, track_running_stats=track_running_stats),
                         nn.ReLU(), nn.Linear(8, 3))


def _state(model):
    return {name: value.clone() for name, value in model.state_dict().items()}


@pytest.mark.parametrize("method", ["ig", "layer_ig", "noise_tunnel"])
def test_train_mode_batchnorm_warns_once_and_keeps_its_statistics(method):
    model = _bn_model().train()
    x = torch.randn(5, 6)
    before = _state(model)
    explainer = {"ig": lambda: igfast.IntegratedGradients(model),
                 "layer_ig": lambda: igfast.LayerIntegratedGradients(model, model[0]),
                 "noise_tunnel": lambda: igfast.NoiseTunnel(igfast.IntegratedGradients(model))}[method]()
    kwargs = dict(nt_samples=2) if method == "noise_tunnel" else {}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        explainer.attribute(x, target=1, n_steps=10, return_convergence_delta=True, **kwargs)
    ours = [w for w in seen if issubclass(w.category, BatchDependenceWarning)]
    assert len(ours) == 1 and "1 (BatchNorm1d)" in str(ours[0].message) and "model.eval()" in str(ours[0].message)
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # num_batches_tracked included


def test_train_mode_batchnorm_is_batched_as_captum_batches_it():
    model = _bn_model().train()
    x = torch.randn(5, 6)
    for options in ({}, {"internal_batch_size": 15}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = igfast.IntegratedGradients(model).attribute(x, target=2, n_steps=12, **options)
            theirs = captum_attr.IntegratedGradients(model).attribute(x, target=2, n_steps=12, **options)
        _close(ours, theirs)


def test_train_mode_batchnorm_under_a_budget_ignores_earlier_calls():
    """Under a memory_budget the explainer sized later calls' chunks from what earlier
    ones measured; with BatchNorm in training mode the chunks are part of the result, so
    a second call differed from the first (by 0.38), and attribute_dataset resumed with
    other shards than a run that was not stopped."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).double().train()
    x = torch.randn(6, 6, dtype=torch.float64)
    kwargs = dict(target=[0, 1, 2, 1, 0, 2], n_steps=6, memory_budget="16KB")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BatchDependenceWarning)
        explainer = igfast.IntegratedGradients(model)
        first = explainer.attribute(x, **kwargs)
        assert len(explainer.last_integral.chunks) > 1
        second = explainer.attribute(x, **kwargs)
        fresh = igfast.IntegratedGradients(model).attribute(x, **kwargs)
    assert torch.equal(second, first) and torch.equal(fresh, first)


def test_eval_mode_is_quiet_and_batch_statistics_in_eval_mode_warn():
    x = torch.randn(4, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        igfast.IntegratedGradients(_bn_model().eval()).attribute(x, target=0)
    # Without running statistics BatchNorm uses the batch's, even in eval mode.
    with pytest.warns(BatchDependenceWarning, match="BatchNorm1d"):
        igfast.IntegratedGradients(_bn_model(track_running_stats=False).eval()).attribute(x, target=0)


def test_dropout_in_training_mode_warns_and_closures_are_searched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    with pytest.warns(BatchDependenceWarning, match="Dropout.*random"):
        igfast.IntegratedGradients(lambda t: model(t) * 2).attribute(torch.randn(4, 6), target=0)


class _SpectralNormed(nn.Module):
    """A GAN discriminator's layers: spectral norm in both of PyTorch's forms."""

    def __init__(self):
        super().__init__()
        self.hooked = torch.nn.utils.spectral_norm(nn.Linear(6, 10))
        self.parametrized = torch.nn.utils.parametrizations.spectral_norm(nn.Linear(10, 3))

    def forward(self, x):
        return self.parametrized(torch.tanh(self.hooked(x)))


@pytest.mark.parametrize("options", [{}, {"internal_batch_size": 12}])
def test_spectral_norm_in_training_mode_is_batched_as_captum_and_keeps_its_vectors(options):
    """Each training-mode forward call steps spectral norm's power iteration, so a call's
    weights depend on the calls before it: igfast's own chunks gave other attributions
    (3e-2 off under a budget, 7e-3 from its automatic chunks on a CNN), without a warning,
    and left the singular vectors moved."""
    torch.manual_seed(1)
    model = _SpectralNormed().double().train()
    x = torch.randn(4, 6, dtype=torch.float64)
    before = _state(model)
    with pytest.warns(BatchDependenceWarning, match=r"hooked \(Linear\).*_SpectralNorm.*power iteration"):
        ours = igfast.IntegratedGradients(model).attribute(x, target=[0, 1, 2, 1], n_steps=20, **options)
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    theirs = captum_attr.IntegratedGradients(model).attribute(x, target=[0, 1, 2, 1], n_steps=20, **options)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        igfast.IntegratedGradients(model.eval()).attribute(x, target=0, n_steps=5)


class _FunctionalNoise(nn.Module):
    def __init__(self, draws):
        super().__init__()
        self.linear, self.draws = nn.Linear(6, 3), draws

    def forward(self, x):
        return self.linear(F.dropout(x, 0.3, training=True) if self.draws else x)


def test_random_draws_no_module_names_warn():
    """RReLU in training mode, and functional dropout (no module to name): the
    attributions are random, and igfast said nothing."""
    x = torch.randn(4, 6)
    with pytest.warns(BatchDependenceWarning, match="RReLU.*random"):
        igfast.IntegratedGradients(nn.Sequential(nn.Linear(6, 8), nn.RReLU(), nn.Linear(8, 3)).train()).attribute(
            x, target=0)
    noisy = _FunctionalNoise(True)
    for explainer in (igfast.IntegratedGradients(noisy), igfast.LayerIntegratedGradients(noisy, noisy.linear)):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            explainer.attribute(x, target=0, n_steps=5)
        ours = [w for w in seen if issubclass(w.category, BatchDependenceWarning)]
        assert len(ours) == 1 and "drew random numbers" in str(ours[0].message)
        assert ours[0].filename == __file__  # the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        igfast.IntegratedGradients(_FunctionalNoise(False)).attribute(x, target=0, n_steps=5)
        # Draws that make nothing random: RReLU with one slope, a lazy module's first call.
        one_slope = nn.Sequential(nn.Linear(6, 8), nn.RReLU(0.1, 0.1), nn.Linear(8, 3)).train()
        igfast.IntegratedGradients(one_slope).attribute(x, target=0, n_steps=5)
        igfast.IntegratedGradients(nn.Sequential(nn.LazyLinear(3))).attribute(x, target=0, n_steps=5)


def test_observing_fake_quantization_warns_and_keeps_its_ranges():
    from torch.ao import quantization

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).train()
    model.qconfig = quantization.get_default_qat_qconfig("fbgemm")
    quantization.prepare_qat(model, inplace=True)
    model(torch.randn(16, 6))
    model.eval()  # observers stay on in eval mode: each call moves the ranges
    before = _state(model)
    with pytest.warns(BatchDependenceWarning, match="FakeQuantize"):
        igfast.IntegratedGradients(model).attribute(torch.randn(4, 6) * 3, target=0)
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------ layers ---

def test_layers_feeding_one_another_raise_like_captum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    x = torch.randn(4, 6)
    with pytest.raises(RuntimeError):  # autograd: a differentiated tensor was not used
        captum_attr.LayerIntegratedGradients(model, [model[0], model[2]]).attribute(x, target=0)
    with pytest.warns(UserWarning), pytest.raises(igfast.UnusedLayerError, match=r"layer\[0\].*does not reach"):
        igfast.LayerIntegratedGradients(model, [model[0], model[2]]).attribute(x, target=0)
    # Asking autograd for zeros is Captum's way to accept them; so it is igfast's.
    kwargs = dict(target=0, grad_kwargs={"materialize_grads": True})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = igfast.LayerIntegratedGradients(model, [model[0], model[2]]).attribute(x, **kwargs)
        theirs = captum_attr.LayerIntegratedGradients(model, [model[0], model[2]]).attribute(x, **kwargs)
    _close(ours, theirs)
    assert float(ours[0].abs().max()) == 0.0


def test_layer_ig_from_several_threads_on_one_explainer():
    torch.manual_seed(1)
    model = TokenClassifier().eval()
    lig = igfast.LayerIntegratedGradients(model, model.words)
    batches = [token_batch(3 + i, batch=2 + i % 3) for i in range(6)]
    expected = [lig.attribute(ids, target=1, additional_forward_args=(mask,), n_steps=16) for ids, mask in batches]
    results, errors = [None] * len(batches), []

    def work(index):
        ids, mask = batches[index]
        try:
            for _ in range(4):
                results[index] = lig.attribute(ids, target=1, additional_forward_args=(mask,), n_steps=16,
                                               internal_batch_size=8)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(repr(error))

    def plain_inference():  # another thread using the model while the hooks are on
        for ids, mask in batches * 10:
            with torch.no_grad():
                assert torch.equal(model(ids, mask), model(ids, mask))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    threads.append(threading.Thread(target=plain_inference))
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    for ours, theirs in zip(results, expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------- delta ---

@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right"])
@pytest.mark.parametrize("chunking", [{}, {"internal_batch_size": 7}, {"memory_budget": 30_000}])
def test_delta_is_compute_convergence_delta_to_the_bit(method, chunking):
    torch.manual_seed(3)
    model = MultiInputModel().eval()
    inputs = (torch.randn(6, 4), torch.randn(6, 3, 2))
    baselines = (torch.randn(1, 4), 0.5)
    ig = igfast.IntegratedGradients(model)
    attributions, delta = ig.attribute(inputs, baselines, target=1, method=method, n_steps=20,
                                       return_convergence_delta=True, **chunking)
    assert torch.equal(delta, ig.compute_convergence_delta(attributions, baselines, inputs, target=1))


def test_layer_delta_is_compute_convergence_delta_to_the_bit():
    torch.manual_seed(4)
    model = TokenClassifier().eval()
    ids, mask = token_batch(5, batch=4)
    lig = igfast.LayerIntegratedGradients(model, model.words)
    kwargs = dict(target=[0, 1, 2, 0], additional_forward_args=(mask,))
    attributions, delta = lig.attribute(ids, 0, n_steps=12, return_convergence_delta=True, **kwargs)
    assert torch.equal(delta, lig.compute_convergence_delta(attributions, 0, ids, **kwargs))
    theirs = captum_attr.LayerIntegratedGradients(model, model.words).compute_convergence_delta(
        attributions, torch.zeros_like(ids), ids, **kwargs)
    torch.testing.assert_close(delta, theirs, rtol=0, atol=1e-6)


# ------------------------------------------------------- argument forms ---

@pytest.mark.parametrize("size", [np.int64(12), np.int32(12), torch.tensor(12), 12, 0, -3,
                                  # Floats count as their floor (Captum: max(1, size // examples)).
                                  2.5, 12.9, np.float32(12.0), torch.tensor(12.5), torch.tensor([12])])
def test_internal_batch_size_in_every_form_captum_accepts(size):
    torch.manual_seed(5)
    model = MLP().eval()
    x = torch.randn(4, 6)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ours = igfast.IntegratedGradients(model).attribute(x, target=1, n_steps=9, internal_batch_size=size)
    theirs = captum_attr.IntegratedGradients(model).attribute(x, target=1, n_steps=9, internal_batch_size=12)
    _close(ours, theirs)
    assert any("Internal batch size cannot be less" in str(w.message) for w in seen) == (int(size) < 4)


@pytest.mark.parametrize("bad", ["12", torch.tensor([4, 4]), torch.tensor(1 + 2j), [12]])
def test_internal_batch_size_refused_forms(bad):
    # A TypeError too, as Captum's where it computes with it (a float or a string). (A bool
    # is an int there, and here: test_errors.test_forms_captum_accepts_that_look_odd.)
    with pytest.raises((igfast.ArgumentError, TypeError), match="internal_batch_size") as raised:
        igfast.IntegratedGradients(MLP().eval()).attribute(torch.randn(4, 6), target=1, internal_batch_size=bad)
    assert isinstance(raised.value, igfast.ArgumentError) and isinstance(raised.value, TypeError)


def _model_output(logits):
    """What a Hugging Face model returns."""
    outputs = pytest.importorskip("transformers.modeling_outputs")
    return outputs.SequenceClassifierOutput(logits=logits)


@pytest.mark.parametrize("wrap", [lambda y: {"logits": y}, lambda y: (y,), _model_output,
                                  lambda y: y.detach().numpy()])
@pytest.mark.parametrize("with_delta", [False, True])
def test_non_tensor_outputs_raise_captums_attribute_error(wrap, with_delta):
    torch.manual_seed(6)
    model = nn.Linear(6, 3)
    forward = lambda x: wrap(model(x))  # noqa: E731
    x = torch.randn(4, 6)
    with pytest.raises(AttributeError):
        captum_attr.IntegratedGradients(forward).attribute(x, target=1, return_convergence_delta=with_delta)
    with pytest.raises(igfast.OutputTypeError, match="must return a torch.Tensor") as raised:
        igfast.IntegratedGradients(forward).attribute(x, target=1, return_convergence_delta=with_delta)
    assert isinstance(raised.value, AttributeError)
    ids, mask = token_batch(7, batch=2)
    lm = TokenClassifier().eval()
    with pytest.raises(AttributeError):
        igfast.LayerIntegratedGradients(lambda i, m: wrap(lm(i, m)), lm.words).attribute(
            ids, target=1, additional_forward_args=(mask,))


def test_zero_dim_output_raises_captums_index_error():
    model = nn.Linear(6, 3)
    x = torch.randn(4, 6)
    with pytest.raises(IndexError):
        captum_attr.IntegratedGradients(lambda t: model(t).sum()).attribute(x)
    with pytest.raises(igfast.OutputShapeError, match="one output row per input row") as raised:
        igfast.IntegratedGradients(lambda t: model(t).sum()).attribute(x)
    assert isinstance(raised.value, IndexError)


@pytest.mark.parametrize("with_delta", [False, True])
@pytest.mark.parametrize("method", ["ig", "layer_ig", "noise_tunnel", "ig_auto", "ig_all_targets"])
def test_empty_batches_give_empty_results_everywhere(method, with_delta):
    torch.manual_seed(7)
    model = MLP().eval()
    lm = TokenClassifier().eval()
    ids, mask = token_batch(8, batch=3)
    x = torch.randn(0, 6)
    calls = {
        "ig": lambda **kw: igfast.IntegratedGradients(model).attribute(x, target=1, **kw),
        "ig_auto": lambda **kw: igfast.IntegratedGradients(model).attribute(x, target=1, n_steps="auto", **kw),
        "ig_all_targets": lambda **kw: igfast.IntegratedGradients(model).attribute(x, target="all", **kw),
        "noise_tunnel": lambda **kw: igfast.NoiseTunnel(igfast.IntegratedGradients(model)).attribute(
            x, target=1, nt_samples=3, **kw),
        "layer_ig": lambda **kw: igfast.LayerIntegratedGradients(lm, lm.words).attribute(
            ids[:0], target=1, additional_forward_args=(mask[:0],), **kw),
    }
    result = calls[method](return_convergence_delta=with_delta)
    attributions, delta = result if with_delta else (result, None)
    assert attributions.numel() == 0 and attributions.shape[-1] in (6, 8)
    assert attributions.shape[0 if method != "ig_all_targets" else 1] == 0
    if with_delta:
        assert delta.numel() == 0


def test_igfasts_warnings_name_the_callers_line():
    """Warnings with a fixed stacklevel named igfast's own files (_train_mode.py,
    _captum_protocol.py) when a call went through its wrappers: each is attributed to
    the first frame outside igfast."""
    torch.manual_seed(0)
    relu = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    train_mode = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).double().train()
    calls = {
        # (tanh: no walk can converge it early; 1e-15 is out of reach of 9 nodes)
        "tolerance": lambda: igfast.IntegratedGradients(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double(
        )).attribute(x, target=0, n_steps="auto", tolerance=1e-15, max_steps=9),
        "internal batch": lambda: igfast.IntegratedGradients(relu).attribute(x, target=0, internal_batch_size=2),
        "batch statistics": lambda: igfast.IntegratedGradients(train_mode).attribute(x, target=0, n_steps=4),
        "several layers": lambda: igfast.LayerIntegratedGradients(relu, [relu[0], relu[2]]),
    }
    for what, call in calls.items():
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            call()
        assert seen, what
        assert {w.filename for w in seen} == {__file__}, (what, [(w.filename, str(w.message)[:60]) for w in seen])
