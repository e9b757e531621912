"""Exception types of igfast.

Captum reports most bad arguments with ``assert`` (AssertionError) and some through
the PyTorch error they trigger (IndexError, RuntimeError). A drop-in replacement must
be caught by the same ``except`` clauses, yet users of a library expect ValueError or
TypeError for bad arguments. Each class below is therefore both: the idiomatic Python
type first, then the type Captum raises in the same situation.
"""


class ArgumentError(ValueError, AssertionError):
    """An argument of an igfast call has the wrong form or value."""


class InputTypeError(ArgumentError, TypeError, RuntimeError):
    """An input tensor has a dtype that cannot be differentiated (integer, bool)."""


class TargetError(ArgumentError, IndexError, RuntimeError):
    """``target`` does not fit the forward function's output (form or range)."""
