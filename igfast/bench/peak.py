"""Peak allocated memory of a block, measured from outside: for benchmarks and tests.

The engine sizes its chunks with ``igfast.memory.PeakMeter`` (an estimate on CPU);
whether the budget was kept, and how igfast compares with Captum, is judged by this
meter instead, which sees every allocation:

- CUDA: ``torch.cuda.max_memory_allocated`` above the start (through
  ``igfast.memory.PeakMeter``, which sees the peaks the engine's own meters reset);
- CPU: ``torch.profiler`` with ``profile_memory=True``: every allocation and free of
  PyTorch's CPU allocator, summed in time order, and the highest sum kept.

The CPU meter is the profiler, so it cannot run inside another profiler (nor
another ``AllocationPeak``); the library itself never uses it.

Kineto (torch 2.13's CPU profiler) writes "USDT:" and "STAGE:" trace lines to the
process's stderr at every start and stop, whatever KINETO_LOG_LEVEL says: one pair
per measured call filled `igfast bench`'s output. Those lines are dropped; any other
line it writes there (a warning, an error) is passed on.
"""

import contextlib
import os
import sys
import tempfile

import torch

from ..memory import PeakMeter


class AllocationPeak:
    """``with AllocationPeak(device) as peak: ...`` then ``peak.bytes``: the most
    bytes allocated at once inside the block, above what was allocated at its start."""

    def __init__(self, device) -> None:
        self.device = torch.device(device)
        self.bytes = 0

    def __enter__(self) -> "AllocationPeak":
        if self.device.type == "cuda":
            self._meter = PeakMeter(self.device).__enter__()
            return self
        self._profiler = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        )
        with _without_profiler_trace_lines():
            self._profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self._meter.__exit__(*exc)
            self.bytes = self._meter.peak
            return
        with _without_profiler_trace_lines():
            self._profiler.__exit__(*exc)
        if exc[0] is not None:
            return
        events = [
            (event.start_ns(), event.nbytes())
            for event in self._profiler.profiler.kineto_results.events()
            if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
        ]
        current = peak = 0
        for _, nbytes in sorted(events, key=lambda event: event[0]):
            current += nbytes
            peak = max(peak, current)
        self.bytes = peak


# Kineto's own progress lines (see the module docstring), by their prefix.
_TRACE_LINE_PREFIXES = ("USDT:", "STAGE:")


@contextlib.contextmanager
def _without_profiler_trace_lines():
    """Runs the block with the process's stderr (file descriptor 2, where C++ code
    writes) sent to a file, then writes back every line but kineto's trace lines."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                    if not line.startswith(_TRACE_LINE_PREFIXES)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def peak_of(run, device):
    """(what run() returns, its peak allocated bytes) from one call."""
    with AllocationPeak(device) as peak:
        result = run()
    return result, peak.bytes
