"""LayerIntegratedGradients: Integrated Gradients of a layer's activations, as in Captum.

The path runs between the layer's activation at the baselines and at the inputs;
the model runs on the inputs with the layer's activation replaced by path points,
and the gradient is taken with respect to those points. igfast differs from
Captum in the work around the path, not in the result:

- the calls that read the activations at the inputs and at the baselines (one
  each, on the batch, as in Captum) also give F(inputs) and F(baselines), so the
  convergence delta costs no further calls (Captum makes two);
- the path goes through the streaming engine: chunks sized to a memory budget,
  one vectorised backward per chunk.
"""

import itertools
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..adaptive import (
    AdaptiveIntegral, adaptive_settings, integrate_adaptively, refuse_several_targets, round_row_limit,
    warn_if_not_converged,
)
from ..chunking import Chunk, RowCosts, choose_row_limit, shared_argument
from ..engine import PathIntegral, integrate_gradients
from ..exact import (
    POINT_NODES, ExactIntegral, ExactParts, ExactRoute, check_completeness, exact_settings,
    integrate_exactly,
)
from ..exact import refuse_several_targets as refuse_several_targets_exactly
from ..errors import ArgumentError, ArgumentTypeError, LayerError, UnusedLayerError, warn_to_caller
from ..dtypes import integer_item
from ..quadrature import PIECE_METHODS, path_nodes
from ._captum_protocol import LayerMembers, captum_bases, wrappable_by_captum
from ._train_mode import batch_dependent_call, depends_on_the_call, guarded, root_modules
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
    forward_output, gradients_and_outputs, gradients_and_outputs_per_target, values_per_target,
)
from ._multi_target import resolve_targets
from ._layers import LayerSlots, activations_replaced, eager_original, layer_list, record_activations
from ._target import expand_target, normalize_target
from .integrated_gradients import IntegratedGradients, convergence_delta_by_forward

TensorOrTuple = Union[torch.Tensor, Tuple[torch.Tensor, ...]]
LayerAttributions = Union[TensorOrTuple, List[TensorOrTuple]]


class LayerIntegratedGradients(LayerMembers, *captum_bases("LayerIntegratedGradients")):
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
        self._eager_of = self._eager = None
        self._row_costs = RowCosts()  # what earlier calls measured: later ones need no probe
        self.layer = layer
        self.device_ids = device_ids
        if self._layers is not None and len(self._layers) > 1:
            warn_to_caller(
                "Several layers given: none of them may compute its activation from "
                "another's, or the path of one would be overwritten by the other.", UserWarning)

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
    def _eager_forward(self) -> Callable:
        """``forward_func`` as the layer hooks need it: a compiled model's eager
        original. Follows ``forward_func`` when it is replaced (Captum's
        LLMGradientAttribution sets its own)."""
        if self._eager_of is not self.forward_func:
            self._eager_of, self._eager = self.forward_func, eager_original(self.forward_func)
        return self._eager

    @property
    def multiplies_by_inputs(self) -> bool:
        return self.ig.multiplies_by_inputs

    def has_convergence_delta(self) -> bool:
        """True: ``attribute`` can return the convergence delta (Captum's protocol)."""
        return True

    @wrappable_by_captum
    @guarded
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
            ``return_adaptive_info``, the AdaptiveInfo (ExactInfo with method="exact" or
            "gausslegendre_pieces") last.
        """
        if self._layers is None:
            # Captum: TypeError, when it iterates over None
            raise ArgumentTypeError("`layer` is None: give the layer(s) to attribute to (set `layer`).")
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
        n_steps = integer_item(n_steps, any_shape=True)  # Captum takes a one-element tensor
        exact = exact_settings(n_steps, tolerance, max_steps, method) if method in PIECE_METHODS else None
        adaptive = None if exact else adaptive_settings(n_steps, method, tolerance, max_steps, return_adaptive_info)
        batch_size = model_inputs[0].shape[0]
        args = format_additional_forward_args(additional_forward_args)
        device = model_inputs[0].device
        # Under a budget, one example per call (see _activations_at), but for a model whose
        # rows depend on their batch (BatchNorm in training mode), which Captum runs whole.
        per_example = memory_budget is not None and not batch_dependent_call()
        ends, slots, end_outputs = self._activations_at(model_inputs, args, attribute_to_layer_input, per_example)
        starts, _, start_outputs = self._activations_at(model_baselines, args, attribute_to_layer_input, per_example,
                                                        batch_size)
        many = resolve_targets(target, targets, batch_size, device, lambda: end_outputs)
        chunk_target = None if many is not None else normalize_target(target, batch_size, device)
        per_target = [chunk_target] if many is None else many
        end_values, start_values = (values_per_target(outputs, per_target, many_targets=many is not None)
                                    for outputs in (end_outputs, start_outputs))
        if many is None:
            end_values, start_values = end_values[0], start_values[0]
        refuse_several_targets(adaptive, many)
        refuse_several_targets_exactly(exact, many)

        # The layer's activations at the path's ends, held for the whole call.
        held_activations = sum(t.numel() * t.element_size() for t in (*ends, *starts))

        def unused_layer(tensor_index: int) -> None:
            raise self._unused_layer_error(slots, tensor_index, attribute_to_layer_input)

        def gradients_at_for(inputs_of_rows, target_of_rows, args_of_rows):
            """The engine's gradients_at for these examples' model inputs, target(s) and args."""

            def gradients_at(path: Tuple[torch.Tensor, ...], chunk: Chunk, with_outputs: bool):
                chunk_inputs = tuple(repeat_rows(x, chunk) for x in inputs_of_rows)
                chunk_args = expand_additional_forward_args(args_of_rows, chunk)
                with activations_replaced(self._layers, attribute_to_layer_input, slots, path) as called:
                    if many is not None:
                        grads, outputs = gradients_and_outputs_per_target(
                            self._eager_forward, chunk_inputs, [expand_target(t, chunk) for t in many],
                            chunk_args, wrt=path, grad_kwargs=grad_kwargs, on_unused=unused_layer,
                            check_targets=False,  # checked on the outputs at the ends
                        )
                    else:
                        grads, outputs = gradients_and_outputs(
                            self._eager_forward, chunk_inputs, expand_target(target_of_rows, chunk),
                            chunk_args, wrt=path, grad_kwargs=grad_kwargs, on_unused=unused_layer,
                            check_targets=False,  # checked on the outputs at the ends
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

        def exact_parts(examples: torch.Tensor) -> ExactParts:
            """integrate_exactly's callables for the sub-batch of these examples."""
            sub_inputs = tuple(select_examples(x, examples, batch_size) for x in model_inputs)
            sub_target = select_examples(chunk_target, examples, batch_size)
            sub_args = select_additional_forward_args(args, examples, batch_size)
            sub_ends = tuple(select_examples(e, examples, batch_size) for e in ends)
            sub_batch = examples.numel()
            # One limit for every round (see IntegratedGradients._exact_parts).
            row_limit = choose_row_limit(internal_batch_size, memory_budget, sub_ends, 1, target_count=3, walk=True,
                                         batch_dependent=batch_dependent_call(), held_bytes=held_activations)

            def run_point_round(rows: torch.Tensor, points, wrap) -> PathIntegral:
                gradients_at = gradients_at_for(
                    tuple(select_examples(x, rows, sub_batch) for x in sub_inputs),
                    select_examples(sub_target, rows, sub_batch),
                    select_additional_forward_args(sub_args, rows, sub_batch))
                row_ends = tuple(select_examples(e, rows, sub_batch) for e in sub_ends)
                return integrate_gradients(row_ends, points, POINT_NODES,
                                           wrap(gradients_at) if wrap else gradients_at, row_limit)

            def forward_at(rows: torch.Tensor, points) -> Any:
                with activations_replaced(self._layers, attribute_to_layer_input, slots, points):
                    return self._eager_forward(*(select_examples(x, rows, sub_batch) for x in sub_inputs),
                                               *(select_additional_forward_args(sub_args, rows, sub_batch) or ()))

            return run_point_round, forward_at, row_limit

        def value_at_path_start() -> torch.Tensor:
            """F with the layer's activations at the path's start and the model inputs
            at the end: the path integral's F(start). It differs from F(baselines) when
            part of the model bypasses the layer (a residual branch)."""
            with torch.no_grad(), activations_replaced(self._layers, attribute_to_layer_input, slots, starts):
                output = forward_output(self._eager_forward, model_inputs, args)
            return values_per_target(output, [chunk_target])[0]

        if exact is not None:
            integral = integrate_exactly(ends, starts, exact, *exact_parts(torch.arange(batch_size, device=device)))
            check_completeness(integral, ends, starts, value_at_path_start(),
                               end_values)
        elif adaptive is not None:
            def run_round(examples: torch.Tensor, nodes) -> PathIntegral:
                sub_ends = tuple(select_examples(e, examples, batch_size) for e in ends)
                sub_starts = tuple(select_examples(s, examples, batch_size) for s in starts)
                row_limit = round_row_limit(adaptive, internal_batch_size, memory_budget, sub_ends, nodes,
                                            held_bytes=held_activations)
                gradients_at = gradients_at_for(
                    tuple(select_examples(x, examples, batch_size) for x in model_inputs),
                    select_examples(chunk_target, examples, batch_size),
                    select_additional_forward_args(args, examples, batch_size))
                return integrate_gradients(sub_ends, sub_starts, nodes, gradients_at, row_limit)

            # F at the path's ends comes from round 0 (alpha 0 and 1): F(baselines) would not
            # be the path's start where part of the model bypasses the layer.
            integral = integrate_adaptively(ends, starts, adaptive, run_round,
                                            exact_route=ExactRoute(ends, starts, exact_parts))
        else:
            nodes = path_nodes(method, n_steps)
            target_count = len(many) if many else 1
            cost_key = RowCosts.key(ends, model_inputs + (args or ()), target_count)
            row_limit = choose_row_limit(internal_batch_size, memory_budget, ends, nodes.count,
                                         target_count=target_count,
                                         result_count=target_count + (target_count > 1),  # (+ _per_target's copy)
                                         held_bytes=held_activations, batch_dependent=batch_dependent_call(),
                                         whole_steps=shared_argument(args, ends[0].shape[0]),
                                         known_row_cost=self._row_costs.get(cost_key))
            integral = integrate_gradients(ends, starts, nodes, gradients_at_for(model_inputs, chunk_target, args),
                                           row_limit, target_count=len(many) if many is not None else None)
            self._row_costs.remember(cost_key, row_limit)
        self.last_integral: Union[PathIntegral, AdaptiveIntegral, ExactIntegral] = integral
        attributions = attributions_from(integral, ends, starts, self.multiplies_by_inputs)
        result = self._format_result(attributions, slots)
        extras = []
        if return_convergence_delta:
            if many is None and exact is None and adaptive is None and depends_on_the_call(self.forward_func):
                # Dropout draws anew on every call: Captum's delta comes from two more calls
                # after the path, and values read before it would differ from Captum's.
                extras.append(self.compute_convergence_delta(attributions, baselines, inputs, target,
                                                             additional_forward_args))
            else:
                delta_of = convergence_delta_per_target if many is not None else convergence_delta
                extras.append(delta_of(attributions, start_values, end_values))
        if return_adaptive_info:
            extras.append(integral.info)
        elif adaptive is not None:
            warn_if_not_converged(integral.info)
        return (result, *extras) if extras else result

    def _activations_at(
        self,
        model_inputs: Tuple[torch.Tensor, ...],
        args: Optional[Tuple[Any, ...]],
        to_layer_input: bool,
        per_example: bool = False,
        batch_size: Optional[int] = None,
    ):
        """The layer's activations at a batch of model inputs (the path's end; inputs of
        batch_size rows or 1, a baseline for all), their slots, and the model's output
        there: from one forward call, or with ``per_example`` (under a memory budget)
        one call per example. A forward of the whole batch was counted in no budget: a
        CNN's 64 examples (its first conv, 4 MiB an end) went past it before any chunk."""
        batch_size = model_inputs[0].shape[0] if batch_size is None else batch_size
        if per_example and batch_size > 1:
            parts = [self._activations_at(tuple(full_batch(select_examples(x, one, batch_size), 1) for x in model_inputs),
                                          select_additional_forward_args(args, one, batch_size), to_layer_input)
                     for one in torch.arange(batch_size, device=model_inputs[0].device).split(1)]
            activations = tuple(torch.cat(tensors) for tensors in zip(*(part[0] for part in parts)))
            return activations, parts[0][1], torch.cat([part[2] for part in parts])
        model_inputs = tuple(full_batch(x, batch_size) for x in model_inputs)
        with torch.no_grad():
            activations, slots, outputs = record_activations(
                self._layers, to_layer_input, lambda: forward_output(self._eager_forward, model_inputs, args))
        for index, activation in enumerate(activations):
            if activation.dim() == 0 or activation.shape[0] != batch_size:
                raise LayerError(
                    f"The layer activation {index} has shape {tuple(activation.shape)}: its "
                    f"dim 0 must index the examples ({batch_size} rows). Attribute to a layer "
                    "whose activations are batch-first."
                )
            if not activation.dtype.is_floating_point:
                raise LayerError(
                    f"The layer activation {index} has dtype {activation.dtype}: only floating "
                    "activations can be interpolated. For token ids, attribute to the "
                    "embedding layer's output (attribute_to_layer_input=False)."
                )
        return activations, slots, outputs.detach()

    def _unused_layer_error(self, slots: LayerSlots, tensor_index: int, to_layer_input: bool) -> UnusedLayerError:
        ends = list(itertools.accumulate(slots.counts))
        layer_index = next(i for i, end in enumerate(ends) if tensor_index < end)
        name = f"layer[{layer_index}]" if isinstance(self.layer, list) else "layer"
        what = "input" if to_layer_input else "output"
        discarded = "the model discards it or uses it under torch.no_grad()"
        if slots.counts[layer_index] > 1:
            position = tensor_index - (ends[layer_index] - slots.counts[layer_index])
            what = f"{what} tensor {position} (of {slots.counts[layer_index]})"
            discarded = ("the model discards it (as it may MultiheadAttention's attention weights: every tensor "
                         "of a tuple is attributed to) or uses it under torch.no_grad()")
        causes = [discarded]
        quantized = next((f"{module_name or 'the model'} ({type(module).__module__}.{type(module).__name__})"
                          for root in root_modules(self.forward_func) for module_name, module in root.named_modules()
                          if type(module).__module__.startswith("torch.ao.nn.quantized")), None)
        if quantized is not None:
            causes.insert(0, f"the model runs quantized modules, such as {quantized}, whose ops have no "
                             "autograd formula (attribute the float model)")
        if len(self._layers) > 1:
            causes.insert(0, "another layer of the list computes its activation from it (and that activation is "
                             "replaced by its own path)")
        causes.append("the layer runs inside a torch.compile'd submodule (whose graph ignores hooks added after "
                      "compiling) or inside torch.utils.checkpoint(use_reentrant=True) (whose recomputation runs "
                      "without the path)")
        advice = "List layers that do not feed one another, or pass" if len(self._layers) > 1 else "Pass"
        return UnusedLayerError(
            f"The {what} of `{name}` ({type(self._layers[layer_index]).__name__}) does not reach the "
            f"model's output: {', '.join(causes[:-1])}, or {causes[-1]}. "
            "Its attributions would be zeros that mean nothing (Captum raises here too). "
            f"{advice} grad_kwargs={{'materialize_grads': True}} to accept zeros."
        )

    def _format_result(
        self, attributions: Tuple[torch.Tensor, ...], slots: LayerSlots
    ) -> LayerAttributions:
        """Captum's forms: per layer a tensor, or a tuple when it gives several
        tensors; a list over layers when ``layer`` was a list."""
        per_layer = [group if len(group) > 1 else group[0] for group in slots.split(attributions)]
        return per_layer if isinstance(self.layer, list) else per_layer[0]

    def compute_convergence_delta(
        self,
        attributions: Any,
        start_point: Any,
        end_point: Any,
        target: Any = None,
        additional_forward_args: Any = None,
    ) -> torch.Tensor:
        r"""Per example: sum of attributions - (F(end_point) - F(start_point)), with
        F evaluated on the model inputs (as Captum's LayerIntegratedGradients does).

        Args:
            attributions (Tensor, tuple or list): the layer attributions of the
                examples in ``end_point``, as ``attribute`` returned them.
            start_point (scalar, Tensor or tuple, optional): the baselines (model inputs).
            end_point (Tensor or tuple[Tensor, ...]): the model inputs.
            target, additional_forward_args: as in ``attribute``.

        Returns:
            Tensor of shape (number of examples,).
        """
        groups = attributions if isinstance(attributions, (tuple, list)) else (attributions,)
        flat = tuple(t for group in groups for t in (group if isinstance(group, tuple) else (group,)))
        return convergence_delta_by_forward(
            self.forward_func, flat, start_point, end_point, target, additional_forward_args)

    def attribute_future(self) -> None:
        """Not implemented, as in Captum."""
        raise NotImplementedError("attribute_future is not implemented for LayerIntegratedGradients")
