"""A short demonstration: attribute a built-in model with igfast, and compare with
Captum side by side when Captum is installed (`python -m igfast`)."""

import statistics
import time
from typing import Callable, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import IntegratedGradients, info


class DemoCNN(nn.Module):
    """A small image classifier (3x32x32 inputs, 10 classes) with seeded weights."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 8 * 8, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


class DemoMLP(nn.Module):
    """A small tabular classifier (64 features, 10 classes) with seeded weights."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128),
                                 nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.net(x)


def _median_seconds(run: Callable[[], object], repeats: int = 5) -> float:
    run()  # warm-up
    times: List[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_demo(n_steps: int = 50) -> None:
    state = info()
    print(f"igfast {state['igfast']} on torch {state['torch']}: {state['path']} path ({state['reason']})")
    try:
        from captum.attr import IntegratedGradients as CaptumIntegratedGradients
    except ImportError:
        CaptumIntegratedGradients = None
        print("captum is not installed: showing igfast alone (pip install captum for the comparison)")

    torch.manual_seed(0)
    for name, model, x in (
        ("MLP, 64 features, batch 64", DemoMLP().eval(), torch.randn(64, 64)),
        ("CNN, 3x32x32, batch 16", DemoCNN().eval(), torch.randn(16, 3, 32, 32)),
    ):
        with torch.no_grad():
            target = model(x).argmax(1)
        ours = IntegratedGradients(model)
        attributions, delta = ours.attribute(x, target=target, n_steps=n_steps, return_convergence_delta=True)
        ours_time = _median_seconds(lambda: ours.attribute(x, target=target, n_steps=n_steps))
        print(f"\n{name}: attributions {tuple(attributions.shape)}, predicted classes {target[:8].tolist()}...")
        print(f"  completeness |delta| (sum of attributions vs F(x) - F(0)): "
              f"max {delta.abs().max().item():.2e}, mean {delta.abs().mean().item():.2e}")
        print(f"  igfast: {1e3 * ours_time:8.2f} ms")
        if CaptumIntegratedGradients is not None:
            theirs = CaptumIntegratedGradients(model)
            reference = theirs.attribute(x, target=target, n_steps=n_steps)
            theirs_time = _median_seconds(lambda: theirs.attribute(x, target=target, n_steps=n_steps))
            difference = (attributions - reference.detach()).abs().max().item()
            print(f"  captum: {1e3 * theirs_time:8.2f} ms   -> igfast is {theirs_time / ours_time:.2f}x faster; "
                  f"max |igfast - captum| = {difference:.1e}")
