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
from the range of each call's rows. Spectral normalisation in training mode (either
form: ``torch.nn.utils.spectral_norm``'s hook or the parametrization) takes a power
iteration step in every forward call, so a call's weights depend on how many calls
came before it: it is batched as Captum batches too.

Randomness that no module names (``F.dropout(x, training=True)``, a noise layer of the
user's) is seen where the first forward call of an attribution draws from the
generator of its device: the call warns too.

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
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils.parametrizations import _SpectralNorm
from torch.nn.utils.spectral_norm import SpectralNorm

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


def _power_iterations(module: nn.Module) -> bool:
    """Spectral normalisation that steps its power iteration in every forward call
    (training mode): the parametrization's module, or the module its hook sits on."""
    if isinstance(module, _SpectralNorm):
        return module.training and module.n_power_iterations > 0
    hooks = getattr(module, "_forward_pre_hooks", None) or {}
    return module.training and any(isinstance(hook, SpectralNorm) and hook.n_power_iterations > 0
                                   for hook in hooks.values())


def _depends_on_earlier_calls(module: nn.Module) -> bool:
    """Its output depends on the other rows of the call, or on how many calls came before."""
    return _depends_on_the_batch(module) or _power_iterations(module)


def _updates_its_state(module: nn.Module) -> bool:
    """A forward call changes its buffers (running statistics, observed ranges, the
    spectral norm's singular vectors)."""
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return module.training and module.track_running_stats
    return _observing(module) or _power_iterations(module)


def _draws_random_masks(module: nn.Module) -> bool:
    if isinstance(module, nn.RReLU):  # a random negative slope per element
        return module.training and module.lower != module.upper
    return isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0


@functools.lru_cache(maxsize=None)
def _may_depend_on_the_call(module_type: type) -> bool:
    """Whether modules of this class can be batch-dependent, random or stateful: the
    other checks (some against abstract base classes, slow) run for these only."""
    return issubclass(module_type, (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd,
                                    FakeQuantizeBase, ObserverBase, _SpectralNorm, nn.RReLU, LazyModuleMixin))


def _may_depend_on_its_call(module: nn.Module) -> bool:
    # (spectral_norm's hook form sits on a module of any class)
    return _may_depend_on_the_call(type(module)) or bool(getattr(module, "_forward_pre_hooks", None))


def depends_on_the_call(forward_func: Callable) -> bool:
    """Whether a module of the forward function makes a row's output depend on the
    other rows of its call or on random draws (so that how the rows are batched, and
    what else draws random numbers in between, changes the result)."""
    return any(_depends_on_earlier_calls(module) or _draws_random_masks(module)
               for _, module in _call_dependent_modules(forward_func))


def _call_dependent_modules(forward_func: Any) -> List[Tuple[str, nn.Module]]:
    """The (name, module) pairs that can be batch-dependent, random or stateful: one
    walk of the model serves every check of a call (each walk is Python over every
    module, a share of a small model's call)."""
    return [(name, module) for name, module in _named_modules(forward_func) if _may_depend_on_its_call(module)]


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
    batch_statistics, power_iterations, random_masks = [], [], []
    modules = _call_dependent_modules(forward_func)
    for name, module in modules:
        if _depends_on_the_batch(module):
            batch_statistics.append(f"{name} ({type(module).__name__})")
        if _power_iterations(module):
            power_iterations.append(f"{name} ({type(module).__name__})")
        if _draws_random_masks(module):
            random_masks.append(f"{name} ({type(module).__name__})")
    if batch_statistics:
        warn_to_caller(
            f"igfast: {_listed(batch_statistics)}: each normalises (or quantizes) a forward call's rows with "
            "statistics of those rows (training mode, no running statistics, or an observer on), so "
            "the attributions depend "
            "on how the path rows are batched: igfast batches them as Captum does (the whole path "
            "in one call, or Captum's chunks with internal_batch_size), and a memory_budget changes "
            "them. Call model.eval() (and disable observers) for attributions that do not depend on "
            "batching. Running statistics and observed ranges are restored after the call.",
            BatchDependenceWarning,
        )
    if power_iterations:
        warn_to_caller(
            f"igfast: {_listed(power_iterations)} in training mode: each takes a spectral-norm power iteration "
            "step in every forward call, so each call's weights depend on how many calls came before: igfast "
            "batches the path as Captum does (the whole path in one call, or Captum's chunks with "
            "internal_batch_size), and a memory_budget changes the attributions. Call model.eval() for "
            "attributions that do not depend on batching. The singular vectors are restored after the call.",
            BatchDependenceWarning,
        )
    if random_masks:
        warn_to_caller(
            f"igfast: {_listed(random_masks)} in training mode: each draws random numbers (a mask, a slope) in "
            "every forward call, so the attributions are random. Call model.eval() for deterministic ones.",
            BatchDependenceWarning,
        )
    token = _BATCH_DEPENDENT.set(bool(batch_statistics or power_iterations))
    watch = _DRAW_WATCH.set(_DrawWatch(warned=bool(random_masks) or _draws_for_nothing(modules)))
    try:
        with _state_kept(modules):
            yield
    finally:
        _DRAW_WATCH.reset(watch)
        _BATCH_DEPENDENT.reset(token)


def _draws_for_nothing(modules: List[Tuple[str, nn.Module]]) -> bool:
    """Modules that advance the generator without making the output random: RReLU in
    training with one slope (lower == upper), a lazy module initialising its weights
    at its first call. The watch would take them for randomness."""
    for _, module in modules:
        if isinstance(module, nn.RReLU) and module.training:
            return True
        if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
            return True
    return False


class _DrawWatch:
    """Whether an attribution call's first forward has been watched for random draws."""

    def __init__(self, warned: bool) -> None:
        self.done = warned  # a module already named the randomness


_DRAW_WATCH: contextvars.ContextVar = contextvars.ContextVar("igfast_random_draw_watch", default=None)


def _generator_states(tensors: Tuple[Any, ...]) -> List[torch.Tensor]:
    states = [torch.random.get_rng_state()]
    for device in sorted({t.device for t in tensors if isinstance(t, torch.Tensor) and t.device.type == "cuda"},
                         key=str):
        states.append(torch.cuda.get_rng_state(device))
    return states


@contextlib.contextmanager
def random_draws_watched(tensors: Tuple[Any, ...]) -> Iterator[None]:
    """Around a forward call: on an attribution call's first, warn where the model drew
    random numbers (from the CPU generator or that of an input's GPU) that no module
    named (functional dropout, a noise layer): its attributions are random. (Another
    thread drawing from the same generator meanwhile would be taken for the model.)"""
    watch = _DRAW_WATCH.get()
    if watch is None or watch.done:
        yield
        return
    watch.done = True
    before = _generator_states(tensors)
    yield
    if any(not torch.equal(a, b) for a, b in zip(before, _generator_states(tensors))):
        warn_to_caller(
            "igfast: the model drew random numbers in its forward call (functional dropout, a noise "
            "layer, ...), so the attributions are random. Make the forward deterministic (model.eval(), "
            "training=False) for deterministic ones.",
            BatchDependenceWarning,
        )


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
