"""`igfast dataset`: a data set attributed from the command line, against Captum on the
same model and data; the forms of model and data it reads; its error cases and exit
codes."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import igfast
from igfast import cli

captum_attr = pytest.importorskip("captum.attr")

MODULE = textwrap.dedent("""
    import torch
    from torch import nn


    def build():
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


    class Examples(torch.utils.data.Dataset):
        def __init__(self):
            generator = torch.Generator().manual_seed(4)
            self.x = torch.randn(10, 6, generator=generator)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, index):
            return {"inputs": self.x[index], "label": index % 3}


    not_a_model = 42
""")


def run_command(*args, cwd):
    """`python -m igfast ...` in a fresh process, from ``cwd``, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "igfast", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A folder with the user's module (cli_dataset_user.py) as the current folder."""
    (tmp_path / "cli_dataset_user.py").write_text(MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "cli_dataset_user", raising=False)
    yield tmp_path
    sys.modules.pop("cli_dataset_user", None)


def model_of_the_module():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).eval()


def relative_difference(ours, theirs):
    return float((ours - theirs).abs().max() / theirs.abs().max())


def test_a_module_model_and_saved_tensors_give_captums_attributions(project):
    """A model from package.module:name and (inputs, labels) saved with torch.save, with
    --target label, in shards of 7 (the last one short): the store holds Captum's
    attributions and convergence deltas, in data-set order."""
    x = torch.randn(17, 6)
    labels = torch.randint(0, 3, (17,))
    torch.save((x, labels), project / "examples.pt")
    result = run_command("dataset", "cli_dataset_user:build", "examples.pt", "--out", "out", "--target", "label",
                         "--n-steps", "20", "--shard-size", "7", "--batch-size", "4", cwd=project)
    assert result.returncode == 0, result.stderr
    assert "17 examples" in result.stdout and "17 computed now" in result.stdout
    store = igfast.open_attributions(str(project / "out"))
    theirs, delta = captum_attr.IntegratedGradients(model_of_the_module()).attribute(
        x, target=labels, n_steps=20, return_convergence_delta=True)
    assert relative_difference(store.attributions[0:17], theirs) < 1e-5
    assert float((store.deltas[0:17] - delta).abs().max()) < 1e-5
    again = run_command("dataset", "cli_dataset_user:build", "examples.pt", "--out", "out", "--target", "label",
                        "--n-steps", "20", "--shard-size", "7", "--batch-size", "4", cwd=project)
    assert again.returncode == 0 and "0 computed now" in again.stdout  # resumed: every shard was written


def test_a_torchscript_model_a_dataset_class_and_the_options(project, capsys):
    """A TorchScript file, a Dataset class named by module:name (dict items), a class
    index as target, a baseline number and another method: Captum's result."""
    model = model_of_the_module()
    torch.jit.script(model).save(str(project / "model.ts"))
    code = cli.main(["dataset", "model.ts", "cli_dataset_user:Examples", "--out", "scripted", "--target", "2",
                     "--baseline", "0.5", "--method", "riemann_trapezoid", "--n-steps", "16", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert capsys.readouterr().out == ""  # --quiet
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(4))
    theirs = captum_attr.IntegratedGradients(model).attribute(x, baselines=0.5, target=2, n_steps=16,
                                                               method="riemann_trapezoid")
    assert relative_difference(igfast.open_attributions(str(project / "scripted")).attributions[0:10], theirs) < 1e-5


def test_an_exported_program_runs_as_its_module(project, capsys):
    """A torch.export file (.pt2), whose module cannot be put in eval mode (it keeps the
    mode it was exported in), with a batch dimension that may vary: Captum's result on
    the module it was exported from."""
    model = model_of_the_module()
    x = torch.randn(9, 6)
    exported = torch.export.export(model, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(exported, str(project / "model.pt2"))
    torch.save(x, project / "inputs.pt")
    code = cli.main(["dataset", "model.pt2", "inputs.pt", "--out", "exported", "--batch-size", "4", "--quiet"])
    assert code == 0, capsys.readouterr().err
    theirs = captum_attr.IntegratedGradients(model).attribute(x, target=model(x).argmax(1), n_steps=50)
    assert relative_difference(igfast.open_attributions(str(project / "exported")).attributions[0:9], theirs) < 1e-5


def test_auto_steps_from_the_command_line_meet_their_tolerance(project, capsys):
    x = torch.randn(5, 6)
    torch.save({"inputs": x}, project / "inputs.pt")
    code = cli.main(["dataset", "cli_dataset_user:build", "inputs.pt", "--out", "auto", "--n-steps", "auto",
                     "--tolerance", "1e-4", "--quiet"])
    assert code == 0, capsys.readouterr().err
    model = model_of_the_module()
    target = model(x).argmax(1)
    reference = captum_attr.IntegratedGradients(model.double()).attribute(x.double(), target=target, n_steps=2000)
    ours = igfast.open_attributions(str(project / "auto")).attributions[0:5].double()
    errors = (ours - reference).norm(dim=1) / reference.norm(dim=1)
    assert float(errors.max()) < 2e-4  # the tolerance, plus float32 rounding of the run


@pytest.mark.parametrize("model, data, words", [
    ("missing_module:build", "inputs.pt", "cannot import 'missing_module'"),
    ("cli_dataset_user:nothing", "inputs.pt", "has no 'nothing'"),
    ("cli_dataset_user:not_a_model", "inputs.pt", "is of type int, not a torch.nn.Module"),
    ("no-such-file.pt", "inputs.pt", "no such file, and not package.module:name"),
    ("pickled.pt", "inputs.pt", "is not a torch.export (.pt2) or TorchScript file"),
    ("pickled.pt2", "inputs.pt", "is not a torch.export (.pt2) or TorchScript file"),
    ("junk.pt2", "inputs.pt", "is not a torch.export (.pt2) or TorchScript file"),
    ("cli_dataset_user:build", "pickled.pt", "is not a file of tensors saved with torch.save"),
    ("cli_dataset_user:build", "wrong.pt", "holds keys 'x': expected a tensor of inputs"),
    ("cli_dataset_user:build", "short_labels.pt", "holds 3 inputs but 2 labels"),
    ("cli_dataset_user:build", "cli_dataset_user.py", "is not a file of tensors saved with torch.save"),
    ("static.pt2", "inputs.pt", "was exported with a fixed batch size (2)"),
    ("cli_dataset_user:build", "unlabelled.pt", "label"),  # --target label without labels: igfast's own error
])
def test_what_cannot_be_read_is_one_line_and_exit_1(project, capsys, model, data, words):
    torch.save({"inputs": torch.randn(3, 6)}, project / "inputs.pt")
    torch.save(model_of_the_module(), project / "pickled.pt")  # a whole module: a pickle, not read
    torch.save(model_of_the_module(), project / "pickled.pt2")
    (project / "junk.pt2").write_bytes(b"not an archive")
    torch.save({"x": torch.randn(3, 6)}, project / "wrong.pt")
    torch.save(torch.randn(3, 6), project / "unlabelled.pt")
    torch.save((torch.randn(3, 6), torch.zeros(2)), project / "short_labels.pt")
    torch.export.save(torch.export.export(model_of_the_module(), (torch.randn(2, 6),)), str(project / "static.pt2"))
    arguments = ["dataset", model, data, "--out", "out"] + (["--target", "label"] if data == "unlabelled.pt" else [])
    assert cli.main(arguments) == 1
    error = capsys.readouterr().err
    assert error.startswith("igfast dataset: ") and words in error and len(error.strip().splitlines()) == 1
    assert "weights_only=False" not in error  # (torch's advice, which would run the file's code)
    if data != "unlabelled.pt":  # (read before the folder is made: a refused model or data leaves none)
        assert not os.path.exists(project / "out")


def test_labels_named_as_dataset_items_name_them(project, capsys):
    """A file dict may name its labels 'label', as Dataset items do, or 'labels'."""
    x, labels = torch.randn(4, 6), torch.tensor([2, 0, 1, 2])
    torch.save({"inputs": x, "label": labels}, project / "singular.pt")
    assert cli.main(["dataset", "cli_dataset_user:build", "singular.pt", "--out", "singular", "--target", "label",
                     "--quiet"]) == 0, capsys.readouterr().err
    assert igfast.open_attributions(str(project / "singular")).targets[0:4].tolist() == labels.tolist()


def test_a_tolerance_not_reached_is_one_line_for_the_whole_run(project, capsys):
    torch.save(torch.randn(9, 6), project / "inputs.pt")
    assert cli.main(["dataset", "cli_dataset_user:build", "inputs.pt", "--out", "short", "--n-steps", "auto",
                     "--tolerance", "1e-12", "--max-steps", "9", "--batch-size", "3", "--quiet"]) == 0
    error = capsys.readouterr().err
    assert error.count("did not reach the tolerance") == 1 and "in 3 batches" in error, error
    assert "return_adaptive_info" not in error  # (an argument of the Python call, not of the command)


@pytest.mark.parametrize("args, message", [
    (["--target", "first"], "expected predicted, label, none or a class index"),
    (["--n-steps", "many"], "expected an integer or auto"),
    (["--shard-size", "0"], "--shard-size must be >= 1"),
    (["--method", "simpson"], "invalid choice"),
    (["--memory-budget", "lots"], "--memory-budget"),
    (["--baseline", "nan"], "expected a finite number"),
])
def test_bad_values_exit_2_with_the_commands_usage(project, args, message):
    result = run_command("dataset", "cli_dataset_user:build", "inputs.pt", "--out", "out", *args, cwd=project)
    assert result.returncode == 2
    assert message in result.stderr and "usage: igfast dataset" in result.stderr
    assert "Traceback" not in result.stderr and not os.path.exists(project / "out")
