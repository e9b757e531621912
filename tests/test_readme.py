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


def _figures_block() -> str:
    match = re.search(r"<!-- figures:cpu -->\n(.*?)<!-- /figures -->", README, re.S)
    assert match, "README lost its <!-- figures:cpu --> ... <!-- /figures --> block"
    return match.group(1)


def test_quoted_figures_come_from_the_report():
    block = _figures_block()
    lines = [line for line in block.splitlines() if line.strip()]
    if not os.path.exists(REPORT_PATH):
        assert not re.search(r"\d\.\d", block), "figures quoted without benchmarks/results/cpu.md"
        pytest.skip("benchmarks/results/cpu.md not generated yet (python benchmarks/report.py)")
    with open(REPORT_PATH) as handle:
        report = handle.read()
    assert "smoke run" not in report.splitlines()[0], "the README must not quote a --quick report"
    source, *quoted = lines
    facts = re.match(r"From \[.*?\]\(.*?\) \((.*)\):$", source)
    assert facts, f"the block must start by naming its report: {source!r}"
    for fact in facts.group(1).split("; "):
        assert f"- {fact}" in report, f"header fact {fact!r} is not in cpu.md"
    spec = importlib.util.spec_from_file_location("report", os.path.join(ROOT, "benchmarks", "report.py"))
    report_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report_module)
    captions = {caption for _, caption, _, _ in report_module.README_QUOTES}
    figures = [line for line in quoted if line not in captions and not line.startswith("```")]
    assert len(figures) >= 5, "the block quotes almost nothing"
    for line in figures:
        assert line in report, f"README figure line not in cpu.md: {line!r}"


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
