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
Without Captum the classes have no such base and igfast works the same.
"""

import functools
from typing import Callable, Optional, Tuple, TypeVar

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
