"""LLMGradientAttribution: a drop-in for Captum's, with every target token in one pass.

Captum 0.9's ``LLMGradientAttribution`` runs one LayerIntegratedGradients per
target token t, over the prompt followed by the first t target tokens, and keeps
the attributions of the prompt. For a causal model the log-probability of token t
depends only on the tokens before it, so one forward over prompt + target gives
every target token's log-probability at once (position P - 1 + t predicts token
t), and the path moves the prompt's embeddings only: the per-token runs of Captum
are all slices of one integral. Per path point igfast therefore runs one forward
and T backwards (one per target token) instead of T forwards and T backwards over
prefixes of growing length.

What one path row costs, and how ``memory_budget`` splits it (the row limit comes
from the engine's measured chunk peaks, as for every igfast method):

- per row: the model's activations for P + T - 1 tokens kept for backward, the
  logits of the T target positions only (``logits_to_keep`` when the model has it)
  and their log-softmax, plus one backward's gradients at a time (the forward
  graph is retained across the T backwards, the gradients are not);
- each backward's gradient with respect to the layer is contracted at once with
  the layer's (input - baseline) difference (Captum multiplies, then sums over the
  embedding dimension), so what is kept per row and token is P numbers;
- held for the whole call: T x P float32 accumulators (``accumulator_bytes``),
  whatever the model's width; the layer's activations at both ends (2 x (P + T - 1)
  x width) come from the first call, as in LayerIntegratedGradients.

So the number of target tokens changes how long a chunk takes, not how many rows
fit, beyond the T-proportional logits and accumulators.
"""

import inspect
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from ..chunking import Chunk, choose_row_limit
from ..dtypes import dtype_policy, integer_item
from ..engine import PathIntegral, integrate_gradients, outside_inference_mode
from ..errors import ArgumentError, ArgumentTypeError, InputTypeError, LayerError, TargetError, TokenIdError
from ..quadrature import PIECE_METHODS, path_nodes
from ._captum_protocol import CaptumMembers
from ._forms import repeat_rows
from ._layers import activations_replaced, record_activations
from .layer_integrated_gradients import LayerIntegratedGradients
from .llm_inputs import TokenPrompt, captum_input_classes, token_prompt
from .llm_result import make_result, pretty_tokens

# Captum's generation defaults when ``target`` is None and ``gen_args`` is not given.
DEFAULT_GEN_ARGS: Dict[str, Any] = {"max_new_tokens": 25, "do_sample": False, "temperature": None, "top_p": None}
# The keyword arguments attribute() passes on to the path integral.
PATH_ARGUMENTS = ("n_steps", "method", "internal_batch_size", "memory_budget", "attribute_to_layer_input",
                  "grad_kwargs")


class LLMGradientAttribution(CaptumMembers):
    r"""Attributions of a language model's output tokens to its prompt, as Captum's
    ``LLMGradientAttribution`` over ``LayerIntegratedGradients``, in one pass.

    Args:
        attr_method: ``igfast.LayerIntegratedGradients(model, layer)`` (or Captum's,
            whose model, layer and ``multiply_by_inputs`` are taken): ``model`` is a
            Hugging Face style causal LM (``model(ids).logits``, ``model.generate``),
            ``layer`` usually ``model.get_input_embeddings()``.
        tokenizer: the model's Hugging Face tokenizer.
    """

    # Captum's class attributes, for code that reads them: the input classes of igfast
    # and Captum (Captum's LLMGradientAttribution takes TextTokenInput only; a
    # TextTemplateInput is attributed here too), and igfast's LayerIntegratedGradients
    # (Captum's is converted: _layer_integrated_gradients).
    SUPPORTED_INPUTS = sum(captum_input_classes(), ())
    SUPPORTED_METHODS = (LayerIntegratedGradients,)

    @property
    def multiplies_by_inputs(self) -> bool:
        """False, as Captum's LLMGradientAttribution reports (its base's default);
        whether the layer attributions are multiplied is the attr_method's choice."""
        return False

    def has_convergence_delta(self) -> bool:
        """False, as in Captum: attribute() returns no convergence delta."""
        return False

    def __init__(self, attr_method: Any, tokenizer: Any) -> None:
        self.attr_method = _layer_integrated_gradients(attr_method)
        self.model: nn.Module = self.attr_method.forward_func
        self.forward_func = self.model
        self.tokenizer = tokenizer
        self.device = (self.model.device if hasattr(self.model, "device")
                       else next(self.model.parameters()).device)
        # The integral of the last call: its chunks (model calls = len + 1) and peaks.
        self.last_integral: Optional[PathIntegral] = None

    def attribute(self, inp: Any, target: Union[str, torch.Tensor, None] = None,
                  gen_args: Optional[Dict[str, Any]] = None, **kwargs: Any):
        r"""Attribute each target token's log-probability to the prompt's features.

        Args:
            inp: ``TextTokenInput`` or ``TextTemplateInput`` (Captum's or igfast's).
            target (str or Tensor, optional): the continuation to attribute, as text
                (tokenized without special tokens) or token ids. None: the model
                generates it with ``gen_args``.
            gen_args (dict, optional): ``model.generate`` arguments when ``target`` is
                None. Default (Captum's): 25 new tokens, greedy.
            **kwargs: passed to the path integral, as Captum passes them to
                LayerIntegratedGradients.attribute: ``n_steps``, ``method``,
                ``internal_batch_size``, ``memory_budget`` (the whole call stays within
                it), ``attribute_to_layer_input``, ``grad_kwargs``, and for a
                TextTokenInput ``baselines`` in its interpretable space.

        Returns:
            ``captum.attr.LLMAttributionResult`` when Captum is installed, else
            ``igfast.LLMAttributionResult`` (same fields): ``seq_attr`` (n_features,),
            the sum over target tokens of ``token_attr`` (T, n_features),
            ``input_tokens`` (the features) and ``output_tokens``.
        """
        path_arguments = _path_arguments(kwargs)
        prompt = token_prompt(inp, self.tokenizer, kwargs.pop("baselines", None))
        targets = self._target_tokens(inp, prompt, target, gen_args)
        per_position, self.last_integral = attribute_prompt_to_targets(
            self.model, self.attr_method.layer, prompt.ids.to(self.device), prompt.baseline_ids.to(self.device),
            targets.to(self.device), multiply_by_inputs=self.attr_method.multiplies_by_inputs, **path_arguments)
        token_attr = prompt.features_from_positions(per_position)
        both = inp.format_attr(torch.cat([token_attr.sum(0, keepdim=True), token_attr]))
        return make_result(seq_attr=both[0], token_attr=both[1:], input_tokens=list(inp.values),
                           output_tokens=pretty_tokens(targets, self.tokenizer))

    def _target_tokens(self, inp: Any, prompt: TokenPrompt, target: Any, gen_args: Optional[Dict[str, Any]]):
        """The target token ids (T,): given, tokenized, or generated (Captum's rules)."""
        if target is None:
            if not callable(getattr(self.model, "generate", None)):
                raise ArgumentError("`target` is None but the model has no generate(): give the target.")
            ids = prompt.ids.to(self.device)
            with torch.no_grad():
                generated = self.model.generate(input_ids=ids, **(gen_args or DEFAULT_GEN_ARGS))
            targets = generated[0][ids.shape[1]:]
        elif gen_args is not None:
            raise ArgumentError("`gen_args` must be None when `target` is given (it is for generation).")
        elif isinstance(target, str):
            targets = torch.tensor(self.tokenizer.encode(target, add_special_tokens=False), dtype=torch.long)
        elif isinstance(target, torch.Tensor):
            if target.dtype.is_floating_point or target.dtype == torch.bool or target.dim() != 1:
                # Captum: TypeError for a 0-dim tensor (it iterates over it), IndexError for
                # floating ids (it indexes the log-probabilities with them)
                error = (ArgumentTypeError if target.dim() == 0
                         else TargetError if target.dtype.is_floating_point else ArgumentError)
                raise error(f"A tensor `target` must be 1-D token ids; got {target.dtype} {tuple(target.shape)}.")
            targets = target.long()
        else:
            raise InputTypeError(
                f"`target` must be a str, a 1-D tensor of token ids or None; got {type(target).__name__}.")
        if targets.numel() == 0:
            raise ArgumentError("`target` has no tokens: there is nothing to attribute.")
        vocabulary = _vocabulary_size(self.model)
        if vocabulary is not None and bool(((targets < 0) | (targets >= vocabulary)).any()):
            raise TokenIdError(  # Captum: IndexError (indexing the logits), OverflowError (decoding)
                f"`target` token ids must be in [0, {vocabulary}) (the model's vocabulary); got "
                f"{targets[(targets < 0) | (targets >= vocabulary)].tolist()}.")
        return targets

    def attribute_future(self) -> None:
        """Not implemented, as in Captum."""
        raise NotImplementedError("attribute_future is not implemented for LLMGradientAttribution")


def _vocabulary_size(model: nn.Module) -> Optional[int]:
    """The number of logits per position, where the model says (Hugging Face: its
    output embeddings, or config.vocab_size); None where it does not."""
    output_embeddings = getattr(model, "get_output_embeddings", None)
    weight = getattr(output_embeddings(), "weight", None) if callable(output_embeddings) else None
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) else None


def _layer_integrated_gradients(attr_method: Any) -> LayerIntegratedGradients:
    """igfast's LayerIntegratedGradients for ``attr_method`` (Captum's is converted)."""
    if not isinstance(attr_method, LayerIntegratedGradients):
        try:
            from captum.attr import LayerIntegratedGradients as CaptumLayerIG
        except Exception:
            CaptumLayerIG = ()
        if not (CaptumLayerIG and isinstance(attr_method, CaptumLayerIG)):
            raise ArgumentError(
                f"LLMGradientAttribution does not support {type(attr_method)}: igfast attributes all "
                "tokens in one pass with LayerIntegratedGradients (igfast's or Captum's); for Captum's "
                "other gradient methods use captum.attr.LLMGradientAttribution."
            )
        attr_method = LayerIntegratedGradients(attr_method.forward_func, attr_method.layer,
                                               multiply_by_inputs=attr_method.multiplies_by_inputs)
    if not isinstance(attr_method.forward_func, nn.Module):
        raise ArgumentError("The attribution method's forward_func must be the language model (an nn.Module).")
    if attr_method.layer is None or isinstance(attr_method.layer, list):
        # Captum: AttributeError, when it reads the list as a tensor
        raise ArgumentTypeError("LLM attribution needs one layer (e.g. model.get_input_embeddings()), not a list.")
    return attr_method


def _path_arguments(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Split the path integral's arguments from ``kwargs``; refuse those that cannot apply."""
    if kwargs.get("return_convergence_delta") is False:  # (Captum's default, given explicitly)
        del kwargs["return_convergence_delta"]
    refused = {
        "additional_forward_args": "the wrapper gives the model its inputs",
        "target": "the target tokens are the wrapper's `target`",
        "targets": "the target tokens are the wrapper's `target`",
        "return_convergence_delta": "LLMAttributionResult has no delta",
    }
    for name, why in refused.items():
        if name in kwargs:
            # Captum: AttributeError (its result has no delta), TypeError (the others).
            raise ArgumentTypeError(f"`{name}` cannot be passed to LLMGradientAttribution.attribute: {why}.")
    unknown = sorted(set(kwargs) - set(PATH_ARGUMENTS) - {"baselines"})
    if unknown:  # Captum: TypeError (unexpected keyword argument)
        raise ArgumentTypeError(
            f"Unknown keyword argument(s) {unknown}; accepted: {list(PATH_ARGUMENTS) + ['baselines']}.")
    if "n_steps" in kwargs:
        kwargs["n_steps"] = integer_item(kwargs["n_steps"], any_shape=True)  # Captum takes a one-element tensor
    if isinstance(kwargs.get("n_steps"), str) and kwargs["n_steps"] == "auto":
        # Captum: TypeError (it compares the string with a number)
        raise ArgumentTypeError("n_steps='auto' is not available for LLM attribution; give an integer n_steps.")
    if kwargs.get("method") in PIECE_METHODS:
        raise ArgumentError(
            f"method={kwargs['method']!r} is not available for LLM attribution (a language model is not "
            "piecewise linear); give a fixed rule such as 'gausslegendre' with an integer n_steps.")
    return {name: kwargs.pop(name) for name in PATH_ARGUMENTS if name in kwargs}


class TargetLogProbs(nn.Module):
    """log p(target_t | ids[:, :P + t]) for every target token t: (rows, T) from one
    forward of ``model`` over (rows, P + T - 1) ids. Only the logits of the last T
    positions are computed when the model accepts ``logits_to_keep`` (Hugging Face)."""

    def __init__(self, model: nn.Module, targets: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.targets = targets
        try:
            self.keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            self.keeps_logits = False

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        count = self.targets.shape[0]
        output = self.model(ids, logits_to_keep=count) if self.keeps_logits else self.model(ids)
        logits = getattr(output, "logits", output)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[1] < count:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ArgumentError(
                "The model must return (batch, sequence, vocabulary) logits (or an output with "
                f"`.logits`) for (batch, sequence) ids; got {shape} for ids {tuple(ids.shape)}.")
        # As Captum: log_softmax in the logits' dtype, then the target's entry.
        log_probs = logits[:, -count:].log_softmax(-1)
        index = self.targets.to(log_probs.device).expand(ids.shape[0], count).unsqueeze(-1)
        return log_probs.gather(-1, index).squeeze(-1)


def _looks_ahead(log_probs: torch.Tensor) -> bool:
    """From the log-probabilities (rows, T) of the sequence (the first row) and of a
    copy whose last token differs (the last row): whether an earlier position's output changed.
    A causal LM's cannot; a bidirectional one's (BERT) does, and then one pass over
    prompt + target would let each target token see the later ones."""
    # The rows run in one call, so a causal model gives bit-equal earlier positions (in any
    # dtype); a small random BERT's moved by 1e-4 on log-probabilities of 6.
    before = log_probs[[0, -1], :-1].double()
    allowed = 16 * torch.finfo(torch.float32).eps * max(1.0, float(before[0].abs().max()))
    return bool((before[0] - before[1]).abs().max() > allowed)


def _other_token(model: nn.Module, token: int) -> int:
    vocabulary = _vocabulary_size(model)
    return (token + 1) % vocabulary if vocabulary else (token - 1 if token > 0 else token + 1)


@outside_inference_mode
def attribute_prompt_to_targets(
    model: nn.Module,
    layer: nn.Module,
    prompt_ids: torch.Tensor,
    baseline_ids: torch.Tensor,
    targets: torch.Tensor,
    multiply_by_inputs: bool = True,
    n_steps: int = 50,
    method: str = "gausslegendre",
    internal_batch_size: Union[None, int, str] = None,
    memory_budget: Union[None, int, str] = None,
    attribute_to_layer_input: bool = False,
    grad_kwargs: Optional[Dict[str, Any]] = None,
    context: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, PathIntegral]:
    r"""Layer IG of every target token's log-probability, summed over the layer's
    feature dimensions, at every prompt position: the one-pass core.

    Args:
        model: ids (1, L) -> logits (or an output with ``.logits``), causal.
        layer: the layer of ``model`` whose activation the path moves; its
            activation must be (rows, L, ...) (dim 1: positions).
        prompt_ids, baseline_ids: (1, P) token ids at the path's end and start.
        targets: (T,) the target token ids that follow the prompt.
        multiply_by_inputs, n_steps, method, internal_batch_size, memory_budget,
            attribute_to_layer_input, grad_kwargs: as in LayerIntegratedGradients.
        context: the tokens between the prompt and the targets' positions (default:
            the targets but the last, each predicting the next).

    Returns:
        ``(attributions, integral)``: attributions (T, P) in the accumulation dtype
        (float32 for half and bfloat16 models); row t equals what Captum's
        LayerIntegratedGradients gives token t on the prefix, summed over the last
        dimension, at the prompt's positions.
    """
    if prompt_ids.shape != baseline_ids.shape or prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1:
        raise ArgumentError(f"`prompt_ids` and `baseline_ids` must both be (1, P); got "
                            f"{tuple(prompt_ids.shape)} and {tuple(baseline_ids.shape)}.")
    # Ids made under the caller's torch.inference_mode() are inference tensors, which the
    # embedding and the target's gather refuse to save for backward: plain copies.
    prompt_ids, baseline_ids, targets = (t.clone() if t.is_inference() else t
                                         for t in (prompt_ids, baseline_ids, targets))
    if context is not None and context.is_inference():
        context = context.clone()
    prompt_length, count = prompt_ids.shape[1], targets.shape[0]
    follow = (targets[:-1] if context is None else context).reshape(1, -1).to(prompt_ids)  # (the last target predicts nothing)
    ids = torch.cat([prompt_ids, follow], dim=1)
    length = ids.shape[1]
    log_probs = TargetLogProbs(model, targets)
    rows = [ids, torch.cat([baseline_ids, follow], dim=1)]
    check_causal = count > 1 and context is None
    if check_causal:  # (the same call, one row more: the sequence with its last token changed)
        changed = ids.clone()
        changed[0, -1] = _other_token(model, int(ids[0, -1]))
        rows.append(changed)

    with torch.no_grad():
        activations, slots, recorded = record_activations(
            [layer], attribute_to_layer_input, lambda: log_probs(torch.cat(rows)))
    if check_causal and _looks_ahead(recorded):
        # Each target token gets its own prefix, as in Captum's per-token runs.
        per_token = [attribute_prompt_to_targets(
            model, layer, prompt_ids, baseline_ids, targets[t:t + 1], multiply_by_inputs, n_steps, method,
            internal_batch_size, memory_budget, attribute_to_layer_input, grad_kwargs, context=targets[:t])
            for t in range(count)]
        return torch.cat([attributions for attributions, _ in per_token]), per_token[-1][1]
    if len(activations) != 1:
        raise ArgumentError("The layer must give one activation tensor (rows, positions, ...), not a tuple.")
    activation = activations[0]
    if not activation.is_floating_point():
        raise LayerError(f"The layer's activation must be floating to be interpolated; got {activation.dtype}.")
    if activation.dim() < 2 or activation.shape[:2] != (len(rows), length):
        raise LayerError(
            f"The layer's activation must be (rows, positions, ...): one row per sequence ({len(rows)} here, "
            f"the prompt, its baseline{', a check' if check_causal else ''}) and positions = prompt + target - 1 = {length}; got "
            f"{tuple(activation.shape)}. A layer whose output is shared by the rows (a position "
            "embedding) has nothing per prompt to attribute: use model.get_input_embeddings().")
    ends, starts = activation[:1], activation[1:2]
    nodes = path_nodes(method, n_steps)
    accumulate = dtype_policy(activation.dtype).accumulate
    accumulator_bytes = count * prompt_length * torch.finfo(accumulate).bits // 8
    row_limit = choose_row_limit(internal_batch_size, memory_budget, (ends,), nodes.count,
                                 target_count=1, accumulator_bytes=accumulator_bytes,
                                 result_count=0)  # (the result is the reduced accumulator's size)
    options = {k: v for k, v in (grad_kwargs or {}).items() if k != "retain_graph"}

    def gradients_at(path: Tuple[torch.Tensor, ...], chunk: Chunk, with_outputs: bool):
        rows = chunk.rows
        with activations_replaced([layer], attribute_to_layer_input, slots, path) as called:
            with torch.enable_grad():
                values = log_probs(repeat_rows(ids, chunk))
                # Captum's order: (x - x') in the layer's dtype, then in the accumulation dtype.
                direction = ((ends - starts) if multiply_by_inputs else torch.ones_like(ends))[:, :prompt_length]
                direction = direction.to(accumulate).reshape(1, 1, prompt_length, -1)
                contracted = torch.empty((count, rows, prompt_length), dtype=accumulate, device=ids.device)
                for t in range(count):
                    (grad,) = torch.autograd.grad(
                        values[:, t], path, grad_outputs=torch.ones_like(values[:, t]),
                        retain_graph=t < count - 1, allow_unused=True, materialize_grads=True, **options)
                    grad = grad[:, :prompt_length].to(accumulate).reshape(chunk.steps, chunk.examples,
                                                                          prompt_length, -1)
                    contracted[t] = (grad * direction).sum(-1).reshape(rows, prompt_length)
                    del grad
        if not all(called):
            raise ArgumentError("`layer` was not called by the model on the path inputs.")
        return (contracted,), None

    integral = integrate_gradients((ends,), (starts,), nodes, gradients_at, row_limit, target_count=count,
                                   gradient_shapes=[(1, prompt_length)])
    return integral.gradient_sums[0][:, 0], integral
