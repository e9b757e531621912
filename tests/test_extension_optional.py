"""igfast works without its extension: the environment switch turns the compiled
ops off, info() says so and why, and results equal the kernel path."""

import json
import os
import subprocess
import sys

import torch

import igfast

SCRIPT = """
import json, torch, igfast
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
x = torch.randn(4, 6)
attributions = igfast.IntegratedGradients(model).attribute(x, target=[0, 1, 2, 0], n_steps=10)
print(json.dumps({"info": igfast.info(), "attributions": attributions.tolist()}))
"""


def run_isolated(environment):
    completed = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                               env={**os.environ, **environment}, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_disable_switch_gives_pure_path_and_same_results():
    disabled = run_isolated({"IGFAST_DISABLE_EXTENSION": "1"})
    assert disabled["info"]["path"] == "pure-pytorch"
    assert disabled["info"]["extension"] is False
    assert "IGFAST_DISABLE_EXTENSION" in disabled["info"]["reason"]
    default = run_isolated({"IGFAST_DISABLE_EXTENSION": "0"})
    assert default["info"]["path"] == igfast.info()["path"]
    torch.testing.assert_close(torch.tensor(disabled["attributions"]), torch.tensor(default["attributions"]),
                               rtol=1e-6, atol=1e-7)


def test_info_reports_the_cuda_path_when_a_gpu_is_visible(monkeypatch):
    """The keys the GPU acceptance run reads (benchmarks/gpu_check.py): with a GPU but
    an extension built without CUDA kernels, the CUDA path is the pure one, and why."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    state = igfast.info()
    assert state["kernels"]["cuda"] is igfast.ops.kernels_available("cuda")
    if state["kernels"]["cuda"]:
        assert state["cuda_path"] == "kernels"
    else:
        assert state["cuda_path"] == "pure-pytorch" and state["cuda_reason"] == igfast.ops.why_not_kernels("cuda")
    assert state["path"] == ("kernels" if igfast.ops.kernels_available("cpu") else "pure-pytorch")
