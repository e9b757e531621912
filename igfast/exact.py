"""method="exact": Integrated Gradients without quadrature error, for piecewise-linear networks.

Along the straight path p(t) = x' + t (x - x') a network of affine maps and
piecewise-linear functions is affine on each piece between breakpoints, so its
gradient is constant there and

    integral_0^1 grad F(p(t)) dt = sum over pieces k of (t_{k+1} - t_k) grad F(p(t_k)),

with grad F(p(t_k)) taken on the side the path moves into. _split_into_pieces finds
the pieces in rounds, for every example at once: each segment of a path not yet known
to be one piece (at first the whole path) is evaluated at its middle with forward-mode
tangents along the path (piecewise.BreakpointMode), which gives in the same forward
and backward the gradient there, the piece that holds the point, and every kink that
point can place exactly; the segment is cut at those kinks, and the parts other than
the piece are the next round's segments. Each piece costs the one row that found it,
and the rounds are about as many as the network's piecewise-linear layers; the parts
cut by the last op's kinks are pieces already, and take one plain row each.

Each round is one pass of the streaming engine per group of segments (one path node
per segment, at alpha 0 of a path that starts at the segment's middle), so rounds
are chunked to the memory budget and survive out-of-memory errors like every other
rule; the row limit measured in the first round serves all later ones.

A smooth head after the last piecewise-linear op (softmax, log-softmax, sigmoid of
the target) makes the gradient vary inside a piece. The breakpoints are still exact
(they come from the piecewise-linear part), and each piece is integrated with
GAUSS_NODES_PER_PIECE Gauss-Legendre nodes: breakpoint-aware quadrature, whose
integrand is smooth on every piece.

method="gausslegendre_pieces" is the same quadrature for mixed networks, whose kinks
come after smooth ops: their pre-activations are curved along the path, a unit's step
to its kink only a Newton estimate, so _follow_curved_pieces brackets and locates each
kink (BreakpointMode with curved_kinks), a few rounds per kink, with each path split
into sub-paths walked side by side where its kinks are many; every piece gets Gauss
nodes, and long pieces are cut so the smooth stretches get about n_steps nodes.
"""

import contextlib
import dataclasses
import math
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import numpy as np
import torch
import torch.utils.checkpoint
import torch.autograd.forward_ad as fwAD

from .dtypes import dtype_policy
from .chunking import RowLimit
from .completeness import completeness_scale, relative_completeness
from .engine import GradientsAt, PathIntegral, outside_inference_mode
from . import ops
from .memory import add_to_estimate
from .errors import (
    ArgumentError, ArgumentTypeError, NotPiecewiseLinearError, ToleranceNotReachedWarning, warn_to_caller,
)
from .piecewise import ROWS_MIXED, BreakpointMode, CurvedBeforeKinkError, PathState, kink_margin, rows_mixed
from .quadrature import PIECE_METHODS, PathNodes

# The most pieces an example's path may have before the call stops (each costs one
# forward and backward row); a convolutional network has thousands.
DEFAULT_MAX_PIECES = 65536
# Gauss-Legendre nodes per piece when a smooth head follows the last kink: a softmax
# head is integrated to about 1e-9 relative with 2, to rounding with 3.
GAUSS_NODES_PER_PIECE = 3
# method="gausslegendre_pieces" (kinks after smooth ops): a kink is located once it is
# bracketed this closely in t (or the changed units' Newton estimate says so); the
# error this leaves is at most the bracket times the gradient's jump. A bracket that
# Newton steps have not closed after BISECT_AFTER rounds is bisected. With a `tolerance`
# the kinks are located to KINK_SHARE of it where that is closer (a kink misplaced by 1e-10
# cost 6e-10 relative on a GELU and layer-norm model), down to the dtype's kink margin.
KINK_POSITION_TOLERANCE = 1e-10
KINK_SHARE = 1e-2
BISECT_AFTER = 6
# With a tolerance (a user's, or n_steps="auto" on a mixed network): the most rounds of
# bisecting the pieces that carry the error estimate (see _refine_pieces).
MAX_REFINEMENTS = 8
# Walk forwards per piece of a curved walk (bracketing and Newton steps), measured on
# bench_exact's mixed workloads: 2.6 (tanh-then-ReLU MLP), 2.2 (ReLU-FFN encoder layer).
# What auto predicts a curved walk to cost.
CURVED_WALK_ROWS_PER_PIECE = 3
# The curved walk splits a path into sub-paths walked side by side (see
# _follow_curved_pieces): a row with more than this many kinks predicted ahead splits,
# up to one row per this many pieces the probe predicts and at most MAX_SUB_PATHS.
SUB_PATH_PIECES = 8
MAX_SUB_PATHS = 64
SUB_PATH_BYTES = 64 * 2**20
# What a row of the curved walk holds, in its units' states (PathState.row_bytes): the
# states at its bracket's ends and its start's pieces, the state its forward records and
# the reference that forward compares with, and the forward's own float64 temporaries
# (about five states for a ReLU after a linear layer; measured by tracing allocations).
# Where even one row per example does not fit the memory set aside, the examples are
# walked in groups (see _examples_walked_together).
CURVED_ROW_STATES = 14
# What a walk forward holds at its peak beyond the model's own forward, per row: float64
# copies of the widest piecewise-linear op's units with their tangents, the steps to
# their kinks and the masks (this many float64 per unit, measured by tracing allocations
# of a ReLU MLP's walk), and with curved kinks the state it records and its copy in the
# walk's record. The engine's chunks that run a walk count it (memory.add_to_estimate):
# the CPU estimate sees only what autograd saves.
WALK_FLOAT64S_PER_UNIT = 4
# One node at alpha 0 of a path that starts at each example's current point, so the
# engine evaluates exactly that point (x' + 0 * (x - x') is x' to the bit); its output
# value is kept (start_node), which gives F(x') in the first round.
POINT_NODES = PathNodes(torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64), start_node=0)

# run_round(examples, points, wrap) -> one engine pass over those examples (a long
# index tensor into the batch), evaluating each at its point (a tuple of (E, ...)
# tensors); wrap, when given, wraps the engine's gradients_at.
RunRound = Callable[[torch.Tensor, Tuple[torch.Tensor, ...], Optional[Callable[[GradientsAt], GradientsAt]]],
                    PathIntegral]
# forward_at(examples, points): the model's forward for those examples at those points
# (one row each), returning its output (check_rows_kept reads it; the walk does not);
# called under the walk's mode and tangents.
ForwardAt = Callable[[torch.Tensor, Tuple[torch.Tensor, ...]], Any]
# Gradient points handed to the engine per pass, in units of its row limit: enough
# for full chunks of small models, whose per-pass overhead would show; but the points
# (and the rows of the inputs they go with) beyond one chunk's may hold at most
# EXTRA_POINT_BYTES, since the memory budget was measured for one chunk.
POINTS_PER_ROW_LIMIT = 16
EXTRA_POINT_BYTES = 16 * 2**20
# Under a memory budget, what the walk holds beside the engine's chunks (a pass's
# points and their per-piece sums, the rows a curved walk keeps) comes out of the
# budget: this share of the room it leaves for chunks is set aside before the first
# chunk runs (RowLimit.set_aside), and passes and sub-paths are sized to it. Without
# it, a 2 MB budget on NoiseTunnel's 80 rows of an MLP peaked at 19 MB (exact) and
# 31 MB (gausslegendre_pieces), the points alone taking EXTRA_POINT_BYTES.
DRIVER_SHARE = 0.25
# Bytes a gradient point holds while its pass runs, in rows of the inputs: the point,
# its example's input row (the engine's pass), the engine's accumulator, two float64
# sums (a Gauss pair's, 2 rows each for float32 inputs) and the start and direction
# rows gathered to make the point.
POINT_ROWS = 9
# A point of _refine_pieces' passes holds more: its pair's difference, the signed
# copies added in and the float64 temporaries of its norm (about 8 rows). With 9, the
# refinement of 256 examples of igfast bench's MLP with a softmax head peaked at 1.03x
# a 5 MB budget; with 17, at 0.74x.
REFINE_POINT_ROWS = 17
# The walk's record outlives its chunks: every piece found is kept to the end of the
# call, where the pieces are sorted into ExactInfo.breakpoints, and every segment
# waiting for a later round is held until then. Under a memory budget the record is
# charged as it grows (_RecordLedger): without it, 256 examples of igfast bench's MLP
# (118 pieces each) peaked at 2.3 MB under a 0.7 MB budget. Bytes per piece or
# segment, the sorts' measured by tracing their allocations:
PIECE_BYTES = 24  # a piece found: its example, start and length (int64, float64, float64)
SEGMENT_BYTES = 24  # a segment waiting: its example, low and high
# _breakpoints, once no chunk runs: the sort into per-example breakpoints and its output.
BREAKPOINT_SORT_BYTES = 40
# _refine_pieces' segments: their example, start, length and norm, and the sorts that
# choose the ones to split (_largest_carrying: 56), beside the walk's pieces.
REFINE_SEGMENT_BYTES = 4 * 8 + 56
# The curved walk's pieces: their row, start, length and two flags.
CURVED_PIECE_BYTES = 3 * 8 + 2
# Its pieces joined once the walk is done, then at the sub-paths' cuts (_join_at_cuts).
CURVED_JOIN_BYTES = 4 * CURVED_PIECE_BYTES


@dataclass(frozen=True)
class ExactSettings:
    max_pieces: int
    curved_kinks: bool = False  # method="gausslegendre_pieces"
    # method="gausslegendre_pieces": n_steps; a piece longer than
    # GAUSS_NODES_PER_PIECE / n_steps is cut into equal parts no longer than that, so the
    # smooth stretches between kinks get about n_steps nodes over the whole path.
    spread_steps: Optional[int] = None
    # Where pieces get Gauss nodes (gausslegendre_pieces, or a smooth head): adaptive
    # Gauss quadrature on the pieces to this relative error (see _refine_pieces), as a
    # user's `tolerance` or n_steps="auto" on a mixed network asks; None: one Gauss rule
    # per piece, its estimate the midpoint rule's distance.
    tolerance: Optional[float] = None
    # n_steps="auto" only (method="exact" stays exact): the walk may stop an example once
    # the pieces it has not reached are estimated within this relative error (see
    # _GapFill); None: every piece is reached.
    stop_within: Optional[float] = None

    @property
    def method(self) -> str:
        """The method these settings are for (for messages)."""
        return "gausslegendre_pieces" if self.curved_kinks else "exact"


@dataclass
class ExactInfo:
    """What method="exact" did, per example."""

    pieces: torch.Tensor  # (B,) int64: linear pieces of the path
    # (B,) int64: model evaluations: one forward+backward row per piece (the one that
    # found it gives its gradient); with a smooth head GAUSS_NODES_PER_PIECE rows more,
    # the rows that found the pieces being forwards with tangents after the first round;
    # with gausslegendre_pieces the curved walk's forwards and the Gauss rows; and
    # rows_check's
    evaluations: torch.Tensor
    walk_forwards: int  # of those, forwards with tangents only, over the batch
    # Rounds of the walk: passes that wait on the one before (method="exact": about the
    # network's piecewise-linear layers; gausslegendre_pieces: a few per piece of the
    # longest of the rows that walk each path side by side)
    walk_rounds: int
    breakpoints: List[torch.Tensor]  # per example, float64: t of every piece's start (0 first)
    smooth_head: Optional[str]  # the first smooth op after the last kink (None: the pieces are exact)
    nodes_per_piece: int  # gradients per piece: 1, or GAUSS_NODES_PER_PIECE with a smooth head
    # With a smooth head, per example: the relative L2 distance between the attributions
    # and the midpoint rule's on the same pieces. It estimates the midpoint rule's error
    # and so overstates the Gauss rule's (accurate to a higher order in the piece length)
    # by orders of magnitude; it is not a proven bound. None without a head (exact).
    head_error_estimate: Optional[torch.Tensor] = None
    # method="gausslegendre_pieces": kinks after smooth ops, located to
    # KINK_POSITION_TOLERANCE and every piece integrated by Gauss nodes (the estimate
    # above then covers the whole network, not only a head).
    curved_kinks: bool = False
    # gausslegendre_pieces: how closely in t its kinks were located (kink_position_tolerance)
    kink_position_tolerance: Optional[float] = None
    # With ExactSettings.stop_within, per example: the estimated relative error of the
    # stretches of its path left unreached (0 where the walk reached every piece; then
    # pieces and breakpoints are all of them, else those reached). None without.
    gap_error_estimate: Optional[torch.Tensor] = None
    # The relative error Gauss nodes on the pieces were refined to (ExactSettings.tolerance;
    # None: one fixed rule per piece, head_error_estimate the midpoint rule's distance).
    refined_to: Optional[float] = None
    # (B,) int64, of the evaluations: check_rows_kept's forward rows with a tangent (two
    # forwards of two), all of the example with the longest path, once per call (zeros
    # where n_steps="auto" had checked before, or with one row per forward). Its passes
    # are not in walk_rounds.
    rows_check: Optional[torch.Tensor] = None


@dataclass
class ExactIntegral:
    """The result of integrate_exactly, shaped like one pass of the engine."""

    gradient_sums: Tuple[torch.Tensor, ...]
    info: ExactInfo
    rounds: List[PathIntegral]  # the engine passes

    @property
    def forward_calls(self) -> int:
        return sum(r.forward_calls for r in self.rounds)


def exact_settings(n_steps, tolerance, max_steps, method: str = "exact") -> ExactSettings:
    """Check the arguments that go with a method of PIECE_METHODS. n_steps is not used by
    method="exact" (one node per piece) but must still be an integer, as for any method;
    method="gausslegendre_pieces" spreads about that many nodes over the smooth
    stretches (see ExactSettings.spread_steps). ``tolerance`` asks for adaptive Gauss
    pairs on the pieces wherever Gauss nodes are used (see ExactSettings.tolerance)."""
    if isinstance(n_steps, str):
        raise ArgumentError(
            f"method={method!r} integrates along the path's pieces, without a global rule: give no "
            f"n_steps (or an integer, which is ignored); got n_steps={n_steps!r}.")
    if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)):
        raise ArgumentTypeError(f"`n_steps` must be an integer; got {n_steps!r}.")
    if tolerance is not None:
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float, np.floating)) or not tolerance > 0:
            raise ArgumentError(f"`tolerance` (with method={method!r}: the relative error its Gauss nodes on the "
                                f"pieces are refined to) must be a number > 0; got {tolerance!r}.")
        tolerance = float(tolerance)
    curved = PIECE_METHODS[method]
    if curved and n_steps < 1:
        raise ArgumentError(f"`n_steps` (with method={method!r}: Gauss nodes spread over the path's smooth "
                            f"stretches) must be an integer >= 1; got {n_steps!r}.")
    spread = int(n_steps) if curved else None
    if max_steps is None:
        return ExactSettings(DEFAULT_MAX_PIECES, curved, spread, tolerance)
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
        raise ArgumentError(f"`max_steps` (with method={method!r}: the most pieces per example) must be an "
                            f"integer >= 1; got {max_steps!r}.")
    return ExactSettings(int(max_steps), curved, spread, tolerance)


def warn_of_non_finite_ends(ends: Tuple[torch.Tensor, ...], starts: Tuple[torch.Tensor, ...],
                            method: str) -> torch.Tensor:
    """A path with an infinite or NaN end has no Integrated Gradients: the fixed rules
    give what Captum gives (NaN and inf where they fall), but exact, auto and
    gausslegendre_pieces gave three different answers (NaN, zeros, finite numbers) and
    only auto warned, of a tolerance not reached. Returns which examples (B,) have one."""
    batch = ends[0].shape[0]
    bad = torch.zeros(batch, dtype=torch.bool, device=ends[0].device)
    for tensor in ends + starts:
        if tensor.is_floating_point() and tensor.numel():
            rows = ~torch.isfinite(tensor.reshape(tensor.shape[0], -1)).all(1)
            bad |= rows.expand(batch) if rows.shape[0] != batch else rows
    if bool(bad.any()):
        warn_to_caller(
            f"igfast: {method}: the inputs or baselines of {int(bad.sum())} of {batch} examples are not finite "
            "(inf or NaN): their path has no Integrated Gradients, and their attributions mean nothing.",
            UserWarning)
    return bad


def refuse_several_targets(settings: Optional[ExactSettings], many: Optional[list]) -> None:
    if settings is not None and many is not None:
        raise ArgumentError(f"method={settings.method!r} follows one target's path pieces; give one `target`.")


@outside_inference_mode
def integrate_exactly(ends: Tuple[torch.Tensor, ...], starts: Tuple[torch.Tensor, ...],
                      settings: ExactSettings, run_round: RunRound, forward_at: ForwardAt,
                      row_limit: RowLimit, rows_checked: bool = False) -> ExactIntegral:
    """sum over pieces of (piece length) x (gradient on the piece), per example and input
    (with settings.curved_kinks: Gauss nodes on every piece, see _follow_curved_pieces).

    ends / starts are the path's ends (inputs and baselines, or a layer's activations),
    starts with batch size B or 1. row_limit is the engine's (the walk takes its
    chunks from it too). ``rows_checked``: the caller ran check_rows_kept on this model.
    """
    batch_size = ends[0].shape[0]
    device = ends[0].device
    if batch_size == 0:  # no path to walk: empty attributions, as the fixed rules give
        none = torch.zeros(0, dtype=torch.long, device=device)
        info = ExactInfo(none, none.clone(), 0, 0, [], None, 1, curved_kinks=settings.curved_kinks,
                         rows_check=none.clone())
        return ExactIntegral(tuple(torch.zeros_like(e, dtype=dtype_policy(e.dtype).accumulate) for e in ends),
                             info, [])
    starts = tuple(s.expand_as(e) if s.shape[0] != batch_size else s for s, e in zip(starts, ends))
    directions = tuple(e - s for e, s in zip(ends, starts))
    margin = max(kink_margin(d.dtype) for d in directions)
    checked = torch.zeros(0, dtype=torch.long, device=device) if rows_checked else rows_check_pair(directions, row_limit)
    check_rows_kept(forward_at, starts, directions, margin, checked, settings.curved_kinks)
    # Summed in float64: a path of thousands of pieces would otherwise lose the last
    # digits of float32 completeness to the order of the sum.
    sums = tuple(torch.zeros_like(d, dtype=torch.float64) for d in directions)
    found: dict = {}
    group = _GradientGroup(row_limit, directions)
    ledger = _RecordLedger(row_limit, None if settings.curved_kinks else
                           lambda: _predicted_pieces(forward_at, starts, directions, margin, row_limit))
    rounds: List[PathIntegral] = []
    gap_fill = None
    if settings.curved_kinks:
        pieces = _walk_curved_paths(run_round, forward_at, starts, directions, margin, found, row_limit, settings,
                                    rounds, ledger)
    else:
        if settings.stop_within is not None:
            gap_fill = _GapFill(directions, settings.stop_within, group.room)
        pieces = _split_into_pieces(run_round, forward_at, starts, directions, margin, found, row_limit, group,
                                    settings, sums, rounds, ledger, gap_fill)
        if not found.get("piecewise_linear_ops") and found.get("smooth_op") is not None:
            # No kink but curved: the whole network would be one piece's "smooth head",
            # integrated by 3 Gauss nodes (a GELU MLP: 5e-3 off), which is not exact IG.
            # (An affine network is one piece with a constant gradient: exact.)
            raise smooth_network_error(found)
    examples, piece_start, piece_length = pieces.examples, pieces.starts, pieces.lengths
    if settings.spread_steps is not None:
        examples, piece_start, piece_length = _cut_long_pieces(
            examples, piece_start, piece_length, GAUSS_NODES_PER_PIECE / settings.spread_steps)
        # (cut between chunks; the walk's pieces stay, for the breakpoints)
        walked = pieces.examples.numel()
        ledger.charge((walked + examples.numel()) * PIECE_BYTES, walked, examples.numel())
    smooth_head = found.get("smooth_op")
    gauss = smooth_head is not None or settings.curved_kinks
    on_pieces = _OnPieces(run_round, starts, directions, group, batch_size, rounds)
    estimate = None
    gradient_rows = torch.zeros_like(pieces.count)
    if gauss:
        # The gradient bends inside a piece: Gauss nodes on every piece (the
        # breakpoints stay exact). With Gauss nodes, the middle one alone is the
        # midpoint rule: its distance from the Gauss sum estimates the midpoint rule's
        # error, far above the Gauss rule's own.
        gauss_nodes, gauss_weights = np.polynomial.legendre.leggauss(GAUSS_NODES_PER_PIECE)
        nodes, weights = (0.5 * (1 + gauss_nodes)).tolist(), (0.5 * gauss_weights).tolist()
        if settings.tolerance is not None:
            sums, estimate, gradient_rows = _refine_pieces(on_pieces, examples, piece_start, piece_length,
                                                           settings.tolerance, ledger, pieces.examples.numel())
        else:
            sums, midpoint_sums, gradient_rows = on_pieces.integrate(examples, piece_start, piece_length, nodes,
                                                                     weights)
            # (None with an even number of nodes, which only bench_exact's reference sets.)
            estimate = None if midpoint_sums is None else _relative_difference(midpoint_sums, sums, directions)
            _warn_of_a_coarse_head(estimate, smooth_head, settings)
    # (Without Gauss nodes the partition has summed each piece's constant gradient.)
    # + the walk's forwards and the first engine pass, and check_rows_kept's rows
    rows_check = torch.bincount(rows_check_rows(checked), minlength=batch_size).to(gradient_rows)
    evaluations = gradient_rows + pieces.walk_rows + rows_check
    ledger.between_chunks(pieces.examples.numel() * BREAKPOINT_SORT_BYTES, pieces.examples.numel())
    breakpoints = _breakpoints(pieces.examples, pieces.starts, batch_size)
    info = ExactInfo(pieces.count, evaluations, pieces.walk_forwards + int(rows_check.sum()), pieces.rounds,
                     breakpoints,
                     smooth_head, GAUSS_NODES_PER_PIECE if gauss else 1, estimate,
                     curved_kinks=settings.curved_kinks,
                     kink_position_tolerance=kink_position_tolerance(settings, margin) if settings.curved_kinks else None,
                     gap_error_estimate=None if gap_fill is None or gauss else gap_fill.estimate,
                     refined_to=settings.tolerance if gauss else None, rows_check=rows_check)
    results = tuple(total.to(dtype_policy(d.dtype).accumulate) for total, d in zip(sums, directions))
    return ExactIntegral(results, info, rounds)


# A refusal's prediction of the walk's pieces (the probe's count of the kinks each unit
# reaches if it stays affine: exact for the first piecewise-linear op, linearised after
# it) is raised by this factor: it was 3% short on a 64-example ReLU MLP (11,063 of 11,371).
PREDICTED_PIECES_MARGIN = 1.25


def _walk_from_the_start(forward_at: ForwardAt, starts, directions, margin: float, found: dict,
                         row_limit: RowLimit, curved_kinks: bool = False) -> "_WalkRecord":
    """One forward with tangents at every path's start, counting the kinks each unit
    would reach along the whole path if it stayed affine (BreakpointMode's horizon):
    exact for the first piecewise-linear op, linearised after it."""
    examples = torch.arange(directions[0].shape[0], device=directions[0].device)
    at_start = torch.zeros(examples.numel(), dtype=torch.float64, device=examples.device)
    return _walk(forward_at, examples, _points(starts, directions, examples, at_start), directions, margin, found,
                 row_limit, horizon=1 - at_start, curved_kinks=curved_kinks)


def _predicted_pieces(forward_at: ForwardAt, starts, directions, margin: float, row_limit: RowLimit) -> int:
    """The pieces of every example's path, predicted as ExactRoute.estimate_pieces predicts
    them for n_steps="auto"."""
    return int((1 + _walk_from_the_start(forward_at, starts, directions, margin, {}, row_limit).crossings).sum())


def _record_bytes(pieces: int, segments: int, waiting: int, kept: int) -> int:
    """What _follow_pieces' record holds: the pieces found, the round's segments, those
    waiting for the next round (at a round's end, the next round's segments are joined
    from them: twice those), and what the gap fill keeps."""
    return (pieces + segments + waiting) * SEGMENT_BYTES + kept


class _RecordLedger:
    """Charges the walk's record (see PIECE_BYTES) to the row limit as it grows: chunks
    get what is left, and a budget too small for the record raises the budget's error,
    naming it, instead of being passed silently. The charge is the most the record has
    held (its phases follow each other: the walk, a refinement); what it holds only
    between chunks (joins, sorts) is checked against the room chunks leave then."""

    def __init__(self, row_limit: RowLimit, predict_pieces: Optional[Callable[[], int]] = None) -> None:
        self.row_limit = row_limit
        self.charged = 0
        # The whole walk's pieces, predicted (a forward over the batch): only for a
        # refusal's advice, and only once.
        self.predict_pieces = predict_pieces

    @staticmethod
    def _what(pieces: int, segments: int, more_later: int = 0, predicted: int = 0) -> str:
        return (f"the walk's record of the {pieces} path pieces found so far (kept to the end: the pieces' "
                "Gauss nodes are placed on it, and ExactInfo.breakpoints is sorted from it)"
                + (f" and {segments} segments still to integrate" if segments else "")
                + (f", and the {more_later} bytes more it is expected to take as the walk goes on" if more_later
                   else "")
                + (f" (about {predicted} pieces in all, predicted from one forward)" if predicted else ""))

    def charge(self, nbytes: int, pieces: int, segments: int = 0, expected: int = 0, expected_sort: int = 0) -> None:
        """The record now holds ``nbytes``: ``pieces`` pieces found, ``segments`` to go;
        it is ``expected`` to grow to that many bytes, and its sort into breakpoints to
        take ``expected_sort`` (counted in a refusal's advice, and the whole walk's
        predicted pieces where they are more: see _predicted_growth)."""
        if nbytes <= self.charged:
            return
        more_later = max(0, expected - nbytes)
        try:
            self.row_limit.hold(nbytes - self.charged, what=self._what(pieces, segments, more_later),
                                more_later=more_later, briefly_later=expected_sort - nbytes)
        except ArgumentError as refusal:
            grown = self._predicted_growth(pieces, expected, expected_sort)
            if grown is None:
                raise
            refused = refusal
        else:
            self.charged = nbytes
            return
        predicted, expected, expected_sort = grown
        more_later = max(0, expected - nbytes)
        # (The budget stays as short as it was: the same refusal, its advice counting the prediction.)
        self.row_limit.hold(0, what=self._what(pieces, segments, more_later, predicted), more_later=more_later,
                            briefly_later=expected_sort - nbytes)
        raise refused

    def _predicted_growth(self, pieces: int, expected: int, expected_sort: int) -> Optional[Tuple[int, int, int]]:
        """(predicted pieces, expected, expected_sort) raised to the whole walk's predicted
        pieces (PREDICTED_PIECES_MARGIN more), or None where no prediction is more than
        what the advice counted. The record's growth, extrapolated from the current round,
        missed the rounds after it: a 64-example ReLU MLP was refused five times
        (56, 64, 1,792, 10,243 and 11,371 pieces) before its advice sufficed."""
        predict, self.predict_pieces = self.predict_pieces, None
        if predict is None:
            return None
        try:
            predicted = int(math.ceil(PREDICTED_PIECES_MARGIN * predict()))
        except Exception:  # (the advice goes without: the refusal stands as it was)
            return None
        # At most twice the pieces, held at once: a round's segments and the waiting ones
        # each hold a piece not yet found (measured peaks: 1.43x to 2.0x the pieces, ReLU
        # MLPs and CNNs).
        final = _record_bytes(predicted, predicted, 0, 0)
        final_sort = predicted * (PIECE_BYTES + BREAKPOINT_SORT_BYTES)
        if predicted <= pieces or (final <= expected and final_sort <= expected_sort):
            return None
        return predicted, max(expected, final), max(expected_sort, final_sort)

    def between_chunks(self, nbytes: int, pieces: int) -> None:
        """``nbytes`` more, held a moment while no chunk runs."""
        self.row_limit.check_between_chunks(nbytes, what=self._what(pieces, 0))


def _joined(parts: List[torch.Tensor]) -> torch.Tensor:
    """torch.cat(parts), emptying the list so that its tensors are freed as soon as the
    join is made (the record is held once, not twice, across the joins that follow)."""
    joined = torch.cat(parts)
    parts.clear()
    return joined


@dataclass
class _Pieces:
    """The pieces of every example's path, in the order they were found."""

    # (P,) long: the example of each piece, in the order found (by _follow_pieces: the
    # first piece of every example first, in batch order)
    examples: torch.Tensor
    starts: torch.Tensor  # (P,) float64: t where each piece starts
    lengths: torch.Tensor  # (P,) float64
    count: torch.Tensor  # (B,) long: pieces per example
    walk_rows: torch.Tensor  # (B,) long: rows of the walk per example, its engine passes' included
    walk_forwards: int  # of those, forwards with tangents only (no backward), over the batch
    rounds: int  # sequential rounds of the walk

    @staticmethod
    def joined(groups: List["_Pieces"]) -> "_Pieces":
        """The pieces of consecutive groups of examples, walked one after the other."""
        if len(groups) == 1:
            return groups[0]
        offsets = np.cumsum([0] + [g.count.numel() for g in groups[:-1]]).tolist()
        return _Pieces(torch.cat([g.examples + offset for g, offset in zip(groups, offsets)]),
                       torch.cat([g.starts for g in groups]), torch.cat([g.lengths for g in groups]),
                       torch.cat([g.count for g in groups]), torch.cat([g.walk_rows for g in groups]),
                       sum(g.walk_forwards for g in groups), sum(g.rounds for g in groups))


class _OnPieces:
    """Gradients at given nodes of given pieces, summed per example with the pieces'
    lengths times the nodes' weights: engine passes of full gradient groups."""

    def __init__(self, run_round: RunRound, starts, directions, group: "_GradientGroup", batch_size: int,
                 rounds: List[PathIntegral]) -> None:
        self.run_round, self.starts, self.directions = run_round, starts, directions
        self.group, self.batch_size, self.rounds = group, batch_size, rounds

    def integrate(self, examples: torch.Tensor, piece_start: torch.Tensor, piece_length: torch.Tensor,
                  nodes: List[float], weights: List[float]):
        """(sums, the sums of the node at 0.5 alone (the midpoint rule; None without
        one), gradient rows per example), sums float64 and zero for examples without
        pieces."""
        midpoint = len(nodes) > 1 and 0.5 in nodes
        weight_sets = (weights, [1.0 if node == 0.5 else 0.0 for node in nodes]) if midpoint else (weights,)
        totals = [tuple(torch.zeros_like(d, dtype=torch.float64) for d in self.directions) for _ in weight_sets]
        for part, integrals in self.per_piece(examples, piece_start, piece_length, nodes, weight_sets):
            for total, integral in zip(totals, integrals):
                for t, value in zip(total, integral):
                    t.index_add_(0, examples[part], value)
        rows = torch.bincount(examples, minlength=self.batch_size) * len(nodes)
        return totals[0], (totals[1] if midpoint else None), rows

    def per_piece(self, examples: torch.Tensor, piece_start: torch.Tensor, piece_length: torch.Tensor,
                  nodes: List[float], weight_sets, point_rows: int = POINT_ROWS):
        """Per group of pieces: (the group's slice, per weight set the gradient integral
        of each piece (length x weighted gradients), a tuple over inputs of float64
        tensors): one engine pass per node and group, per-piece sums kept a group at a
        time."""
        for part in self.group.parts(examples.numel(), point_rows):
            owners = examples[part]
            integrals = [tuple(torch.zeros_like(d[owners], dtype=torch.float64) for d in self.directions)
                         for _ in weight_sets]
            for index, node in enumerate(nodes):
                t = piece_start[part] + node * piece_length[part]
                gradients = _run_and_keep_record(self.rounds, self.run_round(
                    owners, _points(self.starts, self.directions, owners, t), None))
                for integral, weights in zip(integrals, weight_sets):
                    if weights[index]:
                        scale = weights[index] * piece_length[part]
                        for total, g in zip(integral, gradients):
                            total.add_(g.double() * scale.view((-1,) + (1,) * (g.dim() - 1)))
            yield part, integrals


def _refine_pieces(on_pieces: _OnPieces, examples, piece_start, piece_length, tolerance: float,
                   ledger: _RecordLedger, walked_pieces: int):
    """Adaptive Gauss quadrature on the pieces (ExactSettings.tolerance).

    Every segment (at first the pieces) gets a Gauss pair, GAUSS_NODES_PER_PIECE nodes
    and one fewer: the finer rule's sum is kept, the difference between the two
    estimates the coarser rule's error, so it overstates the finer one's. An example's
    estimate is ||sum of its segments' differences x direction||_2 / ||attributions||_2.
    Where it is above ``tolerance`` the segments with the largest differences are
    bisected, the fewest that leave the others' differences summing to at most half the
    tolerance (on bench_exact's encoder layer 3 of 470 pieces carried 99% of the
    error: a kink the walk missed, or a long bending stretch); their old pair is
    evaluated again to take it out (cheaper than keeping every segment's sums), at most
    MAX_REFINEMENTS rounds. Returns (sums, estimate, gradient rows per example).

    The segments, their norms and the sorts that choose the ones to split are the
    walk's record too, beside the ``walked_pieces`` (kept for the breakpoints): see
    REFINE_SEGMENT_BYTES."""
    batch_size, directions = on_pieces.batch_size, on_pieces.directions
    device = examples.device
    fine_nodes, fine_weights = np.polynomial.legendre.leggauss(GAUSS_NODES_PER_PIECE)
    coarse_nodes, coarse_weights = np.polynomial.legendre.leggauss(GAUSS_NODES_PER_PIECE - 1)
    nodes = (0.5 * (1 + np.concatenate([fine_nodes, coarse_nodes]))).tolist()
    fine = (0.5 * np.concatenate([fine_weights, 0 * coarse_weights])).tolist()
    coarse = (0.5 * np.concatenate([0 * fine_weights, coarse_weights])).tolist()
    sums = tuple(torch.zeros_like(d, dtype=torch.float64) for d in directions)
    differences = tuple(torch.zeros_like(total) for total in sums)
    rows = torch.zeros(batch_size, dtype=torch.long, device=device)

    def add_pairs(segment_examples, starts, lengths, sign: float) -> torch.Tensor:
        """Add (sign +1) or take out (-1) the segments' pairs; their differences' norms."""
        norms = torch.zeros(segment_examples.numel(), dtype=torch.float64, device=device)
        for part, (finer, coarser) in on_pieces.per_piece(segment_examples, starts, lengths, nodes, (fine, coarse),
                                                          REFINE_POINT_ROWS):
            owners = segment_examples[part]
            change = tuple(f - c for f, c in zip(finer, coarser))
            norms[part] = _attribution_norm(change, directions, owners)
            for total, value in zip(sums, finer):
                total.index_add_(0, owners, sign * value)
            for total, value in zip(differences, change):
                total.index_add_(0, owners, sign * value)
        rows.add_(torch.bincount(segment_examples, minlength=batch_size) * len(nodes))
        return norms

    everyone = torch.arange(batch_size, device=device)
    norms = add_pairs(examples, piece_start, piece_length, 1.0)
    for refinement in range(MAX_REFINEMENTS + 1):
        ledger.charge(walked_pieces * PIECE_BYTES + examples.numel() * REFINE_SEGMENT_BYTES, walked_pieces,
                      examples.numel())
        size = _attribution_norm(sums, directions, everyone)
        error = _attribution_norm(differences, directions, everyone)
        estimate = torch.where(size > 0, error / size.clamp_min(torch.finfo(torch.float64).tiny), error)
        undone = estimate > tolerance
        if refinement == MAX_REFINEMENTS or not bool(undone.any()):
            break
        split = _largest_carrying(examples, norms, undone, 0.5 * tolerance * size, batch_size)
        add_pairs(examples[split], piece_start[split], piece_length[split], -1.0)
        kept = ~split
        half = piece_length[split] / 2
        halves = (examples[split].repeat(2), torch.cat([piece_start[split], piece_start[split] + half]), half.repeat(2))
        examples, piece_start, piece_length = (torch.cat([e[kept], h]) for e, h in
                                               zip((examples, piece_start, piece_length), halves))
        norms = torch.cat([norms[kept], add_pairs(*halves, 1.0)])
    return sums, estimate.to(torch.float32), rows


def _attribution_norm(gradient_integrals, directions, owners: torch.Tensor) -> torch.Tensor:
    """Per row, ||integral x its example's direction||_2 over every input, float64."""
    return sum((g * d[owners].double()).flatten(1).square().sum(1)
               for g, d in zip(gradient_integrals, directions)).sqrt()


def _largest_carrying(owners: torch.Tensor, norms: torch.Tensor, undone: torch.Tensor, budget: torch.Tensor,
                      batch_size: int) -> torch.Tensor:
    """Mask of the segments to split: for each undone example, its segments by
    decreasing norm until those left sum to at most its budget."""
    order = torch.argsort(norms, descending=True, stable=True)
    order = order[torch.argsort(owners[order], stable=True)]  # by example, largest first within
    owner, norm = owners[order], norms[order]
    totals = torch.bincount(owners, weights=norms, minlength=batch_size)
    before = torch.cumsum(totals, 0) - totals  # the norms of earlier examples' segments
    left_from_here = totals[owner] - (torch.cumsum(norm, 0) - norm - before[owner])
    split = torch.zeros_like(undone[owners])
    split[order] = undone[owner] & (left_from_here > budget[owner])
    return split


def _cut_long_pieces(examples: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, longest: float):
    """Each piece cut into the fewest equal parts no longer than ``longest``."""
    parts = torch.ceil(lengths / longest).clamp_min(1).long()
    if bool((parts == 1).all()):
        return examples, starts, lengths
    index = torch.repeat_interleave(torch.arange(parts.numel(), device=parts.device), parts)
    first = torch.cumsum(parts, 0) - parts  # where each piece's parts begin
    part = torch.arange(index.numel(), device=parts.device) - first[index]
    length = lengths[index] / parts[index]
    return examples[index], starts[index] + part * length, length


def _piece_limit(settings: ExactSettings, pieces: torch.Tensor, going_on: torch.Tensor) -> None:
    if bool(((pieces >= settings.max_pieces) & going_on).any()):
        raise ArgumentError(
            f"method='{'gausslegendre_pieces' if settings.curved_kinks else 'exact'}': an example's path "
            f"has more than max_steps={settings.max_pieces} pieces; raise `max_steps` or use a fixed n_steps.")


def _split_into_pieces(run_round: RunRound, forward_at: ForwardAt, starts, directions, margin: float, found: dict,
                       row_limit: RowLimit, group: "_GradientGroup", settings: ExactSettings, sums,
                       rounds: list, ledger: _RecordLedger, gap_fill: Optional["_GapFill"] = None) -> _Pieces:
    """The pieces of piecewise-linear paths, each found by one evaluation, in rounds.

    Every segment of a path not known to be one piece (at first, the whole path) is
    evaluated at its middle, with tangents, in full engine passes over all examples'
    segments at once. From that one point BreakpointMode's window (see there) gives the
    piece that holds it and every kink it can place exactly: all the kinks of the first
    op that has any in the segment (its input is affine across it), then, nearer the
    point, those of later ops. The segment is cut at them; the part that holds the point
    is a piece, with the point's gradient (so each piece costs one row: the one that
    found it), and the other parts are segments of the next round. A network's first
    layer has all its kinks placed by the first round, and each round places the next
    layer's inside the parts: there are about as many rounds as layers, not as pieces.

    Where the kinks that cut a segment came first from the network's last
    piecewise-linear op, and that op places all of its own, every part is a piece
    (BreakpointMode.pieces_beyond_the_point): the next round takes its gradient at its
    middle with a plain forward and backward, without tangents or a reading of the
    kinks, and with a smooth head needs no row for it at all. On igfast bench's MLP that
    is the last round's 3,465 rows of 7,564; walked, they also read again, a rounding
    away from a part's end, 46 kinks placed from another point, whose slivers took two
    more rounds.

    The first round takes gradients (the path's whole length is one segment). Without a
    smooth head every row's gradient is its piece's and is summed here (``sums``,
    float64, length times gradient); where a head is found the later rounds are
    forwards with tangents only, and Gauss nodes on the pieces follow.

    With ``gap_fill`` (ExactSettings.stop_within, no smooth head) each round reaches only
    the waiting segments that _GapFill.choose picks; the others wait, and an example
    whose waiting stretches are estimated within tolerance stops.
    """
    batch_size = directions[0].shape[0]
    device = directions[0].device
    # The waiting segments: example, low, high, and whether it is known to be one piece.
    segments = (torch.arange(batch_size, device=device), torch.zeros(batch_size, dtype=torch.float64, device=device),
                torch.ones(batch_size, dtype=torch.float64, device=device),
                torch.zeros(batch_size, dtype=torch.bool, device=device))
    walk_rows = torch.zeros(batch_size, dtype=torch.long, device=device)
    pieces = torch.zeros_like(walk_rows)
    walk_forwards = rounds_walked = found_pieces = 0
    piece_examples, piece_starts, piece_lengths = [], [], []
    deferred = tuple(s[:0] for s in segments)  # waiting beyond the next round

    def add_pieces(owners: torch.Tensor, low: torch.Tensor, lengths: torch.Tensor) -> None:
        piece_examples.append(owners)
        piece_starts.append(low)
        piece_lengths.append(lengths)
        pieces.index_add_(0, owners, torch.ones_like(owners))

    while segments[0].numel():
        rounds_walked += 1
        later: List[Tuple[torch.Tensor, ...]] = []
        waiting_later = 0
        with_gradients = "smooth_op" not in found
        known = segments[3]
        if bool(known.any()):
            owners, low, high = (s[known] for s in segments[:3])
            if with_gradients:  # (a smooth head's Gauss nodes come after the whole walk)
                for part in group.parts(owners.numel()):
                    part_owners, part_low, lengths = owners[part], low[part], high[part] - low[part]
                    points = _points(starts, directions, part_owners, part_low + 0.5 * lengths)
                    gradients = _run_and_keep_record(rounds, run_round(part_owners, points, None))
                    _add(sums, part_owners, gradients, lengths)
                    if gap_fill is not None:
                        gap_fill.keep(part_owners, part_low, gradients)
                walk_rows.index_add_(0, owners, torch.ones_like(owners))
            add_pieces(owners, low, high - low)
            found_pieces += owners.numel()
            segments = tuple(s[~known] for s in segments)
        segment_examples, segment_low, segment_high, _ = segments
        found_before = found_pieces
        for part in group.parts(segment_examples.numel()):
            owners, low, high = segment_examples[part], segment_low[part], segment_high[part]
            middle = 0.5 * (low + high)
            window = (low - middle, high - middle)
            owner_directions = tuple(d[owners] for d in directions)
            points = _points(starts, directions, owners, middle, owner_directions)
            piece_window = tuple(w.clone() for w in window)  # the record shrinks it to each piece
            # After the first round (one segment: the whole path) every kink of a first op
            # that is a line kink is placed: no later segment holds one.
            placed_ops = 1 if rounds_walked > 1 and found.get("first_op_is_line") else 0
            if with_gradients:
                record = _WalkRecord(owners.numel(), device, window=piece_window, placed_ops=placed_ops)
                gradients = _run_and_keep_record(rounds, run_round(owners, points,
                                                                   _walker(owner_directions, record, margin, found)))
            else:
                record = _walk(forward_at, owners, points, owner_directions, margin, found, row_limit,
                               window=piece_window, placed_ops=placed_ops)
                walk_forwards += owners.numel()
            walk_rows.index_add_(0, owners, torch.ones_like(owners))
            cut = _cut_at_kinks(low, high, middle, window, record, margin)
            held = cut.holds_point
            held_segments = cut.segment[held]
            lengths = cut.high[held] - cut.low[held]
            if with_gradients and "smooth_op" not in found:
                # Each segment's middle is in one piece, so the pieces' gradients are
                # usually the rows as they are, in order: no copy.
                in_order = held_segments.numel() == owners.numel() and bool(
                    torch.equal(held_segments, torch.arange(owners.numel(), device=device)))
                piece_gradients = gradients if in_order else tuple(g[held_segments] for g in gradients)
                _add(sums, owners[held_segments], piece_gradients, lengths)
                if gap_fill is not None:
                    gap_fill.keep(owners[held_segments], cut.low[held], piece_gradients)
            elif gap_fill is not None:  # a smooth head: its Gauss nodes come after the whole walk
                gap_fill = None
            kept = gap_fill.nbytes if gap_fill is not None else 0
            add_pieces(owners[held_segments], cut.low[held], lengths)
            rest = ~held
            rest_segments = cut.segment[rest]
            later.append((owners[rest_segments], cut.low[rest], cut.high[rest],
                          record.pieces_beyond_the_point[rest_segments]))
            found_pieces += held_segments.numel()
            waiting_later += rest_segments.numel()
            in_round, done_in_round = segment_examples.numel(), part.stop or segment_examples.numel()
            to_walk = in_round - done_in_round + waiting_later + deferred[0].numel()
            # Where this round is going: each of its segments holds a piece, and the rest of
            # them wait as this round's first parts' did; the next round then holds those
            # pieces, its segments and the parts it cuts from them.
            waiting_at_end = -(-waiting_later * in_round // done_in_round) + deferred[0].numel()
            found_at_end = found_before + in_round
            expected = max(_record_bytes(found_at_end, in_round, waiting_at_end, kept),
                           _record_bytes(found_at_end, waiting_at_end, waiting_at_end, kept))
            # (and the sort of at least those pieces at the end, as checked after the round)
            expected_sort = (found_at_end + waiting_at_end) * (PIECE_BYTES + BREAKPOINT_SORT_BYTES)
            ledger.charge(_record_bytes(found_pieces, in_round, waiting_later + deferred[0].numel(), kept),
                          found_pieces, to_walk, expected, expected_sort)
        # The next round's segments are joined from the waiting ones (twice those), after
        # this round's are let go.
        segments = segment_examples = segment_low = segment_high = None
        kept = gap_fill.nbytes if gap_fill is not None else 0
        waiting_later += deferred[0].numel()
        ledger.charge(_record_bytes(found_pieces, waiting_later, waiting_later, kept), found_pieces, waiting_later)
        segments = tuple(torch.cat(parts) for parts in zip(*later, deferred))
        later.clear()
        deferred = tuple(s[:0] for s in segments)
        # Every waiting segment holds a piece at least: if their sort into breakpoints
        # cannot fit at the end, say so now, not after the walk.
        ledger.between_chunks((found_pieces + waiting_later) * (PIECE_BYTES + BREAKPOINT_SORT_BYTES)
                              - ledger.charged, found_pieces)
        waiting = torch.bincount(segments[0], minlength=batch_size)
        _piece_limit(settings, pieces + waiting, waiting > 0)
        if gap_fill is not None and gap_fill.active and segments[0].numel():
            ledger.between_chunks(gap_fill.temporary_bytes(), found_pieces)
            now, wait = gap_fill.choose(*segments[:3], sums)
            segments, deferred = tuple(s[now] for s in segments), tuple(s[wait] for s in segments)
    return _Pieces(_joined(piece_examples), _joined(piece_starts), _joined(piece_lengths), pieces, walk_rows,
                   walk_forwards, rounds_walked)


# n_steps="auto" may stop the walk of an example before it reaches every piece
# (ExactSettings.stop_within): each stretch of the path still waiting is filled with
# the mean gradient of the nearest reached pieces on its two sides (at a path's end,
# the nearest one), and its error taken as its length times the larger of two
# differences: half that of the two sides (at an end, that of the nearest two), and
# the example's typical jump (root mean square) between consecutive reached pieces
# that differ, since a unit that turns on and off inside a stretch leaves both sides
# alike. GAP_SAFETY times their sum, relative to the attributions, is the example's
# estimate; its largest stretches are reached next until the rest is within tolerance.
# Measured against exact IG (64 examples each of igfast bench's MLP with three seeds, a
# four-layer MLP, a LeakyReLU MLP, two conv + max-pool nets, two with two convs and one
# of hardtanh, abs and ReLU6; float64 and float32; tolerances 1e-2 to 1e-4), the worst
# true error of an example reported converged was 0.84 of its tolerance (a max-pool net
# at 1e-4, whose kinks often change no gradient; 1.16 with the mean jump, 2.4 without
# the jump term, 0.98 at 1e-3 with GAP_SAFETY 1). Bench's MLP walks 87, 107 and 115
# rows of its 118.5 pieces at 1e-2, 1e-3 and 1e-4.
GAP_SAFETY = 1.5
# A walk that stopped early misses completeness by part of its estimate: at most 1.15x
# it in the runs measured above at 1e-2 to 1e-3 (median 0.1x). Beyond this many times
# it the estimate is proven wrong, and auto walks the example to every piece.
GAP_COMPLETENESS_ALLOWANCE = 2.0
# An example stops early only once this many jumps between its reached pieces differ:
# its typical jump read from one or two was far below a jump hidden in the last stretch
# of a three-piece path (15.8x the tolerance, on a network built to break it).
MIN_REACHED_JUMPS = 16
# What _GapFill may keep of the reached pieces' gradients (under a memory budget half
# the walk's room, driver_room, where that is less): igfast bench's MLP keeps 3.9 MB for 64
# examples (118.5 pieces of 64 features each); its CNN's 11,000 pieces of 3072 would
# need 129 MB per example, and its walk cannot stop early at the tolerances it is used
# at anyway (a rule of 62 nodes reaches 1e-2).
GAP_KEPT_BYTES = 64 * 2**20
# _GapFill.choose reads the kept gradients in slices of this many bytes (float64), or
# of an eighth of the walk's room under a memory budget.
GAP_SLICE_BYTES = 16 * 2**20
# Consecutive pieces whose gradients differ by less than this many ulps of the larger are
# alike (a max-pool's losing unit turning changes no gradient): not a jump.
ALIKE_ULPS = 64


class _GapFill:
    """The gradients of the pieces reached so far (ExactSettings.stop_within), kept to
    fill the stretches of each path not reached; chooses which of those to reach next."""

    def __init__(self, directions: Tuple[torch.Tensor, ...], tolerance: float, room: Optional[int]) -> None:
        self.directions, self.tolerance = directions, tolerance
        # Under a memory budget the slices come out of the walk's room (driver_room).
        self.slice_bytes = GAP_SLICE_BYTES if room is None else min(GAP_SLICE_BYTES, room // 8)
        # The kept gradients may hold at most this much; beyond it the walk reaches every
        # piece (those stopped before keep their fills and estimates).
        self.most_kept = GAP_KEPT_BYTES if room is None else min(GAP_KEPT_BYTES, room // 2)
        self.active = True
        self.flat_directions = torch.cat([d.flatten(1) for d in directions], 1)
        self.owners: List[torch.Tensor] = []
        self.lows: List[torch.Tensor] = []
        self.gradients: List[torch.Tensor] = []
        self.nbytes = 0
        self.estimate = torch.zeros(directions[0].shape[0], dtype=torch.float64, device=directions[0].device)

    def keep(self, owners: torch.Tensor, lows: torch.Tensor, gradients: Tuple[torch.Tensor, ...]) -> None:
        """Pieces reached: their examples, starts and gradients (one per input)."""
        if not self.active:
            return
        flat = gradients[0].flatten(1) if len(gradients) == 1 else torch.cat([g.flatten(1) for g in gradients], 1)
        if self.nbytes + flat.numel() * flat.element_size() > self.most_kept:
            self.active, self.nbytes = False, 0
            self.owners, self.lows, self.gradients = [], [], []
            return
        self.owners.append(owners)
        self.lows.append(lows)
        self.gradients.append(flat)
        self.nbytes += flat.numel() * flat.element_size() + owners.numel() * PIECE_BYTES

    def temporary_bytes(self) -> int:
        """What choose holds beside the kept pieces, in float64 rows of the inputs: the
        fills and the reached sums of every example (and their product), and a slice of
        the pieces' gradients at a time (_slices)."""
        width = self.flat_directions.shape[1]
        return 3 * self.flat_directions.shape[0] * width * 8 + 2 * max(self.slice_bytes, 8 * width)

    def choose(self, examples: torch.Tensor, low: torch.Tensor, high: torch.Tensor, sums):
        """Of the waiting segments, (those to reach next round, those that wait for a
        later one), each as a mask over them. An example whose waiting stretches are
        estimated within tolerance has them filled into ``sums`` and waits no more."""
        owners, lows, gradients = (torch.cat(parts) for parts in (self.owners, self.lows, self.gradients))
        self.owners, self.lows, self.gradients = [owners], [lows], [gradients]
        # Sorted by example, then along the path (a NaN input's NaN positions must not
        # unsort the others: its own sums are NaN, so it never stops early).
        key = owners.double() * 2 + _position(lows)
        order = torch.argsort(key)
        owners, key, gradients = owners[order], key[order], gradients[order]
        batch_size, directions = self.flat_directions.shape[0], self.flat_directions
        count = key.numel()
        # The jump from each reached piece to the next (0 past an example's last), and
        # the root mean square of those that differ per example; a slice of pieces at a time.
        # (In the gradients' dtype: an estimate needs no float64, and a float32 model's walk
        # would spend a sixth of its time converting.)
        step, size = torch.zeros(count, dtype=torch.float64, device=key.device), torch.zeros_like(key)
        scales = directions.to(gradients.dtype)  # (a copy only where the two dtypes differ)
        for part in _slices(count, directions.shape[1], self.slice_bytes):
            rows, scale = gradients[part], scales[owners[part]]
            size[part] = (rows * scale).norm(dim=1).double()
            following = gradients[part.start + 1:part.stop + 1]
            if following.shape[0] < rows.shape[0]:  # (the last piece: its step is set to 0 below)
                following = torch.cat([following, rows[-1:]])
            step[part] = ((following - rows) * scale).norm(dim=1).double()
        step[-1] = 0.0
        same = torch.zeros(count, dtype=torch.bool, device=key.device)
        same[:-1] = owners[1:] == owners[:-1]
        step = torch.where(same, step, 0.0)
        ulp = torch.finfo(gradients.dtype).eps * ALIKE_ULPS
        following_size = torch.cat([size[1:], size[:1]])
        jumps = same & (step > ulp * torch.maximum(size, following_size))
        jump_squares = torch.zeros(batch_size, dtype=torch.float64, device=key.device).index_add_(
            0, owners[jumps], step[jumps].square())
        jump_count = torch.bincount(owners[jumps], minlength=batch_size)
        typical_jump = torch.where(jump_count >= MIN_REACHED_JUMPS, (jump_squares / jump_count.clamp_min(1)).sqrt(),
                                   math.inf)
        # Each segment's reached neighbours: the pieces before and after it, and the next
        # ones out (a segment holds no reached piece, so its start sorts it among them).
        after = torch.searchsorted(key, examples.double() * 2 + _position(low))

        def neighbour(index: torch.Tensor):
            inside = (index >= 0) & (index < count)
            index = index.clamp(0, max(count - 1, 0))
            return index, inside & (owners[index] == examples)

        (right, has_right), (left, has_left) = neighbour(after), neighbour(after - 1)
        (far_right, has_far_right), (far_left, has_far_left) = neighbour(after + 1), neighbour(after - 2)
        both = has_left & has_right
        left_end = has_left & ~has_right & has_far_left
        right_end = has_right & ~has_left & has_far_right
        spread = torch.where(both, 0.5 * step[left], torch.where(left_end, step[far_left], step[right]))
        length = high - low
        error = length * torch.maximum(spread, typical_jump[examples])
        error = torch.where(both | left_end | right_end, error, math.inf)
        # The fills, as weights on the reached pieces: half a stretch's length to each side,
        # or all of it to the nearest at a path's end.
        weight = torch.zeros_like(key)
        weight.index_add_(0, left[both], 0.5 * length[both])
        weight.index_add_(0, right[both], 0.5 * length[both])
        weight.index_add_(0, left[left_end], length[left_end])
        weight.index_add_(0, right[right_end], length[right_end])
        fills = torch.zeros_like(scales)
        for part in _slices(count, directions.shape[1], self.slice_bytes):
            fills.index_add_(0, owners[part], gradients[part] * weight[part].to(fills.dtype).view(-1, 1))
        fills = fills.double()
        reached = torch.cat([s.flatten(1) for s in sums], 1)
        norm = ((reached + fills) * directions.double()).norm(dim=1)
        del reached
        total = torch.zeros_like(norm).index_add_(0, examples, error) * GAP_SAFETY
        waiting = torch.bincount(examples, minlength=batch_size) > 0
        stop = waiting & (total <= self.tolerance * norm)
        offset = 0
        for summed, direction in zip(sums, self.directions):
            width = direction[0].numel()
            summed[stop] += fills[stop, offset:offset + width].reshape((-1,) + direction.shape[1:])
            offset += width
        self.estimate[stop] = torch.where(norm[stop] > 0, total[stop] / norm[stop].clamp_min(1e-300), 0.0)
        # The rest: the largest errors first, as many as leave the others within tolerance
        # (every stretch of an example with one not estimated yet).
        unknown = ~torch.isfinite(error)  # (NaN: a NaN input)
        unestimated = torch.zeros_like(waiting)
        unestimated[examples[unknown]] = True
        finite = torch.where(unknown, 0.0, error)
        order = torch.argsort(finite, descending=True, stable=True)
        order = order[torch.argsort(examples[order], stable=True)]
        ranked_examples, ranked = examples[order], finite[order]
        before = torch.cumsum(ranked, 0) - ranked
        _, counts = torch.unique_consecutive(ranked_examples, return_counts=True)
        before = before - torch.repeat_interleave(before[torch.cumsum(counts, 0) - counts], counts)
        left_over = (total[ranked_examples] - GAP_SAFETY * before) > self.tolerance * norm[ranked_examples]
        reach = torch.empty_like(left_over)
        reach[order] = left_over | unestimated[ranked_examples]
        going = ~stop[examples]
        now, later = going & reach, going & ~reach
        if not bool(now.any()):  # (each example going on reaches its largest: never all wait)
            now, later = going, torch.zeros_like(going)
        return now, later


def _slices(count: int, width: int, nbytes: int) -> List[slice]:
    """Slices of ``count`` rows of ``width`` float64s, ``nbytes`` each at most (one row
    at least)."""
    rows = max(1, nbytes // (8 * max(1, width)))
    return [slice(begin, min(begin + rows, count)) for begin in range(0, count, rows)]


def _position(t: torch.Tensor) -> torch.Tensor:
    """t in [0, 1], NaN at 0, for sorting."""
    return torch.nan_to_num(t, nan=0.0).clamp(0.0, 1.0)


@dataclass
class _Cut:
    """Segments cut at the kinks one evaluation found: the parts, in order per segment."""

    segment: torch.Tensor  # (Q,) long: the segment (index into the evaluated ones) of each part
    low: torch.Tensor  # (Q,) float64
    high: torch.Tensor  # (Q,) float64
    holds_point: torch.Tensor  # (Q,) bool: the part that holds the segment's evaluated point


def _cut_at_kinks(low: torch.Tensor, high: torch.Tensor, middle: torch.Tensor, window, record: "_WalkRecord",
                  margin: float) -> _Cut:
    """Cut each segment [low, high] (evaluated at ``middle``, with ``window`` its steps
    to the ends) at the kinks in ``record``; the piece around the middle is a part.
    (BreakpointMode keeps kinks further than ``margin`` from the segment's ends.)"""
    piece_low, piece_high = record.window
    # Where the piece reaches the segment's end the end itself, not middle + step, so
    # rounding cannot leave a sliver of a part.
    piece_start = torch.where(piece_low <= window[0], low, middle + piece_low)
    piece_end = torch.where(piece_high >= window[1], high, middle + piece_high)
    kink_rows = torch.cat(record.kink_rows) if record.kink_rows else torch.empty(0, dtype=torch.long, device=low.device)
    kink_steps = torch.cat(record.kink_steps) if record.kink_steps else low[:0]
    # Kinks within the margin of each other are one (units that cross together, as
    # duplicated units do, are placed a rounding apart): no sliver of a piece between.
    part_segment, part_low, part_high, holds = ops.cut_at_kinks(low, high, middle, piece_start, piece_end,
                                                                kink_rows, kink_steps, margin)
    return _Cut(part_segment, part_low, part_high, holds)


def _walk_curved_paths(run_round: RunRound, forward_at: ForwardAt, starts, directions, margin: float, found: dict,
                       row_limit: RowLimit, settings: ExactSettings, rounds: List[PathIntegral],
                       ledger: _RecordLedger) -> _Pieces:
    """method="gausslegendre_pieces"' walk: the paths' starts in one engine pass, then
    _follow_curved_pieces, on groups of examples where memory asks for it. (The first
    pass's record, a state per example, is gone once this returns: the Gauss passes that
    follow have the memory.)"""
    batch_size = directions[0].shape[0]
    device = directions[0].device
    # The first piece's start: walked and its gradient taken in one engine pass, which
    # also sizes the engine's chunks (its gradient is not used: Gauss nodes follow).
    everyone = torch.arange(batch_size, device=device)
    first = _WalkRecord(batch_size, device)
    horizon = torch.ones(batch_size, dtype=torch.float64, device=device)  # (to count the kinks ahead)
    _run_and_keep_record(rounds, run_round(everyone, starts, _walker(directions, first, margin, found, True,
                                                                     horizon)))
    sub_paths = _sub_paths(first, directions, row_limit)
    together = _examples_walked_together(first, directions, row_limit, sub_paths)
    groups: List[_Pieces] = []
    for begin in range(0, batch_size, together):
        part = slice(begin, min(begin + together, batch_size))
        groups.append(_follow_curved_pieces(_shifted(forward_at, begin), tuple(s[part] for s in starts),
                                            tuple(d[part] for d in directions), first.part(part), margin, found,
                                            row_limit, settings, sub_paths,
                                            ledger, sum(g.examples.numel() for g in groups)))
    if len(groups) > 1:  # (the groups' pieces and their join)
        walked = sum(g.examples.numel() for g in groups)
        ledger.between_chunks(walked * PIECE_BYTES, walked)
    return _Pieces.joined(groups)


def _sub_paths(first: "_WalkRecord", directions: Tuple[torch.Tensor, ...], row_limit: RowLimit) -> int:
    """The most sub-paths (rows walked side by side) _follow_curved_pieces splits a path
    into: about one per SUB_PATH_PIECES pieces of the longest (the first pass's count,
    as if units stayed straight), at most MAX_SUB_PATHS, as many as keep a round's rows
    within one chunk of walk forwards, and as many as keep the rows' units (two states
    a row) and points within SUB_PATH_BYTES: a large model's units take megabytes a row."""
    if first.crossings is None or first.state is None or not first.count:
        return 1
    wanted = -(-int(first.crossings.max()) // SUB_PATH_PIECES)
    within_chunk = row_limit.forward_rows // first.count
    within_memory = _curved_rows_within_memory(first, directions, row_limit) // first.count
    return max(1, min(wanted, MAX_SUB_PATHS, within_chunk, within_memory))


def _curved_rows_within_memory(first: "_WalkRecord", directions: Tuple[torch.Tensor, ...],
                               row_limit: RowLimit) -> int:
    """The rows of a curved walk that fit in SUB_PATH_BYTES and in the memory budget (see
    CURVED_ROW_STATES), at least one. The walk runs forwards only, between the engine's
    passes: it may take all the room chunks have, and what was set aside beside them."""
    point_bytes = sum(d[:1].numel() * d.element_size() for d in directions)
    aside = driver_room(row_limit)
    held = SUB_PATH_BYTES if aside is None else min(row_limit.available + aside, SUB_PATH_BYTES)
    held -= first.count * first.state.row_bytes  # (the paths' starts, held while the groups walk)
    return max(1, held // max(1, CURVED_ROW_STATES * first.state.row_bytes + 2 * point_bytes))


def _examples_walked_together(first: "_WalkRecord", directions: Tuple[torch.Tensor, ...], row_limit: RowLimit,
                              sub_paths: int) -> int:
    """How many examples one curved walk takes at once: all, unless their rows do not fit
    in memory (a large batch of a wide model under a small budget); then the walk runs
    group after group, each with its own rounds."""
    if first.state is None or not first.count:
        return max(1, first.count)
    return max(1, min(first.count, _curved_rows_within_memory(first, directions, row_limit) // sub_paths))


def _follow_curved_pieces(forward_at: ForwardAt, starts, directions, first: "_WalkRecord", margin: float,
                          found: dict, row_limit: RowLimit, settings: ExactSettings, sub_paths: int,
                          ledger: _RecordLedger, pieces_before: int) -> _Pieces:
    """The pieces of a path whose pre-activations are curved (smooth ops before kinks).

    A unit's step to its kink is now a Newton estimate, so each kink is bracketed:
    ``low`` is a point still on the current piece (every unit on the side it was at the
    piece's start), ``high`` one where some unit is on another. Each round evaluates,
    per walking row (at first one per example), one trial point (all at once), at most
    ``reach`` past low:

    - no bracket yet: the Newton step from ``low`` (the earliest kink any unit would
      reach if it stayed straight), or the row's end;
    - a bracket: that Newton point where inside (it undershoots where units curve
      towards their kinks), else the changed units' Newton point back from ``high``
      (the earliest crossing they estimate), else its middle; after BISECT_AFTER rounds
      on one bracket every other round bisects.

    A trial where a unit changed piece becomes ``high``. One where none did becomes
    ``low`` (and reach doubles), unless a unit bent so much between the two points that
    it may have crossed its kink and come back (BreakpointMode.bent): then the trial is
    rejected and reach cut to a quarter of the step (after a kink, reach is at least
    four times the piece's length). A kink is located at ``high`` once the bracket is
    narrower than the kink tolerance, or the changed units' estimate puts them all
    within it of ``high`` and no other unit bent on the way; the next piece starts
    there. On a piecewise-linear path nothing bends and the first Newton point is the
    kink itself: a piece costs one forward, as in _follow_pieces (plus one that checks
    the end: a curved path may still cross a kink after the last Newton estimate).

    The rounds wait on each other, a few per piece, so a row with more than
    SUB_PATH_PIECES kinks predicted ahead (its stretch left over its Newton step) hands
    the second half of that stretch to a new row, up to ``sub_paths`` rows per example:
    the new row's start is evaluated in the same forward as the trials, and it walks
    side by side with the others from the next round. Rows split again where kinks are
    dense (near a layer norm's zero, most of a transformer's are), so the rounds follow
    the longest row's pieces, not the path's. A split costs two rows (the new row's
    start, and the check of the old row's new end); the pieces that meet there are
    joined again.
    """
    batch_size = first.count
    device = first.next_step.device
    tolerance = kink_position_tolerance(settings, margin)
    everyone = torch.arange(batch_size, device=device)
    if first.state is None:  # no piecewise-linear op: one smooth piece
        zeros = torch.zeros(batch_size, dtype=torch.float64, device=device)
        ones = torch.ones(batch_size, dtype=torch.long, device=device)
        return _Pieces(everyone, zeros, zeros + 1, ones, ones, 0, 1)
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=device)
    # Rows example * sub_paths + k, k < born[example], walk the stretch [start, path_end].
    rows_count = batch_size * sub_paths
    owner = everyone.repeat_interleave(sub_paths)
    born = torch.ones(batch_size, dtype=torch.long, device=device)
    first_rows = everyone * sub_paths
    at_low = first.state.empty(rows_count)  # the units at low (their pieces: those of the piece's start)
    at_low.put(first_rows, first.state, slice(None))
    at_high = first.state.empty(rows_count)
    start = torch.zeros(rows_count, dtype=torch.float64, device=device)
    low = start.clone()
    path_end = torch.ones_like(start)
    high = torch.full_like(start, math.inf)
    newton_from_low = torch.full_like(start, math.inf)
    newton_from_low[first_rows] = first.next_step
    back_from_high, newton_from_high = torch.zeros_like(start), torch.zeros_like(start)
    bent_at_high = torch.zeros(rows_count, dtype=torch.bool, device=device)
    reach = torch.ones_like(start)
    tries = torch.zeros(rows_count, dtype=torch.long, device=device)
    first_piece = torch.zeros(rows_count, dtype=torch.bool, device=device)  # its next piece joins the one before
    # The row that starts where each row ends (-1: the path's end), and the units' pieces
    # at each row's start: a cut is a kink where the rows on its two sides saw them differ
    # (two forwards of different rows can round a unit within a margin to either side).
    successor = torch.full((rows_count,), -1, dtype=torch.long, device=device)
    start_choices = [torch.empty((rows_count,) + c.shape[1:], dtype=c.dtype, device=device)
                     for c in first.state.choices]
    walk_rows = torch.ones(batch_size, dtype=torch.long, device=device)
    pieces = torch.zeros(batch_size, dtype=torch.long, device=device)
    walk_forwards, rounds_walked = 0, 1  # (the first engine pass: the paths' starts)
    piece_rows, piece_starts, piece_lengths, piece_joins, piece_kink_ends = [], [], [], [], []
    found_pieces = 0
    active = first_rows
    while active.numel():
        rounds_walked += 1
        splitting, cut, new_rows = _splits(active, owner, born, sub_paths, low, high, path_end, newton_from_low,
                                           tolerance)
        born.index_add_(0, owner[splitting], torch.ones_like(splitting))
        path_end[new_rows] = path_end[splitting]
        path_end[splitting] = cut
        lo, hi, final = low[active], high[active], path_end[active]
        bracketed = torch.isfinite(hi)
        ahead = lo + newton_from_low[active]
        behind = hi - back_from_high[active]
        candidate = torch.where((ahead > lo) & (ahead < hi), ahead,
                                torch.where((behind > lo) & (behind < hi), behind, inf))
        # Newton, but every other round a bisection once Newton has had BISECT_AFTER tries.
        newton = torch.isfinite(candidate) & ((tries[active] < BISECT_AFTER) | (tries[active] % 2 == 0))
        trial = torch.where(bracketed, torch.where(newton, candidate, 0.5 * (lo + hi)), ahead)
        trial = torch.minimum(trial, lo + reach[active])
        trial = torch.where(~bracketed & (trial >= final - margin), final, trial)
        step = trial - lo
        # One forward: the trials, then the new rows' starts (compared with the rows they split).
        evaluated = torch.cat([active, splitting])
        examples = owner[evaluated]
        example_directions = tuple(d[examples] for d in directions)
        record = _walk(forward_at, examples, _points(starts, directions, examples, torch.cat([trial, cut]),
                                                     example_directions),
                       example_directions, margin, found, row_limit, curved_kinks=True,
                       reference=at_low.rows(evaluated), reference_step=torch.cat([step, cut - low[splitting]]))
        walk_rows.index_add_(0, examples, torch.ones_like(examples))
        walk_forwards += examples.numel()
        trials = slice(0, active.numel())
        starting = torch.arange(active.numel(), evaluated.numel(), device=device)
        at_low.put(new_rows, record.state, starting)
        for kept, seen in zip(start_choices, record.state.choices):
            kept[new_rows] = seen[starting]
        successor[new_rows] = successor[splitting]
        successor[splitting] = new_rows
        start[new_rows] = low[new_rows] = cut
        high[new_rows] = math.inf
        newton_from_low[new_rows] = record.next_step[starting]
        reach[new_rows] = path_end[new_rows] - cut
        tries[new_rows] = 0
        first_piece[new_rows] = True
        changed, bent = record.changed[trials], record.bent[trials]
        next_step, back_step = record.next_step[trials], record.back_step[trials]
        # A unit bent enough to have crossed and come back: too long a step to tell.
        rejected = ~changed & bent & (step > tolerance)
        accepted = ~changed & ~rejected
        # A unit changed piece: the first kink lies in (low, trial].
        to_high = active[changed]
        high[to_high] = trial[changed]
        back_from_high[to_high] = back_step[changed]
        bent_at_high[to_high] = bent[changed]
        newton_from_high[to_high] = next_step[changed]
        at_high.put(to_high, record.state, changed.nonzero().squeeze(1))
        # Still on the piece: low moves up.
        to_low = active[accepted]
        low[to_low] = trial[accepted]
        newton_from_low[to_low] = next_step[accepted]
        at_low.put(to_low, record.state, accepted.nonzero().squeeze(1))
        reach[to_low] = 2 * reach[to_low]
        reach[active[rejected]] = step[rejected] / 4
        tries[active] += bracketed.long()
        # Pieces that end: at the row's end, or at a located kink (the row's last where
        # that is within the margin of its end: no sliver of a piece after it).
        hi, lo = high[active], low[active]
        located = torch.isfinite(hi) & ((hi - lo <= tolerance)
                                        | ((back_from_high[active] <= tolerance) & ~bent_at_high[active]))
        at_end = (accepted & (trial >= final)) | (located & (hi >= final - margin))
        ending = at_end | located
        done = active[ending]
        end = torch.where(at_end, final, hi)[ending]
        joins = first_piece[done]
        piece_rows.append(done)
        piece_starts.append(start[done])
        piece_lengths.append(end - start[done])
        piece_joins.append(joins)
        piece_kink_ends.append(located[ending] | _differs_at_cut(done, successor, at_low, start_choices))
        first_piece[done] = False
        pieces.index_add_(0, owner[done], torch.ones_like(done))
        _piece_limit(settings, pieces[owner[done]] - born[owner[done]] + 1, ~at_end[ending])
        found_pieces += done.numel()
        ledger.charge(pieces_before * PIECE_BYTES + found_pieces * CURVED_PIECE_BYTES, pieces_before + found_pieces)
        moving_on = active[located & ~at_end]
        # A step reaches at least a few pieces' length ahead.
        reach[moving_on] = torch.maximum(reach[moving_on], 4 * (high[moving_on] - start[moving_on]))
        start[moving_on] = low[moving_on] = high[moving_on]
        newton_from_low[moving_on] = newton_from_high[moving_on]
        high[moving_on] = math.inf
        tries[moving_on] = 0
        at_low.put(moving_on, at_high, moving_on)
        active = torch.cat([active[~at_end], new_rows])
    ledger.between_chunks(found_pieces * CURVED_JOIN_BYTES, pieces_before + found_pieces)
    rows, piece_start, piece_length = _joined(piece_rows), _joined(piece_starts), _joined(piece_lengths)
    examples, piece_start, piece_length = _join_at_cuts(owner[rows], piece_start, piece_length,
                                                        _joined(piece_joins), _joined(piece_kink_ends))
    count = torch.bincount(examples, minlength=batch_size)
    return _Pieces(examples, piece_start, piece_length, count, walk_rows, walk_forwards, rounds_walked)


def _splits(active: torch.Tensor, owner: torch.Tensor, born: torch.Tensor, sub_paths: int, low, high, path_end,
            newton_from_low, tolerance: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The active rows that split this round, where, and their new rows (see
    _follow_curved_pieces): those with more than SUB_PATH_PIECES kinks predicted ahead,
    at the middle of what is left past their bracket (or low), while their example has
    rows to spare (first come)."""
    anchor = torch.where(torch.isfinite(high[active]), high[active], low[active])
    left = path_end[active] - anchor
    busy = (left > SUB_PATH_PIECES * newton_from_low[active]) & (left > 4 * tolerance)
    rows = active[busy]
    # The how-many-th busy row of its example this round: only those within the example's spare rows split.
    order = torch.argsort(owner[rows], stable=True)
    rows, anchor = rows[order], anchor[busy][order]
    examples = owner[rows]
    first_of = torch.searchsorted(examples, examples)
    rank = torch.arange(rows.numel(), device=rows.device) - first_of
    index = born[examples] + rank
    fits = index < sub_paths
    rows = rows[fits]
    return rows, 0.5 * (anchor[fits] + path_end[rows]), owner[rows] * sub_paths + index[fits]


def curved_walk_rounds(pieces: int, sub_paths: int = MAX_SUB_PATHS) -> float:
    """The predicted rounds of _follow_curved_pieces on paths of at most ``pieces``
    pieces, with at most ``sub_paths`` rows per path: a few per piece of its longest
    row. Rows split until they hold about SUB_PATH_PIECES (or pieces / sub_paths), and
    the longest held up to twice that (kinks bunch, and rows split as they go; measured
    on bench_exact's mixed workloads, float32: 70 pieces in 38 rounds, 364 in 56)."""
    if pieces <= 2 * SUB_PATH_PIECES or sub_paths <= 1:
        return CURVED_WALK_ROWS_PER_PIECE * pieces
    return CURVED_WALK_ROWS_PER_PIECE * min(pieces, 2 * max(SUB_PATH_PIECES, pieces / sub_paths))


def _differs_at_cut(rows: torch.Tensor, successor: torch.Tensor, at_low: PathState, start_choices) -> torch.Tensor:
    """Per row that ends: whether a unit's piece at its end (at_low, where it ended
    by a trial at its end) differs from what the row after the cut saw there."""
    after = successor[rows]
    cut = after >= 0
    differs = torch.zeros_like(cut)
    if bool(cut.any()):
        ending, starting = rows[cut], after[cut]
        for mine, theirs in zip(at_low.choices, start_choices):
            differs[cut] |= (mine[ending] != theirs[starting]).flatten(1).any(1)
    return differs


def _join_at_cuts(examples: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, at_cut: torch.Tensor,
                  kink_end: torch.Tensor):
    """Pieces (of one example each) in path order per example, each piece that starts
    ``at_cut`` (the first of a row split off another) merged into the one before, unless
    that one's end is a located kink (``kink_end``): a kink can fall on a cut."""
    order = torch.argsort(starts, stable=True)
    order = order[torch.argsort(examples[order], stable=True)]
    examples, starts, lengths, at_cut, kink_end = (t[order] for t in (examples, starts, lengths, at_cut, kink_end))
    joins = at_cut.clone()
    joins[1:] &= ~kink_end[:-1]
    joins[0] = False
    # Each piece's index among the kept ones: a joining piece adds its length to the one before.
    kept = torch.cumsum((~joins).long(), 0) - 1
    merged = torch.zeros(int(kept[-1]) + 1, dtype=lengths.dtype, device=lengths.device)
    merged.index_add_(0, kept, lengths)
    return examples[~joins], starts[~joins], merged


# The pieces of a sub-batch's paths: for the examples given (a long index tensor into
# the batch), the run_round, forward_at and row limit of integrate_exactly on the
# sub-batch of those examples alone.
ExactParts = Tuple[RunRound, ForwardAt, RowLimit]


@dataclass(frozen=True)
class PieceEstimate:
    """What one forward with tangents at the start of each path tells of its pieces."""

    pieces: torch.Tensor  # (E,) int64: 1 + the kinks the units would cross if they stayed affine
    smooth_head: Optional[str]  # the first smooth op after the last kink, or None
    # Smooth ops before kinks (a mixed network): the pieces are those of
    # method="gausslegendre_pieces", integrated by ExactRoute adaptively (see
    # _refine_pieces), and the count of kinks a linear extrapolation.
    curved: bool = False
    # (E,) int64: of the kinks, those of the last op, where its parts take plain rows
    # (BreakpointMode.pieces_beyond_the_point): about as many pieces are not walked.
    plain_pieces: Optional[torch.Tensor] = None

    @property
    def evaluations(self) -> torch.Tensor:
        """The predicted evaluations of integrating these pieces (see ExactInfo.evaluations):
        method="exact"'s, or with curved pieces the curved walk's and a Gauss pair per
        piece (_refine_pieces; its bisections are few and not predicted)."""
        if self.curved:
            return self.pieces * (CURVED_WALK_ROWS_PER_PIECE + 2 * GAUSS_NODES_PER_PIECE - 1)
        if self.smooth_head:  # Gauss nodes on every piece, and the walk's rows
            return self.pieces * GAUSS_NODES_PER_PIECE + self.walk_rows
        return self.pieces  # a row each, walked or plain

    @property
    def walk_rows(self) -> torch.Tensor:
        """Of those, the rows that run with tangents through BreakpointMode (the rest are
        plain gradient rows: Gauss nodes, and the last op's parts)."""
        if self.curved:
            return self.pieces * CURVED_WALK_ROWS_PER_PIECE
        if self.plain_pieces is None:
            return self.pieces
        return self.pieces - torch.minimum(self.plain_pieces, self.pieces - 1)


class SmoothNetworkError(NotPiecewiseLinearError):
    """The probe walked the whole network and met no piecewise-linear op. ``analytic``:
    it met no op of piecewise.NON_ANALYTIC_SMOOTH_OPS either, so the integrand is analytic
    along the path; ``slope_jumps``: it met one whose slope jumps (SELU, ...), so the
    integrand jumps."""

    def __init__(self, message: str, analytic: bool = True, slope_jumps: bool = False) -> None:
        super().__init__(message)
        self.analytic, self.slope_jumps = analytic, slope_jumps


def smooth_network_error(found: dict) -> SmoothNetworkError:
    """The error for a walk that met no piecewise-linear op (``found``: what it met)."""
    non_analytic, jump = found.get("non_analytic_op"), found.get("slope_jump_op")
    return SmoothNetworkError(
        "the network applies no piecewise-linear op to the path: it is smooth along it "
        f"(first smooth op: {found.get('smooth_op')}), or affine"
        + (f"; {jump}'s slope jumps at 0" if jump else
           f"; {non_analytic} is not analytic at 0" if non_analytic else "")
        + ". Exact IG needs pieces: use n_steps='auto' (error-controlled) or a fixed n_steps.",
        analytic=non_analytic is None, slope_jumps=jump is not None)


# Exact IG meets completeness to rounding: on igfast bench's MLP and CNN (up to 11,000
# pieces) within 5e-7 relative in float32 and 3e-15 in float64. A kink the walk cannot
# see leaves a gap of that kink's size: a ReLU inside a custom autograd.Function with a
# jvp (its forward runs without tangents, so the walk reads no kink there) made one
# piece per example, 0.027 from completeness on attributions of at most 0.23.
# The gap allowed, in units of the path dtype's epsilon: 2.4e-4 in float32, 4.4e-13 in float64.
HIDDEN_KINK_EPSILONS = 2000


# Under torch.autocast a float32 path's matmuls run in autocast's lower dtype: exact
# pieces missed completeness by 1 epsilon of bfloat16 (7.8e-3) and 2.6 of float16 on a
# small MLP. The allowance is then this many of that dtype's epsilons: 0.125 in bfloat16,
# 1.6e-2 in float16 (2000 of them, as for the path's own dtype, let any hidden kink pass).
AUTOCAST_EPSILONS = 16


def _rounding_allowance(dtype: torch.dtype, device: torch.device) -> float:
    """How far from completeness exact pieces may land on rounding alone: HIDDEN_KINK_EPSILONS
    of the path dtype, or AUTOCAST_EPSILONS of autocast's lower dtype where the model
    computes in it."""
    allowance = HIDDEN_KINK_EPSILONS * torch.finfo(dtype).eps
    is_enabled, autocast_dtype = (getattr(torch, name, None) for name in ("is_autocast_enabled", "get_autocast_dtype"))
    if dtype == torch.float64 or is_enabled is None or autocast_dtype is None:
        return allowance
    try:
        if is_enabled(device.type):
            return max(allowance, AUTOCAST_EPSILONS * torch.finfo(autocast_dtype(device.type)).eps)
    except (RuntimeError, TypeError):  # (a device type autocast does not know)
        pass
    return allowance


def check_completeness(integral: "ExactIntegral", ends: Tuple[torch.Tensor, ...], starts: Tuple[torch.Tensor, ...],
                       start_values: torch.Tensor, end_values: torch.Tensor) -> None:
    """Raise NotPiecewiseLinearError where exact pieces (one gradient each) miss
    completeness by more than rounding (see hidden_kinks)."""
    # (one value per example: a model giving (N, 1) without a target gives them as a column)
    start_values, end_values = (v.reshape(ends[0].shape[0]) for v in (start_values, end_values))
    # (Here, not in integrate_exactly: n_steps="auto" switching examples to the walk warns once, itself.)
    non_finite_ends = warn_of_non_finite_ends(ends, starts, f"method={_method_of(integral)!r}")
    unbounded = ~(torch.isfinite(start_values) & torch.isfinite(end_values))
    told = unbounded & ~non_finite_ends.to(unbounded.device)  # (an infinite end was named above)
    if bool(told.any()):
        # F is infinite (or NaN) at an end of the path: the integral of the gradient
        # diverges there, whatever the pieces' sums came to (gausslegendre_pieces
        # returned finite numbers without a word).
        warn_to_caller(
            f"igfast: method={_method_of(integral)!r}: F(inputs) or F(baselines) is not finite for "
            f"{int(told.sum())} of {told.numel()} examples: their path integral diverges and their "
            "attributions are not Integrated Gradients.", UserWarning)
    scale = completeness_scale(start_values, end_values)
    why = hidden_kinks(integral, ends, starts, end_values - start_values, scale)
    if why is not None:
        raise NotPiecewiseLinearError(f"method='exact': {why} Use n_steps='auto' (error-controlled) or a fixed n_steps.")
    _warn_of_gauss_sums_off_completeness(integral, ends, starts, end_values - start_values, scale, ~unbounded)


def _path_ends_and_differences(ends: Tuple[torch.Tensor, ...], starts: Tuple[torch.Tensor, ...]):
    """(starts with a row per example, ends - starts): the completeness checks' inputs."""
    batch = ends[0].shape[0]
    starts = tuple(s.expand_as(e) if s.shape[0] != batch else s for s, e in zip(starts, ends))
    return starts, tuple(e - s for e, s in zip(ends, starts))


def _method_of(integral: "ExactIntegral") -> str:
    return "gausslegendre_pieces" if integral.info.curved_kinks else "exact"


# Gauss sums on the pieces (gausslegendre_pieces, a smooth head) may miss completeness by
# their rule's error; by more than this many times their own estimate (or rounding) the
# estimate was wrong: a tanh MLP at inputs of 1e4 summed to 0 where F changed by 0.31,
# with an estimate within tolerance 1e-3.
GAUSS_COMPLETENESS_FACTOR = 4.0


def kink_position_tolerance(settings: ExactSettings, margin: float) -> float:
    """How closely in t method="gausslegendre_pieces" locates a kink (see
    KINK_POSITION_TOLERANCE), down to the dtype's kink margin."""
    tolerance = KINK_POSITION_TOLERANCE
    if settings.tolerance is not None:
        tolerance = min(tolerance, KINK_SHARE * settings.tolerance)
    return max(margin, tolerance)


def _warn_of_gauss_sums_off_completeness(integral: "ExactIntegral", ends, starts, value_change: torch.Tensor,
                                         scale: torch.Tensor, finite: torch.Tensor) -> None:
    info = integral.info
    estimate = info.head_error_estimate
    if (info.nodes_per_piece == 1 and not info.curved_kinks) or not ends[0].shape[0] or estimate is None:
        return  # (no Gauss sums, or no estimate of theirs to hold them to)
    _, differences = _path_ends_and_differences(ends, starts)
    gap = relative_completeness(integral.gradient_sums, differences, value_change, scale)
    rounding = _rounding_allowance(differences[0].dtype, differences[0].device)
    allowed = torch.clamp(GAUSS_COMPLETENESS_FACTOR * estimate.to(gap), min=rounding)
    if info.kink_position_tolerance is not None:
        # The estimate is the Gauss sums'; each kink located to within this much in t adds
        # about as much relative error of its own (0.3 z * z before ReLUs: 2.6e-11 off
        # completeness, 23 kinks located to 1e-10, where the linear pieces' sums are exact).
        allowed = torch.maximum(allowed, info.pieces.to(gap) * info.kink_position_tolerance)
    missed = (gap > allowed) & finite.to(gap.device)
    if info.curved_kinks and info.refined_to is None:
        _warn_of_coarse_gauss_pieces(gap, finite.to(gap.device) & ~missed, rounding)
    if not bool(missed.any()):
        return
    warn_to_caller(
        f"igfast: method={_method_of(integral)!r}: the attributions of {int(missed.sum())} of {gap.numel()} "
        f"examples miss completeness (sum of attributions = F(inputs) - F(baselines)) by up to "
        f"{float(gap[missed].max()):.2e} relative, more than {GAUSS_COMPLETENESS_FACTOR:g} times their error "
        "estimate: the Gauss sums on the pieces missed part of the integrand (a stretch that saturates or "
        "turns sharply). Use n_steps='auto', or a fixed n_steps with a check of the convergence delta.",
        ToleranceNotReachedWarning)


# gausslegendre_pieces without a tolerance (3 fixed Gauss nodes per piece, n_steps of
# them spread over the smooth stretches) is held to no error, and its estimate (the
# midpoint rule's) overstates the Gauss rule's by orders of magnitude, so missing
# completeness by less than 4 times it says little. A miss above this is an error of at
# least its size: a LayerNorm of a ReLU layer without bias, from a zero baseline (its
# input grows from 0, and the norm turns within 1e-3 of the start), missed by 2e-2 to
# 4.9e-2 (attributions 1.7e-3 to 2e-2 off) with no word; bench_exact's mixed workloads
# (tanh-then-ReLU MLP, ReLU-FFN encoder) stay below it at n_steps 1 to 200, float32 too.
COARSE_GAUSS_PIECES_GAP = 1e-3


def _warn_of_coarse_gauss_pieces(gap: torch.Tensor, unwarned: torch.Tensor, rounding: float) -> None:
    # (In bfloat16 or under autocast, rounding alone misses by more: no nodes would help.)
    missed = (gap > max(COARSE_GAUSS_PIECES_GAP, rounding)) & unwarned
    if not bool(missed.any()):
        return
    warn_to_caller(
        f"igfast: method='gausslegendre_pieces': the attributions of {int(missed.sum())} of {gap.numel()} "
        f"examples miss completeness (sum of attributions = F(inputs) - F(baselines)) by up to "
        f"{float(gap[missed].max()):.2e} relative, so they are off by at least that much: the fixed Gauss nodes on "
        "the pieces missed part of the integrand (a stretch that turns sharply, as a normalisation of an input "
        "that starts near zero). Give `tolerance` to refine them to a relative error, or use n_steps='auto'.",
        ToleranceNotReachedWarning)


def hidden_kinks(integral: "ExactIntegral", ends: Tuple[torch.Tensor, ...], starts: Tuple[torch.Tensor, ...],
                 value_change: torch.Tensor, scale: torch.Tensor) -> Optional[str]:
    """Why the exact pieces cannot be right, where they miss completeness by more than
    rounding: the network bent the path where the walk could not see it. None where
    they meet it, or where Gauss nodes on the pieces (whose rule has an error) make the
    check moot.

    F(x) and F(x') are sums of terms about as large as the gradient times each end, and
    their rounding is of that size: a target near 0 that cancels terms of 1, or a path
    much shorter than its ends (x' = x + 1e-6 noise), would otherwise fail the check on
    rounding alone (deep float64 MLPs: 3e-11 of a 1e-2 floor).

    An example whose walk stopped short (ExactSettings.stop_within, its
    gap_error_estimate above 0) misses completeness by the error of its filled
    stretches: it says nothing about hidden kinks and is not checked (n_steps="auto"
    walks it again where that error is above its estimate)."""
    info = integral.info
    if info.nodes_per_piece != 1 or info.curved_kinks or not ends[0].shape[0]:
        return None
    starts, differences = _path_ends_and_differences(ends, starts)
    squared = 0.0
    for gradient, end, start in zip(integral.gradient_sums, ends, starts):
        for point in (end, start):
            squared = squared + (gradient.double() * point.double()).flatten(1).square().sum(1)
    terms = torch.as_tensor(squared).sqrt()
    gap = relative_completeness(integral.gradient_sums, differences, value_change, torch.maximum(scale, terms))
    rounding = _rounding_allowance(differences[0].dtype, differences[0].device)
    missed = gap > rounding
    if info.gap_error_estimate is not None:
        missed &= info.gap_error_estimate.to(gap.device) == 0
    if not bool(missed.any()):
        return None
    return (f"the attributions of {int(missed.sum())} of {gap.numel()} examples miss completeness (sum of "
            f"attributions = F(inputs) - F(baselines)) by up to {float(gap.max()):.2e} relative, where exact "
            f"pieces meet it to {rounding:.1e}: the network bends the path where the walk cannot see it, as a "
            "piecewise-linear op inside a custom torch.autograd.Function (its forward runs without tangents) "
            "or one run without autograd, or jumps (a step such as torch.where(x > 0, 1.0, 0.0), or a MaxUnpool "
            "whose indices switch with its max-pool's winners: across a jump the integral of the gradient is not the change of F), or its kinks see the path's rows "
            "elsewhere than in their first dimension (sequence-first layers, as batch_first=False: the walk "
            "reads the first dimension as the rows).")


# A smooth head's error estimate (the midpoint rule's distance from the Gauss sums on
# the same pieces) above which method="exact" without a tolerance warns. It overstates
# the Gauss rule's error by orders of magnitude: the softmax head of bench_exact's MLP
# gives 1.2e-5 (the Gauss sums are within ~1e-9); a ReLU layer under two tanh layers,
# whose "head" is most of the network, 0.19 for a true error of 1.6e-3.
HEAD_ESTIMATE_WARNING = 1e-2


def _warn_of_a_coarse_head(estimate: Optional[torch.Tensor], smooth_head: Optional[str],
                           settings: "ExactSettings") -> None:
    if estimate is None or settings.curved_kinks or not estimate.numel():
        return
    worst = float(estimate.max())
    if worst > HEAD_ESTIMATE_WARNING:
        warn_to_caller(
            f"igfast: method='exact' integrated the smooth part after the last piecewise-linear op "
            f"(from {smooth_head}) with {GAUSS_NODES_PER_PIECE} Gauss nodes per piece, and the midpoint "
            f"rule on the same pieces differs from them by up to {worst:.1e} (relative): the Gauss sums are "
            "closer than that, by an unknown factor. Give `tolerance` to refine them to a relative error.",
            UserWarning)


class ExactRoute:
    """method="exact" for some examples of a batch: how n_steps="auto" switches an
    example to exact IG when walking its pieces costs less than refining its rule.

    ``make_parts(examples)`` gives integrate_exactly's callables for the sub-batch of
    those examples (indices into the batch of ``ends``). A mixed network (smooth ops
    before kinks, which method="exact" refuses) is walked as method="gausslegendre_pieces"
    does, and its Gauss sums are refined to the tolerance ``integrate`` is given.
    """

    def __init__(self, ends: Tuple[torch.Tensor, ...], starts: Tuple[torch.Tensor, ...],
                 make_parts: Callable[[torch.Tensor], ExactParts],
                 settings: ExactSettings = ExactSettings(DEFAULT_MAX_PIECES)) -> None:
        self.ends, self.starts, self.make_parts, self.settings = ends, starts, make_parts, settings
        self.curved = False  # the first probe found smooth ops before kinks
        self.kink_ops = 0  # the piecewise-linear ops a probe met
        self.plain_past_the_last_op = False  # (BreakpointMode.plain_past_the_last_op)
        self.sub_paths = MAX_SUB_PATHS  # the rows a curved walk may split a path into (from a probe)
        self.rows_checked = False  # a walk's check_rows_kept passed: the later ones need not check
        # The examples of the check's rows where a walk was refused (the caller counts them)
        self.refused_check_rows: Optional[torch.Tensor] = None
        # Bytes the caller holds while a walk runs (auto's sums of every level), which
        # the walk's memory budget must leave room for.
        self.held_beside = 0

    def walk_rounds(self, pieces: int) -> float:
        """The walk's sequential rounds for paths of at most ``pieces`` pieces: for a
        curved walk see curved_walk_rounds; for method="exact" at most one per piecewise-linear op
        and one that finds the last parts whole (each round places all the kinks of the
        first op that has any in a segment: _split_into_pieces), one more for kinks that
        float32 rounding places again a margin off (measured: 4 to 5 on igfast bench's
        MLP and CNN); where the last op's parts take plain rows
        (BreakpointMode.pieces_beyond_the_point) that round is the last (3 on the MLP)."""
        if self.curved:
            return curved_walk_rounds(pieces, self.sub_paths)
        return self.kink_ops + (1 if self.plain_past_the_last_op else 2)

    def _rows(self, examples: torch.Tensor):
        batch_size = self.ends[0].shape[0]
        ends = tuple(e[examples] for e in self.ends)
        starts = tuple(s[examples] if s.shape[0] == batch_size else s.expand_as(e)
                       for s, e in zip(self.starts, ends))
        return ends, starts

    def estimate_pieces(self, examples: torch.Tensor) -> PieceEstimate:
        """One forward with tangents at t = 0 per example (two for the first of a mixed
        network). Raises NotPiecewiseLinearError where the network cannot be walked or has
        no piecewise-linear op (a smooth network: its "pieces" would be one, integrated
        by 3 Gauss nodes without control)."""
        try:
            record, found = self._probe(examples)
        except CurvedBeforeKinkError:
            if self.curved:
                raise
            self.curved = True
            record, found = self._probe(examples)
        self.kink_ops = max(self.kink_ops, found.get("piecewise_linear_ops", 0))
        if not found.get("piecewise_linear_ops"):
            raise smooth_network_error(found)
        self.plain_past_the_last_op = bool(found.get("plain_past_the_last_op")) and not self.curved
        if self.curved:
            _, _, row_limit = self.make_parts(examples)
            directions = tuple(e - s for e, s in zip(*self._rows(examples)))
            self.sub_paths = min(self.sub_paths, _sub_paths(record, directions, row_limit))
        plain = record.last_op_crossings if self.plain_past_the_last_op else torch.zeros_like(record.crossings)
        return PieceEstimate(1 + record.crossings, found.get("smooth_op"), self.curved, plain)

    def _probe(self, examples: torch.Tensor):
        ends, starts = self._rows(examples)
        _, forward_at, row_limit = self.make_parts(examples)
        directions = tuple(e - s for e, s in zip(ends, starts))
        margin = max(kink_margin(d.dtype) for d in directions)
        found: dict = {}
        record = _walk_from_the_start(forward_at, starts, directions, margin, found, row_limit, self.curved)
        return record, found

    def integrate(self, examples: torch.Tensor, tolerance: Optional[float] = None,
                  stop_within: Optional[float] = None) -> ExactIntegral:
        """method="exact" on those examples; on a mixed network gausslegendre_pieces'
        pieces. Gauss nodes on pieces (a smooth head's, a mixed network's) are refined
        to ``tolerance``: a smooth head's 3 fixed nodes would leave an example switched
        from auto with the midpoint rule's estimate, far above tolerance (and above its
        true error), reported unconverged. ``stop_within``: see ExactSettings."""
        ends, starts = self._rows(examples)
        settings = dataclasses.replace(self.settings, tolerance=tolerance, stop_within=stop_within)
        if self.curved:
            settings = dataclasses.replace(settings, curved_kinks=True)
        run_round, forward_at, row_limit = self.make_parts(examples)
        row_limit.hold(self.held_beside)
        try:
            integral = integrate_exactly(ends, starts, settings, run_round, forward_at, row_limit, self.rows_checked)
        except NotPiecewiseLinearError as error:
            if not self.rows_checked:  # (the layout check ran, and maybe refused: its rows count)
                pair = rows_check_pair(tuple(e - s for e, s in zip(ends, starts)), row_limit)
                forwards = getattr(error, "rows_check_forwards", ROWS_CHECK_FORWARDS)
                self.refused_check_rows = examples[pair.repeat(forwards)]
            raise
        self.rows_checked = True  # (its first walk checked the layout: check_rows_kept)
        return integral


class _GradientGroup:
    """How many pieces' gradient points one engine pass takes (see POINTS_PER_ROW_LIMIT),
    sized again before each pass: the engine measures its row limit as it runs, and a
    limit sized once, before the first pass measured anything, kept the passes of the
    encoder's Gauss pairs at 32 points (auto at 1e-4: 0.58 s against 0.41 s)."""

    def __init__(self, row_limit: RowLimit, directions: Tuple[torch.Tensor, ...]) -> None:
        self.row_limit = row_limit
        self.row_bytes = max(1, sum(d[:1].numel() * d.element_size() for d in directions))
        self.room = driver_room(row_limit)

    def size(self, point_rows: int = POINT_ROWS) -> int:
        # Before anything is measured, the first-chunk estimate: the engine chunks the
        # pass to its own limit, and measures it.
        rows = max(1, self.row_limit.forward_rows)
        most = rows * POINTS_PER_ROW_LIMIT
        if self.room is not None:  # a budget: the points fit in what it set aside
            return max(1, min(most, min(self.room, EXTRA_POINT_BYTES) // (point_rows * self.row_bytes)))
        # internal_batch_size: a chunk's points, and EXTRA_POINT_BYTES more.
        within = (rows * 2 * self.row_bytes + EXTRA_POINT_BYTES) // (2 * self.row_bytes)
        return max(rows, min(most, within))

    def parts(self, count: int, point_rows: int = POINT_ROWS):
        """Slices of range(count), one per pass, each sized when it is reached."""
        begin = 0
        while begin < count:
            part = slice(begin, min(begin + self.size(point_rows), count))
            yield part
            begin = part.stop


def driver_room(row_limit: RowLimit) -> Optional[int]:
    """The bytes the walk may hold beside the engine's chunks under a memory budget
    (see DRIVER_SHARE), set aside once per row limit; None without a budget."""
    return row_limit.set_aside(DRIVER_SHARE, max(EXTRA_POINT_BYTES, SUB_PATH_BYTES))


def _relative_difference(estimate, sums, directions) -> torch.Tensor:
    """Per example, ||(estimate - sums) * direction|| / ||sums * direction|| over every
    input: the relative L2 distance of two attributions."""
    everyone = torch.arange(directions[0].shape[0], device=directions[0].device)
    difference = _attribution_norm(tuple(e - t for e, t in zip(estimate, sums)), directions, everyone)
    size = _attribution_norm(sums, directions, everyone)
    return (difference / size.clamp_min(torch.finfo(torch.float64).tiny)).to(torch.float32)


def _breakpoints(examples: torch.Tensor, piece_starts: torch.Tensor, batch_size: int) -> List[torch.Tensor]:
    counts = torch.bincount(examples, minlength=batch_size).tolist()
    order = torch.argsort(piece_starts, stable=True)  # pieces are found in no particular order
    by_example = torch.argsort(examples[order], stable=True)
    order = order[by_example]
    del by_example  # (see BREAKPOINT_SORT_BYTES)
    # Each its own tensor, not a view of one: pickle writes a view's whole storage, so an
    # explainer pickled after a call (for a spawned process) grew with the batch squared
    # (114 MB at batch 512, against 0.2 MiB held).
    return [part.clone() for part in torch.split(piece_starts[order].cpu(), counts)]


class _WalkRecord:
    """What walk forwards read at each example's point, filled chunk by chunk (see
    BreakpointMode): the step to the next kink, with a horizon the kinks within it, and
    with curved kinks the state of the units and the comparison with a reference's."""

    def __init__(self, count: int, device, reference: Optional[PathState] = None,
                 reference_step: Optional[torch.Tensor] = None,
                 window: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, placed_ops: int = 0) -> None:
        self.next_step = torch.full((count,), float("inf"), dtype=torch.float64, device=device)
        self.crossings = torch.zeros(count, dtype=torch.long, device=device)
        self.last_op_crossings = torch.zeros_like(self.crossings)
        self.changed = torch.zeros(count, dtype=torch.bool, device=device)
        self.bent = torch.zeros(count, dtype=torch.bool, device=device)
        self.back_step = torch.zeros(count, dtype=torch.float64, device=device)
        self.state: Optional[PathState] = None  # per op, (count, units)
        self.reference, self.reference_step = reference, reference_step
        # With a window (see BreakpointMode): the piece around each row's point, and the
        # kinks found (rows and steps, in the order the chunks ran).
        self.window, self.placed_ops = window, placed_ops
        self.kink_rows: List[torch.Tensor] = []
        self.kink_steps: List[torch.Tensor] = []
        # Per row, whether the parts its kinks cut are pieces (BreakpointMode.pieces_beyond_the_point).
        self.pieces_beyond_the_point = torch.zeros(count if window is not None else 0, dtype=torch.bool,
                                                   device=device)
        self.count = count

    def part(self, rows: slice) -> "_WalkRecord":
        """These rows' steps, counts and states (what a curved walk starts from)."""
        if rows == slice(0, self.count):
            return self
        part = _WalkRecord(rows.stop - rows.start, self.next_step.device)
        part.next_step, part.crossings = self.next_step[rows], self.crossings[rows]
        part.state = None if self.state is None else self.state.rows(rows)
        return part

    def mode_arguments(self, rows: slice) -> dict:
        """BreakpointMode's arguments for these rows: the reference's, the window's."""
        arguments = {}
        if self.reference is not None:
            arguments.update(reference=self.reference.rows(rows), reference_step=self.reference_step[rows])
        if self.window is not None:
            arguments.update(window=tuple(w[rows] for w in self.window), placed_ops=self.placed_ops)
        return arguments

    def take(self, rows: slice, mode: BreakpointMode, found: dict) -> None:
        if mode.next_step is not None:
            self.next_step[rows] = mode.next_step
        if mode.kink_ops:
            found["piecewise_linear_ops"] = max(found.get("piecewise_linear_ops", 0), mode.kink_ops)
            found.setdefault("first_op_is_line", mode.first_op_is_line)
            found["plain_past_the_last_op"] = found.get("plain_past_the_last_op", True) and mode.plain_past_the_last_op
        if mode.crossings is not None:
            self.crossings[rows] = mode.crossings
            self.last_op_crossings[rows] = mode.last_op_crossings
        if mode.changed is not None:
            self.changed[rows] = mode.changed
            self.back_step[rows] = mode.back_step
            self.bent[rows] = mode.bent
        if mode.smooth_op is not None:
            found.setdefault("smooth_op", mode.smooth_op)
        if mode.non_analytic_op is not None:
            found.setdefault("non_analytic_op", mode.non_analytic_op)
        if mode.slope_jump_op is not None:
            found.setdefault("slope_jump_op", mode.slope_jump_op)
        if mode.window is not None:
            for mine, piece in zip(self.window, mode.window):
                mine[rows] = piece
            self.kink_rows += [found_rows + rows.start for found_rows in mode.kink_rows]
            self.kink_steps += mode.kink_steps
            pieces = mode.pieces_beyond_the_point()
            if pieces is not None:
                self.pieces_beyond_the_point[rows] = pieces
        if mode.state.choices:
            if self.state is None:
                self.state = mode.state.empty(self.count)
            if [c.shape[1:] for c in self.state.choices] != [c.shape[1:] for c in mode.state.choices]:
                raise NotPiecewiseLinearError(
                    "method='gausslegendre_pieces': the network runs other piecewise-linear ops for "
                    "different examples; its pieces cannot be followed.")
            self.state.put(rows, mode.state, slice(None))


def _walk(forward_at: ForwardAt, examples: torch.Tensor, points: Tuple[torch.Tensor, ...],
          directions: Tuple[torch.Tensor, ...], margin: float, found: dict, row_limit: RowLimit,
          horizon: Optional[torch.Tensor] = None, curved_kinks: bool = False,
          reference: Optional[PathState] = None, reference_step: Optional[torch.Tensor] = None,
          window: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, placed_ops: int = 0) -> _WalkRecord:
    """Forwards with tangents along the path at each example's point, no backward, in
    chunks of the engine's row limit (a walk row holds less than an engine row: no
    autograd graph), halved after out-of-memory errors: each example's distance to its
    next kink and what else BreakpointMode reads (with ``horizon``, per example, the
    kinks within it; with ``curved_kinks``, the state of its units, and with
    ``reference`` (the state at a point ``reference_step`` back), the comparison)."""
    count = examples.numel()
    record = _WalkRecord(count, examples.device, reference, reference_step, window, placed_ops)
    chunk = max(1, row_limit.forward_rows)
    begin = 0
    while begin < count:
        rows = slice(begin, min(begin + chunk, count))
        mode = BreakpointMode(rows.stop - rows.start, margin, None if horizon is None else horizon[rows],
                              curved_kinks=curved_kinks, **record.mode_arguments(rows))
        try:
            with torch.no_grad(), _along_the_path():
                duals = tuple(fwAD.make_dual(p[rows], d[rows]) for p, d in zip(points, directions))
                with mode:
                    forward_at(examples[rows], duals)
        except torch.OutOfMemoryError:
            if chunk == 1:
                raise
            chunk //= 2
            continue
        record.take(rows, mode, found)
        begin = rows.stop
    return record


def rows_check_pair(directions: Tuple[torch.Tensor, ...], row_limit: RowLimit) -> torch.Tensor:
    """The examples of the two rows of each of check_rows_kept's forwards (int64): twice
    the one with the longest path, so that its cost falls on one example whatever the
    batch. Empty where no path moves (nothing to walk), or where the walk's forwards
    take one row at a time (internal_batch_size=1: its rows cannot mix, and a model
    that takes one row only, as x.view(1, ...), would fail on two)."""
    lengths = sum(d.detach().flatten(1).abs().sum(1).double() for d in directions)
    if row_limit.forward_rows < 2 or not bool((lengths > 0).any()):
        return torch.zeros(0, dtype=torch.long, device=lengths.device)
    return lengths.argmax().repeat(2)


# check_rows_kept's tangent is drawn, not the path's direction: where the direction
# moves only part of an input (one token; a tuple input held fixed), a mixing layer
# could leave it inside the first row's part and pass (1.3e-3 off without a word). A
# generator of its own leaves the caller's random state alone.
ROWS_CHECK_SEED = 20171
# Its forwards (of two rows each): the tangent on the first row, then on the second. With
# one, a sequence-first layer whose second half of tokens was masked to zero left the
# first row's tangent in its part and passed (1.1e-2 off): each row's part must stay
# free of the other's tangent.
ROWS_CHECK_FORWARDS = 2


def check_rows_kept(forward_at: ForwardAt, starts: Tuple[torch.Tensor, ...], directions: Tuple[torch.Tensor, ...],
                    margin: float, pair: torch.Tensor, curved_kinks: bool) -> None:
    """ROWS_CHECK_FORWARDS forwards of two rows halfway along the path of ``pair``
    (rows_check_pair), one row with a tangent (random, dense: see ROWS_CHECK_SEED),
    BreakpointMode's rows_probe: raises NotPiecewiseLinearError where a piecewise-linear
    op, or the model's output, carries that tangent in the other row's part of dim 0. A
    check of the first dimension's size alone misses a sequence-first layer whose
    sequence length is a multiple of the walk's rows, and the walk then reads one row's
    kinks for another's; an output that mixes the examples after the last kink
    (logits centred over the batch, z @ z.T) makes each row's integrand another's.
    ``curved_kinks``: as the walk (method="exact" names a smooth op before a kink first)."""
    if not pair.numel():
        return
    halfway = torch.full((2,), 0.5, dtype=torch.float64, device=pair.device)
    points = _points(starts, directions, pair, halfway)
    generator = torch.Generator(device=pair.device).manual_seed(ROWS_CHECK_SEED)
    for carrier in range(ROWS_CHECK_FORWARDS):
        drawn = tuple(torch.randn(d[:1].shape, generator=generator, device=d.device).to(d.dtype) for d in directions)
        tangents = tuple(torch.cat((t, torch.zeros_like(t)) if carrier == 0 else (torch.zeros_like(t), t))
                         for t in drawn)
        mode = BreakpointMode(2, margin, curved_kinks=curved_kinks, rows_probe=carrier)
        try:
            with torch.no_grad(), _along_the_path():
                duals = tuple(fwAD.make_dual(p, t) for p, t in zip(points, tangents))
                with mode:
                    output = forward_at(pair, duals)
                tangent = fwAD.unpack_dual(output).tangent if isinstance(output, torch.Tensor) else None
                if tangent is not None and rows_mixed(tangent, 2, carrier):
                    raise NotPiecewiseLinearError(
                        f"method={'gausslegendre_pieces' if curved_kinks else 'exact'!r}: the model's output, of "
                        f"shape {tuple(output.shape)}, {ROWS_MIXED}")
        except NotPiecewiseLinearError as error:
            error.rows_check_forwards = carrier + 1  # (the forwards that ran, for the caller's count)
            raise


def rows_check_rows(pair: torch.Tensor) -> torch.Tensor:
    """The examples of every row check_rows_kept runs where it passes (for the count of
    evaluations; a refusal names the forwards that ran: rows_check_forwards)."""
    return pair.repeat(ROWS_CHECK_FORWARDS)


def _points(starts, directions, active: torch.Tensor, t: torch.Tensor,
            active_directions: Optional[Tuple[torch.Tensor, ...]] = None) -> Tuple[torch.Tensor, ...]:
    """x' + t (x - x') for the active examples, each at its own t; ``active_directions``:
    the directions of the active examples where the caller has gathered them already."""
    if active_directions is None:
        active_directions = tuple(d[active] for d in directions)
    return tuple(
        torch.addcmul(s[active], t.to(d.dtype).view((-1,) + (1,) * (d.dim() - 1)), d)
        for s, d in zip(starts, active_directions)
    )


def walk_row_bytes(mode: BreakpointMode) -> int:
    """The bytes a row of a walk forward held beside the model's forward (see
    WALK_FLOAT64S_PER_UNIT)."""
    return WALK_FLOAT64S_PER_UNIT * 8 * mode.widest_row_units + 2 * mode.state.row_bytes


def _shifted(forward_at: ForwardAt, begin: int) -> ForwardAt:
    """forward_at for a group of examples starting at ``begin`` of the batch."""
    if begin == 0:
        return forward_at
    return lambda examples, points: forward_at(examples + begin, points)


def _run_and_keep_record(rounds: List[PathIntegral], integral: PathIntegral) -> Tuple[torch.Tensor, ...]:
    """The pass's gradient sums, its record (chunks, calls) kept in ``rounds`` without
    them: a walk of thousands of pieces runs hundreds of passes, and keeping each
    one's gradients held every piece's at once (36 MB against a 2 MB budget)."""
    rounds.append(integral.spent())
    return integral.gradient_sums


def _add(sums, active: torch.Tensor, gradient_sums, factor: torch.Tensor) -> None:
    for total, gradient in zip(sums, gradient_sums):
        scale = factor.to(total.dtype).view((-1,) + (1,) * (total.dim() - 1))
        weighted = gradient.to(total.dtype)
        # Scaled in place where the conversion made a copy (the caller's gradients stay).
        weighted = weighted.mul_(scale) if weighted is not gradient else weighted * scale
        total.index_add_(0, active, weighted)


@contextlib.contextmanager
def _along_the_path():
    """Forward-mode AD along the path, with two things made plain: compiled code
    (torch.compile'd submodules or functions, nn.Module.compile()) runs eagerly, since
    a compiled graph carries neither tangents nor BreakpointMode (it failed inside
    PyTorch, or blamed a custom Function); and a part of the model without forward-mode
    AD (a custom autograd.Function without jvp) raises NotPiecewiseLinearError, not
    NotImplementedError."""
    _quiet_first_dual()
    try:
        with _forward_ad_level(), _compiled_code_eagerly():
            yield
    except torch.utils.checkpoint.CheckpointError as error:
        # Its backward runs the checkpointed part again, without the walk's tangents: the
        # part then saves other tensors than the forward did, and the checkpoint refuses.
        raise NotPiecewiseLinearError(
            "method='exact' and 'gausslegendre_pieces' (and n_steps='auto', to follow the path's pieces) "
            "cannot run a model that uses torch.utils.checkpoint(use_reentrant=False): its backward "
            "recomputes the checkpointed part without the forward-mode tangents the walk runs it with "
            f"({type(error).__name__}). Use a fixed n_steps or n_steps='auto' (it goes on with its rule), "
            "or run the model without checkpointing for attribution.") from error
    except NotImplementedError as error:
        if not _lacks_forward_mode(error):
            raise  # the model's own (n_steps="auto" took it for a missing jvp, and went on)
        # PyTorch names its own ops "aten::..." (an op without a forward-derivative formula,
        # such as silu's backward inside a gradient row); anything else is a custom Function.
        if _raised_inside_checkpoint(error):
            raise NotPiecewiseLinearError(
                "method='exact' and 'gausslegendre_pieces' (and n_steps='auto', to find the path's pieces) "
                "cannot run a model that uses torch.utils.checkpoint(use_reentrant=True): its autograd Function "
                "has no forward-mode formula, and autograd cannot take the input gradient Integrated Gradients "
                "needs through it with any n_steps either (Captum fails too). Run the model without "
                "checkpointing for attribution (Hugging Face: model.gradient_checkpointing_disable()).") from error
        pytorch_op = "aten::" in str(error) or "Trying to use forward AD with" in str(error)
        remedy = ("PyTorch has no forward-mode formula for that op, so use" if pytorch_op else
                  "Give custom torch.autograd.Functions a jvp (with setup_context), or use")
        raise NotPiecewiseLinearError(
            "method='exact' and 'gausslegendre_pieces' (and n_steps='auto', to find the path's pieces) run "
            "the model with forward-mode AD along the path, which a part of it "
            f"does not support ({error}). {remedy} a fixed n_steps or n_steps='auto'.") from error


def _raised_inside_checkpoint(error: BaseException) -> bool:
    """Whether ``error`` came from reentrant torch.utils.checkpoint's own autograd Function
    (it has no jvp; the error does not name it): the innermost frames are checkpoint.py's
    call of a Function's apply, with no frame of the model's between them (a Function of
    the model's inside a non-reentrant checkpoint has the model's frames there)."""
    files = []
    trace = error.__traceback__
    while trace is not None:
        files.append(trace.tb_frame.f_code.co_filename.replace("\\", "/"))
        trace = trace.tb_next
    inside = [i for i, name in enumerate(files) if name.endswith("torch/utils/checkpoint.py")]
    return bool(inside) and all(name.endswith("torch/autograd/function.py") for name in files[inside[-1] + 1:])


# The first dual tensor of a process loads PyTorch's forward-mode decompositions, which
# script functions with torch.jit.script and so warn (DeprecationWarning, 18 times in
# torch 2.13) from PyTorch's own code. Under -W error or pytest's filterwarnings = error
# the first warning aborted that import, and every call with tangents raised it.
_TORCH_JIT_DEPRECATION = r"`torch\.jit\.script` is deprecated"
_first_dual_made = False


def _quiet_first_dual() -> None:
    """Make one dual tensor with PyTorch's own torch.jit.script deprecation warnings
    ignored (once per process): the model's warnings still reach the user as set."""
    global _first_dual_made
    if _first_dual_made:
        return
    with _FORWARD_AD_TURN:  # (warnings' filters are process-wide: one thread at a time sets them)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_TORCH_JIT_DEPRECATION, category=DeprecationWarning)
            with _forward_ad_level():
                fwAD.make_dual(torch.zeros(()), torch.zeros(()))
        _first_dual_made = True


# PyTorch has one forward-AD level per process, and refuses a second ("Nested forward
# mode AD is not supported"): walks in several threads at once raised it (68 of 80 calls
# of two threads), so igfast's walks take turns. A level opened by other code (a caller's
# fwAD.dual_level() around attribute(), or torch.func.jvp in another thread) cannot be
# shared safely: whoever opened it may close it mid-walk (a segfault, when the walk
# joined another thread's level), so the walk refuses it with a clear error, and
# n_steps="auto" goes on with its rule.
_FORWARD_AD_TURN = threading.RLock()


@contextlib.contextmanager
def _forward_ad_level():
    """A forward-AD level of the walk's own (see above)."""
    with _FORWARD_AD_TURN:
        try:
            fwAD.enter_dual_level()
        except RuntimeError as error:
            if "Nested forward mode AD" not in str(error):
                raise
            raise NotPiecewiseLinearError(
                "method='exact' and 'gausslegendre_pieces' (and n_steps='auto', to find the path's pieces) run "
                "the model with forward-mode AD, but a forward-AD level is already open in this process (a "
                "torch.autograd.forward_ad.dual_level() around attribute(), or torch.func.jvp in another "
                "thread), and PyTorch allows one. Call attribute() outside it, or use a fixed n_steps "
                "(n_steps='auto' goes on with its rule).") from error
        try:
            yield
        finally:
            fwAD.exit_dual_level()


def _lacks_forward_mode(error: NotImplementedError) -> bool:
    """Whether PyTorch raised ``error`` for a part without forward-mode AD: an op without
    a forward-derivative formula ("Trying to use forward AD with aten::... that does not
    support it") or a custom autograd.Function without jvp ("You must implement the jvp
    function ... forward mode AD"), as opposed to the model's own NotImplementedError."""
    text = str(error)
    return "forward AD" in text or "forward mode AD" in text or "forward-mode AD" in text


def _compiled_code_eagerly():
    """torch.compiler.set_stance("force_eager") where torch has it (2.6 and later) and
    something may be compiled (without torch._dynamo imported nothing is; importing it
    takes about a second)."""
    set_stance = getattr(getattr(torch, "compiler", None), "set_stance", None)
    if set_stance is None or "torch._dynamo" not in sys.modules:
        return contextlib.nullcontext()
    return set_stance("force_eager")


def _walker(directions: Tuple[torch.Tensor, ...], record: _WalkRecord, margin: float, found: dict,
            curved_kinks: bool = False, horizon: Optional[torch.Tensor] = None):
    """Wrap the engine's gradients_at so that each chunk runs with tangents along the
    path and BreakpointMode, and writes what it reads of each row into ``record`` (with
    ``horizon``, per example, also the kinks within it)."""

    def wrap(gradients_at: GradientsAt) -> GradientsAt:
        def at(path, chunk, with_outputs):
            rows = slice(chunk.example_begin, chunk.example_end)
            mode = BreakpointMode(chunk.rows, margin, None if horizon is None else horizon[rows],
                                  curved_kinks=curved_kinks, **record.mode_arguments(rows))
            with _along_the_path():
                duals = tuple(fwAD.make_dual(p, d[rows]) for p, d in zip(path, directions))
                with mode:
                    grads, outputs = gradients_at(duals, chunk, with_outputs)
            record.take(rows, mode, found)
            add_to_estimate(chunk.rows * walk_row_bytes(mode))
            return grads, outputs

        return at

    return wrap
