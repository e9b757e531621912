"""The README keeps its promises: figures quoted from the generated report, links and
names that exist, the two commands CI runs, the command's options as the parser has
them, and no text about the project's own history."""

import importlib.util
import os
import re

import pytest

import igfast
from igfast import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_PATH = os.path.join(ROOT, "README.md")
REPORT_PATH = os.path.join(ROOT, "benchmarks", "results", "cpu.md")

with open(README_PATH) as _handle:
    README = _handle.read()


def _report_module():
    spec = importlib.util.spec_from_file_location("report", os.path.join(ROOT, "benchmarks", "report.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _figures_block() -> str:
    match = re.search(r"<!-- figures:cpu -->\n(.*?)<!-- /figures -->", README, re.S)
    assert match, "README lost its <!-- figures:cpu --> ... <!-- /figures --> block"
    return match.group(1)


NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def _numbers_not_in(lines, report):
    return [(n, line) for line in lines for n in NUMBER.findall(line) if n not in report]


def test_quoted_figures_come_from_the_report():
    block = _figures_block()
    if not os.path.exists(REPORT_PATH):
        assert not re.search(r"\d\.\d", block), "figures quoted without benchmarks/results/cpu.md"
        pytest.skip("benchmarks/results/cpu.md not generated yet (python benchmarks/report.py, "
                    "then python benchmarks/report.py --update-readme)")
    with open(REPORT_PATH) as handle:
        report = handle.read()
    assert "smoke run" not in report.splitlines()[0], "the README must not quote a --quick report"
    assert block == _report_module().readme_figures(report) + "\n", \
        "the figures block is not what `python benchmarks/report.py --update-readme` makes of cpu.md"
    lines = [line for line in block.splitlines() if line.startswith("- ")]
    assert len(lines) >= 3, "the block quotes almost nothing"
    assert not _numbers_not_in(lines, report), f"README figures not in cpu.md: {_numbers_not_in(lines, report)}"


def test_links_and_images_exist():
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if "://" in target:
            continue
        assert os.path.exists(os.path.join(ROOT, target)), f"README links to missing {target}"


def test_igfast_names_exist():
    for name in set(re.findall(r"\bigfast\.([A-Za-z_][A-Za-z0-9_]*)", README)):
        if name in {"info"} or os.path.exists(os.path.join(ROOT, "igfast", name)) or \
                os.path.exists(os.path.join(ROOT, "igfast", name + ".py")):
            continue
        assert hasattr(igfast, name), f"README names igfast.{name}, which does not exist"


def test_ci_blocks_are_bash_blocks():
    for name in ("main-job", "tests"):
        assert re.search(rf"<!-- ci:{name} -->\n```bash\n[^`]+\n```", README), f"ci:{name} block is missing"


def test_bench_options_agree_with_the_parser():
    parser = cli._parser()
    bench = next(action for action in parser._subparsers._group_actions[0].choices.items()
                 if action[0] == "bench")[1]
    options = {option for action in bench._actions for option in action.option_strings} - {"-h", "--help"}
    row = next(line for line in README.splitlines() if line.startswith("| `igfast bench"))
    documented = set(re.findall(r"--[a-z-]+", row))
    assert documented == options, f"README bench options {sorted(documented)} != parser {sorted(options)}"
    commands = set(parser._subparsers._group_actions[0].choices)
    listed = set(re.findall(r"^\| `igfast ([a-z]+)", README, re.M))
    assert listed == commands, f"README commands {sorted(listed)} != {sorted(commands)}"


def test_short_and_about_the_user_not_the_project():
    assert len(README.splitlines()) <= 220
    for phrase in ("issue", "this machine", "measured here"):
        assert phrase not in README.lower(), f"README speaks of {phrase!r}"


FAKE_REPORT = """# igfast CPU benchmarks

- date: 2030-01-01 00:00 UTC
- commit: 0123456789ab
- CPU: Some CPU, 2 logical cores
- torch 9.9.9, igfast 0.1.0 (kernels path), Python 3.11.0
- threads: 1 (torch.set_num_threads(1) in every benchmark; medians of interleaved runs)

## igfast against Captum, the floor and a plain vectorised IG

| workload | n_steps | method | floor s | igfast s | Captum s | igfast / floor | Captum / floor | speedup |
|---|---|---|---|---|---|---|---|---|
| mlp | 16 | gausslegendre | 0.0009 | 0.0011 | 0.0031 | 1.22 | 3.44 | 2.82x |
| mlp | 50 | gausslegendre | 0.0017 | 0.0021 | 0.0093 | 1.24 | 5.47 | 4.43x |
| cnn | 50 | gausslegendre | 0.2222 | 0.1234 | 0.2345 | 0.56 | 1.06 | 1.90x |

## Peak memory

```text
cnn, batch 16, n_steps 200
case                                           chunks   rows alloc MiB  RSS MiB /floor   time s /floor
captum                                              1   3200     687.6    900.1   1.00     9.58   3.44
  floor at 3200 rows                                1   3200     687.5    800.7            2.75
igfast (default: automatic budget)                 12    272      58.6    110.8   1.00     5.54   5.43
  floor at 272 rows                                12    272      58.4     84.6            1.28
igfast, memory_budget=64MiB                        20    160      34.6     88.5   1.01     5.35   2.62
  floor at 160 rows                                20    160      34.4     85.8            2.52
igfast, memory_budget=16MiB                       100     32       7.3     58.4   1.03     5.25   3.53
  floor at 32 rows                                100     32       6.9     47.6            1.35
```
"""


def test_update_readme_summarises_verbatim_and_leaves_out_missing_sections(tmp_path, monkeypatch):
    report_module = _report_module()
    block = report_module.readme_figures(FAKE_REPORT)
    lines = block.splitlines()
    assert lines[0] == ("From [benchmarks/results/cpu.md](benchmarks/results/cpu.md) (date: 2030-01-01 00:00 UTC; "
                        "commit: 0123456789ab; CPU: Some CPU, 2 logical cores; torch 9.9.9, igfast 0.1.0 (kernels "
                        "path), Python 3.11.0; threads: 1 (torch.set_num_threads(1) in every benchmark; medians of "
                        "interleaved runs)):")
    bullets = [line for line in lines if line.startswith("- ")]
    assert len(bullets) == 2, bullets  # speed and memory; the other sections are not in the report
    speed, memory = bullets
    assert "mlp 4.43x (igfast 1.24x the floor, Captum 5.47x)" in speed and "cnn 1.90x" in speed
    assert "2.82x" not in speed, "only the 50-step rows are quoted"
    assert "Captum 687.6 MiB, igfast 58.6 MiB (automatic budget), 7.3 MiB with memory_budget=16MiB" in memory
    assert not _numbers_not_in(bullets, FAKE_REPORT)

    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- figures:cpu -->\nold\n<!-- /figures -->\nafter\n")
    monkeypatch.setattr(report_module, "README", str(readme))
    (tmp_path / "cpu.md").write_text(FAKE_REPORT)
    report_module.update_readme(str(tmp_path))
    assert readme.read_text() == "before\n<!-- figures:cpu -->\n" + block + "\n<!-- /figures -->\nafter\n"

    quick = FAKE_REPORT.replace("benchmarks\n", "benchmarks (quick smoke run: not for quoting)\n", 1)
    (tmp_path / "cpu.md").write_text(quick)
    with pytest.raises(SystemExit):
        report_module.update_readme(str(tmp_path))
