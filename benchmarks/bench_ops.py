"""The fused ops against the plain-PyTorch expression and against Captum's
construction, for 1e4 to 1e8 path elements: median time and effective GB/s.

  interpolate_path   kernel | reference.interpolate_path (addcmul) |
                     Captum: torch.cat([b + a * (x - b) for a in alphas])
  accumulate_steps   kernel | reference.accumulate_steps (addmv) |
                     Captum: (g.view(k, -1) * w.view(k, 1)).view(k, B, ...).sum(0)
  copy               the device's copy bandwidth over the same bytes (reference line)

Elements = k * B * F path (or gradient) elements, k = 50 steps. Variants run
interleaved, single-threaded on CPU, and are checked against each other first.

    python benchmarks/bench_ops.py [--device cuda] [--max-elements 1e8] [--json FILE]
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from igfast import ops, reference  # noqa: E402
from igfast.bench.timing import interleaved_medians  # noqa: E402

STEPS = 50


def bench_size(elements, device, repeats):
    batch = 8
    features = max(1, elements // (STEPS * batch))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, features, generator=g).to(device)
    b = torch.randn(1, features, generator=g).to(device)
    alphas = torch.rand(STEPS, generator=g, dtype=torch.float64).to(device)
    alpha_list = alphas.tolist()
    grads = torch.randn(STEPS * batch, features, generator=g).to(device)
    weights = torch.rand(STEPS, generator=g, dtype=torch.float64).to(device)
    weights32 = weights.float()
    acc = torch.zeros(batch, features, device=device)
    n = STEPS * batch * features
    rows = []

    interpolate = {
        "kernel": lambda: torch.ops.igfast.interpolate_path(x, b, alphas, 0, STEPS),
        "pytorch": lambda: reference.interpolate_path(x, b, alphas, 0, STEPS),
        "captum": lambda: torch.cat([b + a * (x - b) for a in alpha_list], dim=0),
        "copy": lambda: grads.clone(),
    }
    torch.testing.assert_close(interpolate["kernel"](), interpolate["captum"](), rtol=1e-5, atol=1e-5)
    interpolate_bytes = 4 * (n + 2 * batch * features)
    accumulate = {
        "kernel": lambda: torch.ops.igfast.accumulate_steps(acc, grads, weights),
        "pytorch": lambda: reference.accumulate_steps(acc, grads, weights),
        "captum": lambda: (grads.view(STEPS, -1) * weights32.view(STEPS, 1)).view(STEPS, batch, features).sum(0),
        "copy": lambda: grads.clone(),
    }
    check_kernel, check_reference = torch.zeros_like(acc), torch.zeros_like(acc)
    torch.ops.igfast.accumulate_steps(check_kernel, grads, weights)
    reference.accumulate_steps(check_reference, grads, weights)
    torch.testing.assert_close(check_kernel, check_reference, rtol=1e-5, atol=1e-5)
    accumulate_bytes = 4 * (n + 2 * batch * features)
    for op, variants, nbytes in (("interpolate_path", interpolate, interpolate_bytes),
                                 ("accumulate_steps", accumulate, accumulate_bytes)):
        medians = interleaved_medians(variants, repeats, device)
        copy_gbs = 2 * 4 * n / medians["copy"] / 1e9
        row = {"op": op, "elements": n, "device": device}
        for name in ("kernel", "pytorch", "captum"):
            row[f"{name}_ms"] = 1e3 * medians[name]
            row[f"{name}_GBps"] = nbytes / medians[name] / 1e9
        row["copy_GBps"] = copy_gbs
        row["kernel_over_copy_bandwidth"] = row["kernel_GBps"] / copy_gbs
        row["pytorch_over_kernel_time"] = medians["pytorch"] / medians["kernel"]
        row["captum_over_kernel_time"] = medians["captum"] / medians["kernel"]
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--max-elements", type=float, default=1e8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not ops.kernels_available(args.device):
        parser.error(f"the igfast kernels are not available on {args.device}: {ops.why_not_kernels(args.device)}")
    sizes = [int(10 ** e) for e in range(4, 9) if 10 ** e <= args.max_elements]
    print(f"device {args.device}, threads {args.threads}, k = {STEPS} steps, medians; GB/s = bytes the op must move / time")
    header = f"{'op':17} {'elements':>9} {'kernel ms':>10} {'pytorch ms':>10} {'captum ms':>10} {'kern GB/s':>9} {'copy GB/s':>9} {'pt/kern':>7} {'cap/kern':>8}"
    print(header + "\n" + "-" * len(header))
    rows = []
    for n in sizes:
        repeats = 21 if n <= 1e6 else (7 if n <= 1e7 else 3)
        for row in bench_size(n, args.device, repeats):
            rows.append(row)
            print(f"{row['op']:17} {n:9.0e} {row['kernel_ms']:10.3f} {row['pytorch_ms']:10.3f} {row['captum_ms']:10.3f} "
                  f"{row['kernel_GBps']:9.2f} {row['copy_GBps']:9.2f} {row['pytorch_over_kernel_time']:7.2f} {row['captum_over_kernel_time']:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
