"""Loads the compiled ops (igfast._C) once, and remembers why not when it cannot.

Importing igfast never fails because of the extension: without it every operation
runs on the pure-PyTorch path (igfast.reference), with the same results.
"""

import os
from typing import Optional

DISABLE_VARIABLE = "IGFAST_DISABLE_EXTENSION"
# Must equal abi_version() in csrc/igfast.cpp: a build with other op schemas is stale.
ABI_VERSION = 6

_loaded = False
_why_not: Optional[str] = None


def _load() -> None:
    global _loaded, _why_not
    if os.environ.get(DISABLE_VARIABLE, "").strip() not in ("", "0"):
        _why_not = f"disabled by the environment variable {DISABLE_VARIABLE}"
        return
    import importlib.util

    spec = importlib.util.find_spec(f"{__package__}._C")
    if spec is None:
        _why_not = (
            "igfast was installed without its compiled kernels (igfast._C is not there: built "
            "with IGFAST_NO_EXTENSION=1, or without torch in the build environment); rebuild with "
            "`pip install --no-build-isolation --force-reinstall --no-deps .` in the igfast source folder"
        )
        return
    from ._elf import links_cxx_runtime_statically

    if spec.origin and links_cxx_runtime_statically(spec.origin):
        _why_not = (
            f"igfast._C ({spec.origin}) holds its own static copy of the C++ runtime (its compiler "
            "linked libstdc++ statically), so an error raised inside it would end the process "
            "instead of reaching Python; rebuild with the system compiler, e.g. `CXX=/usr/bin/g++ "
            "pip install --no-build-isolation -e .`"
        )
        return
    try:
        import torch  # noqa: F401  (the ops library links against torch)

        from . import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)
    except ImportError as error:
        _why_not = f"igfast._C could not be imported ({error}); rebuild igfast for this torch"
    except OSError as error:  # e.g. built against another torch version
        _why_not = f"igfast._C failed to load ({error}); rebuild igfast for this torch"
    else:
        built = torch.ops.igfast.abi_version()
        if built != ABI_VERSION:
            _why_not = (
                f"igfast._C is a stale build (op ABI {built}, this igfast needs {ABI_VERSION}); "
                "rebuild it with `pip install --no-build-isolation -e .`"
            )
            return
        _loaded = True


_load()


def extension_loaded() -> bool:
    return _loaded


def why_not_loaded() -> Optional[str]:
    """None when the extension is loaded, else the reason it is not."""
    return _why_not


_warned = False


def warn_once_without_kernels(reason: str) -> None:
    """The first attribution that runs on the pure-PyTorch path says so, once per
    process, unless the extension was switched off on purpose (DISABLE_VARIABLE)."""
    global _warned
    if _warned or os.environ.get(DISABLE_VARIABLE, "").strip() not in ("", "0"):
        return
    _warned = True
    from .errors import warn_to_caller

    warn_to_caller(f"igfast runs without its compiled kernels (same results, slower): {reason}. "
                   f"Set {DISABLE_VARIABLE}=1 to run this way without this warning.", RuntimeWarning)
