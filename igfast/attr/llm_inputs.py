"""Text inputs of LLM attribution, and the token-level view the one-pass path needs.

``TextTokenInput`` (every prompt token a feature) and ``TextTemplateInput`` (the
values filled into a template are the features) have the constructor arguments,
attributes and methods of Captum 0.9's classes of the same names. igfast exports
Captum's own classes when Captum is installed (``igfast.TextTokenInput is
captum.attr.TextTokenInput``) and these otherwise; ``LLMGradientAttribution``
accepts both.

Gradient attribution moves each prompt token's embedding from a baseline token's
to its own, so every input becomes a ``TokenPrompt``: the prompt's token ids, the
baseline id of every position, and which interpretable feature each position
belongs to (-1: held fixed, e.g. skipped tokens or a template's own text).

- TextTokenInput: the baseline ids are what ``to_model_input`` gives for the
  baselines in the interpretable space (zeros by default: every feature token
  replaced by ``inp.baselines``), exactly as Captum's LLMGradientAttribution
  obtains them through LayerIntegratedGradients.
- TextTemplateInput (Captum's LLMGradientAttribution does not accept it): the
  features are the tokens that overlap each value's characters in the filled
  template. At the path's start they are token id 0 (TextTokenInput's default
  baseline) when the baselines are all empty strings (Captum's default: the value
  is absent), else the tokens of the template filled with the baselines, which
  must tokenize to as many tokens with the template's own tokens unchanged.
"""

import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

from ..errors import ArgumentError, ShapeError

# Captum's default baseline of TextTokenInput: "usually UNK".
DEFAULT_BASELINE_TOKEN = 0


class TextTokenInput:
    r"""A prompt whose interpretable features are its tokens (Captum's API).

    Args:
        text (str): the prompt.
        tokenizer: a Hugging Face tokenizer (``encode``, ``convert_ids_to_tokens``).
        baselines (int or str, optional): the baseline token (id or token string).
            Default: 0.
        skip_tokens (list of int or str, optional): tokens that are not features
            (e.g. ``["<s>"]``): held fixed on the path and left out of the result.
    """

    def __init__(self, text: str, tokenizer: Any, baselines: Union[int, str] = DEFAULT_BASELINE_TOKEN,
                 skip_tokens: Union[List[int], List[str], None] = None) -> None:
        ids = tokenizer.encode(text, return_tensors="pt")
        self.inp_tensor = ids
        self.itp_tensor = ids
        self.itp_mask: Optional[torch.Tensor] = None
        if skip_tokens:
            if isinstance(skip_tokens[0], str):
                skip_tokens = list(tokenizer.convert_tokens_to_ids(skip_tokens))
            self.itp_mask = ~torch.isin(ids, torch.tensor(skip_tokens, dtype=ids.dtype))
            self.itp_tensor = ids[self.itp_mask].unsqueeze(0)
        self.skip_tokens = skip_tokens
        self.values: List[str] = tokenizer.convert_ids_to_tokens(self.itp_tensor[0].tolist())
        self.tokenizer = tokenizer
        self.n_itp_features = len(self.values)
        self.baselines: int = (baselines if type(baselines) is int
                               else tokenizer.convert_tokens_to_ids([baselines])[0])

    def to_tensor(self) -> torch.Tensor:
        """Ones, one per feature: (1, n_itp_features)."""
        return torch.ones_like(self.itp_tensor)

    def to_model_input(self, perturbed_tensor: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The token ids; where ``perturbed_tensor`` is not 1, the baseline token."""
        if perturbed_tensor is None:
            return self.inp_tensor
        rows = perturbed_tensor.shape[0]
        features = self.itp_tensor.to(perturbed_tensor.device).expand(rows, -1).clone()
        features[perturbed_tensor != 1] = self.baselines
        if self.itp_mask is None:
            return features
        ids = self.inp_tensor.to(perturbed_tensor.device).expand(rows, -1).clone()
        ids[self.itp_mask.to(perturbed_tensor.device).expand(rows, -1)] = features.reshape(-1)
        return ids

    def format_attr(self, itp_attr: torch.Tensor) -> torch.Tensor:
        return itp_attr


class TextTemplateInput:
    r"""A prompt made by filling a template; the values are the features (Captum's API).

    Args:
        template (str or Callable): a ``str.format`` template or a function of the values.
        values (list or dict of str): the values filled in.
        baselines (list, dict or Callable, optional): each value's replacement when the
            feature is absent. Default: empty strings.
        mask (list or dict of int, optional): values with the same mask index form one
            feature.
    """

    def __init__(self, template: Union[str, Callable[..., str]], values: Union[List[str], Dict[str, str]],
                 baselines: Union[List[str], Dict[str, str], Callable, None] = None,
                 mask: Union[List[int], Dict[str, int], None] = None) -> None:
        if isinstance(values, dict):
            self.dict_keys = list(values)
            values = [values[key] for key in self.dict_keys]
        elif isinstance(values, list):
            self.dict_keys = []
        else:
            raise ArgumentError(f"`values` must be a list or a dict of strings; got {type(values).__name__}.")
        self.values: List[str] = values
        if baselines is None:
            baselines = [""] * len(values)
        elif not callable(baselines):
            baselines = self._as_list(baselines, "baselines")
        self.baselines = baselines
        self.mask = mask
        if mask is None:
            self.n_itp_features = len(values)
        else:
            mask = self._as_list(mask, "mask")
            ids = {m: i for i, m in enumerate(sorted(set(mask)))}  # features numbered by mask id
            self.formatted_mask = [ids[m] for m in mask]
            self.n_itp_features = len(ids)
        self.n_features = len(values)
        self.template = template
        if isinstance(template, str):
            self.format_fn = template.format
        elif callable(template):
            self.format_fn = template
        else:
            raise ArgumentError(f"`template` must be a string or a callable; got {type(template).__name__}.")

    def _as_list(self, value: Any, name: str) -> list:
        if self.dict_keys:
            if not isinstance(value, dict):
                raise ArgumentError(f"`{name}` must be a dict (as `values` is); got {type(value).__name__}.")
            return [value[key] for key in self.dict_keys]
        if not isinstance(value, list):
            raise ArgumentError(f"`{name}` must be a list (as `values` is); got {type(value).__name__}.")
        return value

    def to_tensor(self) -> torch.Tensor:
        return torch.ones(1, self.n_itp_features)

    def to_model_input(self, perturbed_tensor: Optional[torch.Tensor] = None) -> str:
        """The filled template; features that are 0 in ``perturbed_tensor`` get their baseline."""
        values = list(self.values)
        if perturbed_tensor is not None:
            baselines = self.baselines() if callable(self.baselines) else self.baselines
            if callable(self.baselines):
                baselines = self._as_list(baselines, "baselines")
            for index in range(len(values)):
                feature = self.formatted_mask[index] if self.mask is not None else index
                if not perturbed_tensor[0][feature]:
                    values[index] = baselines[index]
        return fill_template(self, values)

    def format_attr(self, itp_attr: torch.Tensor) -> torch.Tensor:
        """(..., n_itp_features) -> (..., n_features): each value gets its feature's attribution."""
        if self.mask is None:
            return itp_attr
        return itp_attr[..., torch.tensor(self.formatted_mask, device=itp_attr.device)]


def captum_input_classes() -> Tuple[Tuple[type, ...], Tuple[type, ...]]:
    """(token input classes, template input classes) that LLMGradientAttribution accepts."""
    token, template = [TextTokenInput], [TextTemplateInput]
    try:
        from captum.attr import TextTemplateInput as CaptumTemplate, TextTokenInput as CaptumToken
    except Exception:  # Captum absent or broken: igfast's classes only
        pass
    else:
        token.append(CaptumToken)
        template.append(CaptumTemplate)
    return tuple(token), tuple(template)


@dataclass
class TokenPrompt:
    """A prompt as the one-pass path sees it."""

    ids: torch.Tensor  # (1, P) token ids
    baseline_ids: torch.Tensor  # (1, P): the ids at the path's start
    feature_of_position: torch.Tensor  # (P,) interpretable feature per position, -1: fixed
    n_features: int  # interpretable features (columns of token_attr before format_attr)

    def features_from_positions(self, per_position: torch.Tensor) -> torch.Tensor:
        """(..., P) position attributions -> (..., n_features), summed per feature."""
        moving = self.feature_of_position >= 0
        index = self.feature_of_position[moving].to(per_position.device)
        out = per_position.new_zeros(per_position.shape[:-1] + (self.n_features,))
        return out.index_add_(-1, index, per_position[..., moving.to(per_position.device)])


def token_prompt(inp: Any, tokenizer: Any, baselines: Any = None) -> TokenPrompt:
    """The TokenPrompt of a TextTokenInput or TextTemplateInput (Captum's or igfast's)."""
    token_classes, template_classes = captum_input_classes()
    if isinstance(inp, token_classes):
        return _token_input_prompt(inp, baselines)
    if isinstance(inp, template_classes):
        if baselines is not None:
            raise ArgumentError(
                "`baselines` applies to TextTokenInput only; a TextTemplateInput's baselines are "
                "given to its constructor (baselines=[...])."
            )
        return _template_prompt(inp, tokenizer)
    raise ArgumentError(
        "`inp` must be a TextTokenInput or TextTemplateInput (from captum.attr or igfast); "
        f"got {type(inp).__name__}."
    )


def _token_input_prompt(inp: Any, baselines: Any) -> TokenPrompt:
    ids = inp.to_model_input()
    features = inp.to_tensor()
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ArgumentError(f"`inp` must hold one prompt (token ids of shape (1, P)); got {tuple(ids.shape)}.")
    if isinstance(baselines, tuple) and len(baselines) == 1:  # Captum passes it on to LayerIG as is
        baselines = baselines[0]
    if baselines is None:
        start = torch.zeros_like(features)
    elif isinstance(baselines, (int, float)) or (isinstance(baselines, torch.Tensor) and baselines.dim() == 0):
        start = torch.full_like(features, float(baselines) if isinstance(baselines, float) else int(baselines))
    elif isinstance(baselines, torch.Tensor) and tuple(baselines.shape[-1:]) == tuple(features.shape[-1:]):
        start = baselines.reshape(1, -1).to(features.device)
    else:
        # Captum: IndexError where the width differs (it indexes with the baselines)
        error = ShapeError if isinstance(baselines, torch.Tensor) else ArgumentError
        raise error(
            "`baselines` of a TextTokenInput lie in its interpretable space (as in Captum): a number "
            f"or a tensor of shape {tuple(features.shape)} (1: keep the token, else: baseline token)."
        )
    baseline_ids = inp.to_model_input(start)
    mask = inp.itp_mask
    if mask is None:
        feature_of_position = torch.arange(ids.shape[1])
    else:
        mask = mask.reshape(-1).to(torch.bool).cpu()
        feature_of_position = torch.where(mask, mask.long().cumsum(0) - 1, torch.full_like(mask, -1, dtype=torch.long))
    return TokenPrompt(ids, baseline_ids.to(ids.device), feature_of_position, int(features.shape[-1]))


# Private-use characters around each value's index: a marker no tokenizer or template uses.
_OPEN, _CLOSE = "\ue000", "\ue001"
_MARKER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


def value_spans(inp: Any) -> Tuple[str, List[Tuple[int, int, int]]]:
    """The filled template and (begin, end, value index) of each value's characters,
    found by filling the template with markers (a value may occur several times)."""
    marked = fill_template(inp, [f"{_OPEN}{i}{_CLOSE}" for i in range(len(inp.values))])
    pieces, spans, position, cursor = [], [], 0, 0
    for match in _MARKER.finditer(marked):
        literal = marked[cursor:match.start()]
        pieces.append(literal)
        position += len(literal)
        index = int(match.group(1))
        value = inp.values[index]
        pieces.append(value)
        spans.append((position, position + len(value), index))
        position += len(value)
        cursor = match.end()
    pieces.append(marked[cursor:])
    text = "".join(pieces)
    if text != inp.to_model_input():
        raise ArgumentError(
            "The template changes its values (e.g. upper-cases them): the tokens of each value "
            "cannot be found in the prompt. Use a template that inserts the values as they are."
        )
    return text, spans


def fill_template(inp: Any, values: List[str]) -> str:
    """The template of ``inp`` (Captum's or igfast's TextTemplateInput) filled with ``values``."""
    if inp.dict_keys:
        return inp.format_fn(**dict(zip(inp.dict_keys, values)))
    return inp.format_fn(*values)


def _template_prompt(inp: Any, tokenizer: Any) -> TokenPrompt:
    text, spans = value_spans(inp)
    encoded = tokenizer(text, return_offsets_mapping=True)
    ids = torch.tensor([encoded["input_ids"]])
    if ids.tolist() != tokenizer.encode(text, return_tensors="pt").tolist():
        raise ArgumentError("The tokenizer gives other ids with offsets than without; it cannot map values to tokens.")
    feature_of_value = list(inp.formatted_mask) if inp.mask is not None else list(range(len(inp.values)))
    features = []
    for position, (begin, end) in enumerate(encoded["offset_mapping"]):
        owners = {feature_of_value[v] for b, e, v in spans if begin < e and end > b and end > begin}
        if len(owners) > 1:
            raise ArgumentError(
                f"Token {position} ({text[begin:end]!r}) spans the values of several features "
                f"({sorted(owners)}): separate the values in the template (e.g. by a space)."
            )
        features.append(owners.pop() if owners else -1)
    feature_of_position = torch.tensor(features, dtype=torch.long)
    moving = feature_of_position >= 0
    baselines = inp.baselines() if callable(inp.baselines) else inp.baselines
    if isinstance(baselines, dict):
        baselines = [baselines[key] for key in inp.dict_keys]
    if all(b == "" for b in baselines):
        baseline_ids = torch.where(moving.unsqueeze(0), torch.full_like(ids, DEFAULT_BASELINE_TOKEN), ids)
    else:
        filled = inp.to_model_input(torch.zeros(1, inp.n_itp_features))
        baseline_ids = tokenizer.encode(filled, return_tensors="pt")
        if baseline_ids.shape != ids.shape or not torch.equal(baseline_ids[:, ~moving], ids[:, ~moving]):
            raise ArgumentError(
                "Gradient attribution moves each token's embedding, so the template filled with the "
                f"baselines ({filled!r}: {baseline_ids.shape[1]} tokens) must tokenize to as many tokens "
                f"as the prompt ({text!r}: {ids.shape[1]}) with the template's own tokens unchanged. "
                "Give baselines of the same token length, or empty baselines (token id 0)."
            )
    return TokenPrompt(ids, baseline_ids, feature_of_position, int(inp.n_itp_features))
