"""method="exact" against an independent oracle.

The oracle knows nothing of forward-mode AD or of igfast's breakpoint mode: it reads
each piecewise-linear unit's region (ReLU sign, max-pool argmax, clamp side, ...)
with forward hooks on a fine grid of the path, bisects every interval where the
regions change down to 1e-15, and sums, over the pieces it found, piece length times
the ordinary autograd gradient at the piece's midpoint (a piecewise-linear network
has one gradient per piece). For a smooth head after the last kink the midpoint is
replaced by 16 Gauss-Legendre nodes per piece.
"""

import json
import math
import subprocess
import sys
import warnings

import numpy as np

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import igfast
from igfast import ArgumentError, NotPiecewiseLinearError
from models import IdentityFunction, count_walked_rows

# ---------------------------------------------------------------------------- models


class Abs(nn.Module):
    def forward(self, x):
        return torch.abs(x)

    def region(self, x):
        return x > 0


class Clamp(nn.Module):
    def forward(self, x):
        return torch.clamp(x, min=-0.5, max=0.7)

    def region(self, x):
        return (x > -0.5).to(torch.int8) + (x > 0.7).to(torch.int8)


class Maximum(nn.Module):
    """max(a(x), b(x)) of two affine branches, then min with a third."""

    def __init__(self, width):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        return torch.minimum(torch.maximum(self.a(x), self.b(x)), self.c(x) + 1)

    def region(self, x):
        a, b, c = self.a(x), self.b(x), self.c(x) + 1
        return torch.cat([a > b, torch.maximum(a, b) > c], dim=-1)


class Maxout(nn.Module):
    """A max over groups of 3 units (amax over a dimension), then a min over pairs
    (torch.min with a dimension)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 48), nn.Linear(16, 16)

    def forward(self, x):
        hidden = self.a(x).unflatten(-1, (16, 3)).amax(-1)
        return torch.min(self.b(hidden).unflatten(-1, (8, 2)), dim=-1).values

    def region(self, x):
        groups = self.a(x).unflatten(-1, (16, 3))
        return torch.cat([groups.argmax(-1), self.b(groups.amax(-1)).unflatten(-1, (8, 2)).argmin(-1)], dim=-1)


class ClampMinMax(nn.Module):
    def forward(self, x):
        return torch.clamp_max(torch.clamp_min(x, -0.4), 0.6)

    def region(self, x):
        return (x > -0.4).to(torch.int8) + (x > 0.6).to(torch.int8)


class Addmm(nn.Module):
    """Hugging Face's Conv1D (GPT-2): bias + x @ weight by torch.addmm, scaled."""

    def __init__(self, inputs, outputs):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(inputs, outputs) / inputs ** 0.5)
        self.bias = nn.Parameter(0.3 * torch.randn(outputs))

    def forward(self, x):
        return torch.addmm(self.bias, x, self.weight, beta=0.5, alpha=1.5)


class FusedProducts(nn.Module):
    """baddbmm with a moving added term, then addcmul and addcdiv with one moving factor."""

    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, width) / width ** 0.5)
        self.scale = nn.Parameter(torch.rand(width) + 0.5)

    def forward(self, x):
        rows = x.unsqueeze(1)
        mixed = torch.baddbmm(rows, rows, self.weight.expand(x.shape[0], -1, -1), alpha=0.7).squeeze(1)
        return torch.addcdiv(torch.addcmul(mixed, x, self.scale, value=0.5), mixed, self.scale)


class HandMasks(nn.Module):
    """ReLUs written with comparisons: x * (x > 0), torch.where on a threshold, and a
    reflected comparison (0.1 < g)."""

    def forward(self, x):
        h = x * (x > 0)
        g = torch.where(h > 0.3, h, 0.3 + 0.2 * (h - 0.3))
        return g * (0.1 < g).to(g.dtype) + 0.1 * (g <= 0.1)

    def region(self, x):
        h = x * (x > 0)
        g = torch.where(h > 0.3, h, 0.3 + 0.2 * (h - 0.3))
        return torch.cat([x > 0, h > 0.3, g > 0.1], dim=-1)


class Sorts(nn.Module):
    """GroupSort (sort within pairs: a MaxMin activation), topk of groups of 6, then a
    descending sort of all that is left."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 16), nn.Linear(16, 12), nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x).unflatten(-1, (8, 2)).sort(-1).values.flatten(-2)
        g = self.b(h).unflatten(-1, (2, 6)).topk(4, dim=-1).values.flatten(-2)
        return self.c(torch.sort(g, dim=-1, descending=True).values)

    def region(self, x):
        pairs = self.a(x).unflatten(-1, (8, 2))
        h = pairs.sort(-1).values.flatten(-2)
        groups = self.b(h).unflatten(-1, (2, 6))
        g = groups.topk(4, dim=-1).values.flatten(-2)
        # (The walk cuts topk's pieces at every crossing in a group, those below its k + 1
        # first too: the full order of each group, see piecewise._sort.)
        return torch.cat([pairs.argsort(-1).flatten(-2), groups.argsort(-1).flatten(-2),
                          g.argsort(-1, descending=True)], dim=-1)


class OrderStatistics(nn.Module):
    """The median and 2nd smallest of groups of 4, and running maxima and minima along
    them: each picks one element of its group, which one changing where two cross."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(24, 3)

    def forward(self, x):
        groups = self.a(x).unflatten(-1, (4, 4))
        medians = torch.median(groups, dim=-1).values
        second = groups.kthvalue(2, -1, keepdim=True).values.squeeze(-1)
        running_max = torch.cummax(groups, -1).values.flatten(1)[:, :8]
        running_min = groups.cummin(dim=2)[0].flatten(1)[:, 8:]
        return self.b(torch.cat([medians, second, running_max, running_min], dim=1))

    def region(self, x):
        # (The walk cuts at every crossing in a group: see piecewise._ordered_along.)
        return self.a(x).unflatten(-1, (4, 4)).argsort(-1).flatten(-2)


class RowPools(nn.Module):
    """Max-pools over rows of features, the input 2-D: PyTorch takes it as unbatched (C, L)
    and pools each row on its own."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(F.adaptive_max_pool1d(F.max_pool1d(F.relu(self.a(x)), 2), 5))

    def region(self, x):
        h = self.a(x)
        pooled, first = F.max_pool1d(F.relu(h).unsqueeze(1), 2, return_indices=True)
        _, second = F.adaptive_max_pool1d(pooled, 5, return_indices=True)
        return torch.cat([h > 0, first.squeeze(1), second.squeeze(1)], dim=-1)


class Softmax(nn.Module):
    def forward(self, x):
        return torch.softmax(x, dim=-1)


def _region_of(module, x):
    if isinstance(module, (nn.ReLU, nn.LeakyReLU)):
        return x > 0
    if isinstance(module, nn.Threshold):
        return x > module.threshold
    if isinstance(module, nn.Hardtanh):
        return (x > module.min_val).to(torch.int8) + (x > module.max_val).to(torch.int8)
    if isinstance(module, nn.Hardsigmoid):
        return (x > -3).to(torch.int8) + (x > 3).to(torch.int8)
    if isinstance(module, nn.Softshrink):
        return (x > -module.lambd).to(torch.int8) + (x > module.lambd).to(torch.int8)
    if isinstance(module, nn.MaxPool2d):
        _, indices = F.max_pool2d(x, module.kernel_size, module.stride, module.padding, module.dilation,
                                  ceil_mode=module.ceil_mode, return_indices=True)
        return indices
    if isinstance(module, nn.MaxPool1d):
        _, indices = F.max_pool1d(x, module.kernel_size, module.stride, module.padding, module.dilation,
                                  ceil_mode=module.ceil_mode, return_indices=True)
        return indices
    if isinstance(module, nn.MaxPool3d):
        _, indices = F.max_pool3d(x, module.kernel_size, module.stride, module.padding, module.dilation,
                                  ceil_mode=module.ceil_mode, return_indices=True)
        return indices
    if isinstance(module, nn.AdaptiveMaxPool2d):
        _, indices = F.adaptive_max_pool2d(x, module.output_size, return_indices=True)
        return indices
    return module.region(x)


PIECEWISE_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Threshold, nn.Hardtanh, nn.Hardsigmoid, nn.Softshrink, nn.MaxPool2d, nn.MaxPool1d, nn.MaxPool3d,
                     nn.AdaptiveMaxPool2d, Abs, Clamp, ClampMinMax, HandMasks, Maximum, Maxout, Sorts, OrderStatistics, RowPools)


def relu_mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def leaky_mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.LeakyReLU(0.1), nn.Linear(16, 12), nn.LeakyReLU(0.3), nn.Linear(12, 3))


def mixed_mlp():
    return nn.Sequential(nn.Linear(6, 12), nn.Hardtanh(), nn.Linear(12, 10), Abs(), Maximum(10), Clamp(),
                         nn.Linear(10, 10), nn.LeakyReLU(0.2), nn.Linear(10, 3))


def max_pool_cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2, ceil_mode=True), nn.Flatten(), nn.Linear(6 * 3 * 3, 4))


def pool1d_net():
    return nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.MaxPool1d(3, stride=2, dilation=2, padding=1),
                         nn.Flatten(), nn.Linear(4 * 4, 3))


def pool3d_net():
    return nn.Sequential(nn.Conv3d(1, 2, 2), nn.ReLU(), nn.MaxPool3d(2, stride=1, padding=1), nn.Flatten(),
                         nn.Linear(2 * 4 * 4 * 4, 3))


def adaptive_pool_net():
    # 7 x 6 to 3 x 4: windows 3 and 2 wide that overlap (PyTorch's floor / ceil bounds)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.AdaptiveMaxPool2d((3, 4)), nn.Flatten(),
                         nn.Linear(3 * 3 * 4, 3))


def maxout_net():
    return nn.Sequential(Maxout(), nn.Linear(8, 3))


def fused_affine_net():
    return nn.Sequential(Addmm(6, 16), ClampMinMax(), FusedProducts(16), nn.ReLU(), Addmm(16, 3))


def hand_masks_net():
    return nn.Sequential(nn.Linear(6, 16), HandMasks(), nn.Linear(16, 12), HandMasks(), nn.Linear(12, 10),
                         nn.Threshold(0.1, 0.1), nn.Linear(10, 3))


def shrink_net():
    return nn.Sequential(nn.Linear(6, 16), nn.Softshrink(0.3), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))


def hardsigmoid_net():
    # (weights scaled so that units cross both of hardsigmoid's kinks, at -3 and 3)
    first = nn.Linear(6, 16)
    with torch.no_grad():
        first.weight.mul_(8)
    return nn.Sequential(first, nn.Hardsigmoid(), nn.Linear(16, 3))


def softmax_head_mlp():
    return nn.Sequential(*relu_mlp(), Softmax())


MODELS = {
    "relu_mlp": (relu_mlp, (6,)),
    "leaky_mlp": (leaky_mlp, (6,)),
    "mixed_mlp": (mixed_mlp, (6,)),
    "max_pool_cnn": (max_pool_cnn, (1, 12, 12)),
    "pool1d_net": (pool1d_net, (2, 12)),
    "pool3d_net": (pool3d_net, (1, 4, 4, 4)),
    "adaptive_pool_net": (adaptive_pool_net, (1, 9, 8)),
    "maxout_net": (maxout_net, (6,)),
    "fused_affine_net": (fused_affine_net, (6,)),
    "hand_masks_net": (hand_masks_net, (6,)),
    "shrink_net": (shrink_net, (6,)),
    "hardsigmoid_net": (hardsigmoid_net, (6,)),
    "sorts": (Sorts, (6,)),
    "order_statistics": (OrderStatistics, (6,)),
    "row_pools": (RowPools, (6,)),
}


def make(name, device, dtype=torch.float64, seed=0):
    factory, shape = MODELS[name]
    torch.manual_seed(seed)
    return factory().to(device, dtype).eval(), shape


# ---------------------------------------------------------------------------- oracle


def _regions(model, points):
    """Per point, one int64 row of every piecewise-linear unit's region."""
    found = []
    hooks = [m.register_forward_hook(lambda m, inp, out: found.append(_region_of(m, inp[0])))
             for m in model.modules() if isinstance(m, PIECEWISE_MODULES)]
    try:
        with torch.no_grad():
            model(points)
    finally:
        for h in hooks:
            h.remove()
    return torch.cat([r.reshape(points.shape[0], -1).long() for r in found], dim=1)


def oracle_pieces(model, x, baseline, grid=2000):
    """The breakpoints of model on baseline -> x (one example), found by region changes."""
    direction = x - baseline

    def regions_at(t):
        return _regions(model, baseline + t.view(-1, *[1] * x.dim()).to(x.dtype) * direction)

    def region(t: float):
        # One point per call: a unit within rounding of its kink must be read the same
        # way every time, and a batched matmul may round a row differently.
        return regions_at(torch.tensor([t], dtype=torch.float64, device=x.device))[0]

    # Strictly inside (0, 1): a path that starts or ends on a kink takes the side it moves into.
    t = torch.linspace(1e-13, 1 - 1e-13, grid + 1, dtype=torch.float64, device=x.device)
    grid_regions = regions_at(t)
    changed = (grid_regions[1:] != grid_regions[:-1]).any(dim=1).nonzero().flatten().tolist()
    breakpoints = [0.0]
    for index in changed:
        left, right = t[index].item(), t[index + 1].item()
        left_region, right_region = region(left), region(right)
        while not torch.equal(left_region, right_region):  # an interval may hold several changes
            lo, hi = left, right
            for _ in range(44):  # bisect to the first change (grid cell / 2^44 < 1e-16)
                mid = (lo + hi) / 2
                if torch.equal(region(mid), left_region):
                    lo = mid
                else:
                    hi = mid
            breakpoints.append(hi)
            left, left_region = hi, region(hi)
    points = torch.tensor(sorted(breakpoints), dtype=torch.float64)
    # Changes closer than 1e-10 are one breakpoint (units with the same crossing).
    keep = torch.ones_like(points, dtype=torch.bool)
    keep[1:] = points[1:] - points[:-1] > 1e-10
    return points[keep]


def oracle_integral(model, x, baseline, target, nodes_per_piece=1):
    """(x - x') * sum over the oracle's pieces of length x mean gradient, for one example."""
    starts = oracle_pieces(model, x, baseline)
    ends = torch.cat([starts[1:], torch.ones(1, dtype=torch.float64)])
    if nodes_per_piece == 1:
        nodes, weights = np.array([0.5]), np.array([1.0])
    else:
        nodes, weights = np.polynomial.legendre.leggauss(nodes_per_piece)
        nodes, weights = 0.5 * (nodes + 1), 0.5 * weights
    ts = torch.cat([starts + float(n) * (ends - starts) for n in nodes]).to(x.device)
    ws = torch.cat([float(w) * (ends - starts) for w in weights]).to(x.device, x.dtype)
    points = (baseline + ts.view(-1, *[1] * x.dim()).to(x.dtype) * (x - baseline)).requires_grad_()
    output = model(points)
    (gradient,) = torch.autograd.grad(output[:, target].sum(), points)
    mean_gradient = (ws.view(-1, *[1] * x.dim()) * gradient).sum(0)
    return (x - baseline) * mean_gradient, len(starts)


def oracle(model, inputs, baselines, target, nodes_per_piece=1):
    results = [oracle_integral(model, x, b, target, nodes_per_piece) for x, b in zip(inputs, baselines)]
    return torch.stack([r[0] for r in results]), torch.tensor([r[1] for r in results])


def _close(actual, expected, rtol):
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= rtol * scale, f"max error {error:.3e} against scale {scale:.3e} (rtol {rtol})"


def _completeness(model, attributions, inputs, baselines, target, rtol):
    with torch.no_grad():
        end, start = model(inputs)[:, target], model(baselines)[:, target]
    total = attributions.flatten(1).sum(1)
    scale = torch.maximum(torch.maximum(end.abs(), start.abs()), attributions.flatten(1).abs().sum(1))
    error = ((total - (end - start)).abs() / scale).max().item()
    assert error <= rtol, f"completeness error {error:.3e} relative (bound {rtol})"


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(MODELS))
def test_exact_equals_independent_partition_float64(name, device):
    model, shape = make(name, device)
    examples = 2 if name == "max_pool_cnn" else 4  # the oracle reads ~100 pieces one point at a time
    inputs = torch.randn(examples, *shape, dtype=torch.float64, device=device)
    baselines = 0.3 * torch.randn(examples, *shape, dtype=torch.float64, device=device)
    attributions, delta, info = igfast.IntegratedGradients(model).attribute(
        inputs, baselines, target=1, method="exact", return_convergence_delta=True, return_adaptive_info=True)
    expected, pieces = oracle(model, inputs, baselines, 1)
    # (PyTorch's hardsigmoid backward takes 1/6 in float32 whatever the dtype: 3e-8 off
    # in the oracle's gradients; the walk's pieces are exact, as completeness shows.)
    _close(attributions, expected, 1e-7 if name == "hardsigmoid_net" else 1e-10)
    _completeness(model, attributions, inputs, baselines, 1, 1e-12)
    assert delta.abs().max() < 1e-11
    assert info.pieces.cpu().tolist() == pieces.tolist()
    assert (pieces >= 2).all() and pieces.sum() >= 4 * examples, "the workload must have breakpoints to find"
    # One row per piece: the row that found the piece gives its gradient.
    # One row per piece, and the layout check's four rows (exact.check_rows_kept) for one example.
    assert (info.evaluations - info.rows_check).tolist() == info.pieces.tolist() and info.smooth_head is None
    assert int(info.rows_check.max()) == 4 == int(info.rows_check.sum())
    assert info.walk_forwards == 4  # (only the layout check's rows run forward alone)
    # In rounds, about one per piecewise-linear op (at most 6 here), not one per piece.
    assert info.walk_rounds <= 8 < int(info.pieces.max())
    assert info.head_error_estimate is None
    for example in range(examples):
        found = info.breakpoints[example]
        assert found[0] == 0 and (found[1:] > found[:-1]).all()
        torch.testing.assert_close(found, oracle_pieces(model, inputs[example], baselines[example]),
                                   rtol=0, atol=1e-9)


def test_each_walk_round_is_one_chunk_without_a_budget(device):
    # The walk's rounds share one row limit: its first round (one row per example) is
    # measured, so the second (hundreds of segments) runs whole, not as a first chunk of
    # the first round's rows and then the rest.
    torch.manual_seed(0)
    model = relu_mlp().double().to(device)
    rows = []
    model.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[0]))
    inputs = torch.randn(16, 6, dtype=torch.float64, device=device)
    baselines = 0.3 * torch.randn(16, 6, dtype=torch.float64, device=device)
    _, info = igfast.IntegratedGradients(model).attribute(inputs, baselines, target=1, method="exact",
                                                          return_adaptive_info=True)
    # First the layout check's two forwards of two rows (exact.check_rows_kept).
    assert rows[:2] == [2, 2] and int(info.rows_check.sum()) == 4
    assert rows[3] > 16 * 4, "the second round must have many segments to show the chunking"
    # The walk's rounds, then the forwards at the baselines and at the inputs.
    assert len(rows) == 2 + info.walk_rounds + 2 and rows[-2:] == [16, 16]
    assert sum(rows[:-2]) == int(info.evaluations.sum())


@pytest.mark.parametrize("name, plain", [("relu_mlp", True), ("leaky_mlp", True), ("mixed_mlp", False)])
def test_parts_cut_by_the_last_ops_kinks_take_a_plain_row(name, plain, device, monkeypatch):
    """Where a segment's kinks come first from the network's last piecewise-linear op,
    and that op places all of its own (a ReLU, a LeakyReLU), every part is a piece: the
    next round takes its gradient with a plain forward and backward, without tangents,
    and the walk ends after one round per layer and that one. mixed_mlp's clamps, whose
    PyTorch gradient at a bound differs from the walk's, walk every row."""
    model, shape = make(name, device)
    inputs = 3 * torch.randn(5, *shape, dtype=torch.float64, device=device)
    baselines = 0.3 * torch.randn(5, *shape, dtype=torch.float64, device=device)
    walked = count_walked_rows(monkeypatch)
    ours, info = igfast.IntegratedGradients(model).attribute(inputs, baselines, target=1, method="exact",
                                                             return_adaptive_info=True)
    expected, pieces = oracle(model, inputs, baselines, 1)
    _close(ours, expected, 1e-10)
    assert info.pieces.cpu().tolist() == pieces.tolist()
    # one row a piece, walked or plain, and the layout check's four
    assert int(info.evaluations.sum()) == int(info.pieces.sum()) + 4
    if plain:
        assert sum(walked) < int(info.pieces.sum()) and info.walk_rounds == 3
    else:
        assert sum(walked) == int(info.pieces.sum()) + 4  # (and the layout check's rows)


def test_a_unit_that_stays_on_its_kink_cuts_no_piece(device):
    """A ReLU's dead units go into a second ReLU at 0 with no rate (step 0 / 0): counted
    as on a kink at every point, they had each piece behind a point halved down to the
    margin (353 pieces where the path has 10). relu(relu(z)) is relu(z): the same pieces.
    So for units pruned to 0 (zero weights and bias) before a ReLU."""
    torch.manual_seed(0)
    first, second = nn.Linear(8, 16), nn.Linear(16, 4)
    with torch.no_grad():
        first.weight[:4], first.bias[:4] = 0.0, 0.0
    once = nn.Sequential(first, nn.ReLU(), second).to(device, torch.float64)
    twice = nn.Sequential(first, nn.ReLU(), nn.ReLU(), second).to(device, torch.float64)
    x = torch.randn(3, 8, dtype=torch.float64, device=device)
    results = [igfast.IntegratedGradients(m).attribute(x, target=0, method="exact", return_adaptive_info=True)
               for m in (once, twice)]
    (ours_once, info_once), (ours_twice, info_twice) = results
    expected, pieces = oracle(once, x, torch.zeros_like(x), 0)
    _close(ours_twice, expected, 1e-10)
    assert info_once.pieces.tolist() == info_twice.pieces.tolist() == pieces.tolist()


@pytest.mark.parametrize("name", ["relu_mlp", "mixed_mlp", "max_pool_cnn"])
def test_exact_float32_matches_float64_and_is_complete(name, device):
    model, shape = make(name, device)
    inputs = torch.randn(6, *shape, dtype=torch.float64, device=device)
    baselines = torch.zeros_like(inputs)
    exact64 = igfast.IntegratedGradients(model).attribute(inputs, baselines, target=2, method="exact")
    model32 = model.float()
    attributions = igfast.IntegratedGradients(model32).attribute(inputs.float(), baselines.float(), target=2,
                                                                 method="exact")
    assert attributions.dtype == torch.float32
    _close(attributions.double(), exact64, 1e-5)
    _completeness(model32, attributions, inputs.float(), baselines.float(), 2, 1e-6)


def test_exact_beats_a_dense_rule():
    """A dense float64 Gauss-Legendre rule converges to the exact result (slowly: the
    integrand jumps at every kink), and exact IG is nearer to completeness than any."""
    model, shape = make("relu_mlp", "cpu")
    inputs = torch.randn(3, *shape, dtype=torch.float64)
    ig = igfast.IntegratedGradients(model)
    exact = ig.attribute(inputs, target=0, method="exact")
    errors = [(ig.attribute(inputs, target=0, n_steps=n) - exact).abs().max().item() for n in (64, 1024)]
    assert errors[1] < errors[0] / 4 and errors[1] < 1e-3 * exact.abs().max().item()


def test_smooth_head_is_integrated_per_piece(device):
    torch.manual_seed(1)
    model = softmax_head_mlp().to(device, torch.float64).eval()
    inputs = torch.randn(4, 6, dtype=torch.float64, device=device)
    baselines = torch.zeros_like(inputs)
    attributions, info = igfast.IntegratedGradients(model).attribute(
        inputs, baselines, target=1, method="exact", return_adaptive_info=True)
    expected, pieces = oracle(model, inputs, baselines, 1, nodes_per_piece=16)
    _close(attributions, expected, 1e-8)
    _completeness(model, attributions, inputs, baselines, 1, 1e-8)
    assert info.smooth_head == "softmax" and info.nodes_per_piece == 3
    # The head's error estimate (the midpoint rule's) is above the true error, and small.
    true_error = (attributions - expected).flatten(1).norm(dim=1) / expected.flatten(1).norm(dim=1)
    assert (info.head_error_estimate.to(true_error) >= true_error).all()
    assert (info.head_error_estimate < 1e-2).all() and (info.head_error_estimate > 0).all()
    assert info.pieces.cpu().tolist() == pieces.tolist()
    # 3 Gauss nodes per piece and the rows of the walk: the first round's, one per example
    # (their gradients the head makes unusable), then forwards with tangents only, one
    # per piece but for the parts known to be pieces (cut by the last ReLU's kinks),
    # which need none
    walked = info.evaluations - 3 * info.pieces - info.rows_check
    assert ((walked >= 1) & (walked <= info.pieces)).all()
    assert info.walk_forwards == int(walked.sum()) - inputs.shape[0] + 4  # (and the layout check's)
    assert info.walk_forwards < int(info.pieces.sum()) - inputs.shape[0]


def test_layer_integrated_gradients_exact(device):
    """LayerIG on the first layer's output is IG of the rest of the network between the
    layer's activations at the baseline and at the input."""
    model, shape = make("relu_mlp", device)
    inputs = torch.randn(4, *shape, dtype=torch.float64, device=device)
    baselines = torch.randn(4, *shape, dtype=torch.float64, device=device)
    lig = igfast.LayerIntegratedGradients(model, model[0])
    attributions, delta, info = lig.attribute(inputs, baselines, target=0, method="exact",
                                              return_convergence_delta=True, return_adaptive_info=True)
    with torch.no_grad():
        layer_in, layer_base = model[0](inputs), model[0](baselines)
    expected, pieces = oracle(model[1:], layer_in, layer_base, 0)
    _close(attributions, expected, 1e-10)
    assert delta.abs().max() < 1e-11
    assert info.pieces.cpu().tolist() == pieces.tolist()


def test_noise_tunnel_and_memory_budget_and_chunks_do_not_change_exact(device):
    model, shape = make("max_pool_cnn", device)
    inputs = torch.randn(5, *shape, dtype=torch.float64, device=device)
    ig = igfast.IntegratedGradients(model)
    whole = ig.attribute(inputs, target=3, method="exact")
    chunked = ig.attribute(inputs, target=3, method="exact", internal_batch_size=2)
    budgeted = ig.attribute(inputs, target=3, method="exact", memory_budget="64MB")
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-13)
    torch.testing.assert_close(budgeted, whole, rtol=0, atol=1e-13)
    # NoiseTunnel: each noisy copy is integrated exactly; the same noise (seed) through
    # a fine fixed rule agrees to that rule's error.
    nt = igfast.NoiseTunnel(ig)
    torch.manual_seed(5)
    smooth_exact = nt.attribute(inputs, nt_type="smoothgrad", nt_samples=3, stdevs=0.1, target=3, method="exact")
    torch.manual_seed(5)
    smooth_fine = nt.attribute(inputs, nt_type="smoothgrad", nt_samples=3, stdevs=0.1, target=3, n_steps=2048)
    _close(smooth_fine, smooth_exact, 5e-3)


def test_attribute_dataset_exact(tmp_path):
    model, shape = make("relu_mlp", "cpu")
    data = torch.utils.data.TensorDataset(torch.randn(10, *shape, dtype=torch.float64))
    summary = igfast.attribute_dataset(model, data, str(tmp_path), target=1, method="exact", batch_size=4,
                                       shard_size=4, progress=False)
    assert summary["examples"] == 10
    store = igfast.open_attributions(str(tmp_path))
    expected = igfast.IntegratedGradients(model).attribute(data.tensors[0], target=1, method="exact")
    torch.testing.assert_close(store.attributions[:], expected, rtol=1e-12, atol=1e-14)
    assert float(summary["max_abs_delta"] if "max_abs_delta" in summary else store.deltas[:].abs().max()) < 1e-11


# ------------------------------------------------------------------- the path's corners


def test_zero_length_path_and_no_breakpoint(device):
    model, shape = make("relu_mlp", device)
    inputs = torch.randn(3, *shape, dtype=torch.float64, device=device)
    attributions, info = igfast.IntegratedGradients(model).attribute(
        inputs, inputs.clone(), target=0, method="exact", return_adaptive_info=True)
    assert torch.equal(attributions, torch.zeros_like(attributions)) and info.pieces.tolist() == [1, 1, 1]
    # A network whose units stay on one side over the whole path: one piece, the
    # gradient times the difference.
    positive = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)).to(device, torch.float64)
    with torch.no_grad():
        positive[0].weight.uniform_(0.1, 1.0)
        positive[0].bias.fill_(0.5)
    x = torch.rand(2, 4, dtype=torch.float64, device=device)
    attributions, info = igfast.IntegratedGradients(positive).attribute(
        x, target=1, method="exact", return_adaptive_info=True)
    expected = x * (positive[2].weight[1] @ positive[0].weight)
    torch.testing.assert_close(attributions, expected, rtol=1e-14, atol=0)
    assert info.pieces.tolist() == [1, 1]


def test_paths_that_start_and_end_on_kinks_take_the_side_they_move_into(device):
    """Zero biases and a zero baseline put every unit on its kink at t = 0; an input
    built to put a unit on its kink at t = 1 ends there. PyTorch's relu'(0) = 0 would
    give a zero gradient for the first piece.

    The example that ends on a kink starts from a nonzero baseline: from a zero one
    the unit (no bias) would sit on its kink along the whole path, on the side the
    rounding of w . x ~ 1e-17 picks, and the attribution would follow that sign (on
    the H200 the oracle read it the other way)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 8, bias=False), nn.ReLU(), nn.Linear(8, 8, bias=False), nn.ReLU(),
                          nn.Linear(8, 2)).to(device, torch.float64).eval()
    generator = torch.Generator().manual_seed(3)  # the same examples on every device
    inputs = torch.randn(4, 5, generator=generator, dtype=torch.float64).to(device)
    baselines = torch.zeros_like(inputs)
    baselines[3] = torch.randn(5, generator=generator, dtype=torch.float64).to(device)
    # Example 3 ends on the kink of unit 0 of the first layer: remove that unit's value.
    w = model[0].weight[0]
    inputs[3] = inputs[3] - (w @ inputs[3]) / (w @ w) * w
    attributions, info = igfast.IntegratedGradients(model).attribute(
        inputs, baselines, target=1, method="exact", return_adaptive_info=True)
    expected, pieces = oracle(model, inputs, baselines, 1)
    _close(attributions, expected, 1e-10)
    _completeness(model, attributions, inputs, baselines, 1, 1e-12)
    assert attributions.abs().sum() > 0


class KinksAtTheMiddle(nn.Module):
    """On 0 -> 1 (one input): ReLUs with kinks at 1/4, 5/8 and 3/4, and max(x, 1 - x),
    whose two elements tie at 1/2: the first point method="exact" evaluates, the path's
    middle, sits on a kink (and then, with ``relu_at_middle``, on two)."""

    def __init__(self, relu_at_middle: bool):
        super().__init__()
        self.hidden = nn.Linear(1, 3)
        self.out = nn.Linear(3, 1)
        with torch.no_grad():
            self.hidden.weight.copy_(torch.tensor([[1.0], [1.0], [-1.0]]))
            self.hidden.bias.copy_(torch.tensor([-0.5 if relu_at_middle else -0.625, -0.25, 0.75]))
            self.out.weight.copy_(torch.tensor([[2.0, -3.0, 5.0]]))

    def forward(self, x):
        peak = torch.cat([x, 1 - x], 1).max(dim=1, keepdim=True).values
        return self.out(torch.relu(self.hidden(x))) + 7 * peak


@pytest.mark.parametrize("relu_at_middle", [False, True])
def test_kinks_at_the_evaluated_point_take_the_side_the_path_moves_into(relu_at_middle):
    model = KinksAtTheMiddle(relu_at_middle).double()
    inputs = torch.ones(1, 1, dtype=torch.float64)
    baselines = torch.zeros_like(inputs)
    attributions, info = igfast.IntegratedGradients(model).attribute(
        inputs, baselines, target=0, method="exact", return_adaptive_info=True)
    # One input: the attribution is F(x) - F(x'); a piece given the other side's gradient
    # would be off by its length times the jump.
    with torch.no_grad():
        expected = model(inputs) - model(baselines)
    torch.testing.assert_close(attributions, expected, rtol=0, atol=1e-12)
    kinks = [0.0, 0.25, 0.5, 0.75] if relu_at_middle else [0.0, 0.25, 0.5, 0.625, 0.75]
    torch.testing.assert_close(info.breakpoints[0], torch.tensor(kinks, dtype=torch.float64), rtol=0, atol=1e-12)
    assert info.evaluations.tolist() == [len(kinks) + 4]  # (and the layout check's four rows)


def test_ties_units_crossing_at_the_same_point(device):
    """Duplicated units cross their kinks at the same t: one breakpoint, not two, and no
    piece of zero length."""
    model, shape = make("relu_mlp", device)
    with torch.no_grad():
        model[0].weight[8:] = model[0].weight[:8]
        model[0].bias[8:] = model[0].bias[:8]
    inputs = torch.randn(4, *shape, dtype=torch.float64, device=device)
    attributions, info = igfast.IntegratedGradients(model).attribute(
        inputs, target=1, method="exact", return_adaptive_info=True)
    expected, pieces = oracle(model, inputs, torch.zeros_like(inputs), 1)
    _close(attributions, expected, 1e-10)
    assert info.pieces.cpu().tolist() == pieces.tolist()
    for found in info.breakpoints:
        assert (found[1:] - found[:-1] > 1e-12).all()


def test_batch_norm_in_eval_is_affine(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 2))
    model = model.to(device, torch.float64)
    model.train()
    model(torch.randn(32, 6, dtype=torch.float64, device=device))  # running statistics
    model.eval()
    inputs = torch.randn(3, 6, dtype=torch.float64, device=device)
    attributions = igfast.IntegratedGradients(model).attribute(inputs, target=0, method="exact")
    _close(attributions, oracle(model, inputs, torch.zeros_like(inputs), 0)[0], 1e-10)
    model.train()
    with pytest.raises(NotPiecewiseLinearError, match="batch_norm"):
        igfast.IntegratedGradients(model).attribute(inputs, target=0, method="exact")


# ------------------------------------------------------------------------------ errors


class GeluThenRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.b(torch.relu(F.gelu(self.a(x))))


class SineThenRelu(GeluThenRelu):
    def forward(self, x):
        return self.b(torch.relu(torch.sin(self.a(x))))


class ProductOfBranches(GeluThenRelu):
    def forward(self, x):
        h = self.a(x)
        return self.b(torch.relu(h * h))


class SquareByAddmm(GeluThenRelu):
    def forward(self, x):
        h = self.a(x)
        return self.b(torch.relu(torch.addmm(h, h, torch.ones(6, 6, dtype=h.dtype) + h[:1].T)))


class DivisionByAddcdiv(GeluThenRelu):
    def forward(self, x):
        h = self.a(x)
        return self.b(torch.relu(torch.addcdiv(h, torch.ones_like(h), h.abs() + 1)))


@pytest.mark.parametrize("model, op", [(GeluThenRelu, "gelu"), (SineThenRelu, "sin"),
                                       (ProductOfBranches, "mul"), (SquareByAddmm, "addmm"),
                                       (DivisionByAddcdiv, "addcdiv")])
def test_networks_that_are_not_piecewise_linear_are_refused_naming_the_op(model, op):
    with pytest.raises(NotPiecewiseLinearError, match=op):
        igfast.IntegratedGradients(model().double()).attribute(torch.randn(2, 4, dtype=torch.float64),
                                                               target=0, method="exact")


class UnsortedTopk(GeluThenRelu):
    def forward(self, x):
        return self.b(torch.relu(self.a(x)).topk(4, dim=-1, sorted=False).values.repeat(1, 2)[:, :6])


class SortAcrossTheBatch(GeluThenRelu):
    def forward(self, x):
        return self.b(torch.relu(self.a(x)).sort(0).values)


class TopkOfMany(GeluThenRelu):
    def forward(self, x):
        wide = torch.relu(self.a(x)).repeat(1, 200)  # 1200 elements: 719400 pairs a row
        return self.b(wide.topk(6, dim=-1).values)


class MedianOfAll(GeluThenRelu):
    def forward(self, x):
        return self.b(torch.relu(self.a(x)) - torch.median(x))


class CummaxAcrossTheBatch(GeluThenRelu):
    def forward(self, x):
        return self.b(torch.cummax(torch.relu(self.a(x)), 0).values)


class AmaxOfEverything(GeluThenRelu):
    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h - 0.1 * h.amax(dim=()))


class KthOfMany(GeluThenRelu):
    def forward(self, x):
        wide = torch.relu(self.a(x)).repeat(1, 200)
        return self.b(wide.kthvalue(3, dim=-1, keepdim=True).values.expand(-1, 6))


@pytest.mark.parametrize("model, words", [(UnsortedTopk, "sorted=False"), (SortAcrossTheBatch, "sort over dim 0"),
                                          (TopkOfMany, "topk over 1200 elements.*719400 per row.*at most 1024"),
                                          (MedianOfAll, "median over the whole tensor mixes the examples"),
                                          (AmaxOfEverything, "amax over the whole tensor mixes the examples"),
                                          (CummaxAcrossTheBatch, "cummax over dim 0"),
                                          (KthOfMany, "kthvalue over 1200 elements")])
def test_sorts_that_cannot_be_walked_are_refused_saying_why(model, words):
    """topk with sorted=False returns its values in an order PyTorch does not define; a
    sort, median or cummax over dim 0 (or a median over everything) mixes the batch's
    examples; a sort of many elements would hold every pair's step
    (piecewise.MOST_SORTED_ELEMENTS)."""
    with pytest.raises(NotPiecewiseLinearError, match=words):
        igfast.IntegratedGradients(model().double()).attribute(torch.randn(2, 4, dtype=torch.float64),
                                                               target=0, method="exact")


class Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12))
        self.b = nn.Linear(12, 3)

    def forward(self, x):
        # Metadata queries are no ops along the path; the checkpoint is refused.
        assert x.is_contiguous() and x.stride()[-1] == 1 and x.storage_offset() >= 0
        return self.b(torch.relu(torch.utils.checkpoint.checkpoint(self.a, x, use_reentrant=False)))


def test_a_step_written_with_a_comparison_is_refused_by_completeness():
    """A comparison is read as a kink (hand-written ReLUs walk, see hand_masks_net), but
    a mask used as a value jumps: the walk's sum misses completeness, and says so."""
    torch.manual_seed(4)
    linear = nn.Linear(6, 4).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    with pytest.raises(NotPiecewiseLinearError, match="miss completeness.*jumps"):
        igfast.IntegratedGradients(lambda t: (torch.where(linear(t) > 0, 1.0, 0.0) + linear(t)).sum(1, keepdim=True)
                                   ).attribute(x, target=0, method="exact")


def test_a_non_reentrant_checkpoint_is_refused_by_name():
    """torch.utils.checkpoint(use_reentrant=False) recomputes its part in the backward
    without the walk's tangents (the checkpoint then refused, after igfast's own memory
    meter had been taken for a model op); auto says why it cannot walk and goes on."""
    torch.manual_seed(3)
    model = Checkpointed().double().eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    for method in ("exact", "gausslegendre_pieces"):
        with pytest.raises(NotPiecewiseLinearError, match=r"checkpoint\(use_reentrant=False\)"):
            igfast.IntegratedGradients(model).attribute(x, target=0, method=method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tolerance it may not reach without the walk
        _, info = igfast.IntegratedGradients(model).attribute(x, target=0, n_steps="auto", return_adaptive_info=True)
    assert "checkpoint" in info.exact_unavailable
    # Without the checkpoint the same weights walk.
    plain = nn.Sequential(model.a, nn.ReLU(), model.b)
    igfast.IntegratedGradients(plain).attribute(x, target=0, method="exact")


def test_a_reentrant_checkpoint_is_refused_by_name():
    """torch.utils.checkpoint(use_reentrant=True) is an autograd Function without a jvp:
    the refusal blamed the user's custom Functions (there are none) and suggested a fixed
    n_steps, which fails there too."""
    torch.manual_seed(3)
    model = Checkpointed().double().eval()
    model.forward = lambda x: model.b(torch.relu(torch.utils.checkpoint.checkpoint(model.a, x, use_reentrant=True)))
    x = torch.randn(4, 6, dtype=torch.float64)
    for method in ("exact", "gausslegendre_pieces"):
        with pytest.raises(NotPiecewiseLinearError, match=r"checkpoint\(use_reentrant=True\).*without checkpointing"):
            igfast.IntegratedGradients(model).attribute(x, target=0, method=method)
    # A Function of the model's own inside a non-reentrant checkpoint is that Function's.
    model.forward = lambda x: model.b(torch.utils.checkpoint.checkpoint(
        lambda h: IdentityFunction.apply(torch.relu(model.a(h))), x, use_reentrant=False))
    with pytest.raises(NotPiecewiseLinearError, match="jvp") as raised:
        igfast.IntegratedGradients(model).attribute(x, target=0, method="exact")
    assert "use_reentrant=True" not in str(raised.value)


@pytest.mark.parametrize("kwargs, match", [
    ({"n_steps": "auto"}, "n_steps"),
    ({"tolerance": 0.0}, "tolerance"),
    ({"tolerance": "1e-3"}, "tolerance"),
    ({"max_steps": 0}, "max_steps"),
    ({"max_steps": 2}, "max_steps"),
    ({"targets": [0, 1]}, "target"),
])
def test_argument_errors(kwargs, match):
    model, shape = make("relu_mlp", "cpu")
    kwargs.setdefault("target", None) if "targets" in kwargs else kwargs.setdefault("target", 0)
    with pytest.raises(ArgumentError, match=match):
        igfast.IntegratedGradients(model).attribute(torch.randn(3, *shape, dtype=torch.float64), method="exact",
                                                    **kwargs)


def test_unknown_method_still_lists_exact_nowhere_else():
    model, shape = make("relu_mlp", "cpu")
    # (a misspelt method's error names the piece methods too)
    with pytest.raises(ArgumentError, match="method.*'exact', 'gausslegendre_pieces'"):
        igfast.IntegratedGradients(model).attribute(torch.randn(2, *shape, dtype=torch.float64), target=0,
                                                    method="exactly")


def test_rows_selected_with_repeats_are_not_mistaken_for_the_batch():
    """The gradient pass selects one row per piece; B of them are not the batch."""
    from igfast.attr._forms import select_additional_forward_args, select_examples

    values = torch.arange(6.0).view(3, 2)
    index = torch.tensor([2, 2, 0])
    assert torch.equal(select_examples(values, index, 3), values[index])
    assert torch.equal(select_additional_forward_args((values, 7), index, 3)[0], values[index])
    assert select_examples(values, torch.arange(3), 3) is values


def test_additional_forward_args_follow_their_examples(device):
    """Per-example forward arguments reach every piece of their own example's path."""
    model, shape = make("relu_mlp", device)

    def forward(x, scale):
        return model(x * scale)

    inputs = torch.randn(3, *shape, dtype=torch.float64, device=device)
    scale = torch.tensor([[0.5], [1.0], [2.0]], dtype=torch.float64, device=device)
    attributions = igfast.IntegratedGradients(forward).attribute(inputs, target=1, method="exact",
                                                                additional_forward_args=(scale,))
    for example in range(3):
        alone = igfast.IntegratedGradients(lambda x: model(x * scale[example])).attribute(
            inputs[example:example + 1], target=1, method="exact")
        torch.testing.assert_close(attributions[example:example + 1], alone, rtol=1e-12, atol=1e-14)


class CdistBeforeRelu(nn.Module):
    """cdist, which has no forward-mode formula in PyTorch, before a ReLU."""

    def __init__(self):
        super().__init__()
        self.first, self.second, self.out = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = self.first(x)
        distance = torch.cdist(h.unsqueeze(1), torch.ones(1, 1, 16, dtype=h.dtype)).squeeze(1)
        return self.out(torch.relu(self.second(h * distance)))


def test_a_pytorch_op_without_forward_ad_is_not_blamed_on_a_custom_function():
    """An op without a forward-mode formula in PyTorch (SiLU's backward, before igfast
    computed its tangent itself; cdist): the message said to give custom autograd
    Functions a jvp, though the model has none."""
    torch.manual_seed(0)
    model = CdistBeforeRelu().eval()
    with pytest.raises(NotPiecewiseLinearError, match="_cdist_forward") as raised:
        igfast.IntegratedGradients(model).attribute(torch.randn(3, 8), target=1, method="gausslegendre_pieces")
    assert "PyTorch has no forward-mode formula" in str(raised.value) and "custom" not in str(raised.value)


def test_autograd_function_without_jvp_is_named():
    model, shape = make("relu_mlp", "cpu")
    forward = lambda x: model[2:](model[1](IdentityFunction.apply(model[0](x))))  # noqa: E731
    with pytest.raises(NotPiecewiseLinearError, match="jvp"):
        igfast.IntegratedGradients(forward).attribute(torch.randn(2, *shape, dtype=torch.float64), target=0,
                                                      method="exact")


class _ReluWithJvp(torch.autograd.Function):
    """A ReLU with a correct backward and jvp: its forward runs without tangents, so
    the walk cannot see its kinks."""

    @staticmethod
    def forward(x):
        return x.clamp(min=0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.positive = inputs[0] > 0

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.positive

    @staticmethod
    def jvp(ctx, tangent):
        return tangent * ctx.positive


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_kink_the_walk_cannot_see_fails_completeness(dtype):
    """A ReLU inside a custom Function (with a jvp) was taken for affine: one piece,
    0.28 relative from completeness, returned as exact."""
    model, shape = make("relu_mlp", "cpu", dtype=dtype)
    hidden = lambda x: model[2](_ReluWithJvp.apply(model[0](x)))  # noqa: E731
    inputs = torch.randn(4, *shape, dtype=dtype)
    with pytest.raises(NotPiecewiseLinearError, match="completeness.*custom torch.autograd.Function"):
        igfast.IntegratedGradients(hidden).attribute(inputs, target=1, method="exact")
    layered = nn.Sequential(model[0], nn.Identity(), model[2])
    layered.forward = lambda x: layered[2](_ReluWithJvp.apply(layered[1](layered[0](x))))
    with pytest.raises(NotPiecewiseLinearError, match="completeness"):
        igfast.LayerIntegratedGradients(layered, layered[1]).attribute(inputs, target=1, method="exact")
    # The same network with torch's ReLU is exact, and passes the check in either dtype.
    attributions, delta = igfast.IntegratedGradients(model).attribute(inputs, target=1, method="exact",
                                                                      return_convergence_delta=True)
    assert float(delta.abs().max()) < (1e-5 if dtype == torch.float32 else 1e-12)


def test_compiled_model_walks_its_eager_original():
    model, shape = make("relu_mlp", "cpu", dtype=torch.float32)
    inputs = torch.randn(3, *shape)
    expected = igfast.IntegratedGradients(model).attribute(inputs, target=1, method="exact")
    with pytest.warns(UserWarning, match="eager original"):
        compiled = igfast.IntegratedGradients(torch.compile(model)).attribute(inputs, target=1, method="exact")
    torch.testing.assert_close(compiled, expected, rtol=1e-5, atol=1e-6)


def test_compiled_code_inside_the_model_runs_eagerly_in_the_walk():
    """nn.Module.compile() and a compiled submodule: the walk failed inside PyTorch
    (LayerIG: an internal assert) or blamed a custom autograd.Function (IG)."""
    model, shape = make("relu_mlp", "cpu")
    inputs = torch.randn(3, *shape, dtype=torch.float64)
    expected = igfast.IntegratedGradients(model).attribute(inputs, target=1, method="exact")
    expected_layer = igfast.LayerIntegratedGradients(model, model[1]).attribute(inputs, target=1, method="exact")
    in_place, _ = make("relu_mlp", "cpu")
    in_place.compile()
    with_compiled_part, _ = make("relu_mlp", "cpu")
    with_compiled_part[0] = torch.compile(with_compiled_part[0])
    for compiled in (in_place, with_compiled_part):
        torch.testing.assert_close(igfast.IntegratedGradients(compiled).attribute(inputs, target=1, method="exact"),
                                   expected, rtol=1e-12, atol=1e-14)
        layer_attributions = igfast.LayerIntegratedGradients(compiled, compiled[1]).attribute(
            inputs, target=1, method="exact")
        torch.testing.assert_close(layer_attributions, expected_layer, rtol=1e-12, atol=1e-14)


STRICT_WARNINGS_SCRIPT = """
import json, sys, warnings, torch, igfast
warnings.simplefilter("error")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).double()
inputs = torch.randn(4, 6, dtype=torch.float64)
ig = igfast.IntegratedGradients(model)
runs = {}
for repeat in range(2):  # (a first call that fails can leave a half-imported module behind)
    for name, kwargs in (("exact", {"method": "exact"}), ("auto", {"n_steps": "auto", "tolerance": 1e-4}),
                         ("pieces", {"method": "gausslegendre_pieces", "n_steps": 2})):
        runs[name] = ig.attribute(inputs, target=1, **kwargs).tolist()
print(json.dumps(runs))
"""


def test_forward_mode_runs_with_warnings_as_errors():
    """The first dual tensor of a process made PyTorch warn (its own torch.jit.script
    deprecation) while loading its forward-mode decompositions: under -W error or
    pytest's filterwarnings = error, exact, auto and gausslegendre_pieces raised it."""
    completed = subprocess.run([sys.executable, "-W", "error", "-c", STRICT_WARNINGS_SCRIPT],
                               capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-2000:]
    runs = json.loads(completed.stdout.strip().splitlines()[-1])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    inputs = torch.randn(4, 6, dtype=torch.float64)
    ig = igfast.IntegratedGradients(model)
    expected = {"exact": ig.attribute(inputs, target=1, method="exact"),
                "auto": ig.attribute(inputs, target=1, n_steps="auto", tolerance=1e-4),
                "pieces": ig.attribute(inputs, target=1, method="gausslegendre_pieces", n_steps=2)}
    assert set(runs) == set(expected)
    for name, attributions in runs.items():
        torch.testing.assert_close(torch.tensor(attributions, dtype=torch.float64), expected[name],
                                   rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize("made_inside", [False, True])
@pytest.mark.parametrize("target", [1, "list"])
def test_exact_auto_and_pieces_under_inference_mode(made_inside, target):
    """Under torch.inference_mode() forward-mode AD carries no tangents: auto's probe took
    a ReLU MLP for smooth (257 nodes, tolerance missed, where it walks otherwise), and
    exact and gausslegendre_pieces failed writing the walk's records (inference tensors);
    a list target (per example) made an inference tensor that gather saved for backward.
    The same results as outside it, for IG and LayerIG, inputs made inside or outside."""
    model, shape = make("relu_mlp", "cpu")
    curved = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    inputs = torch.randn(3, *shape, dtype=torch.float64)
    target = [1, 0, 2] if target == "list" else target
    calls = {"exact": (model, {"method": "exact"}),
             "auto": (model, {"n_steps": "auto", "tolerance": 1e-4, "return_adaptive_info": True}),
             "pieces": (curved, {"method": "gausslegendre_pieces", "n_steps": 2}),
             "chunked": (model, {"n_steps": 8, "memory_budget": "4KB"})}
    for name, (network, kwargs) in calls.items():
        for explainer in (igfast.IntegratedGradients(network), igfast.LayerIntegratedGradients(network, network[1])):
            expected = explainer.attribute(inputs, target=target, **kwargs)
            with torch.inference_mode():
                given = inputs.clone() if made_inside else inputs
                got = explainer.attribute(given, target=target, **kwargs)
            if name == "auto":
                (expected, expected_info), (got, got_info) = expected, got
                assert bool(got_info.converged.all()) and float(got_info.exact.double().mean()) > 0
                assert torch.equal(got_info.evaluations, expected_info.evaluations), name
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14, msg=name)


def test_walks_inside_a_callers_forward_ad_level_and_in_threads():
    """PyTorch has one forward-AD level per process: inside a caller's dual_level() exact,
    auto and gausslegendre_pieces raised "Nested forward mode AD is not supported", and two
    threads walking at once failed. igfast's walks take turns; another's level is refused
    with a clear error (joining it crashed the process when its owner, another thread,
    closed it mid-walk), and auto goes on with its rule."""
    import threading

    model, shape = make("relu_mlp", "cpu")
    curved = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    inputs = torch.randn(3, *shape, dtype=torch.float64)
    calls = {"exact": (model, {"method": "exact"}), "auto": (model, {"n_steps": "auto", "tolerance": 1e-4}),
             "pieces": (curved, {"method": "gausslegendre_pieces", "n_steps": 2})}
    expected = {name: igfast.IntegratedGradients(network).attribute(inputs, target=1, **kwargs)
                for name, (network, kwargs) in calls.items()}
    with fwAD.dual_level():
        for name in ("exact", "pieces"):
            network, kwargs = calls[name]
            with pytest.raises(NotPiecewiseLinearError, match="forward-AD level is already open"):
                igfast.IntegratedGradients(network).attribute(inputs, target=1, **kwargs)
        with pytest.raises(NotPiecewiseLinearError, match="forward-AD level is already open"):
            igfast.LayerIntegratedGradients(model, model[1]).attribute(inputs, target=1, method="exact")
        by_rule, info = igfast.IntegratedGradients(model).attribute(inputs, target=1, n_steps="auto", tolerance=1e-2,
                                                                   max_steps=4097, return_adaptive_info=True)
        assert "already open" in info.exact_unavailable and not info.exact.any() and bool(info.converged.all())
        assert float(((by_rule - expected["exact"]).norm(dim=1) / expected["exact"].norm(dim=1)).max()) <= 1e-2
        inner = fwAD.make_dual(torch.ones(2), torch.ones(2))  # (the caller's level is still theirs)
        assert fwAD.unpack_dual(inner * 3).tangent is not None
    failures = []

    def work(names):
        for _ in range(4):
            for name in names:
                network, kwargs = calls[name]
                try:
                    got = igfast.IntegratedGradients(network).attribute(inputs, target=1, **kwargs)
                    if not torch.allclose(got, expected[name], rtol=1e-12, atol=1e-14):
                        failures.append((name, "differs"))
                except Exception as error:  # (collected: a thread's exception fails nothing)
                    failures.append((name, repr(error)))

    threads = [threading.Thread(target=work, args=(order,)) for order in (("exact", "pieces", "auto"),
                                                                         ("auto", "exact", "pieces"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
def test_exact_under_autocast_checks_completeness_at_its_precision(low):
    """Under torch.autocast a float32 path's matmuls run in the lower dtype: exact pieces
    missed completeness by 7.8e-3 (bfloat16) and the check blamed a hidden kink. It now
    allows that dtype's rounding; the result is the float32 one to that precision."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    inputs = torch.randn(4, 8)
    ig = igfast.IntegratedGradients(model)
    plain = ig.attribute(inputs, target=1, method="exact")
    with torch.autocast("cpu", dtype=low):
        lowered, delta = ig.attribute(inputs, target=1, method="exact", return_convergence_delta=True)
    error = float(((lowered - plain).norm(dim=1) / plain.norm(dim=1)).max())
    assert error < 4 * torch.finfo(low).eps
    assert float(delta.abs().max()) > 10 * torch.finfo(torch.float32).eps  # (it did compute in the lower dtype)


def test_the_models_own_not_implemented_error_reaches_the_caller():
    """The walk turns PyTorch's NotImplementedError for a part without forward-mode AD
    into NotPiecewiseLinearError (and auto then keeps its rule); a model's own
    NotImplementedError was turned too: exact blamed forward mode, and auto swallowed it
    and returned a result."""

    class Unfinished(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()

        def forward(self, x):
            raise NotImplementedError("the model's own: no backend for this input")

    inputs = torch.randn(3, 6, dtype=torch.float64)
    for kwargs in ({"method": "exact"}, {"n_steps": "auto"}, {"method": "gausslegendre_pieces", "n_steps": 2}):
        with pytest.raises(NotImplementedError, match="the model's own") as raised:
            igfast.IntegratedGradients(Unfinished()).attribute(inputs, target=1, **kwargs)
        assert raised.type is NotImplementedError


def test_an_explainer_pickles_in_size_linear_in_the_batch_after_exact():
    """info.breakpoints were views of one tensor, and pickle writes a view's whole
    storage: an explainer pickled after method="exact" (to a spawned process) grew with
    the batch squared (114 MB at batch 512)."""
    import pickle

    model, shape = make("relu_mlp", "cpu")
    sizes = {}
    for batch in (32, 256):
        explainer = igfast.IntegratedGradients(model)
        explainer.attribute(torch.randn(batch, *shape, dtype=torch.float64), target=1, method="exact")
        sizes[batch] = len(pickle.dumps(explainer))
        copy = pickle.loads(pickle.dumps(explainer))
        for ours, theirs in zip(explainer.last_integral.info.breakpoints, copy.last_integral.info.breakpoints):
            assert torch.equal(ours, theirs)
    assert sizes[256] < 2 * 8 * sizes[32]  # (8 times the examples; squared would be 64 times)


def test_non_finite_inputs_or_baselines_warn():
    """An inf or NaN end has no Integrated Gradients: exact, auto and gausslegendre_pieces
    gave NaN, zeros or finite numbers without saying so (auto warned of a tolerance).
    The fixed rules stay Captum's: no warning, NaN and inf where they fall."""
    model, shape = make("relu_mlp", "cpu")
    curved = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    inputs = torch.randn(3, *shape, dtype=torch.float64)
    inputs[1, 2] = math.inf
    nan_baseline = torch.zeros(1, *shape, dtype=torch.float64)
    nan_baseline[0, 0] = math.nan
    calls = ((model, {"method": "exact"}), (model, {"n_steps": "auto"}),
             (curved, {"method": "gausslegendre_pieces", "n_steps": 2}))
    for network, kwargs in calls:
        for x, baselines, count in ((inputs, None, "1 of 3"), (inputs.nan_to_num(posinf=1.0), nan_baseline, "3 of 3")):
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                igfast.IntegratedGradients(network).attribute(x, baselines, target=1, **kwargs)
            named = [w for w in seen if "finite" in str(w.message)]
            # One warning, at the caller's line (igfast's wrappers made a fixed stacklevel name its own files).
            assert len(named) == 1 and f"baselines of {count} examples are not finite" in str(named[0].message)
            assert named[0].filename == __file__, (kwargs, named[0].filename)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fixed = igfast.IntegratedGradients(model).attribute(inputs, target=1, n_steps=20)
    assert torch.isinf(fixed[1, 2]) and bool(torch.isfinite(fixed[0]).all())


def test_tuple_inputs_and_half_precision():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = relu_mlp()

        def forward(self, a, b):
            return self.net(torch.cat([a, b], dim=1))

    torch.manual_seed(2)
    model = TwoInputs().double().eval()
    a, b = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    (attr_a, attr_b), delta = igfast.IntegratedGradients(model).attribute((a, b), target=2, method="exact",
                                                                         return_convergence_delta=True)
    expected, _ = oracle(model.net, torch.cat([a, b], 1), torch.zeros(4, 6, dtype=torch.float64), 2)
    torch.testing.assert_close(torch.cat([attr_a, attr_b], 1), expected, rtol=1e-10, atol=1e-12)
    assert delta.abs().max() < 1e-12
    # Half precision: against the exact IG of the same rounded weights and inputs in float64.
    for dtype, bound in ((torch.bfloat16, 1e-2), (torch.float16, 1e-3)):  # measured 2.3e-3, 2.1e-4
        half = relu_mlp().to(dtype).eval()
        half.load_state_dict(model.net.state_dict())
        x = torch.cat([a, b], 1).to(dtype)
        attributions = igfast.IntegratedGradients(half).attribute(x, target=2, method="exact")
        assert attributions.dtype == torch.float32
        reference = igfast.IntegratedGradients(half.double()).attribute(x.double(), target=2, method="exact")
        _close(attributions.double(), reference, bound)


@pytest.mark.parametrize("activation", [nn.GELU, nn.Tanh, nn.Softplus])
def test_a_network_without_kinks_is_refused(activation):
    """No piecewise-linear op: there are no pieces, and one "smooth head" of 3 Gauss
    nodes was 5e-3 off on a GELU MLP, returned as exact."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 16), activation(), nn.Linear(16, 3)).double().eval()
    x = torch.randn(4, 10, dtype=torch.float64) * 3
    with pytest.raises(igfast.NotPiecewiseLinearError, match="no piecewise-linear op.*n_steps='auto'"):
        igfast.IntegratedGradients(net).attribute(x, target=0, method="exact")


def test_an_affine_network_is_one_exact_piece():
    torch.manual_seed(0)
    net = nn.Linear(10, 3).double()
    x = torch.randn(4, 10, dtype=torch.float64)
    attributions, delta = igfast.IntegratedGradients(net).attribute(x, target=2, method="exact",
                                                                    return_convergence_delta=True)
    torch.testing.assert_close(attributions, net.weight[2] * x, rtol=1e-12, atol=1e-14)
    assert float(delta.abs().max()) < 1e-12


def test_a_large_smooth_part_after_the_kinks_warns_unless_a_tolerance_refines_it():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 4), nn.ReLU(), nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                        nn.Linear(32, 3)).double().eval()
    x = torch.randn(4, 10, dtype=torch.float64) * 4
    ig = igfast.IntegratedGradients(net)
    # 16 Gauss nodes on each piece of an independent partition (a global rule is only
    # ~1e-4 accurate where the gradient jumps).
    reference, _ = oracle(net, x, torch.zeros_like(x), 0, nodes_per_piece=16)
    with pytest.warns(UserWarning, match="3 Gauss nodes per piece.*Give `tolerance`"):
        ig.attribute(x, target=0, method="exact")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
        refined = ig.attribute(x, target=0, method="exact", tolerance=1e-6)
    error = (refined - reference).norm(dim=1) / reference.norm(dim=1)
    assert float(error.max()) < 1e-6, error


def test_layer_exact_around_a_residual_branch():
    """The completeness check compares with F along the layer's own path (a branch
    bypasses the layer): it raised against F(baselines)."""
    from test_adaptive import _Residual

    model = _Residual(torch.relu).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    explainer = igfast.LayerIntegratedGradients(model, model.inner)
    exact = explainer.attribute(x, target=1, method="exact")
    # (the midpoint rule is off by about kinks x jump / steps: ~6e-6 at 20000 steps)
    reference = explainer.attribute(x, target=1, n_steps=200000, method="riemann_middle")
    torch.testing.assert_close(exact, reference, rtol=1e-4, atol=1e-6)


TIED_ALONG_THE_PATH = {
    # f(x) of rows (N, 4) whose kink stays tied along the whole path from 0: PyTorch's
    # gradient convention decides, and exact IG must follow it as every rule does.
    "amax splits": lambda x: x[:, :2].amax(1) + 3 * x[:, 3],  # x0 = x1
    "amin splits": lambda x: x[:, :2].amin(1) + x[:, 2],
    "clamp passes at its bound": lambda x: 3 * torch.clamp(x[:, 0] - x[:, 1], min=0) + x[:, 2],
    "clamp passes at its upper bound": lambda x: 3 * torch.clamp(x[:, 0] - x[:, 1], -1, 0) + x[:, 2],
    "hardtanh does not": lambda x: 3 * F.hardtanh(x[:, 0] - x[:, 1], 0.0, 1.0) + x[:, 2],
    "fmax gives the first": lambda x: 3 * torch.fmax(x[:, 0], x[:, 1]) + x[:, 2],
    "fmin gives the first": lambda x: 3 * torch.fmin(x[:, 0], x[:, 1]) + x[:, 2],
}


@pytest.mark.parametrize("case", sorted(TIED_ALONG_THE_PATH))
def test_ties_along_the_whole_path_follow_pytorchs_gradient(case):
    """amax/amin sent the whole gradient to one element (0.23-0.33 off), clamp treated
    its bound as outside (0.99 off), fmax split the gradient (0.70 off); auto, switching
    to the walk, reported them converged."""
    forward = TIED_ALONG_THE_PATH[case]
    x = torch.tensor([[1.0, 1.0, 0.5, 2.0], [2.0, 2.0, -1.0, 0.5]], dtype=torch.float64)
    captum_attr = pytest.importorskip("captum.attr")
    expected = captum_attr.IntegratedGradients(forward).attribute(x, n_steps=4, method="riemann_middle")
    exact = igfast.IntegratedGradients(forward).attribute(x, method="exact")
    torch.testing.assert_close(exact, expected, rtol=1e-12, atol=1e-12)


def test_clamp_with_tensor_bounds():
    """Per-unit constant bounds crashed the walk (a tensor compared with 0)."""
    torch.manual_seed(3)
    inner, outer = nn.Linear(6, 8).double(), nn.Linear(8, 3).double()
    low, high = -torch.rand(8, dtype=torch.float64), torch.rand(8, dtype=torch.float64)
    forward = lambda x: outer(torch.clamp(inner(x), low, high))  # noqa: E731
    x = torch.randn(3, 6, dtype=torch.float64)
    exact = igfast.IntegratedGradients(forward).attribute(x, target=1, method="exact")
    reference = igfast.IntegratedGradients(forward).attribute(x, target=1, n_steps=100000, method="riemann_middle")
    torch.testing.assert_close(exact, reference, rtol=1e-4, atol=1e-7)


def test_repeated_tokens_tie_in_a_max_over_the_sequence():
    """Two positions of one token are level along the whole path, to their last bits:
    the walk gave the second 1.2e-2 of the attributions where PyTorch's max gives it 0."""
    torch.manual_seed(5)

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.e, self.a, self.b, self.o = nn.Embedding(20, 6), nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)

        def forward(self, ids):
            return self.o(F.relu(self.b(F.relu(self.a(self.e(ids))))).max(1).values)

    model = Tokens().double().eval()
    ids = torch.tensor([[15, 6, 2, 6, 8]])
    explainer = igfast.LayerIntegratedGradients(model, model.e)
    exact = explainer.attribute(ids, baselines=torch.zeros_like(ids), target=1, method="exact")
    reference = explainer.attribute(ids, baselines=torch.zeros_like(ids), target=1, n_steps=100000,
                                    method="riemann_middle")
    assert float((exact - reference).norm() / reference.norm()) < 1e-4
    assert float(exact[0, 3].abs().max()) == 0.0  # the second occurrence never wins


def test_auto_keeps_its_rule_where_the_walk_cannot_follow():
    """An op without forward-mode AD before a ReLU (SiLU or GroupNorm then, whose
    backward the walk's gradient rounds differentiated forward; cdist now), which auto
    raised; a ReLU hidden in a custom Function (with a jvp): auto returned the walk, far
    off. Both now go on with the rule, and say why."""
    torch.manual_seed(0)
    x = torch.randn(4, 8, dtype=torch.float64)
    hidden_relu = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 3)).double()
    models = [CdistBeforeRelu(), lambda inputs: hidden_relu[1](_ReluWithJvp.apply(hidden_relu[0](inputs)))]
    for model in models:
        model = model.double().eval() if isinstance(model, nn.Module) else model
        attributions, info = igfast.IntegratedGradients(model).attribute(
            x, target=0, n_steps="auto", tolerance=1e-3, max_steps=1025, return_adaptive_info=True)
        reference = igfast.IntegratedGradients(model).attribute(x, target=0, n_steps=20000, method="riemann_middle")
        error = (attributions - reference).norm(dim=1) / reference.norm(dim=1)
        assert not bool(info.exact.any())
        assert bool((error[info.converged] <= 1e-3).all()), (error, info.converged)


IN_PLACE_FORMS = {
    "relu_": lambda h: h.relu_(),
    "nn.ReLU(inplace=True)": nn.ReLU(inplace=True),
    "F.leaky_relu(inplace=True)": lambda h: F.leaky_relu(h, 0.1, inplace=True),
    "F.hardtanh(inplace=True)": lambda h: F.hardtanh(h, -0.5, 0.5, inplace=True),
    "F.threshold(inplace=True)": lambda h: F.threshold(h, 0.1, 0.1, inplace=True),  # (continuous)
}


@pytest.mark.parametrize("form", list(IN_PLACE_FORMS))
def test_in_place_relu_and_functional_relu6_are_walked(form):
    """An in-place op whose result the model does not use (h.relu_(); nn.ReLU(inplace=True)
    calls F.relu(h, inplace=True)) left the model's tensor as it was: its kinks hidden,
    completeness off by 0.5 to 1.07; F.relu6 was not recognised."""
    torch.manual_seed(3)

    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.o = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)
            self.in_place = IN_PLACE_FORMS[form]

        def forward(self, inputs):
            hidden = self.a(inputs)
            self.in_place(hidden)
            return self.o(F.relu6(4 * self.b(hidden)))

    model = InPlace().double().eval()
    x = torch.randn(4, 8, dtype=torch.float64)
    explainer = igfast.IntegratedGradients(model)
    exact, info = explainer.attribute(x, target=0, method="exact", return_adaptive_info=True)
    reference = explainer.attribute(x, target=0, n_steps=200000, method="riemann_middle")
    assert bool((info.pieces > 1).all())
    assert float(((exact - reference).norm(dim=1) / reference.norm(dim=1)).max()) < 1e-5


@pytest.mark.parametrize("per_channel", [False, True])
def test_prelu_is_walked(per_channel):
    """nn.PReLU was refused as an op exact IG cannot read."""
    torch.manual_seed(3)
    if per_channel:
        model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.PReLU(4), nn.Flatten(), nn.Linear(100, 3))
        x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    else:
        model = nn.Sequential(nn.Linear(8, 16), nn.PReLU(), nn.Linear(16, 3))
        x = torch.randn(3, 8, dtype=torch.float64)
    model = model.double().eval()
    with torch.no_grad():
        model[1].weight.uniform_(-0.5, 0.5)
    explainer = igfast.IntegratedGradients(model)
    exact, info = explainer.attribute(x, target=0, method="exact", return_adaptive_info=True)
    reference = explainer.attribute(x, target=0, n_steps=200000, method="riemann_middle")
    assert bool((info.pieces > 1).all())
    error = (exact - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1)
    assert float(error.max()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_completeness_check_allows_the_forwards_own_rounding(dtype):
    """A deep MLP, a baseline 1e-6 from the input and the target logit nearest 0: F(x) -
    F(x') is rounding of terms of 1, and the check refused correct walks (3e-11 of a
    1e-2 floor in float64, 3.7e-3 in float32)."""
    torch.manual_seed(1)
    layers = []
    for width_in in (64,) + (384,) * 7:
        layers += [nn.Linear(width_in, 384), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(384, 10)).eval()
    for module in model:
        if isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.normal_(module.bias, std=0.1)
    model = model.to(dtype)
    x = torch.randn(4, 64, dtype=dtype)
    with torch.no_grad():
        target = model(x).abs().argmin(1)
    for distance in (1e-6, 1e-4):
        baselines = x + distance * torch.randn_like(x)
        igfast.IntegratedGradients(model).attribute(x, baselines, target=target, method="exact")


@pytest.mark.parametrize("pool, shape", [
    (nn.AdaptiveMaxPool2d(3), (2, 6, 6)),  # windows 2 wide: a max-pool
    (nn.AdaptiveMaxPool2d((2, None)), (2, 6, 6)),
    (nn.AdaptiveMaxPool2d(4), (2, 6, 6)),  # 1 or 2 wide, overlapping: was refused
    (nn.AdaptiveMaxPool2d((3, 2)), (2, 7, 5)),
    (nn.AdaptiveMaxPool1d(3), (2, 5)),
    (nn.AdaptiveMaxPool3d((2, 3, 2)), (2, 5, 4, 3)),
])
def test_adaptive_max_pool_is_walked(pool, shape):
    """AdaptiveMaxPool was refused, then walked only where its output size divides the
    input's; its windows of unequal widths are walked too (a float64 dense reference)."""
    torch.manual_seed(3)
    conv = {2: nn.Conv1d, 3: nn.Conv2d, 4: nn.Conv3d}[len(shape)]
    x = torch.randn(3, *shape, dtype=torch.float64)
    model = nn.Sequential(conv(2, 4, 3, padding=1), nn.ReLU(), pool, nn.Flatten()).double().eval()
    explainer = igfast.IntegratedGradients(lambda inputs: model(inputs).sum(1, keepdim=True))
    exact, delta, info = explainer.attribute(x, method="exact", return_adaptive_info=True,
                                             return_convergence_delta=True)
    reference = explainer.attribute(x, n_steps=200000, method="riemann_middle")
    assert bool((info.pieces > 1).all())
    error = (exact - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1)
    assert float(error.max()) < 1e-5
    assert float(delta.abs().max()) < 1e-12


def test_adaptive_max_pool_with_indices_walks_as_without():
    """Refused before ("adaptive_max_pool2d_with_indices"); its values are the pool's."""
    torch.manual_seed(0)
    with_indices = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(4, return_indices=True))
    with_indices = with_indices.double()
    without = nn.Sequential(*with_indices[:2], nn.AdaptiveMaxPool2d(4))
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    ours = igfast.IntegratedGradients(lambda inputs: with_indices(inputs)[0].flatten(1).sum(1, keepdim=True))
    theirs = igfast.IntegratedGradients(lambda inputs: without(inputs).flatten(1).sum(1, keepdim=True))
    torch.testing.assert_close(ours.attribute(x, method="exact"), theirs.attribute(x, method="exact"),
                               rtol=0, atol=0)


def test_one_output_column_without_a_target():
    """A model giving (N, 1) with target=None: the completeness check compared every
    example with every other (its F values were a column) and refused correct walks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1)).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    for explainer in (igfast.IntegratedGradients(model), igfast.LayerIntegratedGradients(model, model[0])):
        exact, delta = explainer.attribute(x, method="exact", return_convergence_delta=True)
        assert float(delta.abs().max()) < 1e-12


@pytest.mark.parametrize("form", ["trace", "script", "scripted_submodule"])
def test_torchscript_models_are_refused_by_the_walk_and_keep_autos_rule(form):
    """A traced model failed n_steps='auto' and method='exact' with PyTorch's internal
    assert from the TorchScript interpreter (_fw_primal); a scripted one was refused by
    completeness, blamed on autograd Functions. The walk cannot read TorchScript's ops."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3)).double().eval()
    x = torch.randn(4, 10, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # (PyTorch deprecates TorchScript)
        scripted = {"trace": lambda: torch.jit.trace(model, x), "script": lambda: torch.jit.script(model),
                    "scripted_submodule": lambda: nn.Sequential(torch.jit.script(model), nn.Identity())}[form]()
    explainer = igfast.IntegratedGradients(scripted)
    with pytest.raises(NotPiecewiseLinearError, match="cannot walk a TorchScript model"):
        explainer.attribute(x, target=1, method="exact")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", igfast.ToleranceNotReachedWarning)
        attributions, info = explainer.attribute(x, target=1, n_steps="auto", tolerance=1e-2,
                                                 return_adaptive_info=True)
    assert "TorchScript" in info.exact_unavailable and not bool(info.exact.any())
    reference = igfast.IntegratedGradients(model).attribute(x, target=1, method="exact")
    error = (attributions - reference).norm(dim=1) / reference.norm(dim=1)
    assert bool((error[info.converged] <= 1e-2).all()), error


def test_max_with_other_given_by_keyword_is_maximum():
    """torch.max(a, other=b) was refused as 'max over the whole tensor mixes the examples'."""
    torch.manual_seed(0)
    a, b, c = nn.Linear(6, 8).double(), nn.Linear(6, 8).double(), nn.Linear(8, 3).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    keyword = igfast.IntegratedGradients(lambda v: c(torch.max(a(v), other=b(v)))).attribute(x, target=0, method="exact")
    plain = igfast.IntegratedGradients(lambda v: c(torch.maximum(a(v), b(v)))).attribute(x, target=0, method="exact")
    torch.testing.assert_close(keyword, plain, rtol=0, atol=0)


def test_amax_over_several_dimensions_is_a_global_max_pool():
    """x.amax(dim=(2, 3)), a global max-pool, was refused ('over several dimensions is
    not supported'); it walks as adaptive_max_pool2d(x, 1) does."""
    torch.manual_seed(0)
    conv, head = nn.Conv2d(2, 4, 3).double(), nn.Linear(4, 3).double()
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    pooled = igfast.IntegratedGradients(lambda v: head(F.adaptive_max_pool2d(torch.relu(conv(v)), 1).flatten(1)))
    expected, info = pooled.attribute(x, target=0, method="exact", return_adaptive_info=True)
    assert bool((info.pieces > 3).all())
    for keepdim in (False, True):
        amax = igfast.IntegratedGradients(
            lambda v: head(torch.relu(conv(v)).amax(dim=(-1, 2), keepdim=keepdim).flatten(1)))
        torch.testing.assert_close(amax.attribute(x, target=0, method="exact"), expected, rtol=0, atol=0)
    with pytest.raises(NotPiecewiseLinearError, match="amax over dim 0 mixes"):
        igfast.IntegratedGradients(lambda v: head(torch.relu(conv(v)).amax(dim=(0, 2)).flatten(1)[:, :4])).attribute(
            x, target=0, method="exact")


AFFINE_FORMS = {  # each refused before as an op the walk could not tell
    "setitem": lambda h: (lambda g: (g.__setitem__((slice(None), 0), 0.5), g)[1])(h.clone()),
    "unfold": lambda h: h.unfold(1, 4, 2).flatten(1),
    "F.unfold": lambda h: F.unfold(h.view(-1, 1, 4, 4), 2).flatten(1),
    "diff": lambda h: torch.diff(h, dim=1),
    "rsub": lambda h: torch.rsub(h, 1.0),
    "index_add": lambda h: torch.zeros(h.shape[0], 8, dtype=h.dtype).index_add(1, torch.tensor([0, 3, 3, 7]), h[:, :4]),
    "scatter_add": lambda h: torch.zeros_like(h).scatter_add(1, torch.arange(16).flip(0).expand(h.shape[0], 16), h),
    "lerp": lambda h: torch.lerp(h, torch.ones_like(h), 0.3),
    "lerp_by_a_moving_weight": lambda h: torch.lerp(torch.zeros_like(h), torch.ones_like(h), h),
    "triu_rot90_diagonal": lambda h: torch.cat([torch.triu(h.view(-1, 4, 4)).flatten(1),
                                                torch.rot90(h.view(-1, 4, 4), 1, (1, 2)).flatten(1),
                                                h.view(-1, 4, 4).diagonal(dim1=1, dim2=2)], 1),
    "tensordot": lambda h: torch.tensordot(h, torch.linspace(-1, 1, 80, dtype=h.dtype).view(16, 5), dims=1),
    "rrelu_eval": lambda h: F.rrelu(h, training=False),
}


@pytest.mark.parametrize("form", list(AFFINE_FORMS))
def test_affine_ops_and_eval_rrelu_are_walked(form):
    torch.manual_seed(0)
    first = nn.Linear(16, 16).double()
    op = AFFINE_FORMS[form]
    width = op(torch.zeros(1, 16, dtype=torch.float64)).shape[1]
    last = nn.Linear(width, 3).double()

    def forward(x):
        return last(torch.relu(op(torch.relu(first(x)))))

    x = 2 * torch.randn(4, 16, dtype=torch.float64)
    explainer = igfast.IntegratedGradients(forward)
    exact, info = explainer.attribute(x, target=0, method="exact", return_adaptive_info=True)
    reference = explainer.attribute(x, target=0, n_steps=100000, method="riemann_middle")
    assert bool((info.pieces > 2).all())
    # (against the batch's largest norm: an example whose attributions nearly vanish
    # holds the dense rule's own error, 4e-7, at 1e-4 of itself)
    assert float((exact - reference).norm(dim=1).max() / reference.norm(dim=1).max()) < 1e-5


def test_products_whose_factors_both_move_and_rrelu_in_training_are_refused():
    torch.manual_seed(0)
    first = nn.Linear(16, 16).double()
    x = torch.randn(2, 16, dtype=torch.float64)
    for op, words in ((lambda h: torch.lerp(h, -h, torch.sigmoid(h)), "sigmoid"),
                      (lambda h: torch.kron(h[:, :4], h[:, 4:8]), "kron"),
                      (lambda h: torch.trapezoid(h.view(-1, 4, 4), x=h.view(-1, 4, 4)), "trapezoid"),
                      (lambda h: F.rrelu(h, training=True), "rrelu runs in training mode")):
        with pytest.raises(NotPiecewiseLinearError, match=words):
            igfast.IntegratedGradients(lambda v: torch.relu(op(torch.relu(first(v)))).sum(1, keepdim=True)).attribute(
                x, target=0, method="exact")


class PoolWithIndices(nn.Module):
    """A max-pool asked for its indices: unused, gathered again, or unpooled (SegNet)."""

    def __init__(self, use, adaptive=False):
        super().__init__()
        self.use, self.adaptive = use, adaptive
        self.conv, self.relu = nn.Conv2d(1, 3, 3, padding=1), nn.ReLU()
        self.pool = nn.AdaptiveMaxPool2d(3, return_indices=True) if adaptive else nn.MaxPool2d(2, return_indices=True)
        self.out = nn.Linear(108 if use == "unpool" else 27, 3)

    def forward(self, x):
        h = self.relu(self.conv(x))
        pooled, index = self.pool(h)
        if self.use == "gather":
            pooled = h.flatten(2).gather(2, index.flatten(2)).view_as(pooled)
        elif self.use == "unpool":
            pooled = F.max_unpool2d(pooled, index, 2, output_size=h.shape[-2:])
        return self.out(pooled.flatten(1))


@pytest.mark.parametrize("use,adaptive", [("unused", False), ("gather", False), ("unused", True)])
def test_max_pool_with_its_indices(use, adaptive):
    """return_indices=True was refused ("not supported"): the indices are the winners of
    the piece, as the values are."""
    torch.manual_seed(0)
    model = PoolWithIndices(use, adaptive).double().eval()
    inputs, baselines = torch.randn(2, 1, 6, 6, dtype=torch.float64), torch.zeros(2, 1, 6, 6, dtype=torch.float64)
    ours = igfast.IntegratedGradients(model).attribute(inputs, target=1, method="exact")
    expected, _ = oracle(model, inputs, baselines, target=1)
    _close(ours, expected, rtol=1e-10)
    _completeness(model, ours, inputs, baselines, 1, rtol=1e-12)


def test_max_unpool_after_a_max_pool_jumps_and_is_refused():
    """A MaxUnpool moves a value where its pool's winner switches: F jumps there, and
    the walk's completeness check refuses, naming it."""
    torch.manual_seed(1)
    model = PoolWithIndices("unpool").double().eval()
    inputs = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    with pytest.raises(NotPiecewiseLinearError, match="MaxUnpool"):
        igfast.IntegratedGradients(model).attribute(inputs, baselines=-inputs, target=1, method="exact")


@pytest.mark.parametrize("form", ["topk", "kthvalue", "median"])
@pytest.mark.parametrize("row", [[3.0, 3.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0], [1.0, 4.0, 4.0, 4.0, 2.0]])
def test_ties_that_last_the_whole_path_fall_as_autograds(form, row):
    """Elements that move alike (integer inputs, a zero baseline) are tied along the
    whole path: exact picked among them by a stable sort, where PyTorch's topk and
    kthvalue (and so autograd, Captum and every fixed rule) pick otherwise (0.83 off on
    a helper's integer images). It now asks PyTorch's own op."""
    weights = torch.tensor([1.0, 10.0], dtype=torch.float64)
    forward = {"topk": lambda x: (x.topk(2, -1).values * weights).sum(-1),
               "kthvalue": lambda x: 3 * x.kthvalue(2, -1).values,
               "median": lambda x: 3 * x.median(-1).values}[form]
    x = torch.tensor([row], dtype=torch.float64)
    ours = igfast.IntegratedGradients(forward).attribute(x, method="exact")
    fixed = igfast.IntegratedGradients(forward).attribute(x, n_steps=50)
    torch.testing.assert_close(ours, fixed, rtol=1e-8, atol=1e-8)  # (the 50 Gauss weights sum to 1 - 7e-10)
