"""igfast against Captum against the model's own forward+backward floor.

For each workload, n_steps and method, the variants run interleaved (floor, igfast
with its kernels, igfast on the pure-PyTorch path, Captum, each round in a new
random order), after
a correctness check, single-threaded; the table gives median times and ratios of
medians ("speedup" is Captum's time over igfast's).

    python benchmarks/bench_ig.py            # the full grid
    python benchmarks/bench_ig.py --quick    # a smoke run (seconds)
    python benchmarks/bench_ig.py --json out.json
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import igfast  # noqa: E402
from igfast import ops  # noqa: E402
from igfast.bench.timing import interleaved_medians, repeats_for  # noqa: E402
from igfast.bench.workloads import WORKLOADS, input_path_floor  # noqa: E402

try:
    from captum.attr import IntegratedGradients as CaptumIG
except ImportError:  # the table then shows igfast and the floor only
    CaptumIG = None


def bench(workload_key, n_steps, method, repeats, device):
    model, x, baseline, target = WORKLOADS[workload_key].build(device)
    ours = igfast.IntegratedGradients(model)
    variants = {
        "floor": input_path_floor(model, x, baseline, target, n_steps, method),
        "igfast": lambda: ours.attribute(x, baseline, target=target, n_steps=n_steps, method=method),
    }
    if ops.kernels_available(device):
        def pure():
            with ops.kernels_disabled():
                return ours.attribute(x, baseline, target=target, n_steps=n_steps, method=method)
        variants["igfast_pure"] = pure
    if CaptumIG is not None:
        theirs = CaptumIG(model)
        variants["captum"] = lambda: theirs.attribute(x, baseline, target=target, n_steps=n_steps, method=method)
        difference = (variants["igfast"]() - variants["captum"]().detach()).abs().max().item()
        assert difference < 1e-4, f"igfast and Captum disagree by {difference}"
    if repeats is None:  # cheap workloads get more rounds: their timings are noisier
        slowest = variants.get("captum", variants["igfast"])
        repeats = repeats_for(slowest, device, budget_seconds=2.0, minimum=15, maximum=301)
    medians = interleaved_medians(variants, repeats, device)
    row = {"workload": workload_key, "n_steps": n_steps, "method": method, "device": device,
           **{f"{name}_ms": 1e3 * t for name, t in medians.items()},
           "igfast_over_floor": medians["igfast"] / medians["floor"]}
    if "igfast_pure" in medians:
        row["pure_over_floor"] = medians["igfast_pure"] / medians["floor"]
    if "captum" in medians:
        row["captum_over_floor"] = medians["captum"] / medians["floor"]
        row["speedup_over_captum"] = medians["captum"] / medians["igfast"]
    return row


def print_table(rows):
    header = (f"{'workload':9} {'steps':>5} {'method':18} {'floor ms':>9} {'igfast ms':>9} {'captum ms':>9} "
              f"{'ig/floor':>8} {'pure/floor':>10} {'cap/floor':>9} {'speedup':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        captum = (f"{r['captum_ms']:9.2f} {'':0}" if "captum_ms" in r else f"{'-':>9} ")
        print(f"{r['workload']:9} {r['n_steps']:5d} {r['method']:18} {r['floor_ms']:9.2f} {r['igfast_ms']:9.2f} "
              f"{captum}{r['igfast_over_floor']:8.2f} {r.get('pure_over_floor', float('nan')):10.2f} "
              f"{r.get('captum_over_floor', float('nan')):9.2f} "
              f"{r.get('speedup_over_captum', float('nan')):7.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few sizes and repeats (a smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds per configuration (default: by cost)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps CPU timings stable)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--workloads", default="mlp,cnn",
                        help=f"comma-separated, from {','.join(WORKLOADS)} (the encoder takes minutes per case on CPU)")
    args = parser.parse_args(argv)
    names = args.workloads.split(",")
    unknown = [name for name in names if name not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose from {list(WORKLOADS)}")
    torch.set_num_threads(args.threads)
    steps = [16] if args.quick else [16, 50, 200]
    methods = ["gausslegendre"] if args.quick else ["gausslegendre", "riemann_trapezoid"]
    repeats = args.repeats or (3 if args.quick else None)
    rounds = f"{repeats} rounds" if repeats else "15 to 301 rounds (about 2 s of the slowest variant)"
    print(f"igfast {igfast.__version__} ({igfast.info()['path']}), torch {torch.__version__}, "
          f"device {args.device}, threads {args.threads}, {rounds}, interleaved in random order, medians")
    rows = [bench(w, n, m, repeats, args.device) for w in names for n in steps for m in methods]
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
