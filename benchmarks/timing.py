"""Interleaved timing shared by the benchmark scripts: every variant runs once per
round, so drifts of a shared machine hit all variants alike, and the order rotates
from round to round, so no variant always inherits the caches of the same
predecessor; the device is synchronised around each call; medians are reported."""

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
    names = list(variants)
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
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
