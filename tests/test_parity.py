"""igfast.IntegratedGradients against captum.attr.IntegratedGradients over the product
of input form x baseline form x target form x method x internal_batch_size x
multiply_by_inputs x return_convergence_delta, on every model of tests/models.py,
in float32 (within 1e-5) and float64 (within 1e-10)."""

import itertools
import warnings
import zlib

import pytest
import torch

import igfast
from igfast.quadrature import SUPPORTED_METHODS

from conftest import PARITY_COMPARISONS
from models import CASES, build_model, on

captum_attr = pytest.importorskip("captum.attr")

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
BATCH = 3
N_STEPS = 7


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def input_forms(case, inputs):
    if len(inputs) == 1:
        return [("tensor", inputs[0]), ("tuple", inputs)]
    return [("tuple", inputs)]


def baseline_forms(inputs, generator):
    def like(x, batch):
        return torch.randn((batch,) + x.shape[1:], generator=generator, dtype=torch.float64).to(x.dtype)

    forms = [
        ("none", None),
        ("scalar", 0.5 if len(inputs) == 1 else tuple(0.5 for _ in inputs)),
        ("full", tuple(like(x, x.shape[0]) for x in inputs)),
        ("broadcast", tuple(like(x, 1) for x in inputs)),
    ]
    if len(inputs) > 1:
        forms.append(("mixed", (1,) + tuple(like(x, 1) for x in inputs[1:])))
    return forms


def as_single(form, baselines):
    """A tuple of one baseline becomes the bare baseline when the input is a tensor."""
    if form == "tensor" and isinstance(baselines, tuple):
        return baselines[0]
    return baselines


def resolve(target, batch):
    return target(batch) if callable(target) else target


def assert_close(ours, theirs, tolerance, what):
    ours_t = ours if isinstance(ours, tuple) else (ours,)
    theirs_t = theirs if isinstance(theirs, tuple) else (theirs,)
    assert isinstance(ours, tuple) == isinstance(theirs, tuple), f"{what}: form differs"
    for a, b in zip(ours_t, theirs_t):
        assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
        difference = (a.detach() - b.detach()).abs().max().item() if a.numel() else 0.0
        assert difference <= tolerance, f"{what}: max |igfast - captum| = {difference:.3g}"


@pytest.mark.parametrize("method", SUPPORTED_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_parity_with_captum(case, dtype, method, device):
    model = build_model(case, dtype).to(device)
    generator = torch.Generator().manual_seed(seed_of(case.name, str(dtype), method))
    inputs = case.draw_inputs(BATCH, dtype, generator)
    extra = on(device, case.additional_forward_args(BATCH, dtype) if case.additional_forward_args else None)
    ours_ig = igfast.IntegratedGradients(model)
    for (form, x), (baseline_name, baselines), target in itertools.product(
        on(device, input_forms(case, inputs)), on(device, baseline_forms(inputs, generator)), case.targets
    ):
        target = on(device, resolve(target, BATCH))
        baselines = as_single(form, baselines)
        for internal_batch_size, multiply_by_inputs, with_delta in itertools.product(
            [None, BATCH, 2 * BATCH + 1], [True, False], [True, False]
        ):
            kwargs = dict(
                baselines=baselines, target=target, additional_forward_args=extra,
                n_steps=N_STEPS, method=method, internal_batch_size=internal_batch_size,
                return_convergence_delta=with_delta,
            )
            what = f"{case.name} {form} baselines={baseline_name} target={target!r} {kwargs}"
            ours = igfast.IntegratedGradients(model, multiply_by_inputs).attribute(x, **kwargs)
            theirs = captum_attr.IntegratedGradients(model, multiply_by_inputs).attribute(x, **kwargs)
            PARITY_COMPARISONS["count"] += 1
            if with_delta:
                assert_close(ours[0], theirs[0], TOLERANCE[dtype], what)
                assert_close(ours[1], theirs[1], TOLERANCE[dtype], what + " delta")
                # The delta read from the path equals compute_convergence_delta of the
                # same attributions (two separate model calls, as Captum makes them).
                recomputed = ours_ig.compute_convergence_delta(
                    ours[0], baselines, x, target=target, additional_forward_args=extra
                )
                assert_close(recomputed, ours[1], TOLERANCE[dtype], what + " recomputed delta")
            else:
                assert_close(ours, theirs, TOLERANCE[dtype], what)


@pytest.mark.parametrize("method", SUPPORTED_METHODS)
def test_parity_default_steps_larger_batch(method, device):
    """Captum's defaults (50 steps) on a batch of 16 of the conv net."""
    case = next(c for c in CASES if c.name == "conv_net")
    model = build_model(case, torch.float32).to(device)
    generator = torch.Generator().manual_seed(seed_of("default", method))
    (x,) = on(device, case.draw_inputs(16, torch.float32, generator))
    target = torch.randint(0, 5, (16,), generator=generator).to(device)
    ours = igfast.IntegratedGradients(model).attribute(x, target=target, method=method, return_convergence_delta=True)
    theirs = captum_attr.IntegratedGradients(model).attribute(x, target=target, method=method, return_convergence_delta=True)
    PARITY_COMPARISONS["count"] += 1
    assert_close(ours, theirs, 1e-5, method)


def test_internal_batch_size_below_batch_warns_like_captum():
    model = torch.nn.Linear(4, 2)
    x = torch.randn(5, 4)
    with pytest.warns(UserWarning, match="Internal batch size cannot be less"):
        ours = igfast.IntegratedGradients(model).attribute(x, target=1, internal_batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = captum_attr.IntegratedGradients(model).attribute(x, target=1, internal_batch_size=2)
    assert_close(ours, theirs, 1e-5, "ibs < batch")


@pytest.mark.parametrize("input_dtype, baseline_dtype, model_dtype", [
    (torch.float32, torch.float64, torch.float64),
    (torch.int64, torch.float64, torch.float64),
    (torch.float16, torch.float32, torch.float32),
    (torch.float64, torch.float32, torch.float64),
    (torch.float32, torch.float64, torch.float32),  # Captum's path is float64: both fail in the model
])
def test_a_baseline_of_a_wider_dtype_sets_the_paths_dtype_as_in_captum(input_dtype, baseline_dtype, model_dtype):
    """Captum's path x' + alpha (x - x') takes the promoted dtype of input and baseline;
    igfast cast the baseline to the input's (float32 inputs with a float64 baseline
    failed in a float64 model, which Captum attributes in float64)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(model_dtype)
    x = (3 * torch.randn(3, 4)).to(input_dtype)
    baselines = torch.randn(1, 4).to(baseline_dtype)

    def attribute(lib):
        return lib.IntegratedGradients(model).attribute(x, baselines=baselines, target=1, n_steps=9)

    try:
        theirs = attribute(captum_attr)
    except RuntimeError:
        with pytest.raises(RuntimeError):
            attribute(igfast)
        return
    assert_close(attribute(igfast), theirs, TOLERANCE[theirs.dtype], "promoted path")
    PARITY_COMPARISONS["count"] += 1


@pytest.mark.parametrize("method", ["riemann_trapezoid", "gausslegendre"])
def test_path_points_that_land_on_a_kink_or_a_singularity_as_in_captum(method):
    """Captum forms each point as baseline + alpha * (input - baseline), two rounded ops;
    igfast rounded once (a fused multiply-add), so a point Captum puts exactly on a
    hardtanh bound or on a log's zero came out 1 ulp beside it: attributions 2% apart on a
    unit held at the bound, 1e7 against 1.25 at the singularity."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Hardtanh(), torch.nn.Linear(6, 2))
    torch.manual_seed(0)
    with torch.no_grad():  # unit 0's pre-activation is -1, hardtanh's bound, along the whole path
        weight = model[0].weight[0]
        along = torch.randn(4)
        along = along - (along @ weight) / (weight @ weight) * weight
        baseline = torch.randn(1, 4) * 0.1
        model[0].bias[0] = -1.0 - weight @ baseline[0]
        inputs = baseline + along
    ours = igfast.IntegratedGradients(model).attribute(inputs, baselines=baseline, target=0, n_steps=50,
                                                       method=method)
    theirs = captum_attr.IntegratedGradients(model).attribute(inputs, baselines=baseline, target=0, n_steps=50,
                                                              method=method)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    weights = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))

    def log_of_a_unit(x):  # its point at alpha = 1/3 is exactly 0 in Captum's rounding
        return torch.log(torch.relu(x @ weights))

    x = torch.tensor([[1.0, 2.0, -1.0, 0.5]])
    ours = igfast.IntegratedGradients(log_of_a_unit).attribute(x, baselines=-0.5 * x, target=0, n_steps=7,
                                                               method="riemann_trapezoid")
    theirs = captum_attr.IntegratedGradients(log_of_a_unit).attribute(x, baselines=-0.5 * x, target=0, n_steps=7,
                                                                      method="riemann_trapezoid")
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
