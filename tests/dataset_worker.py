"""What tests/test_dataset.py runs in other processes: a rank of a gloo group, or a
run that the test kills. The model is rebuilt from a seed in every process."""

import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import igfast

EXAMPLES = 40
SETTINGS = dict(target="predicted", batch_size=4, shard_size=8, n_steps=8, progress=False)


class SmallNet(nn.Module):
    """A tiny CNN on 1x6x6 images; ``delay`` seconds of sleep per call slow it down
    for the kill test (a plain attribute: not part of the weights)."""

    def __init__(self, delay: float = 0.0):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 3 * 3, 5)
        self.delay = delay

    def forward(self, x):
        if self.delay:
            time.sleep(self.delay)
        return self.fc(F.max_pool2d(torch.tanh(self.conv(x)), 2).flatten(1))


def dataset():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(EXAMPLES, 1, 6, 6, generator=generator)
    labels = torch.randint(0, 5, (EXAMPLES,), generator=generator)
    return TensorDataset(images, labels)


def run(out_dir: str, delay: float = 0.0):
    torch.set_num_threads(1)
    return igfast.attribute_dataset(SmallNet(delay).eval(), dataset(), out_dir, **SETTINGS)


def run_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        run(out_dir)
    finally:
        dist.destroy_process_group()


def refuse_changed_data(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """A rank resuming ``out_dir`` with every image moved by 1e-3: writes what it met to
    out_dir/rank-<rank>.txt (a refusal, or "ran")."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    images, labels = dataset().tensors
    try:
        igfast.attribute_dataset(SmallNet().eval(), TensorDataset(images + 1e-3, labels), out_dir, **SETTINGS)
        outcome = "ran"
    except igfast.ArgumentError as error:
        outcome = f"refused: {error}"
    finally:
        dist.destroy_process_group()
    with open(f"{out_dir}/rank-{rank}.txt", "w") as handle:
        handle.write(outcome)


if __name__ == "__main__":
    if sys.argv[2:] == ["--twice"]:  # two runs in one script: the group made for the first serves both
        run(sys.argv[1])
        run(sys.argv[1] + "-second")
    else:
        run(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)
