"""igfast: fast, memory-bounded Integrated Gradients for PyTorch, a drop-in for Captum.

    from igfast import IntegratedGradients   # instead of captum.attr
"""

from ._info import info
from .adaptive import ToleranceNotReachedWarning
from .attr import (
    IntegratedGradients, LayerIntegratedGradients, LLMAttributionResult, LLMGradientAttribution, NoiseTunnel,
    TextTemplateInput, TextTokenInput,
)
from .attr._train_mode import BatchDependenceWarning
from .attr.generated_tokens import attribute_generated_tokens
from .dataset import attribute_dataset
from .errors import (
    ArgumentError, ArgumentTypeError, GradientError, InputTypeError, LayerError, NotPiecewiseLinearError,
    OutputShapeError, OutputTypeError, RangeError, ShapeError, StdevTypeError, TargetError, UnusedLayerError,
)
from .shards import open_attributions

__version__ = "0.1.0"

__all__ = [
    "IntegratedGradients",
    "LayerIntegratedGradients",
    "NoiseTunnel",
    "LLMGradientAttribution",
    "TextTokenInput",
    "TextTemplateInput",
    "LLMAttributionResult",
    "attribute_dataset",
    "attribute_generated_tokens",
    "open_attributions",
    "info",
    "ToleranceNotReachedWarning",
    "BatchDependenceWarning",
    "ArgumentError",
    "ArgumentTypeError",
    "GradientError",
    "InputTypeError",
    "LayerError",
    "NotPiecewiseLinearError",
    "OutputShapeError",
    "OutputTypeError",
    "RangeError",
    "ShapeError",
    "StdevTypeError",
    "TargetError",
    "UnusedLayerError",
    "__version__",
]
