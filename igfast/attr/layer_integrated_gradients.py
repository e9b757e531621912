"""LayerIntegratedGradients: Integrated Gradients of a layer's activations, as in Captum.

The path runs between the layer's activation at the baselines and at the inputs;
the model runs on the inputs with the layer's activation replaced by path points,
and the gradient is taken with respect to those points. igfast differs from
Captum in the work around the path, not in the result:

- the activations at the inputs and at the baselines come from one forward call on
  both, batched together (Captum makes two), and the same call gives F(inputs) and
  F(baselines), so the convergence delta costs no further calls (Captum makes two);
- the path goes through the streaming engine: chunks sized to a memory budget,
  one vectorised backward per chunk.
"""

import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..adaptive import (
    AdaptiveIntegral, adaptive_settings, integrate_adaptively, refuse_several_targets, round_row_limit,
)
from ..chunking import Chunk, choose_row_limit
from ..engine import PathIntegral, integrate_gradients
from ..errors import ArgumentError
from ..quadrature import path_nodes
from ._captum_protocol import captum_bases, wrappable_by_captum
from ._completeness import attributions_from, convergence_delta, convergence_delta_per_target
from ._forms import (
    expand_additional_forward_args,
    format_additional_forward_args,
    format_baselines,
    format_inputs,
    full_batch,
    repeat_rows,
    select_additional_forward_args,
    select_examples,
)
from ._gradients import (
    check_one_value_per_row, forward_output, gradients_and_outputs, gradients_and_outputs_per_target,
)
from ._multi_target import resolve_targets
from ._layers import LayerSlots, activations_replaced, layer_list, record_activations
from ._target import expand_target, normalize_target, select_targets
from .integrated_gradients import IntegratedGradients

TensorOrTuple = Union[torch.Tensor, Tuple[torch.Tensor, ...]]
LayerAttributions = Union[TensorOrTuple, List[TensorOrTuple]]


class LayerIntegratedGradients(*captum_bases("LayerIntegratedGradients")):
    r"""Layer Integrated Gradients, a drop-in for ``captum.attr.LayerIntegratedGradients``.

    Attributes the target output to each neuron of a layer's output (or input):
    Integrated Gradients along the straight path from the layer's activation at the
    baselines to its activation at the inputs. The usual use is the token
    embeddings of a transformer, whose inputs (token ids) have no gradient.

    Args:
        forward_func (Callable or torch.nn.Module): the model or function to explain.
        layer (torch.nn.Module or list of them): the layer(s) whose activations are
            attributed. Several layers must not feed one another (as in Captum).
        device_ids (list[int], optional): accepted for Captum compatibility;
            DataParallel models across several devices are not supported.
        multiply_by_inputs (bool, optional): multiply by the activation at the
            inputs minus the activation at the baselines (global attributions).
            Default: True.
    """

    def __init__(
        self,
        forward_func: Callable,
        layer: Any,
        device_ids: Optional[List[int]] = None,
        multiply_by_inputs: bool = True,
    ) -> None:
        self.ig = IntegratedGradients(forward_func, multiply_by_inputs)
        self.forward_func = forward_func
        self.layer = layer
        self.device_ids = device_ids
        if self._layers is not None and len(self._layers) > 1:
            warnings.warn(
                "Several layers given: none of them may compute its activation from "
                "another's, or the path of one would be overwritten by the other.",
                stacklevel=2,
            )

    @property
    def layer(self) -> Any:
        """The layer(s) attributed to. Captum's TCAV assigns it before each call, so
        assigning checks the new layer(s) as the constructor does."""
        return self._layer

    @layer.setter
    def layer(self, layer: Any) -> None:
        # None is accepted until attribute() (Captum's TCAV constructs with None).
        self._layers = None if layer is None else layer_list(layer, self.forward_func)
        self._layer = layer

    @property
    def multiplies_by_inputs(self) -> bool:
        return self.ig.multiplies_by_inputs

    def has_convergence_delta(self) -> bool:
        return True

    @wrappable_by_captum
    def attribute(
        self,
        inputs: TensorOrTuple,
        baselines: Any = None,
        target: Any = None,
        additional_forward_args: Any = None,
        n_steps: Union[int, str] = 50,
        method: str = "gausslegendre",
        internal_batch_size: Union[None, int, str] = None,
        return_convergence_delta: bool = False,
        attribute_to_layer_input: bool = False,
        grad_kwargs: Optional[Dict[str, Any]] = None,
        memory_budget: Union[None, int, str] = None,
        targets: Optional[Sequence[Any]] = None,
        tolerance: Optional[float] = None,
        max_steps: Optional[int] = None,
        return_adaptive_info: bool = False,
    ) -> Union[LayerAttributions, Tuple[Any, ...]]:
        r"""Attribute the target output to the layer's neurons.

        Args:
            inputs (Tensor or tuple[Tensor, ...]): the model inputs, dim 0 indexing
                examples; any dtype (token ids, masks), since the path lies in the
                layer's activations.
            baselines (scalar, Tensor or tuple, optional): the model inputs at the
                path's start (e.g. [PAD] token ids), in the forms IntegratedGradients
                accepts. Default: zeros.
            target, additional_forward_args, n_steps, method, internal_batch_size,
                memory_budget, tolerance, max_steps, return_adaptive_info: as in
                ``IntegratedGradients.attribute`` (n_steps="auto" refines the path in
                the layer's activations, with the same error estimate).
            return_convergence_delta (bool, optional): also return, per example,
                sum(attributions) - (F(inputs) - F(baselines)), with F(inputs) and
                F(baselines) from the call that reads the activations. Default: False.
            attribute_to_layer_input (bool, optional): attribute to the layer's
                positional inputs instead of its output. Default: False.
            grad_kwargs (dict, optional): keyword arguments for torch.autograd.grad.
            targets (list, optional; igfast only): K targets in one pass, as in
                ``IntegratedGradients.attribute`` (also ``target="all"`` and
                ``target="topk:k"``, ranked at the inputs): a leading K dimension.

        Returns:
            For one layer: a tensor shaped like its activation, or a tuple when the
            layer gives several tensors; for a list of layers, a list of those.
            With ``return_convergence_delta``, ``(attributions, delta)``; with
            ``return_adaptive_info``, the AdaptiveInfo last.
        """
        if self._layers is None:
            raise ArgumentError("`layer` is None: give the layer(s) to attribute to (set `layer`).")
        if self.device_ids is None:
            self.device_ids = getattr(self.forward_func, "device_ids", None)
        if self.device_ids is not None and len(self.device_ids) > 1:
            raise ArgumentError(
                "igfast.LayerIntegratedGradients does not support DataParallel models on "
                f"several devices (device_ids={self.device_ids}); explain the module on one "
                "device (model.module)."
            )
        model_inputs, _ = format_inputs(inputs, floating=False)
        model_baselines = format_baselines(baselines, model_inputs)
        adaptive = adaptive_settings(n_steps, method, tolerance, max_steps, return_adaptive_info)
        batch_size = model_inputs[0].shape[0]
        args = format_additional_forward_args(additional_forward_args)
        device = model_inputs[0].device
        ends, starts, slots, outputs = self._activations_at_both_ends(
            model_inputs, model_baselines, args, attribute_to_layer_input
        )
        many = resolve_targets(target, targets, batch_size, device, lambda: outputs[:batch_size])
        chunk_target = None if many is not None else normalize_target(target, batch_size, device)
        end_values, start_values = _values_at_both_ends(outputs, chunk_target, many, batch_size)
        refuse_several_targets(adaptive, many)

        def gradients_at_for(inputs_of_rows, target_of_rows, args_of_rows):
            """The engine's gradients_at for these examples' model inputs, target(s) and args."""

            def gradients_at(path: Tuple[torch.Tensor, ...], chunk: Chunk, with_outputs: bool):
                chunk_inputs = tuple(repeat_rows(x, chunk) for x in inputs_of_rows)
                chunk_args = expand_additional_forward_args(args_of_rows, chunk)
                with activations_replaced(self._layers, attribute_to_layer_input, slots, path) as called:
                    if many is not None:
                        grads, outputs = gradients_and_outputs_per_target(
                            self.forward_func, chunk_inputs, [expand_target(t, chunk) for t in many],
                            chunk_args, wrt=path, grad_kwargs=grad_kwargs,
                        )
                    else:
                        grads, outputs = gradients_and_outputs(
                            self.forward_func, chunk_inputs, expand_target(target_of_rows, chunk),
                            chunk_args, wrt=path, grad_kwargs=grad_kwargs,
                        )
                if not all(called):
                    # The layer ran when its activations were read, so the model's control
                    # flow differs between calls; zero gradients would be silently wrong.
                    raise ArgumentError(
                        "`layer` was not called by `forward_func` on the path inputs (it was on "
                        "the inputs): the forward pass must call every layer on every call."
                    )
                return grads, outputs

            return gradients_at

        if adaptive is not None:
            def run_round(examples: torch.Tensor, nodes) -> PathIntegral:
                sub_ends = tuple(select_examples(e, examples, batch_size) for e in ends)
                sub_starts = tuple(select_examples(s, examples, batch_size) for s in starts)
                row_limit = round_row_limit(adaptive, internal_batch_size, memory_budget, sub_ends, nodes)
                gradients_at = gradients_at_for(
                    tuple(select_examples(x, examples, batch_size) for x in model_inputs),
                    select_examples(chunk_target, examples, batch_size),
                    select_additional_forward_args(args, examples, batch_size))
                return integrate_gradients(sub_ends, sub_starts, nodes, gradients_at, row_limit)

            integral = integrate_adaptively(ends, starts, adaptive, run_round, start_values, end_values)
        else:
            nodes = path_nodes(method, n_steps, with_endpoints=False)
            row_limit = choose_row_limit(internal_batch_size, memory_budget, ends, nodes.count,
                                         target_count=len(many) if many else 1)
            integral = integrate_gradients(ends, starts, nodes, gradients_at_for(model_inputs, chunk_target, args),
                                           row_limit, target_count=len(many) if many is not None else None)
        self.last_integral: Union[PathIntegral, AdaptiveIntegral] = integral
        attributions = attributions_from(integral, ends, starts, self.multiplies_by_inputs)
        result = self._format_result(attributions, slots)
        extras = []
        if return_convergence_delta:
            delta_of = convergence_delta_per_target if many is not None else convergence_delta
            extras.append(delta_of(attributions, start_values, end_values))
        if return_adaptive_info:
            extras.append(integral.info)
        return (result, *extras) if extras else result

    def _activations_at_both_ends(
        self,
        model_inputs: Tuple[torch.Tensor, ...],
        model_baselines: Tuple[torch.Tensor, ...],
        args: Optional[Tuple[Any, ...]],
        to_layer_input: bool,
    ):
        """One forward call on [inputs; baselines]: the layer's activations at both
        ends of the path, and the model's output there (inputs first)."""
        batch_size = model_inputs[0].shape[0]
        both = tuple(
            torch.cat([x, full_batch(b, batch_size)]) for x, b in zip(model_inputs, model_baselines)
        )

        def run() -> torch.Tensor:
            return forward_output(
                self.forward_func, both, expand_additional_forward_args(args, _two_ends(batch_size)))

        with torch.no_grad():
            activations, slots, outputs = record_activations(self._layers, to_layer_input, run)
        for index, activation in enumerate(activations):
            if activation.dim() == 0 or activation.shape[0] != 2 * batch_size:
                raise ArgumentError(
                    f"The layer activation {index} has shape {tuple(activation.shape)}: its "
                    f"dim 0 must index the examples ({2 * batch_size} rows for the inputs and "
                    "baselines together). Attribute to a layer whose activations are batch-first."
                )
            if not activation.dtype.is_floating_point:
                raise ArgumentError(
                    f"The layer activation {index} has dtype {activation.dtype}: only floating "
                    "activations can be interpolated. For token ids, attribute to the "
                    "embedding layer's output (attribute_to_layer_input=False)."
                )
        ends = tuple(a[:batch_size] for a in activations)
        starts = tuple(a[batch_size:] for a in activations)
        return ends, starts, slots, outputs.detach()

    def _format_result(
        self, attributions: Tuple[torch.Tensor, ...], slots: LayerSlots
    ) -> LayerAttributions:
        """Captum's forms: per layer a tensor, or a tuple when it gives several
        tensors; a list over layers when ``layer`` was a list."""
        per_layer = [group if len(group) > 1 else group[0] for group in slots.split(attributions)]
        return per_layer if isinstance(self.layer, list) else per_layer[0]

    def attribute_future(self) -> None:
        """Not implemented, as in Captum."""
        raise NotImplementedError("attribute_future is not implemented for LayerIntegratedGradients")


def _two_ends(batch_size: int) -> Chunk:
    """The batch of the call at both ends: "steps" 0 and 1 are the inputs and baselines."""
    return Chunk(0, 2, 0, batch_size, batch_size)


def _values_at_both_ends(outputs: torch.Tensor, target: Any, many: Optional[List[Any]],
                         batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """F(inputs) and F(baselines) per example ((K, B) each for K targets) from the
    output of the call at both ends."""
    chunk = _two_ends(batch_size)
    per_target = [target] if many is None else many
    values = []
    for one in per_target:
        selected = select_targets(outputs, expand_target(one, chunk))
        check_one_value_per_row(selected, 2 * batch_size, one)
        values.append(selected.reshape(2 * batch_size))
    stacked = torch.stack(values)
    if many is None:
        stacked = stacked[0]
    return stacked[..., :batch_size], stacked[..., batch_size:]
