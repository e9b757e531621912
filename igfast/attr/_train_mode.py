"""Modules whose output or state depends on how the rows of a call are batched.

Integrated Gradients assumes each path row's output depends on that row alone. A
BatchNorm layer in training mode (or one without running statistics, in any mode)
normalises every forward call's rows with their own mean and variance, so the
attributions depend on which rows share a call: igfast's chunks batch the path
differently from Captum's single call, and the results differ, by up to the size
of the attributions. Dropout in training mode draws a new mask per call, so
attributions are random. Such models are not an error (Captum runs them), but they
are never silently different: each call warns once, naming the modules, and
``model.eval()`` fixes it. For batch-dependent models igfast also batches the path
as Captum does, all of it in one call unless ``internal_batch_size`` (Captum's
chunks) or ``memory_budget`` is given, so that the results match Captum's.

Fake quantization with its observer on is batch-dependent too: it sets its scale
from the range of each call's rows.

Layers with running statistics (BatchNorm, InstanceNorm with
``track_running_stats``) update them on every training-mode forward call, and
observers (and fake quantization with its observer on) update their ranges, so
their state after a call would depend on the number of chunks. igfast restores
their buffers after the call: attributing never changes the model (Captum updates
them once per forward call it makes).
"""

import contextlib
import contextvars
import functools
from typing import Any, Callable, Iterator, List, Tuple

import torch
from torch import nn
from torch.ao.quantization import FakeQuantizeBase, ObserverBase

from ..errors import warn_to_caller

_BATCH_DEPENDENT = contextvars.ContextVar("igfast_batch_dependent_call", default=False)


def batch_dependent_call() -> bool:
    """Whether the attribute call running in this context has a model whose outputs
    depend on how its rows are batched."""
    return _BATCH_DEPENDENT.get()


class BatchDependenceWarning(UserWarning):
    """The model's output depends on how the path rows are batched (or is random)."""


def root_modules(forward_func: Any, depth: int = 0) -> List[nn.Module]:
    """The modules a forward function evidently calls: itself, the module of a bound
    method, a compiled module's original, modules a function names (``lambda x:
    model(x).logits``: in its closure or its globals), a functools.partial's function,
    and the modules a callable object holds; two levels deep."""
    if isinstance(forward_func, nn.Module):
        return [forward_func]
    if depth > 2:
        return []
    found: List[nn.Module] = []
    inner = [getattr(forward_func, name, None) for name in ("__self__", "func", "__wrapped__",
                                                            "_torchdynamo_orig_callable")]
    closure = getattr(forward_func, "__closure__", None) or ()
    for cell in closure:
        with contextlib.suppress(ValueError):  # an empty cell
            inner.append(cell.cell_contents)
    code, names = getattr(forward_func, "__code__", None), getattr(forward_func, "__globals__", None)
    if code is not None and isinstance(names, dict):
        inner.extend(names[name] for name in code.co_names if isinstance(names.get(name), nn.Module))
    if not callable(getattr(forward_func, "__code__", None)) and hasattr(forward_func, "__dict__") \
            and not isinstance(forward_func, type):
        # An object with __call__ (a user's wrapper): the modules it holds.
        inner.extend(value for value in vars(forward_func).values() if isinstance(value, nn.Module))
    for value in inner:
        if value is not None and (isinstance(value, nn.Module) or callable(value)):
            found.extend(root_modules(value, depth + 1))
    return found


def _named_modules(forward_func: Any) -> Iterator[Tuple[str, nn.Module]]:
    seen = set()
    for root in root_modules(forward_func):
        for name, module in root.named_modules():
            if id(module) not in seen:
                seen.add(id(module))
                yield name or type(module).__name__, module


def _observing(module: nn.Module) -> bool:
    """A quantization observer, or a fake quantization whose observer is on."""
    if isinstance(module, FakeQuantizeBase):
        enabled = getattr(module, "observer_enabled", None)
        return bool(enabled[0]) if isinstance(enabled, torch.Tensor) and enabled.numel() else True
    return isinstance(module, ObserverBase)


def _depends_on_the_batch(module: nn.Module) -> bool:
    """Its output for a row depends on the other rows of the call."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.training or not module.track_running_stats
    return isinstance(module, FakeQuantizeBase) and _observing(module)


def _updates_its_state(module: nn.Module) -> bool:
    """A forward call changes its buffers (running statistics, observed ranges)."""
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return module.training and module.track_running_stats
    return _observing(module)


def _draws_random_masks(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0


@functools.lru_cache(maxsize=None)
def _may_depend_on_the_call(module_type: type) -> bool:
    """Whether modules of this class can be batch-dependent, random or stateful: the
    other checks (some against abstract base classes, slow) run for these only."""
    return issubclass(module_type, (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd,
                                    FakeQuantizeBase, ObserverBase))


def depends_on_the_call(forward_func: Callable) -> bool:
    """Whether a module of the forward function makes a row's output depend on the
    other rows of its call or on random draws (so that how the rows are batched, and
    what else draws random numbers in between, changes the result)."""
    return any(_depends_on_the_batch(module) or _draws_random_masks(module)
               for _, module in _call_dependent_modules(forward_func))


def _call_dependent_modules(forward_func: Any) -> List[Tuple[str, nn.Module]]:
    """The (name, module) pairs that can be batch-dependent, random or stateful: one
    walk of the model serves every check of a call (each walk is Python over every
    module, a share of a small model's call)."""
    return [(name, module) for name, module in _named_modules(forward_func) if _may_depend_on_the_call(type(module))]


def running_state_kept(forward_func: Callable):
    """Restore the buffers that forward calls update (running statistics, observed
    ranges) after the block."""
    return _state_kept(_call_dependent_modules(forward_func))


@contextlib.contextmanager
def _state_kept(modules: List[Tuple[str, nn.Module]]) -> Iterator[None]:
    saved = [(buffer, buffer.clone()) for _, module in modules if _updates_its_state(module)
             for buffer in module.buffers(recurse=False)]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, copy in saved:
                if buffer.shape != copy.shape:  # observers start from empty ranges
                    buffer.resize_(copy.shape)
                buffer.copy_(copy)


@contextlib.contextmanager
def batch_dependence_guard(forward_func: Callable) -> Iterator[None]:
    """Warn about batch-dependent or random modules, and restore running statistics
    after the block."""
    batch_statistics, random_masks = [], []
    modules = _call_dependent_modules(forward_func)
    for name, module in modules:
        if _depends_on_the_batch(module):
            batch_statistics.append(f"{name} ({type(module).__name__})")
        if _draws_random_masks(module):
            random_masks.append(f"{name} ({type(module).__name__})")
    if batch_statistics:
        warn_to_caller(
            f"igfast: {_listed(batch_statistics)} normalise (or quantize) each forward call's rows with "
            "statistics of those rows (training mode, no running statistics, or an observer on), so "
            "the attributions depend "
            "on how the path rows are batched: igfast batches them as Captum does (the whole path "
            "in one call, or Captum's chunks with internal_batch_size), and a memory_budget changes "
            "them. Call model.eval() (and disable observers) for attributions that do not depend on "
            "batching. Running statistics and observed ranges are restored after the call.",
            BatchDependenceWarning,
        )
    if random_masks:
        warn_to_caller(
            f"igfast: {_listed(random_masks)} in training mode draw a random mask in every forward "
            "call, so the attributions are random. Call model.eval() for deterministic ones.",
            BatchDependenceWarning,
        )
    token = _BATCH_DEPENDENT.set(bool(batch_statistics))
    try:
        with _state_kept(modules):
            yield
    finally:
        _BATCH_DEPENDENT.reset(token)


def _listed(names: List[str], most: int = 3) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def guarded(attribute: Callable) -> Callable:
    """Run an explainer's ``attribute`` under ``batch_dependence_guard`` of its
    ``forward_func``."""

    @functools.wraps(attribute)
    def wrapper(self, *args, **kwargs):
        with batch_dependence_guard(self.forward_func):
            return attribute(self, *args, **kwargs)

    return wrapper
