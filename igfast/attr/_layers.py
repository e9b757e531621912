"""The layers LayerIntegratedGradients attributes to: checking them, reading their
activations in one forward call, and putting path points in their place.

A layer's activation is its output (or, with ``attribute_to_layer_input``, its
positional inputs): one tensor or a tuple of tensors, dim 0 indexing rows. The
tensors of all layers are flattened into one tuple, the ``inputs`` of the
streaming engine; ``LayerSlots`` remembers which of them belong to which layer and
whether the layer gave a tuple, to rebuild Captum's result forms.
"""

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..errors import ArgumentError, LayerError, warn_to_caller
from ._train_mode import root_modules

ModuleOrList = Union[nn.Module, List[nn.Module]]


LAYER_HOOKS_NEED_EAGER = (
    "igfast: LayerIntegratedGradients runs the eager original of this torch.compile'd model: "
    "a compiled graph does not call hooks added to its layers after compiling, so the layer's "
    "activation cannot be replaced in it. IntegratedGradients runs compiled models compiled.")


def eager_original(forward_func: Callable, why: str = LAYER_HOOKS_NEED_EAGER) -> Callable:
    """The eager module (or function) of a torch.compile'd one, with a warning that says
    ``why``; else ``forward_func``. A compiled graph does not run forward hooks added to
    submodules after it was compiled (torch._dynamo.config.skip_nnmodule_hook_guards),
    so the layer's activation could not be read or replaced in it; nor does it run
    forward-mode AD or a torch function mode (method="exact")."""
    original = compiled_original(forward_func)
    if original is None:
        return forward_func
    warn_to_caller(why, UserWarning)
    return original


def compiled_original(forward_func: Callable) -> Optional[Callable]:
    """The eager module (or function) of a torch.compile'd one; None for any other."""
    return getattr(forward_func, "_orig_mod", None) if isinstance(forward_func, nn.Module) else \
        getattr(forward_func, "_torchdynamo_orig_callable", None)


def torchscript_part(forward_func: Callable) -> Optional[str]:
    """The name of the TorchScript module or function the model is or holds (traced or
    scripted), None where it has none: TorchScript runs its graph in its interpreter,
    where neither forward-mode AD's tangents nor a torch function mode reach its ops, so
    the walk of method="exact" cannot read them."""
    if isinstance(forward_func, (torch.jit.ScriptModule, torch.jit.ScriptFunction)):
        return type(forward_func).__name__
    for root in root_modules(forward_func):
        for name, module in root.named_modules():
            if isinstance(module, torch.jit.ScriptModule):
                return f"{type(root).__name__}.{name}" if name else type(module).__name__
    return None


def layer_list(layer: Any, forward_func: Callable) -> List[nn.Module]:
    """``layer`` as a list of modules. Whether the model calls each one is checked when
    it runs, as Captum's hooks find it: a layer need not be a registered submodule (a
    model held in a plain list by a wrapper, or called from a function)."""
    layers = layer if isinstance(layer, list) else [layer]
    if not layers:
        raise ArgumentError("`layer` must be a module or a non-empty list of modules; got [].")
    for index, module in enumerate(layers):
        name = f"layer[{index}]" if isinstance(layer, list) else "layer"
        if not isinstance(module, nn.Module):
            raise LayerError(
                f"`{name}` must be a torch.nn.Module (a layer of the model); "
                f"got {type(module).__name__}."
            )
    if len(set(map(id, layers))) != len(layers):
        raise LayerError("`layer` lists the same module more than once.")
    return layers


@dataclass(frozen=True)
class LayerSlots:
    """Where each layer's tensors sit in the flat tuple, and their original form."""

    counts: Tuple[int, ...]  # tensors per layer
    containers: Tuple[type, ...]  # torch.Tensor, tuple or list: what the layer gave

    def split(self, flat: Sequence[Any]) -> List[Tuple[Any, ...]]:
        groups, begin = [], 0
        for count in self.counts:
            groups.append(tuple(flat[begin:begin + count]))
            begin += count
        return groups

    def repack(self, layer_index: int, tensors: Tuple[torch.Tensor, ...]) -> Any:
        """The tensors of one layer in the form the layer gave them."""
        container = self.containers[layer_index]
        if container is torch.Tensor:
            return tensors[0]
        return container(tensors)


def _as_tuple(value: Any, layer: nn.Module, what: str) -> Tuple[Tuple[torch.Tensor, ...], type]:
    if isinstance(value, torch.Tensor):
        return (value,), torch.Tensor
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(value), type(value)
    if isinstance(value, (tuple, list)) and not value and what == "input":
        raise LayerError(
            f"The {what} of layer {type(layer).__name__} is empty: it receives its inputs "
            "as keyword arguments, which attribute_to_layer_input cannot replace; "
            "attribute to the layer's output, or to the layer that computes the input."
        )
    kinds = [type(v).__name__ for v in value] if isinstance(value, (tuple, list)) else type(value).__name__
    raise LayerError(  # Captum: AttributeError (it reads .shape of what it got)
        f"The {what} of layer {type(layer).__name__} must be a tensor or a tuple of tensors "
        f"to be attributed to; got {kinds}."
    )


def _hook_for(layers: List[nn.Module], to_layer_input: bool, hook: Callable) -> contextlib.ExitStack:
    """Hooks on the layers that act on this thread's forward calls only: a layer is
    shared by every thread that runs the model, so another thread's call (another
    attribute() on the same explainer, or plain inference) passes through untouched."""
    stack = contextlib.ExitStack()
    owner = threading.get_ident()

    def ours() -> bool:
        # torch.compile traces the hook into the graph it compiles for this call (and
        # cannot trace get_ident): there the check is not needed.
        return torch.compiler.is_compiling() or threading.get_ident() == owner

    for index, layer in enumerate(layers):
        if to_layer_input:
            def pre_hook(module, args, index=index):
                return hook(index, module, args) if ours() else None
            handle = layer.register_forward_pre_hook(pre_hook)
        else:
            def forward_hook(module, args, output, index=index):
                return hook(index, module, output) if ours() else None
            handle = layer.register_forward_hook(forward_hook)
        stack.callback(handle.remove)
    return stack


def record_activations(
    layers: List[nn.Module], to_layer_input: bool, run: Callable[[], Any]
) -> Tuple[Tuple[torch.Tensor, ...], LayerSlots, Any]:
    """Run ``run()`` once, keeping a copy of each layer's activation (the last
    call's, as Captum does when a layer runs more than once).

    Returns (flat activations, their slots, what run() returned)."""
    what = "input" if to_layer_input else "output"
    seen: List[Any] = [None] * len(layers)

    def keep(index: int, module: nn.Module, value: Any) -> None:
        tensors, container = _as_tuple(value, module, what)
        # A copy: the model may change the activation in place after the hook.
        seen[index] = (tuple(t.detach().clone() for t in tensors), container)

    with _hook_for(layers, to_layer_input, keep):
        result = run()
    for index, (layer, got) in enumerate(zip(layers, seen)):
        if got is None:
            name = f"layer[{index}]" if len(layers) > 1 else "layer"
            raise LayerError(
                f"`{name}` ({type(layer).__name__}) was not called by `forward_func`: "
                "there is no activation to attribute to. Pass a layer the forward pass uses."
            )
    slots = LayerSlots(
        counts=tuple(len(tensors) for tensors, _ in seen),
        containers=tuple(container for _, container in seen),
    )
    flat = tuple(t for tensors, _ in seen for t in tensors)
    return flat, slots, result


@contextlib.contextmanager
def activations_replaced(
    layers: List[nn.Module], to_layer_input: bool, slots: LayerSlots,
    path: Tuple[torch.Tensor, ...],
) -> Iterator[List[bool]]:
    """Within the block, every call of a layer gives (or, for layer inputs,
    receives) the path tensors in place of its own activation. Yields one flag per
    layer, set when the layer was called.

    The layer still runs (as in Captum) so that its side effects and hooks are
    unchanged; the path tensors are cloned so that in-place operations after the
    layer do not touch the engine's leaves.
    """
    called = [False] * len(layers)
    per_layer = slots.split(path)

    def replace(index: int, module: nn.Module, value: Any) -> Any:
        called[index] = True
        # With grad on: a model may run the layer under torch.no_grad() (a frozen backbone
        # whose features its head takes), where a clone would cut the path's gradient.
        with torch.enable_grad():
            replacement = tuple(t.clone() for t in per_layer[index])
        if to_layer_input:
            return replacement  # a pre-hook returns the new positional arguments
        return slots.repack(index, replacement)

    with _hook_for(layers, to_layer_input, replace):
        yield called
