"""The Captum-shaped attribution API of igfast."""

from ._captum_protocol import captum_bases
from .integrated_gradients import IntegratedGradients
from .layer_integrated_gradients import LayerIntegratedGradients
from .llm_attr import LLMGradientAttribution
from .noise_tunnel import NoiseTunnel

# Captum's input and result classes when Captum is installed (one type for users of
# both libraries), igfast's own otherwise; LLMGradientAttribution accepts either.
if captum_bases("TextTokenInput"):
    from captum.attr import LLMAttributionResult, TextTemplateInput, TextTokenInput
else:
    from .llm_inputs import TextTemplateInput, TextTokenInput
    from .llm_result import LLMAttributionResult

__all__ = ["IntegratedGradients", "LayerIntegratedGradients", "NoiseTunnel", "LLMGradientAttribution",
           "TextTokenInput", "TextTemplateInput", "LLMAttributionResult"]
