"""The Captum-shaped attribution API of igfast."""

from .integrated_gradients import IntegratedGradients

__all__ = ["IntegratedGradients"]
