"""method="exact", n_steps="auto" and fixed Gauss-Legendre: the cost of "every example within tol".

For each workload and tolerance tol (1e-2, 1e-3, 1e-4), per example the error of an
attribution is its relative L2 distance to the float64 exact result (whose own
completeness error is printed: about 1e-16 relative). Each rule must bring EVERY
example within tol:

- fixed GL: the fewest Gauss-Legendre steps n found by doubling from 1 then bisecting
  (to 3%) that puts every example within tol (the error of a ReLU network jumps with n,
  so this is the first n on that search path, not a guaranteed minimum);
- auto: n_steps="auto" with tolerance=tol; its true worst error is reported, and when
  it misses tol, the loosest tolerance tol/2^k that meets it is used instead; it
  switches examples to method="exact" where that is predicted cheaper (the share of
  examples it walked exactly is printed);
- exact: method="exact" (one evaluation per linear piece; 4 with a smooth head);
  on mixed networks gausslegendre_pieces instead.

Evaluations are path points (forward+backward rows) per example, mean over the batch.
Times: float32, one thread, medians of interleaved runs; method="exact" also without
the compiled kernels (the walk's reading of ReLUs and max-pools is one of them). A plot of the worst error
against evaluations for every rule (GL, trapezoid, auto, exact) goes to --plot.

Workloads: the MLP of igfast.bench (batch 64), the same MLP with a softmax of the
target's logits as head, the CNN of igfast.bench (batch 2 here: its paths have
about 11,000 pieces each), the MLP with GELU for ReLU, and igfast bench's MiniLM
LayerIG workload (both smooth: no exact IG; their reference is a converged 1024-node
Gauss-Legendre rule). Two mixed networks (smooth ops before kinks) compare
method="gausslegendre_pieces" (kinks found, 3 Gauss nodes per piece, smooth stretches
cut for n_steps nodes: the fewest n_steps that meets tol, found by doubling) with the
rules: the MLP with tanh for its first ReLU (batch 32), and a small transformer encoder
layer with a ReLU feed-forward block; their reference is gausslegendre_pieces with 8
nodes per piece.

    python benchmarks/bench_exact.py                  # about 10 minutes on a 2-core CPU
    python benchmarks/bench_exact.py --quick          # small MLP batch, one tolerance (CI smoke)
"""

import argparse
import json
import math
import time
from typing import Any, Callable, Dict, List

import torch
import torch.nn as nn

import igfast
from igfast import ops
from igfast.bench.timing import interleaved_medians
import igfast.exact
from igfast.bench.workloads import WORKLOADS, SmallEncoder, minilm_available

TOLERANCES = (1e-2, 1e-3, 1e-4)


class SoftmaxHead(nn.Module):
    """The MLP's class probabilities: a smooth head after its last ReLU."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return torch.softmax(self.body(x), dim=1)


# Smooth workloads have no exact IG: their reference is a Gauss-Legendre rule of this
# many nodes, converged to rounding (a 5-node rule is within 4e-7 on the GELU MLP).
SMOOTH_REFERENCE_STEPS = 1024
SMOOTH = ("gelu_mlp", "minilm")
MINILM_BATCH, MINILM_LENGTH = 4, 32  # as in igfast bench


def minilm_problem(dtype: torch.dtype):
    """LayerIntegratedGradients on all-MiniLM-L6-v2's embeddings, igfast bench's
    similarity task: a smooth transformer (GELU, softmax attention, layer norm)."""
    from igfast.examples import minilm

    sentences = (minilm.SENTENCES * 4)[:MINILM_BATCH]
    references = (minilm.PAIRED_SENTENCES * 4)[:MINILM_BATCH]
    task = minilm.similarity_task(sentences, references, length=MINILM_LENGTH)
    model = task.model.to(dtype)
    args = tuple(a.to(dtype) if a.is_floating_point() else a for a in task.additional_forward_args)
    layer = igfast.LayerIntegratedGradients(model, task.layer)
    name = f"MiniLM LayerIG on embeddings (batch {MINILM_BATCH}, sequence {MINILM_LENGTH})"
    return name, lambda **kw: layer.attribute(task.inputs, baselines=task.baselines, additional_forward_args=args,
                                              **kw)


# Mixed networks (smooth ops before kinks): no exact IG; method="gausslegendre_pieces"
# finds their kinks. Their reference is that method with REFERENCE_NODES_PER_PIECE Gauss
# nodes per piece and smooth stretches cut for REFERENCE_SPREAD nodes (checked against
# 6 nodes and half the spread).
MIXED = ("tanh_mlp", "relu_encoder")
REFERENCE_NODES_PER_PIECE, REFERENCE_SPREAD = 8, 2048
ENCODER_BATCH = 2


def encoder_problem(dtype: torch.dtype):
    """A transformer encoder layer with a ReLU feed-forward block (igfast bench's encoder,
    scaled down: width 32, 4 heads, sequence 8): layer norm and softmax attention before
    every kink."""
    torch.manual_seed(0)
    model = SmallEncoder(width=32, layers=1, heads=4).to(dtype).eval()
    x = torch.randn(ENCODER_BATCH, 8, 32, dtype=dtype)
    with torch.no_grad():
        target = model(x).argmax(1)
    ig = igfast.IntegratedGradients(model)
    name = f"ReLU-FFN encoder (8x32, 1 layer, batch {ENCODER_BATCH})"
    return name, lambda **kw: ig.attribute(x, target=target, **kw)


def problem(key: str, batch: int, dtype: torch.dtype, seed: int = 0):
    """(name, attribute(**kwargs)) of a workload at one dtype; the MLP and CNN workloads
    take another ``seed`` for their weights and inputs (bench_jump_errors --seed)."""
    if key == "minilm":
        return minilm_problem(dtype)
    if key == "relu_encoder":
        return encoder_problem(dtype)
    model, x, baseline, _ = WORKLOADS["cnn" if key == "cnn" else "mlp"].build("cpu", seed=seed)
    if key == "softmax_mlp":
        model = SoftmaxHead(model).eval()
    if key == "gelu_mlp":  # the same MLP, smooth: GELU for ReLU
        for index, module in enumerate(model.net):
            if isinstance(module, nn.ReLU):
                model.net[index] = nn.GELU()
    if key == "tanh_mlp":  # the same MLP, mixed: tanh for its first ReLU
        model.net[1] = nn.Tanh()
    x, baseline = x[:batch].to(dtype), baseline[:batch].to(dtype)
    model = model.to(dtype)
    with torch.no_grad():
        target = model(x).argmax(1)
    ig = igfast.IntegratedGradients(model)
    shape = "x".join(map(str, x.shape[1:]))
    name = {"mlp": "MLP", "softmax_mlp": "MLP + softmax head", "cnn": "CNN", "gelu_mlp": "GELU MLP",
            "tanh_mlp": "tanh-then-ReLU MLP"}[key]
    drawn = f", seed {seed}" if seed else ""
    return f"{name} ({shape}, batch {batch}{drawn})", lambda **kw: ig.attribute(x, baseline, target=target, **kw)


def worst_error(attributions: torch.Tensor, reference: torch.Tensor) -> float:
    per_example = (attributions - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1)
    return float(per_example.max())


def fewest_gl_steps(attribute: Callable, reference: torch.Tensor, tol: float, cache: Dict[int, float],
                    limit: int) -> int:
    def error(n: int) -> float:
        if n not in cache:
            cache[n] = worst_error(attribute(n_steps=n), reference)
        return cache[n]

    n = 1
    while error(n) > tol:
        if n >= limit:
            return -1
        n = min(2 * n, limit)
    low, high = n // 2, n  # low misses (or is 0), high meets
    while high - low > max(1, high // 32):
        middle = (low + high) // 2
        if error(middle) <= tol:
            high = middle
        else:
            low = middle
    return high


def auto_for(attribute: Callable, reference: torch.Tensor, tol: float, sweep: List[Dict[str, Any]]) -> Dict[str, Any]:
    tolerance = tol
    for _ in range(8):
        attributions, info = attribute(n_steps="auto", tolerance=tolerance, max_steps=16385, return_adaptive_info=True)
        point = {"tolerance": tolerance, "mean_evaluations": float(info.evaluations.double().mean()),
                 "worst_error": worst_error(attributions, reference),
                 "reported_converged": float(info.converged.double().mean()),
                 "exact_share": float(info.exact.double().mean())}
        sweep.append(point)
        if point["worst_error"] <= tol:
            return point
        tolerance /= 2
    return point


def rule_rows(attribute: Callable, reference: torch.Tensor, tolerances, limit: int, gl_cache: Dict[int, float],
              auto_sweep: List[Dict[str, Any]], exact_text: str) -> List[Dict[str, Any]]:
    """Per tolerance: the fewest fixed GL steps and auto's run that meet it."""
    rows = []
    for tol in tolerances:
        n = fewest_gl_steps(attribute, reference, tol, gl_cache, limit)
        auto = auto_for(attribute, reference, tol, auto_sweep)
        rows.append({"tol": tol, "gl_steps": n, "auto": auto})
        print(f"  tol {tol:.0e}: GL {n} steps, auto {auto['mean_evaluations']:.1f} evals at tolerance "
              f"{auto['tolerance']:.1e} (worst error {auto['worst_error']:.1e}){exact_text}", flush=True)
    return rows


def time_rules(key: str, batch: int, rows: List[Dict[str, Any]], repeats: int, with_exact: bool) -> None:
    """Float32 times of GL and auto per tolerance (and exact once, or gausslegendre_pieces
    per tolerance), interleaved, into rows."""
    _, attribute32 = problem(key, batch, torch.float32)
    variants = {"exact": lambda: attribute32(method="exact")} if with_exact else {}
    if with_exact:  # the same walk without the compiled kernels (ops.scalar_kinks, ops.overtakings, ...)
        def exact_pure():
            with ops.kernels_disabled():
                return attribute32(method="exact")
        variants["exact_pure"] = exact_pure
    for row in rows:
        if row.get("piece_steps", -1) > 0:
            variants[f"pieces{row['piece_steps']}"] = (lambda n: lambda: attribute32(
                method="gausslegendre_pieces", n_steps=n))(row["piece_steps"])
        if row["gl_steps"] > 0:
            variants[f"gl{row['gl_steps']}"] = (lambda n: lambda: attribute32(n_steps=n))(row["gl_steps"])
        tolerance = row["auto"]["tolerance"]
        variants[f"auto{tolerance:.1e}"] = (lambda t: lambda: attribute32(n_steps="auto", tolerance=t,
                                                                          max_steps=16385))(tolerance)
    seconds = interleaved_medians(variants, repeats=repeats, device="cpu", warmup=repeats > 1)
    for row in rows:
        row["gl_seconds"] = seconds.get(f"gl{row['gl_steps']}")
        row["auto_seconds"] = seconds[f"auto{row['auto']['tolerance']:.1e}"]
        row["exact_seconds"] = seconds.get("exact", seconds.get(f"pieces{row.get('piece_steps')}"))
        row["exact_pure_seconds"] = seconds.get("exact_pure")


def run_workload(key: str, batch: int, tolerances, repeats: int) -> Dict[str, Any]:
    name, attribute = problem(key, batch, torch.float64)
    print(f"{name}:", flush=True)
    if key in SMOOTH:
        return run_smooth_workload(key, name, batch, attribute, tolerances, repeats)
    if key in MIXED:
        return run_mixed_workload(key, name, batch, attribute, tolerances, repeats)
    started = time.perf_counter()
    reference, delta, info = attribute(method="exact", return_convergence_delta=True, return_adaptive_info=True)
    exact_seconds64 = time.perf_counter() - started
    with torch.no_grad():
        scale = reference.flatten(1).abs().sum(1)
    completeness = float((delta.abs() / scale).max())
    exact_evaluations = float(info.evaluations.double().mean())
    head = info.head_error_estimate
    print(f"  exact: {float(info.pieces.double().mean()):.1f} pieces mean, {int(info.pieces.max())} max, "
          f"completeness {completeness:.1e} relative, {exact_seconds64:.1f} s in float64"
          + (f", head error estimate {float(head.max()):.1e} (worst example)" if head is not None else ""),
          flush=True)
    limit = 65536 if key != "cnn" else 16384
    gl_cache: Dict[int, float] = {}
    auto_sweep: List[Dict[str, Any]] = []
    rows = rule_rows(attribute, reference, tolerances, limit, gl_cache, auto_sweep, f", exact {exact_evaluations:.1f}")
    time_rules(key, batch, rows, repeats, with_exact=True)
    exact_s, pure_s = rows[0]["exact_seconds"], rows[0]["exact_pure_seconds"]
    print(f"  exact in float32: {exact_s:.3f} s; without the compiled kernels (pure PyTorch, "
          f"ops.kernels_disabled()) {pure_s:.3f} s: the kernels {pure_s / exact_s:.2f}x faster", flush=True)
    # The error curves of the fixed rules (float64), for the plot.
    curves = {"gausslegendre": sorted(gl_cache.items())}
    trapezoid = []
    for n in (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096):
        if n <= limit // 4:
            trapezoid.append((n, worst_error(attribute(n_steps=n, method="riemann_trapezoid"), reference)))
    curves["riemann_trapezoid"] = trapezoid
    curves["auto"] = sorted((p["mean_evaluations"], p["worst_error"]) for p in auto_sweep)
    return {"workload": name, "key": key, "exact_pieces_mean": float(info.pieces.double().mean()),
            "exact_pieces_max": int(info.pieces.max()), "exact_evaluations": exact_evaluations,
            "exact_completeness": completeness, "smooth_head": info.smooth_head,
            "head_error_estimate": float(head.max()) if head is not None else None, "rows": rows, "curves": curves}


def run_smooth_workload(key, name, batch, attribute, tolerances, repeats) -> Dict[str, Any]:
    """A smooth network: fixed GL and auto against a converged GL reference (no exact IG)."""
    reference = attribute(n_steps=SMOOTH_REFERENCE_STEPS)
    print(f"  reference: GL {SMOOTH_REFERENCE_STEPS}, differs from GL {SMOOTH_REFERENCE_STEPS // 2} by "
          f"{worst_error(attribute(n_steps=SMOOTH_REFERENCE_STEPS // 2), reference):.1e}", flush=True)
    gl_cache: Dict[int, float] = {}
    auto_sweep: List[Dict[str, Any]] = []
    rows = rule_rows(attribute, reference, tolerances, 4096, gl_cache, auto_sweep, "")
    time_rules(key, batch, rows, repeats, with_exact=False)
    curves = {"gausslegendre": sorted(gl_cache.items()),
              "auto": sorted((p["mean_evaluations"], p["worst_error"]) for p in auto_sweep)}
    return {"workload": name, "key": key, "exact_pieces_mean": None, "exact_pieces_max": None,
            "exact_evaluations": None, "exact_completeness": None, "smooth_head": None,
            "head_error_estimate": None, "rows": rows, "curves": curves}


def pieces_with(attribute: Callable, nodes_per_piece: int, spread: int, **kwargs):
    """method="gausslegendre_pieces" with another number of Gauss nodes per piece (for
    the reference only: the method's own is fixed)."""
    saved = igfast.exact.GAUSS_NODES_PER_PIECE
    igfast.exact.GAUSS_NODES_PER_PIECE = nodes_per_piece
    try:
        return attribute(method="gausslegendre_pieces", n_steps=spread, **kwargs)
    finally:
        igfast.exact.GAUSS_NODES_PER_PIECE = saved


def fewest_piece_steps(attribute: Callable, reference: torch.Tensor, tol: float,
                       cache: Dict[int, Dict[str, float]]) -> Dict[str, Any]:
    """The fewest n_steps (doubling from 1) with which gausslegendre_pieces puts every
    example within tol, and its evaluations."""
    n = 1
    while True:
        if n not in cache:
            attributions, info = attribute(method="gausslegendre_pieces", n_steps=n, return_adaptive_info=True)
            cache[n] = {"worst_error": worst_error(attributions, reference),
                        "mean_evaluations": float(info.evaluations.double().mean()),
                        "pieces": float(info.pieces.double().mean())}
        if cache[n]["worst_error"] <= tol or n >= 4096:
            return {"steps": n if cache[n]["worst_error"] <= tol else -1, **cache[n]}
        n *= 2


def run_mixed_workload(key, name, batch, attribute, tolerances, repeats) -> Dict[str, Any]:
    """A mixed network: fixed GL, auto and gausslegendre_pieces against a converged
    gausslegendre_pieces reference."""
    started = time.perf_counter()
    reference, info = pieces_with(attribute, REFERENCE_NODES_PER_PIECE, REFERENCE_SPREAD, return_adaptive_info=True)
    check = pieces_with(attribute, 6, REFERENCE_SPREAD // 2)
    print(f"  reference: gausslegendre_pieces, {REFERENCE_NODES_PER_PIECE} nodes per piece, n_steps "
          f"{REFERENCE_SPREAD}: {float(info.pieces.double().mean()):.1f} pieces mean, {int(info.pieces.max())} max, "
          f"{time.perf_counter() - started:.1f} s; differs from 6 nodes and n_steps {REFERENCE_SPREAD // 2} by "
          f"{worst_error(check, reference):.1e}", flush=True)
    gl_cache: Dict[int, float] = {}
    piece_cache: Dict[int, Dict[str, float]] = {}
    auto_sweep: List[Dict[str, Any]] = []
    rows = rule_rows(attribute, reference, tolerances, 16384, gl_cache, auto_sweep, "")
    for row in rows:
        pieces = fewest_piece_steps(attribute, reference, row["tol"], piece_cache)
        row["piece_steps"], row["piece_evaluations"] = pieces["steps"], pieces["mean_evaluations"]
        print(f"  tol {row['tol']:.0e}: gausslegendre_pieces n_steps {pieces['steps']}, "
              f"{pieces['mean_evaluations']:.1f} evals (worst error {pieces['worst_error']:.1e})", flush=True)
    time_rules(key, batch, rows, repeats, with_exact=False)
    curves = {"gausslegendre": sorted(gl_cache.items()),
              "auto": sorted((p["mean_evaluations"], p["worst_error"]) for p in auto_sweep),
              "gausslegendre_pieces": sorted((p["mean_evaluations"], p["worst_error"]) for p in piece_cache.values())}
    return {"workload": f"{name}: gausslegendre_pieces", "key": key,
            "exact_pieces_mean": float(info.pieces.double().mean()), "exact_pieces_max": int(info.pieces.max()),
            "exact_evaluations": None, "exact_completeness": None, "smooth_head": None,
            "head_error_estimate": None, "rows": rows, "curves": curves}


def print_table(results: List[Dict[str, Any]]) -> None:
    print()
    print("| workload | tol | fixed GL: steps | auto: evaluations (tolerance used) | auto: walked exactly | "
          "exact (mixed: gausslegendre_pieces): evaluations | GL / exact evals | GL / auto evals | GL s | auto s | "
          "exact s | GL / exact time | "
          "GL / auto time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for row in r["rows"]:
            n, auto = row["gl_steps"], row["auto"]
            exact = r["exact_evaluations"] or (row.get("piece_evaluations") if row.get("piece_steps", -1) > 0 else None)
            gl_text = str(n) if n > 0 else "> limit"
            ratio_exact = f"{n / exact:.2f}x" if n > 0 and exact else "-"
            ratio_auto = f"{n / auto['mean_evaluations']:.2f}x" if n > 0 else "-"
            gl_s = f"{row['gl_seconds']:.3f}" if row["gl_seconds"] else "-"
            exact_text = (f"{exact:.1f}" + (f" (n_steps {row['piece_steps']})" if row.get("piece_steps") else "")
                          if exact else "- (smooth)")
            exact_s = f"{row['exact_seconds']:.3f}" if row["exact_seconds"] else "-"
            time_ratio = f"{row['gl_seconds'] / row['exact_seconds']:.2f}x" if row["gl_seconds"] and exact else "-"
            auto_time_ratio = f"{row['gl_seconds'] / row['auto_seconds']:.2f}x" if row["gl_seconds"] else "-"
            print(f"| {r['workload']} | {row['tol']:.0e} | {gl_text} | {auto['mean_evaluations']:.1f} "
                  f"({auto['tolerance']:.1e}) | {100 * auto['exact_share']:.0f}% | {exact_text} | "
                  f"{ratio_exact} | {ratio_auto} | {gl_s} | {row['auto_seconds']:.3f} | {exact_s} | "
                  f"{time_ratio} | {auto_time_ratio} |")
    print()
    for r in (r for r in results if r["key"] in MIXED):
        print(f"{r['workload']}: {r['exact_pieces_mean']:.1f} pieces mean, {r['exact_pieces_max']} max (kinks after "
              "smooth ops, located by Newton steps); 3 Gauss nodes per piece, pieces longer than 3/n_steps cut")
    for r in (r for r in results if r["exact_evaluations"]):
        print(f"{r['workload']}: {r['exact_pieces_mean']:.1f} pieces mean, {r['exact_pieces_max']} max; "
              f"exact completeness {r['exact_completeness']:.1e} relative (float64)"
              + (f"; smooth head {r['smooth_head']}, 3 Gauss nodes per piece, head error estimate "
                 f"{r['head_error_estimate']:.1e} (the midpoint rule's; the Gauss rule's error is far smaller)"
                 if r["smooth_head"] else ""))


def plot(results: List[Dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for axis, r in zip(axes[0], results):
        for label, points in r["curves"].items():
            if points:
                xs, ys = zip(*points)
                axis.loglog(xs, [max(y, 1e-17) for y in ys], "o-" if label != "auto" else "s--", label=label,
                            markersize=3)
        if r["exact_evaluations"]:
            axis.loglog([r["exact_evaluations"]], [max(r["exact_completeness"], 1e-17)], "k*", markersize=12,
                        label="exact")
        for tol in TOLERANCES:
            axis.axhline(tol, color="grey", linewidth=0.5)
        axis.set_title(r["workload"], fontsize=9)
        axis.set_xlabel("evaluations per example")
        axis.set_ylabel("worst relative L2 error")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="MLP batch 8, tolerance 1e-3, one timing (CI smoke)")
    parser.add_argument("--workloads", default=None,
                        help="comma-separated: mlp,softmax_mlp,cnn,gelu_mlp,minilm,tanh_mlp,relu_encoder")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--plot", default=None, help="write the error-versus-evaluations plot here (.png)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    keys = args.workloads.split(",") if args.workloads else (
        ["mlp"] if args.quick else ["mlp", "softmax_mlp", "cnn", "gelu_mlp", "minilm", "tanh_mlp", "relu_encoder"])
    if "minilm" in keys and minilm_available() and not args.workloads:
        print(f"MiniLM left out: {minilm_available()}")
        keys.remove("minilm")
    results = []
    for key in keys:
        batch = 8 if args.quick else {"mlp": 64, "softmax_mlp": 64, "cnn": 2, "gelu_mlp": 64, "minilm": MINILM_BATCH,
                                      "tanh_mlp": 32, "relu_encoder": ENCODER_BATCH}[key]
        results.append(run_workload(key, batch, (1e-3,) if args.quick else TOLERANCES, 1 if args.quick else 3))
    print_table(results)
    if args.plot:
        plot(results, args.plot)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
