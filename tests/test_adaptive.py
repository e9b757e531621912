"""n_steps="auto": the nested rules, error control on smooth and ReLU models against a
4096-node Gauss-Legendre reference, per-example refinement (fewer evaluations for
easy examples, every evaluation reused), chunk and batch invariance, LayerIG,
NoiseTunnel, and bad input."""

import math

import numpy as np
import warnings

import pytest
import torch
import torch.nn as nn

import igfast
from igfast.adaptive import ProbeClock, predicted_walk_seconds
from igfast.completeness import SCALE_FLOOR
from igfast.errors import ArgumentError
from igfast.exact import CURVED_WALK_ROWS_PER_PIECE, GAUSS_NODES_PER_PIECE, PieceEstimate
from igfast.quadrature import FIRST_ROUND_STEPS, SMOOTH_SMALLEST_LEVEL_STEPS, nested_levels
from models import MLP, count_walked_rows, counted, on
from test_exact import oracle
from test_layer_integrated_gradients import TokenClassifier, token_batch
from test_pieces import tanh_then_relu

SMOOTH_FIRST_ROUND_STEPS = 2 * SMOOTH_SMALLEST_LEVEL_STEPS - 1
ACTIVATIONS = {"tanh": nn.Tanh, "gelu": nn.GELU, "softplus": nn.Softplus, "relu": nn.ReLU}
REFERENCE_STEPS = 4096


def model_and_batch(activation, seed=0, batch=6, features=6, device="cpu"):
    torch.manual_seed(seed)
    model = MLP(num_in=features, hidden=32, num_out=4, activation=ACTIVATIONS[activation]).double().eval()
    generator = torch.Generator().manual_seed(seed + 1)
    x = 2 * torch.randn(batch, features, generator=generator, dtype=torch.float64)
    baseline = torch.randn(1, features, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 4, (batch,), generator=generator)
    return (model.to(device),) + on(device, (x, baseline, target))


def varied_batch(activation, seed, spread=1.0):
    """An MLP of 8 inputs (32 or 128 units, weights from ``seed``) and 16 examples at
    scales 1-3 x ``spread``, against a zero or a random baseline: the stress cases that
    found auto's misses."""
    torch.manual_seed(seed)
    model = MLP(num_in=8, hidden=32 if seed % 2 == 0 else 128, num_out=4, activation=activation).double().eval()
    generator = torch.Generator().manual_seed(seed + 100)
    x = (1 + seed % 3) * spread * torch.randn(16, 8, generator=generator, dtype=torch.float64)
    baseline = torch.randn(1, 8, generator=generator, dtype=torch.float64) * (seed % 2)
    target = torch.randint(0, 4, (16,), generator=generator)
    return model, x, baseline, target


def relative_errors(attributions, reference):
    return ((attributions - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1))


def scale_of(model, x, baseline, target):
    with torch.no_grad():
        end = model(x).gather(1, target[:, None])[:, 0]
        start = model(baseline.expand_as(x)).gather(1, target[:, None])[:, 0]
    return end - start, torch.maximum((end - start).abs(), SCALE_FLOOR * torch.maximum(end.abs(), start.abs()))


# --- the nested rules -------------------------------------------------------------

@pytest.mark.parametrize("smallest", [5, SMOOTH_SMALLEST_LEVEL_STEPS])
@pytest.mark.parametrize("max_steps", [9, 17, 100, 257, 1025])
def test_levels_are_nested_clenshaw_curtis_rules_exact_for_polynomials(max_steps, smallest):
    levels = nested_levels(max_steps, smallest)
    first_round = 2 * smallest - 1
    alphas, weights = levels.alphas.numpy(), levels.weights.numpy()
    assert levels.steps[0] == smallest and levels.steps[-1] <= max_steps < 2 * levels.steps[-1] - 1
    assert len(set(alphas.tolist())) == len(alphas) == levels.steps[-1]  # every node once
    assert {0.0, 0.5, 1.0} <= set(alphas[:first_round].tolist())
    previous = set()
    for level, steps in enumerate(levels.steps):
        support = set(np.flatnonzero(weights[level]).tolist())
        assert len(support) == steps and previous <= support  # nested
        previous = support
        for degree in range(steps):  # Clenshaw-Curtis with N + 1 nodes: exact to degree N
            assert abs((weights[level] * alphas ** degree).sum() - 1 / (degree + 1)) < 1e-13
    # Round r evaluates exactly the nodes that level r + 1 adds.
    assert levels.round_ends[0] == first_round
    for r in range(1, levels.rounds):
        assert levels.round_ends[r] == levels.steps[r + 1]
        new = levels.round_nodes(r)
        assert new.weights.shape == (len(levels.steps) - r - 1, levels.steps[r + 1] - levels.steps[r])


# --- error control ----------------------------------------------------------------

@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("tolerance", [1e-2, 1e-3, 1e-4])
def test_completeness_error_within_tolerance_or_max_steps_reported(activation, tolerance, device):
    model, x, baseline, target = model_and_batch(activation, device=device)
    attributions, delta, info = igfast.IntegratedGradients(model).attribute(
        x, baseline, target=target, n_steps="auto", tolerance=tolerance,
        return_convergence_delta=True, return_adaptive_info=True)
    difference, scale = scale_of(model, x, baseline, target)
    scale = torch.maximum(scale, (attributions * 1.0).norm(dim=1))
    completeness = (attributions.sum(1) - difference).abs() / scale  # from fresh model calls
    torch.testing.assert_close(delta, attributions.sum(1) - difference, rtol=0, atol=1e-12)
    torch.testing.assert_close(info.completeness_error, completeness, rtol=0, atol=1e-12)
    assert bool((info.error_estimate >= info.completeness_error).all())
    finest = nested_levels(257).steps[-1]
    for e in range(x.shape[0]):
        if info.converged[e]:
            assert completeness[e] <= tolerance
            assert info.error_estimate[e] <= tolerance
        else:
            assert info.evaluations[e] == finest and info.error_estimate[e] > tolerance
    if activation != "relu":  # smooth integrands converge well before 257 nodes
        assert bool(info.converged.all())


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_results_converge_to_a_4096_node_reference(activation, device):
    model, x, baseline, target = model_and_batch(activation, seed=3, device=device)
    ig = igfast.IntegratedGradients(model)
    reference = ig.attribute(x, baseline, target=target, n_steps=REFERENCE_STEPS)
    errors, evaluations = [], []
    for tolerance in (1e-1, 1e-2, 1e-3, 1e-4, 1e-6):
        attributions, info = ig.attribute(x, baseline, target=target, n_steps="auto", tolerance=tolerance,
                                          max_steps=1025, return_adaptive_info=True)
        errors.append(relative_errors(attributions, reference))
        evaluations.append((info.evaluations, info.exact))
    for (coarse, coarse_exact), (fine, fine_exact) in zip(evaluations, evaluations[1:]):
        # A tighter tolerance never stops the rule earlier (a ReLU network's examples
        # may switch to the exact walk instead, which can cost less).
        ruled = ~coarse_exact & ~fine_exact
        assert bool((fine[ruled] >= coarse[ruled]).all())
    mean_errors = [float(e.mean()) for e in errors]
    assert mean_errors[-1] < mean_errors[0] / 10
    if activation == "relu":
        # A piecewise-constant integrand: error ~ 1/n; 1025 nodes still beat 1e-2.
        assert mean_errors[-1] < 1e-2
    else:
        assert mean_errors[-1] < 1e-6
        assert bool((errors[-2] < 1e-3).all())  # at tolerance 1e-4 every example


@pytest.mark.parametrize("activation", ["tanh", "gelu", "softplus", "silu", "sharp_softplus"])
def test_smooth_examples_reported_converged_are_within_tolerance_from_the_lower_start(activation, monkeypatch):
    """Smooth networks start from 3 and 5 nodes and estimate from the convergence ratio;
    every example reported converged is within its tolerance of a 4096-node reference
    (converged to rounding here). softplus(beta=50) is nearly a ReLU: unresolved, its
    changes fall slowly, where extrapolating them would understate the error."""
    monkeypatch.setitem(ACTIVATIONS, "silu", nn.SiLU)
    monkeypatch.setitem(ACTIVATIONS, "sharp_softplus", lambda: nn.Softplus(beta=50))
    for seed in range(3):
        model, x, baseline, target = model_and_batch(activation, seed=seed, batch=16)
        ig = igfast.IntegratedGradients(model)
        reference = ig.attribute(x, baseline, target=target, n_steps=REFERENCE_STEPS)
        for tolerance in (1e-1, 1e-2, 1e-3, 1e-4, 1e-6):
            attributions, info = ig.attribute(x, baseline, target=target, n_steps="auto", tolerance=tolerance,
                                              max_steps=1025, return_adaptive_info=True)
            errors = relative_errors(attributions, reference)
            assert info.exact_unavailable.startswith("the network applies no piecewise-linear op")
            assert bool(info.converged.all())
            assert float(errors.max()) <= tolerance, (seed, tolerance, errors.max())
            if tolerance == 1e-1 and activation != "sharp_softplus":  # examples stop after 5 nodes
                assert int(info.evaluations.min()) == SMOOTH_FIRST_ROUND_STEPS


@pytest.mark.parametrize("activation, says", [("elu", "elu is not analytic at 0"), ("selu", "selu's slope jumps at 0")])
def test_non_analytic_activations_are_not_extrapolated(activation, says):
    """ELU's second derivative and SELU's slope jump at 0: their integrands converge
    algebraically, so the smooth start and its extrapolation would understate the error
    (before: 2.6x and 1.5x the tolerance on these models at 1e-3). SELU's jumps get the
    strict estimate of ReLU networks."""
    for seed in range(10):
        model, x, baseline, target = varied_batch({"elu": nn.ELU, "selu": nn.SELU}[activation], seed)
        ig = igfast.IntegratedGradients(model)
        reference = ig.attribute(x, baseline, target=target, n_steps=REFERENCE_STEPS)
        for tolerance in (1e-2, 1e-3):
            attributions, info = ig.attribute(x, baseline, target=target, n_steps="auto", tolerance=tolerance,
                                              max_steps=1025, return_adaptive_info=True)
            assert says in info.exact_unavailable
            errors = relative_errors(attributions, reference)[info.converged]
            assert float(errors.max()) <= tolerance, (seed, tolerance, errors.max())


class TinyAttention(nn.Module):
    """Self-attention through F.scaled_dot_product_attention, whose fused kernels have
    no forward-mode derivative: the probe must compute it by parts."""

    def __init__(self, width=8):
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.head = nn.Linear(width, 3)

    def forward(self, x):  # (B, tokens, width)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        mixed = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(nn.functional.gelu(mixed).mean(1))


def test_attention_is_probed_as_smooth():
    torch.manual_seed(4)
    model = TinyAttention().double().eval()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    ig = igfast.IntegratedGradients(model)
    reference = ig.attribute(x, target=1, n_steps=REFERENCE_STEPS)
    attributions, info = ig.attribute(x, target=1, n_steps="auto", tolerance=1e-6, return_adaptive_info=True)
    assert "it is smooth along it (first smooth op: scaled_dot_product_attention)" in info.exact_unavailable
    assert bool(info.converged.all()) and float(relative_errors(attributions, reference).max()) <= 1e-6


def test_examples_that_converge_early_use_fewer_evaluations_and_no_more_model_rows():
    model, x, baseline, target = model_and_batch("tanh", batch=4)
    x[0] = baseline[0] + 1e-3 * torch.randn(6, dtype=torch.float64)  # an almost straight path
    x[3] = baseline[0] + 6 * torch.randn(6, dtype=torch.float64)  # a long, curved one
    rows = []

    def forward(inputs):
        rows.append(inputs.shape[0])
        return model(inputs)

    _, info = igfast.IntegratedGradients(forward).attribute(
        x, baseline, target=target, n_steps="auto", tolerance=1e-8, return_adaptive_info=True)
    # A smooth network starts from the 3- and 5-node levels; example 0 also holds the
    # one probing forward that found the network smooth.
    assert info.evaluations[0] == SMOOTH_FIRST_ROUND_STEPS + 1 < info.evaluations[3]
    assert "no piecewise-linear op" in info.exact_unavailable
    assert bool(info.converged.all())
    # Each path point of each example is evaluated once: the model saw exactly
    # sum(evaluations) rows, and rounds shrank to the examples still refining.
    assert sum(rows) == int(info.evaluations.sum())


@pytest.mark.parametrize("internal_batch_size", [1, 7, 64])
def test_chunking_changes_nothing(internal_batch_size, device):
    model, x, baseline, target = model_and_batch("gelu", device=device)
    ig = igfast.IntegratedGradients(model)
    kwargs = dict(target=target, n_steps="auto", tolerance=1e-5, return_adaptive_info=True)
    expected, expected_info = ig.attribute(x, baseline, **kwargs)
    ours, info = ig.attribute(x, baseline, internal_batch_size=internal_batch_size, **kwargs)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-14)
    assert torch.equal(info.evaluations, expected_info.evaluations)
    budgeted, _ = ig.attribute(x, baseline, memory_budget="2MB", **kwargs)
    torch.testing.assert_close(budgeted, expected, rtol=1e-12, atol=1e-14)


def test_each_example_gets_what_it_would_get_alone():
    """Per-example refinement: the batch result is every example's own result (targets,
    per-example baselines and additional arguments are subset correctly each round)."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = MLP(num_in=6, hidden=16, num_out=4, activation=nn.Softplus).double()

        def forward(self, x, scale, offset):
            return self.inner(x * scale[:, None]) + offset

    torch.manual_seed(5)
    model = Scaled().eval()
    x = torch.randn(5, 6, dtype=torch.float64) * torch.tensor([0.01, 1, 3, 0.1, 5.0], dtype=torch.float64)[:, None]
    baselines = 0.1 * torch.randn(5, 6, dtype=torch.float64)
    scale = torch.rand(5, dtype=torch.float64) + 0.5
    target = [0, 1, 2, 3, 1]
    ig = igfast.IntegratedGradients(model)
    kwargs = dict(n_steps="auto", tolerance=1e-6, return_adaptive_info=True)
    batch, info = ig.attribute(x, baselines, target=target, additional_forward_args=(scale, 0.5), **kwargs)
    assert len(set(info.evaluations.tolist())) > 1
    for e in range(5):
        alone, alone_info = ig.attribute(x[e:e + 1], baselines[e:e + 1], target=target[e],
                                         additional_forward_args=(scale[e:e + 1], 0.5), **kwargs)
        torch.testing.assert_close(batch[e:e + 1], alone, rtol=1e-12, atol=1e-15)
        # Up to the one row a call spends to find that the network cannot be walked
        # exactly (on its first unconverged example; see test_a_smooth_network_...).
        assert abs(int(alone_info.evaluations[0]) - int(info.evaluations[e])) <= 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_input_is_returned_unconverged_not_a_crash(bad):
    """A NaN or inf in one example: its estimate is NaN, and the exact switch's predicted
    cost indexed past the last level (IndexError); fixed rules return NaN, as Captum."""
    model, x, baseline, target = model_and_batch("relu", seed=0, batch=4)
    x[1, 2] = bad
    reference = igfast.IntegratedGradients(model).attribute(x, baseline, target=target, method="exact")
    with pytest.warns(igfast.ToleranceNotReachedWarning):
        ours = igfast.IntegratedGradients(model).attribute(x, baseline, target=target, n_steps="auto")
    _, info = igfast.IntegratedGradients(model).attribute(x, baseline, target=target, n_steps="auto",
                                                          return_adaptive_info=True)
    assert not bool(torch.isfinite(ours[1]).all()) and not bool(info.converged[1])
    finite = torch.tensor([0, 2, 3])
    assert bool(info.converged[finite].all())
    assert float(relative_errors(ours[finite], reference[finite]).max()) <= 1e-3


def test_max_steps_is_reported_when_reached():
    model, x, baseline, target = model_and_batch("relu")
    _, info = igfast.IntegratedGradients(model).attribute(
        x, baseline, target=target, n_steps="auto", tolerance=1e-9, max_steps=20, return_adaptive_info=True)
    # 17 nodes, and the one forward that found the exact walk too long for what is left.
    assert (info.evaluations == 17 + 1).all() and not info.converged.any() and not info.exact.any()
    assert bool((info.error_estimate > 1e-9).all())


def test_float32_agrees_with_float64():
    model, x, baseline, target = model_and_batch("gelu")
    ig64 = igfast.IntegratedGradients(model)
    ig32 = igfast.IntegratedGradients(MLP(num_in=6, hidden=32, num_out=4, activation=nn.GELU).eval())
    ig32.forward_func.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    kwargs = dict(target=target, n_steps="auto", tolerance=1e-3, max_steps=65)
    expected = ig64.attribute(x, baseline, **kwargs)
    ours = ig32.attribute(x.float(), baseline.float(), **kwargs)
    assert ours.dtype == torch.float32
    assert float(relative_errors(ours.double(), expected).max()) < 1e-5


# --- switching to method="exact" -----------------------------------------------------

def counting(model):
    """model, and a list that gets the row count of every call."""
    rows = []

    def forward(inputs):
        rows.append(inputs.shape[0])
        return model(inputs)

    return forward, rows


def test_relu_examples_switch_to_exact_when_it_is_cheaper_and_get_its_result():
    model, x, baseline, target = model_and_batch("relu")
    x[0] = baseline[0] + 1e-4 * torch.randn(6, dtype=torch.float64)  # converges in round 0
    forward, rows = counting(model)
    ig = igfast.IntegratedGradients(forward)
    expected, exact_info = ig.attribute(x, baseline, target=target, method="exact", return_adaptive_info=True)
    rows.clear()
    ours, delta, info = ig.attribute(x, baseline, target=target, n_steps="auto", tolerance=1e-7,
                                     max_steps=1025, return_convergence_delta=True, return_adaptive_info=True)
    # A 1e-7 rule would need ~1e6 nodes on this piecewise-constant integrand: every
    # unconverged example switches after round 0 (9 nodes, then one probing forward).
    assert not info.exact[0] and info.exact[1:].all() and info.exact_unavailable is None
    assert bool(info.converged.all())
    torch.testing.assert_close(ours[1:], expected[1:], rtol=1e-12, atol=1e-15)
    assert float(relative_errors(ours[:1], expected[:1])) < 1e-7  # the rule's, within tolerance
    assert torch.equal(info.evaluations[1:], FIRST_ROUND_STEPS + 1 + exact_info.evaluations[1:])
    assert sum(rows) == int(info.evaluations.sum())  # every model row is counted once
    # The estimate of an exact example is its measured completeness error.
    torch.testing.assert_close(info.error_estimate[1:], info.completeness_error[1:], rtol=0, atol=0)
    assert bool((info.error_estimate <= 1e-7).all())
    difference, _ = scale_of(model, x, baseline, target)
    torch.testing.assert_close(delta[1:], ours[1:].sum(1) - difference[1:], rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 3, 5])
def test_relu_examples_reported_converged_are_within_tolerance_of_exact_ig(seed):
    """The guarantee, against exact IG (not a quadrature reference, itself off by about
    1e-4 on a ReLU network): at loose tolerances the rule stops after a few nodes, where
    the change between levels alone understated the error by up to 1.7x (seeds 3, 5)."""
    model, x, baseline, target = model_and_batch("relu", seed=seed, batch=16)
    ig = igfast.IntegratedGradients(model)
    reference = ig.attribute(x, baseline, target=target, method="exact")
    for tolerance in (1e-1, 3e-2, 1e-2, 1e-3):
        attributions, info = ig.attribute(x, baseline, target=target, n_steps="auto", tolerance=tolerance,
                                          return_adaptive_info=True)
        errors = relative_errors(attributions, reference)
        assert bool(info.converged.all())
        assert float(errors.max()) <= tolerance, (tolerance, errors.max())


def test_the_rule_is_kept_where_refining_it_is_cheaper():
    # A wide ReLU MLP has hundreds of pieces per path; at tolerance 5e-2 a few dozen
    # nodes do, so no example switches (a probe still measured the walk).
    torch.manual_seed(0)
    model = MLP(num_in=6, hidden=1024, num_out=4).double().eval()
    x = 3 * torch.randn(4, 6, dtype=torch.float64)
    _, info = igfast.IntegratedGradients(model).attribute(
        x, torch.zeros(1, 6, dtype=torch.float64), target=0, n_steps="auto", tolerance=5e-2,
        return_adaptive_info=True)
    assert not info.exact.any() and info.exact_unavailable is None
    assert bool(info.converged.all())


def test_a_smooth_network_cannot_switch_and_pays_one_row_to_find_out():
    model, x, baseline, target = model_and_batch("gelu")
    forward, rows = counting(model)
    _, info = igfast.IntegratedGradients(forward).attribute(
        x, baseline, target=target, n_steps="auto", tolerance=1e-9, return_adaptive_info=True)
    assert not info.exact.any() and "no piecewise-linear op" in info.exact_unavailable
    assert sum(rows) == int(info.evaluations.sum())
    # Levels have 9, 17, 33, ... nodes: one example holds the probe's extra row.
    assert int((info.evaluations - FIRST_ROUND_STEPS).remainder(2).sum()) == 1


def test_a_smooth_head_switches_with_its_gauss_estimate():
    """Switched examples get the head's 3 Gauss nodes per piece; those whose estimate is
    above tolerance are integrated again, the head refined to it (they kept the midpoint
    rule's estimate, far above their true error, and were reported unconverged)."""
    torch.manual_seed(2)
    body = MLP(num_in=6, hidden=16, num_out=4).double().eval()
    model = nn.Sequential(body, nn.Softmax(dim=1)).eval()
    x = 2 * torch.randn(5, 6, dtype=torch.float64)
    baseline = torch.zeros(1, 6, dtype=torch.float64)
    ig = igfast.IntegratedGradients(model)
    reference = ig.attribute(x, baseline, target=1, method="exact", tolerance=1e-12)
    three_nodes, three_info = ig.attribute(x, baseline, target=1, method="exact", return_adaptive_info=True)
    head = three_info.head_error_estimate.double()
    for tolerance in (1e-4, 1e-6):
        refined, refined_info = ig.attribute(x, baseline, target=1, method="exact", tolerance=tolerance,
                                             return_adaptive_info=True)
        ours, info = ig.attribute(x, baseline, target=1, n_steps="auto", tolerance=tolerance, max_steps=1025,
                                  return_adaptive_info=True)
        assert info.exact.all() and bool(info.converged.all())
        coarse = head > tolerance
        assert bool(coarse.any()) == (tolerance == 1e-6)
        torch.testing.assert_close(ours[~coarse], three_nodes[~coarse], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(ours[coarse], refined[coarse], rtol=1e-10, atol=1e-15)
        estimate = torch.where(coarse, refined_info.head_error_estimate.double(), head)
        torch.testing.assert_close(info.error_estimate, torch.maximum(estimate, info.completeness_error),
                                   rtol=1e-6, atol=0)
        assert float(relative_errors(ours, reference).max()) <= tolerance


def test_a_mixed_network_switches_to_gauss_nodes_on_pieces_refined_to_tolerance(monkeypatch):
    """Smooth ops before kinks (tanh, then ReLUs): method="exact" cannot walk the network,
    but where the rule would need thousands of nodes auto walks the pieces as
    method="gausslegendre_pieces" does and integrates them by adaptive Gauss quadrature
    (a Gauss pair per piece, bisected where the error is). Checked against an
    independent partition of the path with 16 Gauss nodes per piece: the estimate stays
    above the error, and an example the refinements could not bring within tolerance is
    reported unconverged. (Below about 1e-12 the kinks' positions, located to 1e-10 in
    t, limit both results.)"""
    torch.manual_seed(0)
    model = tanh_then_relu().double().eval()
    generator = torch.Generator().manual_seed(1)
    x = 2 * torch.randn(4, 6, generator=generator, dtype=torch.float64)
    baseline = 0.3 * torch.randn(4, 6, generator=generator, dtype=torch.float64)
    expected, pieces = oracle(model, x, baseline, 1, nodes_per_piece=16)
    assert bool((pieces >= 5).all()), "the workload must have kinks"
    forward, rows = counting(model)
    ig = igfast.IntegratedGradients(forward)
    evaluations = []
    for tolerance in (1e-6, 1e-8, 1e-10):
        rows.clear()
        ours, delta, info = ig.attribute(x, baseline, target=1, n_steps="auto", tolerance=tolerance, max_steps=1025,
                                         return_convergence_delta=True, return_adaptive_info=True)
        assert info.exact.all() and info.exact_unavailable is None
        errors = relative_errors(ours, expected)
        assert bool((errors <= info.error_estimate.double()).all()), (tolerance, errors, info.error_estimate)
        assert bool((errors[info.converged] <= tolerance).all())
        assert torch.equal(info.converged, info.error_estimate.double() <= tolerance)
        assert sum(rows) == int(info.evaluations.sum())  # the probe that exact refused included
        difference, _ = scale_of(model, x, baseline, torch.ones(4, dtype=torch.long))
        torch.testing.assert_close(delta, ours.sum(1) - difference, rtol=0, atol=1e-12)
        evaluations.append(info.evaluations)
    assert bool(info.converged.all())
    # A tighter tolerance bisects more: more evaluations, never fewer.
    for looser, tighter in zip(evaluations, evaluations[1:]):
        assert bool((tighter >= looser).all())
    assert bool((evaluations[-1] > evaluations[0]).all())
    # Without bisections the Gauss pairs do not reach 1e-10: those examples are reported.
    monkeypatch.setattr(igfast.exact, "MAX_REFINEMENTS", 0)
    ours, info = ig.attribute(x, baseline, target=1, n_steps="auto", tolerance=1e-10, max_steps=1025,
                              return_adaptive_info=True)
    assert info.exact.all() and not info.converged.all()
    assert torch.equal(info.converged, info.error_estimate.double() <= 1e-10)
    assert bool((relative_errors(ours, expected) <= info.error_estimate.double()).all())


def test_a_mixed_network_keeps_the_rule_at_loose_tolerances(monkeypatch):
    """Where the rule is cheaper than walking the pieces, it stays: here at 5e-2 (9 to 66
    evaluations; the walk costs 77 or more), with the paths of a few pieces, which are
    walked at once, left out (see the next test)."""
    monkeypatch.setattr(igfast.adaptive, "FEW_PIECES", 1)
    torch.manual_seed(0)
    model = tanh_then_relu().double().eval()
    x = 2 * torch.randn(4, 6, dtype=torch.float64)
    _, info = igfast.IntegratedGradients(model).attribute(
        x, torch.zeros(1, 6, dtype=torch.float64), target=1, n_steps="auto", tolerance=5e-2,
        return_adaptive_info=True)
    assert not info.exact.any() and info.exact_unavailable is None and bool(info.converged.all())


def test_a_mixed_path_of_a_few_pieces_is_walked_at_once(monkeypatch):
    """On a mixed network a path the probe predicts at most FEW_PIECES pieces for is walked
    from round 0 on, whatever the rule says: nested levels can miss the same jump (net
    5072 of the mixed sweep: a path of 6 pieces converged at 513 nodes 1.26x its
    tolerance 1e-3 off), and the walk of a few pieces costs fewer evaluations than the
    rule's levels (here 38 to 93 against 130 to 259)."""
    torch.manual_seed(0)
    model = tanh_then_relu().double().eval()
    x = 2 * torch.randn(4, 6, dtype=torch.float64)
    baseline = torch.zeros(4, 6, dtype=torch.float64)
    ig = igfast.IntegratedGradients(model)
    reference, pieces = oracle(model, x, baseline, 1, nodes_per_piece=16)
    assert bool(((pieces >= 2) & (pieces <= igfast.adaptive.FEW_PIECES)).all())
    ours, info = ig.attribute(x, baseline, target=1, n_steps="auto", tolerance=1e-2, return_adaptive_info=True)
    assert bool(info.exact.all()) and bool(info.converged.all())
    assert float(relative_errors(ours, reference).max()) <= 1e-2
    with monkeypatch.context() as patch:
        keep_the_switch_out(patch)
        _, by_rule = ig.attribute(x, baseline, target=1, n_steps="auto", tolerance=1e-2, return_adaptive_info=True)
    assert not by_rule.exact.any()
    assert bool((info.evaluations < by_rule.evaluations).all()), (info.evaluations, by_rule.evaluations)

    model, x, baseline, target, _ = mixed_sweep_network(5072)
    ig = igfast.IntegratedGradients(model)
    reference = converged_pieces_reference(ig, x, baseline, target, monkeypatch)
    ours, info = ig.attribute(x, baseline, target=target, n_steps="auto", tolerance=1e-3, max_steps=4097,
                              return_adaptive_info=True)
    assert bool(info.exact[5])
    assert float(relative_errors(ours, reference)[info.converged].max()) <= 1e-3


@pytest.mark.parametrize("layer", [False, True])
def test_a_switched_mixed_example_gets_gausslegendre_pieces_with_that_tolerance(layer):
    torch.manual_seed(3)
    model = tanh_then_relu().double().eval()
    x = 2 * torch.randn(3, 6, dtype=torch.float64)
    baseline = torch.zeros(1, 6, dtype=torch.float64)
    explainer = (igfast.LayerIntegratedGradients(model, model[0]) if layer  # the tanh's input: tanh, then kinks
                 else igfast.IntegratedGradients(model))
    expected = explainer.attribute(x, baseline, target=2, method="gausslegendre_pieces", n_steps=1, tolerance=1e-7)
    ours, info = explainer.attribute(x, baseline, target=2, n_steps="auto", tolerance=1e-7, max_steps=1025,
                                     return_adaptive_info=True)
    assert info.exact.all() and info.converged.all()
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-13)


def test_a_compiled_model_keeps_the_rule_and_says_why():
    model, x, baseline, target = model_and_batch("relu")
    compiled = torch.compile(model, backend="eager")
    _, info = igfast.IntegratedGradients(compiled).attribute(
        x, baseline, target=target, n_steps="auto", tolerance=1e-3, max_steps=65, return_adaptive_info=True)
    assert not info.exact.any() and "torch.compile" in info.exact_unavailable


class _OpaqueReLU(torch.autograd.Function):
    """A ReLU the probe cannot read (no forward-mode derivative)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x > 0)


class _OpaqueReLUModule(nn.Module):
    def forward(self, x):
        return _OpaqueReLU.apply(x)


@pytest.mark.parametrize("wrap", ["autograd_function", "compiled"])
def test_a_network_the_probe_cannot_read_gets_the_strict_estimate(wrap):
    """A ReLU network behind an autograd Function (or torch.compile) cannot be walked, yet
    its integrand jumps as any ReLU network's: its estimate is the strict one, with a floor
    that does not compound (see the next test). Before, the plain change let converged
    examples reach 4.2x their tolerance at 1e-2, then 1.43x; judged as a mixed network's
    where its changes fall as 1/n (adaptive.UNREAD_JUMPS_FACTOR), none here."""
    for seed in range(8):
        if wrap == "compiled" and seed % 4:  # compiling is slow: two of the models
            continue
        plain, x, baseline, target = varied_batch(nn.ReLU, seed, spread=2.0)
        if wrap == "compiled":
            model = torch.compile(plain, backend="eager")
        else:  # the same weights behind an autograd Function
            model = varied_batch(_OpaqueReLUModule, seed, spread=2.0)[0]
        exact = igfast.IntegratedGradients(plain).attribute(x, baseline, target=target, method="exact")
        for tolerance in (1e-2, 1e-3):
            attributions, info = igfast.IntegratedGradients(model).attribute(
                x, baseline, target=target, n_steps="auto", tolerance=tolerance, max_steps=2049,
                return_adaptive_info=True)
            assert not info.exact.any()
            errors = relative_errors(attributions, exact)[info.converged]
            assert float(errors.max()) <= tolerance, (seed, tolerance, errors.max() / tolerance)


def _opaque(function):
    """``function`` behind an autograd Function: the probe cannot read it (no tangents),
    the backward pass is its own."""

    class Opaque(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return function(x)

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                return torch.autograd.grad(function(x), x, grad)[0]

    return Opaque.apply


UNREAD_OPS = {
    # (The walk reads cummax and median since they were written; hidden here, as they were then.)
    "cummax": _opaque(lambda h: torch.cummax(h, 1).values),
    "median": _opaque(lambda h: h.view(-1, 4, 4).median(dim=2).values.repeat(1, 4)),
    "selu": torch.nn.functional.selu,
    "elu2": lambda h: torch.nn.functional.elu(h, 2.0),
    "hidden_relu": _OpaqueReLU.apply,
}


def dense_path_reference(forward, x, panels=25000, nodes_per_panel=4):
    """IG from zero by a composite Gauss-Legendre rule of 100000 nodes (its error on these
    jumping integrands: about 1e-5 relative)."""
    nodes, weights = np.polynomial.legendre.leggauss(nodes_per_panel)
    t = torch.tensor(((np.arange(panels)[:, None] + (nodes[None] + 1) / 2) / panels).reshape(-1))
    w = torch.tensor(np.tile(weights / (2 * panels), panels))
    result = torch.zeros_like(x)
    for row in range(x.shape[0]):
        points = (t[:, None] * x[row:row + 1]).requires_grad_(True)
        (grad,) = torch.autograd.grad(forward(points)[:, 0].sum(), points)
        result[row] = (grad * w[:, None]).sum(0) * x[row]
    return result


@pytest.mark.parametrize("op, seed, tolerance", [("median", 12, 1e-2), ("cummax", 12, 1e-3), ("selu", 4, 3e-3),
                                                 ("elu2", 6, 1e-2), ("hidden_relu", 6, 1e-2)])
def test_an_integrand_that_jumps_unread_is_judged_as_one_where_its_changes_fall_slowly(monkeypatch, op, seed,
                                                                                      tolerance):
    """Ops the probe cannot read (cummax, median, a ReLU in an autograd Function) or whose
    slope jumps (SELU, ELU with alpha 2): beyond 33 nodes the plain change let these
    examples converge 1.38x, 1.45x, 1.04x, 1.12x and 1.36x their tolerance off (a
    helper's report; adaptive.UNREAD_JUMPS_FACTOR). Judged as a mixed network's where the
    changes fall as 1/n, none."""
    torch.manual_seed(seed)
    x = 2 * torch.randn(6, 8, dtype=torch.float64)
    first, second = nn.Linear(8, 16).double(), nn.Linear(16, 4).double()

    def forward(inputs):
        return second(UNREAD_OPS[op](first(inputs)))

    reference = dense_path_reference(forward, x)

    def worst_converged():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", igfast.ToleranceNotReachedWarning)
            ours, info = igfast.IntegratedGradients(forward).attribute(
                x, target=0, n_steps="auto", tolerance=tolerance, max_steps=4097, return_adaptive_info=True)
        assert info.exact_unavailable is not None and bool(info.converged.any())
        return float(relative_errors(ours, reference)[info.converged].max()) / tolerance

    assert worst_converged() <= 1.0
    monkeypatch.setattr(igfast.adaptive, "UNREAD_JUMPS_FACTOR", 1.0)
    assert worst_converged() > 1.0


@pytest.mark.parametrize("seed, tolerance", [(0, 1e-2), (1, 3e-3), (10, 3e-2)])
def test_a_mixed_network_gets_the_strict_estimate(seed, tolerance):
    """Tanh, then ReLU: the integrand jumps at the ReLU's kinks, so nested levels can agree
    by chance. With the plain change these cases reported examples converged at 1.20x,
    2.01x and 1.45x their tolerance; with the estimate of mixed networks (see
    adaptive.MIXED_ASYMPTOTIC_STEPS) at most 0.43x here. (At the default max_steps of 257
    that estimate leaves seed 1's examples unconverged at 3e-3.)"""
    model, x, baseline, target = varied_batch(nn.ReLU, seed)
    model.net[1] = nn.Tanh()
    explainer = igfast.IntegratedGradients(model)
    reference = explainer.attribute(x, baseline, target=target, method="gausslegendre_pieces", n_steps=512)
    attributions, info = explainer.attribute(x, baseline, target=target, n_steps="auto", tolerance=tolerance,
                                             max_steps=4097, return_adaptive_info=True)
    assert bool(info.converged.any())
    errors = relative_errors(attributions, reference)[info.converged]
    assert float(errors.max()) <= tolerance, (errors.max() / tolerance)


def test_a_compiled_smooth_model_still_converges_in_few_evaluations():
    """No probe reads a compiled model, so its estimate is strict; a floor that compounded
    (as on walkable ReLU networks) held this GELU MLP's estimate up for many levels: 157
    evaluations and not converged at 1e-4, where the plain change needs 17."""
    torch.manual_seed(0)
    model = MLP(num_in=8, hidden=64, num_out=4, activation=nn.GELU).double().eval()
    generator = torch.Generator().manual_seed(1)
    x = 3 * torch.randn(16, 8, generator=generator, dtype=torch.float64)
    baseline = torch.zeros(1, 8, dtype=torch.float64)
    target = torch.randint(0, 4, (16,), generator=generator)
    reference = igfast.IntegratedGradients(model).attribute(x, baseline, target=target, n_steps=REFERENCE_STEPS)
    attributions, info = igfast.IntegratedGradients(torch.compile(model, backend="eager")).attribute(
        x, baseline, target=target, n_steps="auto", tolerance=1e-4, return_adaptive_info=True)
    assert bool(info.converged.all()) and float(info.evaluations.double().mean()) <= 40
    assert float(relative_errors(attributions, reference).max()) <= 1e-4


def test_layer_auto_switches_to_layer_exact():
    model, x, baseline, target = model_and_batch("relu")
    layer = igfast.LayerIntegratedGradients(model, model.net[1])  # the first ReLU's input, on its output side
    expected = layer.attribute(x, baseline, target=target, method="exact")
    ours, info = layer.attribute(x, baseline, target=target, n_steps="auto", tolerance=1e-8, max_steps=1025,
                                 return_adaptive_info=True)
    assert info.exact.all() and info.converged.all()
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-15)


# --- LayerIntegratedGradients and NoiseTunnel ----------------------------------------

def test_layer_auto_on_an_identity_layer_equals_input_auto():
    model, x, baseline, target = model_and_batch("softplus")
    wrapped = nn.Sequential(nn.Identity(), model).eval()
    kwargs = dict(target=target, n_steps="auto", tolerance=1e-5, return_convergence_delta=True,
                  return_adaptive_info=True)
    expected, expected_delta, expected_info = igfast.IntegratedGradients(model).attribute(x, baseline, **kwargs)
    ours, delta, info = igfast.LayerIntegratedGradients(wrapped, wrapped[0]).attribute(x, baseline, **kwargs)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(delta, expected_delta, rtol=1e-9, atol=1e-12)
    assert torch.equal(info.evaluations, expected_info.evaluations)


def test_layer_auto_on_token_embeddings_converges_and_reuses_evaluations(device):
    torch.manual_seed(0)
    model = TokenClassifier().double().eval().to(device)
    ids, mask = on(device, token_batch(1, batch=4))
    forward, calls = counted(model)
    layer = igfast.LayerIntegratedGradients(forward, model.words)
    kwargs = dict(baselines=torch.zeros_like(ids), target=[0, 1, 2, 0], additional_forward_args=mask)
    reference = layer.attribute(ids, n_steps=REFERENCE_STEPS, **kwargs)
    calls[0] = 0
    ours, delta, info = layer.attribute(ids, n_steps="auto", tolerance=1e-6, return_convergence_delta=True,
                                        return_adaptive_info=True, **kwargs)
    assert bool(info.converged.all())
    assert float(relative_errors(ours, reference).max()) < 1e-6
    # One call per end, one per round, and the one that found the network cannot be
    # walked exactly (tanh before the end; see test_a_smooth_network_...).
    assert info.exact_unavailable is not None and not info.exact.any()
    assert calls[0] == 2 + len(layer.last_integral.rounds) + 1
    assert bool((delta.abs() <= 1e-6 * 10).all())


def test_noise_tunnel_over_auto_refines_every_noisy_copy(device):
    model, x, baseline, target = model_and_batch("tanh", device=device)
    ig = igfast.IntegratedGradients(model)
    expected = ig.attribute(x, baseline, target=target, n_steps="auto", tolerance=1e-6)
    smoothed = igfast.NoiseTunnel(ig).attribute(
        x, nt_samples=3, stdevs=0.0, baselines=baseline, target=target, n_steps="auto", tolerance=1e-6)
    torch.testing.assert_close(smoothed, expected, rtol=1e-12, atol=1e-14)
    assert ig.last_integral.info.evaluations.shape == (3 * x.shape[0],)
    with pytest.raises(ArgumentError, match="return_adaptive_info"):
        igfast.NoiseTunnel(ig).attribute(x, nt_samples=2, baselines=baseline, target=target,
                                         n_steps="auto", return_adaptive_info=True)


# --- bad input ------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(n_steps="auto", tolerance=0.0), "`tolerance` must be a number > 0"),
    (dict(n_steps="auto", tolerance=-1e-3), "`tolerance` must be a number > 0"),
    (dict(n_steps="auto", tolerance="small"), "`tolerance` must be a number > 0"),
    (dict(n_steps="auto", max_steps=8), r"`max_steps` must be between 9 \(the first round"),
    (dict(n_steps="auto", max_steps=10 ** 6), "`max_steps` must be between"),
    (dict(n_steps="auto", max_steps=64.0), "`max_steps` must be an integer"),
    (dict(n_steps="auto", method="riemann_trapezoid"), "method='riemann_trapezoid' cannot be refined"),
    (dict(n_steps="fast"), "`n_steps` must be an integer or 'auto'"),
    (dict(n_steps=20, tolerance=1e-3), "`tolerance` applies to n_steps='auto', method='exact' and method='gausslegendre_pieces' only"),
    (dict(n_steps=20, max_steps=65), "`max_steps` applies to n_steps='auto', method='exact'"),
    (dict(n_steps=20, return_adaptive_info=True), "`return_adaptive_info` needs n_steps='auto', method='exact' or method='gausslegendre_pieces'"),
    (dict(n_steps="auto", target=None, targets=[0, 1]), "n_steps='auto' refines one target per example"),
])
@pytest.mark.parametrize("layer", [False, True])
def test_bad_arguments_raise_clear_errors(kwargs, message, layer):
    model, x, baseline, _ = model_and_batch("tanh")
    kwargs = {"target": 0, **kwargs}
    if layer:
        wrapped = nn.Sequential(nn.Identity(), model)
        explainer = igfast.LayerIntegratedGradients(wrapped, wrapped[0])
    else:
        explainer = igfast.IntegratedGradients(model)
    with pytest.raises(ArgumentError, match=message):
        explainer.attribute(x, baseline, **kwargs)


def test_the_switch_charges_the_walks_tangents_to_its_walk_rows_only():
    """A smooth head's Gauss nodes and a mixed network's Gauss pairs are plain rule rows:
    charging them a probe row each (as 2eb24ab did) kept the rule on the softmax-head MLP
    of bench_exact at 1e-3, 1538 evaluations against 483.9 walked."""
    pieces = torch.tensor([100, 7])
    plain, head = PieceEstimate(pieces, None), PieceEstimate(pieces, "softmax")
    curved = PieceEstimate(pieces, None, curved=True)
    assert torch.equal(plain.walk_rows, plain.evaluations) and torch.equal(head.walk_rows, pieces)
    assert torch.equal(head.evaluations, pieces * (1 + GAUSS_NODES_PER_PIECE))
    assert torch.equal(curved.walk_rows, pieces * CURVED_WALK_ROWS_PER_PIECE)
    assert bool((curved.walk_rows < curved.evaluations).all())
    # The last ReLU's parts take plain rows, not walked (a smooth head's, none at all):
    # at least one row is walked per path.
    last_kinks = torch.tensor([60, 9])
    past, past_head = PieceEstimate(pieces, None, plain_pieces=last_kinks), PieceEstimate(
        pieces, "softmax", plain_pieces=last_kinks)
    assert past.walk_rows.tolist() == [40, 1] and torch.equal(past.evaluations, pieces)
    assert torch.equal(past_head.evaluations, pieces * GAUSS_NODES_PER_PIECE + past.walk_rows)
    # One probe of 20 ms over 4 examples (5 ms each); 100 walk rows and 300 Gauss rows at a
    # rule row (1 ms) each, and the walk's tangents at the dearer reading of the probe:
    # 100 probe rows (0.5 s) over 6 rounds (0.12 s), but 60 rounds (1.2 s) over 100 rows.
    one_probe = ProbeClock()
    one_probe.add(4, 2e-2)
    for curved in (False, True):
        assert predicted_walk_seconds(6, 100, 300, 1e-3, one_probe, curved) == pytest.approx(0.5 + 0.4)
        assert predicted_walk_seconds(60, 100, 300, 1e-3, one_probe, curved) == pytest.approx(1.2 + 0.4)


@pytest.mark.parametrize("activation, plain", [(nn.ReLU, True), (nn.Hardtanh, False)])
def test_the_probe_predicts_the_rows_the_walk_reads(activation, plain, monkeypatch):
    """The probe counts the last op's crossings apart: a ReLU network's walk reads with
    tangents only the rows before its last ReLU's kinks (bench's MLP: predicted 3,846 of
    7,399, walked 4,099 of 7,584) and ends a round sooner; one of clamps (whose PyTorch
    gradient at a bound is not the walk's) walks every row."""
    torch.manual_seed(0)
    model = MLP(num_in=6, hidden=32, num_out=4, activation=activation).double().eval()
    x, baseline = 3 * torch.randn(16, 6, dtype=torch.float64), torch.zeros(1, 6, dtype=torch.float64)
    routes, estimates = [], []
    original = igfast.exact.ExactRoute.estimate_pieces

    def capture(route, examples):
        routes.append(route)
        estimates.append(original(route, examples))
        return estimates[-1]

    monkeypatch.setattr(igfast.exact.ExactRoute, "estimate_pieces", capture)
    explainer = igfast.IntegratedGradients(model)
    explainer.attribute(x, baseline, target=1, n_steps="auto", tolerance=1e-9, max_steps=65)  # probes every example
    walked = count_walked_rows(monkeypatch)
    _, info = explainer.attribute(x, baseline, target=1, method="exact", return_adaptive_info=True)
    predicted_walk = sum(int(e.walk_rows.sum()) for e in estimates)
    predicted_pieces = sum(int(e.pieces.sum()) for e in estimates)
    assert sum(int(e.evaluations.sum()) for e in estimates) == predicted_pieces
    if plain:
        assert predicted_walk < 0.8 * predicted_pieces and abs(predicted_walk - sum(walked)) <= 0.3 * sum(walked)
        assert routes[-1].walk_rounds(int(info.pieces.max())) == info.walk_rounds == routes[-1].kink_ops + 1 == 3
    else:
        assert predicted_walk == predicted_pieces and sum(walked) == int(info.pieces.sum()) + 4  # (+ layout check)
        assert routes[-1].walk_rounds(int(info.pieces.max())) == routes[-1].kink_ops + 2  # (two per clamp)


def test_two_probes_tell_a_walk_rounds_latency_from_its_rows_cost():
    """One probe's time per example charged every walk row a share of the probe's latency:
    on bench_exact's MLP at 3e-3 (probes of about 1.5 ms over 15 and 48 examples, 7400
    walk rows in 4 rounds) 0.25 to 0.30 s predicted for a walk of 65 to 77 ms, and the
    rule ran (110 ms)."""
    clock = ProbeClock()
    examples = torch.arange(64)
    first = clock.groups(examples[:1], first=True)
    assert [g.tolist() for g in first] == [[0], []]  # one example: a network that cannot be walked costs one row
    split = clock.groups(examples[1:], first=False)  # the next probe is split, a quarter first
    assert [g.numel() for g in split] == [15, 48] and torch.equal(torch.cat(split), examples[1:])
    assert clock.latency_and_row_cost(0.0) is None and clock.largest() == (0, 0.0)
    clock.add(1, 0.5, first=True)  # the first probe also paid the call's setup
    assert clock.largest() == (1, 0.5)  # counted only while it is the only one
    clock.add(4, 12e-3)
    clock.add(16, 18e-3)
    assert [g.numel() for g in clock.groups(examples[:20], first=False)] == [20]  # timed: not split again
    assert clock.latency_and_row_cost(1e-4) == pytest.approx((10e-3, 0.5e-3))
    # method="exact": each of 6 rounds pays the latency twice (a forward with tangents, then a
    # backward); 100 walk rows their tangents (0.5 ms) and a rule row (1 ms); 300 Gauss rows a
    # rule row. A curved walk's rounds are forwards.
    assert predicted_walk_seconds(6, 100, 300, 1e-3, clock, False) == pytest.approx(0.12 + 0.05 + 0.4)
    assert predicted_walk_seconds(6, 100, 300, 1e-3, clock, True) == pytest.approx(0.06 + 0.05 + 0.4)
    # Rows cheaper than the probes' noise: the larger probe took less. A row's tangents cost
    # at least half a rule row, and the latency is what is left of the smaller probe.
    noisy = ProbeClock()
    noisy.add(15, 1.9e-3)
    noisy.add(48, 1.5e-3)
    latency, row_cost = noisy.latency_and_row_cost(3e-6)
    assert row_cost == 3e-6 and latency == pytest.approx(1.9e-3 - 15 * 3e-6)
    # Probes too close in size (less than ProbeClock.SPAN apart) read nothing.
    close = ProbeClock()
    close.add(10, 1e-3)
    close.add(16, 2e-3)
    assert close.latency_and_row_cost(0.0) is None


def test_a_call_that_paid_the_process_setup_judges_the_rule_from_a_warm_round(monkeypatch):
    """Round 0 of a process's first call also pays its setup: on igfast bench's CNN
    (batch 2, 1e-4) its rows took 40 times a warm row, the rule looked dear, and the
    walk taken then took 22 s where the rule took 8 s. A call whose first probe took
    ProbeClock.COLD_FACTOR times a later one waits for round 1's time."""
    clock = ProbeClock()
    clock.add(1, 1.3e-3, first=True)
    clock.add(15, 1.1e-3)
    assert not clock.cold()
    clock.add(1, 0.26, first=True)
    assert clock.cold()
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)).double()
    x, baseline = torch.randn(12, 6, dtype=torch.float64), torch.randn(12, 6, dtype=torch.float64)
    ig = igfast.IntegratedGradients(model)
    monkeypatch.setattr(igfast.adaptive, "predicted_walk_seconds", lambda *args: 0.0)  # the walk always wins
    runs = {}
    for cold in (False, True):
        monkeypatch.setattr(ProbeClock, "cold", lambda self, cold=cold: cold)
        runs[cold] = ig.attribute(x, baseline, target=1, n_steps="auto", tolerance=1e-3, return_adaptive_info=True)
    (warm, warm_info), (after_setup, cold_info) = runs[False], runs[True]
    assert bool(warm_info.exact.all()) and bool(cold_info.exact.all())
    # Walked after round 1 (8 more nodes each) instead of round 0, to the same result.
    assert torch.equal(cold_info.evaluations, warm_info.evaluations + 8)
    torch.testing.assert_close(after_setup, warm, rtol=1e-9, atol=1e-12)


def test_examples_left_unconverged_warn_unless_the_info_is_asked_for():
    """They came back silently (only AdaptiveInfo.converged said so)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 64), torch.nn.Softplus(beta=100), torch.nn.Linear(64, 3)).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    for explainer in (igfast.IntegratedGradients(model), igfast.LayerIntegratedGradients(model, model[0])):
        with pytest.warns(igfast.ToleranceNotReachedWarning, match=r"5 of 5 examples did not reach tolerance 1e-09"):
            explainer.attribute(x, target=1, n_steps="auto", tolerance=1e-9, max_steps=17)
        with warnings.catch_warnings():
            warnings.simplefilter("error", igfast.ToleranceNotReachedWarning)
            _, info = explainer.attribute(x, target=1, n_steps="auto", tolerance=1e-9, max_steps=17,
                                          return_adaptive_info=True)
            assert not bool(info.converged.any())
            explainer.attribute(x, target=1, n_steps="auto", tolerance=1e-2)  # converges: silent


class _Residual(torch.nn.Module):
    """A branch bypasses the attributed layer: along the layer's path F runs from
    F(layer at the baselines, the rest at the inputs), not from F(baselines)."""

    def __init__(self, activation):
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.outer, self.skip = torch.nn.Linear(6, 16), torch.nn.Linear(16, 3), torch.nn.Linear(6, 3)
        self.activation = activation

    def forward(self, x):
        return self.outer(self.activation(self.inner(x))) + self.skip(self.activation(x))


def test_layer_auto_judges_completeness_at_the_paths_own_start():
    """Judged against F(baselines), the completeness 'error' was 0.46-0.87 whatever
    the rule: every example ran to max_steps and came back unconverged (true error
    2.5e-10)."""
    model = _Residual(torch.tanh).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    explainer = igfast.LayerIntegratedGradients(model, model.inner)
    attributions, info = explainer.attribute(x, target=1, n_steps="auto", tolerance=1e-6, return_adaptive_info=True)
    reference = explainer.attribute(x, target=1, n_steps=512)
    assert bool(info.converged.all()) and int(info.evaluations.max()) <= 33, info.evaluations
    error = (attributions - reference).norm(dim=1) / reference.norm(dim=1)
    assert float(error.max()) < 1e-6


def test_auto_floor_counts_the_fewest_nodes_from_which_every_rule_meets_tol(monkeypatch):
    """benchmarks/bench_auto_floor.py's n_min: a rule that meets tol by chance, with a
    larger one missing it again, does not count; an example that never meets it is -1."""
    import importlib
    import os

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    floor = importlib.import_module("bench_auto_floor")
    errors = {1: torch.tensor([0.5, 0.005, 0.5]), 2: torch.tensor([0.005, 0.5, 0.5]),
              3: torch.tensor([0.005, 0.001, 0.5]), 4: torch.tensor([0.001, 0.002, 0.02])}
    assert floor.fewest_nodes_per_example(errors, 1e-2).tolist() == [2, 3, -1]
    assert floor.fewest_nodes_per_example(errors, 1e-1).tolist() == [2, 3, 4]


def test_auto_floor_piecewise_sweep_and_rows(monkeypatch):
    """bench_auto_floor --piecewise: every n up to 64, then 3% steps to the largest;
    a tolerance that some example misses within the sweep is left out (not a floor
    computed from examples that never got there), and the oracle is the slowest
    example's n_min."""
    import importlib
    import os

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    floor = importlib.import_module("bench_auto_floor")
    sweep = floor.piecewise_sweep(200)
    assert sweep[:64] == list(range(1, 65)) and sweep[-1] <= 200 and sweep[-1] * floor.PIECEWISE_STEP > 195
    assert all(1.0 < b / a <= floor.PIECEWISE_STEP + 0.01 for a, b in zip(sweep[64:], sweep[65:]))
    errors = {4: torch.tensor([0.02, 0.5]), 8: torch.tensor([0.005, 0.02]), 16: torch.tensor([0.001, 0.005])}
    rows = floor.floor_rows("toy", errors, (1e-2, 1e-3), must_reach=False)
    assert len(rows) == 1 and rows[0]["tol"] == 1e-2
    assert rows[0]["oracle_gl_steps"] == 16 and rows[0]["floor_evaluations"] == (9 + 17) / 2
    assert rows[0]["best_ratio"] == 16 / 13
    with pytest.raises(SystemExit):
        floor.floor_rows("toy", errors, (1e-3,), must_reach=True)


def test_auto_floor_leja_rules_integrate_polynomials_and_read_the_integrand(monkeypatch):
    """bench_auto_floor's Leja study: every prefix rule integrates polynomials below its
    node count exactly, and the one-node integrand at 1/2 is the 1-node GL rule, with
    igfast's quadrature table restored afterwards."""
    import importlib
    import os

    from igfast import quadrature

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    floor = importlib.import_module("bench_auto_floor")
    points = floor.leja_points(24)
    assert len(set(points.tolist())) == 24 and points.min() == 0.0 and points.max() == 1.0
    for n in (3, 7, 24):
        weights = floor.interpolatory_weights(points[:n])
        for degree in range(n):
            assert abs(float(weights @ points[:n] ** degree) - 1 / (degree + 1)) < 1e-9, (n, degree)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 2)).double().eval()
    x = torch.randn(3, 5, dtype=torch.float64)
    explainer = igfast.IntegratedGradients(model)
    attribute = lambda **kw: explainer.attribute(x, target=1, **kw)  # noqa: E731
    torch.testing.assert_close(floor.integrand_at(attribute, 0.5), attribute(n_steps=1), rtol=0, atol=0)
    at_a_quarter = floor.integrand_at(attribute, 0.25)
    by_hand = torch.autograd.functional.jacobian(lambda z: model(z)[:, 1].sum(), 0.25 * x) * x
    torch.testing.assert_close(at_a_quarter, by_hand, rtol=1e-12, atol=1e-12)
    assert quadrature.RULES["gausslegendre"].nodes_and_weights is quadrature._gauss_legendre


def test_jump_errors_study_evaluates_auto_s_clenshaw_curtis_levels(monkeypatch):
    """benchmarks/bench_jump_errors.py evaluates each of auto's Clenshaw-Curtis levels
    alone: the rule of n intervals integrates a degree-n integrand exactly (to its
    weights' float32 rounding, as every fixed rule's) and a degree 4n one not; the
    trapezoid rule on the same grid has its known error on t^2; and igfast's
    quadrature table is restored afterwards."""
    import importlib
    import os

    from igfast import quadrature

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    study = importlib.import_module("bench_jump_errors")

    def power_sum(degree):  # F(x) = sum x^(degree+1) / (degree+1): the integrand is t^degree x^(degree+1)
        return lambda z: (z ** (degree + 1)).sum(1, keepdim=True) / (degree + 1)

    x = 0.5 + torch.rand(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for intervals in (8, 16):
        exact = igfast.IntegratedGradients(power_sum(intervals))
        got = study.clenshaw_curtis(lambda **kw: exact.attribute(x, target=0, **kw), intervals)
        torch.testing.assert_close(got, x ** (intervals + 1) / (intervals + 1), rtol=1e-7, atol=0)
        beyond = igfast.IntegratedGradients(power_sum(4 * intervals))
        missed = study.clenshaw_curtis(lambda **kw: beyond.attribute(x, target=0, **kw), intervals)
        truth = x ** (4 * intervals + 1) / (4 * intervals + 1)
        assert float(((missed - truth) / truth).abs().max()) > 1e-5
        # The trapezoid rule of n intervals on t^2: 1/3 + 1/(6 n^2), so F(x) = sum x^3 / 3.
        square = igfast.IntegratedGradients(power_sum(2))
        uniform = study.trapezoid(lambda **kw: square.attribute(x, target=0, **kw), intervals)
        torch.testing.assert_close(uniform, x ** 3 * (1 / 3 + 1 / (6 * intervals**2)), rtol=1e-7, atol=0)
    assert quadrature.RULES["gausslegendre"].nodes_and_weights is quadrature._gauss_legendre


class _Abs(nn.Module):
    def forward(self, x):
        return x.abs()


def _walked_workload(key):
    """Piecewise-linear models whose walks stop short under auto (exact._GapFill): a
    float64 copy of igfast bench's MLP, a LeakyReLU MLP, a conv + max-pool net (whose
    kinks often change no gradient) and hardtanh, abs and ReLU6."""
    from igfast.bench.workloads import WORKLOADS

    if key == "bench_mlp":
        model, x, baseline, _ = WORKLOADS["mlp"].build("cpu", seed=3)
        return model.double().eval(), x[:24].double(), baseline[:24].double()
    torch.manual_seed(7)
    features = 128 if key == "pool" else 32
    model = {
        "leaky": lambda: nn.Sequential(nn.Linear(32, 96), nn.LeakyReLU(0.1), nn.Linear(96, 96), nn.LeakyReLU(0.1),
                                       nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 10)),
        "pool": lambda: nn.Sequential(nn.Unflatten(1, (2, 8, 8)), nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Flatten(), nn.Linear(96, 32), nn.ReLU(), nn.Linear(32, 10)),
        "hard": lambda: nn.Sequential(nn.Linear(32, 64), nn.Hardtanh(), nn.Linear(64, 64), _Abs(), nn.Linear(64, 64),
                                      nn.ReLU6(), nn.Linear(64, 10)),
    }[key]().double().eval()
    generator = torch.Generator().manual_seed(8)
    x = 2 * torch.randn(24, features, generator=generator, dtype=torch.float64)
    return model, x, 0.1 * torch.randn(24, features, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("key", ["bench_mlp", "leaky", "pool", "hard"])
def test_a_walk_stops_short_of_pieces_that_cannot_matter(key, monkeypatch):
    """Auto's walk stops an example once the stretches of its path it has not reached are
    estimated within tolerance (each filled with the mean gradient of the reached pieces
    beside it): examples reported converged are within tolerance of exact IG, and the
    walk costs fewer evaluations than the pieces. (The walk is forced: whether it is
    chosen depends on measured times.)"""
    monkeypatch.setattr(igfast.adaptive, "predicted_walk_seconds", lambda *args: 0.0)
    model, x, baseline = _walked_workload(key)
    with torch.no_grad():
        target = model(x).argmax(1)
    ig = igfast.IntegratedGradients(model)
    reference, exact_info = ig.attribute(x, baseline, target=target, method="exact", return_adaptive_info=True)
    stopped_short = 0
    for tolerance in (1e-2, 1e-3, 1e-4):
        ours, info = ig.attribute(x, baseline, target=target, n_steps="auto", tolerance=tolerance, max_steps=4097,
                                  return_adaptive_info=True)
        assert info.exact_unavailable is None
        errors = relative_errors(ours, reference)
        assert bool(info.converged.all()), (tolerance, info.error_estimate)
        assert float(errors.max()) <= tolerance, (tolerance, errors.max())
        walked = info.exact
        # A walked example's evaluations: the probe, the rule's round 0, and its walk.
        short = info.evaluations[walked] < exact_info.pieces[walked]
        stopped_short += int(short.sum())
        assert bool((info.error_estimate[walked][short] > 0).all())  # its estimate is the fill's, not 0
    assert stopped_short >= 10, stopped_short


def test_a_walk_keeps_every_piece_when_the_gradients_it_would_keep_do_not_fit(monkeypatch):
    """Beyond what _GapFill may keep of the reached gradients, the walk reaches every
    piece: auto's walked examples are exact IG."""
    monkeypatch.setattr(igfast.adaptive, "predicted_walk_seconds", lambda *args: 0.0)
    monkeypatch.setattr(igfast.exact, "GAP_KEPT_BYTES", 1)
    model, x, baseline = _walked_workload("bench_mlp")
    with torch.no_grad():
        target = model(x).argmax(1)
    ig = igfast.IntegratedGradients(model)
    reference = ig.attribute(x, baseline, target=target, method="exact")
    ours, info = ig.attribute(x, baseline, target=target, n_steps="auto", tolerance=1e-3, return_adaptive_info=True)
    assert bool(info.exact.all())
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-14)


def _three_piece_path(orthogonal):
    """A path with kinks at t = 0.86 (a small jump of the gradient) and 0.96 (a large one):
    the walk reaches [0, 0.86] and [0.86, 0.96] first, and the last stretch hides the large
    jump. ``orthogonal``: the large jump is orthogonal to x - x', so completeness cannot see
    it. (Built by a review helper to break the walk's estimate.)"""
    l1, l2, l3 = nn.Linear(2, 3), nn.Linear(3, 4), nn.Linear(4, 1)
    bend = 1.0 if orthogonal else 0.0
    with torch.no_grad():
        l1.weight.copy_(torch.tensor([[.5, .5], [.5, .5], [1., -1.]]))
        l1.bias.copy_(torch.tensor([1., -.86, 10.]))
        l2.weight.copy_(torch.tensor([[1., 0, 0], [0, 1., 0], [0, 10., bend], [0, 10., -bend]]))
        l2.bias.copy_(torch.tensor([0., 1., -1 - 10 * bend, -1 + 10 * bend]))
        l3.weight.copy_(torch.tensor([[1., 0.01, 1., -1. if orthogonal else 0.0]]))
        l3.bias.zero_()
    model = nn.Sequential(l1, nn.ReLU(), l2, nn.ReLU(), l3).double().eval()
    x = torch.ones(4, 2, dtype=torch.float64)
    x[1:] = 0.5 if not orthogonal else 1.0
    return model, x, torch.zeros_like(x)


def test_a_walk_does_not_stop_on_the_jumps_of_a_few_pieces(monkeypatch):
    """An example stops short only once MIN_REACHED_JUMPS jumps between its reached pieces
    tell the size of a typical one: from the one small jump reached, the hidden large jump
    was estimated at nothing and the answer was 15.8x the tolerance off."""
    monkeypatch.setattr(igfast.adaptive, "predicted_walk_seconds", lambda *args: 0.0)
    model, x, baseline = _three_piece_path(orthogonal=True)
    ig = igfast.IntegratedGradients(model)
    reference = ig.attribute(x, baseline, target=0, method="exact")
    for tolerance in (1e-2, 1e-3):
        ours, info = ig.attribute(x, baseline, target=0, n_steps="auto", tolerance=tolerance, max_steps=4097,
                                  return_adaptive_info=True)
        assert bool(info.exact.all()) and bool(info.converged.all())
        assert float(relative_errors(ours, reference).max()) <= tolerance


def test_a_stop_that_completeness_contradicts_is_walked_to_every_piece(monkeypatch):
    """Where an example stopped short misses completeness by more than its estimate allows,
    the estimate is wrong: that example is walked again to every piece. (It used to close
    the walk for the whole call as if a custom Function hid a kink, and the other examples
    went back to the rule.)"""
    monkeypatch.setattr(igfast.adaptive, "predicted_walk_seconds", lambda *args: 0.0)
    monkeypatch.setattr(igfast.exact, "MIN_REACHED_JUMPS", 1)  # let the three-piece path stop short
    model, x, baseline = _three_piece_path(orthogonal=False)
    ig = igfast.IntegratedGradients(model)
    reference, exact_info = ig.attribute(x, baseline, target=0, method="exact", return_adaptive_info=True)
    ours, info = ig.attribute(x, baseline, target=0, n_steps="auto", tolerance=1e-2, max_steps=4097,
                              return_adaptive_info=True)
    assert info.exact_unavailable is None and bool(info.exact[0]) and bool(info.converged.all())
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-12, atol=1e-14)
    assert int(info.evaluations[0]) > int(exact_info.pieces[0]) + 2  # the stopped walk, then the whole walk


class _SweepResidual(nn.Module):
    def __init__(self, features, width, depth, activation):
        super().__init__()
        self.inner = nn.ModuleList(nn.Linear(features, width) for _ in range(depth))
        self.outer = nn.ModuleList(nn.Linear(width, features) for _ in range(depth))
        self.head, self.activation = nn.Linear(features, 10), activation

    def forward(self, x):
        for inner, outer in zip(self.inner, self.outer):
            x = x + outer(self.activation(inner(x)))
        return self.head(x)


def sweep_network(seed):
    """Net ``seed`` of the random sweep that calibrated auto's estimate on networks it can
    walk (see adaptive.PIECEWISE_ASYMPTOTIC_STEPS): a ReLU, LeakyReLU, abs or hardtanh MLP
    or residual net of 2 to 64 features, 8 to 512 units and 2 to 6 layers, in float64,
    with 16 examples whose baselines are zero, near zero, near the inputs or their
    negation. Returns (model, x, baseline, target, description)."""
    import random

    chooser = random.Random(seed)
    torch.manual_seed(seed)
    features, depth = chooser.choice([2, 4, 8, 32, 64]), chooser.choice([2, 3, 4, 6])
    width = chooser.choice([8, 32, 128, 512])
    name = chooser.choice(["relu", "relu", "leaky", "abs", "hard"])
    activation = {"relu": nn.ReLU, "leaky": lambda: nn.LeakyReLU(0.05), "abs": _Abs, "hard": nn.Hardtanh}[name]
    kind, gain = chooser.choice(["mlp", "mlp", "res"]), chooser.choice([1.0, 1.0, 3.0])
    if kind == "mlp":
        layers = [nn.Linear(features, width), activation()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), activation()]
        model = nn.Sequential(*layers, nn.Linear(width, 10))
    else:
        model = _SweepResidual(features, width, depth, activation())
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(gain)
    model = model.double().eval()
    generator = torch.Generator().manual_seed(seed)
    baseline_kind = chooser.choice(["zero", "noise", "close", "far"])
    x = chooser.choice([0.5, 2.0, 10.0]) * torch.randn(16, features, generator=generator, dtype=torch.float64)
    # Both random baselines are drawn, whichever is used, as the sweep did.
    noise = 0.1 * torch.randn(16, features, generator=generator, dtype=torch.float64)
    close = x + 0.05 * torch.randn(16, features, generator=generator, dtype=torch.float64)
    baseline = {"zero": torch.zeros_like(x), "noise": noise, "close": close, "far": -x}[baseline_kind]
    with torch.no_grad():
        target = model(x).argmax(1) if chooser.random() < 0.5 else model(x).argmin(1)
    description = f"{kind} {name}, {features} features, {depth}x{width}, gain {gain}, baseline {baseline_kind}"
    return model, x, baseline, target, description


def test_a_path_of_a_few_pieces_is_walked_even_where_the_rule_says_it_is_done():
    """Nested levels can miss the same jump of a path with two or three kinks: on this
    6-layer ReLU MLP with baselines near the inputs one example's levels of 9 and 17 nodes
    agreed on an answer 5.9x its tolerance off (a random net of a review helper's sweep).
    Such a path (at most FEW_PIECES pieces) is walked: a few rows."""
    model, x, baseline, target, description = sweep_network(1396)
    assert description == "mlp relu, 2 features, 6x32, gain 1.0, baseline close"
    ig = igfast.IntegratedGradients(model)
    reference, exact_info = ig.attribute(x, baseline, target=target, method="exact", return_adaptive_info=True)
    ours, info = ig.attribute(x, baseline, target=target, n_steps="auto", tolerance=1e-2, max_steps=4097,
                              return_adaptive_info=True)
    errors = relative_errors(ours, reference)
    assert bool(info.converged.all())
    assert float(errors.max()) <= 1e-2, errors.max()
    few = (exact_info.pieces >= 2) & (exact_info.pieces <= igfast.adaptive.FEW_PIECES)
    assert bool(few.any()) and bool(info.exact[few].all())


# Nets of the sweep whose rule, before the stricter estimate on walked networks, reported
# an example converged above its tolerance: at round 0 (1619, 1.87x), at 33 nodes (1091,
# 1.40x; 2240, 2.75x), at 65 (1516, 1.35x), at 129 on a path of 10 pieces (2248, 1.68x),
# at 129 where only the doubled completeness error stops it (1511, 1.25x), and at 33 for
# tolerance 1e-3 (2146, 1.31x).
STRICTER_ESTIMATE_CASES = [(1619, 1e-2), (1091, 1e-2), (2240, 1e-2), (1516, 1e-2), (2248, 1e-2), (1511, 1e-2),
                           (2146, 1e-3)]


@pytest.mark.parametrize("seed,tolerance", STRICTER_ESTIMATE_CASES)
def test_the_rule_on_a_walked_network_reports_converged_only_within_tolerance(monkeypatch, seed, tolerance):
    """On a network the probe can walk, the rule converges no earlier than round 1, its
    pre-asymptotic factor holds to 129 nodes, its completeness error counts twice
    (adaptive.PIECEWISE_ASYMPTOTIC_STEPS), and paths of up to 16 pieces are walked
    (FEW_PIECES). The walk is otherwise kept out (predicted to take forever) so that the
    rule's own estimate is judged; with the rules of other networks and 8 for FEW_PIECES,
    the same call reports an example converged above tolerance."""
    model, x, baseline, target, _ = sweep_network(seed)
    ig = igfast.IntegratedGradients(model)
    reference = ig.attribute(x, baseline, target=target, method="exact")
    monkeypatch.setattr(igfast.adaptive, "predicted_walk_seconds", lambda *args: float("inf"))

    def worst_converged():
        ours, info = ig.attribute(x, baseline, target=target, n_steps="auto", tolerance=tolerance,
                                  max_steps=4097, return_adaptive_info=True)
        assert info.exact_unavailable is None and bool(info.converged.any())
        return float(relative_errors(ours, reference)[info.converged].max()) / tolerance

    assert worst_converged() <= 1.0
    monkeypatch.setattr(igfast.adaptive, "PIECEWISE_FIRST_CONVERGING_ROUND", 0)
    monkeypatch.setattr(igfast.adaptive, "PIECEWISE_ASYMPTOTIC_STEPS", igfast.adaptive.ASYMPTOTIC_STEPS)
    monkeypatch.setattr(igfast.adaptive, "PIECEWISE_COMPLETENESS_FACTOR", 1.0)
    monkeypatch.setattr(igfast.adaptive, "FEW_PIECES", 8)
    assert worst_converged() > 1.0


def _many_kinks_cnn(seed):
    """A ReLU CNN whose paths cross about 2,200 kinks and move 1,728 features: the sharper
    estimate's regime (adaptive.MANY_PIECES)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 12 * 12, 10)).double().eval()
    x = torch.randn(4, 3, 24, 24, dtype=torch.float64)
    baseline = 0.1 * torch.randn_like(x)
    with torch.no_grad():
        target = model(x).argmax(1)
    return model, x, baseline, target


def _heavy_tailed_cnn(seed):
    """A ReLU CNN of a helper's sweep (about 3,800 pieces per path over 2,352 features)
    whose second conv has Student-t weights (1.5 degrees of freedom) and whose head has
    Cauchy weights: a few units' jumps weigh far more than the rest."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1000)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 14 * 14, 10)).double().eval()
    with torch.no_grad():
        conv, head = model[2], model[-1]
        normal = torch.randn(conv.weight.shape, generator=generator, dtype=torch.float64)
        chi2 = torch.distributions.Chi2(torch.tensor(1.5, dtype=torch.float64)).sample(conv.weight.shape)
        conv.weight.copy_(normal / (chi2 / 1.5).sqrt() / 6.0)  # Student-t, over sqrt(fan-in 36)
        uniform = torch.rand(head.weight.shape, generator=generator, dtype=torch.float64)
        head.weight.copy_(torch.tan(math.pi * (uniform - 0.5)) / head.in_features ** 0.5)  # Cauchy
    x = torch.randn(4, 3, 28, 28, dtype=torch.float64)
    baseline = 0.1 * torch.randn_like(x)
    with torch.no_grad():
        target = model(x).argmax(1)
    return model, x, baseline, target


def _converged_rule(ig, x, baseline, target, reference, tolerance):
    """auto's relative errors against ``reference`` and its evaluations, per example, where
    every example converged and the switch was open (the caller keeps the walk out)."""
    ours, info = ig.attribute(x, baseline, target=target, n_steps="auto", tolerance=tolerance, max_steps=4097,
                              return_adaptive_info=True)
    assert info.exact_unavailable is None and bool(info.converged.all())
    return relative_errors(ours, reference), info.evaluations


def _rule_on_many_pieces(monkeypatch, model, x, baseline, target, tolerance):
    """auto's rule alone (the walk kept out) on paths of at least MANY_PIECES pieces,
    checked within ``tolerance`` of exact IG as it stands: (a function that runs it again,
    giving its errors and evaluations per example; those of this run)."""
    ig = igfast.IntegratedGradients(model)
    reference, exact_info = ig.attribute(x, baseline, target=target, method="exact", return_adaptive_info=True)
    assert int(exact_info.pieces.min()) >= igfast.adaptive.MANY_PIECES
    keep_the_switch_out(monkeypatch)

    def run():
        return _converged_rule(ig, x, baseline, target, reference, tolerance)

    errors, evaluations = run()
    assert float(errors.max()) <= tolerance, errors.max()
    return run, errors, evaluations


def test_a_path_across_thousands_of_kinks_takes_the_sharper_estimate_and_stays_within_tolerance(monkeypatch):
    """Where a probe predicts at least MANY_PIECES pieces on a path that moves at least
    MANY_PIECES_FEATURES features, the rule's change at a doubling is divided by
    MANY_PIECES_CHANGE_OVER_ERROR from 129 nodes on: on this CNN three
    of four examples stop at 1025 nodes, not 2049, and every converged one is still
    within tolerance of exact IG. The walk is kept out so that the rule's estimate is
    judged; a path of many pieces that moves few features keeps the plain estimate."""
    run, errors, evaluations = _rule_on_many_pieces(monkeypatch, *_many_kinks_cnn(1), 1e-3)
    monkeypatch.setattr(igfast.adaptive, "MANY_PIECES_FEATURES", 1729)
    plain_errors, plain_evaluations = run()
    assert bool((evaluations <= plain_evaluations).all()) and int(evaluations.sum()) < int(plain_evaluations.sum())
    assert float(plain_errors.max()) <= float(errors.max())


def test_the_sharper_estimate_waits_for_the_levels_the_plain_rule_trusts(monkeypatch):
    """On a path of thousands of kinks the change is divided by
    MANY_PIECES_CHANGE_OVER_ERROR only from PIECEWISE_ASYMPTOTIC_STEPS (129) nodes on;
    below, it counts PRE_ASYMPTOTIC_FACTOR times as on any walked network. On this CNN
    one example's error stayed at 4.7e-3 and 4.3e-3 at 33 and 65 nodes while the levels
    changed by 2.5e-3 (change / error 0.65): with the sharper estimate from 33 nodes on,
    as first built, auto reported it converged at 3e-3 with 1.44 times that error."""
    run, _, _ = _rule_on_many_pieces(monkeypatch, *_heavy_tailed_cnn(123), 3e-3)
    monkeypatch.setattr(igfast.adaptive, "MANY_PIECES_STEPS", 33)
    monkeypatch.setattr(igfast.adaptive, "PIECEWISE_ASYMPTOTIC_STEPS", 33)
    early_errors, _ = run()
    assert float(early_errors.max()) > 3e-3, early_errors.max()


def test_a_few_dominant_jumps_count_the_change_more(monkeypatch):
    """Where a few jumps dominate a path of thousands of kinks (heavy-tailed weights), the
    last two changes share a direction and the change can understate the finer level's
    error (0.80 to 0.91 of it on a helper's sweeps): beyond MANY_PIECES_CHANGE_COSINE
    the change counts MANY_PIECES_ALIGNED_FACTOR times. On this CNN one example's error
    fell only from 6.6e-3 to 4.5e-3 between 129 and 257 nodes, where the floored change
    was 4.1e-3: taken as it is, or divided as on a plain path, auto reported that example
    converged at 4.3e-3 with 1.035 times that error."""
    run, _, evaluations = _rule_on_many_pieces(monkeypatch, *_heavy_tailed_cnn(157), 4.3e-3)
    for constant, value in (("MANY_PIECES_ALIGNED_FACTOR", 1.0), ("MANY_PIECES_CHANGE_COSINE", float("inf"))):
        with monkeypatch.context() as patch:
            patch.setattr(igfast.adaptive, constant, value)
            taken_errors, taken_evaluations = run()
        assert float(taken_errors.max()) > 4.3e-3, (constant, taken_errors.max())
        assert bool((taken_evaluations <= evaluations).all())


@pytest.mark.parametrize("seed", [3169, 3239])
def test_a_walk_stopped_short_is_judged_by_completeness_as_the_rule_is(monkeypatch, seed):
    """A walk that stops short of its last pieces (exact._GapFill) is walked again to every
    piece where its completeness error, counted PIECEWISE_COMPLETENESS_FACTOR times as the
    rule's is, is above tolerance: on these deep narrow nets of the sweep (paths of 23 and
    66 pieces) a stopped walk was 1.29x and 1.11x its tolerance off, with completeness
    within twice its estimate. Counted once, the stop stands and misses."""
    model, x, baseline, target, _ = sweep_network(seed)
    ig = igfast.IntegratedGradients(model)
    reference = ig.attribute(x, baseline, target=target, method="exact")
    monkeypatch.setattr(igfast.adaptive, "predicted_walk_seconds", lambda *args: 0.0)

    def worst_walked():
        ours, info = ig.attribute(x, baseline, target=target, n_steps="auto", tolerance=1e-3, max_steps=4097,
                                  return_adaptive_info=True)
        assert info.exact_unavailable is None and bool(info.converged.all()) and bool(info.exact.all())
        return float(relative_errors(ours, reference).max()) / 1e-3

    assert worst_walked() <= 1.0
    monkeypatch.setattr(igfast.adaptive, "PIECEWISE_COMPLETENESS_FACTOR", 1.0)
    assert worst_walked() > 1.0


def test_a_first_round_estimate_within_tolerance_on_a_walked_network_warns_why_it_is_not_trusted():
    """On a network auto can walk no example converges at round 0
    (PIECEWISE_FIRST_CONVERGING_ROUND): with a max_steps below the next level (17 nodes)
    every example comes back unconverged although its estimate is within tolerance, and
    the warning says why and what max_steps lets auto check it."""
    model, x, baseline, target, _ = sweep_network(1091)
    ig = igfast.IntegratedGradients(model)
    with pytest.warns(igfast.ToleranceNotReachedWarning, match="first round's estimate is not trusted.*at least 17"):
        ig.attribute(x, baseline, target=target, n_steps="auto", tolerance=0.5, max_steps=16)
    _, info = ig.attribute(x, baseline, target=target, n_steps="auto", tolerance=0.5, max_steps=16,
                           return_adaptive_info=True)
    assert not bool(info.converged.any()) and bool((info.error_estimate <= 0.5).any())
    _, info = ig.attribute(x, baseline, target=target, n_steps="auto", tolerance=0.5, max_steps=17,
                           return_adaptive_info=True)
    assert bool(info.converged.all())


class _TanhFirst(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(torch.tanh(x))


def mixed_sweep_network(seed):
    """Net ``seed`` of the random sweep that calibrated auto's estimate on mixed networks
    (see adaptive.MIXED_ASYMPTOTIC_STEPS): sweep_network's net with tanh for an MLP's
    first activation, or on a residual net's input, and the largest logit as target for
    an odd seed, the smallest for an even one. Returns (model, x, baseline, target,
    description)."""
    model, x, baseline, _, description = sweep_network(seed)
    if isinstance(model, nn.Sequential):
        model[1], description = nn.Tanh(), description + ", tanh first"
    else:
        model, description = _TanhFirst(model), description + ", tanh on its input"
    with torch.no_grad():
        logits = model(x)
    return model, x, baseline, logits.argmax(1) if seed % 2 else logits.argmin(1), description


def keep_the_switch_out(patch):
    """The rule alone: auto's switch takes no example (the probe still runs, so the rule is
    judged as on the network the probe found)."""
    patch.setattr(igfast.adaptive._ExactSwitch, "take", lambda self, active, undone, *args, **kwargs:
                  torch.zeros_like(undone))


def converged_pieces_reference(explainer, x, baseline, target, monkeypatch):
    """gausslegendre_pieces with 8 Gauss nodes per piece and pieces cut to 1/2048 of the
    path: the mixed sweep's reference."""
    with monkeypatch.context() as patch:
        patch.setattr(igfast.exact, "GAUSS_NODES_PER_PIECE", 8)
        return explainer.attribute(x, baseline, target=target, method="gausslegendre_pieces", n_steps=2048)


# Nets of the mixed sweep whose rule, with the strict estimate of networks it cannot walk,
# reported an example converged above its tolerance (replayed, and in auto with the switch
# kept out): at 33 nodes on a path of 6 pieces (5072, 3.43x), at 65 (5189, 1.47x), at 129
# (5008, 1.27x), at 257 (5027, 1.46x), at 33 for tolerance 1e-3 on a path of 3 pieces
# (5165, 4.66x), and one that the change counted twice does not stop without the doubled
# completeness error (5273, 1.09x).
MIXED_ESTIMATE_CASES = [(5072, 1e-2), (5189, 1e-2), (5008, 1e-2), (5027, 1e-2), (5165, 1e-3), (5273, 1e-2)]


@pytest.mark.parametrize("seed,tolerance", MIXED_ESTIMATE_CASES)
def test_the_rule_on_a_mixed_network_reports_converged_only_within_tolerance(monkeypatch, seed, tolerance):
    """On a mixed network (tanh, then kinks) the change counts twice at every level and so
    does the completeness error (adaptive.MIXED_ASYMPTOTIC_STEPS). The switch to the
    pieces is kept out so that the rule's own estimate is judged; with the factor below 33
    nodes only and completeness counted once, as on a network the probe cannot read, the
    same call reports an example converged above tolerance."""
    model, x, baseline, target, _ = mixed_sweep_network(seed)
    ig = igfast.IntegratedGradients(model)
    reference = converged_pieces_reference(ig, x, baseline, target, monkeypatch)
    keep_the_switch_out(monkeypatch)

    def worst_converged():
        ours, info = ig.attribute(x, baseline, target=target, n_steps="auto", tolerance=tolerance,
                                  max_steps=4097, return_adaptive_info=True)
        assert info.exact_unavailable is None and not info.exact.any() and bool(info.converged.any())
        return float(relative_errors(ours, reference)[info.converged].max()) / tolerance

    assert worst_converged() <= 1.0
    monkeypatch.setattr(igfast.adaptive, "MIXED_ASYMPTOTIC_STEPS", igfast.adaptive.ASYMPTOTIC_STEPS)
    monkeypatch.setattr(igfast.adaptive, "MIXED_COMPLETENESS_FACTOR", 1.0)
    assert worst_converged() > 1.0


class _SteepSmoothMLP(nn.Module):
    def __init__(self, activation, weight_scale):
        super().__init__()
        self.first, self.second, self.out = nn.Linear(6, 10), nn.Linear(10, 10), nn.Linear(10, 3)
        self.activation = activation
        with torch.no_grad():
            self.first.weight.mul_(weight_scale)
            self.second.weight.mul_(weight_scale)

    def forward(self, x):
        return self.out(self.activation(self.second(self.activation(self.first(x)))))


def _dense_gauss_reference(model, x, baseline, target, panels=2000, nodes=16):
    """Composite Gauss-Legendre, panels x nodes per path, in float64."""
    points, weights = np.polynomial.legendre.leggauss(nodes)
    t = torch.tensor(((np.arange(panels)[:, None] + (points + 1) / 2) / panels).ravel())
    w = torch.tensor(np.broadcast_to(weights / 2 / panels, (panels, nodes)).ravel().copy())
    rows = []
    for end, start in zip(x, baseline):
        path = (start + t[:, None] * (end - start)).requires_grad_()
        gradient, = torch.autograd.grad(model(path)[:, target].sum(), path)
        rows.append((gradient * w[:, None]).sum(0) * (end - start))
    return torch.stack(rows)


@pytest.mark.parametrize("activation, weight_scale, seed, baseline, tolerance", [
    (lambda h: nn.functional.softplus(h, beta=50), 1.0, 100, "zeros", 1e-3),
    (lambda h: nn.functional.softplus(h, beta=50), 1.0, 125, "noise", 1e-2),
    (lambda h: nn.functional.softplus(h, beta=100), 1.0, 96, "zeros", 1e-2),
    (torch.tanh, 8.0, 145, "noise", 1e-2),
    (torch.tanh, 8.0, 427, "negated", 1e-2),
])
def test_steep_smooth_units_are_not_taken_for_resolved(activation, weight_scale, seed, baseline, tolerance):
    """A helper's sweep of steep smooth MLPs: the geometric extrapolation reported
    examples converged at 2.4x to 9x their tolerance (a coarse level catching up looked
    like geometric convergence; two levels missing the same nearly-kinked unit changed
    little)."""
    torch.manual_seed(seed)
    x = torch.randn(4, 6, dtype=torch.float64) * 1.5
    model = _SteepSmoothMLP(activation, weight_scale).double().eval()
    baselines = {"zeros": torch.zeros_like(x), "noise": torch.randn_like(x) * 0.3, "negated": -x}[baseline]
    reference = _dense_gauss_reference(model, x, baselines, 1)
    attributions, info = igfast.IntegratedGradients(model).attribute(
        x, baselines, target=1, n_steps="auto", tolerance=tolerance, return_adaptive_info=True)
    errors = (attributions - reference).norm(dim=1) / reference.norm(dim=1)
    assert bool(info.converged.all())
    assert bool((errors <= tolerance).all()), (errors, info.error_estimate, info.evaluations)
