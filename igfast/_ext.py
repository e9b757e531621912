"""Loads the compiled ops (igfast._C) once, and remembers why not when it cannot.

Importing igfast never fails because of the extension: without it every operation
runs on the pure-PyTorch path (igfast.reference), with the same results.
"""

import os
from typing import Optional

DISABLE_VARIABLE = "IGFAST_DISABLE_EXTENSION"
# Must equal abi_version() in csrc/igfast.cpp: a build with other op schemas is stale.
ABI_VERSION = 4

_loaded = False
_why_not: Optional[str] = None


def _load() -> None:
    global _loaded, _why_not
    if os.environ.get(DISABLE_VARIABLE, "").strip() not in ("", "0"):
        _why_not = f"disabled by the environment variable {DISABLE_VARIABLE}"
        return
    try:
        import torch  # noqa: F401  (the ops library links against torch)

        from . import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)
    except ImportError as error:
        _why_not = f"igfast._C could not be imported ({error}); was igfast built from source?"
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
