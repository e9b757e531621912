"""igfast.NoiseTunnel against captum.attr.NoiseTunnel with the same random draws:
every nt_type, sample batching, baselines drawn from a distribution, per-example
targets and arguments, the delta; over igfast's IG and LayerIG (streamed in one
pass) and over a method it does not stream; bad input."""

import itertools
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

import igfast
from conftest import PARITY_COMPARISONS
from models import MLP, AdditionalArgsModel, MultiInputModel, SmallConvNet, on

captum_attr = pytest.importorskip("captum.attr")


def smoothed(lib, method_class, model, inputs, seed, method_args=(), **kwargs):
    torch.manual_seed(seed)
    np.random.seed(seed)  # Captum draws baselines from a distribution with numpy
    tunnel = lib.NoiseTunnel(method_class(model, *method_args))
    return tunnel, tunnel.attribute(inputs, **kwargs)


def assert_same(ours, theirs, tolerance):
    ours = ours if isinstance(ours, tuple) else (ours,)
    theirs = theirs if isinstance(theirs, tuple) else (theirs,)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)
    PARITY_COMPARISONS["count"] += 1


def compare(ours_class, theirs_class, model, inputs, method_args=(), tolerance=1e-10, **kwargs):
    _, ours = smoothed(igfast, ours_class, model, inputs, 5, method_args, **kwargs)
    _, theirs = smoothed(captum_attr, theirs_class, model, inputs, 5, method_args, **kwargs)
    if kwargs.get("return_convergence_delta"):
        assert_same(ours[0], theirs[0], tolerance)
        assert_same(ours[1], theirs[1], tolerance)
    else:
        assert_same(ours, theirs, tolerance)


@pytest.mark.parametrize("nt_type", ["smoothgrad", "smoothgrad_sq", "vargrad"])
@pytest.mark.parametrize("nt_samples_batch_size", [None, 1, 3, 10])
def test_integrated_gradients_matches_captum(nt_type, nt_samples_batch_size, device):
    torch.manual_seed(0)
    model = MLP().double().eval().to(device)
    x = torch.randn(4, 6, dtype=torch.float64).to(device)
    for target, baselines, with_delta in itertools.product(
        (2, [0, 1, 2, 3], torch.tensor([3, 2, 1, 0], device=device)),
        on(device, (None, 0.5, torch.randn(4, 6, dtype=torch.float64), torch.randn(1, 6, dtype=torch.float64))),
        (False, True),
    ):
        compare(igfast.IntegratedGradients, captum_attr.IntegratedGradients, model, x,
                nt_type=nt_type, nt_samples=7, nt_samples_batch_size=nt_samples_batch_size,
                stdevs=0.3, target=target, baselines=baselines, n_steps=6,
                return_convergence_delta=with_delta)


@pytest.mark.parametrize("stdevs", [np.float64(0.3), (np.float64(0.3),), 0.3])
def test_numpy_stdevs_draw_captums_noise(stdevs):
    """A numpy.float64 standard deviation: Captum draws the noise in float64 (another
    random stream than a Python float's); igfast drew it in float32."""
    torch.manual_seed(0)
    model = MLP().double().eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    compare(igfast.IntegratedGradients, captum_attr.IntegratedGradients, model, x,
            nt_samples=4, stdevs=stdevs, target=1, n_steps=4)
    # On a float32 model it keeps the inputs' dtype (Captum's float64 copies fail there).
    _, ours = smoothed(igfast, igfast.IntegratedGradients, MLP().eval(), x.float(), 5, nt_samples=4,
                       stdevs=stdevs, target=1, n_steps=4)
    assert ours.dtype == torch.float32


@pytest.mark.parametrize("stdevs", [(torch.tensor(0.3),), (torch.tensor([0.3]),),
                                    (torch.tensor(0.3, dtype=torch.float64),),
                                    (torch.tensor(0.3, dtype=torch.float16),),
                                    (torch.tensor(0.3, dtype=torch.bfloat16),)])
@pytest.mark.parametrize("counts", [dict(nt_samples=torch.tensor(4)),
                                    dict(nt_samples=torch.tensor([5]), nt_samples_batch_size=torch.tensor([2]))])
def test_tensor_counts_and_stdevs_draw_captums_noise(stdevs, counts):
    """One-element tensors for the counts and in a stdevs tuple are Captum's numbers (a
    float64, float16 or bfloat16 stdev draws in its dtype); igfast refused them."""
    torch.manual_seed(0)
    model = MLP().double().eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    compare(igfast.IntegratedGradients, captum_attr.IntegratedGradients, model, x,
            stdevs=stdevs, target=1, n_steps=4, **counts)


@pytest.mark.parametrize("stdevs", [(0.1, None), (0.1, object()), (0.1, "a"), (0.1, 1 + 2j)])
def test_stdevs_that_are_not_numbers_raise_captums_classes(stdevs):
    """Captum fails in torch.tensor (RuntimeError; TypeError for a string) on a value in
    the tuple, with an AssertionError on a bare one: igfast's error is all three."""
    tunnel = igfast.NoiseTunnel(igfast.IntegratedGradients(MultiInputModel()))
    for given in (stdevs, stdevs[1]):
        with pytest.raises((RuntimeError, TypeError, AssertionError)) as raised:
            tunnel.attribute((torch.randn(2, 4), torch.randn(2, 6)), stdevs=given, target=0, n_steps=3)
        assert isinstance(raised.value, (RuntimeError, TypeError, AssertionError)) and all(
            isinstance(raised.value, c) for c in (RuntimeError, TypeError, AssertionError))
        assert "stdevs" in str(raised.value)


@pytest.mark.parametrize("nt_samples_batch_size", [None, 3])
def test_baselines_drawn_from_a_distribution(nt_samples_batch_size, device):
    torch.manual_seed(1)
    model = MultiInputModel().double().eval().to(device)
    inputs = on(device, (torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 3, 2, dtype=torch.float64)))
    distribution = on(device, (torch.randn(6, 4, dtype=torch.float64), 0.25))
    compare(igfast.IntegratedGradients, captum_attr.IntegratedGradients, model, inputs,
            nt_type="vargrad", nt_samples=5, nt_samples_batch_size=nt_samples_batch_size,
            stdevs=(0.2, 0.1), target=1, baselines=distribution, draw_baseline_from_distrib=True,
            n_steps=6, method="riemann_middle", return_convergence_delta=True)


def test_additional_forward_args_follow_their_examples(device):
    torch.manual_seed(2)
    model = AdditionalArgsModel().double().eval().to(device)
    x = torch.randn(3, 5, dtype=torch.float64).to(device)
    scale = (torch.rand(3, 3, dtype=torch.float64) + 0.5).to(device)
    compare(igfast.IntegratedGradients, captum_attr.IntegratedGradients, model, x,
            nt_type="smoothgrad", nt_samples=4, nt_samples_batch_size=3, stdevs=0.5,
            additional_forward_args=(scale, torch.tensor(0.1, dtype=torch.float64, device=device), "sigmoid"),
            target=[0, 2, 1], n_steps=5)


@pytest.mark.parametrize("nt_type", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_layer_integrated_gradients_matches_captum(nt_type, device):
    torch.manual_seed(3)
    model = SmallConvNet().eval().to(device)
    x = torch.randn(3, 3, 8, 8).to(device)
    compare(igfast.LayerIntegratedGradients, captum_attr.LayerIntegratedGradients, model, x,
            method_args=(model.conv,), tolerance=1e-5, nt_type=nt_type, nt_samples=4,
            nt_samples_batch_size=3, stdevs=0.2, target=[0, 1, 2], n_steps=5,
            return_convergence_delta=True)


def test_all_samples_stream_through_one_pass(device):
    """Captum runs one IG per batch of samples; igfast one engine pass over all of
    them, whose chunks cover (path nodes x noisy examples) once."""
    torch.manual_seed(4)
    model = SmallConvNet().eval().to(device)
    x = torch.randn(2, 3, 8, 8).to(device)
    calls = {"ours": 0, "theirs": 0}

    def counter(key):
        def forward(inputs):
            calls[key] += 1
            return model(inputs)
        return forward

    kwargs = dict(nt_type="smoothgrad", nt_samples=10, nt_samples_batch_size=2, stdevs=0.1,
                  target=1, n_steps=8)
    tunnel, ours = smoothed(igfast, igfast.IntegratedGradients, counter("ours"), x, 6, **kwargs)
    _, theirs = smoothed(captum_attr, captum_attr.IntegratedGradients, counter("theirs"), x, 6,
                         **kwargs)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    integral = tunnel.attribution_method.last_integral
    assert calls["ours"] == integral.forward_calls == 1  # 20 noisy rows x 8 nodes in one chunk
    assert calls["theirs"] == 5  # one IG per batch of 2 samples
    # Under a memory budget the same pass is chunked; the result does not change.
    _, budgeted = smoothed(igfast, igfast.IntegratedGradients, model, x, 6,
                           memory_budget="300KB", **kwargs)
    torch.testing.assert_close(budgeted, ours, rtol=1e-5, atol=1e-6)


def test_methods_it_does_not_stream_run_per_sample_batch():
    torch.manual_seed(5)
    model = MLP().double().eval()
    x = torch.randn(3, 6, dtype=torch.float64)
    kwargs = dict(nt_type="smoothgrad_sq", nt_samples=5, nt_samples_batch_size=2, stdevs=0.4,
                  target=1)
    compare(captum_attr.Saliency, captum_attr.Saliency, model, x, **kwargs)


def test_is_gradient_method_as_in_captum():
    model = MLP().eval()
    for method in (igfast.IntegratedGradients(model), igfast.LayerIntegratedGradients(model, model.net[0]),
                   captum_attr.Saliency(model), captum_attr.FeatureAblation(model)):
        expected = captum_attr.NoiseTunnel(method).is_gradient_method
        assert igfast.NoiseTunnel(method).is_gradient_method is expected


def test_several_layers_keep_their_list_form():
    torch.manual_seed(6)

    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 2)

        def forward(self, x):
            return torch.cat([torch.tanh(self.a(x)), self.b(x)], 1).sum(1, keepdim=True)

    model = TwoBranches().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="Several layers"):
        lig = igfast.LayerIntegratedGradients(model, [model.a, model.b])
    torch.manual_seed(7)
    smooth = igfast.NoiseTunnel(lig).attribute(x, nt_samples=3, stdevs=0.1, n_steps=5)
    assert isinstance(smooth, list) and [t.shape for t in smooth] == [(3, 3), (3, 2)]
    # The same draws by hand: the mean over samples of each layer's attributions.
    torch.manual_seed(7)
    noisy = x.repeat_interleave(3, dim=0) + torch.normal(0, torch.tensor(0.1).repeat(9, 4))
    per_sample = lig.attribute(noisy, n_steps=5)
    for got, each in zip(smooth, per_sample):
        torch.testing.assert_close(got, each.view(3, 3, -1).mean(1), rtol=1e-12, atol=1e-12)


def test_bad_arguments():
    tunnel = igfast.NoiseTunnel(igfast.IntegratedGradients(MLP()))
    x = torch.randn(2, 6)
    # Each error is also of the class Captum raises (it divides by these counts).
    with pytest.raises(ZeroDivisionError, match="`nt_samples` must be an integer >= 1; got 0"):
        tunnel.attribute(x, nt_samples=0, target=0)
    with pytest.raises(ZeroDivisionError, match="`nt_samples_batch_size` must be an integer >= 1"):
        tunnel.attribute(x, nt_samples_batch_size=0, target=0)
    with pytest.raises(AssertionError, match="`nt_type` must be one of smoothgrad"):
        tunnel.attribute(x, nt_type="smoothgrad_cubed", target=0)
    with pytest.raises(ValueError, match="one value per input tensor"):
        tunnel.attribute(x, stdevs=(0.1, 0.2), target=0)
    with pytest.raises(RuntimeError, match="`stdevs` must be a number >= 0"):  # Captum: torch.normal's
        tunnel.attribute(x, stdevs=-1.0, target=0)
    with pytest.raises(TypeError, match="floating point"):
        tunnel.attribute(torch.ones(2, 6, dtype=torch.bool), target=0)
    with pytest.raises(ValueError, match="one target per call"):
        tunnel.attribute(x, target="all")
    with pytest.raises(ValueError, match="one target per call"):
        tunnel.attribute(x, targets=[0, 1])
    with pytest.raises(AttributeError, match="`attribution_method` must be an attribution object"):
        igfast.NoiseTunnel(MLP())  # Captum: AttributeError (it reads has_convergence_delta)
    # Sizes are the caller's (2 examples), not the noisy rows' (2 x 5); Captum: AssertionError.
    with pytest.raises(AssertionError, match=r"one entry per example \(2\); got 3"):
        tunnel.attribute(x, nt_samples=5, target=[0, 1, 0])
    with pytest.raises(AssertionError, match=r"one target per example \(2\); got shape \(3,\)"):
        tunnel.attribute(x, nt_samples=5, target=torch.tensor([0, 1, 0]))
    with pytest.raises(AssertionError, match=r"the input's shape \(2, 6\).*got \(3, 6\)"):
        tunnel.attribute(x, nt_samples=5, target=0, baselines=torch.zeros(3, 6))
    # Rows to draw baselines from: the error names their shape, not the drawn rows' (10, 4).
    with pytest.raises(AssertionError, match=r"a row of the input, \(6,\); got rows of shape \(4,\).*\(3, 4\)"):
        tunnel.attribute(x, nt_samples=5, target=0, baselines=torch.zeros(3, 4), draw_baseline_from_distrib=True)


class _TrainingNet(nn.Module):
    """BatchNorm (normalises each call's rows together) and Dropout (a random mask per
    call), both in training mode."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("batch_size", [None, 2, 3])
def test_a_model_that_depends_on_the_call_runs_one_call_per_sample_batch(batch_size):
    """Each sample batch is drawn, then run, as in Captum: one merged batch changed
    BatchNorm's statistics and the dropout masks' draws (0.04-0.06 on 0.25)."""
    x = torch.randn(3, 6)
    results = []
    for lib in (igfast, captum_attr):
        model = _TrainingNet().train()
        with pytest.warns(UserWarning) if lib is igfast else _nothing():
            results.append(smoothed(lib, lib.IntegratedGradients, model, x, seed=11, nt_samples=4,
                                    nt_samples_batch_size=batch_size, stdevs=0.2, target=1, n_steps=6)[1])
    assert_same(results[0], results[1], 1e-5)


@pytest.mark.parametrize("batch_size", [None, 2])
def test_layer_ig_with_its_delta_on_a_model_that_depends_on_the_call(batch_size):
    """LayerIG's delta from two calls after the path, as Captum's: read from the calls
    that gave the activations, dropout's draws differed (0.50-0.53 on 0.34-0.55), and
    so did the next sample batch's attributions (0.03)."""
    x = torch.randn(3, 6)
    results = []
    for lib in (igfast, captum_attr):
        model = _TrainingNet().train()
        with pytest.warns(UserWarning) if lib is igfast else _nothing():
            results.append(smoothed(lib, lib.LayerIntegratedGradients, model, x, seed=11,
                                    method_args=(model.net[0],), nt_samples=4, nt_samples_batch_size=batch_size,
                                    stdevs=0.2, target=1, n_steps=6, return_convergence_delta=True)[1])
    assert_same(results[0], results[1], 1e-5)


@pytest.mark.parametrize("batch_size", [None, 2])
def test_a_method_that_draws_random_numbers_keeps_captums_order(batch_size):
    """GradientShap draws its baselines and noise from the generator the samples come
    from: the next sample batch is drawn after it ran, as in Captum."""
    torch.manual_seed(2)
    model = MLP().eval()
    x = torch.randn(3, 6)
    kwargs = dict(nt_samples=4, nt_samples_batch_size=batch_size, stdevs=0.2, target=1,
                  baselines=torch.randn(1, 6), n_samples=3)
    ours = smoothed(igfast, captum_attr.GradientShap, model, x, seed=5, **kwargs)[1]
    theirs = smoothed(captum_attr, captum_attr.GradientShap, model, x, seed=5, **kwargs)[1]
    assert_same(ours, theirs, 1e-6)


def _nothing():
    import contextlib
    return contextlib.nullcontext()


@pytest.mark.parametrize("nt_type", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_a_memory_budget_holds_every_sample_batch(nt_type):
    """All noisy copies of every example ran as one batch whatever nt_samples_batch_size
    said, their copies and attributions outside the budget (40 samples of 16 CIFAR images:
    3.9x 8 MiB). Under a budget each batch of samples now runs in what is left beside the
    sums, and is let go before the next is drawn; results stay Captum's."""
    from igfast.bench.peak import AllocationPeak

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 5)).eval()
    x = torch.randn(32, 256)
    target = torch.arange(32) % 5
    kwargs = dict(nt_type=nt_type, nt_samples=20, nt_samples_batch_size=4, stdevs=0.1, target=target, n_steps=10)
    nt = igfast.NoiseTunnel(igfast.IntegratedGradients(model))
    torch.manual_seed(5)
    nt.attribute(x[:2], **{**kwargs, "target": target[:2]})
    torch.manual_seed(5)
    with AllocationPeak("cpu") as peak:
        ours = nt.attribute(x, memory_budget=2_000_000, **kwargs)
    assert peak.bytes <= 2_000_000, peak.bytes
    torch.manual_seed(5)
    theirs = captum_attr.NoiseTunnel(captum_attr.IntegratedGradients(model)).attribute(x, **kwargs)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    with pytest.raises(igfast.ArgumentError, match=r"memory_budget. of 500.00 KiB is too small.*"
                                                   r"batch of 4 noisy copies.*smaller nt_samples_batch_size") as refused:
        nt.attribute(x, memory_budget=512_000, **kwargs)
    # The bytes named are enough for what was named (they were refused again, off by one).
    advised = int(re.search(r"\((\d+) bytes\)", str(refused.value)).group(1))
    try:
        nt.attribute(x, memory_budget=advised, **kwargs)
    except igfast.ArgumentError as error:
        assert f"({advised} bytes)" not in str(error)
