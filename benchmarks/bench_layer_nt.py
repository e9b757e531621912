"""LayerIntegratedGradients and NoiseTunnel: igfast against Captum against the floor.

Two workloads, each run in one process with its variants interleaved (medians of
the timed rounds; peak memory from a first, untimed round of every variant):

- LayerIG on all-MiniLM-L6-v2's embeddings (the cosine-similarity task of
  igfast.examples.minilm), batch 8, sequence 64, n_steps 50, with the delta;
- NoiseTunnel(IntegratedGradients), smoothgrad, nt_samples 10 on the small CNN
  (3x32x32, batch 16), n_steps 50; Captum both with all samples in one IG call
  (its default) and with nt_samples_batch_size=1 (its low-memory setting).

The floor is the model's own forward and backward over every path row in one
call: what any implementation must at least compute. Model calls are counted for
every variant. Peak memory is the most bytes allocated above the start (CPU:
igfast's allocator meter, which sees every tensor of any library; CUDA:
max_memory_allocated).

    python benchmarks/bench_layer_nt.py           # the full run (CPU: about 10 minutes)
    python benchmarks/bench_layer_nt.py --quick   # a smoke run (seconds)
    python benchmarks/bench_layer_nt.py --device cuda --json out.json
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import igfast  # noqa: E402
from igfast.bench.peak import peak_of  # noqa: E402
from igfast.memory import format_size  # noqa: E402
from igfast.bench.timing import interleaved_medians  # noqa: E402
from igfast.bench.workloads import WORKLOADS, layer_path_floor  # noqa: E402

try:
    import captum.attr as captum_attr
except ImportError:  # the table then shows igfast and the floor only
    captum_attr = None


class Counted(torch.nn.Module):
    """The model, counting its forward calls."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, *args):
        self.calls += 1
        return self.model(*args)


def measure(variants, counter, device, repeats):
    """Peak memory and model calls from one round, then interleaved timed rounds."""
    peaks, calls = {}, {}
    for name, run in variants.items():
        counter.calls = 0
        _, peaks[name] = peak_of(run, device)
        calls[name] = counter.calls
    medians = interleaved_medians(variants, repeats, device, warmup=False)
    return medians, peaks, calls


def minilm_case(quick, device, repeats):
    from igfast.examples import minilm

    batch, length, n_steps = (2, 16, 4) if quick else (8, 64, 50)
    sentences = (minilm.SENTENCES * 2)[:batch]
    references = (minilm.PAIRED_SENTENCES * 2)[:batch]
    task = minilm.similarity_task(sentences, references, length=length)
    model = Counted(task.model).to(device)
    inputs = task.inputs.to(device)
    kwargs = dict(baselines=task.baselines.to(device), target=None, n_steps=n_steps,
                  additional_forward_args=tuple(a.to(device) for a in task.additional_forward_args),
                  return_convergence_delta=True)
    layer = task.layer
    ours = igfast.LayerIntegratedGradients(model, layer)
    budget = "16MB" if quick else "64MB"

    floor = layer_path_floor(model, layer, inputs, kwargs["baselines"],
                             kwargs["additional_forward_args"], n_steps, "gausslegendre")

    variants = {
        "floor": floor,
        "igfast": lambda: ours.attribute(inputs, **kwargs),
        f"igfast budget {budget}": lambda: ours.attribute(inputs, memory_budget=budget, **kwargs),
    }
    if captum_attr is not None:
        theirs = captum_attr.LayerIntegratedGradients(model, layer)
        variants["captum"] = lambda: theirs.attribute(inputs, **kwargs)
        difference = (variants["igfast"]()[0] - variants["captum"]()[0]).abs().max().item()
        assert difference < 1e-4, f"igfast and Captum disagree by {difference}"
    name = f"LayerIG MiniLM-L6 embeddings, batch {batch}, seq {length}, n_steps {n_steps}"
    return name, measure(variants, model, device, repeats)


def noise_tunnel_case(quick, device, repeats):
    model, x, baseline, target = WORKLOADS["cnn"].build(device)
    model = Counted(model)
    nt_samples, n_steps = (3, 4) if quick else (10, 50)
    if quick:
        x, baseline, target = x[:4], baseline[:4], target[:4]
    kwargs = dict(nt_type="smoothgrad", nt_samples=nt_samples, stdevs=0.2, baselines=baseline,
                  target=target, n_steps=n_steps)

    def seeded(tunnel, **extra):
        def run():
            torch.manual_seed(0)
            return tunnel.attribute(x, **kwargs, **extra)
        return run

    rows = x.shape[0] * nt_samples * n_steps

    def floor():
        path = x.repeat(nt_samples * n_steps, 1, 1, 1).requires_grad_()
        output = model(path).gather(1, target.repeat(nt_samples * n_steps).unsqueeze(1)).squeeze(1)
        return torch.autograd.grad(output, path, torch.ones_like(output))[0]

    variants = {"floor": floor,
                "igfast": seeded(igfast.NoiseTunnel(igfast.IntegratedGradients(model)))}
    if captum_attr is not None:
        theirs = captum_attr.NoiseTunnel(captum_attr.IntegratedGradients(model))
        variants["captum"] = seeded(theirs)
        variants["captum nt_samples_batch_size=1"] = seeded(theirs, nt_samples_batch_size=1)
        difference = (variants["igfast"]() - variants["captum"]()).abs().max().item()
        assert difference < 1e-4, f"igfast and Captum disagree by {difference}"
    name = (f"NoiseTunnel(IG) CNN 3x32x32, batch {x.shape[0]}, nt_samples {nt_samples}, "
            f"n_steps {n_steps} ({rows} path rows)")
    return name, measure(variants, model, device, repeats)


def print_case(name, result):
    medians, peaks, calls = result
    floor = medians["floor"]
    captum = medians.get("captum")
    print(f"\n{name}")
    header = f"{'variant':32} {'median s':>9} {'/floor':>7} {'/captum':>8} {'peak memory':>12} {'model calls':>11}"
    print(header)
    print("-" * len(header))
    for variant, seconds in medians.items():
        peak = format_size(peaks[variant]) if peaks[variant] is not None else "-"
        versus = f"{seconds / captum:8.2f}" if captum else f"{'-':>8}"
        print(f"{variant:32} {seconds:9.3f} {seconds / floor:7.2f} {versus} {peak:>12} {calls[variant]:>11}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds (a smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3, quick 2)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps CPU timings stable)")
    parser.add_argument("--skip-minilm", action="store_true", help="only the NoiseTunnel case")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 3)
    print(f"igfast {igfast.__version__} ({igfast.info()['path']}), torch {torch.__version__}, "
          f"device {args.device}, threads {args.threads}, {repeats} timed rounds interleaved, medians")
    cases = [noise_tunnel_case]
    if not args.skip_minilm:
        cases.insert(0, minilm_case)
    results = {}
    for case in cases:
        started = time.perf_counter()
        name, result = case(args.quick, args.device, repeats)
        print_case(name, result)
        print(f"({time.perf_counter() - started:.0f} s)")
        medians, peaks, calls = result
        results[name] = {v: {"median_s": medians[v], "peak_bytes": peaks[v], "model_calls": calls[v]}
                         for v in medians}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
