"""Exception types of igfast.

Captum reports most bad arguments with ``assert`` (AssertionError) and some through
the PyTorch error they trigger (IndexError, RuntimeError). A drop-in replacement must
be caught by the same ``except`` clauses, yet users of a library expect ValueError or
TypeError for bad arguments. Each class below is therefore both: the idiomatic Python
type first, then the type Captum raises in the same situation.
"""

import contextlib
import os
import sys
import warnings


class ArgumentError(ValueError, AssertionError):
    """An argument of an igfast call has the wrong form or value."""


class ArgumentTypeError(ArgumentError, TypeError, AttributeError):
    """An argument is not of an accepted type (Captum: TypeError, e.g. a float
    ``n_steps``; AttributeError where it reads what the object lacks, e.g. a model
    given to NoiseTunnel instead of an attribution method)."""


class ShapeError(ArgumentError, RuntimeError, IndexError):
    """Tensor arguments whose shapes do not fit together: a baseline that does not
    broadcast to its input, inputs with different numbers of examples (Captum:
    PyTorch's RuntimeError where it combines them, AssertionError where it checks,
    IndexError where it indexes: a TextTokenInput's baselines of the wrong width)."""


class RangeError(ArgumentError, RuntimeError, ZeroDivisionError):
    """A number outside its range: NoiseTunnel's ``nt_samples`` or
    ``nt_samples_batch_size`` below 1 (Captum divides by them: ZeroDivisionError) or a
    negative ``stdevs`` (PyTorch's RuntimeError in Captum's torch.normal)."""


class StdevTypeError(ArgumentTypeError, RuntimeError):
    """NoiseTunnel's ``stdevs`` is not a number or a one-element tensor (Captum:
    AssertionError for a bare value other than a float; PyTorch's RuntimeError, or
    TypeError, from torch.tensor for one in a tuple)."""


class InputTypeError(ArgumentError, TypeError, RuntimeError):
    """An input tensor has a dtype that cannot be differentiated (integer, bool)."""


class TargetError(ArgumentError, IndexError, RuntimeError, TypeError):
    """``target`` does not fit the forward function's output (form or range; Captum:
    IndexError or RuntimeError from indexing, TypeError for a list mixing ints and
    tuples)."""


class TokenIdError(TargetError, OverflowError):
    """A target token id outside the model's vocabulary (LLM attribution). Captum fails
    with IndexError for one too large (indexing the logits) and OverflowError for a
    negative one (decoding it with the tokenizer)."""


class LayerError(ArgumentError, RuntimeError, KeyError, AttributeError, IndexError):
    """``layer`` cannot be attributed to: not a module (Captum: AttributeError), listed
    twice, its activation not batch-first or not floating (RuntimeError), one of a list
    never called (KeyError), its input empty because it takes keyword arguments only
    (IndexError: Captum reads the first positional one)."""

    __str__ = ArgumentError.__str__  # KeyError's would quote the message


class UnusedLayerError(LayerError):
    """A layer's activation does not reach the output of LayerIntegratedGradients'
    forward (Captum: autograd's RuntimeError for an unused tensor)."""


class OutputTypeError(ArgumentError, TypeError, AttributeError):
    """``forward_func`` returned something other than a tensor (Captum: AttributeError,
    when it reads ``.shape`` of a dict, tuple or ModelOutput)."""


class ComplexOutputError(OutputTypeError, RuntimeError):
    """``forward_func`` returned a complex tensor: IG needs a real output (Captum:
    autograd's RuntimeError, gradients of a complex output need a real scalar)."""


class OutputShapeError(ArgumentError, IndexError):
    """``forward_func`` returned a tensor without one row per input row (Captum:
    IndexError for a 0-dim output)."""


class GradientError(ArgumentError, RuntimeError):
    """Autograd cannot take the gradient the attribution needs through this model
    (e.g. reentrant activation checkpointing); Captum raises autograd's RuntimeError."""


class NotPiecewiseLinearError(ArgumentError):
    """method="exact" met an op that is not piecewise linear where the network must be
    (before its last piecewise-linear op), or one it cannot classify."""


class ToleranceNotReachedWarning(UserWarning):
    """Attributions come back less accurate than asked: n_steps="auto" returned examples
    whose error estimate is above the tolerance (they reached max_steps), or
    method="gausslegendre_pieces" examples that miss completeness by more than their
    estimate says."""


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_to_caller(message: str, category: type) -> None:
    """warnings.warn attributed to the first frame outside igfast, the caller's line:
    igfast's wrappers put a varying number of frames between, so a fixed stacklevel
    named igfast's own files (_train_mode.py, integrated_gradients.py). Frames of
    contextlib, through which igfast's context managers are entered, are passed too."""
    frame, level = sys._getframe(1), 2
    while frame is not None and _inside_igfast(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def _inside_igfast(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(_PACKAGE) or path == _CONTEXTLIB


_CONTEXTLIB = os.path.abspath(contextlib.__file__)
