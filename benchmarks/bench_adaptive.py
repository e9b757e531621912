"""n_steps="auto" against fixed Gauss-Legendre: evaluations and time for the same error.

For each workload the attribution error is the relative L2 distance, per example, to
a high-resolution Gauss-Legendre reference (4096 nodes; 1024 for the encoder, 256 for
the smooth MiniLM, both checked converged far below the errors compared), averaged
over the examples, in float64 so that only quadrature error is measured.

- "GL50 error": Captum's default (gausslegendre, 50 steps).
- "auto to reach it": the fewest evaluations (mean path points per example) of
  n_steps="auto" over a sweep of tolerances whose mean error is at most GL50's, and
  that tolerance.
- "same evaluations": the error of auto at the sweep point whose mean evaluations is
  closest to 50 without exceeding it, beside fixed GL with that many steps.
- Wall time (float32, one thread, interleaved medians): fixed GL50 against auto at
  the tolerance that reached GL50's error.

Workloads: the MLP (batch 64) and CNN (batch 16) of igfast.bench, the transformer
encoder (4 examples of 16 tokens: float64 references are costly) and MiniLM LayerIG on
the embeddings (4 sentence pairs, 32 tokens).

    python benchmarks/bench_adaptive.py            # about 10 minutes on a 2-core CPU
    python benchmarks/bench_adaptive.py --quick    # the MLP only (CI smoke)
"""

import argparse
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List

import torch

import igfast
from igfast.bench.timing import interleaved_medians
from igfast.bench.workloads import WORKLOADS, minilm_available

TOLERANCES = [10 ** (-k / 2) for k in range(1, 17)]  # 3e-1 ... 1e-8
CAPTUM_DEFAULT_STEPS = 50


@dataclass
class Problem:
    name: str
    attribute: Callable[..., Any]  # (**kwargs) -> attributions or (attributions, info)
    reference_steps: int


def input_problem(key: str, dtype: torch.dtype, batch: int, tokens: int = None) -> Problem:
    model, x, baseline, _ = WORKLOADS[key].build("cpu")
    x, baseline = x[:batch], baseline[:batch]
    if tokens is not None:
        x, baseline = x[:, :tokens], baseline[:, :tokens]
    model = model.to(dtype)
    x, baseline = x.to(dtype), baseline.to(dtype)
    with torch.no_grad():
        target = model(x).argmax(1)
    ig = igfast.IntegratedGradients(model)
    name = WORKLOADS[key].name.split(" (")[0]
    shape = "x".join(map(str, x.shape[1:]))
    return Problem(f"{name} ({shape}, batch {batch})",
                   lambda **kw: ig.attribute(x, baseline, target=target, **kw),
                   {"mlp": 4096, "cnn": 4096, "encoder": 1024}[key])


def minilm_problem(dtype: torch.dtype, batch: int = 4, length: int = 32) -> Problem:
    from igfast.examples import minilm

    task = minilm.similarity_task((minilm.SENTENCES * 4)[:batch], (minilm.PAIRED_SENTENCES * 4)[:batch],
                                  length=length)
    model = task.model.to(dtype)
    layer = igfast.LayerIntegratedGradients(model, task.layer)
    return Problem(f"MiniLM LayerIG embeddings (batch {batch}, {length} tokens)",
                   lambda **kw: layer.attribute(task.inputs, baselines=task.baselines,
                                                additional_forward_args=task.additional_forward_args, **kw),
                   256)


def build(key: str, dtype: torch.dtype, quick: bool) -> Problem:
    if key == "minilm":
        return minilm_problem(dtype)
    batch = {"mlp": 16 if quick else 64, "cnn": 16, "encoder": 4}[key]
    return input_problem(key, dtype, batch, tokens=16 if key == "encoder" else None)


def mean_error(attributions: torch.Tensor, reference: torch.Tensor) -> float:
    per_example = ((attributions - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1))
    return float(per_example.mean())


def errors_and_evaluations(key: str, quick: bool) -> Dict[str, Any]:
    problem = build(key, torch.float64, quick)
    reference = problem.attribute(n_steps=problem.reference_steps if not quick else 1024)
    gl = {n: mean_error(problem.attribute(n_steps=n), reference) for n in (9, 17, 33, CAPTUM_DEFAULT_STEPS, 65, 129)}
    target_error = gl[CAPTUM_DEFAULT_STEPS]
    sweep: List[Dict[str, Any]] = []

    def run_auto(tolerance: float) -> Dict[str, Any]:
        attributions, info = problem.attribute(n_steps="auto", tolerance=tolerance, max_steps=1025,
                                               return_adaptive_info=True)
        sweep.append({
            "tolerance": tolerance,
            "mean_evaluations": float(info.evaluations.double().mean()),
            "max_evaluations": int(info.evaluations.max()),
            "converged": float(info.converged.double().mean()),
            "mean_error": mean_error(attributions, reference),
            "mean_estimate": float(info.error_estimate.mean()),
        })
        print(f"  {key} tol {tolerance:.1e}: {sweep[-1]['mean_evaluations']:.1f} evals, "
              f"error {sweep[-1]['mean_error']:.2e}", flush=True)
        return sweep[-1]

    for tolerance in TOLERANCES:
        if run_auto(tolerance)["mean_error"] < target_error / 10 or (quick and len(sweep) >= 6):
            break
    # The user picks the tolerance: bisect (in log scale) between the loosest sweep
    # point that reaches GL50's error and the one before it.
    for _ in range(0 if quick else 3):
        reached = [p for p in sweep if p["mean_error"] <= target_error]
        missed = [p for p in sweep if p["mean_error"] > target_error]
        if not reached or not missed:
            break
        low = max(reached, key=lambda p: p["tolerance"])["tolerance"]
        high = min((p for p in missed if p["tolerance"] > low), key=lambda p: p["tolerance"],
                   default={"tolerance": low})["tolerance"]
        if high == low:
            break
        run_auto(math.sqrt(low * high))
    reaching = [s for s in sweep if s["mean_error"] <= target_error]
    best = min(reaching, key=lambda s: s["mean_evaluations"]) if reaching else None
    within = [s for s in sweep if s["mean_evaluations"] <= CAPTUM_DEFAULT_STEPS]
    same = max(within, key=lambda s: s["mean_evaluations"]) if within else None
    same_gl = None
    if same is not None:
        steps = max(1, round(same["mean_evaluations"]))
        same_gl = {"steps": steps, "mean_error": mean_error(problem.attribute(n_steps=steps), reference)}
    return {"workload": problem.name, "reference_steps": problem.reference_steps, "gausslegendre": gl,
            "sweep": sweep, "reaching_gl50": best, "same_evaluations": same, "gl_same_evaluations": same_gl}


def wall_times(key: str, quick: bool, tolerance: float) -> Dict[str, float]:
    problem = build(key, torch.float32, quick)
    variants = {
        "gl50": lambda: problem.attribute(n_steps=CAPTUM_DEFAULT_STEPS),
        "auto": lambda: problem.attribute(n_steps="auto", tolerance=tolerance, max_steps=1025),
    }
    return interleaved_medians(variants, repeats=3 if quick else 5, device="cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the MLP only, smaller (CI smoke)")
    parser.add_argument("--workloads", default=None, help="comma-separated: mlp,cnn,encoder,minilm")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    keys = args.workloads.split(",") if args.workloads else (["mlp"] if args.quick else ["mlp", "cnn", "encoder", "minilm"])
    if "minilm" in keys and minilm_available() is not None:
        print(f"skipping minilm: {minilm_available()}")
        keys.remove("minilm")
    results = []
    for key in keys:
        print(f"{key}:", flush=True)
        result = errors_and_evaluations(key, args.quick)
        best = result["reaching_gl50"]
        if best is not None:
            result["seconds"] = wall_times(key, args.quick, best["tolerance"])
        results.append(result)
    print()
    print("| workload | GL50 error | auto: evaluations to reach it (tolerance) | evaluation ratio | "
          "GL50 s | auto s | time ratio | auto at <= 50 evaluations: evals, error | GL at those steps |")
    print("|---|---|---|---|---|---|---|---|---|")
    ratios, time_ratios = [], []
    for r in results:
        best, same, same_gl = r["reaching_gl50"], r["same_evaluations"], r["gl_same_evaluations"]
        target = r["gausslegendre"][CAPTUM_DEFAULT_STEPS]
        if best is None:
            reach = "not reached"
            ratio = time_ratio = float("nan")
            seconds = "-", "-"
        else:
            ratio = CAPTUM_DEFAULT_STEPS / best["mean_evaluations"]
            s = r["seconds"]
            time_ratio = s["gl50"] / s["auto"]
            reach = f"{best['mean_evaluations']:.1f} ({best['tolerance']:.0e})"
            seconds = f"{s['gl50']:.3f}", f"{s['auto']:.3f}"
            ratios.append(ratio)
            time_ratios.append(time_ratio)
        same_text = f"{same['mean_evaluations']:.1f}, {same['mean_error']:.2e}" if same else "-"
        gl_text = f"GL{same_gl['steps']}: {same_gl['mean_error']:.2e}" if same_gl else "-"
        print(f"| {r['workload']} | {target:.2e} | {reach} | {ratio:.2f}x | {seconds[0]} | {seconds[1]} | "
              f"{time_ratio:.2f}x | {same_text} | {gl_text} |")
    if ratios:
        geometric = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
        print(f"\nevaluation ratio (GL50 / auto), mean over workloads: {sum(ratios) / len(ratios):.2f}x "
              f"(geometric {geometric:.2f}x); time ratio mean {sum(time_ratios) / len(time_ratios):.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
