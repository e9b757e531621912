"""The `igfast` command end to end: demo (tiny setting), bench --quick on one
workload, info; the files they write; the error cases and their exit codes; the
visualisation helpers."""

import json
import os
import subprocess
import sys
from importlib import metadata

import pytest
import torch

import igfast
from igfast import cli, viz
from igfast.bench.report import JSON_FIELDS

matplotlib_image = pytest.importorskip("matplotlib.image")
pytest.importorskip("sklearn")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_command(*args, env=None):
    """`python -m igfast ...` in a fresh process, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "igfast", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def assert_png(path, min_side=100):
    with open(path, "rb") as handle:
        assert handle.read(8) == PNG_MAGIC
    pixels = matplotlib_image.imread(path)
    assert pixels.ndim == 3 and min(pixels.shape[:2]) >= min_side
    assert pixels.std() > 0.05  # not a blank canvas


def test_console_script_is_declared():
    scripts = {e.name: e.value for e in metadata.entry_points(group="console_scripts")}
    assert scripts.get("igfast") == "igfast.cli:main"


def test_demo_writes_picture_and_tokens(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IGFAST_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert cli.main(["demo", "--out", str(out), "--images", "2", "--n-steps", "8"]) == 0
    printed = capsys.readouterr().out
    assert "trained in" in printed and "test accuracy" in printed
    assert printed.count("completeness |delta|") == 2
    assert "Captum" in printed and ("x faster" in printed or "x slower" in printed)
    assert_png(out / "igfast-demo-digits.png")
    page = (out / "igfast-demo-tokens.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<span") > 10 and "guitar" in page
    # The second run loads the cached model instead of training again; the demo's
    # threads are the caller's again afterwards.
    threads = torch.get_num_threads()
    assert cli.main(["demo", "--out", str(out), "--images", "1", "--n-steps", "4", "--no-text",
                     "--threads", "2"]) == 0
    assert "loaded from" in capsys.readouterr().out
    assert torch.get_num_threads() == threads


def test_bench_table_without_captum_leaves_the_speedup_empty():
    from igfast.bench.report import format_table
    row = {"workload": "mlp", "n_steps": 50, "method": "gausslegendre", "igfast_s": 0.01}
    cells = [c.strip() for c in format_table({"rows": [row, {**row, "speedup_over_captum": 3.2}]}).splitlines()[2].split("|")]
    assert "-x" not in cells and cells[11] == "-"
    assert "3.20x" in format_table({"rows": [{**row, "speedup_over_captum": 3.2}]})


def test_demo_model_is_accurate_and_complete(tmp_path, monkeypatch):
    from igfast.demo import load_digits, trained_digits_cnn

    monkeypatch.setenv("IGFAST_CACHE_DIR", str(tmp_path))
    digits = load_digits()
    model, _ = trained_digits_cnn(digits)
    with torch.no_grad():
        accuracy = (model(digits.test_images).argmax(1) == digits.test_labels).float().mean()
    assert accuracy > 0.9
    ig = igfast.IntegratedGradients(model)
    errors = []
    for n_steps in (8, 200):
        _, delta = ig.attribute(digits.test_images[:8], target=digits.test_labels[:8],
                                n_steps=n_steps, return_convergence_delta=True)
        errors.append(float(delta.abs().max()))
    with torch.no_grad():
        rise = model(digits.test_images[:8]).gather(1, digits.test_labels[:8, None]) - model(
            torch.zeros(8, 1, 8, 8)).gather(1, digits.test_labels[:8, None])
    assert errors[1] < errors[0] and errors[1] < 2e-3 * float(rise.abs().max())


def test_bench_quick_writes_table_json_and_plot(tmp_path, capsys):
    assert cli.main(["bench", "--quick", "--workloads", "mlp", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr()
    assert "| mlp | 8 | gausslegendre |" in printed.out and "| mlp | 32 |" in printed.out
    assert "0/2" in printed.err and "1/2" in printed.err  # the progress lines
    report = json.loads((tmp_path / "igfast-bench.json").read_text())
    assert {"igfast", "torch", "device", "threads", "workload_names", "rows"} <= set(report)
    assert len(report["rows"]) == 2
    for row in report["rows"]:
        assert set(JSON_FIELDS) <= set(row)
        assert row["floor_s"] > 0 and row["igfast_s"] > 0 and row["captum_s"] > 0
        assert row["max_difference"] < 1e-4
        assert row["speedup_over_captum"] == pytest.approx(row["captum_s"] / row["igfast_s"])
        assert row["igfast_peak_bytes"] > 0
    assert_png(tmp_path / "igfast-bench.png")


def test_info_command(capsys):
    assert cli.main(["info"]) == 0
    printed = capsys.readouterr().out
    assert "kernels in use (built, loaded and not disabled): cpu" in printed and "cpu path:" in printed
    assert "method='exact' walk kernels" in printed
    assert cli.main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["igfast"] == igfast.__version__


@pytest.mark.parametrize("args, message", [
    (["frobnicate"], "invalid choice"),
    (["bench", "--speed"], "unrecognized arguments"),
    (["bench", "--workloads", "resnet"], "unknown resnet"),
    (["bench", "--n-steps", "0"], "expected integers >= 1"),
    (["demo", "--images", "0"], "--images must be >= 1"),
    (["demo", "--images", "1000"], "--images must be at most 297"),
    (["llm", "--prompt", " "], "--prompt is empty"),
    ([], "required"),
])
def test_usage_errors_exit_2_without_traceback(args, message):
    result = run_command(*args)
    assert result.returncode == 2
    assert message in result.stderr and "usage: igfast" in result.stderr
    assert "Traceback" not in result.stderr
    if args and args[0] in ("demo", "llm", "bench") and message != "unrecognized arguments":
        # a bad value shows its command's usage (argparse shows the top level's for unknown flags)
        assert f"usage: igfast {args[0]}" in result.stderr and f"igfast {args[0]}: error:" in result.stderr


def test_version():
    result = run_command("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"igfast {igfast.__version__}"


def test_bench_without_captum_says_what_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "captum.attr", None)  # import fails as if not installed
    assert cli.main(["bench", "--quick", "--out", str(tmp_path)]) == 1
    assert "pip install 'igfast[test]'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without GPU")
def test_bench_cuda_without_gpu():
    result = run_command("bench", "--quick", "--device", "cuda")
    assert result.returncode == 1
    assert "no CUDA GPU" in result.stderr and "Traceback" not in result.stderr


def test_unwritable_output_path(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for command in ("demo", "bench"):
        result = run_command(command, "--out", str(blocker / "sub"), "--no-captum" if command == "bench" else "--no-text")
        assert result.returncode == 1, result.stderr
        assert "cannot create the output folder" in result.stderr and "Traceback" not in result.stderr


def test_viz_helpers(tmp_path):
    html = viz.tokens_to_html(["<b>", "ok"], [0.5, -1.0], caption="a & b")
    assert "&lt;b&gt;" in html and "a &amp; b" in html
    assert "rgb(255,128,128)" in html and "rgb(0,0,255)" in html  # half red, full blue
    with pytest.raises(ValueError, match="one value per token"):
        viz.tokens_to_html(["a"], [1.0, 2.0])
    images = torch.rand(2, 3, 8, 8)
    attributions = torch.randn(2, 3, 8, 8)
    path = viz.save_image_attributions(images, attributions, str(tmp_path / "x.png"), ["a", "b"])
    assert_png(path)
    with pytest.raises(ValueError, match="same number of rows"):
        viz.save_image_attributions(images, attributions[:1], str(tmp_path / "y.png"))


def test_llm_command_writes_the_token_map(tmp_path):
    """`igfast llm`: a generated continuation attributed to the prompt, drawn as the
    output-token x prompt-token map (PNG and HTML)."""
    pytest.importorskip("transformers")
    completed = run_command("llm", "--model", "tiny", "--max-new-tokens", "3", "--n-steps", "4",
                            "--prompt", "The cat sat on the mat", "--out", str(tmp_path))
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "tiny GPT-2" in completed.stdout
    assert_png(str(tmp_path / "llm-token-map.png"))
    page = (tmp_path / "llm-token-map.html").read_text()
    assert page.count("<tr>") == 1 + 3 and ("title='+" in page or "title='-" in page)


def test_llm_command_bad_option():
    completed = run_command("llm", "--max-new-tokens", "0")
    assert completed.returncode == 2 and "--max-new-tokens must be >= 1" in completed.stderr


@pytest.mark.parametrize("budget, code, words", [("abc", 2, "--memory-budget"), ("1KB", 1, "memory_budget")])
def test_llm_command_bad_memory_budget_is_one_line(budget, code, words, tmp_path):
    """A value that does not parse is a usage error (2); a budget too small for the model,
    known once it runs, a one-line problem (1); never a traceback."""
    completed = run_command("llm", "--model", "tiny", "--max-new-tokens", "2", "--n-steps", "4",
                            "--memory-budget", budget, "--out", str(tmp_path))
    assert completed.returncode == code, completed.stderr[-2000:]
    assert "Traceback" not in completed.stderr and words in completed.stderr


def test_a_reader_that_stops_early_gets_no_traceback(tmp_path):
    """`igfast info --json | true`, `igfast bench ... | head -1`: the first print after the
    reader left raised BrokenPipeError with a traceback (exit 1), and bench and demo
    lost the files they write after printing."""
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    for args in (("info", "--json"), ("info",)):
        for environment in (buffered, {**buffered, "PYTHONUNBUFFERED": "1"}):  # (what stays buffered meets it at exit)
            completed = subprocess.run(f"{sys.executable} -m igfast {' '.join(args)} | true; exit ${{PIPESTATUS[0]}}",
                                       shell=True, capture_output=True, text=True, timeout=300,
                                       executable="/bin/bash", env=environment)
            assert completed.returncode == 0, completed.stderr
            assert "Traceback" not in completed.stderr and "BrokenPipe" not in completed.stderr, completed.stderr
    # The stream itself: once the reader left, output is dropped and nothing raises.
    class Closed:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    stream = cli._ReaderMayLeave(Closed())
    assert stream.write("table\n") == 6 and stream.reader_left
    stream.flush()


def test_demo_cache_that_is_damaged_or_unwritable(tmp_path, monkeypatch):
    """A damaged cache file (garbage: UnpicklingError) and a cache torch.save cannot write
    (RuntimeError, not OSError) ended the demo with a traceback; the model is trained
    again, and said not cached."""
    from igfast.demo import CACHE_VERSION, load_digits, trained_digits_cnn

    monkeypatch.setenv("IGFAST_CACHE_DIR", str(tmp_path))
    (tmp_path / f"digits_cnn_v{CACHE_VERSION}.pt").write_text("garbage\n")
    digits = load_digits()
    _, where = trained_digits_cnn(digits)
    assert where.startswith("trained in") and "cached at" in where
    _, where = trained_digits_cnn(digits)
    assert where.startswith("loaded from")

    def cannot_write(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:747] . open file failed")

    monkeypatch.setattr(torch, "save", cannot_write)
    _, where = trained_digits_cnn(digits, retrain=True)
    assert "not cached" in where and "open file failed" in where


def test_llm_command_prompt_beyond_the_models_context(tmp_path):
    """A prompt and --max-new-tokens beyond the model's context failed inside generate()
    with an IndexError traceback."""
    pytest.importorskip("transformers")
    completed = run_command("llm", "--model", "tiny", "--max-new-tokens", "1000", "--n-steps", "1",
                            "--out", str(tmp_path))
    assert completed.returncode == 1 and "Traceback" not in completed.stderr, completed.stderr[-2000:]
    assert "exceed the model's 512-token context" in completed.stderr


def test_output_folder_that_is_a_file(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    completed = run_command("bench", "--out", str(blocker), "--no-captum")
    assert completed.returncode == 1 and "is a file, not a folder" in completed.stderr
