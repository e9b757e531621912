"""Breakpoints of a piecewise-linear network along a straight path, read while it runs.

On the path p(t) = x' + t (x - x'), a network built from affine maps and
piecewise-linear functions (ReLU, LeakyReLU, hardtanh/clamp, hardsigmoid, softshrink, abs, maximum/minimum,
max-pool, max, sort, topk, median and cummax over a dimension) is affine in t between breakpoints (Sotoudeh and
Thakur, ExactLine, NeurIPS 2019). Inside one such piece, every pre-activation z is
affine in t: z(t + s) = z + s dz, where dz is its derivative along the path. The
next breakpoint is therefore the smallest positive s at which any unit reaches a
kink (z + s dz = kink), and the gradient is constant until then.

``BreakpointMode`` is a TorchFunctionMode that runs the model with forward-mode AD
tangents (dz, one per path row) and, at each piecewise-linear op:

- replaces the op by the affine piece the path moves into: a unit exactly at a kink
  (or within ``kink_margin`` of it) takes the side it enters, so the gradient of the
  backward pass that follows is the gradient of the piece that starts here (PyTorch's
  own subgradient at a kink, e.g. relu'(0) = 0, would be the wrong side's);
- records, per path row, the smallest positive step to the next kink.

It also checks that the network is piecewise linear where it has to be: an op it does
not know raises, and a smooth op (softmax, GELU, ...) is allowed only after the last
piecewise-linear op (a smooth head), whose presence is reported so the caller can
integrate each piece with Gauss nodes instead of one gradient.

With ``curved_kinks`` (method="gausslegendre_pieces") smooth ops may also come before
kinks. A pre-activation is then curved along the path, its step to the kink only a
Newton estimate, so the mode also records the piece every unit is on (its "choice":
the side of a ReLU, the winner of a max-pool window, ...) with its distance to the
kinks around it, and, given that state at an earlier point as ``reference``: which
rows changed piece since then, how far back (by Newton from here) the earliest changed
unit crossed its kink, and whether a unit bent so much on the way that it may have
crossed and come back. The caller brackets each kink between a point on the old piece
and one on a new piece from these.
"""

import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from . import ops
from .errors import NotPiecewiseLinearError
from .reference import overtakings, window_kinks

# Units this close to a kink (in path length, t in [0, 1]) count as on it: they take
# the side the path moves into, and no piece shorter than this is started for them.
# Rounding of a unit's recomputed value at the new point can leave it a few ulps on
# the wrong side; the error this margin allows is at most margin x gradient, far below
# any quadrature error.
KINK_MARGIN = {torch.float64: 1e-12, torch.float32: 1e-6}
HALF_PRECISION_KINK_MARGIN = 1e-3


class CurvedBeforeKinkError(NotPiecewiseLinearError):
    """A smooth op bends the path before a piecewise-linear op: method="exact" cannot
    walk the network, BreakpointMode with curved_kinks (gausslegendre_pieces) can."""


def kink_margin(dtype: torch.dtype) -> float:
    return KINK_MARGIN.get(dtype, HALF_PRECISION_KINK_MARGIN)


# Ops that are affine in every tensor that carries a tangent (a path-dependent tensor),
# given that the other operands do not: they pass through untouched.
AFFINE_OPS = frozenset("""
    linear conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d bilinear
    add __add__ __radd__ __iadd__ add_ sub __sub__ __rsub__ __isub__ sub_ neg __neg__ negative
    __pos__ positive sum mean cumsum
    view view_as reshape reshape_as flatten unflatten permute transpose t contiguous movedim
    __getitem__ select narrow index_select gather take_along_dim squeeze unsqueeze expand
    expand_as repeat repeat_interleave tile cat concat concatenate stack hstack vstack split
    chunk unbind tensor_split flip roll pad
    avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d
    to float double half bfloat16 type clone identity pixel_shuffle pixel_unshuffle
    matmul mm bmm __matmul__ __rmatmul__ einsum mul __mul__ __rmul__ mul_ __imul__
    div __truediv__ div_ __itruediv__ masked_fill masked_fill_ copy_ interpolate upsample zero_pad2d
    addmm addmm_ baddbmm baddbmm_ addbmm addbmm_ addmv addmv_ addr addr_ addcmul addcmul_ addcdiv addcdiv_
    where
    __setitem__ unfold fold diff triu tril diagonal diag diag_embed rot90 rsub narrow_copy as_strided
    channel_shuffle native_channel_shuffle max_unpool1d max_unpool2d max_unpool3d index_add index_add_ scatter_add scatter_add_ index_put index_put_
    index_copy index_copy_ masked_scatter select_scatter slice_scatter diagonal_scatter trapezoid lerp lerp_
    tensordot kron inner outer dot vdot mv ger cross linalg_cross
""".split())
# Products and quotients are affine only while at most one factor depends on the path
# (and never in a divisor).
PRODUCT_OPS = frozenset("matmul mm bmm __matmul__ __rmatmul__ einsum mul __mul__ __rmul__ mul_ __imul__ bilinear "
                        "tensordot kron inner outer dot vdot mv ger cross linalg_cross trapezoid".split())
# lerp(start, end, weight) = start + weight (end - start): a product where the weight
# moves beside start or end.
WEIGHTED_OPS = frozenset("lerp lerp_".split())
QUOTIENT_OPS = frozenset("div __truediv__ div_ __itruediv__".split())
# An added term times beta plus a product times alpha (addmm(input, mat1, mat2): Hugging
# Face's Conv1D in GPT-2; addcmul; addcdiv divides): the added term may depend on the
# path, the product is affine while at most one of its factors (arguments 1 and 2, or
# these keywords) does, and addcdiv's divisor must not.
PRODUCT_WITH_TERM_OPS = frozenset("addmm addmm_ baddbmm baddbmm_ addbmm addbmm_ addmv addmv_ addr addr_ "
                                  "addcmul addcmul_".split())
FACTOR_NAMES = ("mat1", "mat2", "batch1", "batch2", "mat", "vec", "vec1", "vec2", "tensor1", "tensor2")
DIVISOR_OPS = frozenset("addcdiv addcdiv_".split())
# Ops affine only outside training (in training they mix the rows of a batch).
EVAL_ONLY_OPS = frozenset("batch_norm dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout".split())
# Smooth ops: allowed after the last piecewise-linear op (a smooth head), where each
# piece is integrated with Gauss nodes; anywhere with curved_kinks.
SMOOTH_OPS = frozenset("""
    softmax log_softmax sigmoid tanh exp log log1p expm1 gelu silu softplus elu selu celu mish
    logsigmoid layer_norm group_norm rms_norm pow __pow__ __rpow__ sqrt rsqrt erf sin cos
    logsumexp normalize square reciprocal __rtruediv__ scaled_dot_product_attention
    multi_head_attention_forward cross_entropy nll_loss cosine_similarity tanhshrink softsign instance_norm log_sigmoid
    local_response_norm std var std_mean var_mean glu softmin atan atan2 asinh sinh cosh tan prod norm vector_norm
    matrix_norm linalg_vector_norm linalg_norm linalg_matrix_norm cdist dist pdist
""".split())
# Smooth ops that are not analytic at 0, so that a rule's error falls algebraically, not
# geometrically (n_steps="auto" must not extrapolate it): CELU and ELU with alpha 1 have a
# continuous slope (the integrand has kinks); SELU and ELU with another alpha have a slope
# that jumps (the integrand jumps, as a ReLU network's does: see slope_jumps).
NON_ANALYTIC_SMOOTH_OPS = frozenset("elu selu celu softsign".split())


def slope_jumps(name: str, args, kwargs) -> bool:
    """Whether the non-analytic smooth op ``name`` has a slope that jumps at 0."""
    if name == "selu":
        return True
    if name == "elu":
        alpha = kwargs.get("alpha", args[1] if len(args) > 1 else 1.0)
        return float(alpha) != 1.0
    return False


# Ops whose result carries no tangent and cannot bend the path (shapes, constants).
NEUTRAL_OPS = frozenset("""
    detach dim size numel ones_like zeros_like empty_like full_like rand_like randn_like
    new_zeros new_ones new_empty new_full new_tensor requires_grad_ retain_grad register_hook
    __len__ __get__ __set__ is_floating_point is_complex element_size data_ptr grad backward
    _is_zerotensor untyped_storage storage_offset stride is_contiguous nbytes itemsize get_device
    is_conj is_neg is_sparse is_inference dim_order
""".split())


@dataclass
class PathState:
    """Per piecewise-linear op (in call order): the piece each unit is on (``choices``,
    (rows, units)), and its distance to the kinks that bound that piece, positive inside
    it (``gaps``, float64, (rows, units, kinks)), with the distances' derivatives along
    the path (``rates``)."""

    choices: List[torch.Tensor]
    gaps: List[torch.Tensor]
    rates: List[torch.Tensor]

    def _lists(self):
        return self.choices, self.gaps, self.rates

    @property
    def row_bytes(self) -> int:
        return sum(t[:1].numel() * t.element_size() for tensors in self._lists() for t in tensors)

    def rows(self, index) -> "PathState":
        return PathState(*([t[index] for t in tensors] for tensors in self._lists()))

    def empty(self, count: int) -> "PathState":
        """An uninitialised state of ``count`` rows, shaped like this one's."""
        return PathState(*([torch.empty((count,) + t.shape[1:], dtype=t.dtype, device=t.device) for t in tensors]
                           for tensors in self._lists()))

    def put(self, index, other: "PathState", which) -> None:
        """This state's rows ``index`` := ``other``'s rows ``which``."""
        for mine, theirs in zip(self._lists(), other._lists()):
            for kept, new in zip(mine, theirs):
                kept[index] = new[which]


# A step is trusted when every unit's distance to its kink moved within this fraction
# (of the two distances' sum) of where its derivative at the step's start pointed.
TRUSTED_BEND = 0.5


def _bent_across(gap0, rate0, gap1, rate1, step) -> torch.Tensor:
    """Whether a unit on the same side of its kink at two points ``step`` apart may have
    crossed it twice in between: its distance moved further from its linear prediction
    than TRUSTED_BEND allows (a unit that turns back to its kink, or oscillates, moves
    away from its tangent by at least its distance), or its quadratic model from either
    point (the curvature the derivatives' change implies) dips across the kink."""
    off_tangent = (gap1 - gap0 - rate0 * step).abs() > TRUSTED_BEND * (gap0.abs() + gap1.abs())
    curvature = (rate1 - rate0) / step
    dips = torch.zeros_like(gap1, dtype=torch.bool)
    for gap, rate, sign in ((gap0, rate0, 1.0), (gap1, rate1, -1.0)):
        # from point 0 forward (u = -rate/curvature), from point 1 backward
        vertex = -sign * rate / curvature
        lowest = gap - rate * rate / (2 * curvature)
        dips |= (vertex > 0) & (vertex < step) & (lowest < 0) & (gap1 > 0) & torch.isfinite(lowest)
    return ((dips & (curvature != 0)) | off_tangent) & torch.isfinite(gap0) & torch.isfinite(gap1)


# What a layout the walk cannot read does, and what to do (see rows_mixed).
ROWS_MIXED = ("mixes the path's rows (one example's path moves units of another's): its examples are not "
              "along dim 0, as in a sequence-first layer (nn.TransformerEncoderLayer, nn.MultiheadAttention or "
              "nn.LSTM with batch_first=False, x.transpose(0, 1)), or the model mixes the examples of a batch. "
              "The walk needs each example in its own rows along dim 0, through every piecewise-linear op and "
              "into the output: use batch_first=True, or a fixed n_steps.")


def rows_mixed(tangent: torch.Tensor, rows: int, carrier: int) -> bool:
    """Whether a tangent that only row ``carrier`` of ``rows`` path rows was given reaches
    another row's part of dim 0 (False where dim 0 does not hold the rows: a size that is
    not a multiple of them is refused by its own check)."""
    if tangent.dim() == 0 or tangent.shape[0] % rows:
        return False
    parts = tangent.detach().reshape(rows, -1)
    others = torch.ones(rows, dtype=torch.bool, device=parts.device)
    others[carrier] = False
    return bool(parts[others].abs().gt(0).any())


class BreakpointMode(TorchFunctionMode):
    """Run a model on path rows that carry forward-AD tangents (dz/dt), taking at every
    kink the side the path moves into and recording the distance to the next kink.

    ``rows`` is the number of path rows of the call (dim 0 of the path tensors); every
    piecewise-linear op must see its rows along dim 0 (possibly merged with later
    dimensions, as a (rows * tokens, features) reshape does). After the call,
    ``next_step`` (rows,) holds the smallest step > margin to a kink (inf when none),
    ``smooth_op`` the first smooth op applied to the path (None when there is none),
    ``non_analytic_op`` the first of those that is not analytic (ELU, ...), and
    ``slope_jump_op`` the first whose slope jumps (SELU, ...).

    With ``horizon`` (rows,), the mode also counts, per row, the kinks that every unit
    would reach within that step if it stayed affine (``crossings``): exact for the
    first piecewise-linear layer, whose inputs are affine along the whole path, and a
    linearised guess for later ones. It estimates a path's pieces from one forward.

    With ``curved_kinks``, smooth ops may precede kinks (see the module's docstring):
    ``state`` gets, per piecewise-linear op in call order, the piece each unit is on and
    its distances to its kinks with their derivatives (a PathState). Given the state of
    an earlier point of the same rows as ``reference``, ``reference_step`` (rows,) back
    along the path: ``changed`` (rows,) says which rows have a unit on another piece;
    ``back_step`` (rows,) the largest of the changed units' Newton steps back to their
    kink (0 where none changed, inf where a unit turned since and gives no estimate);
    ``bent`` (rows,) which rows have a unit on the same piece at both points that bent
    too much between them to be sure it did not cross its kink and come back
    (_bent_across): the step was too long to tell.

    With ``rows_probe`` (a row), only that row carries a tangent (the others' are 0), and
    every piecewise-linear op checks that its input's tangent stays in that row's part
    of dim 0 (see _check_rows_kept).

    With ``window`` = (low, high), per row steps low <= 0 <= high bounding a segment of
    the path around the row's point, the mode finds the piece that holds the point and
    every kink it can place exactly (see _record_window): ``window`` ends as the piece
    (steps from the point), ``kink_rows`` / ``kink_steps`` list the kinks found.
    ``first_op_is_line`` says whether the first piecewise-linear op is a line kink (a
    unit's kinks at fixed values of its affine input: ReLU, clamp's lower bound,
    maximum of two tensors), whose kinks a window over the whole path places all of;
    with ``placed_ops`` = 1 (segments between those kinks) that op is not read again.
    """

    def __init__(self, rows: int, margin: float, horizon: Optional[torch.Tensor] = None, *,
                 curved_kinks: bool = False, reference: Optional["PathState"] = None,
                 reference_step: Optional[torch.Tensor] = None,
                 window: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, placed_ops: int = 0,
                 rows_probe: Optional[int] = None) -> None:
        super().__init__()
        self.rows = rows
        self.rows_probe = rows_probe
        self.margin = margin
        self.horizon = horizon
        self.curved_kinks = curved_kinks
        self.reference = reference
        self.reference_step = reference_step
        self.next_step: Optional[torch.Tensor] = None
        self.crossings: Optional[torch.Tensor] = None
        self.last_op_crossings: Optional[torch.Tensor] = None  # of those, the last op's
        self.smooth_op: Optional[str] = None
        self.non_analytic_op: Optional[str] = None  # the first of NON_ANALYTIC_SMOOTH_OPS applied to the path
        self.slope_jump_op: Optional[str] = None  # the first of those whose slope jumps
        self.kink_ops = 0  # piecewise-linear ops applied to the path (calls, in order)
        # The most units a row of one piecewise-linear op has: each is copied to float64
        # with its tangent, and the steps to its kinks computed, while the op runs.
        self.widest_row_units = 0
        self.state = PathState([], [], [])
        self.changed: Optional[torch.Tensor] = None
        self.back_step: Optional[torch.Tensor] = None
        self.bent: Optional[torch.Tensor] = None
        self._curved: Dict[int, "weakref.ref[torch.Tensor]"] = {}
        # Storages a curved value was written into through a view (h[:, :4].add_(tanh(z))):
        # every tensor on them is curved. Held, so that their addresses are not reused.
        self._curved_storages: Dict[int, Any] = {}
        # With a window: (low, high) float64 (rows,), shrunk op by op to the piece around
        # each row's point, and the exact kinks found inside it (see _record_window).
        self.window = window  # replaced, never written in place
        self.kink_rows: List[torch.Tensor] = []
        self.kink_steps: List[torch.Tensor] = []
        self.placed_ops = placed_ops
        self.first_op_is_line: Optional[bool] = None
        # For pieces_beyond_the_point: the names of the piecewise-linear ops run, whether
        # the last one is a line kink, per row the first op that found kinks in the
        # window (-1: none yet), and whether a unit of an op before that one stood on its
        # kink at the point.
        self.kink_op_names: set = set()
        self.last_op_is_line = False
        self.first_cutting_op: Optional[torch.Tensor] = None
        self.stood_on_kink: Optional[torch.Tensor] = None

    # -- bookkeeping ------------------------------------------------------------------

    @property
    def _method(self) -> str:
        return "gausslegendre_pieces" if self.curved_kinks else "exact"

    def _is_curved(self, tensor: torch.Tensor) -> bool:
        ref = self._curved.get(id(tensor))
        if ref is not None and ref() is tensor:
            return True
        storage = _storage_of(tensor) if self._curved_storages else None
        return storage is not None and storage.data_ptr() in self._curved_storages

    def _mark_curved(self, outputs: Any) -> None:
        for value in tree_flatten(outputs)[0]:
            if isinstance(value, torch.Tensor):
                self._curved[id(value)] = weakref.ref(value)

    def _mark_written(self, written: Optional[torch.Tensor]) -> None:
        """A tensor an op wrote a curved value into: a view's whole storage (its base, and
        every other view of it) holds it."""
        if written is None:
            return
        self._mark_curved(written)
        storage = _storage_of(written) if written._is_view() else None
        if storage is not None:
            self._curved_storages[storage.data_ptr()] = storage

    @property
    def _wants_next_step(self) -> bool:
        """Whether next_step has a reader: not with a window alone (see _record_window)."""
        return self.window is None or self.horizon is not None

    def _record_steps(self, steps: torch.Tensor, op: str) -> None:
        """Count one piecewise-linear op and fold its candidate steps (inf where none)
        into next_step, per row, where it is wanted (else any tensor of the op's rows)."""
        self._count_kink_op(steps, op)
        if not self._wants_next_step:
            return
        rows = steps.detach().reshape(self.rows, -1)
        per_row = rows.amin(1).double()
        self.next_step = per_row if self.next_step is None else torch.minimum(self.next_step, per_row)
        if self.horizon is not None:
            within = (rows.double() <= self.horizon.view(-1, 1)).sum(1)
            self.crossings = within if self.crossings is None else self.crossings + within
            self.last_op_crossings = within

    def _count_kink_op(self, steps: torch.Tensor, op: str) -> None:
        if steps.dim() == 0 or steps.shape[0] % self.rows:
            raise NotPiecewiseLinearError(
                f"method={self._method!r}: {op} sees a tensor of shape {tuple(steps.shape)} whose first "
                f"dimension does not hold the {self.rows} path rows; exact IG needs every "
                "piecewise-linear op to keep examples along dim 0.")
        self.kink_ops += 1
        self.kink_op_names.add(op)

    def _check_rows_kept(self, moving: Sequence[torch.Tensor], op: str) -> None:
        """Raise where the probe row's tangent reached another row's part of dim 0: the op
        sees the path's rows elsewhere, and the walk would give one row's kinks to
        another without a word (a sequence-first layer whose sequence length is a
        multiple of the rows: 2.9e-4 off on nn.TransformerEncoderLayer(batch_first=False),
        1.3e-3 on a flattened transpose), or the model mixes its examples."""
        for tensor in moving:
            tangent = _tangent(tensor)
            if tangent is not None and rows_mixed(tangent, self.rows, self.rows_probe):
                raise NotPiecewiseLinearError(
                    f"method={self._method!r}: {op} sees a tensor of shape {tuple(tangent.shape)} whose first "
                    f"dimension {ROWS_MIXED}")

    def _record_window(self, signed: torch.Tensor, op: str) -> None:
        """With a window: fold in one op's signed steps to its kinks (float64; inf, -inf
        or nan where none), per unit, along the rows' first dimension.

        The ops run in call order, and the window holds the stretch around the point
        where every earlier op stays on one piece: there this op's input is affine, so
        each step of its units that falls inside the window is a kink of the network,
        placed exactly (for a max, the nearest overtaking on each side of the point).
        They are recorded, and the window shrinks to the nearest on each side: the
        later ops are affine only there. Steps within the margin of the window's ends
        are the kinks that bound it. A unit within the margin of its kink puts the point
        on a kink: the piece starts at the point (the side the path moves into)."""
        if self.window is None:
            return
        low, high = self.window
        self._narrow_window(*window_kinks(signed.detach().reshape(self.rows, -1), self.margin, low, high))

    def _narrow_window(self, rows: torch.Tensor, found_steps: torch.Tensor, ahead: torch.Tensor,
                       behind: torch.Tensor, near: torch.Tensor) -> None:
        """Record an op's kinks inside the window (reference.window_kinks: their rows and
        steps, per row the nearest ahead and behind and whether a unit is on its kink at
        the point) and shrink the window to the nearest on each side."""
        self.kink_rows.append(rows)
        self.kink_steps.append(found_steps)
        if self.first_cutting_op is None:
            self.first_cutting_op = torch.full((self.rows,), -1, dtype=torch.long, device=near.device)
            self.stood_on_kink = torch.zeros(self.rows, dtype=torch.bool, device=near.device)
        if rows.numel():
            cut = torch.zeros_like(self.stood_on_kink)
            cut[rows] = True
            self.first_cutting_op = torch.where(cut & (self.first_cutting_op < 0), self.kink_ops - 1,
                                                self.first_cutting_op)
        # (Only before the op that cuts first: a unit on its kink there moves the
        # window's low end to the point for the ops after it.)
        self.stood_on_kink = self.stood_on_kink | (near & (self.first_cutting_op < 0))
        low, high = self.window
        high = torch.minimum(high, ahead)
        low = torch.maximum(low, behind)
        # (Not where the segment ends within the margin behind the point: that sliver
        # joins the piece, or every evaluation would leave half of it behind.)
        self.window = (torch.where(near & (low < -self.margin), low.clamp_min(0.0), low), high)

    def pieces_beyond_the_point(self) -> Optional[torch.Tensor]:
        """With a window, per row: whether every part its kinks cut the window into is one
        piece whose gradient a plain backward gives (else None where nothing was read).
        So it is where the kinks came first from the network's last piecewise-linear op,
        and that op is a line kink: every kink of it inside the window is placed (a max
        places only the nearest overtaking on each side of the point), and no later op
        can cut the parts again; where no unit stood on its kink at the point (which
        narrows the window for the ops after it); and where every op is one of
        PLAIN_GRADIENT_OPS, whose PyTorch gradient inside a piece is the walk's (a ReLU's
        unit that sits on its kink with no rate gets 0 from both; a clamp's bound does
        not: PyTorch's hardtanh and clamp differ there)."""
        if self.first_cutting_op is None:
            return None
        if not self.plain_past_the_last_op:
            return torch.zeros_like(self.stood_on_kink)
        return (self.first_cutting_op == self.kink_ops - 1) & ~self.stood_on_kink

    @property
    def plain_past_the_last_op(self) -> bool:
        """Whether the parts that the last op's kinks cut can be pieces with a plain
        gradient (see pieces_beyond_the_point): it is a line kink, and every op is one of
        PLAIN_GRADIENT_OPS."""
        return self.last_op_is_line and self.kink_op_names <= PLAIN_GRADIENT_OPS

    def fuses_kinks(self) -> bool:
        """Whether an op with one kink per unit at a fixed value can be read by
        ops.scalar_kinks (_record_scalar_kink): in a walk of method="exact" (a window,
        no next step wanted, straight pieces); the probe and curved walks read more."""
        return self.window is not None and not self._wants_next_step and not self.curved_kinks

    def _record_scalar_kink(self, primal: torch.Tensor, tangent: torch.Tensor, kink: float,
                            factors: Tuple[float, float, float], op: str):
        """_record_kink of an op whose units each have one kink at ``kink`` (its input's
        primal and tangent), fused with the op's factor per unit (``factors``: below, at
        or above the kink just after the point) and the tangent times it
        (ops.scalar_kinks: one pass over the units where the CPU kernel runs); returns
        those two, in the input's dtype."""
        self.widest_row_units = max(self.widest_row_units, primal.numel() // max(1, self.rows))
        placed = self._placed_before(primal, op, line=True)
        if not placed:
            self._count_kink_op(primal, op)
        factor, scaled_tangent, found = ops.scalar_kinks(primal.detach(), tangent.detach(), kink, self.margin,
                                                         self.rows, None if placed else self.window, factors)
        if found is not None:
            self._narrow_window(*found)
        return factor, scaled_tangent

    def _record_kink(self, z: torch.Tensor, dz: torch.Tensor, kink: Any, op: str) -> None:
        """Units z (float64, with derivative dz) that have a kink at ``kink``: their steps
        to it (signed) go to next_step and the window. Where dz is 0 the step is +-inf,
        or nan on the kink: never a kink (every comparison with nan is false)."""
        # (Counted before an op placed earlier returns: its float64 copies were made.)
        self.widest_row_units = max(self.widest_row_units, z.numel() // max(1, self.rows))
        if self._placed_before(z, op, line=True):
            return
        with torch.no_grad():
            at_zero = isinstance(kink, (int, float)) and kink == 0  # (a clamp's bounds may be tensors)
            crossings = (z.neg() if at_zero else torch.rsub(z, kink)).div_(dz)
            ahead = torch.where(crossings > self.margin, crossings, math.inf) if self._wants_next_step else crossings
            self._record_steps(ahead, op)
        self._record_window(crossings, op)

    def _placed_before(self, tensor: torch.Tensor, op: str, line: bool) -> bool:
        """Whether this op's kinks were all placed before (see placed_ops): then it is only
        counted. Notes whether the first op is a line kink."""
        if self.first_op_is_line is None:
            self.first_op_is_line = line
        self.last_op_is_line = line
        if self.kink_ops >= self.placed_ops:
            return False
        self._count_kink_op(tensor, op)
        return True

    def _record_choice(self, choice: torch.Tensor, back_from: Callable[[torch.Tensor], torch.Tensor],
                       gap: torch.Tensor, rate: torch.Tensor, op: str) -> None:
        """With curved_kinks: keep the piece of every unit (``choice``) and its distance to
        the kinks around it (``gap``, positive on the unit's side, and its derivative
        ``rate``, float64), and compare them with the reference's: ``back_from(reference
        choice)`` gives, per unit, the Newton step back to the kink between the two pieces
        (inf where there is no estimate)."""
        if not self.curved_kinks:
            return
        flat = choice.detach().reshape(self.rows, -1)
        # (rows, units, kinks around each unit's piece)
        gap, rate = gap.reshape(self.rows, flat.shape[1], -1), rate.reshape(self.rows, flat.shape[1], -1)
        index = len(self.state.choices)
        self.state.choices.append(flat)
        self.state.gaps.append(gap)
        self.state.rates.append(rate)
        if self.reference is None:
            return
        if index >= len(self.reference.choices) or self.reference.choices[index].shape != flat.shape:
            raise NotPiecewiseLinearError(
                f"method='gausslegendre_pieces': the network runs other piecewise-linear ops at "
                f"different points of the path ({op} is op {index}); its pieces cannot be followed.")
        reference = self.reference.choices[index]
        flipped = flat != reference
        with torch.no_grad():
            back = back_from(reference.reshape(choice.shape)).reshape(self.rows, -1)
            back = torch.where(flipped, back, torch.full_like(back, -math.inf)).amax(1).clamp_min(0)
            bent = _bent_across(self.reference.gaps[index], self.reference.rates[index], gap, rate,
                                self.reference_step.view(-1, 1, 1))
            bent = (bent & ~flipped.unsqueeze(-1)).flatten(1).any(1)  # units still on their piece
        changed = flipped.any(1)
        self.changed = changed if self.changed is None else self.changed | changed
        self.back_step = back if self.back_step is None else torch.maximum(self.back_step, back)
        self.bent = bent if self.bent is None else self.bent | bent

    def _back_to(self, z: torch.Tensor, dz: torch.Tensor, kink: Any) -> torch.Tensor:
        """Step s >= 0 back along the path at which z - s dz reaches ``kink``; inf where
        the unit moves away from it (it turned since it crossed: Newton cannot say where)."""
        with torch.no_grad():
            steps = (z - kink) / dz
            return torch.where((dz != 0) & (steps >= -self.margin), steps.clamp_min(0),
                               torch.full_like(steps, math.inf))

    # -- dispatch ---------------------------------------------------------------------

    def __torch_function__(self, func: Callable, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", None) or str(func)
        if name in NEUTRAL_OPS:  # shapes, dtypes, autograd.grad: nothing to read
            result = func(*args, **kwargs)
            if name == "__get__" and isinstance(result, torch.Tensor) and any(
                    self._is_curved(t) for t in _tensors_in(args, kwargs)):
                # A property's view of a curved tensor (.mT, .T, .mH) is curved: unmarked,
                # a ReLU after it took the smooth op before it for a head (1e-2 off).
                self._mark_curved(result)
            return result
        tensors = _tensors_in(args, kwargs)
        moving = [t for t in tensors if _tangent(t) is not None]
        if not moving:
            return func(*args, **kwargs)
        curved = any(self._is_curved(t) for t in tensors)
        handler = PIECEWISE_OPS.get(name)
        if handler is not None:
            if curved and not self.curved_kinks:
                raise CurvedBeforeKinkError(
                    f"method='exact' needs a network that is piecewise linear up to its last "
                    f"piecewise-linear op, but {self.smooth_op} is applied to the path before "
                    f"{name}. Use method='gausslegendre_pieces', a fixed n_steps or n_steps='auto' "
                "for this model.")
            if self.rows_probe is not None:
                self._check_rows_kept(moving, name)
            result = handler(self, func, name, args, kwargs)
            if (name.endswith("_") and not name.startswith("__")) or kwargs.get("inplace") is True:
                # In place (relu_, or F.relu(h, inplace=True) as nn.ReLU(inplace=True) calls
                # it): the model may go on with its own tensor, which must hold the result
                # (its kinks were hidden: an in-place ReLU was taken for affine).
                args[0].copy_(result)
                return args[0]
            return result
        if name in AFFINE_HANDLERS:
            result = AFFINE_HANDLERS[name](self, func, name, args, kwargs)
            if curved:
                self._mark_curved(result)
                self._mark_written(_written(name, args, kwargs))
            return result
        bends = name in SMOOTH_OPS or _nonlinear_use(name, args, kwargs, moving)
        if not bends and name not in AFFINE_OPS and name not in EVAL_ONLY_OPS:
            raise NotPiecewiseLinearError(
                f"method={self._method!r} cannot tell whether {name} is piecewise linear along the path: "
                "exact IG supports affine maps (linear, conv, pooling by averages, eval-mode "
                "BatchNorm, shape ops, addmm and its kin), ReLU, LeakyReLU, PReLU, threshold, "
                "hardtanh/ReLU6/clamp, hardsigmoid, softshrink, abs, maximum/minimum, comparisons (masks such as x * (x > 0)), "
                "max-pool, max/min, sort, topk, kthvalue, median, cummax and cummin over a dimension, followed by an optional "
                "smooth head (softmax, log-softmax, sigmoid, ...)"
                + (", and smooth ops anywhere" if self.curved_kinks else
                   ", or with method='gausslegendre_pieces' smooth ops anywhere")
                + ". Use a fixed n_steps or n_steps='auto' for this model.")
        if name in EVAL_ONLY_OPS and _training_flag(name, args, kwargs):
            raise NotPiecewiseLinearError(
                f"method={self._method!r}: {name} runs in training mode, where it "
                + ("normalises the rows of a batch together" if name == "batch_norm" else "draws a random mask")
                + "; call model.eval() first.")
        if name == "scaled_dot_product_attention":
            # PyTorch's fused attention kernels have no forward-mode derivative; the same
            # attention computed by parts has (smooth: the path bends here).
            result = _attention_by_parts(*args, **kwargs)
        elif name == "multi_head_attention_forward" and not kwargs.get("need_weights", True):
            result = _multi_head_attention_by_parts(*args, **kwargs)
            if result is None:
                # Options not written out below: asked for its weights nn.MultiheadAttention
                # computes attention by parts itself (slowly: inside it, ops no longer reach
                # this mode), not by the fused kernel.
                result = (func(*args, **{**kwargs, "need_weights": True})[0], None)
        else:
            shortcut = TANGENT_SHORTCUTS.get(name)
            result = shortcut(func, args, kwargs) if shortcut is not None else None
            if result is None:
                result = func(*args, **kwargs)
        if bends and self.smooth_op is None:
            self.smooth_op = name
        if bends and name in NON_ANALYTIC_SMOOTH_OPS:
            self.non_analytic_op = self.non_analytic_op or name
            if self.slope_jump_op is None and slope_jumps(name, args, kwargs):
                self.slope_jump_op = name
        if bends or curved:
            self._mark_curved(result)
            self._mark_written(_written(name, args, kwargs))
        return result


def _attention_by_parts(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                        enable_gqa=False):
    """F.scaled_dot_product_attention by parts, with its tangent (PyTorch's fused kernels
    have no forward-mode derivative)."""
    if dropout_p:
        raise NotPiecewiseLinearError(
            "scaled_dot_product_attention runs with dropout (training mode), which mixes in random "
            "masks; call model.eval() first.")
    (q, dq), (k, dk), (v, dv) = _parts(query), _parts(key), _parts(value)
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        repeats = q.shape[-3] // k.shape[-3]
        k, dk, v, dv = (t.repeat_interleave(repeats, -3) for t in (k, dk, v, dv))
    mask = None
    if is_causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        mask = _additive_mask(~keep, q.dtype)
    if attn_mask is not None:  # a boolean one says where to attend
        extra = _additive_mask(~attn_mask, q.dtype) if attn_mask.dtype == torch.bool else attn_mask
        mask = extra if mask is None else mask + extra
    out, tangent = _attention_with_tangent(q, dq, k, dk, v, dv, q.shape[-1] ** -0.5 if scale is None else scale, mask)
    return fwAD.make_dual(out, tangent)


def _attention_with_tangent(q, dq, k, dk, v, dv, scale: float, mask: Optional[torch.Tensor]):
    """softmax(q k^T scale + mask) v and its derivative along the path, from the primals
    and tangents of q, k, v (..., tokens, features): the product rule, and the softmax's
    derivative p (ds - sum(p ds)). By parts on plain tensors, not on dual ones: forward-
    mode AD's elementwise ops with a constant take a slow path (see TANGENT_SHORTCUTS)."""
    kt = k.transpose(-2, -1)
    scores = (q @ kt) * scale
    if mask is not None:
        scores = scores + mask
    weights = torch.softmax(scores, dim=-1)
    with torch.no_grad():  # gradient rows differentiate the value only
        dscores = (dq @ kt + q @ dk.transpose(-2, -1)) * scale
        dweights = weights * (dscores - (weights * dscores).sum(-1, keepdim=True))
        tangent = dweights @ v + weights @ dv
    return weights @ v, tangent


def _multi_head_attention_by_parts(query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias,
                                   bias_k, bias_v, add_zero_attn, dropout_p, out_proj_weight, out_proj_bias,
                                   training=True, key_padding_mask=None, need_weights=True, attn_mask=None,
                                   use_separate_proj_weight=False, q_proj_weight=None, k_proj_weight=None,
                                   v_proj_weight=None, static_k=None, static_v=None, average_attn_weights=True,
                                   is_causal=False):
    """F.multi_head_attention_forward (sequence first) without its weights, with its
    tangent; None for the options it does not cover (added key/value biases or zero
    attention, static keys, causal hints, dropout in training, path-dependent weights)."""
    if (bias_k is not None or bias_v is not None or add_zero_attn or static_k is not None or static_v is not None
            or is_causal or (dropout_p and training)):
        return None
    weights = (q_proj_weight, k_proj_weight, v_proj_weight) if use_separate_proj_weight else \
        in_proj_weight.chunk(3)
    biases = in_proj_bias.chunk(3) if in_proj_bias is not None else (None,) * 3
    if any(_tangent(t) is not None for t in (*weights, in_proj_bias, out_proj_weight, out_proj_bias)
           if isinstance(t, torch.Tensor)):
        return None
    unbatched = query.dim() == 2
    projected = []
    for tensor, weight, bias in zip((query, key, value), weights, biases):
        primal, tangent = _parts(tensor.unsqueeze(1) if unbatched else tensor)
        tokens, batch = primal.shape[:2]
        heads = lambda t: t.reshape(tokens, batch, num_heads, -1).permute(1, 2, 0, 3)  # noqa: E731
        with torch.no_grad():
            tangent = F.linear(tangent, weight)
        projected += [heads(F.linear(primal, weight, bias)), heads(tangent)]
    q, dq, k, dk, v, dv = projected
    batch, _, target_tokens, head_dim = q.shape
    source_tokens = k.shape[2]
    mask = None
    if attn_mask is not None:
        mask = _additive_mask(attn_mask, q.dtype)
        mask = mask.view(batch, num_heads, target_tokens, source_tokens) if mask.dim() == 3 else mask
    if key_padding_mask is not None:
        padding = _additive_mask(key_padding_mask, q.dtype).view(batch, 1, 1, source_tokens)
        mask = padding if mask is None else mask + padding
    out, tangent = _attention_with_tangent(q, dq, k, dk, v, dv, head_dim ** -0.5, mask)
    merge = lambda t: t.permute(2, 0, 1, 3).reshape(target_tokens, batch, -1)  # noqa: E731
    with torch.no_grad():
        tangent = F.linear(merge(tangent), out_proj_weight)
    out = F.linear(merge(out), out_proj_weight, out_proj_bias)
    result = fwAD.make_dual(out, tangent)
    return (result.squeeze(1) if unbatched else result), None


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A mask as a float to add: True (masked out, as nn.MultiheadAttention's) becomes -inf."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _storage_of(tensor: torch.Tensor) -> Any:
    """The tensor's storage; None for a tensor without one (sparse, nested, a subclass)."""
    try:
        return tensor.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _written(name: str, args, kwargs) -> Optional[torch.Tensor]:
    """The tensor an op writes in place (``h[:] = tanh(z)`` returns None, its result is
    ``h``; ``add_``, ``+=``; ``out=``), which carry what was written into them."""
    in_place = name == "__setitem__" or (name.endswith("_") and not name.startswith("__")) or (
        name.startswith("__i") and name.endswith("__") and name not in ("__index__", "__int__", "__invert__"))
    written = args[0] if in_place and args and isinstance(args[0], torch.Tensor) else None
    out = kwargs.get("out")
    return written if written is not None else out if isinstance(out, torch.Tensor) else None


def _tensors_in(args, kwargs) -> List[torch.Tensor]:
    """The tensors among the arguments, one level into lists and tuples (torch.cat's
    sequence); cheaper than a pytree flatten, which every Tensor attribute read pays."""
    found = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


def _tangent(tensor: torch.Tensor) -> Optional[torch.Tensor]:
    # Parameters never carry the path's tangent (only the path and what is computed
    # from it do): skipping them saves most unpack_dual calls, a third of the walk.
    if isinstance(tensor, nn.Parameter) or not tensor.is_floating_point():
        return None
    return fwAD.unpack_dual(tensor).tangent


def _nonlinear_use(name: str, args, kwargs, moving: Sequence[torch.Tensor]) -> bool:
    """A product of two path-dependent factors, or a division by one, is not affine."""
    if name in PRODUCT_OPS:
        return len(moving) > 1
    if name in DIVISOR_OPS:  # addcdiv(input, tensor1, tensor2): input + value * tensor1 / tensor2
        divisor = args[2] if len(args) > 2 else kwargs.get("tensor2")
        return isinstance(divisor, torch.Tensor) and _tangent(divisor) is not None
    if name in PRODUCT_WITH_TERM_OPS:
        factors = list(args[1:3]) + [kwargs[k] for k in FACTOR_NAMES if k in kwargs]
        return sum(isinstance(f, torch.Tensor) and _tangent(f) is not None for f in factors) > 1
    if name in QUOTIENT_OPS:
        divisor = args[1] if len(args) > 1 else kwargs.get("other")
        return isinstance(divisor, torch.Tensor) and _tangent(divisor) is not None
    if name in WEIGHTED_OPS:  # a product where the weight moves and so does start or end
        weight = args[2] if len(args) > 2 else kwargs.get("weight")
        return isinstance(weight, torch.Tensor) and _tangent(weight) is not None and len(moving) > 1
    return False


def _training_flag(name: str, args, kwargs) -> bool:
    # F.batch_norm(input, running_mean, running_var, weight, bias, training, ...);
    # F.dropout(input, p, training, inplace) and its relatives.
    position = 5 if name == "batch_norm" else 2
    if "training" in kwargs:
        return bool(kwargs["training"])
    if len(args) > position:
        return bool(args[position])
    return name != "batch_norm"  # F.dropout defaults to training=True


def _primal_and_tangent(tensor: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A unit's value and its derivative along the path, in float64: the side a unit is
    on (z + margin dz) and its step to the kink (-z / dz) must agree to the last bit,
    and in float32 a margin of 1e-6 is only a few ulps of z."""
    primal, tangent = fwAD.unpack_dual(tensor)
    primal = primal.detach().double()
    return primal, (tangent.detach().double() if tangent is not None else torch.zeros_like(primal))


# -- piecewise-linear ops ---------------------------------------------------------------
# Each handler computes the op's value from the primal (connected to autograd) and its
# tangent separately, and joins them with make_dual. Letting forward-mode AD push the
# tangent through ``x * mask`` instead costs 4x: the constant factor's zero tangent
# takes a slow path, and every saved tensor would carry a tangent into the backward.

def _parts(tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(primal, tangent) in the tensor's own dtype; a zero tangent for a constant."""
    if not isinstance(tensor, torch.Tensor):
        tensor = torch.as_tensor(tensor)
    primal, tangent = fwAD.unpack_dual(tensor)
    return primal, (tangent if tangent is not None else torch.zeros_like(primal))


def _side(mode: BreakpointMode, z: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
    """z just after the current point: its sign decides the piece a unit is on."""
    return torch.add(z, dz, alpha=mode.margin)


def _scaled(mode: BreakpointMode, x: torch.Tensor, factor_of: Callable, kinks: Sequence[float], name: str,
            factors: Optional[Tuple[float, float, float]] = None):
    """x times a per-unit factor chosen from the side of its kink each unit is on just
    after the point (``factor_of`` of z + margin dz in float64: every caller's one kink
    is at 0); the steps to the kink are recorded. Where the walk fuses its reading of
    the op (BreakpointMode.fuses_kinks), a factor that is one of three numbers below, at
    and above the kink (``factors``) comes from ops.scalar_kinks with the tangent times
    it; otherwise factor_of takes the side's sign from there."""
    (kink,) = kinks
    if mode.fuses_kinks():
        primal, tangent = _parts(x)
        factor, scaled_tangent = mode._record_scalar_kink(primal, tangent, kink, factors or (-1.0, 0.0, 1.0), name)
        if factors is None:
            factor = factor_of(factor).to(x.dtype)
            scaled_tangent = tangent * factor
        return fwAD.make_dual(primal * factor, scaled_tangent)
    z, dz = _primal_and_tangent(x)
    with torch.no_grad():
        factor = factor_of(_side(mode, z, dz))
    mode._record_kink(z, dz, kink, name)
    if mode.curved_kinks:
        side = torch.where(factor_of(torch.ones_like(z)) == factor, 1.0, -1.0).to(z.dtype)
        mode._record_choice(factor, lambda reference: mode._back_to(z, dz, kink), side * (z - kink),
                            side * dz, name)
    factor = factor.to(x.dtype)
    primal, tangent = _parts(x)
    return fwAD.make_dual(primal * factor, tangent * factor)


def _relu(mode: BreakpointMode, func, name, args, kwargs):
    return _scaled(mode, args[0], lambda ahead: ahead > 0, (0.0,), name, factors=(0.0, 0.0, 1.0))


def _leaky_relu(mode: BreakpointMode, func, name, args, kwargs):
    slope = float(kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01))
    return _scaled(mode, args[0], lambda ahead: torch.where(ahead > 0, torch.ones_like(ahead), torch.full_like(ahead, slope)), (0.0,), name,
                   factors=(slope, slope, 1.0))


def _rrelu(mode: BreakpointMode, func, name, args, kwargs):
    """rrelu outside training is leaky_relu with the mean of its two slopes (in training
    it draws a random slope per unit in every call)."""
    given = dict(zip(("input", "lower", "upper", "training"), args), **kwargs)
    if given.get("training", False):
        raise NotPiecewiseLinearError(
            f"method={mode._method!r}: {name} runs in training mode, where it draws a random slope in every call; "
            "call model.eval() first.")
    slope = (float(given.get("lower", 1.0 / 8)) + float(given.get("upper", 1.0 / 3))) / 2
    return _leaky_relu(mode, func, name, (args[0], slope), {})


def _prelu(mode: BreakpointMode, func, name, args, kwargs):
    """PReLU: slope 1 above 0, the (learned, per-channel) weight below; PyTorch's
    gradient at 0 is the weight's."""
    x = args[0]
    weight = _parts(args[1] if len(args) > 1 else kwargs["weight"])[0].detach()
    if weight.numel() > 1:  # one slope per channel: dim 1 (dim 0 of an unbatched vector)
        shape = [1] * x.dim()
        shape[1 if x.dim() > 1 else 0] = -1
        weight = weight.reshape(shape)
    return _scaled(mode, x, lambda ahead: torch.where(ahead > 0, torch.ones_like(ahead), weight.to(ahead.dtype)),
                   (0.0,), name)


def _threshold(mode: BreakpointMode, func, name, args, kwargs):
    """threshold(x, t, value): x above t, else the constant ``value`` (continuous, a
    ReLU moved to t, where value is t: nn.Threshold(0, 0) is a ReLU; a jump otherwise,
    which the walk's completeness check reports)."""
    x = args[0]
    threshold = float(kwargs.get("threshold", args[1] if len(args) > 1 else 0.0))
    value = float(kwargs.get("value", args[2] if len(args) > 2 else 0.0))
    z, dz = _primal_and_tangent(x)
    with torch.no_grad():
        above = _side(mode, z, dz) > threshold
    mode._record_kink(z, dz, threshold, name)
    if mode.curved_kinks:
        side = torch.where(above, 1.0, -1.0).to(z.dtype)
        mode._record_choice(above, lambda reference: mode._back_to(z, dz, threshold), side * (z - threshold),
                            side * dz, name)
    primal, tangent = _parts(x)
    factor = above.to(x.dtype)
    return fwAD.make_dual(primal * factor + value * (1 - factor), tangent * factor)


def _abs(mode: BreakpointMode, func, name, args, kwargs):
    return _scaled(mode, args[0], torch.sign, (0.0,), name, factors=(-1.0, 0.0, 1.0))


def _clamp(mode: BreakpointMode, func, name, args, kwargs):
    x = args[0]
    if name.startswith("relu6"):
        low, high = 0.0, 6.0
    elif name.startswith("clamp_min"):
        low, high = kwargs.get("min", args[1] if len(args) > 1 else None), None
    elif name.startswith("clamp_max"):
        low, high = None, kwargs.get("max", args[1] if len(args) > 1 else None)
    elif name.startswith("hardtanh"):
        low = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
        high = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
    else:
        low = kwargs.get("min", args[1] if len(args) > 1 else None)
        high = kwargs.get("max", args[2] if len(args) > 2 else None)
    for bound in (low, high):
        if isinstance(bound, torch.Tensor) and _tangent(bound) is not None:
            raise NotPiecewiseLinearError(
                f"method={mode._method!r}: {name} with path-dependent bounds is not supported.")
    # A unit that stays on a bound along the piece is inside for clamp (PyTorch's gradient
    # passes at min <= x <= max) and outside for hardtanh (min < x < max).
    return _clamped(mode, x, low, high, not name.startswith(("hardtanh", "relu6")), name)


def _softshrink(mode: BreakpointMode, func, name, args, kwargs):
    """softshrink(x, l) = x - clamp(x, -l, l): x - l above l, x + l below -l, 0 between
    (PyTorch's gradient is 1 where |x| > l: inside includes the bounds, as clamp's)."""
    x = args[0]
    limit = float(kwargs.get("lambd", args[1] if len(args) > 1 else 0.5))
    clamped_primal, clamped_tangent = _parts(_clamped(mode, x, -limit, limit, True, name))
    primal, tangent = _parts(x)
    return fwAD.make_dual(primal - clamped_primal, tangent - clamped_tangent)


def _hardsigmoid(mode: BreakpointMode, func, name, args, kwargs):
    """hardsigmoid(x) = clamp(x, -3, 3) / 6 + 1/2 (PyTorch's gradient is 1/6 where
    -3 < x < 3: a unit on a bound is outside, as hardtanh's)."""
    primal, tangent = _parts(_clamped(mode, args[0], -3.0, 3.0, False, name))
    return fwAD.make_dual(primal / 6 + 0.5, tangent / 6)


def _clamped(mode: BreakpointMode, x, low, high, inclusive: bool, name: str):
    """x clamped to [low, high] (either may be None); ``inclusive``: a unit on a bound
    along the piece counts as inside."""
    z, dz = _primal_and_tangent(x)
    with torch.no_grad():
        ahead = _side(mode, z, dz)
        below = torch.zeros_like(z, dtype=torch.bool)
        above = torch.zeros_like(z, dtype=torch.bool)
        if low is not None:
            below = ahead < low if inclusive else ahead <= low
        if high is not None:
            above = ahead > high if inclusive else ahead >= high
        inside = ~below & ~above
    for bound in (low, high):
        if bound is not None:
            mode._record_kink(z, dz, bound, name)
    with torch.no_grad():
        # 0 below low, 1 inside, 2 above high: a unit crossed each bound between its
        # region and the reference's.
        region = inside.long() + above.long() * 2

    def back_from(reference):
        back = torch.full_like(z, -math.inf)
        for bound, code in ((low, 0), (high, 2)):
            if bound is not None:
                crossed = (reference == code) != (region == code)
                back = torch.where(crossed, torch.maximum(back, mode._back_to(z, dz, bound)), back)
        return back

    if mode.curved_kinks:
        bounds = [b for b in (low, high) if b is not None]
        # The distance to each bound, positive on the unit's side of it.
        sides = torch.stack([torch.where(ahead > b, 1.0, -1.0).to(z.dtype) for b in bounds], -1)
        gaps = torch.stack([z - b for b in bounds], -1) * sides
        mode._record_choice(region, back_from, gaps, dz.unsqueeze(-1) * sides, name)
    primal, tangent = _parts(x)
    inside = inside.to(x.dtype)
    # Inside: the identity piece; outside: the bound, a constant.
    clamped = torch.clamp(primal.detach(), low, high)
    return fwAD.make_dual(primal * inside + clamped * (1 - inside), tangent * inside)


def _operands(args, kwargs) -> Tuple[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]:
    """(primal, tangent) of a binary op's two operands (a number as a constant tensor)."""
    a = args[0]
    b = args[1] if len(args) > 1 else kwargs["other"]
    if not isinstance(b, torch.Tensor):
        b = torch.as_tensor(b, dtype=a.dtype, device=a.device)
    return _parts(a), _parts(b)


def _read_difference(mode: BreakpointMode, a, b, name: str, negate: bool = False):
    """d = a - b (or b - a) in float64 with its derivative, for ops whose kink is where
    it crosses 0 (maximum, comparisons): records the kink; returns d, dd and d just
    after the point."""
    (pa, ta), (pb, tb) = a, b
    with torch.no_grad():
        d, dd = (pa - pb).double(), (ta - tb).double()
        if negate:
            d, dd = -d, -dd
        ahead = _side(mode, d, dd)
    mode._record_kink(d, dd, 0.0, name)
    return d, dd, ahead


def _record_difference_choice(mode: BreakpointMode, choice: torch.Tensor, d, dd, ahead, name: str) -> None:
    if mode.curved_kinks:
        side = torch.where(ahead >= 0, 1.0, -1.0).to(d.dtype)
        mode._record_choice(choice, lambda reference: mode._back_to(d, dd, 0.0), side * d, side * dd, name)


def _maximum(mode: BreakpointMode, func, name, args, kwargs):
    (pa, ta), (pb, tb) = _operands(args, kwargs)
    larger = name in ("maximum", "max", "fmax")
    d, dd, ahead = _read_difference(mode, (pa, ta), (pb, tb), name, negate=not larger)
    with torch.no_grad():
        # Equal along the whole piece: PyTorch splits the gradient between the two
        # (maximum, minimum), or gives it to the first (fmax, fmin).
        tie = 1.0 if name in ("fmax", "fmin") else 0.5
        weight_a = ((ahead > 0).double() + tie * (ahead == 0).double()).to(pa.dtype)
    _record_difference_choice(mode, weight_a, d, dd, ahead, name)
    return fwAD.make_dual(pa * weight_a + pb * (1 - weight_a), ta * weight_a + tb * (1 - weight_a))


# Ordering comparisons: a mask that flips where a - b crosses 0 (``x * (x > 0)``, or
# torch.where on it, is a ReLU written by hand). The mask is the side the path moves
# into, as for every kink; it carries no tangent, so what it selects is affine.
GREATER_COMPARISONS = frozenset("gt __gt__ greater ge __ge__ greater_equal".split())
STRICT_COMPARISONS = frozenset("gt __gt__ greater lt __lt__ less".split())


def _comparison(mode: BreakpointMode, func, name, args, kwargs):
    d, dd, ahead = _read_difference(mode, *_operands(args, kwargs), name)
    strict = name in STRICT_COMPARISONS
    if name in GREATER_COMPARISONS:
        result = ahead > 0 if strict else ahead >= 0
    else:
        result = ahead < 0 if strict else ahead <= 0
    _record_difference_choice(mode, result, d, dd, ahead, name)
    return result


def _affine_with_bias(mode: BreakpointMode, func, name, args, kwargs):
    """linear / conv: the value from the primal, the tangent from the same map without
    its bias (forward-mode AD would run the bias's zero tangent through a slow path)."""
    x = args[0]
    weight = args[1] if len(args) > 1 else kwargs.get("weight")
    if _tangent(x) is None or (isinstance(weight, torch.Tensor) and _tangent(weight) is not None):
        return func(*args, **kwargs)  # a path-dependent weight: not affine, see SMOOTH handling
    primal, tangent = _parts(x)
    value = func(primal, *args[1:], **kwargs)
    with torch.no_grad():
        rest = list(args[1:])
        if len(rest) >= 2:
            rest[1] = None
        unbiased = {**kwargs, "bias": None} if "bias" in kwargs else kwargs
        direction = func(tangent, *rest, **unbiased)
    return fwAD.make_dual(value, direction)


# Two float64 values this many epsilons apart count as equal in a tie (see _select_in_windows).
ROUNDING_TIE_ULPS = 64


def level_with(v: torch.Tensor, dv: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per window (last dim): the elements level with the one at ``index`` in value and
    rate, to ROUNDING_TIE_ULPS (it included)."""
    best_v, best_dv = v.gather(-1, index), dv.gather(-1, index)
    close = ROUNDING_TIE_ULPS * torch.finfo(v.dtype).eps
    return ((v - best_v).abs() <= close * best_v.abs()) & ((dv - best_dv).abs() <= close * best_dv.abs())


def _select_in_windows(mode: BreakpointMode, v: torch.Tensor, dv: torch.Tensor, largest: bool, name: str):
    """Per window (last dim of v, float64, and its tangent dv): the index (keepdim) of the
    element that is the max (min) just after the current point; the steps at which
    another one overtakes it are recorded (_record_overtaking)."""
    sv, sdv = (v, dv) if largest else (-v, -dv)
    with torch.no_grad():
        # The max just after the current point (a tie goes to the element rising fastest).
        index = _side(mode, sv, sdv).argmax(-1, keepdim=True)
        # Elements level with it in value and rate to rounding stay tied along the piece
        # (two positions of the same token: computed in other lanes, they differ in the
        # last bits): the first of them wins, as in PyTorch's max (the last bits gave the
        # second 1.2e-2 of the attributions in a LayerIG over repeated tokens).
        index = level_with(sv, sdv, index).to(torch.uint8).argmax(-1, keepdim=True)
        chosen_v, chosen_dv = sv.gather(-1, index), sdv.gather(-1, index)
    _record_overtaking(mode, sv, sdv, chosen_v, chosen_dv, -1, name)

    def back_from(reference):  # back to where the reference's winner was level with this one
        return mode._back_to(chosen_v - sv.gather(-1, reference), chosen_dv - sdv.gather(-1, reference), 0.0)

    if mode.curved_kinks:  # every element's distance below the winner
        finite = torch.isfinite(sv)
        mode._record_choice(index, back_from, torch.where(finite, chosen_v - sv, math.inf),
                            torch.where(finite, chosen_dv - sdv, 0.0), name)
    return index


def _record_overtaking(mode: BreakpointMode, sv: torch.Tensor, sdv: torch.Tensor, chosen_v: torch.Tensor,
                       chosen_dv: torch.Tensor, dim: int, name: str) -> None:
    """Record the steps at which an element of a window (along ``dim`` of sv, float64,
    and its tangent sdv) overtakes the window's winner (chosen_v, chosen_dv, broadcast
    along ``dim``). Elements at -inf (a max-pool's padding, tangent 0) give infinite or
    nan steps, and so does the winner itself: never a kink."""
    if mode._placed_before(chosen_v, name, line=False):
        return
    with torch.no_grad():
        if mode.window is not None and not mode._wants_next_step and dim == 0:
            # A walk of method="exact" at a max-pool (its windows first): only the
            # window's kinks are read, in one pass where the CPU kernel runs.
            mode._record_steps(chosen_v, name)
            signed = ops.overtakings(sv, sdv, chosen_v, chosen_dv, mode.margin)
        else:
            ahead, signed = overtakings(sv, sdv, chosen_v, chosen_dv, mode.margin, dim)
            # rows first for _record_steps (a copy only where next_step is wanted: a walk's
            # first point, not the rounds of method="exact")
            mode._record_steps(ahead.movedim(dim, -1) if mode._wants_next_step else chosen_v, name)
            if mode.window is None:
                return
    mode._record_window(signed, name)


def _max_over_dim(mode: BreakpointMode, func, name, args, kwargs):
    x = args[0]
    dim = kwargs.get("dim", kwargs.get("other", args[1] if len(args) > 1 else None))
    if dim is None or (isinstance(dim, (tuple, list)) and not dim):  # (amax(dim=()): every dimension)
        raise NotPiecewiseLinearError(
            f"method={mode._method!r}: {name} over the whole tensor mixes the examples of the batch; "
            "give a dimension.")
    if isinstance(dim, torch.Tensor):  # torch.max(a, b) (or other=b) with a second tensor
        return _maximum(mode, func, "maximum" if name.startswith("max") else "minimum", args, kwargs)
    keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
    if isinstance(dim, (tuple, list)) and len(dim) > 1:  # amax / amin (a global max-pool: dim=(2, 3))
        dims = sorted({d % x.dim() for d in dim})
        if 0 in dims:
            raise NotPiecewiseLinearError(
                f"method={mode._method!r}: {name} over dim 0 mixes the examples of the batch.")
        # Those dimensions as one, last: the same windows, one element each.
        windows = x.movedim(dims, list(range(x.dim() - len(dims), x.dim()))).flatten(-len(dims))
        values = _max_over_dim(mode, func, name, (windows, -1), {})
        for d in dims if keepdim else ():
            values = values.unsqueeze(d)
        return values
    if isinstance(dim, (tuple, list)):
        dim = dim[0]
    dim = dim % x.dim()
    if dim == 0:
        raise NotPiecewiseLinearError(f"method={mode._method!r}: {name} over dim 0 mixes the examples of the batch.")
    windows = x.movedim(dim, -1)
    v, dv = _primal_and_tangent(windows)
    index = _select_in_windows(mode, v, dv, name.startswith(("max", "amax")), name)
    primal, tangent = _parts(windows)
    if name in ("amax", "amin"):
        # Elements level with the winner along the whole piece share the gradient, as
        # PyTorch's amax/amin split it (max/min(dim) give it to the index they return).
        with torch.no_grad():
            tied = level_with(v, dv, index)
            weights = (tied.to(primal.dtype) / tied.sum(-1, keepdim=True)).to(primal.dtype)
        values = fwAD.make_dual((primal * weights).sum(-1), (tangent * weights).sum(-1))
        return values.unsqueeze(dim) if keepdim else values
    values = fwAD.make_dual(primal.gather(-1, index).squeeze(-1), tangent.gather(-1, index).squeeze(-1))
    index = index.squeeze(-1)
    if keepdim:
        values, index = values.unsqueeze(dim), index.unsqueeze(dim)
    return torch.return_types.max((values, index)) if name == "max" else torch.return_types.min((values, index))


# The most elements an ordering op (sort, topk, kthvalue, median, cummax, ...) the walk
# reads may order along its dimension: each row holds a float64 steps per pair (and a
# few copies while they are read), 4 MiB a row at 1024 elements, and a topk over a
# vocabulary of 50000 would want 10 GB a row.
MOST_SORTED_ELEMENTS = 1024


def _sort(mode: BreakpointMode, func, name, args, kwargs):
    """sort (and topk, msort) along a dimension: the values in the order they have just
    after the point, with a kink wherever two of them cross (_ordered_along)."""
    x = args[0]
    if name == "topk":
        given = dict(zip(("input", "k", "dim", "largest", "sorted"), args), **kwargs)
        dim, descending, keep = given.get("dim", -1), given.get("largest", True), int(given["k"])
        if not given.get("sorted", True):
            raise NotPiecewiseLinearError(
                f"method={mode._method!r}: topk with sorted=False returns its values in an order PyTorch does not "
                "define; give sorted=True.")
    else:
        given = dict(zip(("input", "dim", "descending"), args), **kwargs)
        dim, descending, keep = given.get("dim", 0 if name == "msort" else -1), given.get("descending", False), None
    dim = _ordered_dim(mode, x, dim, name)
    # PyTorch's own op picks (topk's ties, which last along a path where two elements
    # move alike, fall as autograd's do; a stable sort's fell otherwise: 0.83 off).
    order = _ordered_along(mode, x, dim, name, lambda ahead: torch.sort(
        ahead, dim=-1, descending=descending, stable=True).indices if keep is None else torch.topk(
        ahead, keep, dim=-1, largest=descending, sorted=True).indices)
    values = _gathered(x, dim, order)
    if name == "msort":
        return values
    return (torch.return_types.topk if name == "topk" else torch.return_types.sort)((values, order.movedim(-1, dim)))


def _order_statistic(mode: BreakpointMode, func, name, args, kwargs):
    """kthvalue and median over a dimension (the k-th smallest element, the lower median)
    and cummax / cummin (the largest / smallest so far): each output is one element of
    its row, which one changing wherever two elements cross (_ordered_along)."""
    x = args[0]
    names = {"kthvalue": ("input", "k", "dim", "keepdim")}.get(name, ("input", "dim", "keepdim"))
    given = dict(zip(names, args), **kwargs)
    if "dim" not in given and name != "kthvalue":
        if name.startswith("cum"):
            return func(*args, **kwargs)  # PyTorch's own message: cummax and cummin need a dim
        raise NotPiecewiseLinearError(
            f"method={mode._method!r}: median over the whole tensor mixes the examples of the batch; "
            "give a dimension.")
    dim = _ordered_dim(mode, x, given.get("dim", -1), name)
    if name.startswith("cum"):
        running = torch.cummax if name == "cummax" else torch.cummin
        # (cummax / cummin give every position an index of its own: no keepdim)
        index = _ordered_along(mode, x, dim, name, lambda ahead: running(ahead, dim=-1).indices)
        return getattr(torch.return_types, name)((_gathered(x, dim, index), index.movedim(-1, dim)))
    position = int(given["k"]) - 1 if name == "kthvalue" else (x.shape[dim] - 1) // 2
    if not 0 <= position < x.shape[dim]:
        return func(*args, **kwargs)  # PyTorch's own message for an out-of-range k
    # (PyTorch's own pick, whose ties fall as autograd's do)
    index = _ordered_along(mode, x, dim, name, lambda ahead: torch.kthvalue(
        ahead, position + 1, dim=-1, keepdim=True).indices if name == "kthvalue" else torch.median(
        ahead, dim=-1, keepdim=True).indices)
    values, index = _gathered(x, dim, index), index.movedim(-1, dim)
    if not given.get("keepdim", False):
        values, index = values.squeeze(dim), index.squeeze(dim)
    return getattr(torch.return_types, name)((values, index))


def _ordered_dim(mode: BreakpointMode, x: torch.Tensor, dim: int, name: str) -> int:
    """The dimension an ordering op works along, checked: not the batch's, and not so
    long that reading its pairs would take more memory than a model's rows."""
    dim = dim % x.dim()
    if dim == 0:
        raise NotPiecewiseLinearError(f"method={mode._method!r}: {name} over dim 0 mixes the examples of the batch.")
    if x.shape[dim] > MOST_SORTED_ELEMENTS:
        raise NotPiecewiseLinearError(
            f"method={mode._method!r}: {name} over {x.shape[dim]} elements: the walk reads every pair of them "
            f"({x.shape[dim] * (x.shape[dim] - 1) // 2} per row), and takes at most {MOST_SORTED_ELEMENTS} "
            "elements. Use a fixed n_steps or n_steps='auto' for this model.")
    return dim


def _ordered_along(mode: BreakpointMode, x: torch.Tensor, dim: int, name: str,
                   choose: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The positions (along the last dim, x's ``dim`` moved there) an ordering op picks
    just after the point: ``choose`` of every element's value there. Every crossing of
    two elements may change the pick, so every pair is read, not only the neighbours of
    the current order: a walk places all the kinks of an op along a segment at once, and
    after a swap the neighbours are others. (Crossings that change nothing, below topk's
    k + 1 first or away from a median, cut pieces that need not be cut: that costs rows,
    not accuracy.) The pairs are n (n - 1) / 2 per row of n elements."""
    v, dv = _primal_and_tangent(x.movedim(dim, -1))
    with torch.no_grad():
        picked = choose(_side(mode, v, dv))
        first, second = torch.triu_indices(v.shape[-1], v.shape[-1], 1, device=v.device)
        gap, gap_rate = v[..., first] - v[..., second], dv[..., first] - dv[..., second]
        ahead = _side(mode, gap, gap_rate)
    mode._record_kink(gap, gap_rate, 0.0, name)
    # (On a curved walk each pair is a comparison: which of the two is ahead.)
    _record_difference_choice(mode, ahead > 0, gap, gap_rate, ahead, name)
    return picked


def _gathered(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """x's elements at ``index`` along ``dim`` (index along the last dim), with their tangents."""
    primal, tangent = _parts(x.movedim(dim, -1))
    return fwAD.make_dual(primal.gather(-1, index), tangent.gather(-1, index)).movedim(-1, dim)


def _pool_rows(x: torch.Tensor, spatial: int) -> Tuple[torch.Tensor, bool]:
    """A pool's input as (rows, channels, *spatial), and whether it came unbatched: an
    unbatched input (C, ...) pools each channel on its own, so the path rows along dim 0
    are its channels, taken as rows of one channel each (squeeze(1) undoes it)."""
    unbatched = x.dim() == spatial + 1
    return (x.unsqueeze(1) if unbatched else x), unbatched


def _max_pool(mode: BreakpointMode, func, name, args, kwargs):
    spatial = 1 if "1d" in name else 2 if "2d" in name else 3
    names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    given = dict(zip(names, args), **kwargs)
    x = given["input"]
    with_indices = bool(given.get("return_indices", False)) or name.endswith("with_indices")

    def per_dim(value, default):
        value = default if value is None or (isinstance(value, (list, tuple)) and not value) else value
        return tuple(value) if isinstance(value, (list, tuple)) else (value,) * spatial

    kernel = per_dim(given["kernel_size"], None)
    stride = per_dim(given.get("stride"), kernel)
    padding = per_dim(given.get("padding", 0), 0)
    dilation = per_dim(given.get("dilation", 1), 1)
    ceil_mode = bool(given.get("ceil_mode", False))
    batched, unbatched = _pool_rows(x, spatial)
    sizes = batched.shape[-spatial:]
    pads = []
    for axis in reversed(range(spatial)):
        span = dilation[axis] * (kernel[axis] - 1) + 1
        length = sizes[axis] + 2 * padding[axis] - span
        out = (-(-length // stride[axis]) if ceil_mode else length // stride[axis]) + 1
        if ceil_mode and (out - 1) * stride[axis] >= sizes[axis] + padding[axis]:
            out -= 1  # the last window must start inside the input or its left padding
        right = (out - 1) * stride[axis] + span - sizes[axis] - padding[axis]
        pads += [padding[axis], max(right, padding[axis])]

    def windows_first(tensor: torch.Tensor, fill: float) -> torch.Tensor:
        """(k_1 * ... * k_s, N, C, out_1 * ... * out_s): every window's elements, first
        (reductions over a window run over whole rows of memory)."""
        if any(pads):
            tensor = torch.nn.functional.pad(tensor, pads, value=fill)
        for axis in range(spatial):
            # unfold appends the window as the last dim; the spatial dims keep their places.
            tensor = tensor.unfold(2 + axis, dilation[axis] * (kernel[axis] - 1) + 1, stride[axis])
            if dilation[axis] > 1:
                tensor = tensor[..., :: dilation[axis]]
        order = list(range(2 + spatial, 2 + 2 * spatial)) + list(range(2 + spatial))
        return tensor.permute(order).reshape(math.prod(kernel), *tensor.shape[:2], -1)

    v, dv = _primal_and_tangent(batched)
    with torch.no_grad():
        pool = getattr(torch.nn.functional, f"max_pool{spatial}d")
        _, index = pool(_side(mode, v, dv), kernel, stride, padding, dilation, ceil_mode, return_indices=True)
        sv, sdv = windows_first(v, -math.inf), windows_first(dv, 0.0)
    values = _pooled_winners(mode, batched, v, dv, index, sv, sdv, name)
    return _pooled(values, index, unbatched, with_indices)


def _pooled(values: torch.Tensor, index: torch.Tensor, unbatched: bool, with_indices: bool):
    """A max-pool's result in PyTorch's form; its indices (return_indices) are the
    winners on the piece after the point, as its values are (constant on the piece: a
    MaxUnpool after it scatters affinely)."""
    if unbatched:
        values, index = values.squeeze(1), index.squeeze(1)
    return (values, index) if with_indices else values


def _pooled_winners(mode: BreakpointMode, batched: torch.Tensor, v: torch.Tensor, dv: torch.Tensor,
                    index: torch.Tensor, sv: torch.Tensor, sdv: torch.Tensor, name: str) -> torch.Tensor:
    """A max-pool's output on the piece after the point, and its kinks recorded.

    ``index``: the winner of each window just after the point (the max of z + margin
    dz: PyTorch's own pooling of _side, whose indices are positions in each input
    plane), shaped as the output; v, dv: the input's float64 value and tangent;
    sv, sdv: (window elements, N, C, windows) of them, padding at -inf and 0. The
    kinks come from the windows' elements, the value is gathered from the input at the
    winner's position."""
    with torch.no_grad():
        out_shape = index.shape
        index = index.flatten(2)
        flat_v, flat_dv = v.flatten(2), dv.flatten(2)
        chosen_v, chosen_dv = flat_v.gather(-1, index), flat_dv.gather(-1, index)
    _record_overtaking(mode, sv, sdv, chosen_v, chosen_dv, 0, name)
    if mode.curved_kinks:  # every element's distance below the winner
        def back_from(reference):  # back to where the reference's winner was level with this one
            return mode._back_to(chosen_v - flat_v.gather(-1, reference), chosen_dv - flat_dv.gather(-1, reference), 0.0)

        finite = torch.isfinite(sv)
        mode._record_choice(index, back_from, torch.where(finite, chosen_v - sv, math.inf).movedim(0, -1),
                            torch.where(finite, chosen_dv - sdv, 0.0).movedim(0, -1), name)
    primal, tangent = _parts(batched)
    return fwAD.make_dual(primal.flatten(2).gather(-1, index).view(out_shape),
                          tangent.flatten(2).gather(-1, index).view(out_shape))


def _adaptive_max_pool(mode: BreakpointMode, func, name, args, kwargs):
    """An adaptive max-pool: output i of an axis of size n pools elements
    floor(i n / out) to ceil((i + 1) n / out) - 1 (PyTorch's windows), which may differ
    in width by one and overlap. Where the output size divides the input's, it is the
    max-pool of windows n / out wide."""
    spatial = 1 if "1d" in name else 2 if "2d" in name else 3
    x = args[0]
    output_size = kwargs.get("output_size", args[1] if len(args) > 1 else None)
    with_indices = bool(kwargs.get("return_indices", args[2] if len(args) > 2 else False)) or name.endswith(
        "with_indices")
    sizes = x.shape[-spatial:]
    wanted = tuple(output_size) if isinstance(output_size, (list, tuple)) else (output_size,) * spatial
    wanted = tuple(size if out is None else out for out, size in zip(wanted, sizes))
    if not any(size % out for size, out in zip(sizes, wanted)):
        kernel = tuple(size // out for size, out in zip(sizes, wanted))
        return _max_pool(mode, func, f"max_pool{spatial}d", (x, kernel, kernel), {"return_indices": with_indices})
    batched, unbatched = _pool_rows(x, spatial)
    table = _adaptive_window_table(sizes, wanted).to(x.device)
    v, dv = _primal_and_tangent(batched)
    with torch.no_grad():
        pool = getattr(torch.nn.functional, f"adaptive_max_pool{spatial}d")
        _, index = pool(_side(mode, v, dv), wanted, return_indices=True)

        def windows_first(tensor: torch.Tensor, fill: float) -> torch.Tensor:
            """(window elements, N, C, windows); a narrower window's missing elements at
            the extra position of ``fill`` after the plane."""
            plane = tensor.flatten(2)
            plane = torch.cat([plane, plane.new_full((*plane.shape[:2], 1), fill)], dim=2)
            return plane[:, :, table].permute(2, 0, 1, 3)

        sv, sdv = windows_first(v, -math.inf), windows_first(dv, 0.0)
    values = _pooled_winners(mode, batched, v, dv, index, sv, sdv, name)
    return _pooled(values, index, unbatched, with_indices)


def _adaptive_window_table(sizes: Sequence[int], wanted: Sequence[int]) -> torch.Tensor:
    """(most elements of a window, windows): the positions in the flattened input plane
    of each adaptive window's elements, prod(sizes) (one past the plane) where a window
    is narrower than the widest."""
    per_axis = []
    for size, out in zip(sizes, wanted):
        starts = [(i * size) // out for i in range(out)]
        ends = [-(-((i + 1) * size) // out) for i in range(out)]
        width = max(e - b for b, e in zip(starts, ends))
        # (windows, width) along this axis, -1 past a window's end
        per_axis.append(torch.tensor([[b + k if b + k < e else -1 for k in range(width)]
                                      for b, e in zip(starts, ends)]))
    strides = [math.prod(sizes[axis + 1:]) for axis in range(len(sizes))]
    position = torch.zeros((1,) * (2 * len(sizes)), dtype=torch.long)
    missing = torch.zeros_like(position, dtype=torch.bool)
    for axis, (elements, stride) in enumerate(zip(per_axis, strides)):
        # windows of every axis first, then the elements of every axis
        shape = [1] * (2 * len(sizes))
        shape[axis], shape[len(sizes) + axis] = elements.shape
        elements = elements.view(shape)
        position = position + elements.clamp_min(0) * stride
        missing = missing | (elements < 0)
    position = torch.where(missing, math.prod(sizes), position)
    windows = math.prod(wanted)
    return position.reshape(windows, -1).T.contiguous()


# Forward-mode AD in PyTorch 2.13 takes a slow path (Python decompositions, 50 to 100
# times a plain op) for an elementwise op between a dual tensor and a constant (a
# bias, a scale) and for layer_norm. These ops are common on the path of a walk (a
# transformer's embeddings, attention scale, norms), so their tangents are computed
# here from the primal and tangent by the derivative's formula. Each returns None
# where it does not apply (then the op runs as it is).

def _one_moving_operand(args, kwargs):
    """(position of the one operand of a binary op that carries a tangent, primals of
    both operands), or None when not exactly one of them moves."""
    operands = list(args[:2])
    if len(operands) < 2:
        if "other" not in kwargs:
            return None
        operands.append(kwargs["other"])
    tangents = [_tangent(o) if isinstance(o, torch.Tensor) else None for o in operands]
    movers = [i for i, t in enumerate(tangents) if t is not None]
    if len(movers) != 1:
        return None
    primals = [fwAD.unpack_dual(o).primal if isinstance(o, torch.Tensor) else o for o in operands]
    return movers[0], primals, tangents[movers[0]]


def _dual_like(value: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    return fwAD.make_dual(value, torch.broadcast_to(tangent.to(value.dtype), value.shape))


def _sum_shortcut(subtract: bool, reflected: bool = False):
    """add / sub, and their reflected dunders (other + self, other - self): the moving
    operand's tangent, negated (times alpha) where it is the one subtracted."""
    def shortcut(func, args, kwargs):
        found = _one_moving_operand(args, kwargs)
        if found is None or set(kwargs) - {"other", "alpha"}:
            return None
        mover, primals, tangent = found
        value = func(*primals, **({"alpha": kwargs["alpha"]} if "alpha" in kwargs else {}))
        scale = kwargs.get("alpha", 1) if mover == 1 else 1
        if subtract and mover == (0 if reflected else 1):
            scale = -scale
        with torch.no_grad():  # gradient rows differentiate the value only
            tangent = tangent if scale == 1 else tangent * scale
        return _dual_like(value, tangent)
    return shortcut


def _product_shortcut(func, args, kwargs):
    found = _one_moving_operand(args, kwargs)
    if found is None or set(kwargs) - {"other"}:
        return None
    mover, primals, tangent = found
    value = func(*primals)
    with torch.no_grad():
        tangent = tangent * primals[1 - mover]
    return _dual_like(value, tangent)


def _quotient_shortcut(func, args, kwargs):
    found = _one_moving_operand(args, kwargs)
    if found is None or found[0] != 0 or set(kwargs) - {"other"}:  # a moving divisor bends the path
        return None
    _, primals, tangent = found
    value = func(*primals)
    with torch.no_grad():
        tangent = tangent / primals[1]
    return _dual_like(value, tangent)


def _layer_norm_shortcut(func, args, kwargs):
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    bound = {**dict(zip(names, args)), **kwargs}
    if set(bound) - set(names) or any(_tangent(bound.get(k)) is not None
                                      for k in ("weight", "bias") if isinstance(bound.get(k), torch.Tensor)):
        return None
    x, weight, eps = bound["input"], bound.get("weight"), bound.get("eps", 1e-5)
    primal, tangent = _parts(x)
    value = func(primal, bound["normalized_shape"], weight, bound.get("bias"), eps)
    with torch.no_grad():
        dims = tuple(range(-len(tuple(bound["normalized_shape"])), 0))
        centred = primal - primal.mean(dims, keepdim=True)
        inverse_std = torch.rsqrt(centred.square().mean(dims, keepdim=True) + eps)
        normalised = centred * inverse_std
        direction = inverse_std * (tangent - tangent.mean(dims, keepdim=True)
                                   - normalised * (normalised * tangent).mean(dims, keepdim=True))
        if weight is not None:
            direction = direction * weight
    return _dual_like(value, direction)


def _elementwise_shortcut(slope: Callable[[torch.Tensor], torch.Tensor]):
    """An elementwise smooth op whose backward has no forward-mode formula (SiLU's, Mish's):
    its value from the primal (the gradient rows differentiate that), its tangent as the
    slope at the primal times the input's; refused (None) in place."""
    def shortcut(func, args, kwargs):
        if not args:
            return None
        in_place = bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))
        primal, tangent = _parts(args[0])
        value = func(primal, **{**kwargs, "inplace": False}) if len(args) == 1 else func(primal, False)
        with torch.no_grad():
            direction = tangent * slope(primal)
        result = _dual_like(value, direction)
        if in_place:  # (nn.SiLU(inplace=True), as torchvision's blocks use it: the model goes on with its tensor)
            args[0].copy_(result)
            return args[0]
        return result

    return shortcut


def _silu_slope(x: torch.Tensor) -> torch.Tensor:
    sigmoid = torch.sigmoid(x)
    return sigmoid * (1 + x * (1 - sigmoid))


def _mish_slope(x: torch.Tensor) -> torch.Tensor:
    squashed = torch.tanh(torch.nn.functional.softplus(x))
    return squashed + x * (1 - squashed.square()) * torch.sigmoid(x)


def _group_norm_shortcut(func, args, kwargs):
    """group_norm, whose backward has no forward-mode formula: as layer_norm's shortcut,
    over each example's groups of channels."""
    names = ("input", "num_groups", "weight", "bias", "eps")
    bound = {**dict(zip(names, args)), **kwargs}
    if set(bound) - set(names) or any(_tangent(bound.get(k)) is not None
                                      for k in ("weight", "bias") if isinstance(bound.get(k), torch.Tensor)):
        return None
    x, groups, weight, eps = bound["input"], bound["num_groups"], bound.get("weight"), bound.get("eps", 1e-5)
    primal, tangent = _parts(x)
    value = func(primal, groups, weight, bound.get("bias"), eps)
    with torch.no_grad():
        grouped, moving = primal.reshape(primal.shape[0], groups, -1), tangent.reshape(primal.shape[0], groups, -1)
        centred = grouped - grouped.mean(-1, keepdim=True)
        inverse_std = torch.rsqrt(centred.square().mean(-1, keepdim=True) + eps)
        normalised = centred * inverse_std
        direction = inverse_std * (moving - moving.mean(-1, keepdim=True)
                                   - normalised * (normalised * moving).mean(-1, keepdim=True))
        direction = direction.reshape(primal.shape)
        if weight is not None:
            direction = direction * weight.reshape(1, -1, *[1] * (primal.dim() - 2))
    return _dual_like(value, direction)


TANGENT_SHORTCUTS: Dict[str, Callable] = {
    "silu": _elementwise_shortcut(_silu_slope),
    "mish": _elementwise_shortcut(_mish_slope),
    "group_norm": _group_norm_shortcut,
    **{n: _sum_shortcut(subtract=False) for n in ("add", "__add__", "__radd__")},
    **{n: _sum_shortcut(subtract=True) for n in ("sub", "__sub__")},
    "__rsub__": _sum_shortcut(subtract=True, reflected=True),
    **{n: _product_shortcut for n in ("mul", "__mul__", "__rmul__")},
    **{n: _quotient_shortcut for n in ("div", "__truediv__")},
    "layer_norm": _layer_norm_shortcut,
}


# linear / conv are affine, handled here only to give their tangent cheaply.
AFFINE_HANDLERS: Dict[str, Callable] = {
    n: _affine_with_bias for n in ("linear", "conv1d", "conv2d", "conv3d")
}

# Piecewise-linear ops whose PyTorch gradient anywhere inside a piece is the one the walk
# reads there (see BreakpointMode.pieces_beyond_the_point): where a unit sits on its
# kink with no rate (a dead ReLU's output going into another), both take the factor at
# the kink (ReLU 0, LeakyReLU and PReLU their slope, abs 0), and where a max-pool's
# elements stay level both take the first.
PLAIN_GRADIENT_OPS = frozenset(
    "relu relu_ leaky_relu leaky_relu_ prelu abs abs_ __abs__ absolute max_pool1d max_pool2d max_pool3d "
    "_max_pool1d _max_pool2d _max_pool3d max_pool1d_with_indices max_pool2d_with_indices max_pool3d_with_indices "
    "adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d adaptive_max_pool1d_with_indices "
    "adaptive_max_pool2d_with_indices adaptive_max_pool3d_with_indices".split())

PIECEWISE_OPS: Dict[str, Callable] = {
    **{n: _relu for n in ("relu", "relu_")},
    **{n: _leaky_relu for n in ("leaky_relu", "leaky_relu_")},
    "prelu": _prelu,
    **{n: _rrelu for n in ("rrelu", "rrelu_")},
    **{n: _clamp for n in ("hardtanh", "hardtanh_", "relu6", "relu6_", "clamp", "clamp_", "clip", "clip_",
                           "clamp_min", "clamp_min_", "clamp_max", "clamp_max_")},
    **{n: _abs for n in ("abs", "abs_", "__abs__", "absolute")},
    "softshrink": _softshrink,
    **{n: _hardsigmoid for n in ("hardsigmoid", "hardsigmoid_")},
    **{n: _threshold for n in ("threshold", "threshold_", "_threshold")},  # (F.threshold is named _threshold)
    **{n: _maximum for n in ("maximum", "minimum", "fmax", "fmin")},
    **{n: _comparison for n in ("gt", "__gt__", "greater", "ge", "__ge__", "greater_equal",
                                "lt", "__lt__", "less", "le", "__le__", "less_equal")},
    **{n: _max_over_dim for n in ("max", "min", "amax", "amin")},
    **{n: _sort for n in ("sort", "msort", "topk")},
    **{n: _order_statistic for n in ("kthvalue", "median", "cummax", "cummin")},
    **{n: _max_pool for n in ("max_pool1d", "max_pool2d", "max_pool3d", "_max_pool1d", "_max_pool2d",
                              "_max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
                              "max_pool3d_with_indices")},
    **{n: _adaptive_max_pool for n in ("adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
                                       "adaptive_max_pool1d_with_indices", "adaptive_max_pool2d_with_indices",
                                       "adaptive_max_pool3d_with_indices")},
}
