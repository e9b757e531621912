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
