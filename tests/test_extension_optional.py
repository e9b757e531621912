"""igfast works without its extension: the environment switch turns the compiled
ops off, info() says so and why, and results equal the kernel path."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import igfast
from igfast import _elf

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


MISSING_EXTENSION = """
import importlib.util, json, warnings
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "igfast._C" else find_spec(name, *a)
import torch, igfast
warnings.simplefilter("always")
model = torch.nn.Linear(4, 2)
with warnings.catch_warnings(record=True) as first:
    warnings.simplefilter("always")
    igfast.IntegratedGradients(model).attribute(torch.randn(3, 4), target=0)
with warnings.catch_warnings(record=True) as second:
    warnings.simplefilter("always")
    igfast.IntegratedGradients(model).attribute(torch.randn(3, 4), target=0)
print(json.dumps({"info": igfast.info(), "first": [str(w.message) for w in first],
                  "second": [str(w.message) for w in second]}))
"""


def test_an_install_without_kernels_says_why_and_warns_once():
    """igfast installed without igfast._C (IGFAST_NO_EXTENSION, or no torch at build
    time): info() gives that reason (not Python's "circular import" message) and the
    first attribution warns once, naming the fix."""
    completed = subprocess.run([sys.executable, "-c", MISSING_EXTENSION], capture_output=True, text=True,
                               env={**os.environ, "IGFAST_DISABLE_EXTENSION": "0"}, check=True)
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["info"]["path"] == "pure-pytorch"
    assert "installed without its compiled kernels" in result["info"]["reason"]
    assert "circular" not in result["info"]["reason"]
    ours = [m for m in result["first"] if "without its compiled kernels" in m]
    assert len(ours) == 1 and "--no-build-isolation" in ours[0]
    assert not [m for m in result["second"] if "without its compiled kernels" in m]


def test_the_build_fails_loudly_without_torch(tmp_path):
    """pip's build isolation hides torch: the build must stop and say what to do,
    not install a package without kernels in silence."""
    setup_py = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")
    script = ("import sys, runpy; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; "
              f"runpy.run_path({setup_py!r}, run_name='__main__')")
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                               env={k: v for k, v in os.environ.items() if k != "IGFAST_NO_EXTENSION"})
    assert completed.returncode != 0
    assert "--no-build-isolation" in completed.stderr and "IGFAST_NO_EXTENSION=1" in completed.stderr
    opted_out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                               env={**os.environ, "IGFAST_NO_EXTENSION": "1"})
    assert opted_out.returncode == 0 and "pure-PyTorch package" in opted_out.stderr


THROWING_LIBRARY = """
#include <stdexcept>
extern "C" int igfast_test_throws(int x) {
  try { if (x) throw std::runtime_error("bad"); } catch (const std::exception&) { return 1; }
  return 0;
}
"""


def _compile_library(tmp_path, name, extra_flags):
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("no g++ to build the test libraries")
    source = tmp_path / "throws.cpp"
    source.write_text(THROWING_LIBRARY)
    output = tmp_path / name
    completed = subprocess.run([compiler, "-shared", "-fPIC", *extra_flags, str(source), "-o", str(output)],
                               capture_output=True, text=True)
    if completed.returncode != 0:
        pytest.skip(f"g++ could not build the test library with {extra_flags}: {completed.stderr[-300:]}")
    return str(output)


def test_the_elf_reader_tells_a_static_cxx_runtime_from_a_shared_one(tmp_path):
    """The check _ext.py makes before loading igfast._C, on two libraries built here:
    the H200 image's default g++ linked libstdc++ statically, and every argument error
    of an op then ended the process."""
    shared = _compile_library(tmp_path, "shared.so", [])
    static = _compile_library(tmp_path, "static.so", ["-static-libstdc++", "-static-libgcc"])
    assert any(name.startswith("libstdc++") for name in _elf.needed_libraries(shared))
    assert not any(name.startswith("libstdc++") for name in _elf.needed_libraries(static))
    assert "libc.so.6" in _elf.needed_libraries(static)
    assert _elf.links_cxx_runtime_statically(static) and not _elf.links_cxx_runtime_statically(shared)
    assert not _elf.links_cxx_runtime_statically(igfast.ops.__file__)  # not an ELF file: nothing known
    assert _elf.needed_libraries(str(tmp_path / "absent.so")) is None


STATIC_RUNTIME_EXTENSION = """
import importlib.util, json, sys
find_spec = importlib.util.find_spec
def swapped(name, *a):
    spec = find_spec(name, *a)
    if name == "igfast._C" and spec is not None:
        spec.origin = sys.argv[1]  # what _ext.py reads before it loads the library
    return spec
importlib.util.find_spec = swapped
import torch, igfast
model = torch.nn.Linear(4, 2)
attributions = igfast.IntegratedGradients(model).attribute(torch.randn(3, 4), target=0)
print(json.dumps({"info": igfast.info(), "finite": bool(torch.isfinite(attributions).all())}))
"""


def test_an_extension_with_a_static_cxx_runtime_is_not_loaded(tmp_path):
    """Such a build would crash the process on the first error inside it: igfast runs
    on the pure path instead and says why, naming the fix."""
    static = _compile_library(tmp_path, "static.so", ["-static-libstdc++", "-static-libgcc"])
    completed = subprocess.run([sys.executable, "-c", STATIC_RUNTIME_EXTENSION, static], capture_output=True,
                               text=True, env={**os.environ, "IGFAST_DISABLE_EXTENSION": "0"}, check=True)
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["info"]["path"] == "pure-pytorch" and result["finite"]
    assert "static copy of the C++ runtime" in result["info"]["reason"]
    assert "CXX=/usr/bin/g++" in result["info"]["reason"]
