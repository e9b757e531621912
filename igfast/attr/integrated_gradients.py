"""IntegratedGradients: the Captum-compatible entry point of igfast."""

from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch

from ..adaptive import (
    AdaptiveIntegral, AdaptiveSettings, adaptive_settings, integrate_adaptively, refuse_several_targets,
    round_row_limit, warn_if_not_converged,
)
from ..chunking import Chunk, RowCosts, choose_row_limit, shared_argument
from ..engine import PathIntegral, integrate_gradients, is_out_of_memory
from ..errors import ArgumentError, ArgumentTypeError, NotPiecewiseLinearError
from ..exact import (
    POINT_NODES, ExactIntegral, ExactParts, ExactRoute, ExactSettings, check_completeness,
    exact_settings, integrate_exactly,
)
from ..exact import refuse_several_targets as refuse_several_targets_exactly
from ..dtypes import integer_item
from ..quadrature import PIECE_METHODS, path_nodes
from ._captum_protocol import CaptumMembers, captum_bases, wrappable_by_captum
from ._train_mode import batch_dependent_call, guarded
from ._completeness import attributions_from, convergence_delta, convergence_delta_per_target
from ._forms import (
    expand_additional_forward_args,
    format_additional_forward_args,
    format_baselines,
    format_inputs,
    full_batch,
    promote_to_baselines,
    select_additional_forward_args,
    select_examples,
)
from ._layers import compiled_original, eager_original, torchscript_part
from ._gradients import (
    compute_gradients, forward_output, gradients_and_outputs, gradients_and_outputs_per_target,
    run_forward, values_per_target,
)
from ._multi_target import resolve_targets
from ._target import expand_target, normalize_target

TensorOrTuple = Union[torch.Tensor, Tuple[torch.Tensor, ...]]


WALK_NEEDS_EAGER = (
    "igfast: method='exact' walks the path's pieces in the eager original of this torch.compile'd "
    "model (forward-mode AD and the breakpoint mode run eagerly); the gradients of the pieces run "
    "compiled.")
AUTO_KEEPS_RULE_WHEN_COMPILED = (
    "a torch.compile'd model keeps n_steps='auto''s rule: walking its pieces would run its eager "
    "original (pass method='exact' to ask for that)")


class IntegratedGradients(CaptumMembers, *captum_bases("IntegratedGradients")):
    r"""Integrated Gradients (Sundararajan, Taly and Yan, 2017), as in Captum.

    A drop-in replacement for ``captum.attr.IntegratedGradients``: the same
    arguments, results and errors, computed with one vectorised backward pass per
    chunk of path points instead of one autograd output per row. Chunks are sized
    to a memory budget (``memory_budget``, or a share of the free memory), and may
    split the batch, so peak memory stays bounded whatever n_steps and batch size.

    For each input feature i, with baseline x' and input x,

        IG_i(x) = (x_i - x'_i) * integral_0^1 dF(x' + a (x - x')) / dx_i da,

    approximated by a quadrature rule of ``n_steps`` nodes.

    Args:
        forward_func (Callable or torch.nn.Module): the model or function to explain.
            It is called as ``forward_func(*inputs, *additional_forward_args)`` and
            returns a tensor with one row per example.
        multiply_by_inputs (bool, optional): multiply the integrated gradients by
            (inputs - baselines), giving global attributions whose sum over features
            approximates F(inputs) - F(baselines). Default: True.
    """

    def __init__(self, forward_func: Callable, multiply_by_inputs: bool = True) -> None:
        if not callable(forward_func):  # Captum: TypeError, when it calls it
            raise ArgumentTypeError(
                f"`forward_func` must be callable (a model or function); got {type(forward_func).__name__}."
            )
        self.forward_func = forward_func
        self._multiply_by_inputs = multiply_by_inputs
        # Captum's LayerIntegratedGradients replaces this slot with its own function.
        self.gradient_func = compute_gradients
        self._row_costs = RowCosts()  # what earlier calls measured: later ones need no probe

    @property
    def multiplies_by_inputs(self) -> bool:
        return self._multiply_by_inputs

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
        memory_budget: Union[None, int, str] = None,
        targets: Optional[Sequence[Any]] = None,
        tolerance: Optional[float] = None,
        max_steps: Optional[int] = None,
        return_adaptive_info: bool = False,
    ) -> Union[TensorOrTuple, Tuple[Any, ...]]:
        r"""Attribute the target output to every input feature.

        Args:
            inputs (Tensor or tuple[Tensor, ...]): the examples to explain; dim 0
                indexes examples and is the same for every tensor. Floating dtypes
                (float16, bfloat16, float32, float64); integer inputs are attributed
                in the default dtype, as Captum does.
            baselines (scalar, Tensor or tuple, optional): start points of the path,
                one per input tensor: a number, or a tensor shaped like the input or
                with first dimension 1 that broadcasts to it (e.g. a per-channel mean
                (1, C, 1, 1) for images). Default: zeros.
            target (int, tuple, list or Tensor, optional): which output value to
                attribute: None when the forward returns one value per example; an
                int (or tuple for outputs of higher rank) for all examples; a list
                or 1-D tensor with one target per example.
            additional_forward_args (Any, optional): passed to ``forward_func``
                after the inputs; a non-tuple value is wrapped in a tuple. Tensors
                with a dimension are repeated for every path step.
            n_steps (int or "auto", optional): number of quadrature nodes. "auto"
                (igfast only): refine each example's rule until its estimated error
                is within ``tolerance`` (see ``tolerance``). Default: 50.
            method (str, optional): ``gausslegendre``, ``riemann_left``,
                ``riemann_right``, ``riemann_middle`` or ``riemann_trapezoid``; or
                ``exact`` (igfast only): for networks of affine maps and
                piecewise-linear ops (ReLU, LeakyReLU, hardtanh/clamp, abs,
                maximum/minimum, max-pool), the path's linear pieces are found and
                each contributes one gradient times its length, so there is no
                quadrature error (n_steps is ignored). A smooth head after the last
                piecewise-linear op (softmax, sigmoid, ...) is integrated with 3
                Gauss-Legendre nodes per piece (a warning when the midpoint rule
                differs from them by over 1e-2; ``tolerance`` refines them). Other
                networks, and smooth ones without any kink, raise
                NotPiecewiseLinearError naming the op. ``gausslegendre_pieces``
                (igfast only): for networks whose kinks follow smooth ops (tanh,
                layer norm, attention before a ReLU), the kinks are located by
                Newton steps along the path and each piece between them gets 3
                Gauss-Legendre nodes; pieces longer than 3 / n_steps are cut, so
                the smooth stretches get about n_steps nodes. Default:
                ``gausslegendre``.
            internal_batch_size (int or "auto", optional): an int: at most this
                many path rows per forward/backward, whole steps of the batch (as
                in Captum; a float counts as its floor). "auto" (or None): chunks
                sized to fit a memory budget, ``memory_budget`` or a share of the
                device's free memory, and split below one step of the batch when
                needed. The result does not
                depend on it. Default: None.
            return_convergence_delta (bool, optional): also return, per example,
                sum(attributions) - (F(inputs) - F(baselines)). With a fixed
                n_steps, F(inputs) and F(baselines) come from two more forward
                calls, as in Captum (so the delta is Captum's to the bit); with
                n_steps="auto" they are read from the calls its path made anyway.
                Default: False.
            memory_budget (int or str, optional): the most memory this call may
                add, in bytes or as a size such as "2GB" or "512MiB": the
                accumulators plus the peak of one chunk. Chunks are sized from the
                measured peak of the first one (a single path row). Default: None.
            targets (list, optional; igfast only): K targets, each in any form of
                ``target``, attributed in one pass (one forward per path point, one
                backward per target). ``target="all"`` (every class) and
                ``target="topk:k"`` (each example's k top classes at the inputs) ask
                the same. Attributions then have a leading K dimension and the delta
                is shaped (K, B).
            tolerance (float, optional; n_steps="auto", or the Gauss nodes on the
                pieces of method="gausslegendre_pieces" or of a smooth head with
                method="exact", which it makes adaptive): the relative error
                each example is refined to. The estimate is the larger of the exact
                completeness error relative to |F(inputs) - F(baselines)| (floored at
                1% of max(|F(inputs)|, |F(baselines)|) and at the attributions' L2
                norm) and the relative L2 change of
                the attributions at the last doubling of the rule. Nested
                Clenshaw-Curtis rules of 5, 9, 17, 33, ... nodes; every evaluation is
                reused and a converged example stops costing. One forward with
                derivatives along the path classifies the network: a smooth one
                starts from 3 and 5 nodes and, where the changes fall geometrically,
                estimates from their ratio; on a piecewise-linear one an example
                switches to method="exact" when that is predicted cheaper than
                refining its rule, and below 33 nodes the change counts double (there
                it alone understated the error); on a mixed one (smooth ops before
                kinks) it switches to the pieces of method="gausslegendre_pieces",
                integrated by Gauss pairs bisected until their estimate is within
                tolerance. Default: 1e-3.
            max_steps (int, optional; n_steps="auto" or method="exact"): with "auto",
                the most path points per example of its rules (the largest rule
                2^k + 1 <= max_steps; at least 9); examples that reach it are returned
                with ``converged`` False. The forward that classifies the network
                counts as one evaluation more for the examples it reads (so
                ``evaluations`` may show max_steps + 1), and the walk of an example that
                switched to method="exact" is predicted within max_steps, not bounded by
                it. Default: 257. With "exact", the most linear pieces
                per path; more raise ArgumentError. Default: 65536.
            return_adaptive_info (bool, optional; n_steps="auto" or method="exact"):
                also return, with "auto", an ``AdaptiveInfo`` with, per example,
                ``evaluations`` (path points evaluated, the classifying forward, and
                the walk's forwards of examples that switched to exact), ``error_estimate``,
                ``completeness_error``, ``converged`` and ``exact`` (switched), and
                ``exact_unavailable`` (why none could switch); with "exact", an
                ``ExactInfo`` with per example ``pieces``, ``evaluations`` (with
                ``rows_check``: the four rows that check the model keeps examples
                along dim 0) and ``breakpoints`` (t of each piece's start), ``smooth_head`` and, with
                Gauss nodes, ``head_error_estimate`` (relative; the midpoint rule's
                distance, or with ``tolerance`` the Gauss pairs' estimate).
                Default: False.

        Returns:
            attributions, shaped like ``inputs`` (a tensor for a tensor, a tuple for
            a tuple), in the input dtype (float32 for float16/bfloat16 inputs, as
            Captum); with ``return_convergence_delta``, ``(attributions, delta)``
            where delta has one value per example; with ``return_adaptive_info``,
            the AdaptiveInfo last.
        """
        formatted_inputs, is_tuple = format_inputs(inputs)
        formatted_inputs = promote_to_baselines(formatted_inputs, baselines)
        formatted_baselines = format_baselines(baselines, formatted_inputs)
        n_steps = integer_item(n_steps, any_shape=True)  # Captum takes a one-element tensor
        exact = exact_settings(n_steps, tolerance, max_steps, method) if method in PIECE_METHODS else None
        adaptive = None if exact else adaptive_settings(n_steps, method, tolerance, max_steps, return_adaptive_info)
        batch_size = formatted_inputs[0].shape[0]
        args = format_additional_forward_args(additional_forward_args)
        device = formatted_inputs[0].device
        many = resolve_targets(
            target, targets, batch_size, device,
            lambda: _outputs_without_grad(self.forward_func, formatted_inputs, args, memory_budget),
        )
        if many is not None and self.gradient_func is not compute_gradients:
            raise ArgumentError("Several targets need igfast's own gradient_func (not Captum's LayerIG).")
        chunk_target = None if many is not None else normalize_target(target, batch_size, device)
        refuse_several_targets(adaptive, many)
        refuse_several_targets_exactly(exact, many)
        if exact is not None:
            self._refuse_foreign_gradient_func(f"method={method!r}")
            integral = self._integrate_exactly(formatted_inputs, formatted_baselines, chunk_target, args,
                                               exact, internal_batch_size, memory_budget)
        elif adaptive is not None:
            if self.gradient_func is not compute_gradients:
                raise ArgumentError(
                    "n_steps='auto' needs igfast's own gradient_func (it reads F along the "
                    "path); Captum's LayerIntegratedGradients replaces it: use "
                    "igfast.LayerIntegratedGradients.")
            integral = self._integrate_adaptively(
                formatted_inputs, formatted_baselines, chunk_target, args, adaptive,
                internal_batch_size, memory_budget)
        else:
            nodes = path_nodes(method, n_steps)
            target_count = len(many) if many else 1
            cost_key = RowCosts.key(formatted_inputs, args or (), target_count)
            row_limit = choose_row_limit(internal_batch_size, memory_budget, formatted_inputs,
                                         nodes.count, target_count=target_count,
                                         result_count=target_count + (target_count > 1),  # (+ _per_target's copy)
                                         batch_dependent=batch_dependent_call(),
                                         whole_steps=shared_argument(args, formatted_inputs[0].shape[0]),
                                         known_row_cost=self._row_costs.get(cost_key))
            integral = integrate_gradients(
                formatted_inputs, formatted_baselines, nodes,
                self._gradients_at(chunk_target, many, args), row_limit,
                target_count=len(many) if many is not None else None,
            )
            self._row_costs.remember(cost_key, row_limit)
        self.last_integral: Union[PathIntegral, AdaptiveIntegral, ExactIntegral] = integral
        attributions = attributions_from(
            integral, formatted_inputs, formatted_baselines, self.multiplies_by_inputs
        )
        result = attributions if is_tuple else attributions[0]
        extras = []
        if return_convergence_delta:
            extras.append(self._delta(attributions, integral, many, adaptive is not None,
                                      inputs, baselines, target, additional_forward_args,
                                      examples_per_forward(integral, memory_budget)))
        if return_adaptive_info:
            extras.append(integral.info)
        elif adaptive is not None:
            warn_if_not_converged(integral.info)
        return (result, *extras) if extras else result

    def _gradients_at(self, chunk_target: Any, many: Optional[list], args: Any, forward: Optional[Callable] = None):
        """The engine's gradients_at for a target (or K targets) and forward args, through
        ``forward`` (default: forward_func)."""
        forward = forward or self.forward_func
        # The examples whose targets were range-checked: each is checked once per call,
        # not once per chunk (a reduction, and a synchronisation on a GPU).
        checked = set()

        def gradients_at(path: Tuple[torch.Tensor, ...], chunk: Chunk, with_outputs: bool):
            chunk_args = expand_additional_forward_args(args, chunk)
            examples = (chunk.example_begin, chunk.example_end)
            check = examples not in checked
            checked.add(examples)
            if many is not None:
                return gradients_and_outputs_per_target(
                    forward, path, [expand_target(t, chunk) for t in many], chunk_args,
                    check_targets=check, many_targets=True)
            target_ind = expand_target(chunk_target, chunk)
            if self.gradient_func is compute_gradients:
                grads, outputs = gradients_and_outputs(forward, path, target_ind, chunk_args,
                                                       check_targets=check)
                return grads, outputs if with_outputs else None
            grads = self.gradient_func(
                forward_fn=forward, inputs=path, target_ind=target_ind,
                additional_forward_args=chunk_args,
            )
            return grads, None

        return gradients_at

    def _refuse_foreign_gradient_func(self, what: str) -> None:
        if self.gradient_func is not compute_gradients:
            raise ArgumentError(
                f"{what} needs igfast's own gradient_func; Captum's LayerIntegratedGradients "
                "replaces it: use igfast.LayerIntegratedGradients.")

    def _integrate_exactly(self, inputs, baselines, target, args, settings: ExactSettings,
                           internal_batch_size, memory_budget) -> ExactIntegral:
        # The walk runs a compiled model's eager original: forward-mode AD and the
        # breakpoint mode run eagerly. The gradient rounds run it as given.
        scripted = torchscript_part(self.forward_func)
        if scripted is not None:
            raise NotPiecewiseLinearError(
                f"method={settings.method!r} cannot walk a TorchScript model ({scripted}): its interpreter runs "
                "the ops without forward-mode tangents or the walk's reading of them. Pass the eager model, "
                "or use a fixed n_steps or n_steps='auto' (its rule) for this one.")
        eager = eager_original(self.forward_func, WALK_NEEDS_EAGER)
        parts = self._exact_parts(inputs, target, args, eager, internal_batch_size, memory_budget)
        integral = integrate_exactly(inputs, baselines, settings, *parts)
        batch_size = inputs[0].shape[0]
        per_call = examples_per_forward(integral, memory_budget)
        with torch.no_grad():
            start_values = _forward_values(self.forward_func, baselines, target, args, batch_size, per_call)
            end_values = _forward_values(self.forward_func, inputs, target, args, batch_size, per_call)
        check_completeness(integral, inputs, baselines, start_values, end_values)
        return integral

    def _exact_parts(self, inputs, target, args, eager: Callable, internal_batch_size, memory_budget) -> ExactParts:
        """integrate_exactly's run_round, forward_at and row limit for these examples."""
        batch_size = inputs[0].shape[0]
        # One limit for every round: measured in the first (a walk round, the costliest
        # rows), then settled. The driver holds the sums, the directions and the points.
        row_limit = choose_row_limit(internal_batch_size, memory_budget, inputs, 1, target_count=3, walk=True,
                                     batch_dependent=batch_dependent_call())

        def run_round(examples: torch.Tensor, points, wrap) -> PathIntegral:
            gradients_at = self._gradients_at(
                select_examples(target, examples, batch_size), None,
                select_additional_forward_args(args, examples, batch_size),
                forward=eager if wrap else None)
            sub_inputs = tuple(select_examples(x, examples, batch_size) for x in inputs)
            return integrate_gradients(sub_inputs, points, POINT_NODES,
                                       wrap(gradients_at) if wrap else gradients_at, row_limit)

        def forward_at(examples: torch.Tensor, points) -> Any:
            return eager(*points, *(select_additional_forward_args(args, examples, batch_size) or ()))

        return run_round, forward_at, row_limit

    def _integrate_adaptively(self, inputs, baselines, target, args, settings: AdaptiveSettings,
                              internal_batch_size, memory_budget) -> AdaptiveIntegral:
        batch_size = inputs[0].shape[0]

        def run_round(examples: torch.Tensor, nodes) -> PathIntegral:
            sub_inputs = tuple(select_examples(x, examples, batch_size) for x in inputs)
            sub_baselines = tuple(select_examples(b, examples, batch_size) for b in baselines)
            row_limit = round_row_limit(settings, internal_batch_size, memory_budget, sub_inputs, nodes)
            gradients_at = self._gradients_at(
                select_examples(target, examples, batch_size), None,
                select_additional_forward_args(args, examples, batch_size))
            return integrate_gradients(sub_inputs, sub_baselines, nodes, gradients_at, row_limit)

        def exact_parts(examples: torch.Tensor) -> ExactParts:
            return self._exact_parts(tuple(select_examples(x, examples, batch_size) for x in inputs),
                                     select_examples(target, examples, batch_size),
                                     select_additional_forward_args(args, examples, batch_size),
                                     self.forward_func, internal_batch_size, memory_budget)

        # A torch.compile'd model keeps the rule: its walk would run eagerly (see
        # _integrate_exactly), which a call that did not ask for exact IG should not pay.
        # (LayerIntegratedGradients runs such a model eagerly anyway, and may switch.)
        if compiled_original(self.forward_func) is not None:
            return integrate_adaptively(inputs, baselines, settings, run_round,
                                        no_route_because=AUTO_KEEPS_RULE_WHEN_COMPILED)
        scripted = torchscript_part(self.forward_func)
        if scripted is not None:  # (its probe failed inside the TorchScript interpreter)
            return integrate_adaptively(inputs, baselines, settings, run_round,
                                        no_route_because=f"a TorchScript model ({scripted}) keeps n_steps='auto''s "
                                        "rule: the walk cannot read the ops its interpreter runs")
        return integrate_adaptively(inputs, baselines, settings, run_round,
                                    exact_route=ExactRoute(inputs, baselines, exact_parts))

    def _delta(self, attributions, integral, many, adaptive: bool, inputs, baselines, target,
               additional_forward_args, examples_per_call: Optional[int]) -> torch.Tensor:
        """The convergence delta: what ``compute_convergence_delta`` gives for these
        attributions, to the bit (two plain forward calls, as in Captum; under a memory
        budget, calls of examples_per_call examples, to float tolerance). n_steps="auto"
        has evaluated F(x') and F(x) on its path already and reads them there."""
        if adaptive:
            return convergence_delta(attributions, integral.start_values, integral.end_values)
        if many is None:
            return convergence_delta_by_forward(
                self.forward_func, attributions, baselines, inputs, target, additional_forward_args,
                examples_per_call)
        end_points, _ = format_inputs(inputs)
        batch_size = end_points[0].shape[0]
        start_points = format_baselines(baselines, end_points)
        args = format_additional_forward_args(additional_forward_args)
        with torch.no_grad():
            end_values, start_values = (
                values_per_target(_outputs_in_parts(self.forward_func, points, args, batch_size, examples_per_call),
                                  many, many_targets=True)
                for points in (end_points, start_points)
            )
        return convergence_delta_per_target(attributions, start_values, end_values)

    def compute_convergence_delta(
        self,
        attributions: TensorOrTuple,
        start_point: Any,
        end_point: TensorOrTuple,
        target: Any = None,
        additional_forward_args: Any = None,
    ) -> torch.Tensor:
        r"""Per example: sum of attributions - (F(end_point) - F(start_point)).

        Args:
            attributions (Tensor or tuple[Tensor, ...]): attributions of the
                examples in ``end_point``, one tensor per input.
            start_point (scalar, Tensor or tuple, optional): the baselines, in any
                form ``attribute`` accepts.
            end_point (Tensor or tuple[Tensor, ...]): the inputs.
            target, additional_forward_args: as in ``attribute``.

        Returns:
            Tensor of shape (number of examples,).
        """
        attributions_tuple = attributions if isinstance(attributions, tuple) else (attributions,)
        count = len(end_point) if isinstance(end_point, tuple) else 1
        if len(attributions_tuple) != count:
            raise ArgumentError(
                f"`attributions` must have one tensor per input: got {len(attributions_tuple)} "
                f"for {count} inputs."
            )
        return convergence_delta_by_forward(
            self.forward_func, attributions_tuple, start_point, end_point, target, additional_forward_args)

    def attribute_future(self) -> None:
        """Not implemented, as in Captum's IntegratedGradients."""
        raise NotImplementedError("attribute_future is not implemented for IntegratedGradients")


def convergence_delta_by_forward(forward_func: Callable, attributions: Tuple[torch.Tensor, ...], start_point: Any,
                                 end_point: Any, target: Any, additional_forward_args: Any,
                                 examples_per_call: Optional[int] = None) -> torch.Tensor:
    """sum(attributions) - (F(end_point) - F(start_point)) per example, F from one plain
    forward call at each end (Captum's ``compute_convergence_delta``). The points are
    model inputs, of any dtype (LayerIntegratedGradients passes token ids)."""
    end_points, _ = format_inputs(end_point, floating=False)
    start_points = format_baselines(start_point, end_points, argument="start_point")
    batch_size = end_points[0].shape[0]
    for attribution in attributions:
        if attribution.shape[0] != batch_size:
            raise ArgumentError(
                "Attributions tensor and the end_point must match on the first "
                f"dimension but found attribution: {attribution.shape[0]} and "
                f"end_point: {batch_size}."
            )
    normalized = normalize_target(target, batch_size, end_points[0].device)
    args = format_additional_forward_args(additional_forward_args)
    with torch.no_grad():
        start_values = _forward_values(forward_func, start_points, normalized, args, batch_size, examples_per_call)
        end_values = _forward_values(forward_func, end_points, normalized, args, batch_size, examples_per_call)
        return convergence_delta(attributions, start_values, end_values)


def _forward_values(forward_func: Callable, points: Tuple[torch.Tensor, ...], target: Any,
                    args: Optional[Tuple[Any, ...]], batch_size: int,
                    examples_per_call: Optional[int] = None) -> torch.Tensor:
    """The targeted output of every example from one call on the batch (points of
    batch_size rows, or 1: a baseline for all, repeated per call); if that runs out of
    memory, from calls on halves of it (then equal to float tolerance, not to the bit:
    the batch size changes the last bits of a model's output). Under a memory budget,
    from calls of ``examples_per_call`` examples (see examples_per_forward)."""
    if examples_per_call is None or batch_size <= examples_per_call:
        try:
            return run_forward(forward_func, tuple(full_batch(p, batch_size) for p in points), target, args)
        except Exception as error:
            if not is_out_of_memory(error) or batch_size < 2:
                raise
        parts = torch.arange(batch_size, device=points[0].device).tensor_split(2)
    else:
        parts = torch.arange(batch_size, device=points[0].device).split(examples_per_call)
    return torch.cat([
        _forward_values(forward_func, tuple(select_examples(p, part, batch_size) for p in points),
                        select_examples(target, part, batch_size),
                        select_additional_forward_args(args, part, batch_size), part.numel(), examples_per_call)
        for part in parts
    ])


def examples_per_forward(integral: Any, memory_budget: Any) -> Optional[int]:
    """Under a memory budget, how many examples a plain forward at the path's ends may
    take at once: as many as the largest chunk of path rows had (a forward without an
    autograd graph holds less than the chunk's forward and backward did). A forward of
    the whole batch went past the budget: 41 MiB under 8 MiB for a CNN's 256 examples.
    None without a budget: one call, whose output Captum's compute_convergence_delta
    gives to the bit."""
    if memory_budget is None:
        return None
    passes = getattr(integral, "rounds", None) or [integral]
    rows = [chunk.rows for one in passes for chunk in getattr(one, "chunks", ())]
    return max(rows) if rows else None


def _outputs_in_parts(forward_func: Callable, points: Tuple[torch.Tensor, ...], args: Optional[Tuple[Any, ...]],
                      batch_size: int, examples_per_call: Optional[int]) -> torch.Tensor:
    """The model's output at points of batch_size rows (or 1: a baseline for all,
    repeated per call), from one call, or from calls of ``examples_per_call`` examples."""
    if examples_per_call is None or batch_size <= examples_per_call:
        return forward_output(forward_func, tuple(full_batch(p, batch_size) for p in points), args)
    return torch.cat([
        forward_output(forward_func, tuple(full_batch(select_examples(p, part, batch_size), part.numel()) for p in points),
                       select_additional_forward_args(args, part, batch_size))
        for part in torch.arange(batch_size, device=points[0].device).split(examples_per_call)])


def _outputs_without_grad(forward_func: Callable, inputs, args, memory_budget: Any = None) -> torch.Tensor:
    """The model's output at the inputs, for target="all" / "topk:k". Under a memory
    budget, one example per call: nothing is measured yet to size larger calls, and a
    forward of the whole batch went past the budget (an encoder's 128 examples: 2.0x
    8 MiB); a forward of one example costs less than the call's n_steps rows of it."""
    with torch.no_grad():
        return _outputs_in_parts(forward_func, inputs, args, inputs[0].shape[0],
                                 None if memory_budget is None else 1)
