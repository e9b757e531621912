"""igfast.LLMGradientAttribution against Captum's LLMGradientAttribution over
LayerIntegratedGradients, on Hugging Face causal LMs built offline (random weights):
GPT-2, Llama, Qwen2 and GPT-NeoX, float32 and bfloat16, token and template inputs,
skip_tokens, given and generated targets; the memory budget whatever the number of
target tokens; Captum's own wrapper over igfast's LayerIntegratedGradients; errors;
the token map picture; a pretrained model when its package is installed."""

import warnings

import pytest
import torch

import igfast
from igfast.bench.peak import AllocationPeak
from igfast.attr.llm_inputs import token_prompt
from igfast.examples.hf_causal_lm import byte_level_tokenizer, random_causal_lm, smollm2, smollm2_available

captum_attr = pytest.importorskip("captum.attr")
pytest.importorskip("transformers")

PROMPT = "Dave lives in Palm Coast, Florida and is a"
TARGET = " lawyer. He plays golf"


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


_MODELS = {}


def partial_characters(tokenizer):
    """Byte tokens that are part of a UTF-8 character: Captum's output-token code
    raises IndexError when a target ends in one, so generated targets avoid them."""
    return [i for i in range(len(tokenizer)) if "\ufffd" in tokenizer.decode([i])]


def whole_character_ids(tokenizer, count, seed):
    allowed = torch.tensor(sorted(set(range(4, len(tokenizer))) - set(partial_characters(tokenizer))))
    return allowed[torch.randint(0, len(allowed), (count,), generator=torch.Generator().manual_seed(seed))]


def model_of(family, tokenizer, dtype=torch.float32):
    """One model per (family, dtype) for the whole module (building costs ~0.5 s)."""
    key = (family, dtype)
    if key not in _MODELS:
        _MODELS[key] = random_causal_lm(family, tokenizer, width=32, layers=2, heads=4, dtype=dtype,
                                        seed=len(_MODELS))
    return _MODELS[key]


def relative_difference(ours, theirs):
    """max |ours - theirs| relative to the scale of theirs (its largest magnitude)."""
    return float((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max())


def both(model, tokenizer, inp, **kwargs):
    """(igfast's result, Captum's result) for the same call."""
    layer = model.get_input_embeddings()
    ours = igfast.LLMGradientAttribution(igfast.LayerIntegratedGradients(model, layer), tokenizer)
    theirs = captum_attr.LLMGradientAttribution(captum_attr.LayerIntegratedGradients(model, layer), tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # generation-config notices of transformers
        return ours.attribute(inp, **kwargs), theirs.attribute(inp, **kwargs)


def assert_same_result(ours, theirs, tolerance=1e-5):
    assert isinstance(ours, captum_attr.LLMAttributionResult)
    assert ours.input_tokens == theirs.input_tokens
    assert ours.output_tokens == theirs.output_tokens
    assert ours.token_attr.shape == theirs.token_attr.shape
    assert ours.token_attr.dtype == theirs.token_attr.dtype == torch.float32
    assert relative_difference(ours.token_attr, theirs.token_attr) <= tolerance
    assert relative_difference(ours.seq_attr, theirs.seq_attr) <= tolerance
    assert float(theirs.token_attr.abs().max()) > 0  # a real comparison, not zeros against zeros


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "gpt_neox"])
@pytest.mark.parametrize("case", ["skip_tokens", "all_tokens", "token_ids", "generated"])
def test_equals_captum_float32(tokenizer, family, case):
    model = model_of(family, tokenizer)
    kwargs = dict(n_steps=8)
    if case == "skip_tokens":
        inp = captum_attr.TextTokenInput(PROMPT, tokenizer, skip_tokens=["<s>"])
        kwargs["target"] = TARGET
    elif case == "all_tokens":
        inp = captum_attr.TextTokenInput(PROMPT, tokenizer, baselines="<pad>")
        kwargs.update(target=TARGET, method="riemann_trapezoid", internal_batch_size=3)
    elif case == "token_ids":
        inp = captum_attr.TextTokenInput(PROMPT, tokenizer, skip_tokens=[1])
        kwargs["target"] = whole_character_ids(tokenizer, 5, seed=3)
    else:
        inp = captum_attr.TextTokenInput(PROMPT, tokenizer, skip_tokens=["<s>"])
        kwargs["gen_args"] = {"max_new_tokens": 4, "do_sample": False,
                              "suppress_tokens": partial_characters(tokenizer)}
    ours, theirs = both(model, tokenizer, inp, **kwargs)
    assert_same_result(ours, theirs)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_bfloat16_against_float64_reference(tokenizer, family):
    """bfloat16 models: attributions accumulate in float32; their error against the
    float64 result (same weights) is at most twice Captum's own bfloat16 error (the
    project's rule for half types). The difference to Captum itself is at the level
    of bfloat16's resolution, since the two batch the model's rows differently."""
    model = model_of(family, tokenizer, torch.bfloat16)
    inp = captum_attr.TextTokenInput(PROMPT, tokenizer, skip_tokens=["<s>"])
    ours, theirs = both(model, tokenizer, inp, target=TARGET, n_steps=8)
    assert ours.token_attr.dtype == torch.float32
    reference_model = random_causal_lm(family, tokenizer, width=32, layers=2, heads=4, dtype=torch.float64)
    reference_model.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    layer = reference_model.get_input_embeddings()
    reference = captum_attr.LLMGradientAttribution(
        captum_attr.LayerIntegratedGradients(reference_model, layer), tokenizer).attribute(inp, target=TARGET, n_steps=8)
    our_error = relative_difference(ours.token_attr, reference.token_attr)
    captum_error = relative_difference(theirs.token_attr, reference.token_attr)
    assert our_error <= 2 * captum_error + 1e-3, (our_error, captum_error)
    assert relative_difference(ours.token_attr, theirs.token_attr) < 0.05  # bfloat16's resolution: 2**-8


def test_template_input(tokenizer):
    """A TextTemplateInput (which Captum's gradient wrapper refuses): each value's tokens
    are one feature; the oracle is Captum's wrapper on the filled prompt with the
    template's own tokens kept (baselines 1 there), summed per value."""
    model = model_of("llama", tokenizer)
    template = "{} lives in Palm Coast and is a {}"
    values = ["He", "sad"]
    inp = captum_attr.TextTemplateInput(template, values=values)
    ours = igfast.LLMGradientAttribution(igfast.LayerIntegratedGradients(model, model.get_input_embeddings()),
                                         tokenizer).attribute(inp, target=TARGET, n_steps=8)
    text = template.format(*values)
    encoded = tokenizer(text, return_offsets_mapping=True)
    spans = [(text.index("He"), 2), (text.rindex("sad"), 3)]
    owner = [next((i for i, (b, n) in enumerate(spans) if begin < b + n and end > b), -1)
             for begin, end in encoded["offset_mapping"]]
    assert owner == [-1, 0, 0] + [-1] * 14 + [1, 1]  # <s> H e ... Ġs ad, checked by hand
    kept = torch.tensor([[0.0 if o >= 0 else 1.0 for o in owner]])
    oracle = captum_attr.LLMGradientAttribution(
        captum_attr.LayerIntegratedGradients(model, model.get_input_embeddings()), tokenizer
    ).attribute(captum_attr.TextTokenInput(text, tokenizer), target=TARGET, n_steps=8, baselines=kept)
    expected = torch.stack([oracle.token_attr[:, [p for p, o in enumerate(owner) if o == f]].sum(1)
                            for f in range(2)], dim=1)
    assert ours.input_tokens == values
    assert relative_difference(ours.token_attr, expected) <= 1e-5
    assert relative_difference(ours.seq_attr, expected.sum(0)) <= 1e-5


def test_template_with_baselines_and_mask(tokenizer):
    model = model_of("gpt2", tokenizer)
    explainer = igfast.LLMGradientAttribution(
        igfast.LayerIntegratedGradients(model, model.get_input_embeddings()), tokenizer)
    template = "{} lives in Palm Coast and is a {}"
    # "It"/"mat" tokenize like "He"/"sad" (two tokens each): the path starts at them.
    aligned = captum_attr.TextTemplateInput(template, values=["He", "sad"], baselines=["It", "mat"])
    prompt = token_prompt(aligned, tokenizer)
    assert prompt.baseline_ids.tolist() == tokenizer.encode(template.format("It", "mat"), return_tensors="pt").tolist()
    result = explainer.attribute(aligned, target=TARGET, n_steps=8)
    positions = igfast.attr.llm_attr.attribute_prompt_to_targets(
        model, model.get_input_embeddings(), prompt.ids, prompt.baseline_ids,
        torch.tensor(tokenizer.encode(TARGET, add_special_tokens=False)), n_steps=8)[0]
    torch.testing.assert_close(result.token_attr, prompt.features_from_positions(positions))
    # One mask id for both values: one feature, reported for each value (Captum's format_attr).
    grouped = captum_attr.TextTemplateInput(template, values=["He", "sad"], mask=[0, 0])
    merged = explainer.attribute(grouped, target=TARGET, n_steps=8)
    separate = explainer.attribute(captum_attr.TextTemplateInput(template, values=["He", "sad"]),
                                   target=TARGET, n_steps=8)
    torch.testing.assert_close(merged.token_attr[:, 0], separate.token_attr.sum(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged.token_attr[:, 1], merged.token_attr[:, 0])
    with pytest.raises(ValueError, match="as many tokens"):
        explainer.attribute(captum_attr.TextTemplateInput(template, values=["He", "sad"], baselines=["It", "sun"]),
                            target=TARGET, n_steps=4)


def test_captums_wrapper_accepts_igfast_layer_ig(tokenizer):
    """captum.attr.LLMGradientAttribution(igfast.LayerIntegratedGradients(...)): Captum's
    per-token loop, each LayerIG call run by igfast, equal results."""
    model = model_of("gpt2", tokenizer)
    layer = model.get_input_embeddings()
    assert isinstance(igfast.LayerIntegratedGradients(model, layer), captum_attr.LayerIntegratedGradients)
    inp = captum_attr.TextTokenInput(PROMPT, tokenizer, skip_tokens=["<s>"])
    mixed = captum_attr.LLMGradientAttribution(igfast.LayerIntegratedGradients(model, layer), tokenizer)
    theirs = captum_attr.LLMGradientAttribution(captum_attr.LayerIntegratedGradients(model, layer), tokenizer)
    kwargs = dict(target=TARGET, n_steps=8, internal_batch_size=4)
    assert_same_result(mixed.attribute(inp, **kwargs), theirs.attribute(inp, **kwargs))


def _count_calls(model):
    calls = []
    handle = model.register_forward_hook(lambda module, args, output: calls.append(args[0].shape))
    return calls, handle


def test_one_pass_model_calls(tokenizer):
    """One call for the layer's activations at both ends (and a third row: the sequence
    with its last token changed, which shows the model is causal), then one per path
    chunk, each over prompt + target - 1 tokens: against Captum's 2 + n_steps/rows per token."""
    model = model_of("qwen2", tokenizer)
    inp = captum_attr.TextTokenInput(PROMPT, tokenizer, skip_tokens=["<s>"])
    targets = torch.tensor(tokenizer.encode(TARGET, add_special_tokens=False))
    calls, handle = _count_calls(model)
    try:
        explainer = igfast.LLMGradientAttribution(
            igfast.LayerIntegratedGradients(model, model.get_input_embeddings()), tokenizer)
        explainer.attribute(inp, target=targets, n_steps=8, internal_batch_size=4)
        ours = list(calls)
        calls.clear()
        captum_attr.LLMGradientAttribution(captum_attr.LayerIntegratedGradients(model, model.get_input_embeddings()),
                                           tokenizer).attribute(inp, target=targets, n_steps=8, internal_batch_size=4)
    finally:
        handle.remove()
    length = inp.inp_tensor.shape[1] + len(targets) - 1
    assert [tuple(s) for s in ours] == [(3, length), (4, length), (4, length)]
    assert explainer.last_integral.forward_calls == 2
    assert len(calls) == len(targets) * (2 + 2)  # per token: inputs, baselines, two chunks


@pytest.mark.parametrize("target_tokens", [3, 12])
def test_memory_budget_holds_whatever_the_target_length(tokenizer, target_tokens):
    model = model_of("llama", tokenizer)
    inp = captum_attr.TextTokenInput(PROMPT, tokenizer, skip_tokens=["<s>"])
    targets = whole_character_ids(tokenizer, target_tokens, seed=7)
    explainer = igfast.LLMGradientAttribution(
        igfast.LayerIntegratedGradients(model, model.get_input_embeddings()), tokenizer)
    unbounded = explainer.attribute(inp, target=targets, n_steps=16)
    budget = 1_500_000
    with AllocationPeak("cpu") as peak:
        bounded = explainer.attribute(inp, target=targets, n_steps=16, memory_budget=budget)
    assert peak.bytes <= budget, (peak.bytes, budget)
    assert len(explainer.last_integral.chunks) > 2  # the budget made it chunk
    torch.testing.assert_close(bounded.token_attr, unbounded.token_attr, rtol=1e-5, atol=1e-6)


def test_errors(tokenizer):
    model = model_of("gpt2", tokenizer)
    layer = model.get_input_embeddings()
    inp = captum_attr.TextTokenInput(PROMPT, tokenizer)
    with pytest.raises(AssertionError, match="does not support"):  # Captum's class of error too
        igfast.LLMGradientAttribution(captum_attr.LayerGradientXActivation(model, layer), tokenizer)
    explainer = igfast.LLMGradientAttribution(igfast.LayerIntegratedGradients(model, layer), tokenizer)
    with pytest.raises(TypeError, match="`target` must be"):
        explainer.attribute(inp, target=3)
    with pytest.raises(ValueError, match="gen_args"):
        explainer.attribute(inp, target=TARGET, gen_args={"max_new_tokens": 2})
    # Also the classes Captum raises: AttributeError (no delta), TypeError (unknown
    # keyword), IndexError (a token id beyond the vocabulary).
    with pytest.raises(AttributeError, match="return_convergence_delta"):
        explainer.attribute(inp, target=TARGET, return_convergence_delta=True)
    with pytest.raises(TypeError, match="Unknown keyword"):
        explainer.attribute(inp, target=TARGET, n_stepz=3)
    vocabulary = model.get_output_embeddings().weight.shape[0]
    with pytest.raises(IndexError, match=f"`target` token ids must be in \\[0, {vocabulary}\\)"):
        explainer.attribute(inp, target=torch.tensor([5, vocabulary + 7]))
    with pytest.raises(IndexError):
        captum_attr.LLMGradientAttribution(captum_attr.LayerIntegratedGradients(model, layer), tokenizer).attribute(
            inp, target=torch.tensor([5, vocabulary + 7]))
    with pytest.raises(ValueError, match="TextTokenInput or TextTemplateInput"):
        explainer.attribute(PROMPT, target=TARGET)
    with pytest.raises(ValueError, match="no tokens"):
        explainer.attribute(inp, target="")
    with pytest.raises(AttributeError, match="one layer"):  # Captum: AttributeError (a list's .detach)
        igfast.LLMGradientAttribution(igfast.LayerIntegratedGradients(model, [layer]), tokenizer)
    # Captum: IndexError (baselines of another width), TypeError (a 0-dim target).
    captum_explainer = captum_attr.LLMGradientAttribution(captum_attr.LayerIntegratedGradients(model, layer),
                                                          tokenizer)
    width = inp.to_tensor().shape[1]
    for call in (lambda e: e.attribute(inp, target=TARGET, baselines=torch.ones(1, width - 2)),):
        with pytest.raises(IndexError):
            call(captum_explainer)
        with pytest.raises(IndexError, match="interpretable space"):
            call(explainer)
    with pytest.raises(TypeError):
        captum_explainer.attribute(inp, target=torch.tensor(5))
    with pytest.raises(TypeError, match="1-D token ids"):
        explainer.attribute(inp, target=torch.tensor(5))
    # Captum: IndexError for floating ids (it indexes the log-probabilities with them).
    with pytest.raises(IndexError):
        captum_explainer.attribute(inp, target=torch.tensor([5.0, 6.0]))
    with pytest.raises(IndexError, match="1-D token ids"):
        explainer.attribute(inp, target=torch.tensor([5.0, 6.0]))


def test_argument_forms_captum_takes(tokenizer):
    """Forms Captum runs or refuses that igfast handled otherwise: its default
    return_convergence_delta=False given explicitly, n_steps as a one-element tensor (both
    refused), a negative target id (Captum: OverflowError, decoding it), n_steps="auto"
    (Captum: TypeError) and exact methods (refused with a message listing them as valid)."""
    model = model_of("gpt2", tokenizer)
    inp = captum_attr.TextTokenInput(PROMPT, tokenizer)
    for kwargs in ({"n_steps": 6, "return_convergence_delta": False}, {"n_steps": torch.tensor(6)},
                   {"n_steps": torch.tensor([6])}):
        ours, theirs = both(model, tokenizer, inp, target=TARGET, **kwargs)
        assert_same_result(ours, theirs)
    explainer = igfast.LLMGradientAttribution(igfast.LayerIntegratedGradients(model, model.get_input_embeddings()),
                                              tokenizer)
    captum_explainer = captum_attr.LLMGradientAttribution(
        captum_attr.LayerIntegratedGradients(model, model.get_input_embeddings()), tokenizer)
    for call, error in ((lambda e: e.attribute(inp, target=torch.tensor([5, -1]), n_steps=4), OverflowError),
                        (lambda e: e.attribute(inp, target=TARGET, n_steps="auto"), TypeError)):
        with pytest.raises(error):
            call(captum_explainer)
        with pytest.raises(error):
            call(explainer)
    for method in ("exact", "gausslegendre_pieces"):
        with pytest.raises(ValueError, match=f"method='{method}' is not available for LLM attribution"):
            explainer.attribute(inp, target=TARGET, method=method)


def test_under_inference_mode(tokenizer):
    """Ids made under torch.inference_mode() (the prompt's, the target's) were inference
    tensors that the embedding and the target's gather saved for backward: igfast raised
    (as Captum does) where its README says calls work."""
    model = model_of("gpt2", tokenizer)
    explainer = igfast.LLMGradientAttribution(igfast.LayerIntegratedGradients(model, model.get_input_embeddings()),
                                              tokenizer)
    inp = captum_attr.TextTokenInput(PROMPT, tokenizer)
    expected = explainer.attribute(inp, target=TARGET, n_steps=6)
    with torch.inference_mode():
        inside = captum_attr.TextTokenInput(PROMPT, tokenizer)
        got = explainer.attribute(inside, target=TARGET, n_steps=6)
        got_ids = explainer.attribute(inside, target=torch.tensor(tokenizer.encode(TARGET, add_special_tokens=False)),
                                      n_steps=6)
    for result in (got, got_ids):
        torch.testing.assert_close(result.token_attr, expected.token_attr, rtol=1e-6, atol=1e-7)


def test_a_one_tensor_tuple_of_baselines_as_in_captum(tokenizer):
    """Captum passes baselines=(tensor,) on to LayerIG; igfast refused it."""
    model = model_of("gpt2", tokenizer)
    inp = captum_attr.TextTokenInput(PROMPT, tokenizer)
    baselines = (torch.tensor([[1] + [0] * (inp.to_tensor().shape[1] - 1)]),)
    ours, theirs = both(model, tokenizer, inp, target=TARGET, n_steps=8, baselines=baselines)
    assert_same_result(ours, theirs)


def test_captum_layer_ig_is_converted_and_plots_work(tokenizer, tmp_path):
    model = model_of("gpt2", tokenizer)
    explainer = igfast.LLMGradientAttribution(
        captum_attr.LayerIntegratedGradients(model, model.get_input_embeddings()), tokenizer)
    result = explainer.attribute(captum_attr.TextTokenInput(PROMPT, tokenizer, skip_tokens=["<s>"]),
                                 target=TARGET, n_steps=4)
    import matplotlib

    matplotlib.use("Agg")
    figure, _ = result.plot_token_attr()  # Captum's own plotting on igfast's result
    figure2, _ = result.plot_seq_attr()
    assert figure is not None and figure2 is not None
    png = igfast.viz.save_token_attribution_map(result, str(tmp_path / "map.png"))
    page = igfast.viz.save_token_attribution_map(result, str(tmp_path / "map.html"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert open(page).read().count("<tr>") == len(result.output_tokens) + 1


@pytest.mark.slow  # ~25 s, mostly de-quantising the GGUF file
@pytest.mark.skipif(smollm2_available() is not None, reason=f"pretrained model: {smollm2_available()}")
def test_pretrained_smollm2_wiring():
    """Real weights and a real tokenizer: a generated continuation, equal to Captum."""
    model, tokenizer = smollm2()
    inp = captum_attr.TextTokenInput("The capital of France is", tokenizer)
    ours, theirs = both(model, tokenizer, inp, gen_args={"max_new_tokens": 3, "do_sample": False}, n_steps=4)
    assert "Paris" in "".join(ours.output_tokens)
    assert_same_result(ours, theirs)


def test_gpu_check_case_runs_on_a_tiny_llama():
    """benchmarks/bench_llm.py's llama_case (the GPU check's entry point), on CPU with
    a tiny config: every field the check reads, and parity with Captum."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_llm.py")
    spec = importlib.util.spec_from_file_location("bench_llm", path)
    bench_llm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_llm)
    row = bench_llm.llama_case("cpu", torch.float32, prompt_len=12, target_len=5, n_steps=4, tiny=True)
    for key in ("time_igfast_s", "time_captum_s", "peak_igfast_bytes", "peak_captum_bytes", "calls_igfast",
                "calls_captum", "bound", "speedup", "of_bound", "parameters"):
        assert key in row, key
    assert row["calls_igfast"] == 2 and row["calls_captum"] == 5 * 3
    assert row["rel_diff_igfast"] <= 1e-5 and row["bound"] > 0


def test_igfast_input_classes_behave_like_captums(tokenizer):
    """igfast's TextTokenInput / TextTemplateInput (used without Captum) against Captum's."""
    from igfast.attr import llm_inputs

    for kwargs in ({}, {"skip_tokens": ["<s>"], "baselines": "<pad>"}, {"skip_tokens": [1, 15]}):
        ours, theirs = (cls(PROMPT, tokenizer, **kwargs) for cls in (llm_inputs.TextTokenInput,
                                                                      captum_attr.TextTokenInput))
        assert ours.values == theirs.values and ours.baselines == theirs.baselines
        assert torch.equal(ours.to_tensor(), theirs.to_tensor())
        perturbed = (torch.rand(3, ours.n_itp_features, generator=torch.Generator().manual_seed(1)) > 0.5).long()
        assert torch.equal(ours.to_model_input(perturbed), theirs.to_model_input(perturbed))
        assert torch.equal(ours.to_model_input(), theirs.to_model_input())
    for kwargs in ({}, {"baselines": ["It", "mat", "x"]}, {"mask": [3, 1, 3]}):
        ours, theirs = (cls("{} lives in {} and is {}", ["He", "Palm Coast", "sad"], **kwargs)
                        for cls in (llm_inputs.TextTemplateInput, captum_attr.TextTemplateInput))
        assert ours.n_itp_features == theirs.n_itp_features
        for row in ([[1, 0, 1]], [[0, 1, 0]])[:1 if "mask" in kwargs else 2]:
            row = torch.tensor(row)[:, :ours.n_itp_features]
            assert ours.to_model_input(row) == theirs.to_model_input(row)
        attr = torch.randn(4, ours.n_itp_features)
        assert torch.equal(ours.format_attr(attr), theirs.format_attr(attr))
    named = llm_inputs.TextTemplateInput("{a} and {b}", {"a": "x", "b": "y"}, baselines={"a": "p", "b": "q"})
    assert named.to_model_input(torch.tensor([[1, 0]])) == "x and q"


def test_a_model_that_looks_ahead_gets_a_prefix_per_target_token(tokenizer):
    """A bidirectional model (BERT) in one pass over prompt + target let each target
    token see the later ones: rows off by 1e-3 and 1e-1 relative, silently."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    model = transformers.BertForMaskedLM(config).eval()
    inp = captum_attr.TextTokenInput("The cat sat on", tokenizer)
    ours, theirs = both(model, tokenizer, inp, target=" the mat", n_steps=20)
    assert len(theirs.output_tokens) == 3
    assert_same_result(ours, theirs)
