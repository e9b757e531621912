"""What Captum's wrappers expect of the attribution object they hold.

``captum.attr.NoiseTunnel`` and ``captum.attr.LayerIntegratedGradients`` call
``method.attribute.__wrapped__(method, ...)``, because Captum's own ``attribute``
methods carry a logging decorator made with ``functools.wraps``. They also read
``forward_func``, ``multiplies_by_inputs`` and ``has_convergence_delta()``, and
LayerIntegratedGradients replaces ``gradient_func``; TCAV sets ``layer`` before
each call.

Captum 0.9 also checks the *type* of the object it is given:

- ``LLMGradientAttribution`` asserts ``isinstance(attr_method, SUPPORTED_METHODS)``
  (LayerGradientShap, LayerGradientXActivation, LayerIntegratedGradients);
- ``NoiseTunnel`` sets ``is_gradient_method = isinstance(method, GradientAttribution)``
  and makes the noisy inputs require grad only then;
- (``LLMAttribution`` and ``DataLoaderAttribution`` accept perturbation methods
  only, which igfast does not provide.)

igfast's classes pass these checks by taking Captum's class as a second base when
Captum is importable (``captum_bases``). Why a conditional base and not a virtual
subclass: Captum's ``Attribution`` hierarchy is made of plain classes, not
``abc.ABCMeta`` ones, so it has no ``register()``, and isinstance on a plain class
looks only at the real MRO. Patching Captum's ``SUPPORTED_METHODS`` tuples would
change another library's state behind the user's back, and would not reach
NoiseTunnel's check. With the base placed after igfast's own class in the MRO,
every method igfast defines wins; Captum's ``__init__`` never runs, so no Captum
state is created, and what igfast objects inherit from Captum are only the methods
igfast does not define (``get_name``, Captum's ``compute_convergence_delta`` for
LayerIntegratedGradients, ...), which behave as they do on Captum's own objects.
Without Captum the classes have no such base and igfast works the same; the few
members users call on any Captum attribution (``get_name``, and LayerAttribution's
``interpolate``) come from ``CaptumMembers`` then, so that code written against
Captum's objects keeps working after Captum is uninstalled.
"""

import functools
from typing import Callable, Optional, Tuple, TypeVar, Union

import torch
import torch.nn.functional as functional

F = TypeVar("F", bound=Callable)

_why_no_captum: Optional[str] = None


def wrappable_by_captum(attribute: F) -> F:
    """Give ``attribute`` the ``__wrapped__`` attribute Captum's wrappers call."""

    @functools.wraps(attribute)
    def wrapper(self, *args, **kwargs):
        return attribute(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def captum_bases(name: str) -> Tuple[type, ...]:
    """``(captum.attr.<name>,)`` when Captum can be imported, else ``()``.

    Used as ``class IntegratedGradients(*captum_bases("IntegratedGradients"))`` so
    that Captum's isinstance checks accept igfast's object. Importing igfast never
    fails because of Captum: a Captum that is missing or fails to import only
    removes the base (``why_no_captum()`` says why).
    """
    global _why_no_captum
    try:
        import captum.attr
    except Exception as error:  # absent, or broken (e.g. a plotting dependency)
        _why_no_captum = f"captum.attr could not be imported ({type(error).__name__}: {error})"
        return ()
    return (getattr(captum.attr, name),)


def why_no_captum() -> Optional[str]:
    """None when igfast's classes subclass Captum's, else the reason they do not."""
    return _why_no_captum


def readable_name(cls: type) -> str:
    """Captum's ``get_name``: a space before every capital but the first
    (IntegratedGradients -> "Integrated Gradients", LLMGradientAttribution ->
    "L L M Gradient Attribution")."""
    return "".join(c if c.islower() or i == 0 else " " + c for i, c in enumerate(cls.__name__))


class CaptumMembers:
    """What every Captum ``Attribution`` offers besides ``attribute``, for igfast's
    classes whether or not Captum is installed (see the module docstring)."""

    @classmethod
    def get_name(cls) -> str:
        return readable_name(cls)


class LayerMembers(CaptumMembers):
    """Captum's ``LayerAttribution`` members."""

    @staticmethod
    def interpolate(layer_attribution: torch.Tensor, interpolate_dims: Union[int, Tuple[int, ...]],
                    interpolate_mode: str = "nearest") -> torch.Tensor:
        """Resize a (N, C, ...) layer attribution to ``interpolate_dims`` (e.g. a
        convolution's map to the input's height and width), as Captum's
        ``LayerAttribution.interpolate``: ``torch.nn.functional.interpolate``."""
        return functional.interpolate(layer_attribution, interpolate_dims, mode=interpolate_mode)
