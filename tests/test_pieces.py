"""method="gausslegendre_pieces": kinks after smooth ops, against independent oracles.

The oracle of test_exact reads every piecewise-linear unit's region with forward
hooks on a fine grid of the path and bisects each change: it does not care whether the
pre-activations are affine or curved, so it finds the breakpoints of these mixed
networks too, and integrates each of its pieces with 16 Gauss-Legendre nodes. A
one-input network whose kinks are the zeros of sines gives breakpoints in closed form.
"""

import math
import warnings

import pytest
import torch
import torch.nn as nn

import igfast
from igfast import ArgumentError, NotPiecewiseLinearError
from test_exact import OrderStatistics, Sorts, _close, _completeness, make, oracle, oracle_pieces


class Sigmoid(nn.Module):
    def forward(self, x):
        return torch.sigmoid(x)


def tanh_then_relu():
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                         nn.Linear(12, 3))


def gelu_layer_norm_then_leaky_and_clamp():
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 12), nn.LeakyReLU(0.2),
                         nn.Linear(12, 12), nn.Hardtanh(-0.5, 0.8), nn.Linear(12, 3))


def conv_softplus_then_max_pool():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Softplus(beta=2), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 5 * 5, 3), Sigmoid())


def tanh_then_sorts():
    return nn.Sequential(nn.Linear(6, 6), nn.Tanh(), Sorts())


def tanh_then_order_statistics():
    return nn.Sequential(nn.Linear(6, 6), nn.Tanh(), OrderStatistics())


MIXED = {
    "tanh_then_relu": (tanh_then_relu, (6,)),
    "gelu_layer_norm_then_leaky_and_clamp": (gelu_layer_norm_then_leaky_and_clamp, (6,)),
    "conv_softplus_then_max_pool": (conv_softplus_then_max_pool, (1, 12, 12)),
    "tanh_then_sorts": (tanh_then_sorts, (6,)),
    "tanh_then_order_statistics": (tanh_then_order_statistics, (6,)),
}


def make_mixed(name, device, dtype=torch.float64, seed=0):
    factory, shape = MIXED[name]
    torch.manual_seed(seed)
    return factory().to(device, dtype).eval(), shape


def _relative_l2(actual, expected):
    return (actual - expected).flatten(1).norm(dim=1) / expected.flatten(1).norm(dim=1)


@pytest.mark.parametrize("name", list(MIXED))
def test_pieces_equal_the_independent_partition_float64(name, device):
    model, shape = make_mixed(name, device)
    examples = 2 if name.startswith("conv") else 4
    inputs = 2 * torch.randn(examples, *shape, dtype=torch.float64, device=device)
    baselines = 0.3 * torch.randn(examples, *shape, dtype=torch.float64, device=device)
    # n_steps=3: no piece is cut (3 / n_steps is the whole path), 3 nodes per piece.
    attributions, info = igfast.IntegratedGradients(model).attribute(
        inputs, baselines, target=1, method="gausslegendre_pieces", n_steps=3, return_adaptive_info=True)
    expected, pieces = oracle(model, inputs, baselines, 1, nodes_per_piece=16)
    assert info.curved_kinks and info.nodes_per_piece == 3
    assert info.pieces.cpu().tolist() == pieces.tolist()
    assert (pieces >= 3).all(), "the workload must have kinks to find"
    for example in range(examples):
        torch.testing.assert_close(info.breakpoints[example], oracle_pieces(model, inputs[example], baselines[example]),
                                   rtol=0, atol=1e-9)
    # 3 Gauss nodes on smooth pieces (measured: 9e-6 to 1.3e-4 on the GELU and layer-norm
    # model, whose long pieces bend most; a missed or misplaced kink costs about 1e-2);
    # the error estimate (the midpoint rule's) stays above the true error.
    true_error = _relative_l2(attributions, expected)
    assert (true_error < 5e-4).all(), true_error
    assert (info.head_error_estimate.to(true_error) >= true_error).all()
    _completeness(model, attributions, inputs, baselines, 1, 5e-4)
    # Evaluations: 3 gradients per piece, one forward per walk round (at least one per
    # piece: curved kinks take a few Newton rounds).
    walk = info.evaluations - 3 * info.pieces - info.rows_check
    assert (walk >= info.pieces).all() and (walk <= 12 * info.pieces).all()


def test_kinks_of_sines_are_found_in_closed_form():
    """f(x) = sum_k w_k relu(sin(a_k x + c_k)) on the path 0 -> x of one input: unit k is
    at a kink where a_k t x + c_k is a multiple of pi. Units curve back and forth, each
    crossing many times; every crossing must be found (to 1e-9), none invented."""
    torch.manual_seed(4)
    a = torch.tensor([3.0, 7.5, 11.0, 2.2], dtype=torch.float64)
    c = torch.tensor([0.3, -1.0, 2.0, 0.1], dtype=torch.float64)
    w = torch.tensor([1.0, -0.7, 0.4, 2.0], dtype=torch.float64)

    def model(x):  # (B, 1) -> (B, 1)
        return (torch.relu(torch.sin(x * a + c)) * w).sum(1, keepdim=True)

    x = torch.tensor([[2.0], [-1.3]], dtype=torch.float64)
    attributions, info = igfast.IntegratedGradients(model).attribute(
        x, torch.zeros_like(x), target=0, method="gausslegendre_pieces", n_steps=3, return_adaptive_info=True)
    for example in range(2):
        crossings = [0.0]
        for k in range(4):
            phase_end = float(a[k] * x[example, 0] + c[k])
            low, high = sorted((float(c[k]), phase_end))
            for m in range(math.ceil(low / math.pi), math.floor(high / math.pi) + 1):
                crossings.append((m * math.pi - float(c[k])) / (phase_end - float(c[k])))
        expected = torch.tensor(sorted(t for t in crossings if t < 1), dtype=torch.float64)
        torch.testing.assert_close(info.breakpoints[example], expected, rtol=0, atol=1e-9)
        assert len(expected) >= 6
    # One input: completeness says the attribution is f(x) - f(0), up to the error of 3
    # Gauss nodes on pieces over which a sine turns by up to 2 radians (measured 4.7e-5).
    difference = model(x) - model(torch.zeros_like(x))
    torch.testing.assert_close(attributions, difference, rtol=5e-4, atol=0)
    # Cutting the pieces to at most 3 / n_steps: 3 nodes on each part, the same walk.
    finer, finer_info = igfast.IntegratedGradients(model).attribute(
        x, torch.zeros_like(x), target=0, method="gausslegendre_pieces", n_steps=300, return_adaptive_info=True)
    assert finer_info.pieces.tolist() == info.pieces.tolist()
    for example in range(2):
        starts = info.breakpoints[example]
        lengths = torch.diff(starts, append=torch.ones(1, dtype=torch.float64))
        parts = int(torch.ceil(lengths / (3 / 300)).sum())
        assert finer_info.evaluations[example] - info.evaluations[example] == 3 * (parts - len(starts))
    torch.testing.assert_close(finer, difference, rtol=1e-9, atol=0)


@pytest.mark.parametrize("most_sub_paths", [1, 64])
def test_on_a_piecewise_linear_network_it_is_exact_igs_walk(most_sub_paths, monkeypatch):
    """Newton's first step is the kink itself: one walk forward per piece (and one that
    checks the end, which a curved path needs), the same pieces as method="exact", and
    Gauss nodes on constant pieces add no error. A path split into sub-paths walked side
    by side pays two forwards per split (the new row's start, the old row's new end)."""
    monkeypatch.setattr(igfast.exact, "MAX_SUB_PATHS", most_sub_paths)
    model, shape = make("mixed_mlp", "cpu")
    inputs = torch.randn(4, *shape, dtype=torch.float64)
    ig = igfast.IntegratedGradients(model)
    exact, exact_info = ig.attribute(inputs, target=2, method="exact", return_adaptive_info=True)
    pieces, info = ig.attribute(inputs, target=2, method="gausslegendre_pieces", n_steps=3, return_adaptive_info=True)
    _close(pieces, exact, 1e-12)
    assert info.pieces.tolist() == exact_info.pieces.tolist()
    # 3 gradients and 1 forward per piece (and the layout check's two rows)
    splits = info.evaluations - info.rows_check - (4 * info.pieces + 1)
    if most_sub_paths == 1:
        assert splits.tolist() == [0] * 4
    else:
        assert (splits % 2 == 0).all() and (splits > 0).any() and (splits <= 2 * (most_sub_paths - 1)).all()
    for found, expected in zip(info.breakpoints, exact_info.breakpoints):
        torch.testing.assert_close(found, expected, rtol=0, atol=1e-12)


def test_sub_paths_walked_side_by_side_find_the_same_kinks_in_fewer_rounds(monkeypatch):
    """One input x, output sum_k w_k relu(tanh(x) - tanh(c_k)): a kink at each c_k along
    the path 0 -> 1, one of them at 0.5, where the first row splits. The kinks are
    found in closed form with rows split or not, the one on the cut is kept (no piece
    joined across it), and IG is F(1) - F(0) (one input)."""
    c = torch.cat([torch.linspace(0.01, 0.99, 41, dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)])
    c = c.unique()
    w = torch.randn(c.numel(), dtype=torch.float64)

    def model(x):  # (B, 1) -> (B, 1)
        return (torch.relu(torch.tanh(x) - torch.tanh(c)) * w).sum(1, keepdim=True)

    x, baseline = torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
    ig = igfast.IntegratedGradients(model)
    runs = {}
    for most, state_bytes in ((1, 2**26), (64, 2**26), (64, 1)):
        monkeypatch.setattr(igfast.exact, "MAX_SUB_PATHS", most)
        monkeypatch.setattr(igfast.exact, "SUB_PATH_BYTES", state_bytes)  # 1: no room for a second row
        runs[most if state_bytes > 1 else "no room"] = ig.attribute(
            x, baseline, target=0, method="gausslegendre_pieces", n_steps=3, return_adaptive_info=True)
    expected = torch.cat([torch.zeros(1, dtype=torch.float64), c])
    for attributions, info in runs.values():
        torch.testing.assert_close(info.breakpoints[0], expected, rtol=0, atol=1e-9)
        torch.testing.assert_close(attributions, model(x) - model(baseline), rtol=1e-6, atol=0)
    assert runs[64][1].walk_rounds * 3 < runs[1][1].walk_rounds
    assert runs["no room"][1].walk_rounds == runs[1][1].walk_rounds
    assert runs["no room"][1].evaluations.tolist() == runs[1][1].evaluations.tolist()
    # About two rows more per split (Newton from a new row's start may take a step more or
    # less than from the kink before it), and at most c.numel() / SUB_PATH_PIECES rows.
    extra = int(runs[64][1].evaluations[0] - runs[1][1].evaluations[0])
    assert 0 < extra <= 2 * (-(-c.numel() // igfast.exact.SUB_PATH_PIECES) - 1)


def test_examples_walked_in_groups_find_the_same_pieces(monkeypatch):
    """Where the rows of every example do not fit the memory the curved walk may hold,
    the examples walk in groups, one group after the other: the same pieces, the same
    attributions, only more rounds."""
    model, shape = make_mixed("tanh_then_relu", "cpu")
    g = torch.Generator().manual_seed(3)
    inputs = 2 * torch.randn(7, *shape, dtype=torch.float64, generator=g)
    baselines = torch.randn(7, *shape, dtype=torch.float64, generator=g)
    ig = igfast.IntegratedGradients(model)
    runs = {}
    for name, held in (("together", 2**26), ("groups", 1)):
        monkeypatch.setattr(igfast.exact, "SUB_PATH_BYTES", held)  # 1: one row at a time
        runs[name] = ig.attribute(inputs, baselines, target=1, method="gausslegendre_pieces", n_steps=3,
                                  return_adaptive_info=True)
    (together, info), (grouped, grouped_info) = runs["together"], runs["groups"]
    assert grouped_info.walk_rounds > info.walk_rounds
    for mine, theirs in zip(grouped_info.breakpoints, info.breakpoints):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-9)
    torch.testing.assert_close(grouped, together, rtol=1e-9, atol=1e-12)


def test_float32_matches_float64():
    model, shape = make_mixed("tanh_then_relu", "cpu")
    inputs = 2 * torch.randn(6, *shape, dtype=torch.float64)
    result64 = igfast.IntegratedGradients(model).attribute(inputs, target=0, method="gausslegendre_pieces")
    model32 = model.float()
    result32 = igfast.IntegratedGradients(model32).attribute(inputs.float(), target=0, method="gausslegendre_pieces")
    assert result32.dtype == torch.float32
    assert (_relative_l2(result32.double(), result64) < 1e-4).all()
    _completeness(model32, result32, inputs.float(), torch.zeros_like(inputs).float(), 0, 1e-4)


def test_layer_integrated_gradients_and_chunking(device):
    """LayerIG on the first linear layer's output: IG of the rest of the network (tanh,
    then ReLUs) between the layer's activations."""
    model, shape = make_mixed("tanh_then_relu", device)
    inputs = 2 * torch.randn(5, *shape, dtype=torch.float64, device=device)
    lig = igfast.LayerIntegratedGradients(model, model[0])
    attributions, info = lig.attribute(inputs, target=2, method="gausslegendre_pieces", return_adaptive_info=True)
    with torch.no_grad():
        ends, starts = model[0](inputs), model[0](torch.zeros_like(inputs))
    expected, pieces = oracle(model[1:], ends, starts, 2, nodes_per_piece=16)
    assert info.pieces.cpu().tolist() == pieces.tolist()
    assert (_relative_l2(attributions, expected) < 1e-4).all()
    ig = igfast.IntegratedGradients(model)
    whole = ig.attribute(inputs, target=2, method="gausslegendre_pieces")
    chunked = ig.attribute(inputs, target=2, method="gausslegendre_pieces", internal_batch_size=2)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-12)


def test_noise_tunnel_and_dataset_take_the_method(tmp_path):
    model, shape = make_mixed("tanh_then_relu", "cpu")
    inputs = torch.randn(3, *shape, dtype=torch.float64)
    ig = igfast.IntegratedGradients(model)
    nt = igfast.NoiseTunnel(ig)
    torch.manual_seed(2)
    pieces = nt.attribute(inputs, nt_type="smoothgrad", nt_samples=2, stdevs=0.1, target=1,
                          method="gausslegendre_pieces")
    torch.manual_seed(2)
    fine = nt.attribute(inputs, nt_type="smoothgrad", nt_samples=2, stdevs=0.1, target=1, n_steps=4096)
    _close(pieces, fine, 2e-3)  # the fine rule's own error at its kinks
    data = torch.utils.data.TensorDataset(inputs)
    igfast.attribute_dataset(model, data, str(tmp_path), target=1, method="gausslegendre_pieces", batch_size=2,
                             progress=False)
    stored = igfast.open_attributions(str(tmp_path)).attributions[:]
    torch.testing.assert_close(stored, ig.attribute(inputs, target=1, method="gausslegendre_pieces"),
                               rtol=1e-12, atol=1e-14)


def test_corners_zero_length_paths_smooth_networks_and_kinks_at_the_start(device):
    model, shape = make_mixed("tanh_then_relu", device)
    inputs = torch.randn(3, *shape, dtype=torch.float64, device=device)
    ig = igfast.IntegratedGradients(model)
    attributions, info = ig.attribute(inputs, inputs.clone(), target=0, method="gausslegendre_pieces",
                                      return_adaptive_info=True)
    assert torch.equal(attributions, torch.zeros_like(attributions)) and info.pieces.tolist() == [1, 1, 1]
    # No piecewise-linear op: one smooth piece, cut into 17 parts of 3 Gauss nodes for
    # n_steps=50 (and one walk forward; the layout check's two rows for one example).
    smooth = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2)).to(device, torch.float64)
    attributions, info = igfast.IntegratedGradients(smooth).attribute(
        inputs, target=1, method="gausslegendre_pieces", return_adaptive_info=True)
    assert info.pieces.tolist() == [1, 1, 1] and (info.evaluations - info.rows_check).tolist() == [52, 52, 52]
    _close(attributions, igfast.IntegratedGradients(smooth).attribute(inputs, target=1, n_steps=256), 1e-8)
    # A zero baseline through tanh (tanh(0) = 0) and bias-free layers: every ReLU unit
    # starts on its kink and takes the side the path moves into.
    torch.manual_seed(6)
    on_kinks = nn.Sequential(nn.Linear(6, 8, bias=False), nn.Tanh(), nn.Linear(8, 8, bias=False), nn.ReLU(),
                             nn.Linear(8, 2)).to(device, torch.float64)
    baselines = torch.zeros_like(inputs)
    attributions = igfast.IntegratedGradients(on_kinks).attribute(inputs, baselines, target=1,
                                                                  method="gausslegendre_pieces")
    expected, _ = oracle(on_kinks, inputs, baselines, 1, nodes_per_piece=16)
    assert (_relative_l2(attributions, expected) < 1e-4).all()


def test_exact_names_the_method_for_mixed_networks_and_arguments_are_checked():
    model, shape = make_mixed("tanh_then_relu", "cpu")
    inputs = torch.randn(2, *shape, dtype=torch.float64)
    ig = igfast.IntegratedGradients(model)
    with pytest.raises(NotPiecewiseLinearError, match="gausslegendre_pieces"):
        ig.attribute(inputs, target=0, method="exact")
    for kwargs, match in (({"n_steps": "auto"}, "n_steps"), ({"tolerance": -1e-3}, "tolerance"),
                          ({"max_steps": 0}, "max_steps"), ({"max_steps": 2}, "gausslegendre_pieces.*max_steps")):
        with pytest.raises(ArgumentError, match=match):
            ig.attribute(2 * inputs, target=0, method="gausslegendre_pieces", **kwargs)
    with pytest.raises(ArgumentError, match="n_steps"):
        ig.attribute(inputs, target=0, method="gausslegendre_pieces", n_steps=0)
    # Refusals of an op's form name the method that refused it.
    unsorted = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), UnsortedTopk()).double()
    with pytest.raises(NotPiecewiseLinearError, match="method='gausslegendre_pieces': topk with sorted=False"):
        igfast.IntegratedGradients(unsorted).attribute(inputs, target=0, method="gausslegendre_pieces")


class CurvedByAnotherRoute(nn.Module):
    """tanh before a ReLU, its output reaching the ReLU through a property's view or
    written into another tensor in place."""

    def __init__(self, route):
        super().__init__()
        self.route = route
        self.first, self.second, self.out = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        curved = torch.tanh(0.3 * self.first(x))
        if self.route == "mT":
            curved = curved.unsqueeze(1).mT.squeeze(2)
        elif self.route == "T":
            curved = curved.T.T
        elif self.route == "setitem":
            written = torch.zeros_like(curved)
            written[:, :] = curved
            curved = written
        elif self.route == "view add_":  # written through a view: the whole storage is curved
            written = self.first(x).clone()
            written[:, :4].add_(curved[:, :4])
            curved = written
        elif self.route == "narrow copy_":
            written = self.first(x) * 0.5
            written.narrow(1, 2, 6).copy_(curved[:, 2:])
            curved = written
        elif self.route == "index_put_":
            written = torch.zeros_like(curved)
            written.index_put_((torch.arange(x.shape[0]),), curved)
            curved = written
        return self.out(torch.relu(self.second(curved)))


@pytest.mark.parametrize("route", ["mT", "T", "setitem", "view add_", "narrow copy_", "index_put_"])
def test_a_smooth_op_before_a_kink_is_seen_through_views_and_writes(route):
    """Through .mT or h[:, :] = tanh(z) the smooth op's mark was lost: exact took tanh
    for a smooth head after the last kink and returned attributions 1e-2 off, without a
    word, and n_steps='auto' switched to that walk and reported them converged."""
    torch.manual_seed(0)
    model = CurvedByAnotherRoute(route).double().eval()
    inputs = 2 * torch.randn(3, 6, dtype=torch.float64)
    ig = igfast.IntegratedGradients(model)
    with pytest.raises(NotPiecewiseLinearError, match="tanh is applied to the path before relu"):
        ig.attribute(inputs, target=[0, 1, 2], method="exact")
    reference = ig.attribute(inputs, target=[0, 1, 2], method="gausslegendre_pieces", tolerance=1e-11)
    dense = ig.attribute(inputs, target=[0, 1, 2], n_steps=20000, method="riemann_trapezoid")
    assert float(((reference - dense).norm(dim=1) / reference.norm(dim=1)).max()) < 1e-4
    auto, info = ig.attribute(inputs, target=[0, 1, 2], n_steps="auto", tolerance=1e-3, return_adaptive_info=True)
    errors = (auto - reference).norm(dim=1) / reference.norm(dim=1)
    assert bool((errors[info.converged] <= 1e-3).all()), (errors, info.converged)


class UnsortedTopk(nn.Module):
    def forward(self, x):
        return x.topk(2, dim=1, sorted=False).values


def test_transformer_encoder_layer_with_relu_feed_forward(device):
    """nn.TransformerEncoderLayer: layer norm and attention (nn.MultiheadAttention, which
    the walk runs by parts: its fused kernel has no forward-mode derivative) before the
    ReLU of the feed-forward block, one kink per token and hidden unit."""
    torch.manual_seed(7)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, dropout=0.0, activation=nn.ReLU(),
                                       batch_first=True)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(4 * 16, 3)).to(device, torch.float64).eval()
    inputs = torch.randn(2, 4, 16, dtype=torch.float64, device=device)
    baselines = 0.5 * torch.randn(2, 4, 16, dtype=torch.float64, device=device)
    attributions, info = igfast.IntegratedGradients(model).attribute(
        inputs, baselines, target=0, method="gausslegendre_pieces", return_adaptive_info=True)
    expected, pieces = oracle(model, inputs, baselines, 0, nodes_per_piece=16)
    assert info.pieces.cpu().tolist() == pieces.tolist() and (pieces > 10).all()
    assert (_relative_l2(attributions, expected) < 1e-5).all(), _relative_l2(attributions, expected)


class SequenceFirst(nn.Module):
    """A batch-first model that runs its encoder layer sequence-first (batch_first=False,
    PyTorch's default), so the layer's ReLU sees (tokens, path rows, units)."""

    def __init__(self, tokens: int, width: int = 8, flatten_transpose: bool = False) -> None:
        super().__init__()
        self.tokens, self.width, self.flatten_transpose = tokens, width, flatten_transpose
        self.layer = nn.TransformerEncoderLayer(width, 2, dim_feedforward=16, dropout=0.0, activation="relu")
        self.first, self.second = nn.Linear(width, 12), nn.Linear(12, width)
        self.out = nn.Linear(tokens * width, 3)

    def forward(self, x):
        h = x.view(x.shape[0], self.tokens, self.width).transpose(0, 1)  # (tokens, rows, units)
        if self.flatten_transpose:  # (tokens * rows, units): the rows interleaved
            h = self.second(torch.relu(self.first(h.reshape(-1, self.width)))).view_as(h)
        else:
            h = self.layer(h)
        return self.out(h.transpose(0, 1).reshape(x.shape[0], -1))


@pytest.mark.parametrize("tokens, batch, flatten_transpose", [(2, 1, False), (4, 2, False), (8, 4, True), (3, 3, True)])
@pytest.mark.parametrize("method", ["gausslegendre_pieces", "exact", "auto"])
def test_a_layer_that_mixes_the_path_rows_is_refused_whatever_its_sequence_length(tokens, batch, flatten_transpose,
                                                                                  method):
    """Where a sequence-first layer's length is a multiple of the walk's rows, the first
    dimension's size looked right: gausslegendre_pieces gave 2.9e-4 off (one example,
    two tokens) without a word. A probe row's tangent that reaches another row's part
    of dim 0 now refuses; n_steps="auto" goes on with its rule and says why."""
    torch.manual_seed(tokens * 10 + batch)
    model = SequenceFirst(tokens, flatten_transpose=flatten_transpose).double().eval()
    inputs = torch.randn(batch, tokens * 8, dtype=torch.float64)
    ig = igfast.IntegratedGradients(model)
    if method == "auto":
        # (It walks only where the probe predicts the walk cheaper; the layout is checked then.)
        attributions, info = ig.attribute(inputs, target=0, n_steps="auto", tolerance=1e-3, max_steps=64,
                                          return_adaptive_info=True)
        assert not info.exact.any()
        assert info.exact_unavailable is None or "mixes the path's rows" in info.exact_unavailable
        assert info.exact_unavailable is not None or flatten_transpose is False
        errors = _relative_l2(attributions, ig.attribute(inputs, target=0, n_steps=4000))
        assert bool((errors[info.converged] <= 1e-3).all()), (errors, info.converged)
        return
    # (method="exact" meets the encoder's attention before its ReLU, and says so first)
    curved_first = method == "exact" and not flatten_transpose
    with pytest.raises(igfast.NotPiecewiseLinearError,
                       match="applied to the path before relu" if curved_first else "mixes the path's rows.*batch_first=True"):
        ig.attribute(inputs, target=0, method=method)


class PerTokenMLP(nn.Module):
    """A ReLU MLP per token, on the tokens flattened sequence-first ((tokens * rows,
    width): the rows interleaved) or batch-first."""

    def __init__(self, tokens: int, width: int, sequence_first: bool) -> None:
        super().__init__()
        self.tokens, self.width, self.sequence_first = tokens, width, sequence_first
        self.first, self.second = nn.Linear(width, 12), nn.Linear(12, width)
        self.out = nn.Linear(tokens * width, 3)

    def forward(self, x):
        h = x.view(x.shape[0], self.tokens, self.width)
        h = h.transpose(0, 1) if self.sequence_first else h
        h = self.second(torch.relu(self.first(h.reshape(-1, self.width)))).view_as(h)
        h = h.transpose(0, 1) if self.sequence_first else h
        return self.out(h.reshape(x.shape[0], -1))


def test_the_rows_probe_moves_every_unit_and_its_rows_are_counted():
    """Where the paths move only the first token, a probe along the path's direction
    stayed in the first row's part of the interleaved rows and passed: 1.3e-3 off
    without a word. Its tangent is drawn over every unit. n_steps="auto" counts the
    probe's two rows where it refuses the walk (the model ran them)."""
    torch.manual_seed(2)
    model = PerTokenMLP(4, 4, sequence_first=True).double().eval()
    inputs = 2 * torch.randn(2, 16, dtype=torch.float64)
    baselines = inputs.clone()
    baselines[:, :4] = 0.3 * torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(NotPiecewiseLinearError, match="mixes the path's rows"):
        igfast.IntegratedGradients(model).attribute(inputs, baselines, target=0, method="gausslegendre_pieces")
    rows = []
    model = PerTokenMLP(3, 8, sequence_first=True).double().eval()
    model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    _, info = igfast.IntegratedGradients(model).attribute(
        torch.randn(3, 24, dtype=torch.float64), target=0, n_steps="auto", tolerance=1e-3, max_steps=64,
        return_adaptive_info=True)
    assert "mixes the path's rows" in info.exact_unavailable and 2 in rows
    assert sum(rows) == int(info.evaluations.sum())


class MaskedSequenceFirst(nn.Module):
    """Tokens past each example's length masked to zero, then a ReLU on (tokens, rows,
    units): a sequence-first layer whose last tokens carry nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.out = nn.Linear(4, 16), nn.Linear(16, 3)

    def forward(self, x, lengths):
        h = self.first(x).transpose(0, 1)  # (tokens, rows, units)
        mask = torch.arange(x.shape[1]).view(-1, 1) < lengths.view(1, -1)
        return self.out((torch.relu(h * mask.unsqueeze(-1).to(h))).sum(0))


class CentredOverTheBatch(nn.Module):
    """A ReLU MLP whose logits are centred over the batch: rows mixed after the last kink."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        z = self.body(x)
        return z - z.mean(0, keepdim=True)


@pytest.mark.parametrize("method", ["exact", "gausslegendre_pieces"])
def test_the_rows_probe_checks_both_rows_and_the_output(method):
    """Two holes of a one-way check on the first row (a helper's sweep): a sequence-first
    layer whose second half of tokens is masked to zero kept that row's tangent in its
    own part (1.1e-2 off without a word); logits centred over the batch mix the rows
    after the last kink (3.5e-2 to 9.5e-2 off). Each row's part is now checked against
    the other's tangent, and the output too."""
    torch.manual_seed(0)
    inputs, lengths = torch.randn(2, 8, 4, dtype=torch.float64), torch.tensor([4, 3])
    model = MaskedSequenceFirst().double().eval()
    with pytest.raises(NotPiecewiseLinearError, match="relu sees .* mixes the path's rows"):
        igfast.IntegratedGradients(model).attribute(inputs, target=0, additional_forward_args=(lengths,),
                                                    method=method, internal_batch_size=2)
    with pytest.raises(NotPiecewiseLinearError, match="the model's output, of shape .* mixes the path's rows"):
        igfast.IntegratedGradients(CentredOverTheBatch().double().eval()).attribute(
            torch.randn(3, 6, dtype=torch.float64), target=1, method=method)


@pytest.mark.parametrize("method", ["exact", "gausslegendre_pieces"])
def test_an_empty_batch_reports_no_rows_check(method):
    """ExactInfo.rows_check is a tensor like evaluations for every batch (it was None for
    an empty one, where every other batch has one)."""
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
    attributions, info = igfast.IntegratedGradients(model).attribute(
        torch.zeros(0, 6, dtype=torch.float64), target=0, method=method, return_adaptive_info=True)
    assert attributions.shape == (0, 6)
    assert info.rows_check.shape == info.evaluations.shape == (0,) and info.rows_check.dtype == torch.int64


def test_a_model_that_takes_one_row_is_walked_one_row_at_a_time():
    """With internal_batch_size=1 every walk forward holds one row, whose units cannot
    mix with another's: the layout check (two rows) is skipped, and a model with a
    batch of one written into it (x.view(1, ...)) is walked, as before the check."""
    torch.manual_seed(0)
    body = PerTokenMLP(4, 4, sequence_first=False).double().eval()
    one_row = lambda x: body(x.view(1, 16))
    inputs, baselines = torch.randn(1, 16, dtype=torch.float64), 0.3 * torch.randn(1, 16, dtype=torch.float64)
    expected = igfast.IntegratedGradients(body).attribute(inputs, baselines, target=0, method="exact")
    for method in ("exact", "gausslegendre_pieces"):
        ours, info = igfast.IntegratedGradients(one_row).attribute(
            inputs, baselines, target=0, method=method, internal_batch_size=1, return_adaptive_info=True)
        _close(ours, expected, 1e-12)
        assert info.rows_check.tolist() == [0]


def test_the_rows_probe_passes_batch_first_layers_and_lone_examples():
    """The probe refuses no layout the walk reads right: the same layer batch-first is
    walked, for one example and for several, to the independent partition's pieces and
    attributions."""
    torch.manual_seed(3)
    # (a ReLU module, which the oracle's hooks see)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, activation=nn.ReLU(), batch_first=True)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(2 * 8, 3)).double().eval()
    for batch in (1, 3):
        inputs = torch.randn(batch, 2, 8, dtype=torch.float64)
        # (not zero: LayerNorm of a zero input turns within 1e-3 of the start, a stretch
        # 16 nodes per piece of the oracle miss by 2e-4)
        baselines = 0.5 * torch.randn(batch, 2, 8, dtype=torch.float64)
        attributions, info = igfast.IntegratedGradients(model).attribute(
            inputs, baselines, target=1, method="gausslegendre_pieces", return_adaptive_info=True)
        expected, pieces = oracle(model, inputs, baselines, 1, nodes_per_piece=16)
        assert info.pieces.tolist() == pieces.tolist()
        assert (_relative_l2(attributions, expected) < 1e-5).all(), _relative_l2(attributions, expected)


def test_refinement_bisects_the_fewest_pieces_that_carry_the_error():
    # Example 0: norms 5, 1, 0.5 against a budget of 1.2 split the first two (1.5 and
    # then 0.5 are left); example 1 is within its budget; example 2 is done.
    owners = torch.tensor([0, 1, 0, 0, 1, 2])
    norms = torch.tensor([1.0, 2.0, 5.0, 0.5, 2.0, 9.0], dtype=torch.float64)
    undone = torch.tensor([True, True, False])
    budget = torch.tensor([1.2, 10.0, 0.0], dtype=torch.float64)
    split = igfast.exact._largest_carrying(owners, norms, undone, budget, 3)
    assert split.tolist() == [True, False, True, False, False, False]


@pytest.mark.parametrize("name", ["tanh_then_relu", "gelu_layer_norm_then_leaky_and_clamp"])
def test_a_tolerance_makes_the_gauss_nodes_on_the_pieces_adaptive(name):
    """With `tolerance`, each piece gets a Gauss pair (3 and 2 nodes) and the pieces that
    carry the error are bisected until the estimate is within it: checked against the
    independent partition with 16 nodes per piece; tighter costs more."""
    model, shape = make_mixed(name, "cpu")
    inputs = 2 * torch.randn(4, *shape, dtype=torch.float64)
    baselines = 0.3 * torch.randn(4, *shape, dtype=torch.float64)
    expected, pieces = oracle(model, inputs, baselines, 1, nodes_per_piece=16)
    ig = igfast.IntegratedGradients(model)
    _, plain = ig.attribute(inputs, baselines, target=1, method="gausslegendre_pieces", n_steps=3,
                            return_adaptive_info=True)
    evaluations = plain.evaluations
    for tolerance in (1e-5, 1e-8, 1e-10):
        attributions, info = ig.attribute(inputs, baselines, target=1, method="gausslegendre_pieces", n_steps=3,
                                          tolerance=tolerance, return_adaptive_info=True)
        assert info.pieces.tolist() == pieces.tolist()  # the same kinks
        error = _relative_l2(attributions, expected)
        estimate = info.head_error_estimate.double()
        assert bool((error <= estimate).all()) and bool((estimate <= tolerance).all()), (tolerance, error, estimate)
        assert bool((info.evaluations >= evaluations).all())
        evaluations = info.evaluations
    assert bool((evaluations > plain.evaluations).all())


def test_tangent_shortcuts_match_forward_mode_ad():
    """The walk computes the tangents of add / sub / mul / div with a constant and of
    layer_norm itself (PyTorch's forward AD takes a slow path there): every form, with
    either operand moving, against torch.autograd.forward_ad."""
    import torch.autograd.forward_ad as fwAD
    import torch.nn.functional as F
    from igfast.piecewise import TANGENT_SHORTCUTS

    x, t = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    b, w = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    cases = [("add", torch.add, lambda d: (d, b), {}), ("add", torch.add, lambda d: (b, d), {}),
             ("add", torch.add, lambda d: (d, b), {"alpha": 3}), ("add", torch.add, lambda d: (b, d), {"alpha": -2.5}),
             ("add", torch.add, lambda d: (d[:, :1], b), {}), ("__add__", torch.Tensor.__add__, lambda d: (d, 2.0), {}),
             ("__radd__", torch.Tensor.__radd__, lambda d: (d, 2.0), {}), ("sub", torch.sub, lambda d: (d, b), {}),
             ("sub", torch.sub, lambda d: (b, d), {}), ("sub", torch.sub, lambda d: (b, d), {"alpha": 2}),
             ("__sub__", torch.Tensor.__sub__, lambda d: (d, 1.5), {}),
             ("__rsub__", torch.Tensor.__rsub__, lambda d: (d, 1.5), {}),
             ("__rsub__", torch.Tensor.__rsub__, lambda d: (d, b), {}), ("mul", torch.mul, lambda d: (d, b), {}),
             ("mul", torch.mul, lambda d: (b, d), {}), ("__mul__", torch.Tensor.__mul__, lambda d: (d, 0.3), {}),
             ("__rmul__", torch.Tensor.__rmul__, lambda d: (d, 0.3), {}), ("div", torch.div, lambda d: (d, w), {}),
             ("__truediv__", torch.Tensor.__truediv__, lambda d: (d, 7.0), {}),
             ("layer_norm", F.layer_norm, lambda d: (d, (4,)), {}), ("layer_norm", F.layer_norm, lambda d: (d, (4,), w, b), {}),
             ("layer_norm", F.layer_norm, lambda d: (d.view(5, 2, 2), (2, 2)), {"eps": 1e-3}),
             # Their backward has no forward-mode formula (the walk's gradient rows failed).
             ("silu", F.silu, lambda d: (d,), {}), ("mish", F.mish, lambda d: (d,), {}),
             ("group_norm", F.group_norm, lambda d: (d, 2), {}), ("group_norm", F.group_norm, lambda d: (d, 2, w, b), {}),
             ("group_norm", F.group_norm, lambda d: (d.view(5, 4, 1), 4, w, b), {"eps": 1e-3}),
             ("group_norm", F.group_norm, lambda d: (d.view(1, 4, 5), 1), {})]
    with fwAD.dual_level():
        for name, func, operands, kwargs in cases:
            args = operands(fwAD.make_dual(x, t))
            expected, got = func(*args, **kwargs), TANGENT_SHORTCUTS[name](func, args, kwargs)
            assert torch.equal(fwAD.unpack_dual(got).primal, fwAD.unpack_dual(expected).primal), name
            torch.testing.assert_close(fwAD.unpack_dual(got).tangent, fwAD.unpack_dual(expected).tangent,
                                       rtol=1e-12, atol=1e-12, msg=f"{name} {kwargs}")
        # The walk's gradient rows differentiate the value: the gradient flows through it.
        leaf = x.clone().requires_grad_()
        for name, func, operands, kwargs in cases:
            args = operands(fwAD.make_dual(leaf, t))
            plain = operands(leaf)
            got = torch.autograd.grad(TANGENT_SHORTCUTS[name](func, args, kwargs).sum(), leaf)[0]
            torch.testing.assert_close(got, torch.autograd.grad(func(*plain, **kwargs).sum(), leaf)[0],
                                       rtol=1e-12, atol=1e-12, msg=f"gradient of {name} {kwargs}")
        # Where both operands move, or the divisor does, the op runs as it is.
        d = fwAD.make_dual(x, t)
        assert TANGENT_SHORTCUTS["mul"](torch.mul, (d, d), {}) is None
        assert TANGENT_SHORTCUTS["div"](torch.div, (b, d), {}) is None


@pytest.mark.parametrize("form", ["self", "cross_separate_weights", "masks_bool", "masks_float", "unbatched"])
def test_attention_by_parts_matches_forward_mode_ad(form):
    """nn.MultiheadAttention's and scaled_dot_product_attention's tangents, written out
    for the walk, against forward-mode AD through PyTorch's own attention by parts."""
    import torch.autograd.forward_ad as fwAD
    import torch.nn.functional as F
    from igfast.piecewise import _attention_by_parts, _multi_head_attention_by_parts

    torch.manual_seed(3)
    mha = nn.MultiheadAttention(8, 2, kdim=6 if form == "cross_separate_weights" else None,
                                vdim=6 if form == "cross_separate_weights" else None).double().eval()
    batch, target, source = 3, 4, 5 if form == "cross_separate_weights" else 4
    q = torch.randn(target, batch, 8, dtype=torch.float64)
    kv = torch.randn(source, batch, 6 if form == "cross_separate_weights" else 8, dtype=torch.float64)
    kwargs = {}
    if form == "masks_bool":
        kwargs = {"attn_mask": torch.rand(target, source) < 0.3, "key_padding_mask": torch.tensor(
            [[False] * source, [False] * (source - 1) + [True], [True] + [False] * (source - 1)])}
        kwargs["attn_mask"][:, 0] = False  # no row fully masked
    if form == "masks_float":
        kwargs = {"attn_mask": torch.randn(batch * 2, target, source, dtype=torch.float64),
                  "key_padding_mask": torch.randn(batch, source, dtype=torch.float64)}
    with fwAD.dual_level():
        query = fwAD.make_dual(q, torch.randn_like(q))
        memory = query if form != "cross_separate_weights" else fwAD.make_dual(kv, torch.randn_like(kv))
        if form == "unbatched":
            query = memory = query[:, 0]
        arguments = (query, memory, memory, 8, 2, mha.in_proj_weight, mha.in_proj_bias, None, None, False, 0.0,
                     mha.out_proj.weight, mha.out_proj.bias)
        options = dict(training=False, use_separate_proj_weight=not mha._qkv_same_embed_dim,
                       q_proj_weight=mha.q_proj_weight, k_proj_weight=mha.k_proj_weight,
                       v_proj_weight=mha.v_proj_weight, **kwargs)
        expected = F.multi_head_attention_forward(*arguments, need_weights=True, **options)[0]
        got, no_weights = _multi_head_attention_by_parts(*arguments, need_weights=False, **options)
        assert no_weights is None
        for actual, reference in zip(fwAD.unpack_dual(got), fwAD.unpack_dual(expected)):
            torch.testing.assert_close(actual, reference, rtol=1e-12, atol=1e-12)
        # scaled_dot_product_attention: (batch, heads, tokens, features), a causal mask
        # and a boolean one (True: attend).
        qs, ks, vs = (fwAD.make_dual(torch.randn(2, 3, 5, 4, dtype=torch.float64),
                                     torch.randn(2, 3, 5, 4, dtype=torch.float64)) for _ in range(3))
        allowed = torch.rand(5, 5) < 0.6
        allowed[:, 0] = True
        for sdpa_options in ({}, {"is_causal": True}, {"attn_mask": allowed}, {"scale": 0.3}):
            scores = qs @ ks.transpose(-2, -1) * sdpa_options.get("scale", 0.5)
            if sdpa_options.get("is_causal"):
                scores = scores.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
            if "attn_mask" in sdpa_options:
                scores = scores.masked_fill(~allowed, float("-inf"))
            expected = torch.softmax(scores, -1) @ vs
            got = _attention_by_parts(qs, ks, vs, **sdpa_options)
            for actual, reference in zip(fwAD.unpack_dual(got), fwAD.unpack_dual(expected)):
                torch.testing.assert_close(actual, reference, rtol=1e-12, atol=1e-12)
    # Options not written out are left to PyTorch.
    assert _multi_head_attention_by_parts(q, q, q, 8, 2, mha.in_proj_weight, mha.in_proj_bias, None, None, True,
                                          0.0, mha.out_proj.weight, mha.out_proj.bias, training=False,
                                          need_weights=False) is None


def test_a_cut_where_the_two_rows_saw_different_pieces_is_a_kink():
    """Two forwards of different rows can round a unit a margin from the cut to either
    side: the rows' states there are compared, and a difference keeps the cut a kink."""
    from igfast.exact import _differs_at_cut
    from igfast.piecewise import PathState

    choices = torch.tensor([[0, 1, 1], [1, 1, 0], [0, 0, 0], [1, 0, 1]])
    at_low = PathState([choices], [torch.zeros(4, 3, 1)], [torch.zeros(4, 3, 1)])
    start_choices = [choices.clone()]
    start_choices[0][2] = choices[0]
    start_choices[0][2, 1] = 0  # row 2 starts where row 0 ends, and saw unit 1 off
    start_choices[0][3] = choices[1]
    successor = torch.tensor([2, 3, -1, -1])  # row 1 ends where row 3 starts, and they agree
    assert _differs_at_cut(torch.tensor([0, 1, 2]), successor, at_low, start_choices).tolist() == [True, False, False]


def test_predicted_rounds_follow_the_rows_a_path_may_split_into():
    from igfast.exact import CURVED_WALK_ROWS_PER_PIECE, curved_walk_rounds

    assert curved_walk_rounds(364, 1) == CURVED_WALK_ROWS_PER_PIECE * 364  # no room: one row walks it all
    assert curved_walk_rounds(364, 64) < curved_walk_rounds(364, 4) < curved_walk_rounds(364, 1)
    assert curved_walk_rounds(10, 64) == CURVED_WALK_ROWS_PER_PIECE * 10


def test_sums_that_miss_completeness_or_an_infinite_end_warn():
    """gausslegendre_pieces returned without a word attributions summing to 0 where F
    changed by 0.31 (a tanh MLP at inputs of 1e4, tolerance 1e-3: its estimate said
    converged), and finite attributions for a path whose F(baseline) is -inf."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    torch.manual_seed(2)
    x = torch.randn(3, 4) * 1e4
    with pytest.warns(igfast.ToleranceNotReachedWarning, match="1 of 3 examples miss completeness"):
        attributions = igfast.IntegratedGradients(model).attribute(x, target=1, method="gausslegendre_pieces",
                                                                   tolerance=1e-3)
    with torch.no_grad():
        change = model(x)[:, 1] - model(torch.zeros_like(x))[:, 1]
    assert float((attributions.sum(1) - change).abs().max()) > 0.1  # (the miss is real)
    weights = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    x = torch.tensor([[1.0, 2.0, -1.0, 0.5]])
    for kwargs in ({}, {"tolerance": 1e-3}):
        with pytest.warns(UserWarning, match="not finite for 1 of 1 examples"):
            igfast.IntegratedGradients(lambda v: torch.log(torch.relu(v @ weights))).attribute(
                x, baselines=-0.5 * x, target=0, method="gausslegendre_pieces", **kwargs)


def test_fixed_gauss_nodes_that_miss_completeness_warn():
    """Without a tolerance, gausslegendre_pieces' estimate (the midpoint rule's) is far
    above its error, and a miss below 4 times it passed: a LayerNorm of a bias-free ReLU
    layer from a zero baseline (the norm turns within 1e-3 of the start) gave
    attributions 2e-2 off without a word. A miss above COARSE_GAUSS_PIECES_GAP now
    warns; with a tolerance the nodes find the turn, and nothing warns."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16, bias=False), nn.ReLU(), nn.LayerNorm(16), nn.Linear(16, 12), nn.ReLU(),
                          nn.Linear(12, 3)).double().eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    ig = igfast.IntegratedGradients(model)
    with pytest.warns(igfast.ToleranceNotReachedWarning, match="examples miss completeness.*Give `tolerance`"):
        coarse = ig.attribute(x, target=0, method="gausslegendre_pieces")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        refined = ig.attribute(x, target=0, method="gausslegendre_pieces", tolerance=1e-8)
        # (n_steps spread over the path reaches the turn too: 2e-5 here, below the gap)
        ig.attribute(x, target=0, method="gausslegendre_pieces", n_steps=500)
    with torch.no_grad():
        change = model(x)[:, 0] - model(torch.zeros_like(x))[:, 0]
    torch.testing.assert_close(refined.sum(1), change, rtol=1e-7, atol=0)
    assert float(_relative_l2(coarse, refined).max()) > 1e-2  # (the miss is real)
    # In bfloat16 (or under autocast) rounding alone misses completeness by more than
    # the gap: no nodes would help, and nothing warns.
    torch.manual_seed(0)
    benign = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x, baselines = torch.randn(4, 6), 0.3 * torch.randn(4, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", igfast.ToleranceNotReachedWarning)
        igfast.IntegratedGradients(benign.bfloat16()).attribute(x.bfloat16(), baselines.bfloat16(), target=0,
                                                                 method="gausslegendre_pieces")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            igfast.IntegratedGradients(benign.float()).attribute(x, baselines, target=0, method="gausslegendre_pieces")


class _Square(nn.Module):
    def forward(self, z):
        return 0.3 * z * z


def test_kinks_located_to_their_tolerance_do_not_warn_of_missed_completeness():
    """A square before the ReLUs makes every piece's integrand linear: the Gauss sums are
    exact and their estimate about 1e-16, so the kinks' placement (to 1e-10 in t) left
    2.6e-11 off completeness, and every call warned that the Gauss sums missed part of
    the integrand (a helper's report). The allowance counts the kinks' placement."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 24), _Square(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(),
                          nn.Linear(24, 4)).double().eval()
    x = 2 * torch.randn(4, 20, dtype=torch.float64)
    explainer = igfast.IntegratedGradients(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", igfast.ToleranceNotReachedWarning)
        attributions, info = explainer.attribute(x, target=[0, 1, 2, 3], method="gausslegendre_pieces", n_steps=50,
                                                 return_adaptive_info=True)
    assert info.kink_position_tolerance == 1e-10 and bool((info.pieces > 5).all())
    reference = explainer.attribute(x, target=[0, 1, 2, 3], method="gausslegendre_pieces", n_steps=50,
                                    tolerance=1e-10)
    assert float(_relative_l2(attributions, reference).max()) < 1e-9


@pytest.mark.parametrize("smooth", ["silu", "silu_inplace", "mish", "mish_inplace", "group_norm", "tanhshrink",
                                    "softsign", "instance_norm", "local_response_norm"])
def test_ops_whose_backward_has_no_forward_formula_are_walked(smooth):
    """SiLU, Mish and GroupNorm before a kink (gausslegendre_pieces) and SiLU and Mish as a
    smooth head (exact) were refused: their backward has no forward-mode formula, and the
    walk's gradient rows ran it with tangents attached. Tanhshrink, Softsign,
    InstanceNorm and LocalResponseNorm were not known for smooth."""
    torch.manual_seed(0)
    bend = {"silu": nn.SiLU(), "mish": nn.Mish(), "silu_inplace": nn.SiLU(inplace=True),
            "mish_inplace": nn.Mish(inplace=True), "group_norm": nn.GroupNorm(2, 4), "tanhshrink": nn.Tanhshrink(),
            "softsign": nn.Softsign(), "instance_norm": nn.InstanceNorm2d(4, affine=True),
            "local_response_norm": nn.LocalResponseNorm(2)}[smooth]
    mixed = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), bend, nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(36, 3)).double().eval()
    inputs = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    ig = igfast.IntegratedGradients(mixed)
    # (tanhshrink's kinks after it are where z^3 / 3 crosses, which Newton steps locate
    # slowly: 45 s at 1e-9)
    tolerance = 1e-6 if smooth == "tanhshrink" else 1e-9
    ours, delta = ig.attribute(inputs, target=[0, 1], method="gausslegendre_pieces", tolerance=tolerance,
                               return_convergence_delta=True)
    dense = ig.attribute(inputs, target=[0, 1], n_steps=20000)
    assert float(((ours - dense).flatten(1).norm(dim=1) / dense.flatten(1).norm(dim=1)).max()) < 1e-4
    assert float(delta.abs().max()) < tolerance * float(ours.abs().sum())
    if smooth not in ("silu", "mish", "silu_inplace", "mish_inplace"):
        return
    headed = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3),
                           bend).double().eval()
    ig = igfast.IntegratedGradients(headed)
    ours = ig.attribute(inputs, target=[0, 1], method="exact")
    # (the head's kinks are placed exactly in both; the Gauss sums on its pieces converged)
    _close(ours, ig.attribute(inputs, target=[0, 1], method="gausslegendre_pieces", tolerance=1e-12), rtol=1e-9)


SMOOTH_FORMS = {
    "std (a hand-written layer norm)": lambda h: (h - h.mean(-1, keepdim=True)) / h.std(-1, keepdim=True),
    "var": lambda h: h / (h.var(-1, keepdim=True) + 1).sqrt(),
    "glu": lambda h: torch.cat([nn.functional.glu(h, -1)] * 2, -1),
    "softmin": lambda h: nn.functional.softmin(h, -1),
    "atan": torch.atan,
    "norm": lambda h: h / h.norm(dim=-1, keepdim=True),
    "linalg.vector_norm": lambda h: h * torch.linalg.vector_norm(h, dim=-1, keepdim=True),
    "prod": lambda h: h * h[:, :2].prod(-1, keepdim=True),
    "log_sigmoid": nn.functional.logsigmoid,
    "masked_fill_": lambda h: h.clone().masked_fill_(torch.arange(16) < 3, 0.5),
}


class SmoothThenRelu(nn.Module):
    def __init__(self, smooth):
        super().__init__()
        self.smooth = smooth
        self.first, self.second, self.out = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.out(torch.relu(self.second(self.smooth(self.first(x)))))


@pytest.mark.parametrize("form", list(SMOOTH_FORMS))
def test_more_smooth_ops_before_kinks(form):
    """gausslegendre_pieces refused these with "cannot tell whether ... is piecewise
    linear" (and named itself as the method to use)."""
    torch.manual_seed(0)
    model = SmoothThenRelu(SMOOTH_FORMS[form]).double().eval()
    inputs = torch.randn(3, 8, dtype=torch.float64)
    ig = igfast.IntegratedGradients(model)
    ours, delta = ig.attribute(inputs, target=1, method="gausslegendre_pieces", tolerance=1e-9,
                               return_convergence_delta=True)
    dense = ig.attribute(inputs, target=1, n_steps=20000)
    assert float(((ours - dense).norm(dim=1) / dense.norm(dim=1)).max()) < 2e-4
    assert float(delta.abs().max()) < 1e-9 * float(ours.abs().sum())
