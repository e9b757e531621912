"""Peak memory and time: igfast against Captum against the floor.

The floor is the model's own cost at the same chunk: one forward and one backward
(input gradients) over a chunk of the same number of path rows, plus one
(batch, ...) accumulator. Every case runs in a fresh process, so one case's
allocator state never inflates another's. Two peaks are reported per case, both
above the memory in use just before the call:

- allocated: bytes PyTorch's allocator handed out (igfast.bench.peak: the
  profiler's allocation events on CPU, torch.cuda.max_memory_allocated on a GPU);
- RSS (CPU): the peak resident set of the process (VmHWM, reset before the call).

Cases: (a) the small CNN at n_steps 200 and 500, batch 16, with and without
internal_batch_size, and under a memory budget; (b) a transformer encoder
(sequence 256, width 256, 4 layers) at batch 32, n_steps 100, under a budget that
Captum meets only with internal_batch_size = batch (one step per chunk, its
minimum), and under a budget below one step of the batch, which Captum cannot meet.

    python benchmarks/bench_memory.py                 # everything (CPU: ~15 min)
    python benchmarks/bench_memory.py --quick         # the CNN at 50 steps (seconds)
    python benchmarks/bench_memory.py --json out.json --device cuda
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from igfast.bench.workloads import WORKLOADS  # noqa: E402

HERE = os.path.abspath(__file__)
# The floor's time is its median chunk time times the number of chunks; this
# many chunks are timed (the peak is reached by the first).
FLOOR_TIMED_CHUNKS = 5


# ---------------------------------------------------------------- measuring ---

def _status_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class _Peaks:
    """Peak allocated bytes and peak RSS above the start of the block."""

    def __init__(self, device):
        self.device = torch.device(device)

    def __enter__(self):
        from igfast.bench.peak import AllocationPeak

        if self.device.type == "cpu":
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # resets VmHWM to the current RSS
            self.rss_start = _status_kib("VmRSS")
        self.meter = AllocationPeak(self.device).__enter__()
        return self

    def __exit__(self, *exc):
        self.meter.__exit__(*exc)
        self.allocated = self.meter.bytes
        self.rss = (_status_kib("VmHWM") - self.rss_start) * 1024 if self.device.type == "cpu" else None


def _synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _floor_run(model, x, baseline, target, n_steps, rows):
    """Chunks of `rows` path rows: forward, backward, one accumulator. Returns the
    number of chunks and a callable that runs chunk i."""
    batch = x.shape[0]
    features = x[0].numel()
    total = n_steps * batch
    accumulator = torch.zeros_like(x)
    unit_alphas = torch.linspace(0, 1, n_steps, device=x.device)

    def chunk(index):
        start = index * rows
        count = min(rows, total - start)
        node = torch.arange(start, start + count, device=x.device)
        alpha = unit_alphas[node // batch].view((-1,) + (1,) * (x.dim() - 1))
        example = node % batch
        path = (baseline[example] + alpha * (x[example] - baseline[example])).requires_grad_()
        output = model(path).gather(1, target[example].unsqueeze(1)).squeeze(1)
        grad = torch.autograd.grad(output, path, grad_outputs=torch.ones_like(output))[0]
        accumulator.view(batch, features).index_add_(0, example, grad.view(count, features))

    return (total + rows - 1) // rows, chunk


def run_case(spec):
    """One case in this process: the peak and time of one call (after a warm-up
    call unless spec["warmup"] is False)."""
    torch.set_num_threads(spec["threads"])
    device = spec["device"]
    model, x, baseline, target = WORKLOADS[spec["workload"]].build(device)
    n_steps = spec["n_steps"]
    result = {}
    if spec["library"] == "floor":
        chunks, chunk = _floor_run(model, x, baseline, target, n_steps, spec["rows"])
        timed = min(chunks, FLOOR_TIMED_CHUNKS)
        chunk(0)  # warm-up
        times = []
        with _Peaks(device) as peaks:
            for index in range(timed):
                _synchronize(device)
                start = time.perf_counter()
                chunk(index)
                _synchronize(device)
                times.append(time.perf_counter() - start)
        seconds = statistics.median(times) * chunks
        result.update(chunks=chunks, max_rows=spec["rows"])
    else:
        if spec["library"] == "igfast":
            import igfast

            explainer = igfast.IntegratedGradients(model)
            extra = {"memory_budget": spec.get("budget")}
        else:
            from captum.attr import IntegratedGradients

            explainer = IntegratedGradients(model)
            extra = {}

        def call():
            return explainer.attribute(x, baseline, target=target, n_steps=n_steps,
                                       internal_batch_size=spec.get("ibs"), **extra)

        if spec.get("warmup", True):
            call()
        _synchronize(device)
        start = time.perf_counter()
        with _Peaks(device) as peaks:
            attributions = call()
            _synchronize(device)
        seconds = time.perf_counter() - start
        result["checksum"] = [float(attributions.double().sum()), float(attributions.double().abs().sum())]
        if spec["library"] == "igfast":
            rows = [c.rows for c in explainer.last_integral.chunks]
            result.update(chunks=len(rows), max_rows=max(rows))
        else:
            ibs = spec.get("ibs")
            total = n_steps * x.shape[0]
            per_chunk = total if ibs is None else max(1, ibs // x.shape[0]) * x.shape[0]
            result.update(chunks=(total + per_chunk - 1) // per_chunk, max_rows=per_chunk)
    result.update(seconds=seconds, allocated=peaks.allocated, rss=peaks.rss)
    return result


def _in_fresh_process(spec):
    completed = subprocess.run(
        [sys.executable, HERE, "--worker", json.dumps(spec)], capture_output=True, text=True
    )
    if completed.returncode != 0:
        raise RuntimeError(f"case {spec} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ the grid ---

def _mib(value):
    return "-" if value is None else f"{value / 2**20:.1f}"


def cases(args):
    """(group, label, spec) for every case, floors added after their variant."""
    base = dict(device=args.device, threads=args.threads)
    grid = []
    if args.quick:
        cnn_steps = [50]
    else:
        cnn_steps = [200, 500]
    for n_steps in cnn_steps:
        group = f"cnn, batch 16, n_steps {n_steps}"
        cnn = dict(base, workload="cnn", n_steps=n_steps)
        grid += [
            (group, "captum", dict(cnn, library="captum")),
            (group, "igfast (default: automatic budget)", dict(cnn, library="igfast")),
            (group, "captum, internal_batch_size=320", dict(cnn, library="captum", ibs=320)),
            (group, "igfast, internal_batch_size=320", dict(cnn, library="igfast", ibs=320)),
            (group, "igfast, memory_budget=64MiB", dict(cnn, library="igfast", budget="64MiB")),
            (group, "igfast, memory_budget=16MiB", dict(cnn, library="igfast", budget="16MiB")),
        ]
    if not args.quick and not args.skip_encoder:
        group = f"encoder, batch 32, n_steps {args.encoder_steps}"
        encoder = dict(base, workload="encoder", n_steps=args.encoder_steps, warmup=False)
        grid += [
            (group, "captum, internal_batch_size=32 (its minimum)", dict(encoder, library="captum", ibs=32)),
            (group, "igfast, memory_budget=<captum's peak>", dict(encoder, library="igfast", budget="@captum")),
            (group, "igfast, memory_budget=<1/4 of captum's peak>", dict(encoder, library="igfast", budget="@captum/4")),
        ]
    return grid


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--encoder-steps", type=int, default=100)
    parser.add_argument("--skip-encoder", action="store_true")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_case(json.loads(args.worker))))
        return

    rows = []
    captum_peak = {}
    header = (f"{'case':46} {'chunks':>6} {'rows':>6} {'alloc MiB':>9} {'RSS MiB':>8} "
              f"{'/floor':>6} {'time s':>8} {'/floor':>6}")
    current_group = None
    for group, label, spec in cases(args):
        if group != current_group:
            print(f"\n{group}\n{header}", flush=True)
            current_group = group
        if isinstance(spec.get("budget"), str) and spec["budget"].startswith("@captum"):
            divisor = int(spec["budget"].split("/")[1]) if "/" in spec["budget"] else 1
            spec["budget"] = captum_peak[group] // divisor
            label = label.replace("<captum's peak>", _mib(spec["budget"]) + "MiB").replace(
                "<1/4 of captum's peak>", _mib(spec["budget"]) + "MiB")
        measured = _in_fresh_process(spec)
        if spec["library"] == "captum":
            captum_peak.setdefault(group, measured["allocated"])
        floor = _in_fresh_process(dict(spec, library="floor", rows=measured["max_rows"]))
        row = dict(group=group, case=label, spec=spec, result=measured, floor=floor,
                   allocated_over_floor=measured["allocated"] / max(1, floor["allocated"]),
                   time_over_floor=measured["seconds"] / floor["seconds"])
        if spec.get("budget") is not None:
            row["budget"] = spec["budget"] if isinstance(spec["budget"], int) else spec["budget"]
        rows.append(row)
        print(f"{label:46} {measured['chunks']:>6} {measured['max_rows']:>6} {_mib(measured['allocated']):>9} "
              f"{_mib(measured['rss']):>8} {row['allocated_over_floor']:>6.2f} {measured['seconds']:>8.2f} "
              f"{row['time_over_floor']:>6.2f}", flush=True)
        print(f"{'  floor at ' + str(measured['max_rows']) + ' rows':46} {floor['chunks']:>6} "
              f"{floor['max_rows']:>6} {_mib(floor['allocated']):>9} {_mib(floor['rss']):>8} "
              f"{'':>6} {floor['seconds']:>8.2f}", flush=True)
    # Same attributions from every variant of a group (checked, not assumed).
    for group in {r["group"] for r in rows}:
        sums = [r["result"]["checksum"] for r in rows if r["group"] == group]
        for total, magnitude in sums[1:]:
            assert abs(total - sums[0][0]) <= 1e-4 * sums[0][1], (group, sums)
            assert abs(magnitude - sums[0][1]) <= 1e-4 * sums[0][1], (group, sums)
    print("\nattributions agree within 1e-4 (relative to their L1 norm) in every group")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(dict(device=args.device, threads=args.threads, torch=torch.__version__, rows=rows),
                      out, indent=1)


if __name__ == "__main__":
    main()
