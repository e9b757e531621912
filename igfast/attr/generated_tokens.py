"""Attribute every generated token of a causal language model to the prompt, in one pass.

Per-token Integrated Gradients runs one IG per generated token, each over a longer
prefix. For a causal model the logits at position p depend only on tokens <= p,
so one forward over prompt + continuation gives every generated token's
log-probability at once; LayerIntegratedGradients with one target per generated
token then shares that forward at every path point and runs one backward per
token. The path moves only the prompt's embeddings (the baseline replaces prompt
tokens by ``baseline_token_id`` and keeps the continuation), which is exactly what
the per-token runs do on their prefixes.
"""

from typing import Any, Callable, Union

import torch
from torch import nn

from ..dtypes import integer_item
from ..errors import ArgumentError, LayerError, TargetError
from .layer_integrated_gradients import LayerIntegratedGradients


class GeneratedTokenLogProbs(nn.Module):
    """log p(ids[:, P + t] | ids[:, :P + t]) for t < T: a (B, T) output, one column
    per generated token, from one forward of ``model`` (ids -> (B, L, V) logits)."""

    def __init__(self, model: Callable, prompt_length: int) -> None:
        super().__init__()
        self.model = model
        self.prompt_length = prompt_length

    def forward(self, ids: torch.Tensor, *args: Any) -> torch.Tensor:
        output = self.model(ids, *args)
        logits = getattr(output, "logits", output)  # (a Hugging Face model's output)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[1] != ids.shape[1]:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ArgumentError(
                "`model` must return (batch, sequence, vocabulary) logits (or an output with `.logits`) "
                f"for (batch, sequence) token ids; got {got} for ids {tuple(ids.shape)}."
            )
        predicting = logits[:, self.prompt_length - 1:-1].log_softmax(-1)  # positions P-1 .. L-2
        generated = ids[:, self.prompt_length:]
        return predicting.gather(-1, generated.unsqueeze(-1)).squeeze(-1)


def attribute_generated_tokens(
    model: Callable,
    embedding_layer: nn.Module,
    prompt_ids: torch.Tensor,
    generated_ids: torch.Tensor,
    baseline_token_id: int,
    n_steps: int = 50,
    method: str = "gausslegendre",
    internal_batch_size: Union[None, int, str] = None,
    memory_budget: Union[None, int, str] = None,
    return_convergence_delta: bool = False,
    additional_forward_args: Any = None,
):
    r"""Attributions of each generated token's log-probability to the embeddings.

    Args:
        model: ids (B, L) -> logits (B, L, V), causal.
        embedding_layer: the layer whose output is attributed (e.g. the token
            embedding); a submodule of ``model`` when ``model`` is a module.
        prompt_ids (B, P) and generated_ids (B, T): token ids.
        baseline_token_id: the token that replaces the prompt at the path's start
            (e.g. [PAD]).
        n_steps, method, internal_batch_size, memory_budget,
            return_convergence_delta, additional_forward_args: as in
            LayerIntegratedGradients.attribute.

    Returns:
        attributions shaped (T, B, P + T, ...): slice t is the attribution of
        generated token t to every position (zero after the prompt, whose
        embeddings the path keeps fixed); with the delta, ``(attributions, delta)``
        where delta is (T, B).
    """
    for name, ids in (("prompt_ids", prompt_ids), ("generated_ids", generated_ids)):
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point:
            raise ArgumentError(f"`{name}` must be a (batch, length) tensor of token ids.")
    if prompt_ids.shape[0] != generated_ids.shape[0]:
        raise ArgumentError(
            f"`prompt_ids` and `generated_ids` must have the same batch; got "
            f"{prompt_ids.shape[0]} and {generated_ids.shape[0]}."
        )
    if prompt_ids.shape[1] < 1 or generated_ids.shape[1] < 1:
        raise ArgumentError("`prompt_ids` and `generated_ids` must each hold at least one token.")
    baseline_token_id = integer_item(baseline_token_id)
    if isinstance(baseline_token_id, bool) or not isinstance(baseline_token_id, int):
        raise ArgumentError(f"`baseline_token_id` must be an integer token id; got {baseline_token_id!r}.")
    vocabulary = embedding_layer.num_embeddings if isinstance(embedding_layer, nn.Embedding) else None
    if vocabulary is not None:
        for name, ids in (("prompt_ids", prompt_ids), ("generated_ids", generated_ids),
                          ("baseline_token_id", torch.tensor([baseline_token_id]))):
            if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < vocabulary):
                raise TargetError(f"`{name}` must hold token ids in [0, {vocabulary}) (the embedding's rows); "
                                  f"got ids from {int(ids.min())} to {int(ids.max())}.")
    if isinstance(model, nn.Module) and not any(module is embedding_layer for module in model.modules()):
        raise LayerError(
            f"`embedding_layer` ({type(embedding_layer).__name__}) is not a submodule of `model` "
            f"({type(model).__name__}): pass the model's own token embedding, e.g. "
            "model.get_input_embeddings() for a Hugging Face model.")
    prompt_length, generated = prompt_ids.shape[1], generated_ids.shape[1]
    refined = n_steps == "auto" or method in ("exact", "gausslegendre_pieces")
    if refined and generated > 1:
        raise ArgumentError(
            f"{'n_steps=' + repr(n_steps) if n_steps == 'auto' else 'method=' + repr(method)} follows one "
            f"target's path, and {generated} generated tokens are {generated} targets: give a fixed n_steps "
            "with a Gauss or Riemann method, or call this once per generated token.")
    ids = torch.cat([prompt_ids, generated_ids], dim=1)
    baselines = torch.cat([torch.full_like(prompt_ids, baseline_token_id), generated_ids], dim=1)
    log_probs = GeneratedTokenLogProbs(model, prompt_length)
    # A plain-function model's layers are not submodules of the wrapper: LayerIG checks a
    # function's layer when it runs instead.
    forward = log_probs if isinstance(model, nn.Module) else (lambda ids, *args: log_probs(ids, *args))
    explainer = LayerIntegratedGradients(forward, embedding_layer)
    # One generated token is one target: the single-target path, which n_steps="auto"
    # and the piece methods take too; its results gain the leading T = 1 dimension.
    which = {"target": 0} if generated == 1 else {"targets": list(range(generated))}
    result = explainer.attribute(
        ids, baselines=baselines, **which,
        additional_forward_args=additional_forward_args, n_steps=n_steps, method=method,
        internal_batch_size=internal_batch_size, memory_budget=memory_budget,
        return_convergence_delta=return_convergence_delta,
    )
    if generated > 1:
        return result
    if return_convergence_delta:
        return tuple(part.unsqueeze(0) for part in result)
    return result.unsqueeze(0)
