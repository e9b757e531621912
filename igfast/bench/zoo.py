"""A zoo of models a Captum user has, each run through igfast and Captum side by side.

Every model here breaks some assumption of a plain eager ``nn.Module``: compiled
graphs (inductor and aot_eager), a custom ``torch.autograd.Function``, activation
checkpointing (reentrant and not), fake quantization, Hugging Face transformers
(MiniLM with its pretrained weights, GPT-2 from a config with random weights), a call
inside ``torch.profiler``, and BatchNorm in training mode. ``compare`` runs one of
them through IntegratedGradients, LayerIntegratedGradients or NoiseTunnel under one
chunking mode, in igfast and in Captum, and reports the largest difference and the
graphs a compiled model compiled per call; tests/test_model_zoo.py asserts on it and
benchmarks/bench_zoo.py prints the table.
"""

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

METHODS = ("IntegratedGradients", "LayerIntegratedGradients", "NoiseTunnel")
# Chunking modes: igfast's automatic budget, a budget small enough to force many
# chunks (Captum runs unchunked there), and Captum's internal_batch_size.
MODES = {
    "default": {},
    "memory_budget": {"memory_budget": "small"},
    "internal_batch_size": {"internal_batch_size": 3},
}
N_STEPS = 8


@dataclass
class Subject:
    """One zoo model and everything attribute() needs for it."""

    forward: Callable  # what IntegratedGradients and NoiseTunnel explain
    inputs: Any  # floating inputs of ``forward``
    target: Any
    layer_forward: Callable  # what LayerIntegratedGradients explains (may equal forward)
    layer: nn.Module
    layer_inputs: Any  # model inputs of ``layer_forward`` (token ids for language models)
    layer_target: Any = None
    additional_forward_args: Any = None
    layer_additional_forward_args: Any = None
    memory_budget: int = 64 * 2**10  # "small": several chunks for these inputs
    graphs: Optional[List[int]] = None  # graphs compiled so far, for compiled models
    context: Callable[[], Any] = contextlib.nullcontext  # around every attribute() call
    warns: Optional[type] = None  # a warning igfast must give for this model
    # Captum's LayerIG on a model compiled before its hooks were added misses them
    # ("Forward hook did not obtain any outputs"): it runs on this instead.
    captum_layer_forward: Optional[Callable] = None
    # Methods autograd cannot run on this model, in Captum (RuntimeError) or igfast
    # (igfast.GradientError, which says why and what to do).
    unsupported: Tuple[str, ...] = ()
    tolerance: float = 1e-5  # relative to the largest attribution

    def kwargs(self, method: str) -> Dict[str, Any]:
        if method == "LayerIntegratedGradients":
            return dict(target=self.layer_target, additional_forward_args=self.layer_additional_forward_args)
        return dict(target=self.target, additional_forward_args=self.additional_forward_args)


def _mlp(seed: int = 0, inputs: int = 10, hidden: int = 24, outputs: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.GELU(),
                         nn.Linear(hidden, outputs)).eval()


def _batch(rows: int = 5, features: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, features, generator=torch.Generator().manual_seed(seed))


def _counting_backend(name: str, counter: List[int]) -> Callable:
    from torch._dynamo.backends.registry import lookup_backend

    inner = lookup_backend(name)

    def backend(graph_module, example_inputs):
        counter[0] += 1
        return inner(graph_module, example_inputs)

    return backend


def compiled(backend: str) -> Subject:
    model = _mlp()
    counter = [0]
    torch._dynamo.reset()
    forward = torch.compile(model, backend=_counting_backend(backend, counter))
    return Subject(forward, _batch(), 1, forward, model[0], _batch(), 1, graphs=counter,
                   captum_layer_forward=model)


class _SignStraightThrough(torch.autograd.Function):
    """sign(x) forward, identity backward (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, x):
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _StraightThroughNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _mlp(outputs=24)
        self.head = nn.Linear(24, 4)

    def forward(self, x):
        return self.head(_SignStraightThrough.apply(self.inner(x)) + self.inner(x))


def straight_through() -> Subject:
    model = _StraightThroughNet().eval()
    return Subject(model, _batch(), 2, model, model.inner[2], _batch(), 2)


class _Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.first, self.second, self.reentrant = _mlp(outputs=24), nn.Linear(24, 4), reentrant

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        if self.reentrant and not torch.is_grad_enabled():
            hidden = self.first(x)  # reentrant checkpointing warns without grad; same values
        else:
            hidden = checkpoint(self.first, x, use_reentrant=self.reentrant)
        return self.second(torch.tanh(hidden))


def checkpointed(reentrant: bool) -> Subject:
    model = _Checkpointed(reentrant).eval()
    # Reentrant checkpointing refuses autograd.grad through it: the input gradient fails,
    # a layer after the checkpointed part works.
    unsupported = ("IntegratedGradients", "NoiseTunnel") if reentrant else ()
    return Subject(model, _batch(), 3, model, model.second, _batch(), 3, unsupported=unsupported)


def fake_quantized() -> Subject:
    """An MLP prepared for quantization-aware training, calibrated, then observers
    off: the fake quantization (a custom autograd op) stays in the forward."""
    from torch.ao import quantization

    model = _mlp()
    model.train()
    model.qconfig = quantization.get_default_qat_qconfig("fbgemm")
    quantization.prepare_qat(model, inplace=True)
    with torch.no_grad():
        model(torch.randn(64, 10, generator=torch.Generator().manual_seed(7)) * 2)
    model.apply(quantization.disable_observer)
    model.eval()
    return Subject(model, _batch(), 0, model, model[2], _batch(), 0)


def minilm() -> Subject:
    """all-MiniLM-L6-v2 (pretrained): IG and NoiseTunnel on the token embeddings'
    output, LayerIG on the embedding layer from token ids."""
    from ..examples import minilm as example

    task = example.classification_task(target=1)
    model, mask = task.model, task.additional_forward_args[0]
    embeddings = model.bert.embeddings.word_embeddings

    def from_embeddings(word_vectors, attention_mask):
        hidden = model.bert(inputs_embeds=word_vectors, attention_mask=attention_mask).last_hidden_state
        return model.head(example.mean_pool(hidden, attention_mask))

    with torch.no_grad():
        vectors = embeddings(task.inputs)
    # LayerIG through six float32 attention layers differs from Captum by rounding alone,
    # which depends on the CPU's vector width: on a 2-core AVX2 machine 9.8e-6 (plain
    # PyTorch path) and 1.15e-5 (with the kernels) relative, where the same comparison in
    # float64 agrees to 2e-14. IG on the same model: 1.1e-6. On an AVX-512 Xeon (2026-12-07)
    # NoiseTunnel under the 6 MiB budget, whose chunks hold one or two rows, differed by
    # 4.7e-5 (2.2e-6 under 12 MiB, and Captum chunked from Captum whole); in float64 under
    # the same chunking, 1.4e-14.
    return Subject(from_embeddings, vectors, 1, model, embeddings, task.inputs, 1,
                   additional_forward_args=(mask,), layer_additional_forward_args=(mask,),
                   memory_budget=6 * 2**20, tolerance=1e-4)


def gpt2() -> Subject:
    """GPT-2 from a small GPT2Config with random weights: the logit of a token at the
    last position."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 97, (3, 7), generator=torch.Generator().manual_seed(3))

    def last_logits(input_ids):
        return model(input_ids=input_ids).logits[:, -1]

    def last_logits_from_embeddings(vectors):
        return model(inputs_embeds=vectors).logits[:, -1]

    with torch.no_grad():
        vectors = model.transformer.wte(ids)
    return Subject(last_logits_from_embeddings, vectors, 5, last_logits, model.transformer.wte, ids, 5,
                   memory_budget=2 * 2**20)


def inside_profiler() -> Subject:
    model = _mlp()

    def profiling():
        return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True,
                                      record_shapes=True)

    return Subject(model, _batch(), 1, model, model[2], _batch(), 1, context=profiling)


def train_mode_batchnorm() -> Subject:
    from ..attr._train_mode import BatchDependenceWarning

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 4)).train()
    return Subject(model, _batch(), 1, model, model[0], _batch(), 1, warns=BatchDependenceWarning)


ZOO: Dict[str, Callable[[], Subject]] = {
    "compile_inductor": lambda: compiled("inductor"),
    "compile_aot_eager": lambda: compiled("aot_eager"),
    "autograd_function_ste": straight_through,
    "checkpoint_reentrant": lambda: checkpointed(True),
    "checkpoint_non_reentrant": lambda: checkpointed(False),
    "fake_quantization": fake_quantized,
    "minilm": minilm,
    "gpt2_random": gpt2,
    "inside_profiler": inside_profiler,
    "batchnorm_train_mode": train_mode_batchnorm,
}


@dataclass
class Comparison:
    """igfast against Captum for one zoo model, method and chunking mode."""

    model: str
    method: str
    mode: str
    max_difference: float  # largest |igfast - Captum|, attributions and delta
    scale: float  # largest |Captum attribution|
    graphs_igfast: List[int] = field(default_factory=list)  # per call, compiled models only
    graphs_captum: List[int] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)  # igfast's warnings

    @property
    def relative_difference(self) -> float:
        return self.max_difference / self.scale if self.scale else self.max_difference



def _explainer(library, method: str, subject: Subject):
    if method == "LayerIntegratedGradients":
        forward = subject.layer_forward
        if library.__name__ != "igfast" and subject.captum_layer_forward is not None:
            forward = subject.captum_layer_forward
        return library.LayerIntegratedGradients(forward, subject.layer)
    if method == "NoiseTunnel":
        return library.NoiseTunnel(library.IntegratedGradients(subject.forward))
    return library.IntegratedGradients(subject.forward)


def _run(library, method: str, subject: Subject, chunking: Dict[str, Any]):
    explainer = _explainer(library, method, subject)
    inputs = subject.layer_inputs if method == "LayerIntegratedGradients" else subject.inputs
    kwargs = dict(subject.kwargs(method), n_steps=N_STEPS, return_convergence_delta=True, **chunking)
    if method == "NoiseTunnel":
        kwargs.update(nt_samples=3, stdevs=0.1)
        torch.manual_seed(11)  # Captum draws the noise with torch (and numpy for baselines)
        np.random.seed(11)
    with subject.context():
        return explainer.attribute(inputs, **kwargs)


def _largest(values) -> float:
    values = values if isinstance(values, (tuple, list)) else (values,)
    return max(float(v.detach().double().abs().max()) for v in values)


def _difference(ours, theirs) -> float:
    ours = ours if isinstance(ours, (tuple, list)) else (ours,)
    theirs = theirs if isinstance(theirs, (tuple, list)) else (theirs,)
    return max(float((a.detach().double() - b.detach().double()).abs().max()) for a, b in zip(ours, theirs))


def chunking_of(mode: str, subject: Subject, library_name: str) -> Dict[str, Any]:
    """The chunking arguments of a mode; Captum has no memory_budget (it runs unchunked)."""
    chunking = dict(MODES[mode])
    if "memory_budget" in chunking:
        if library_name != "igfast":
            return {}
        chunking["memory_budget"] = subject.memory_budget
    return chunking


def run(library, method: str, subject: Subject, mode: str):
    """One attribute() call (with the delta) of ``library`` (igfast or captum.attr)."""
    return _run(library, method, subject, chunking_of(mode, subject, library.__name__))


def compare(model: str, method: str, mode: str, subject: Optional[Subject] = None, calls: int = 2) -> Comparison:
    """igfast and Captum on one zoo model (``calls`` times each, counting the graphs a
    compiled model compiles in each call); Captum runs unchunked under "memory_budget"."""
    import captum.attr as captum_attr

    import igfast

    subject = subject or ZOO[model]()
    results, graphs, caught = {}, {"igfast": [], "captum": []}, []
    for name, library in (("captum", captum_attr), ("igfast", igfast)):
        options = chunking_of(mode, subject, library.__name__)
        if subject.graphs is not None:
            torch._dynamo.reset()  # each library compiles from scratch: fair graph counts
        for _ in range(calls):
            before = subject.graphs[0] if subject.graphs else 0
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                results[name] = _run(library, method, subject, options)
            if name == "igfast":
                caught = [f"{w.category.__name__}: {w.message}" for w in seen
                          if issubclass(w.category, UserWarning) and "igfast" in str(w.message)]
            if subject.graphs is not None:
                graphs[name].append(subject.graphs[0] - before)
    ours, theirs = results["igfast"], results["captum"]
    return Comparison(model, method, mode, _difference(ours, theirs), _largest(theirs[0]),
                      graphs["igfast"], graphs["captum"], caught)
