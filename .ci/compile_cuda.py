"""Compile the CUDA backend against the installed torch's headers: every
csrc/cuda/*.cu with nvcc, every csrc/cuda/*.cpp (its host side) with the C++ compiler.

CI has no GPU, yet CUDA code that does not compile must fail it. The CPU torch
wheel ships the ATen/c10 CUDA headers except one generated header,
c10/cuda/impl/cuda_cmake_macros.h; a stub of it is written to a temporary include
directory for this check only (the real build uses a CUDA torch, which has it).
"""

import glob
import os
import subprocess
import sys
import tempfile

from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    nvcc = os.path.join(cpp_extension.CUDA_HOME or "/usr/local/cuda", "bin", "nvcc")
    if not os.path.exists(nvcc):
        print(f"compile_cuda: nvcc not found at {nvcc}", file=sys.stderr)
        return 1
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    host_sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
    if not sources or not host_sources:
        print("compile_cuda: no .cu or no host .cpp files found", file=sys.stderr)
        return 1
    cuda_include = os.path.join(cpp_extension.CUDA_HOME or "/usr/local/cuda", "include")
    with tempfile.TemporaryDirectory() as stub_root:
        stub = os.path.join(stub_root, "c10", "cuda", "impl", "cuda_cmake_macros.h")
        os.makedirs(os.path.dirname(stub))
        with open(stub, "w") as f:
            f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes = [os.path.join(ROOT, "csrc"), stub_root] + cpp_extension.include_paths()
        failures = 0
        for source in sources + host_sources:
            output = ["-o", os.path.join(stub_root, os.path.basename(source) + ".o")]
            if source.endswith(".cu"):
                command = [nvcc, "-c", source, *output, "-std=c++20", "-O3", "-Xcompiler", "-fPIC",
                           "-DTORCH_EXTENSION_NAME=_C", *cpp_extension.COMMON_NVCC_FLAGS,
                           *[f"-I{path}" for path in includes]]
            else:
                command = [os.environ.get("CXX", "c++"), "-c", source, *output, "-std=c++20", "-O3", "-fPIC",
                           "-Wall", "-DTORCH_EXTENSION_NAME=_C", *[f"-I{path}" for path in includes],
                           f"-I{cuda_include}"]
            result = subprocess.run(command, capture_output=True, text=True)
            status = "ok" if result.returncode == 0 else "FAILED"
            print(f"compile_cuda: {os.path.relpath(source, ROOT)}: {status}")
            if result.returncode != 0:
                failures += 1
                print(result.stdout + result.stderr, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
