"""Chunks of (path nodes x examples) and how many rows each may have.

The engine covers the grid of path nodes x examples exactly once, one rectangle
(a ``Chunk``) per forward/backward call. ``ChunkSchedule`` hands out the
rectangles for a row limit that may change between chunks; a ``RowLimit`` sets
that limit: fixed (Captum's ``internal_batch_size``) or sized from measured peaks
under a memory budget. Both halve it after an out-of-memory error.

A chunk wider than the limit is split by examples, so even one node of a large
batch can be cut down to a single row.
"""

import warnings
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch

from .dtypes import dtype_policy
from .errors import ArgumentError
from .memory import automatic_budget, format_size, parse_memory_size, preferred_chunk_bytes


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

    def next_chunk(self, max_rows: int) -> Chunk:
        assert self._pending and max_rows >= 1
        k0, k1, i0, i1 = self._pending[-1]
        if i1 - i0 > max_rows:
            # Too wide for one node of it: split off the first max_rows examples.
            self._pending[-1] = (k0, k1, i0 + max_rows, i1)
            self._pending.append((k0, k1, i0, i0 + max_rows))
            i1 = i0 + max_rows
        steps = min(k1 - k0, max_rows // (i1 - i0))
        return Chunk(k0, k0 + steps, i0, i1, self.batch_size)

    def complete(self, chunk: Chunk) -> None:
        k0, k1, i0, i1 = self._pending[-1]
        assert (chunk.step_begin, chunk.example_begin, chunk.example_end) == (k0, i0, i1)
        if chunk.step_end == k1:
            self._pending.pop()
        else:
            self._pending[-1] = (chunk.step_end, k1, i0, i1)
        self.remaining_rows -= chunk.rows


class RowLimit:
    """A fixed number of path rows per chunk, halved after out-of-memory errors."""

    measures = False

    def __init__(self, rows: int) -> None:
        self.rows = max(1, rows)
        self._ceiling: Optional[int] = None

    def observe(self, rows: int, peak_bytes: int) -> None:
        """A chunk of ``rows`` rows peaked at ``peak_bytes`` (only when measures)."""

    def shrink(self, failed_rows: int) -> bool:
        """After a chunk of failed_rows rows ran out of memory: halve; False at one row."""
        if failed_rows <= 1:
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
    passes it (for models whose memory grows linearly with the batch).
    """

    measures = True
    # Head room for allocator rounding and small nonlinearities.
    SAFETY = 0.95
    # At most this factor more rows than the largest measured chunk at once.
    MAX_GROWTH = 64

    def __init__(self, budget: int, reserved: int, first_rows: int, argument: str,
                 preferred_chunk_bytes: Optional[int] = None) -> None:
        super().__init__(first_rows)
        self.budget = budget
        self.reserved = reserved
        self.argument = argument
        # A softer limit for speed: chunks aim below it, but a row above it still runs.
        self.preferred_chunk_bytes = preferred_chunk_bytes
        self._measured: Optional[Tuple[int, int]] = None  # (rows, peak) of the largest chunk

    @property
    def available(self) -> int:
        return self.budget - self.reserved

    @property
    def chunk_target(self) -> int:
        """The bytes a chunk is sized to: the budget's room, or less where faster."""
        if self.preferred_chunk_bytes is None:
            return self.available
        return min(self.available, self.preferred_chunk_bytes)

    def observe(self, rows: int, peak_bytes: int) -> None:
        if rows == 1 and peak_bytes > self.available:
            raise budget_too_small(self.argument, self.budget, self.reserved + peak_bytes, measured=True)
        if self._measured is None or rows >= self._measured[0]:
            self._measured = (rows, max(peak_bytes, 1))
        measured_rows, measured_peak = self._measured
        fitting = int(self.SAFETY * self.chunk_target * measured_rows / measured_peak)
        limit = min(fitting, measured_rows * self.MAX_GROWTH)
        if self._ceiling is not None:
            limit = min(limit, self._ceiling)
        self.rows = max(1, limit)


def budget_too_small(argument: str, budget: int, needed: int, measured: bool) -> ArgumentError:
    how = "measured for one path row of this model" if measured else "for the accumulators and one path row and its gradient"
    return ArgumentError(
        f"`{argument}` of {format_size(budget)} is too small: at least {format_size(needed)} "
        f"({needed} bytes) is needed, {how}. Give `{argument}` >= {needed}."
    )


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
    accumulator_bytes: Optional[int] = None,
) -> RowLimit:
    """The RowLimit for attribute's chunking arguments.

    - ``internal_batch_size`` an int: Captum's meaning, whole nodes of the batch,
      at most that many rows (at least one node of the batch, with Captum's warning).
    - ``memory_budget`` (bytes or a size string): chunks sized from measured peaks,
      starting from one row.
    - neither, or ``internal_batch_size="auto"``: the same under an automatic budget
      (a share of the device's free memory), starting from an estimated first chunk.

    ``accumulator_bytes``: what the call's accumulators hold, when not one tensor
    shaped like each input per target (reduced gradients, see integrate_gradients).
    """
    batch_size = inputs[0].shape[0]
    if internal_batch_size is not None and internal_batch_size != "auto":
        if memory_budget is not None:
            raise ArgumentError(
                "Give either `internal_batch_size` (rows per chunk) or `memory_budget`, not both; "
                "use internal_batch_size='auto' with a memory_budget."
            )
        if isinstance(internal_batch_size, bool) or not isinstance(internal_batch_size, int):
            raise ArgumentError(
                "`internal_batch_size` must be None, 'auto' or an integer >= 1; "
                f"got {internal_batch_size!r}."
            )
        if internal_batch_size < 1:
            raise ArgumentError(f"`internal_batch_size` must be >= 1; got {internal_batch_size}.")
        if internal_batch_size < batch_size:
            warnings.warn(
                "Internal batch size cannot be less than the number of input examples. "
                f"Defaulting to internal batch size of {batch_size} equal to the number "
                "of examples.",
                stacklevel=4,
            )
        steps = max(1, internal_batch_size // max(batch_size, 1))
        return RowLimit(steps * batch_size)

    row_bytes = sum(x[0].numel() * x.element_size() for x in inputs) if batch_size else 0
    reserved = accumulator_bytes if accumulator_bytes is not None else target_count * sum(
        # one accumulator per input and target
        x.numel() * torch.finfo(dtype_policy(x.dtype).accumulate).bits // 8 for x in inputs
    )
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
    preferred = preferred_chunk_bytes(inputs[0].device)
    if explicit:
        first_rows = 1
    else:
        room = budget - reserved if preferred is None else min(budget - reserved, preferred)
        first_rows = room // max(1, FIRST_CHUNK_ROW_FACTOR * row_bytes)
    return BudgetRowLimit(
        budget, reserved, max(1, min(total_rows, first_rows)), "memory_budget", preferred
    )

