"""Can n_steps="auto" judge its error more sharply on a network with thousands of kinks?

On the CNN of bench_exact (about 11,000 linear pieces per path) every rule's error
falls as 1/n: GL needs 62, 624 and 6272 nodes for tol 1e-2, 1e-3 and 1e-4, and auto,
which doubles nested Clenshaw-Curtis levels and takes the change at the last doubling
as its error, stops one level later than the first that meets tol (130, 2050 and
16386 evaluations: 0.48x, 0.30x and 0.38x of the GL oracle; since this study, auto
divides the change on such paths by a steady factor (adaptive.MANY_PIECES and
MANY_PIECES_CHANGE_OVER_ERROR) and stops at 1026 for 1e-3). Two ways to be sharper
would work if the errors of consecutive levels were one vector shrinking as 1/n, as a
smooth integrand's are:

- Richardson extrapolation, 2 I(2n) - I(n), would cancel that vector;
- the change I(2n) - I(n) would be exactly the finer level's error, so the level
  before could be trusted.

This measures, on every Clenshaw-Curtis level auto uses (17 to 8193 nodes, each
against exact IG), per example and level k:

- cos: the cosine between the errors of levels k-1 and k (1: one shrinking vector);
- change / error: ||I_k - I_{k-1}|| over the finer level's own error ||e_k|| (1 for
  a shrinking vector; about sqrt(5) = 2.24 for independent errors halving per level);
- Richardson / error: ||2 I_k - I_{k-1} - exact|| over ||e_k|| (below 1 if
  extrapolation helps).

Then, for each tol: the first level that meets tol for every example (a perfect stop
on auto's levels), and where an estimate of change / r would stop, r the smallest
change / error measured (the sharpest such estimate that never understates an error
seen here); both as GL oracle / evaluations.

Last, the same grids with equally spaced nodes (the composite trapezoid rule, which
also nests by doubling): the integrand is a step function, and for jumps spread
evenly along the path even spacing would miss them by less than Clenshaw-Curtis'
nodes, which crowd at both ends. Its error is compared with Clenshaw-Curtis' level
by level, per example.

    python benchmarks/bench_jump_errors.py           # CNN, 2 examples: about 15 minutes
    python benchmarks/bench_jump_errors.py --seed 1  # the same CNN, weights and inputs drawn again
    python benchmarks/bench_jump_errors.py --quick   # MLP, 8 examples (CI smoke)
"""

import argparse
import json
import time
from typing import Any, Dict, List
from unittest import mock

import numpy as np
import torch

from igfast import quadrature

from bench_exact import TOLERANCES, fewest_gl_steps, problem

LEVEL_INTERVALS = [2**k for k in range(4, 14)]  # 17 to 8193 nodes: auto's levels from its third on


def clenshaw_curtis(attribute, intervals: int) -> torch.Tensor:
    """The attributions of the Clenshaw-Curtis rule of intervals + 1 nodes (one of auto's
    nested levels, evaluated alone)."""
    return _rule_alone(attribute, quadrature._clenshaw_curtis, intervals)


def _trapezoid_nodes(intervals: int):
    weights = np.full(intervals + 1, 1.0 / intervals)
    weights[[0, -1]] /= 2
    return np.arange(intervals + 1) / intervals, weights


def trapezoid(attribute, intervals: int) -> torch.Tensor:
    """The attributions of the composite trapezoid rule on intervals + 1 equally spaced
    nodes (weights 1 / intervals, halved at both ends: not Captum's riemann_trapezoid,
    whose weights sum to 1 - 1/n)."""
    return _rule_alone(attribute, _trapezoid_nodes, intervals)


def _rule_alone(attribute, nodes_and_weights, intervals: int) -> torch.Tensor:
    """attribute(...) with the rule of intervals + 1 nodes put in igfast's quadrature
    table for this call (whose weights, as every fixed rule's, are rounded to float32:
    about 3e-9 relative, far below the errors measured here)."""
    rule = quadrature.Rule("gausslegendre", 1, lambda n: nodes_and_weights(intervals))
    with mock.patch.dict(quadrature.RULES, {"gausslegendre": rule}):
        quadrature._table.cache_clear()
        try:
            return attribute(n_steps=intervals + 1, method="gausslegendre")
        finally:
            quadrature._table.cache_clear()


def measure(key: str, batch: int, largest_intervals: int, seed: int = 0) -> Dict[str, Any]:
    name, attribute = problem(key, batch, torch.float64, seed)
    started = time.perf_counter()
    exact = attribute(method="exact")
    print(f"{name}: exact IG in {time.perf_counter() - started:.1f} s", flush=True)
    scale = exact.flatten(1).norm(dim=1)
    levels = [n for n in LEVEL_INTERVALS if n <= largest_intervals]
    results = {n: clenshaw_curtis(attribute, n) for n in levels}
    errors = {n: (results[n] - exact).flatten(1) for n in levels}
    relative = {n: errors[n].norm(dim=1) / scale for n in levels}
    rows = []
    for coarse, fine in zip(levels, levels[1:]):
        e0, e1 = errors[coarse], errors[fine]
        cosine = (e0 * e1).sum(1) / (e0.norm(dim=1) * e1.norm(dim=1))
        change = (e1 - e0).norm(dim=1) / e1.norm(dim=1)
        richardson = (2 * e1 - e0).norm(dim=1) / e1.norm(dim=1)
        rows.append({"nodes": fine + 1, "worst_error": float(relative[fine].max()),
                     "cosine": [float(c) for c in cosine], "change_over_error": [float(c) for c in change],
                     "richardson_over_error": [float(r) for r in richardson],
                     "change": [float(c) for c in (e1 - e0).norm(dim=1) / scale]})
    sharpest = min(min(row["change_over_error"]) for row in rows)
    stops = []
    gl_cache: Dict[int, float] = {}
    for tol in TOLERANCES:
        oracle = fewest_gl_steps(attribute, exact, tol, gl_cache, limit=largest_intervals + 1)
        perfect = next((n + 1 for n in levels if float(relative[n].max()) <= tol), None)
        # Auto stops per example; the estimate change / sharpest judges the finer level.
        per_example = []
        for example in range(batch):
            stop = next((row["nodes"] for row in rows if row["change"][example] / sharpest <= tol), None)
            per_example.append(stop)
        stops.append({"tol": tol, "gl_oracle": oracle, "perfect_stop": perfect, "sharp_estimate_stops": per_example,
                      "sharp_estimate_worst_error": max(
                          (float(relative[n - 1][e]) for e, n in enumerate(per_example) if n is not None),
                          default=None)})
    uniform = []
    for n in levels:
        trapezoid_error = (trapezoid(attribute, n) - exact).flatten(1).norm(dim=1) / scale
        uniform.append({"nodes": n + 1, "worst_error": float(trapezoid_error.max()),
                        "clenshaw_curtis_worst_error": float(relative[n].max()),
                        "clenshaw_curtis_over_trapezoid": [float(q) for q in relative[n] / trapezoid_error]})
    for stop in stops:
        stop["trapezoid_perfect_stop"] = next(
            (row["nodes"] for row in uniform if row["worst_error"] <= stop["tol"]), None)
    return {"workload": name, "rows": rows, "sharpest_change_over_error": sharpest, "stops": stops,
            "trapezoid": uniform}


def ratio(oracle, evaluations) -> str:
    return "-" if oracle in (None, -1) or evaluations is None else f"{oracle / evaluations:.2f}x"


def print_tables(result: Dict[str, Any]) -> None:
    print(f"\n{result['workload']}: the errors of consecutive Clenshaw-Curtis levels (per example: min-max)\n")
    print("| nodes | worst error | cos(e_{k-1}, e_k) | change / error | Richardson / error |")
    print("|---|---|---|---|---|")
    for row in result["rows"]:
        spans = [f"{min(row[k]):.2f} to {max(row[k]):.2f}"
                 for k in ("cosine", "change_over_error", "richardson_over_error")]
        print(f"| {row['nodes']} | {row['worst_error']:.2e} | " + " | ".join(spans) + " |")
    sharpest = result["sharpest_change_over_error"]
    print(f"\nStops, as GL oracle / evaluations (r = {sharpest:.2f}, the smallest change / error above):\n")
    print("| tol | GL oracle n | perfect stop on auto's levels | stop of change / r (per example) | its worst error |")
    print("|---|---|---|---|---|")
    for stop in result["stops"]:
        sharp = stop["sharp_estimate_stops"]
        mean = None if None in sharp else sum(sharp) / len(sharp)
        worst = stop["sharp_estimate_worst_error"]
        print(f"| {stop['tol']:.0e} | {stop['gl_oracle']} | {stop['perfect_stop']} "
              f"({ratio(stop['gl_oracle'], stop['perfect_stop'])}) | "
              f"{'-' if mean is None else f'{mean:.1f}'} ({ratio(stop['gl_oracle'], mean)}) | "
              f"{'-' if worst is None else f'{worst:.2e}'} |")
    print(f"\n{result['workload']}: equally spaced nodes (composite trapezoid) on the same grids\n")
    print("| nodes | Clenshaw-Curtis worst error | trapezoid worst error | CC error / trapezoid error (per example) |")
    print("|---|---|---|---|")
    for row in result["trapezoid"]:
        quotients = row["clenshaw_curtis_over_trapezoid"]
        print(f"| {row['nodes']} | {row['clenshaw_curtis_worst_error']:.2e} | {row['worst_error']:.2e} | "
              f"{min(quotients):.2f} to {max(quotients):.2f} |")
    print("\nPerfect stops, as GL oracle / evaluations: "
          + "; ".join(f"tol {stop['tol']:.0e}: Clenshaw-Curtis {stop['perfect_stop']} "
                      f"({ratio(stop['gl_oracle'], stop['perfect_stop'])}), trapezoid "
                      f"{stop['trapezoid_perfect_stop']} ({ratio(stop['gl_oracle'], stop['trapezoid_perfect_stop'])})"
                      for stop in result["stops"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="MLP, 8 examples (CI smoke)")
    parser.add_argument("--seed", type=int, default=0,
                        help="draw the network and inputs with this seed (0: bench_exact's own)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    result = (measure("mlp", 8, 256, args.seed) if args.quick
              else measure("cnn", 2, LEVEL_INTERVALS[-1], args.seed))
    print_tables(result)
    print(f"\n{time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
