"""Interleaved timing shared by the benchmark scripts: every variant runs once per
round, so drifts of a shared machine hit all variants alike, in a fresh random
order each round (seeded), so no variant always inherits the caches and allocator
state of the same predecessor (a rotation keeps the cyclic order, which showed up
as a systematic bias); the device is synchronised around each call; medians are
reported."""

import random
import statistics
import time
from typing import Callable, Dict


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


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
            run = variants[name]
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def repeats_for(run: Callable[[], object], device: str, budget_seconds: float,
                minimum: int, maximum: int) -> int:
    """Enough rounds that the slowest variant's samples fill about ``budget_seconds``."""
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    once = max(time.perf_counter() - start, 1e-6)
    return max(minimum, min(maximum, int(budget_seconds / once)))
