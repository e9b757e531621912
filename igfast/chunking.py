"""Chunks of (path nodes x examples) and how many rows each may have.

The engine covers the grid of path nodes x examples exactly once, one rectangle
(a ``Chunk``) per forward/backward call. ``ChunkSchedule`` hands out the
rectangles for a row limit that may change between chunks; a ``RowLimit`` sets
that limit: fixed (Captum's ``internal_batch_size``) or sized from measured peaks
under a memory budget. Both halve it after an out-of-memory error.

A chunk wider than the limit is split by examples, so even one node of a large
batch can be cut down to a single row.

Under a budget the rest of the path is split into balanced chunks (sizes differ by
at most one node), so a call shows a model few distinct batch sizes: the probe, and
one or two chunk sizes. A compiled model then compiles few graphs (torch.compile
marks the batch dimension dynamic once it has seen two sizes), and a repeated call
shows the same sizes again.
"""

import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .dtypes import dtype_policy
from .errors import ArgumentError, ArgumentTypeError, warn_to_caller
from .memory import (automatic_budget, first_chunk_bytes, format_size, parse_memory_size, preferred_chunk_bytes,
                     raised_for_weights)


@dataclass(frozen=True)
class Chunk:
    """Nodes [step_begin, step_end) of examples [example_begin, example_end)."""

    step_begin: int
    step_end: int
    example_begin: int
    example_end: int
    batch_size: int

    @property
    def steps(self) -> int:
        return self.step_end - self.step_begin

    @property
    def examples(self) -> int:
        return self.example_end - self.example_begin

    @property
    def rows(self) -> int:
        return self.steps * self.examples

    @property
    def covers_batch(self) -> bool:
        return self.examples == self.batch_size


class ChunkSchedule:
    """Rectangles covering nodes [0, n_nodes) x examples [0, batch_size) once.

    Examples are outermost, so each example's accumulator is finished before the
    next block of examples starts. ``next_chunk`` proposes the next rectangle for
    the current row limit; ``complete`` marks it done (a failed chunk is simply
    proposed again, smaller).
    """

    def __init__(self, n_nodes: int, batch_size: int) -> None:
        self.batch_size = batch_size
        # A stack of (node_begin, node_end, example_begin, example_end); top is next.
        self._pending: List[Tuple[int, int, int, int]] = (
            [(0, n_nodes, 0, batch_size)] if n_nodes > 0 and batch_size > 0 else []
        )
        self.remaining_rows = n_nodes * batch_size

    @property
    def done(self) -> bool:
        return not self._pending

    def next_chunk(self, max_rows: int, balanced: bool = False) -> Chunk:
        """The next rectangle of at most ``max_rows`` rows: as many nodes as fit
        (Captum's internal batching), or, ``balanced``, the share of the pending
        nodes (or examples) that splits them into the fewest chunks of equal size."""
        assert self._pending and max_rows >= 1
        k0, k1, i0, i1 = self._pending[-1]
        if i1 - i0 > max_rows:
            # Too wide for one node of it: split the examples.
            width = _balanced_share(i1 - i0, max_rows) if balanced else max_rows
            self._pending[-1] = (k0, k1, i0 + width, i1)
            self._pending.append((k0, k1, i0, i0 + width))
            i1 = i0 + width
        most_steps = max_rows // (i1 - i0)
        steps = _balanced_share(k1 - k0, most_steps) if balanced else min(k1 - k0, most_steps)
        return Chunk(k0, k0 + steps, i0, i1, self.batch_size)

    def complete(self, chunk: Chunk) -> None:
        k0, k1, i0, i1 = self._pending[-1]
        assert (chunk.step_begin, chunk.example_begin, chunk.example_end) == (k0, i0, i1)
        if chunk.step_end == k1:
            self._pending.pop()
        else:
            self._pending[-1] = (chunk.step_end, k1, i0, i1)
        self.remaining_rows -= chunk.rows


def _balanced_share(total: int, most: int) -> int:
    """The first part of ``total`` split into the fewest parts of at most ``most``,
    with sizes differing by at most one (larger parts first)."""
    parts = -(-total // most)
    return -(-total // parts)


# Why a chunk holds whole path steps of the batch (RowLimit.least_rows), for the budget's error.
BATCH_DEPENDENT = "the model's output depends on how rows are batched (BatchNorm in training mode, say)"


class RowLimit:
    """A fixed number of path rows per chunk, halved after out-of-memory errors."""

    measures = False
    # Captum's internal_batch_size: whole chunks of the limit, then the remainder.
    balanced = False
    # Whether later passes reuse the limit (the exact walk's rounds), so that a pass's
    # last chunk is measured too: otherwise the walk's first round (one row per
    # example, a single chunk) measured nothing, and the next round's first chunk was
    # held to those few rows (bench's MLP: 64 rows, then 3971, in every call).
    reused_by_later_passes = False
    weight_bytes = 0  # nothing measured

    def __init__(self, rows: int, least_rows: int = 1) -> None:
        self.rows = max(1, rows)
        self._ceiling: Optional[int] = None
        # Fewer rows than this are never run: a model whose output depends on how rows
        # are batched (BatchNorm in training mode) keeps one node of the whole batch
        # per chunk, since a split batch changes its statistics (and fails at one row).
        self.least_rows = max(1, least_rows)

    def observe(self, rows: int, peak_bytes: int, weight_bytes: int = 0) -> None:
        """A chunk of ``rows`` rows peaked at ``peak_bytes`` and read ``weight_bytes`` of
        the model's weights (only when measures)."""

    @property
    def forward_rows(self) -> int:
        """Rows per chunk of forwards without an autograd graph (method="exact"'s walk)."""
        return self.rows

    def set_aside(self, share: float, most: int) -> Optional[int]:
        """Bytes for memory held beside the chunks (see BudgetRowLimit.set_aside); None
        here: without a budget nothing is promised."""
        return None

    def hold(self, nbytes: int, what: Optional[str] = None, more_later: int = 0, briefly_later: int = 0) -> None:
        """Memory the caller holds for the whole call beside the chunks (see
        BudgetRowLimit.hold); nothing here: without a budget nothing is promised."""

    def check_between_chunks(self, nbytes: int, what: str) -> None:
        """Memory held for a moment when no chunk runs (see BudgetRowLimit); nothing here."""

    def shrink(self, failed_rows: int) -> bool:
        """After a chunk of failed_rows rows ran out of memory: halve; False at one row
        (or below least_rows: the error stands)."""
        if failed_rows <= 1 or failed_rows // 2 < self.least_rows:
            return False
        self._ceiling = failed_rows // 2
        self.rows = min(self.rows, self._ceiling)
        return True


class BudgetRowLimit(RowLimit):
    """As many rows as fit in a memory budget, from the measured peak of each chunk.

    ``reserved`` bytes (the accumulators) are held for the whole call; a chunk of r
    rows may use ``budget - reserved``. A chunk's peak is fixed + r * per_row with
    fixed >= 0, so the peak measured at r rows bounds the peak at r' > r rows by
    peak * r' / r: the limit grows geometrically towards the budget and never
    passes it (for models whose memory grows linearly with the batch). Once a
    measurement allows no more than ``MAX_GROWTH`` times the rows it was taken at,
    the limit is settled: nothing more is measured, and chunks are balanced.
    """

    balanced = True
    # Head room for allocator rounding and small nonlinearities.
    SAFETY = 0.95
    # At most this factor more rows than the largest measured chunk at once.
    MAX_GROWTH = 64

    def __init__(self, budget: int, reserved: int, first_rows: int, argument: str,
                 preferred_chunk_bytes: Optional[int] = None, estimated_rows: int = 1,
                 least_rows: int = 1, whole_steps_reason: str = BATCH_DEPENDENT) -> None:
        super().__init__(first_rows, least_rows)
        self.whole_steps_reason = whole_steps_reason  # why least_rows (above one) is the batch
        # The rows the first-chunk estimate allows, where the call's first pass held fewer.
        self.estimated_rows = max(1, estimated_rows)
        self.budget = budget
        self.reserved = reserved
        self.argument = argument
        # A softer limit for speed: chunks aim below it, but a row above it still runs.
        # Raised once a chunk shows how many bytes of weights each chunk reads again.
        self.preferred_chunk_bytes = preferred_chunk_bytes
        self._device_preference = preferred_chunk_bytes
        self._measured: Optional[Tuple[int, int]] = None  # (rows, peak) of the largest chunk
        self._set_aside: Optional[int] = None  # bytes held beside the chunks (set_aside)
        # its (share, most, bytes held when it was taken)
        self._set_aside_terms: Optional[Tuple[float, int, int]] = None
        self.settled = False

    @property
    def measures(self) -> bool:
        return not self.settled

    def adopt(self, row_bytes: float, weight_bytes: int = 0) -> None:
        """Size chunks from a row cost (and weight bytes) an earlier call of the same
        shape measured: no probe, nothing measured, chunks balanced from the start."""
        self._read_weights(weight_bytes)
        if row_bytes > self.available:
            raise budget_too_small(self.argument, self.budget, self.needed_beside(int(row_bytes)), measured=True)
        rows = self._fitting(row_bytes)
        self._check_least_rows(rows, row_bytes)
        self._measured = (rows, max(1, int(rows * row_bytes)))
        self.rows = rows if self._ceiling is None else min(rows, self._ceiling)
        self.settled = True

    @property
    def row_bytes(self) -> Optional[float]:
        """Bytes per path row, from the largest measured chunk (an upper bound: a
        chunk's fixed cost is spread over its rows); None before any measurement."""
        return None if self._measured is None else self._measured[1] / self._measured[0]

    @property
    def forward_rows(self) -> int:
        """Before anything is measured, the first-chunk estimate even where the first pass
        held fewer rows (it runs whole, unmeasured, when the batch fits): a forward row
        without a graph holds less than the gradient row the estimate is for."""
        if self._measured is not None:
            return self.rows
        rows = max(self.rows, self.estimated_rows)
        return rows if self._ceiling is None else min(rows, self._ceiling)

    @property
    def available(self) -> int:
        return self.budget - self.reserved

    def needed_beside(self, nbytes: int) -> int:
        """The least budget that leaves ``nbytes`` beside what is held. What set_aside
        took grows with the budget (a share of the room, up to its most): counted as
        held, the advice it gave was refused again at every retry (a CNN under exact:
        683584, then 788944, 815284, ... bytes, more than 40 times)."""
        if self._set_aside_terms is None:
            return self.reserved + nbytes
        share, most, held_then = self._set_aside_terms
        held = self.reserved - self._set_aside
        # A budget B sets aside share * (B - held_then), at most ``most``, and must leave
        # nbytes beside that and what is held now.
        proportional = math.ceil((nbytes + held - share * held_then) / (1 - share))
        if share * (proportional - held_then) <= most:
            return proportional
        return held + most + nbytes

    def hold(self, nbytes: int, what: Optional[str] = None, more_later: int = 0, briefly_later: int = 0) -> None:
        """Count ``nbytes`` more held for the whole call, like the accumulators
        (n_steps="auto" keeps its levels' sums while examples it switched to
        method="exact" walk; a walk's record of pieces grows between its chunks).
        Chunks are sized to what is left from then on; ``what`` names the holder in the
        error raised when not even one measured row is left room. Its advice counts the
        ``more_later`` bytes the holder expects to add beside the chunks and the
        ``briefly_later`` it expects to hold for a moment between them (the walk's sort
        of its pieces): a budget that is refused again a little later is no advice."""
        self.reserved += max(0, int(nbytes))
        row_bytes = self.row_bytes
        if self.available <= (0 if row_bytes is None else row_bytes):
            needed = max(self.needed_beside(int(row_bytes or 0) + max(0, int(more_later))) + 1,
                         self.reserved - (self._set_aside or 0) + max(0, int(briefly_later)))
            raise budget_too_small(self.argument, self.budget, needed, measured=row_bytes is not None, what=what)
        if row_bytes is not None:
            self.rows = min(self.rows, self._fitting(row_bytes))

    def set_aside(self, share: float, most: int) -> int:
        """Take ``share`` of the chunks' room (at most ``most`` bytes) out of it, for
        memory a caller holds beside the chunks while they run (method="exact" keeps the
        points of a pass and their sums); the same bytes on later calls. Chunks are sized
        to what is left from then on."""
        if self._set_aside is None:
            self._set_aside = max(0, min(most, int(share * self.available)))
            self._set_aside_terms = (share, most, self.reserved)
            self.reserved += self._set_aside
            if self._measured is not None:
                measured_rows, measured_peak = self._measured
                self.rows = min(self.rows, self._fitting(measured_peak / measured_rows))
        return self._set_aside

    def check_between_chunks(self, nbytes: int, what: str) -> None:
        """``nbytes`` more are held for a moment when no chunk runs and nothing set aside
        for them is in use (method="exact" sorting its pieces into breakpoints): they
        must fit beside what is held for the whole call, else the budget's error."""
        held = self.reserved - (self._set_aside or 0)
        if held + nbytes > self.budget:
            raise budget_too_small(self.argument, self.budget, held + int(nbytes), measured=False, what=what,
                                   beside_rows=False)

    # Rows a chunk may keep above the preferred size while the budget allows: a row of
    # a large model can exceed the preferred size alone, and one-row chunks were 18%
    # slower than four-row chunks on a GPT-2-small LLM path (190 MB per row, CPU).
    MIN_ROWS = 4

    def _fitting(self, row_bytes: float) -> int:
        """The rows a chunk may have at ``row_bytes`` per row (at least one)."""
        preferred = int(self.SAFETY * self.chunk_target / row_bytes)
        within_budget = int(self.SAFETY * self.available / row_bytes)
        # Chunks of whole steps (least_rows) may pass the preferred size too.
        return max(1, preferred, min(within_budget, max(self.MIN_ROWS, self.least_rows)))

    @property
    def chunk_target(self) -> int:
        """The bytes a chunk is sized to: the budget's room, or less where faster."""
        if self.preferred_chunk_bytes is None:
            return self.available
        return min(self.available, self.preferred_chunk_bytes)

    def _check_least_rows(self, fitting: int, row_bytes: float) -> None:
        if fitting < self.least_rows:
            raise budget_too_small(
                self.argument, self.budget, self.needed_beside(int(self.least_rows * row_bytes / self.SAFETY)) + 1,
                measured=True, beside_rows=False,
                what=f"one path step of all {self.least_rows} examples per chunk (measured): "
                     f"{self.whole_steps_reason}, so the batch is not split")

    def _read_weights(self, weight_bytes: int) -> None:
        self.weight_bytes = max(self.weight_bytes, weight_bytes)
        if self._device_preference is not None:
            self.preferred_chunk_bytes = raised_for_weights(self._device_preference, self.weight_bytes)

    def observe(self, rows: int, peak_bytes: int, weight_bytes: int = 0) -> None:
        self._read_weights(weight_bytes)
        if rows == 1 and peak_bytes > self.available:
            raise budget_too_small(self.argument, self.budget, self.needed_beside(peak_bytes), measured=True)
        if self._measured is None or rows >= self._measured[0]:
            self._measured = (rows, max(peak_bytes, 1))
        measured_rows, measured_peak = self._measured
        fitting = self._fitting(measured_peak / measured_rows)
        self._check_least_rows(fitting, measured_peak / measured_rows)
        limit = min(fitting, measured_rows * self.MAX_GROWTH)
        self.settled = fitting <= measured_rows * self.MAX_GROWTH
        if self._ceiling is not None:
            limit = min(limit, self._ceiling)
        self.rows = max(1, limit)


def integral_batch_size(value: Any) -> int:
    """``internal_batch_size`` as an int: a Python or numpy number or a one-element
    tensor. Captum divides it by the number of examples with ``//`` and runs at least
    one step per batch, so a real number counts as its floor, and 0 and negative
    values run one step of the batch per chunk, after Captum's warning; a bool counts as
    the int it is, as there. (Captum itself fails on a float whose quotient is 2 or
    more, slicing with it; igfast takes it.)"""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise ArgumentTypeError(  # Captum: TypeError, where it computes with it
            "`internal_batch_size` must be None, 'auto' or a number >= 0 (int, float, numpy "
            f"number or one-element tensor); got {value!r}."
        )
    if not math.isfinite(value):
        raise ArgumentError(f"`internal_batch_size` must be finite; got {value!r}.")
    return max(0, math.floor(value))


# What a budget must hold before the model's first row is measured (choose_row_limit).
HELD_BEFORE_ANY_ROW = ("the accumulators, the attributions made from them (with LayerIntegratedGradients, the "
                       "layer's activations at both ends too) and one path row and its gradient")


def budget_too_small(argument: str, budget: int, needed: int, measured: bool,
                     what: Optional[str] = None, beside_rows: bool = True) -> ArgumentError:
    if what is not None:
        beside = ("" if not beside_rows else ", beside one path row of this model (measured)" if measured
                  else ", before any path row of the model")
        advice = f"for {what}{beside}. Give `{argument}` well above {needed}."
    elif measured:
        advice = f"measured for one path row of this model. Give `{argument}` >= {needed}."
    else:
        # Known before the model runs: the model's own activations come on top, and a
        # budget of just this much fails again once one row is measured.
        advice = (f"for {HELD_BEFORE_ANY_ROW}, before the model's own activations. Give `{argument}` well above "
                  f"{needed}: one row is measured when it runs.")
    error = ArgumentError(
        f"`{argument}` of {format_size(budget)} is too small: at least {format_size(needed)} "
        f"({needed} bytes) is needed, {advice}"
    )
    # (A caller that passed on part of its budget restates it: NoiseTunnel.)
    error.needed_bytes = needed
    error.needed_for = what if what is not None else (
        "one path row of this model (measured)" if measured else HELD_BEFORE_ANY_ROW)
    return error


def shared_argument(args: Optional[Tuple[Any, ...]], batch_size: int) -> Optional[str]:
    """Why chunks must hold whole path steps of the batch for these additional forward
    arguments, or None: a tensor argument without one row per example (a lookup table,
    say) is not split by example; as in Captum, every chunk passes it whole, once for
    each of its steps, which only chunks of whole steps can do."""
    for index, arg in enumerate(args or ()):
        if isinstance(arg, torch.Tensor) and arg.dim() and arg.shape[0] != batch_size:
            return (f"`additional_forward_args[{index}]` of shape {tuple(arg.shape)} has no row per example "
                    f"(the batch has {batch_size}), so, as in Captum, each chunk passes it whole for each of "
                    "its path steps")
    return None


# Before anything is measured, a first chunk under the automatic budget assumes a
# path row costs at most this many times its own bytes (activations, gradients);
# later chunks are sized from the measured peak.
FIRST_CHUNK_ROW_FACTOR = 256


def choose_row_limit(
    internal_batch_size: Any,
    memory_budget: Any,
    inputs: Tuple[torch.Tensor, ...],
    n_nodes: int,
    target_count: int = 1,
    batch_dependent: bool = False,
    known_row_cost: Optional[Tuple[float, int]] = None,
    accumulator_bytes: Optional[int] = None,
    walk: bool = False,
    whole_steps: Optional[str] = None,
    result_count: int = 1,
    held_bytes: int = 0,
) -> RowLimit:
    """The RowLimit for attribute's chunking arguments.

    - ``internal_batch_size`` an int: Captum's meaning, whole nodes of the batch,
      at most that many rows (at least one node of the batch, with Captum's warning).
    - ``memory_budget`` (bytes or a size string): chunks sized from measured peaks,
      starting from one row.
    - neither, or ``internal_batch_size="auto"``: the same under an automatic budget
      (a share of the device's free memory), starting from an estimated first chunk.
      With neither for a ``batch_dependent`` model (BatchNorm in training mode), the
      whole path in one chunk, as Captum batches it (see attr/_train_mode.py).

    Under a budget, ``known_row_cost`` (what an earlier call of the same shapes
    measured, see ``RowCosts``) sizes the chunks at once, without a probe, unless the
    model is ``batch_dependent``.

    ``accumulator_bytes``: what the call's accumulators hold, when not one tensor
    shaped like each input per target (reduced gradients, see integrate_gradients).

    ``walk``: the limit of the exact walk's passes (their preferred chunk size, see
    memory.CPU_PREFERRED_WALK_CHUNK_BYTES).

    ``whole_steps``: why every chunk must hold whole path steps of the batch beside a
    batch-dependent model (see shared_argument); chunks are then never narrower.

    ``result_count``: the attributions the call returns, each shaped like the inputs
    (one per target), are made beside the accumulators once the chunks are done, and
    the plain forwards at the path's ends run beside both (see examples_per_forward):
    they are reserved too. Without them a budget the chunks kept was passed at the end,
    by 1.7x for an MLP's 256 examples and 2.5x with ten targets.

    ``held_bytes``: what else the caller holds for the whole call (LayerIG's
    activations at the path's ends: 1.05x a 16 MiB budget on a CNN's first conv).
    """
    batch_size = inputs[0].shape[0]
    if internal_batch_size is not None and not (isinstance(internal_batch_size, str) and internal_batch_size == "auto"):
        if memory_budget is not None:
            raise ArgumentError(
                "Give either `internal_batch_size` (rows per chunk) or `memory_budget`, not both; "
                "use internal_batch_size='auto' with a memory_budget."
            )
        internal_batch_size = integral_batch_size(internal_batch_size)
        if internal_batch_size < batch_size:
            warn_to_caller(
                "Internal batch size cannot be less than the number of input examples. "
                f"Defaulting to internal batch size of {batch_size} equal to the number "
                "of examples.", UserWarning)
        steps = max(1, internal_batch_size // max(batch_size, 1))
        return RowLimit(steps * batch_size, least_rows=batch_size if batch_dependent or whole_steps else 1)

    if batch_dependent and internal_batch_size is None and memory_budget is None:
        return RowLimit(n_nodes * batch_size, least_rows=batch_size)
    row_bytes = sum(x[0].numel() * x.element_size() for x in inputs) if batch_size else 0
    # one accumulator per input and target, and one result per input and target
    per_copy = sum(x.numel() * dtype_policy(x.dtype).accumulate.itemsize for x in inputs)
    reserved = (accumulator_bytes if accumulator_bytes is not None else target_count * per_copy) + \
        result_count * per_copy + held_bytes
    explicit = memory_budget is not None
    budget = parse_memory_size(memory_budget) if explicit else automatic_budget(inputs[0].device)
    needed = reserved + (1 + target_count) * row_bytes  # a path row and its gradients
    if budget < needed:
        if explicit:
            raise budget_too_small("memory_budget", budget, needed, measured=False)
        raise ArgumentError(
            f"Too little free memory on {inputs[0].device} for this call: "
            f"{format_size(budget)} usable, at least {format_size(needed)} needed."
        )
    total_rows = n_nodes * batch_size
    preferred = preferred_chunk_bytes(inputs[0].device, walk)
    # A batch-dependent model (BatchNorm in training mode) cannot run on a part of the
    # batch, nor can a shared argument be passed with one: chunks hold whole steps.
    least_rows = batch_size if batch_dependent or whole_steps else 1
    if explicit:
        # One row measures the least, or one node of the batch where chunks hold whole steps.
        first_rows = least_rows
    else:
        first = first_chunk_bytes(inputs[0].device)
        room = budget - reserved if first is None else min(budget - reserved, first)
        first_rows = max(least_rows, room // max(1, FIRST_CHUNK_ROW_FACTOR * row_bytes))
    limit = BudgetRowLimit(budget, reserved, max(1, min(total_rows, first_rows)), "memory_budget", preferred,
                           estimated_rows=first_rows, least_rows=least_rows,
                           whole_steps_reason=whole_steps if whole_steps and not batch_dependent else BATCH_DEPENDENT)
    limit.reused_by_later_passes = walk
    # Not for a batch-dependent model: its chunks are part of its result (batch
    # statistics), which would then depend on the explainer's earlier calls (0.38 between
    # two calls of one explainer; attribute_dataset resumed with other shards).
    if known_row_cost is not None and not batch_dependent:
        limit.adopt(*known_row_cost)
    return limit


class RowCosts:
    """The bytes per path row, and the bytes of weights each chunk read, that calls on
    one explainer measured, by the shapes that decide them: the device, each path
    tensor's dtype and row shape, the model inputs' row shapes, the number of targets
    and the additional arguments' row shapes. A later call with the same key sizes its
    chunks without a probe; these costs do not depend on the batch size, n_steps or
    the budget."""

    def __init__(self) -> None:
        self._costs: Dict[Tuple, Tuple[float, int]] = {}

    @staticmethod
    def key(path_inputs: Sequence[torch.Tensor], other: Sequence[Any] = (), target_count: int = 1) -> Tuple:
        def row_shape(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return (str(value.device), value.dtype, tuple(value.shape[1:]))
            return type(value).__name__
        return (tuple(row_shape(x) for x in path_inputs), tuple(row_shape(o) for o in other), target_count)

    def get(self, key: Tuple) -> Optional[Tuple[float, int]]:
        """(bytes per row, weight bytes per chunk), or None where nothing was measured."""
        return self._costs.get(key)

    def remember(self, key: Tuple, row_limit: RowLimit) -> None:
        row_bytes = getattr(row_limit, "row_bytes", None)
        if row_bytes is not None:
            self._costs[key] = (row_bytes, row_limit.weight_bytes)

