"""igfast: fast, memory-bounded Integrated Gradients for PyTorch, a drop-in for Captum.

    from igfast import IntegratedGradients   # instead of captum.attr
"""

from ._info import info
from .attr import IntegratedGradients, LayerIntegratedGradients, NoiseTunnel
from .errors import ArgumentError, InputTypeError, TargetError

__version__ = "0.1.0"

__all__ = [
    "IntegratedGradients",
    "LayerIntegratedGradients",
    "NoiseTunnel",
    "info",
    "ArgumentError",
    "InputTypeError",
    "TargetError",
    "__version__",
]
