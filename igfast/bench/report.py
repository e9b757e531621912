"""`igfast bench`: igfast against Captum against the floor and a plain vectorised
IG, as a table, a JSON file and a PNG plot.

For every workload x n_steps x method, the variants run interleaved (each round in a
fresh random order), after untimed calls that check that igfast and Captum agree
(attributions and convergence delta) and measure each variant's peak memory. The
timed calls attribute without the delta (the floor and the plain IG compute none).
Times are medians of the timed rounds; ratios are ratios of medians.
"""

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from .. import __version__
from .._info import info
from ..memory import format_size
from .peak import peak_of
from .timing import interleaved_medians, repeats_for
from .workloads import BenchCase, build_case

JSON_FIELDS = (
    "workload", "n_steps", "method", "device", "floor_s", "plain_s", "igfast_s", "captum_s",
    "igfast_over_floor", "plain_over_floor", "igfast_over_plain", "captum_over_floor", "speedup_over_captum",
    "floor_peak_bytes", "plain_peak_bytes", "igfast_peak_bytes", "captum_peak_bytes", "igfast_delta_max",
    "captum_delta_max", "max_difference", "repeats",
)


@dataclass
class Settings:
    workloads: Sequence[str]
    n_steps: Sequence[int]
    methods: Sequence[str]
    device: str
    repeats: Optional[int]  # None: by cost, about `seconds_per_case` of the slowest variant
    threads: int
    seconds_per_case: float = 2.0
    captum: bool = True
    notes: List[str] = field(default_factory=list)


def _largest_difference(ours: Any, theirs: Any) -> float:
    ours = ours if isinstance(ours, (tuple, list)) else (ours,)
    theirs = theirs if isinstance(theirs, (tuple, list)) else (theirs,)
    return max(float((a - b.detach()).abs().max()) for a, b in zip(ours, theirs))


def bench_one(case: BenchCase, n_steps: int, method: str, settings: Settings) -> Dict[str, Any]:
    import igfast

    libraries = {"igfast": igfast}
    if settings.captum:
        import captum.attr as captum_attr
        libraries["captum"] = captum_attr
    variants = {"floor": case.floor(n_steps, method), "plain": case.plain(n_steps, method)}
    for name, library in libraries.items():
        variants[name] = (lambda library=library: case.run(library, n_steps, method, False))
    row: Dict[str, Any] = {"workload": case.key, "n_steps": n_steps, "method": method,
                           "device": settings.device}
    checked = {name: case.run(library, n_steps, method, True) for name, library in libraries.items()}
    for name in libraries:
        row[f"{name}_delta_max"] = float(checked[name][1].abs().max())
    if settings.captum:
        row["max_difference"] = _largest_difference(checked["igfast"][0], checked["captum"][0])
    for name, run in variants.items():
        _, row[f"{name}_peak_bytes"] = peak_of(run, settings.device)
    repeats = settings.repeats or repeats_for(
        variants["captum" if settings.captum else "igfast"], settings.device,
        settings.seconds_per_case, minimum=3, maximum=101)
    row["repeats"] = repeats
    medians = interleaved_medians(variants, repeats, settings.device, warmup=False)
    for name, seconds in medians.items():
        row[f"{name}_s"] = seconds
    row["igfast_over_floor"] = medians["igfast"] / medians["floor"]
    row["plain_over_floor"] = medians["plain"] / medians["floor"]
    row["igfast_over_plain"] = medians["igfast"] / medians["plain"]
    if settings.captum:
        row["captum_over_floor"] = medians["captum"] / medians["floor"]
        row["speedup_over_captum"] = medians["captum"] / medians["igfast"]
    return row


class Progress:
    """One line on a terminal, redrawn; a line per step elsewhere (CI logs)."""

    def __init__(self, total: int, stream=None) -> None:
        self.total, self.done, self.stream = total, 0, stream or sys.stderr
        self.started = time.perf_counter()
        self.tty = hasattr(stream, "isatty") and stream.isatty()

    def step(self, label: str) -> None:
        """Show that step ``done + 1`` of ``total`` starts."""
        elapsed = time.perf_counter() - self.started
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        text = f"[{bar}] {self.done}/{self.total} {elapsed:5.0f} s  {label}"
        if self.tty:
            self.stream.write("\r" + text.ljust(100)[:100])
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self.done += 1

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r" + " " * 100 + "\r")
            self.stream.flush()


def run_bench(settings: Settings, progress_stream=None) -> Dict[str, Any]:
    torch.set_num_threads(settings.threads)
    grid = [(w, n, m) for w in settings.workloads for n in settings.n_steps for m in settings.methods]
    progress = Progress(len(grid), progress_stream)
    rows, cases = [], {}
    for workload, n_steps, method in grid:
        progress.step(f"{workload} n_steps={n_steps} {method}")
        if workload not in cases:
            cases[workload] = build_case(workload, settings.device)
        rows.append(bench_one(cases[workload], n_steps, method, settings))
    progress.close()
    state = info()
    return {
        "igfast": __version__, "torch": torch.__version__, "path": state["path"],
        "device": settings.device, "threads": settings.threads,
        "workload_names": {key: case.name for key, case in cases.items()},
        "notes": list(settings.notes), "rows": rows,
    }


def format_table(report: Dict[str, Any]) -> str:
    def cell(row, key, fmt, unit=""):
        value = row.get(key)
        return format(value, fmt) + unit if value is not None else "-"

    def size(value):
        return format_size(value) if value is not None else "-"

    header = ("| workload | n_steps | method | floor s | plain IG s | igfast s | Captum s | igfast / floor | "
              "plain IG / floor | Captum / floor | speedup | igfast peak | Captum peak | igfast max abs delta | "
              "Captum max abs delta |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in report["rows"]:
        lines.append(
            f"| {row['workload']} | {row['n_steps']} | {row['method']} | {cell(row, 'floor_s', '.4f')} | "
            f"{cell(row, 'plain_s', '.4f')} | {cell(row, 'igfast_s', '.4f')} | {cell(row, 'captum_s', '.4f')} | "
            f"{cell(row, 'igfast_over_floor', '.2f')} | {cell(row, 'plain_over_floor', '.2f')} | "
            f"{cell(row, 'captum_over_floor', '.2f')} | "
            f"{cell(row, 'speedup_over_captum', '.2f', 'x')} | {size(row.get('igfast_peak_bytes'))} | "
            f"{size(row.get('captum_peak_bytes'))} | {cell(row, 'igfast_delta_max', '.1e')} | "
            f"{cell(row, 'captum_delta_max', '.1e')} |"
        )
    return "\n".join(lines)


def write_json(report: Dict[str, Any], path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)


def write_plot(report: Dict[str, Any], path: str) -> None:
    """Median time against n_steps, one panel per workload: igfast, Captum, floor."""
    from ..viz import _pyplot

    plt = _pyplot()
    workloads = list(dict.fromkeys(row["workload"] for row in report["rows"]))
    methods = list(dict.fromkeys(row["method"] for row in report["rows"]))
    figure, axes = plt.subplots(1, len(workloads), figsize=(4.2 * len(workloads), 3.4), squeeze=False)
    styles = {"igfast": ("tab:red", "-"), "captum": ("tab:blue", "--"), "plain": ("tab:green", "-."),
              "floor": ("0.4", ":")}
    markers = ["o", "s", "^", "D", "v"]
    for ax, workload in zip(axes[0], workloads):
        for method_index, method in enumerate(methods):
            rows = sorted((r for r in report["rows"] if r["workload"] == workload and r["method"] == method),
                          key=lambda r: r["n_steps"])
            for variant, (colour, line) in styles.items():
                if rows and f"{variant}_s" in rows[0]:
                    label = f"{variant} ({method})" if len(methods) > 1 else variant
                    ax.plot([r["n_steps"] for r in rows], [r[f"{variant}_s"] for r in rows],
                            color=colour, linestyle=line, marker=markers[method_index % len(markers)],
                            label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        steps = sorted({r["n_steps"] for r in report["rows"] if r["workload"] == workload})
        ax.set_xticks(steps, [str(n) for n in steps])
        ax.set_xticks([], minor=True)  # log-scale minor labels collide with the steps
        ax.set_xlabel("n_steps")
        ax.set_ylabel("median time (s)")
        ax.set_title(report["workload_names"].get(workload, workload), fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    figure.suptitle(f"igfast {report['igfast']} vs Captum vs floor ({report['device']}, "
                    f"{report['threads']} thread(s))", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
