"""What Captum's wrappers expect of the attribution object they hold.

``captum.attr.NoiseTunnel`` and ``captum.attr.LayerIntegratedGradients`` call
``method.attribute.__wrapped__(method, ...)``, because Captum's own ``attribute``
methods carry a logging decorator made with ``functools.wraps``. They also read
``forward_func``, ``multiplies_by_inputs`` and ``has_convergence_delta()``, and
LayerIntegratedGradients replaces ``gradient_func``.
"""

import functools
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


def wrappable_by_captum(attribute: F) -> F:
    """Give ``attribute`` the ``__wrapped__`` attribute Captum's wrappers call."""

    @functools.wraps(attribute)
    def wrapper(self, *args, **kwargs):
        return attribute(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
