"""Forward calls and gradients with respect to the path, in Captum's calling form.

``compute_gradients`` has the signature of ``captum._utils.gradient.compute_gradients``
so that it can sit in ``IntegratedGradients.gradient_func``, a slot that Captum's
LayerIntegratedGradients overwrites with its own function. Unlike Captum it takes
the gradient of all rows in one backward call (ones as output gradients) instead of
``autograd.grad`` over ``unbind(outputs)``, which costs one graph node per row.
"""

import contextlib
import weakref
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ..errors import ComplexOutputError, GradientError, OutputShapeError, OutputTypeError, TargetError
from ._target import select_targets
from ._train_mode import random_draws_watched


def forward_output(
    forward_func: Callable,
    inputs: Tuple[torch.Tensor, ...],
    additional_forward_args: Optional[Tuple[Any, ...]] = None,
) -> torch.Tensor:
    """forward_func(*inputs, *additional_forward_args), checked to be a tensor."""
    args = additional_forward_args if additional_forward_args is not None else ()
    if not isinstance(args, tuple):
        args = (args,)
    with random_draws_watched(inputs):
        output = forward_func(*inputs, *args)
    if not isinstance(output, torch.Tensor):
        raise OutputTypeError(
            "`forward_func` must return a torch.Tensor (one row per example); "
            f"got {type(output).__name__}. Wrap the model to return the tensor to explain, e.g. "
            "`lambda *args: model(*args).logits` for a Hugging Face model."
        )
    if output.is_complex():  # a gradient of its real part alone would pass silently
        raise ComplexOutputError(
            f"`forward_func` must return a real tensor; got {output.dtype}. Explain the part you "
            "mean, e.g. `lambda *args: model(*args).abs()` or `.real`."
        )
    return output


def run_forward(
    forward_func: Callable,
    inputs: Tuple[torch.Tensor, ...],
    target: Any = None,
    additional_forward_args: Optional[Tuple[Any, ...]] = None,
) -> torch.Tensor:
    """forward_func(*inputs, *additional_forward_args), then the target's values."""
    return select_targets(forward_output(forward_func, inputs, additional_forward_args), target)


def check_one_value_per_row(outputs: torch.Tensor, rows: int, target: Any) -> None:
    if outputs.dim() == 0 or outputs.shape[0] != rows:
        raise OutputShapeError(
            f"`forward_func` must return one output row per input row ({rows} rows); "
            f"got an output of shape {tuple(outputs.shape)}."
        )
    if outputs.shape[1:].numel() != 1:
        hint = "pass `target`" if target is None else "pass a `target` that selects one value"
        raise TargetError(
            "Target not provided when necessary, cannot take gradient with respect to "
            f"multiple outputs: the forward output keeps shape {tuple(outputs.shape[1:])} "
            f"per example; {hint} (an int for (N, C) outputs, a tuple for higher ranks)."
        )


@contextlib.contextmanager
def _naming_the_target(index: Optional[int]) -> Iterator[None]:
    """An error about target ``index`` of a many-target call names it as the user gave
    it, ``targets[index]``, not as ``target``."""
    try:
        yield
    except TargetError as error:
        if index is None:
            raise
        raise TargetError(str(error).replace("`target`", f"`targets[{index}]`")) from None


def values_per_target(output: torch.Tensor, targets: Sequence[Any], many_targets: bool = False) -> torch.Tensor:
    """The targeted value of every row of a forward output, per target: (K, rows).
    ``many_targets``: the targets of a many-target call (errors name ``targets[j]``)."""
    rows = output.shape[0] if output.dim() else 1
    values = []
    for index, target in enumerate(targets):
        with _naming_the_target(index if many_targets else None):
            selected = select_targets(output, target)
            check_one_value_per_row(selected, rows, target)
        values.append(selected.reshape(rows))
    return torch.stack(values)


def compute_gradients(
    forward_fn: Callable,
    inputs: Tuple[torch.Tensor, ...],
    target_ind: Any = None,
    additional_forward_args: Optional[Tuple[Any, ...]] = None,
) -> Tuple[torch.Tensor, ...]:
    """Gradients of the targeted outputs (summed over rows) with respect to inputs."""
    return gradients_and_outputs(forward_fn, inputs, target_ind, additional_forward_args)[0]


def gradients_and_outputs(
    forward_fn: Callable,
    inputs: Tuple[torch.Tensor, ...],
    target_ind: Any = None,
    additional_forward_args: Optional[Tuple[Any, ...]] = None,
    wrt: Optional[Tuple[torch.Tensor, ...]] = None,
    grad_kwargs: Optional[Dict[str, Any]] = None,
    on_unused: Optional[Callable[[int], None]] = None,
    check_targets: bool = True,
) -> Tuple[Tuple[torch.Tensor, ...], torch.Tensor]:
    """compute_gradients, and the targeted output of every row (detached, (rows,)).

    The gradients are taken with respect to ``wrt`` (default: the inputs); a layer's
    path tensors, for LayerIntegratedGradients. ``grad_kwargs`` go to autograd.grad.
    A tensor the output does not depend on gets zeros, after ``on_unused(index)``
    (which may raise instead).
    """
    grads, values = gradients_and_outputs_per_target(
        forward_fn, inputs, [target_ind], additional_forward_args, wrt, grad_kwargs, on_unused, check_targets
    )
    return tuple(g[0] for g in grads), values[0]


def gradients_and_outputs_per_target(
    forward_fn: Callable,
    inputs: Tuple[torch.Tensor, ...],
    targets: Sequence[Any],
    additional_forward_args: Optional[Tuple[Any, ...]] = None,
    wrt: Optional[Tuple[torch.Tensor, ...]] = None,
    grad_kwargs: Optional[Dict[str, Any]] = None,
    on_unused: Optional[Callable[[int], None]] = None,
    check_targets: bool = True,
    many_targets: bool = False,
) -> Tuple[Tuple[torch.Tensor, ...], torch.Tensor]:
    """Gradients and targeted outputs for K targets from one forward call
    (``check_targets=False``: their range was checked on an earlier chunk;
    ``many_targets``: a many-target call's, whose errors name ``targets[j]``).

    The forward graph is built once and kept (retain_graph) for the K backward
    passes: K targets cost one forward and K backwards instead of K of each. A graph
    that cannot be kept (a torch.compile'd backward with donated buffers) is built
    again for each target.
    Returns gradients shaped (K, rows, ...) per tensor and values shaped (K, rows).
    """
    wrt = inputs if wrt is None else wrt

    def forward_and_select(some_targets: Sequence[Any]) -> List[torch.Tensor]:
        output = forward_output(forward_fn, inputs, additional_forward_args)
        selected = []
        for index, target in enumerate(some_targets):
            with _naming_the_target(index if many_targets else None):
                values = select_targets(output, target, check_range=check_targets)
                check_one_value_per_row(values, inputs[0].shape[0], target)
            selected.append(values)
        return selected

    def gradients(values: torch.Tensor, retain_graph: bool) -> Tuple[torch.Tensor, ...]:
        options = {"allow_unused": True, **(grad_kwargs or {})}
        options["retain_graph"] = bool(options.get("retain_graph")) or retain_graph
        # Rows are independent examples, so one backward with unit output gradients
        # gives every row's gradient at once.
        grads = _grad(values, wrt, options)
        if on_unused is None and all(grad is None for grad in grads):
            raise GradientError(
                "The targeted output does not reach any input through autograd, so Integrated "
                "Gradients would be zero whatever the model computes (Captum raises here too): the "
                "model runs an op without an autograd formula (a dynamically quantized Linear, ...) "
                "or detaches its inputs. Attribute the float model.")
        return tuple(grad if grad is not None else _unused(position, tensor, on_unused)
                     for position, (grad, tensor) in enumerate(zip(grads, wrt)))

    def one_graph_per_target():
        selected, per_target = [], []
        for target in targets:
            selected.append(forward_and_select([target])[0])
            per_target.append(gradients(selected[-1], False))
        return selected, per_target

    with torch.enable_grad():
        if len(targets) > 1 and _known_not_retainable(forward_fn):
            selected, per_target = one_graph_per_target()
        else:
            selected = forward_and_select(targets)
            try:
                per_target = [gradients(values, index < len(selected) - 1) for index, values in enumerate(selected)]
            except _GraphNotRetainable:
                _remember_not_retainable(forward_fn)  # the next chunks skip the failing attempt
                selected, per_target = one_graph_per_target()
    # One target: views, not copies (this is the hot path of every chunk).
    join = (lambda parts: parts[0].unsqueeze(0)) if len(selected) == 1 else torch.stack
    grads = tuple(join([g[i] for g in per_target]) for i in range(len(wrt)))
    values = join([v.detach().reshape(v.shape[0]) for v in selected])
    return grads, values


def _unused(index: int, tensor: torch.Tensor, on_unused: Optional[Callable[[int], None]]) -> torch.Tensor:
    """The gradient of a tensor the output does not depend on: zeros, unless
    ``on_unused`` objects."""
    if on_unused is not None:
        on_unused(index)
    return torch.zeros_like(tensor)


# Forward functions whose backward refused retain_graph (weakly held).
_NOT_RETAINABLE: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def _known_not_retainable(forward_fn: Callable) -> bool:
    try:
        return forward_fn in _NOT_RETAINABLE
    except TypeError:  # not weakly referable: nothing remembered
        return False


def _remember_not_retainable(forward_fn: Callable) -> None:
    try:
        _NOT_RETAINABLE[forward_fn] = True
    except TypeError:
        pass


class _GraphNotRetainable(RuntimeError):
    """The backward refused retain_graph=True (a torch.compile'd backward with donated
    buffers): the graph must be built once per backward."""


def _grad(values: torch.Tensor, wrt: Tuple[torch.Tensor, ...], options: Dict[str, Any]):
    try:
        return torch.autograd.grad(values, wrt, grad_outputs=torch.ones_like(values), **options)
    except RuntimeError as error:
        if "donated buffers" in str(error) and options.get("retain_graph"):
            raise _GraphNotRetainable(str(error)) from error
        if "use_reentrant=True" not in str(error):
            raise
        raise GradientError(
            "The model uses reentrant activation checkpointing (torch.utils.checkpoint with "
            "use_reentrant=True), through which autograd cannot take the input gradient "
            "Integrated Gradients needs (Captum fails here too). Use use_reentrant=False, turn "
            "checkpointing off for attribution (Hugging Face: model.gradient_checkpointing_disable(), "
            "or model.eval()), or attribute to a layer after the checkpointed part."
        ) from error
