"""The result of LLM attribution: Captum's ``LLMAttributionResult`` when Captum is
installed (so its plotting methods and any code written for it work), else
igfast's class with the same fields and plots; and readable output tokens.
"""

from typing import Any, Dict, List, Tuple

import torch

from .. import viz


class LLMAttributionResult:
    r"""What LLMGradientAttribution returns when Captum is not installed; the fields
    of Captum's class of the same name.

    Args:
        input_tokens (list of str): the interpretable features of the prompt.
        output_tokens (list of str): the target tokens.
        seq_attr (Tensor): (n_features,) attribution of the whole target.
        token_attr (Tensor, optional): (n_output_tokens, n_features), per target token.
        output_probs (Tensor, optional): (n_output_tokens,).
    """

    def __init__(self, *, input_tokens: List[str], output_tokens: List[str], seq_attr: Any,
                 token_attr: Any = None, output_probs: Any = None, inp: Any = None) -> None:
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.seq_attr = torch.as_tensor(seq_attr)
        self.token_attr = None if token_attr is None else torch.as_tensor(token_attr)
        self.output_probs = None if output_probs is None else torch.as_tensor(output_probs)
        self.inp = inp
        if self.seq_attr.shape != (len(input_tokens),):
            raise ValueError(f"seq_attr must be ({len(input_tokens)},); got {tuple(self.seq_attr.shape)}.")
        expected = (len(output_tokens), len(input_tokens))
        if self.token_attr is not None and tuple(self.token_attr.shape) != expected:
            raise ValueError(f"token_attr must be {expected}; got {tuple(self.token_attr.shape)}.")

    @property
    def seq_attr_dict(self) -> Dict[str, float]:
        return {token: value for value, token in zip(self.seq_attr.cpu().tolist(), self.input_tokens)}

    def plot_token_attr(self, show: bool = False):
        """The output-token x input-token map (matplotlib): (figure, axes), or None when shown."""
        if self.token_attr is None:
            raise ValueError("token_attr is None (no token-level attribution); use plot_seq_attr.")
        figure, axes = viz.token_attribution_map(self.input_tokens, self.output_tokens, self.token_attr)
        return _show(figure, axes, show)

    def plot_seq_attr(self, show: bool = False):
        """The attribution of the whole target to each input token, as bars."""
        figure, axes = viz.sequence_attribution_bars(self.input_tokens, self.seq_attr)
        return _show(figure, axes, show)


def _show(figure, axes, show: bool):
    if show:
        figure.show()
        return None
    return figure, axes


def make_result(**fields: Any):
    """Captum's LLMAttributionResult when Captum imports, else igfast's."""
    try:
        from captum.attr import LLMAttributionResult as CaptumResult
    except Exception:  # Captum absent or broken
        return LLMAttributionResult(**fields)
    return CaptumResult(**fields)


def pretty_tokens(ids: torch.Tensor, tokenizer: Any) -> List[str]:
    """Each token's text without byte-level markers (e.g. GPT-2's "Ġ"), by Captum's
    rules: decode all ids, re-encode the text with offsets and cut it there (a token
    whose span overlaps the previous one, as the bytes of one character do, is
    marked " [OVERLAP]"; re-encoded tokens that are not the next id are skipped);
    if that does not give one piece per id, each id is decoded alone."""
    ids = [int(i) for i in ids.tolist()]
    text = tokenizer.decode(ids)
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    pieces, previous_end, next_id = [], -1, 0
    for token_id, (begin, end) in zip(encoded["input_ids"],
                                      _corrected_offsets(encoded["offset_mapping"], len(text))):
        if next_id >= len(ids) or token_id != ids[next_id]:
            continue
        pieces.append(_clean(text[begin:end]) + (" [OVERLAP]" if previous_end > begin else ""))
        previous_end = end
        next_id += 1
    if len(pieces) == len(ids):
        return pieces
    return _pieces_one_by_one(ids, tokenizer)


def _pieces_one_by_one(ids: List[int], tokenizer: Any) -> List[str]:
    """Each id decoded alone; two ids that are the halves of one character (each
    decoding to the replacement character) show that character's text for both."""
    pieces, index = [], 0
    while index < len(ids):
        alone = tokenizer.decode([ids[index]])
        if _is_split(alone, ids[index], tokenizer) and index + 1 < len(ids):
            following = tokenizer.decode([ids[index + 1]])
            if _is_split(following, ids[index + 1], tokenizer):
                pieces += [_clean(alone), _clean(alone) + " [OVERLAP]"]
            else:
                pieces += [_clean(alone), _clean(following)]
            index += 2
            continue
        pieces.append(_clean(alone))
        index += 1
    return pieces


def _is_split(decoded: str, token_id: int, tokenizer: Any) -> bool:
    return decoded.strip() == "\ufffd" and tokenizer.encode(decoded) != [token_id]


def _corrected_offsets(offsets, text_length: int) -> List[Tuple[int, int]]:
    """Empty spans (tokens whose offsets the tokenizer leaves unset) end where the
    next token starts, or at the end of the text."""
    corrected = []
    for index, (begin, end) in enumerate(offsets):
        if begin == end:
            end = offsets[index + 1][0] if index + 1 < len(offsets) else text_length
        corrected.append((begin, end))
    return corrected


def _clean(token: str) -> str:
    return token.replace("\n", "\\n").strip()
