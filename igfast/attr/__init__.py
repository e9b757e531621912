"""The Captum-shaped attribution API of igfast."""

from .integrated_gradients import IntegratedGradients
from .layer_integrated_gradients import LayerIntegratedGradients
from .noise_tunnel import NoiseTunnel

__all__ = ["IntegratedGradients", "LayerIntegratedGradients", "NoiseTunnel"]
