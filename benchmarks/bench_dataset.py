"""attribute_dataset throughput: examples per second on 1 and on 2 processes.

Each configuration runs in fresh processes started with torch.multiprocessing and
joined in a gloo group (nccl with --device cuda), one torch thread each, into a new
output directory. Two figures per run: the examples per second attribute_dataset
reports (from its first barrier to its last: the attribution work and the shard
writes), and the wall time including process start, imports and model loading.

    python benchmarks/bench_dataset.py                 # CNN and MiniLM, 1 and 2 processes
    python benchmarks/bench_dataset.py --quick         # a smoke run (seconds)
"""

import argparse
import json
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import Dataset, TensorDataset

import igfast
from igfast.bench.workloads import WORKLOADS


class SentencePairs(Dataset):
    """The MiniLM similarity task, one dict item per sentence."""

    def __init__(self, count: int, length: int):
        from igfast.examples import minilm

        sentences = (minilm.SENTENCES * (count // len(minilm.SENTENCES) + 1))[:count]
        references = (minilm.PAIRED_SENTENCES * (count // len(minilm.SENTENCES) + 1))[:count]
        self.task = minilm.similarity_task(sentences, references, length=length)

    def __len__(self):
        return self.task.inputs.shape[0]

    def __getitem__(self, i):
        mask, reference = self.task.additional_forward_args
        return {"inputs": self.task.inputs[i], "baselines": self.task.baselines[i],
                "additional_forward_args": (mask[i], reference[i])}


def build(workload: str, examples: int, device: str):
    """(attribution method, data set, batch size) for a workload."""
    if workload == "cnn":
        model, _, _, _ = WORKLOADS["cnn"].build(device)
        images = torch.randn(examples, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        return igfast.IntegratedGradients(model), TensorDataset(images), 16
    data = SentencePairs(examples, length=32)
    model = data.task.model.to(device)
    return igfast.LayerIntegratedGradients(model, data.task.layer), data, 4


def rank_main(rank, world, workload, examples, n_steps, device, init_file, out_dir, result_file):
    torch.set_num_threads(1)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=world)
    try:
        method, data, batch_size = build(workload, examples, f"cuda:{rank}" if device == "cuda" else "cpu")
        target = None if workload == "minilm" else "predicted"
        summary = igfast.attribute_dataset(method, data, out_dir, target=target, n_steps=n_steps,
                                           batch_size=batch_size, shard_size=batch_size,
                                           progress=False)
        if rank == 0:
            with open(result_file, "w") as handle:
                json.dump(summary, handle)
    finally:
        dist.destroy_process_group()


def run(workload, examples, n_steps, world, device):
    with tempfile.TemporaryDirectory() as scratch:
        result_file = os.path.join(scratch, "summary.json")
        started = time.perf_counter()
        mp.spawn(rank_main, nprocs=world, args=(world, workload, examples, n_steps, device,
                                                os.path.join(scratch, "rendezvous"),
                                                os.path.join(scratch, "out"), result_file))
        wall = time.perf_counter() - started
        with open(result_file) as handle:
            summary = json.load(handle)
    return {"workload": workload, "processes": world, "examples": examples, "n_steps": n_steps,
            "examples_per_second": summary["examples_per_second"], "seconds": summary["seconds"],
            "wall_seconds": wall, "delta_max": summary["delta_max"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few examples and steps (a smoke run)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--workloads", default="cnn,minilm")
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    sizes = {"cnn": (32, 8) if args.quick else (256, 50), "minilm": (8, 4) if args.quick else (32, 50)}
    rows = []
    for workload in args.workloads.split(","):
        examples, n_steps = sizes[workload]
        for world in (int(p) for p in args.processes.split(",")):
            rows.append(run(workload, examples, n_steps, world, args.device))
    print(f"igfast {igfast.__version__}, torch {torch.__version__}, device {args.device}, one thread per process")
    header = f"{'workload':8} {'procs':>5} {'examples':>8} {'n_steps':>7} {'examples/s':>10} {'speedup':>7} {'run s':>7} {'wall s':>7} {'max|delta|':>10}"
    print(header)
    print("-" * len(header))
    for row in rows:
        one = next(r for r in rows if r["workload"] == row["workload"] and r["processes"] == 1)
        speedup = row["examples_per_second"] / one["examples_per_second"]
        print(f"{row['workload']:8} {row['processes']:5d} {row['examples']:8d} {row['n_steps']:7d} "
              f"{row['examples_per_second']:10.2f} {speedup:7.2f} {row['seconds']:7.2f} "
              f"{row['wall_seconds']:7.2f} {row['delta_max']:10.1e}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
