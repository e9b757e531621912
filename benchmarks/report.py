"""The standard CPU benchmark suite in one run, written to one report.

Runs every benchmark of this folder that the README quotes, one after the other in
fresh processes (so no run inherits another's allocator or thread state), with one
torch thread, and writes ``benchmarks/results/cpu.md`` (each benchmark's tables,
the command that made them and its time) and ``cpu.json`` (the same, with each
benchmark's own JSON). The header says when, on what commit, CPU, torch version and
thread count. The README quotes figures from this file only, and
tests/test_readme.py checks that they appear in it; regenerate both together.

    python benchmarks/report.py                      # the whole suite (about an hour on 2 cores)
    python benchmarks/report.py --quick --out /tmp/r # every section's smoke run (minutes)
    python benchmarks/report.py --sections speed,many_calls
    python benchmarks/report.py --sections exact --merge   # re-measure sections in the existing report
    python benchmarks/report.py --update-readme      # summarise benchmarks/results/cpu.md in README.md
    python benchmarks/report.py --update-readme --out DIR   # ... or DIR/cpu.md
"""

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# name -> (title, arguments of the full run, arguments of the quick run). Each command
# prints markdown tables and takes --json FILE.
SECTIONS = {
    "speed": ("igfast against Captum, the floor and a plain vectorised IG",
              [sys.executable, "-m", "igfast", "bench", "--workloads", "mlp,cnn,minilm", "--n-steps", "16,50,200",
               "--methods", "gausslegendre"],
              [sys.executable, "-m", "igfast", "bench", "--quick"]),
    "many_calls": ("Small models and many calls", [sys.executable, "benchmarks/bench_many_calls.py"],
                   [sys.executable, "benchmarks/bench_many_calls.py", "--quick"]),
    "layer_noise_tunnel": ("LayerIntegratedGradients and NoiseTunnel", [sys.executable, "benchmarks/bench_layer_nt.py"],
                           [sys.executable, "benchmarks/bench_layer_nt.py", "--quick"]),
    "memory": ("Peak memory", [sys.executable, "benchmarks/bench_memory.py"],
               [sys.executable, "benchmarks/bench_memory.py", "--quick"]),
    "many_targets": ("Many targets in one pass", [sys.executable, "benchmarks/bench_many_targets.py"],
                     [sys.executable, "benchmarks/bench_many_targets.py", "--quick"]),
    "exact": ("Exact IG, n_steps='auto' and fixed rules",
              [sys.executable, "benchmarks/bench_exact.py", "--plot", "benchmarks/results/exact-error.png"],
              [sys.executable, "benchmarks/bench_exact.py", "--quick"]),
    "auto_floor": ("The least a self-checking n_steps='auto' can spend (smooth workloads)",
                   [sys.executable, "benchmarks/bench_auto_floor.py"],
                   [sys.executable, "benchmarks/bench_auto_floor.py", "--quick"]),
    "auto_floor_piecewise": ("The least a self-checking n_steps='auto' can spend (piecewise-linear workloads)",
                             [sys.executable, "benchmarks/bench_auto_floor.py", "--piecewise"],
                             [sys.executable, "benchmarks/bench_auto_floor.py", "--piecewise", "--quick"]),
    "jump_errors": ("Errors of auto's levels on a network with thousands of kinks (CNN)",
                    [sys.executable, "benchmarks/bench_jump_errors.py"],
                    [sys.executable, "benchmarks/bench_jump_errors.py", "--quick"]),
    # The 16-token, 16-step case: the full table (64 tokens, 50 steps) takes hours on one thread.
    "llm": ("LLM attribution", [sys.executable, "benchmarks/bench_llm.py", "--cases", "16x16", "--repeats", "1"],
            [sys.executable, "benchmarks/bench_llm.py", "--quick"]),
    "zoo": ("The model zoo against Captum", [sys.executable, "benchmarks/bench_zoo.py"],
            [sys.executable, "benchmarks/bench_zoo.py", "--quick"]),
    "dataset": ("Whole data sets", [sys.executable, "benchmarks/bench_dataset.py"],
                [sys.executable, "benchmarks/bench_dataset.py", "--quick"]),
}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    return commit + (" (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")


def header(quick: bool) -> str:
    import torch

    import igfast

    state = igfast.info()
    return "\n".join([
        "# igfast CPU benchmarks" + (" (quick smoke run: not for quoting)" if quick else ""),
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- commit: {_commit()}",
        f"- CPU: {_cpu_model()}, {os.cpu_count()} logical cores",
        f"- torch {torch.__version__}, igfast {state['igfast']} ({state['path']} path), Python {platform.python_version()}",
        "- threads: 1 (torch.set_num_threads(1) in every benchmark; medians of interleaved runs)",
        "",
        "Generated by `python benchmarks/report.py`; every figure the README quotes comes from here.",
        "",
    ])


def run_section(name: str, quick: bool, scratch: str):
    title, full, smoke = SECTIONS[name]
    command = list(smoke if quick else full)
    json_path = os.path.join(scratch, f"{name}.json")
    out_dir = os.path.join(scratch, name)
    os.makedirs(out_dir, exist_ok=True)
    if command[1:3] == ["-m", "igfast"]:
        command += ["--out", out_dir]
    else:
        command += ["--json", json_path]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=environment)
    seconds = time.perf_counter() - started
    if command[1:3] == ["-m", "igfast"]:
        json_path = os.path.join(out_dir, "igfast-bench.json")
    data = None
    if os.path.exists(json_path):
        with open(json_path) as handle:
            data = json.load(handle)
    shown = " ".join(["python"] + command[1:]).replace(out_dir, "OUT").replace(json_path, "FILE")
    text = [f"## {title}", "", f"`{shown}`: {seconds:.0f} s, exit code {completed.returncode}", ""]
    text.append(_tables_of(completed.stdout))
    if completed.returncode != 0:
        text += ["", "Failed; the end of its error output:", "", "```", completed.stderr[-3000:], "```"]
    return "\n".join(text) + "\n", {"command": shown, "seconds": seconds, "returncode": completed.returncode,
                                    "data": data}


def _tables_of(stdout: str) -> str:
    """The command's output without progress lines: as markdown when it prints
    markdown tables, else as preformatted text (fixed-width tables)."""
    kept = "\n".join(line for line in stdout.splitlines() if not line.startswith(("wrote ", "[#", "[."))).strip()
    return kept if "|---" in kept else f"```text\n{kept}\n```"


# The README's figures: a few summary lines built from cpu.md's tables. Every figure is
# a cell (or a number in a line) of cpu.md copied as text, never recomputed or rounded,
# so tests/test_readme.py can find each one in the report. A line whose section or
# table is missing from the report is left out.
README = os.path.join(ROOT, "README.md")
BLOCK = re.compile(r"(<!-- figures:cpu -->\n)(.*?)(<!-- /figures -->)", re.S)
REPORT_LINK = "[benchmarks/results/cpu.md](benchmarks/results/cpu.md)"


def _sections(report: str):
    """title -> lines of each '## ' section of a report."""
    sections, title = {}, None
    for line in report.splitlines():
        if line.startswith("## "):
            title = line[3:].strip()
            sections[title] = []
        elif title is not None:
            sections[title].append(line)
    return sections


def _section(sections, prefix: str):
    return next((body for title, body in sections.items() if title.startswith(prefix)), None)


def _cells(line: str):
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _markdown_table(lines, columns, start: int = 0):
    """Rows (column -> cell text) of the first markdown table from lines[start:]
    whose header has all `columns`; [] when there is none."""
    for index in range(start, len(lines) - 1):
        line = lines[index]
        if not line.startswith("|") or not lines[index + 1].startswith("|---"):
            continue
        header = _cells(line)
        if not all(column in header for column in columns):
            continue
        rows = []
        for row in lines[index + 2:]:
            if not row.startswith("|"):
                break
            cells = _cells(row)
            if len(cells) == len(header):
                rows.append(dict(zip(header, cells)))
        return rows
    return []


def _speed_line(sections):
    body = _section(sections, "igfast against Captum")
    rows = [r for r in _markdown_table(body or [], ("workload", "n_steps", "speedup", "igfast / floor",
                                                    "Captum / floor"))
            if r["n_steps"] == "50" and r.get("method", "gausslegendre") == "gausslegendre"]
    if not rows:
        return None
    parts = [f"{r['workload']} {r['speedup']} (igfast {r['igfast / floor']}x the floor, Captum "
             f"{r['Captum / floor']}x)" for r in rows]
    return ("- Speed, one call at 50 steps (gausslegendre), speedup over Captum; the floor is the "
            "model's own forward and backward on the same rows: " + "; ".join(parts) + ".")


def _many_calls_line(sections):
    body = _section(sections, "Small models and many calls") or []
    for index, line in enumerate(body):
        match = re.match(r"(\d+) calls of one example each \((.*?)\)", line)
        if not match:
            continue
        rows = _markdown_table(body, ("floor", "igfast", "Captum", "speedup over Captum"), index)
        if rows:
            r = rows[0]
            return (f"- {match.group(1)} calls of one example each ({match.group(2)}): igfast {r['igfast']} s, "
                    f"Captum {r['Captum']} s (speedup {r['speedup over Captum']}), floor {r['floor']} s.")
    return None


MEMORY_ROW = re.compile(r"^(?P<label>\S.*?)\s+(?P<chunks>\d+)\s+(?P<rows>\d+)\s+(?P<alloc>[\d.]+)\s+"
                        r"(?P<rss>[\d.]+)\s+(?P<over_floor>[\d.]+)\s+(?P<seconds>[\d.]+)\s+[\d.]+$")


def _memory_line(sections):
    body = _section(sections, "Peak memory") or []
    groups, current = [], None
    for index, line in enumerate(body):
        if index + 1 < len(body) and body[index + 1].startswith("case "):
            current = (line.strip(), [])
            groups.append(current)
        elif current is not None:
            match = MEMORY_ROW.match(line)
            if match:
                current[1].append(match)
    parts = []
    for group, rows in groups:
        captum = next((r for r in rows if r["label"].startswith("captum")), None)
        default = next((r for r in rows if r["label"].startswith("igfast (default")), None)
        budgets = [r for r in rows if r["label"].startswith("igfast, memory_budget=")]
        smallest = min(budgets, key=lambda r: float(r["alloc"]), default=None)
        figures = []
        if captum is not None:
            qualifier = captum["label"][len("captum"):].lstrip(", ")
            figures.append(f"Captum {captum['alloc']} MiB" + (f" ({qualifier})" if qualifier else ""))
        if default is not None:
            figures.append(f"igfast {default['alloc']} MiB (automatic budget)")
        if smallest is not None:
            figures.append(f"{smallest['alloc']} MiB with {smallest['label'][len('igfast, '):]}")
        if len(figures) >= 2:
            parts.append(f"{group}: " + ", ".join(figures))
    if not parts:
        return None
    return ("- Peak memory one call adds (bytes from PyTorch's allocator, read by the profiler on CPU): "
            + "; ".join(parts) + ".")


EXACT_COLUMN = "exact (mixed: gausslegendre_pieces): evaluations"  # bench_exact's table


def _exact_line(sections):
    body = _section(sections, "Exact IG") or []
    rows = _markdown_table(body, ("workload", "tol", "fixed GL: steps", "auto: evaluations (tolerance used)",
                                  EXACT_COLUMN))
    tightest = {}
    for r in rows:
        try:
            tol = float(r["tol"])
        except ValueError:
            continue
        if r["workload"] not in tightest or tol < float(tightest[r["workload"]]["tol"]):
            tightest[r["workload"]] = r
    if not tightest:
        return None
    parts = [f"{name} at {r['tol']}: {r['fixed GL: steps']} / {r['auto: evaluations (tolerance used)'].split()[0]}"
             f" / {r[EXACT_COLUMN]}" for name, r in tightest.items()]
    return ("- Evaluations per example until every example is within the tolerance (fixed Gauss-Legendre / "
            "`n_steps=\"auto\"` / `method=\"exact\"`, on mixed networks `\"gausslegendre_pieces\"`): "
            + "; ".join(parts) + "." + _auto_against_hindsight(rows, sections))


def _auto_against_hindsight(exact_rows, sections) -> str:
    """How often auto spends no more than the fixed rule, whose step count is the
    fewest that meets tol (known only in hindsight), and where no self-checking rule
    can (bench_auto_floor): the tightest tolerance alone would flatter auto."""
    cells = [r for r in exact_rows if r.get("GL / auto evals", "").endswith("x")]
    if not cells:
        return ""
    ratios = [float(r["GL / auto evals"].rstrip("x")) for r in cells]
    tols = sorted({r["tol"] for r in cells}, key=float, reverse=True)
    text = (f" The fixed rule's steps are the fewest that meet the tolerance, known only in hindsight: "
            f"`auto` spends no more in {sum(ratio >= 1.0 for ratio in ratios)} of {len(ratios)} cells "
            f"(tol {tols[0]} to {tols[-1]})")
    floor_rows = [row for title, body in sections.items() if title.startswith("The least a self-checking")
                  for row in _markdown_table(body, ("workload", "tol", "best possible GL / auto"))]
    unreachable = [r for r in floor_rows if float(r["best possible GL / auto"].rstrip("x")) < 1.0]
    if unreachable:
        best = sorted((r["best possible GL / auto"] for r in unreachable), key=lambda cell: float(cell.rstrip("x")))
        tols_by_workload: dict = {}
        for r in unreachable:
            tols_by_workload.setdefault(r["workload"], []).append(r["tol"])
        cells_text = "; ".join(f"{workload} at {_listed_in_words(tols)}"
                               for workload, tols in tols_by_workload.items())
        text += (f", and no rule that checks its own error can on {cells_text} "
                 f"(at best {best[0]}-{best[-1]})")
    return text + "."


def _listed_in_words(items) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


LLM_ROW = re.compile(r"^\s*(?P<targets>\d+)\s+(?P<n_steps>\d+)\s+(?P<igfast>[\d.]+)\s+(?P<captum>[\d.]+)\s+\S+\s+"
                     r"(?P<speedup>[\d.]+)\s+(?P<bound>[\d.]+)\s+(?P<of_bound>[\d.]+)\s+[\d.]+\s+"
                     r"(?P<peak_igfast>[\d.]+ [KMG]?i?B)\s+(?P<peak_captum>[\d.]+ [KMG]?i?B)\s+\d+/\d+\s+\S+\s*$")


def _llm_line(sections):
    body = _section(sections, "LLM attribution") or []
    rows = [m for m in map(LLM_ROW.match, body) if m]
    if not rows:
        return None
    parts = [f"{r['targets']} target tokens, {r['n_steps']} steps: igfast {r['igfast']} s, Captum {r['captum']} s "
             f"(speedup {r['speedup']}, {r['of_bound']} of the one-pass bound), peak {r['peak_igfast']} against "
             f"{r['peak_captum']}" for r in rows]
    return "- LLMGradientAttribution against Captum's: " + "; ".join(parts) + "."


README_LINES = (_speed_line, _many_calls_line, _memory_line, _exact_line, _llm_line)


def readme_figures(report: str) -> str:
    """The README's figures block for a report: where the figures come from (the
    report's header facts), then one line per benchmark the report has."""
    facts = [line[2:] for line in report.splitlines()[:8] if line.startswith("- ")]
    sections = _sections(report)
    # Sections re-run with --merge carry their own date and commit: say which.
    names = {SECTIONS[name][0]: name for name in SECTIONS}
    remeasured = {}
    for title, body in sections.items():
        stamp = next((m for m in map(MERGE_STAMP.match, body) if m), None)
        if stamp:
            remeasured.setdefault((stamp["date"], stamp["commit"]), []).append(names.get(title, title))
    for (date, commit), which in sorted(remeasured.items()):
        label = "sections" if len(which) > 1 else "section"
        facts.append(f"{label} {', '.join(which)} re-measured {date}, commit {commit[:7]}")
    lines = [line for line in (make(sections) for make in README_LINES) if line]
    return "\n".join([f"From {REPORT_LINK} ({'; '.join(facts)}):", "", *lines, ""])


def update_readme(report_dir: str) -> None:
    with open(os.path.join(report_dir, "cpu.md")) as handle:
        report = handle.read()
    if "smoke run" in report.splitlines()[0]:
        raise SystemExit("refusing to quote a --quick report in the README")
    with open(README) as handle:
        readme = handle.read()
    if not BLOCK.search(readme):
        raise SystemExit("README.md has no <!-- figures:cpu --> ... <!-- /figures --> block")
    readme = BLOCK.sub(lambda m: m.group(1) + readme_figures(report) + "\n" + m.group(3), readme)
    with open(README, "w") as handle:
        handle.write(readme)
    print(f"README.md: figures quoted from {os.path.join(report_dir, 'cpu.md')}")


MERGE_STAMP = re.compile(r"^Re-measured alone with .*: (?P<date>\d{4}-\d\d-\d\d \d\d:\d\d UTC), "
                         r"commit (?P<commit>\w+) ")


def merged(out: str, names, texts, results, commit: str):
    """The existing report with the sections ``names`` replaced by ``texts``, each
    headed by the date and commit of this run (the header keeps the full run's)."""
    with open(os.path.join(out, "cpu.md")) as handle:
        report = handle.read()
    with open(os.path.join(out, "cpu.json")) as handle:
        old_results = json.load(handle)
    pieces = re.split(r"(?m)^(?=## )", report)
    stamp = (f"Re-measured alone with `--sections {','.join(names)} --merge`: "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit} "
             "(the other sections are the header's run).")
    for name, text in zip(names, texts):
        title = f"## {SECTIONS[name][0]}\n"
        text = text.replace(title, title + "\n" + stamp + "\n", 1)
        index = next((i for i, piece in enumerate(pieces) if piece.startswith(title)), None)
        if index is None:
            pieces.append(text)
        else:
            pieces[index] = text + ("\n" if pieces[index].endswith("\n\n") else "")
        old_results[name] = {**results[name], "merged": stamp}
    return ["".join(pieces).rstrip("\n") + "\n"], old_results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every section's smoke run")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated from {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"),
                        help="folder for cpu.md and cpu.json (with --update-readme: the report to read; "
                             "default benchmarks/results)")
    parser.add_argument("--merge", action="store_true",
                        help="replace only the --sections run in the existing --out/cpu.md and cpu.json, "
                             "each marked with its own date and commit (the header keeps the full run's)")
    parser.add_argument("--update-readme", action="store_true",
                        help="run nothing: rewrite README.md's figures block (between <!-- figures:cpu --> "
                             "and <!-- /figures -->) as a summary of --out/cpu.md; refuses a --quick report")
    args = parser.parse_args()
    if args.update_readme:
        update_readme(args.out)
        return 0
    names = [n for n in args.sections.split(",") if n]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    os.makedirs(args.out, exist_ok=True)
    commit = _commit()  # before the run writes its results into the tree
    parts, results = [header(args.quick)], {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            print(f"report: {name} ...", file=sys.stderr, flush=True)
            text, results[name] = run_section(name, args.quick, scratch)
            parts.append(text)
            print(f"report: {name} done in {results[name]['seconds']:.0f} s (exit {results[name]['returncode']})",
                  file=sys.stderr, flush=True)
    if args.merge:
        parts, results = merged(args.out, names, parts[1:], results, commit)
    with open(os.path.join(args.out, "cpu.md"), "w") as handle:
        handle.write("\n".join(parts))
    with open(os.path.join(args.out, "cpu.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    print(f"wrote {os.path.join(args.out, 'cpu.md')}")
    return 1 if any(r["returncode"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
