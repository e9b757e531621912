"""The built-in workloads that benchmarks time: model, inputs and target."""

from dataclasses import dataclass
from typing import Callable, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F


class SmallMLP(nn.Module):
    def __init__(self, features=64, hidden=128, classes=10):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x)


class SmallCNN(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 8 * 8, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


class SmallEncoder(nn.Module):
    """A transformer encoder over token embeddings (attributed directly): 4 layers,
    width 256, 8 heads; the logits come from the mean-pooled sequence."""

    def __init__(self, width=256, layers=4, heads=8, classes=10):
        super().__init__()
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


@dataclass
class Workload:
    name: str
    make_model: Callable[[], nn.Module]
    input_shape: tuple  # including the batch

    def build(self, device="cpu", seed=0):
        torch.manual_seed(seed)
        model = self.make_model().to(device).eval()
        x = torch.randn(self.input_shape, device=device)
        baseline = torch.zeros_like(x)
        with torch.no_grad():
            target = model(x).argmax(1)
        return model, x, baseline, target


WORKLOADS: Dict[str, Workload] = {
    "mlp": Workload("mlp (64 features, batch 64)", SmallMLP, (64, 64)),
    "cnn": Workload("cnn (3x32x32, batch 16)", SmallCNN, (16, 3, 32, 32)),
    "encoder": Workload("transformer encoder (sequence 256, width 256, 4 layers, batch 32)",
                        SmallEncoder, (32, 256, 256)),
}
