"""Interleaved timing shared by the benchmark scripts: every variant runs once per
round, so drifts of a shared machine hit all variants alike, in a fresh random
order each round (seeded), so no variant always inherits the caches and allocator
state of the same predecessor (a rotation keeps the cyclic order, which showed up
as a systematic bias); the device is synchronised around each call; medians are
reported. On a GPU each call is timed with CUDA events around it on the current
stream (the device is still synchronised before the call, so calls do not overlap)."""

import random
import statistics
import time
from typing import Callable, Dict


def synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed_call(run: Callable[[], object], device: str) -> float:
    """Seconds of one call of ``run``, after the device has finished earlier work."""
    synchronize(device)
    if str(device).startswith("cuda"):
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_time = time.perf_counter()
    run()
    return time.perf_counter() - start_time


def interleaved_medians(variants: Dict[str, Callable[[], object]], repeats: int, device: str,
                        warmup: bool = True) -> Dict[str, float]:
    """Median seconds of each variant over ``repeats`` interleaved rounds."""
    if warmup:
        for run in variants.values():
            run()
    times = {name: [] for name in variants}
    order = random.Random(0)
    names = list(variants)
    for _ in range(repeats):
        order.shuffle(names)
        for name in names:
            times[name].append(timed_call(variants[name], device))
    return {name: statistics.median(values) for name, values in times.items()}


def repeats_for(run: Callable[[], object], device: str, budget_seconds: float,
                minimum: int, maximum: int) -> int:
    """Enough rounds that the slowest variant's samples fill about ``budget_seconds``."""
    once = max(timed_call(run, device), 1e-6)
    return max(minimum, min(maximum, int(budget_seconds / once)))
