"""Builds the extension igfast._C; all metadata lives in pyproject.toml.

The kernels are optional at run time, never silently at install time: when torch
is not importable here (pip's default build isolation hides the installed torch),
the build fails and says how to build them, or how to opt out.

Switches (environment variables):
  IGFAST_NO_EXTENSION=1  install the pure-PyTorch package only (same results, slower)
  FORCE_CUDA=1           compile the CUDA kernels even when no GPU is visible
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "").strip() not in ("", "0")


def _extension_kwargs():
    if _flag("IGFAST_NO_EXTENSION"):
        print("igfast: IGFAST_NO_EXTENSION set, installing the pure-PyTorch package", file=sys.stderr)
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        sys.exit(
            "igfast: torch is not importable in the build environment, so the kernels cannot be "
            "built. Install torch first, then build against it without pip's build isolation:\n"
            "    pip install --no-build-isolation .\n"
            "or install the pure-PyTorch package (same results, slower) with IGFAST_NO_EXTENSION=1."
        )

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx_flags = ["-O3", "-std=c++20"]
    # at::parallel_for runs serially unless the extension itself is compiled with
    # OpenMP (ATen/ParallelOpenMP.h). Compile only: the GOMP symbols resolve
    # through libtorch's own libgomp, so no second OpenMP runtime is loaded.
    if "OpenMP" in torch.__config__.parallel_info() and sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
    with_cuda = cpp_extension.CUDA_HOME is not None and (
        _flag("FORCE_CUDA") or (torch.cuda.is_available() and torch.version.cuda is not None)
    )
    extension_class = cpp_extension.CppExtension
    extra = {"cxx": cxx_flags}
    if with_cuda:
        # Host code (*.cpp: checks, guards, registration) and kernels (*.cu): csrc/cuda/launchers.h says why apart.
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")) + glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        extension_class = cpp_extension.CUDAExtension
        extra["nvcc"] = ["-O3", "-std=c++20"]
    extension = extension_class(
        name="igfast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=extra,
    )
    return {
        "ext_modules": [extension],
        "cmdclass": {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    }


setup(**_extension_kwargs())
