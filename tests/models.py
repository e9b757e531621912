"""Small models covering every output and argument form the parity suite needs.

Each ``Case`` says how to draw inputs, which baseline and target forms apply, and
which additional forward arguments the model takes. Weights are seeded; inputs are
drawn fresh per test from a seeded generator (never all zeros).
"""

from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class PaperToyModel(nn.Module):
    """f(x1, x2) = relu(relu(x1) - 1 - relu(x2)), the example of the IG paper."""

    def forward(self, input1, input2):
        return F.relu(F.relu(input1) - 1 - F.relu(input2))


class ToyModelWithAdditionalForwardArgs(nn.Module):
    """Captum's documentation example: f = relu(relu(x1 - 1) - relu(x2))[:, index]."""

    def forward(self, input1, input2, index):
        return F.relu(F.relu(input1 - 1) - F.relu(input2))[:, index]


class SoftmaxModel(nn.Module):
    def __init__(self, num_in, num_hidden, num_out):
        super().__init__()
        self.lin1 = nn.Linear(num_in, num_hidden)
        self.lin2 = nn.Linear(num_hidden, num_hidden)
        self.lin3 = nn.Linear(num_hidden, num_out)

    def forward(self, x):
        x = F.relu(self.lin1(x))
        x = F.relu(self.lin2(x))
        return F.softmax(self.lin3(x), dim=1)


class MLP(nn.Module):
    def __init__(self, num_in=6, hidden=16, num_out=4, activation=nn.ReLU):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(num_in, hidden), activation(), nn.Linear(hidden, hidden),
            activation(), nn.Linear(hidden, num_out),
        )

    def forward(self, x):
        return self.net(x)


class SmallConvNet(nn.Module):
    def __init__(self, num_out=5):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, num_out)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc(x.flatten(1))


class MultiInputModel(nn.Module):
    """Two inputs of different ranks, three outputs."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(6, 3)

    def forward(self, x1, x2):
        return torch.tanh(self.a(x1)) * self.b(x2.flatten(1))


class AdditionalArgsModel(nn.Module):
    """Takes a per-example tensor, a scalar tensor and a Python value after the input."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x, scale, offset, mode="tanh"):
        y = self.lin(x) * scale + offset
        return torch.tanh(y) if mode == "tanh" else torch.sigmoid(y)


class ThreeDimOutputModel(nn.Module):
    """Output (B, 3, 4): targets are tuples."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 12)

    def forward(self, x):
        return torch.sin(self.lin(x)).view(-1, 3, 4)


class ScalarOutputModel(nn.Module):
    """One value per example, as (B,) or (B, 1): no target needed."""

    def __init__(self, keep_dim=False):
        super().__init__()
        self.lin = nn.Linear(5, 1)
        self.keep_dim = keep_dim

    def forward(self, x):
        y = torch.nn.functional.softplus(self.lin(x))
        return y if self.keep_dim else y.squeeze(1)


@dataclass
class Case:
    """A model and the argument forms that apply to it."""

    name: str
    make_model: Callable[[], nn.Module]
    input_shapes: List[Tuple[int, ...]]  # feature shapes, without the batch
    targets: List[Any]  # target forms; callables take the batch size
    additional_forward_args: Optional[Callable[[int, torch.dtype], Any]] = None
    extra_baselines: List[Any] = field(default_factory=list)

    def draw_inputs(self, batch: int, dtype: torch.dtype, generator: torch.Generator):
        return tuple(
            torch.randn((batch,) + shape, generator=generator, dtype=torch.float64).to(dtype)
            for shape in self.input_shapes
        )


def per_example(values):
    """A target form that depends on the batch size."""
    return lambda batch: values(batch)


CASES = [
    Case("linear", lambda: nn.Linear(6, 3), [(6,)],
         [0, -1, per_example(lambda b: [i % 3 for i in range(b)]),
          per_example(lambda b: torch.arange(b) % 3), torch.tensor([2])]),
    Case("mlp_relu", lambda: MLP(), [(6,)],
         [1, per_example(lambda b: [(i + 1) % 4 for i in range(b)]),
          per_example(lambda b: torch.arange(b) % 4)]),
    Case("softmax_classifier", lambda: SoftmaxModel(6, 8, 4), [(6,)],
         [3, per_example(lambda b: torch.arange(b) % 4)]),
    Case("conv_net", lambda: SmallConvNet(), [(3, 8, 8)],
         [4, per_example(lambda b: [i % 5 for i in range(b)])]),
    Case("multi_input", lambda: MultiInputModel(), [(4,), (3, 2)],
         [2, per_example(lambda b: torch.arange(b) % 3)]),
    Case("additional_args", lambda: AdditionalArgsModel(), [(5,)],
         [1, per_example(lambda b: [i % 3 for i in range(b)])],
         additional_forward_args=lambda b, dtype: (
             torch.linspace(0.5, 1.5, b, dtype=dtype).unsqueeze(1),
             torch.tensor(0.25, dtype=dtype),
             "sigmoid",
         )),
    Case("three_dim_output", lambda: ThreeDimOutputModel(), [(5,)],
         [(1, 2), (0, -1), per_example(lambda b: [(i % 3, (i + 1) % 4) for i in range(b)])]),
    Case("scalar_output", lambda: ScalarOutputModel(), [(5,)], [None]),
    Case("scalar_output_keepdim", lambda: ScalarOutputModel(keep_dim=True), [(5,)], [None]),
]


def build_model(case: Case, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(1234)
    return case.make_model().to(dtype).eval()


def on(device, value):
    """``value`` with every tensor in it (also inside tuples and lists) moved to
    ``device``; other values as they are. Inputs are drawn on the CPU and moved, so
    every device sees the same numbers."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(on(device, v) for v in value)
    return value


def counted(model):
    """(the model as a function that counts its calls, the one-element call count)."""
    calls = [0]

    def forward(*args):
        calls[0] += 1
        return model(*args)

    return forward, calls


def count_walked_rows(monkeypatch) -> list:
    """The rows each BreakpointMode of method="exact"'s walk reads (forwards with
    tangents), appended per mode, from now on in the test."""
    import igfast.exact

    walked = []

    class Counting(igfast.exact.BreakpointMode):
        def __init__(self, rows, *args, **kwargs):
            super().__init__(rows, *args, **kwargs)
            walked.append(rows)

    monkeypatch.setattr(igfast.exact, "BreakpointMode", Counting)
    return walked


class IdentityFunction(torch.autograd.Function):
    """x * 1 as a custom autograd.Function with a backward and no jvp: what
    straight-through estimators and fake quantization look like to autograd."""

    @staticmethod
    def forward(ctx, x):
        return x * 1

    @staticmethod
    def backward(ctx, grad):
        return grad
