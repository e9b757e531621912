"""The GPU acceptance run of igfast in one command (issue 16), and its CPU smoke run.

    python benchmarks/gpu_check.py --out DIR                       # a GPU machine: at most 9 minutes
    python benchmarks/gpu_check.py --device cpu --quick --out DIR  # CI's smoke run: seconds

The run is a list of sections (SECTIONS below). Each runs in a fresh Python process
under its own time limit, cut to what is left of the total (--budget-s, 520 s), and
writes what it measured as it goes; a section that fails or runs out of time is
reported and the next one runs. Then DIR gets the report of the run: gpu-<card>.md
(every goal of issue 16 marked met or missed with the measured figure), the same as
JSON in gpu-<card>.json, and the output of every section in gpu-<card>.log.

  build   compile igfast._C with the CUDA kernels (FORCE_CUDA=1, all cores, this GPU's
          architecture) and check that igfast.info() reports them in use, and (in a
          child process) that a bad argument raises RuntimeError; if it ends the process
          instead, log the toolchain and rebuild other ways (rebuilds_to_try). On the CPU
          it only checks the build that is there (--build rebuilds it).
  tests   the cuda-marked tests and the suites that take the `device` fixture (parity
          of IntegratedGradients, LayerIntegratedGradients, NoiseTunnel, many targets,
          n_steps="auto", budgets, data-set runs with Captum) on the device:
          pytest --device D -m "(cuda or on_device) and not slow" (a few with --quick).
  ops     interpolate_path, interpolate_path_into and accumulate_steps in float32,
          float64, float16 and bfloat16 at 1e5 to 1e8 path elements: GB/s, and the
          fraction of a device-to-device copy's GB/s measured in the same run.
  e2e     igfast against Captum against the floor (one forward and one input-gradient
          backward over the same rows), n_steps 50, interleaved medians timed with CUDA
          events after a warm-up: the MLP and CNN of `igfast bench`, ResNet-50
          (torchvision, random weights, batch 16, 3x224x224), BERT-base
          LayerIntegratedGradients on the embeddings (transformers BertConfig(), random
          weights, batch 16, sequence 128), then both again in bfloat16 (attributions
          in float32). --quick: tiny stand-ins of the same architectures. On the MLP
          and CNN, a cProfile of igfast's calls (host self time per function).
  memory  peaks of igfast with memory_budget 1 GB and 8 GB against the budget; a call
          Captum cannot fit on the card (ResNet-50, batch 64, n_steps 300, no
          internal_batch_size) that igfast finishes under its automatic budget; an
          out-of-memory forced with torch.cuda.set_per_process_memory_fraction that the
          back-off survives with the unchunked result (and what the same chunks give
          without an out-of-memory error). On the CPU the out-of-memory
          errors are simulated by a model that refuses large batches.
  llm     the Llama case of benchmarks/bench_llm.py (issue 17), skipped cleanly while
          that file is absent: bench_llm.llama_case measures igfast's and Captum's
          LLMGradientAttribution on a Llama config of about 1.1B parameters (bfloat16,
          prompt 256, target 64; a 2-layer one with --quick or on CPU).

Captum is a benchmark dependency only: when it is not importable (GPU machines have no
internet), the run installs it from a wheel in --wheels (default: .whl in the
repository root, carried with it); benchmarks/GPU.md says how to fetch that wheel.
Exit code: 0 when every section ran (goals may still be missed: see the report),
1 when a section failed or ran out of time.
"""

import argparse
import glob
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.abspath(__file__)
TOTAL_BUDGET_S = 520.0
# Seconds a child process needs to start (interpreter, torch, the device) and to
# write its results; no section starts with less than this left.
START_COST_S = 15.0
SPEEDUP_GOALS = {"mlp": 2.0, "cnn": 2.0, "resnet50": 1.1, "bert": 1.1, "resnet50-bf16": 1.1, "bert-bf16": 1.1}
COPY_FRACTION_GOAL = 0.85
COPY_GOAL_FROM_ELEMENTS = 10**7
# The goals of issue 16 (point 3): key -> (the section that measures it, the goal).
GOALS = {
    "kernels": ("build", "the CUDA kernels are built and igfast.info() reports them in use (on a CPU: its kernels)"),
    "errors": ("build", "a bad argument to an op on the device raises RuntimeError (the process survives)"),
    "tests": ("tests", "every CUDA test passes; the GPU parity suites agree with Captum within the CPU tolerances"),
    "ops": ("ops", f"the kernels move >= {COPY_FRACTION_GOAL:.0%} of the bytes per second of a device-to-device "
                   "copy at 1e7 elements and above"),
    **{f"speedup:{key}": ("e2e", f"igfast >= {goal}x faster than Captum on {key} at n_steps 50")
       for key, goal in SPEEDUP_GOALS.items()},
    "budgets": ("memory", "every budget met: the call's peak (max_memory_allocated above its start) <= memory_budget "
                          "of 1 GB and 8 GB"),
    "captum-cannot-fit": ("memory", "a call Captum cannot fit on the card completes in igfast under its automatic "
                                    "budget"),
    "forced-oom": ("memory", "an out-of-memory error forced with set_per_process_memory_fraction is survived with "
                             "the unchunked result"),
}


# ------------------------------------------------------------------ the sections ---

@dataclass
class Section:
    name: str
    limit_s: float  # the most it may take on a GPU (the total budget may cut it)
    quick_limit_s: float  # the most with --quick
    run: Callable[["Context"], None]  # runs in the child process


class SectionSkipped(Exception):
    """The section cannot run here (a missing file or package); not a failure."""


class Context:
    """What a section's process knows and writes: its results, saved after every step
    so that a section stopped at its time limit still reports what it finished."""

    def __init__(self, args) -> None:
        self.device = args.device
        self.quick = args.quick
        self.build = args.build
        self.deadline = args.deadline
        self.path = args.result
        self.result: Dict[str, Any] = {"rows": [], "goals": [], "notes": []}

    def time_left(self) -> float:
        return self.deadline - time.time()

    def note(self, text: str) -> None:
        print(f"  note: {text}", flush=True)
        self.result["notes"].append(text)
        self.save()

    def goal(self, key: str, met: Optional[bool], measured: str) -> None:
        """A goal of GOALS: met (True), missed (False) or not measured (None)."""
        status = {True: "met", False: "missed", None: "not measured"}[met]
        print(f"  goal {key}: {status}: {measured}", flush=True)
        self.result["goals"].append({"key": key, "goal": GOALS[key][1], "status": status, "measured": measured})
        self.save()

    def attempt(self, what: str, case: Callable[[], None]) -> bool:
        """Run one case of the section. An error is recorded (the section then ends as
        failed) and the next case runs; False when it failed."""
        try:
            case()
            return True
        except SectionSkipped:
            raise
        except Exception as error:  # noqa: BLE001 (any error of a case is reported, none stops the rest)
            traceback.print_exc()
            self.result.setdefault("case_errors", []).append(f"{what}: {type(error).__name__}: {error}"[:500])
            self.save()
            return False

    def row(self, row: Dict[str, Any]) -> None:
        print("  " + json.dumps(row, default=str), flush=True)
        self.result["rows"].append(row)
        self.save()

    def save(self) -> None:
        temporary = self.path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(self.result, handle, indent=1, default=str)
        os.replace(temporary, self.path)


def stop_session(session: int, spare: int = -1) -> None:
    """Kill every process (but ``spare``) of the session that ``start_new_session`` gave a
    section's process: what it started too, even in process groups of their own (ninja
    puts each compiler in one)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != spare:
            try:
                if os.getsid(int(entry)) == session:
                    os.kill(int(entry), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def run_process(command: List[str], timeout: float, env: Optional[dict] = None, cwd: str = ROOT,
                interrupt_grace_s: float = 0.0) -> tuple:
    """(exit code or None when stopped at the timeout, the output's last 6000 characters);
    the output also goes to this process's stdout (the log). At the timeout every process
    it started is stopped (pytest-xdist workers, ninja's compilers). With interrupt_grace_s,
    the command first gets SIGINT and that long to stop by itself: pytest then still writes
    its report of the tests it ran (the timeout includes the grace)."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    lines: List[str] = []
    deadline = time.time() + timeout
    import threading

    def pump():
        for line in process.stdout:
            sys.stdout.write(line)
            lines.append(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        try:
            process.wait(timeout=max(1.0, deadline - interrupt_grace_s - time.time()))
        except subprocess.TimeoutExpired:
            if not interrupt_grace_s:
                raise
            process.send_signal(signal.SIGINT)
            process.wait(timeout=interrupt_grace_s)
            raise  # stopped in time, but by the timeout: reported as such
        code = process.returncode
    except subprocess.TimeoutExpired:
        if os.getsid(0) == os.getpid():  # a section's process, which leads a session of its own
            stop_session(os.getpid(), spare=os.getpid())
        else:
            process.kill()
        process.wait()
        code = None
    reader.join(timeout=5)
    sys.stdout.flush()
    return code, "".join(lines)[-6000:]


# build --------------------------------------------------------------------------

# Run in a fresh process: the bad call of test_kernels.py's baselines_shape case. On
# the first H200 run every such call on a CUDA tensor ended the process (SIGSEGV inside
# TORCH_CHECK) instead of raising, so the process must be one that may die.
ERROR_CHECK = """
import sys, torch, igfast._ext, igfast.ops  # loads igfast._C and its ops
if not igfast._ext.extension_loaded():
    print("igfast did not load the build:", igfast._ext.why_not_loaded())
    sys.exit(3)
try:
    torch.ops.igfast.interpolate_path(torch.rand(2, 3, device=DEVICE), torch.rand(2, 4, device=DEVICE),
                                      torch.rand(4, device=DEVICE), 0, 4)
    print("no error raised")
except RuntimeError as error:
    print("raised RuntimeError:", str(error).splitlines()[0][:120])
"""


def errors_reach_python(device: str, timeout: float) -> tuple:
    """(whether the bad call raised, what happened) in a child process."""
    code, tail = run_process([sys.executable, "-X", "faulthandler", "-c", ERROR_CHECK.replace("DEVICE", repr(device))],
                             max(5.0, timeout))
    last = tail.strip().splitlines()[-1] if tail.strip() else ""
    if code is None:
        return False, "the check ran out of time"
    if code < 0:
        return False, f"the process was killed by {signal.Signals(-code).name}"
    return code == 0 and last.startswith("raised RuntimeError"), last or f"exit {code}"


def toolchain_facts(env: dict) -> Dict[str, str]:
    """The compilers and runtime libraries of the build: what decides how C++ errors unwind."""
    facts: Dict[str, str] = {}
    for name in ("CC", "CXX"):
        compiler = env.get(name) or shutil.which({"CC": "cc", "CXX": "c++"}[name]) or ""
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout if compiler else ""
        facts[name] = f"{compiler}: {version.splitlines()[0] if version else 'not found'}"
    library = next(iter(glob.glob(os.path.join(ROOT, "igfast", "_C*.so"))), None)
    if library:
        symbols = subprocess.run(["nm", "-D", "--defined-only", library], capture_output=True, text=True).stdout
        facts["unwinder_symbols_defined_in_igfast._C"] = str(symbols.count("_Unwind_"))
        linked = subprocess.run(["ldd", library], capture_output=True, text=True).stdout
        facts["ldd"] = "; ".join(line.strip() for line in linked.splitlines()
                                 if any(k in line for k in ("libgcc_s", "libstdc++", "libc10.so", "libcudart")))
        # Headers newer than the libstdc++ the process loads can break inline library code.
        table = subprocess.run(["objdump", "-T", library], capture_output=True, text=True).stdout
        facts["newest_GLIBCXX_needed"] = _newest_glibcxx(table)
        loaded = re.search(r"libstdc\+\+\.so\.6 => (\S+)", linked)
        if loaded:
            with open(loaded.group(1), "rb") as handle:
                facts["newest_GLIBCXX_in_" + loaded.group(1)] = _newest_glibcxx(handle.read().decode("latin-1"))
    return facts


def _newest_glibcxx(text: str) -> str:
    versions = {tuple(int(p) for p in v.split(".")) for v in re.findall(r"GLIBCXX_(\d+(?:\.\d+)+)", text)}
    return "GLIBCXX_" + ".".join(map(str, max(versions))) if versions else "none"


def build_extension(ctx: Context, env: dict, force: bool = False) -> None:
    command = [sys.executable, "setup.py", "build_ext", "--inplace"] + (["--force"] if force else [])
    settings = " ".join(f"{k}={env[k]}" for k in ("FORCE_CUDA", "MAX_JOBS", "TORCH_CUDA_ARCH_LIST", "CC", "CXX",
                                                   "LDFLAGS") if k in env)
    ctx.result.setdefault("build_commands", []).append(f"{settings} {os.path.basename(sys.executable)} "
                                                        + " ".join(command[1:]))
    started = time.time()
    code, tail = run_process(command, ctx.time_left() - 10, env)
    ctx.result["build_seconds"] = round(ctx.result.get("build_seconds", 0) + time.time() - started, 1)
    ctx.save()
    if code != 0:
        raise RuntimeError(("the build ran out of time" if code is None else f"the build failed (exit {code})")
                           + ":\n" + tail[-3000:])


def rebuilds_to_try(env: dict) -> List[tuple]:
    """Other ways to build when errors do not reach Python: the system compilers when the
    build used others. On the H200 image the default g++ (/opt/gcc, a wrapper) linked
    libstdc++ statically, igfast then refuses to load the build (igfast/_elf.py), and
    the system g++ built one that raises; linking libgcc's unwinder shared did not help."""
    system_cc, system_cxx = "/usr/bin/gcc", "/usr/bin/g++"
    used = os.path.realpath(env.get("CXX") or shutil.which("c++") or "")
    if os.path.exists(system_cxx) and os.path.realpath(system_cxx) != used:
        return [("the system compilers", dict(env, CC=system_cc, CXX=system_cxx))]
    return []


def section_build(ctx: Context) -> None:
    import torch

    cuda = ctx.device == "cuda"
    if cuda or ctx.build:
        env = dict(os.environ, MAX_JOBS=str(os.cpu_count() or 1))
        if cuda:
            env["FORCE_CUDA"] = "1"
            env["TORCH_CUDA_ARCH_LIST"] = "{}.{}".format(*torch.cuda.get_device_capability())
        else:
            env.pop("FORCE_CUDA", None)
        try:
            build_extension(ctx, env)
        except RuntimeError as error:
            ctx.goal("kernels", False, str(error).splitlines()[0])
            raise
        ctx.result["build_command"] = ctx.result["build_commands"][0]
        raised, what = errors_reach_python(ctx.device, min(60.0, ctx.time_left() - 10))
        ctx.result["toolchain"] = toolchain_facts(env)
        ctx.note(f"error check of the first build: {what}; toolchain: {json.dumps(ctx.result['toolchain'])}")
        for name, other in ([] if raised else rebuilds_to_try(env)):
            try:
                build_extension(ctx, other, force=True)
            except RuntimeError as error:  # this way does not build here: the last good build stays
                ctx.note(f"rebuild with {name}: {str(error)[:300]}")
                continue
            raised, what = errors_reach_python(ctx.device, min(60.0, ctx.time_left() - 10))
            ctx.note(f"error check after a rebuild with {name}: {what}")
            if raised:
                what += f" (after a rebuild with {name}: {ctx.result['build_commands'][-1]})"
                break
    else:
        ctx.note("no rebuild on the CPU (--build rebuilds): checking the extension that is there")
        raised, what = errors_reach_python(ctx.device, min(60.0, ctx.time_left() - 10))
    ctx.goal("errors", raised, what)
    import igfast

    state = igfast.info()
    ctx.result["info"] = state
    path_key, reason_key = ("cuda_path", "cuda_reason") if cuda else ("path", "reason")
    in_use = bool(state["kernels"].get(ctx.device)) and state.get(path_key) == "kernels"
    ctx.goal("kernels", in_use, f"{path_key} = {state.get(path_key)!r} ({state.get(reason_key)})")


# tests --------------------------------------------------------------------------

# What --quick runs of the suites: one test of each kind, to check the plumbing.
QUICK_TESTS = ("(test_parity_default_steps_larger_batch and gausslegendre) or test_opcheck or "
               "(test_budget_is_met and 120000) or (test_interpolate_path_into_writes_every_element and float32)")


def _junit_counts(path: str) -> Dict[str, Any]:
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed, skipped = [], {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        skip = case.find("skipped")
        if skip is not None:
            reason = (skip.get("message") or "").strip()
            skipped[reason] = skipped.get(reason, 0) + 1
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = failed[:50]
    counts["skip_reasons"] = skipped
    return counts


def section_tests(ctx: Context) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        junit = os.path.join(scratch, "junit.xml")
        command = [sys.executable, "-m", "pytest", "--device", ctx.device, "-m", "(cuda or on_device) and not slow",
                   "-q", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={junit}", "tests"]
        if ctx.quick:
            command += ["-k", QUICK_TESTS]
        elif ctx.device == "cuda" and importlib.util.find_spec("xdist") is not None:
            command += ["-n", str(min(8, os.cpu_count() or 1))]  # the GPU is shared by the workers
        ctx.result["command"] = " ".join(command[1:]).replace(junit, "JUNIT")
        started = time.time()
        code, tail = run_process(command, ctx.time_left() - 5, interrupt_grace_s=20)
        ctx.result["seconds"] = round(time.time() - started, 1)
        comparisons = re.findall(r"igfast: (\d+) attribute\(\) calls compared with Captum", tail)
        if comparisons:
            ctx.result["captum_comparisons"] = int(comparisons[-1])
        if not os.path.exists(junit):
            ctx.goal("tests", False,
                     "pytest " + ("ran out of time" if code is None else f"exited {code} without a report"))
            raise RuntimeError(("pytest ran out of time" if code is None else "pytest gave no report") + ":\n"
                               + tail[-3000:])
        counts = _junit_counts(junit)
    ctx.result.update(counts)
    measured = (f"{counts['passed']} passed, {counts['failures']} failed, {counts['errors']} errors, "
                f"{counts['skipped']} skipped")
    if code is None:  # interrupted at the limit: the report holds the tests that finished
        measured = "ran out of time after " + measured
    if counts["failed_tests"]:
        measured += "; failed: " + ", ".join(counts["failed_tests"][:10])
    if counts["skipped"]:
        measured += "; skipped: " + "; ".join(f"{n} x {r}" for r, n in counts["skip_reasons"].items())
    met = code is not None and counts["passed"] > 0 and not (counts["failures"] or counts["errors"]
                                                             or counts["skipped"])
    ctx.goal("tests", met, measured)


# ops ----------------------------------------------------------------------------

OPS_STEPS = 50
OPS_BATCH = 8


def _median_seconds(run: Callable[[], object], device: str, repeats: int) -> float:
    """Median of ``repeats`` calls after two untimed ones; on a GPU every call between
    two CUDA events, launched back to back."""
    import statistics

    import torch

    for _ in range(2):
        run()
    if device == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        torch.cuda.synchronize()
        for start, end in events:
            start.record()
            run()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) / 1e3 for start, end in events)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# Each timed call works on the next of this many sets of buffers, so that a size whose
# buffers fit in the GPU's L2 cache (50 MB on an H200) is still measured from memory.
OPS_BUFFER_SETS = 4


def _ops_rows(device: str, elements: int, dtype, repeats: int) -> List[Dict[str, Any]]:
    """The three ops and a copy at one size and dtype, checked against the reference
    first; one row per op."""
    import itertools

    import torch

    from igfast import reference
    from igfast.dtypes import dtype_policy

    size = torch.empty((), dtype=dtype).element_size()
    accumulate = dtype_policy(dtype).accumulate
    features = elements // (OPS_STEPS * OPS_BATCH)
    n = OPS_STEPS * OPS_BATCH * features
    generator = torch.Generator().manual_seed(elements)

    def draw(*shape, dtype=dtype):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    sets = [{"x": draw(OPS_BATCH, features), "b": draw(1, features), "grads": draw(OPS_STEPS * OPS_BATCH, features),
             "path": torch.full((OPS_STEPS * OPS_BATCH, features), float("nan"), dtype=dtype, device=device),
             "accumulator": torch.zeros(OPS_BATCH, features, dtype=accumulate, device=device),
             "copy": torch.empty(OPS_STEPS * OPS_BATCH, features, dtype=dtype, device=device)}
            for _ in range(OPS_BUFFER_SETS)]
    alphas = torch.rand(OPS_STEPS, generator=generator, dtype=torch.float64).to(device)
    weights = torch.rand(OPS_STEPS, generator=generator, dtype=torch.float64).to(device)
    # Correct first: each kernel against the pure-PyTorch reference.
    first = sets[0]
    torch.ops.igfast.interpolate_path_into(first["path"], first["x"], first["b"], alphas, 0, OPS_STEPS)
    expected_path = reference.interpolate_path(first["x"], first["b"], alphas, 0, OPS_STEPS)
    summed, expected_sum = torch.zeros_like(first["accumulator"]), torch.zeros_like(first["accumulator"])
    torch.ops.igfast.accumulate_steps(summed, first["grads"], weights)
    reference.accumulate_steps(expected_sum, first["grads"], weights)
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    torch.testing.assert_close(first["path"].double(), expected_path.double(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(summed.double(), expected_sum.double(), rtol=tolerance, atol=10 * tolerance)
    del expected_path, summed, expected_sum
    outputs: List[Any] = [None] * OPS_BUFFER_SETS  # interpolate_path's results stay alive for a round

    def rotating(call):
        turn = itertools.count()

        def run():
            index = next(turn) % OPS_BUFFER_SETS
            outputs[index] = call(index, sets[index])
        return run

    interpolate_bytes = size * (n + OPS_BATCH * features + features)
    variants = {
        "interpolate_path": (lambda i, t: torch.ops.igfast.interpolate_path(t["x"], t["b"], alphas, 0, OPS_STEPS),
                             interpolate_bytes),
        "interpolate_path_into": (lambda i, t: torch.ops.igfast.interpolate_path_into(
            t["path"], t["x"], t["b"], alphas, 0, OPS_STEPS), interpolate_bytes),
        "accumulate_steps": (lambda i, t: torch.ops.igfast.accumulate_steps(t["accumulator"], t["grads"], weights),
                             size * n + 2 * torch.empty((), dtype=accumulate).element_size() * OPS_BATCH * features),
    }
    copy_seconds = _median_seconds(rotating(lambda i, t: t["copy"].copy_(t["grads"])), device, repeats)
    copy_gbps = 2 * size * n / copy_seconds / 1e9
    rows = []
    for op, (call, nbytes) in variants.items():
        seconds = _median_seconds(rotating(call), device, repeats)
        gbps = nbytes / seconds / 1e9
        rows.append({"op": op, "dtype": str(dtype).replace("torch.", ""), "elements": n,
                     "ms": round(1e3 * seconds, 4), "GBps": round(gbps, 1), "copy_GBps": round(copy_gbps, 1),
                     "fraction_of_copy": round(gbps / copy_gbps, 3)})
    return rows


def section_ops(ctx: Context) -> None:
    import torch

    from igfast import ops

    torch.set_num_threads(1 if ctx.device == "cpu" else torch.get_num_threads())
    if not ops.kernels_available(ctx.device):
        raise RuntimeError(f"the igfast kernels do not run on {ctx.device}: {ops.why_not_kernels(ctx.device)}")
    sizes = [10**5] if ctx.quick else [10**5, 10**6, 10**7, 10**8]
    ctx.result["definition"] = (
        f"path elements n = {OPS_STEPS} steps x {OPS_BATCH} examples x F features; bytes each op must move: "
        "interpolate (x and x' read once, n written), accumulate (n read, the accumulator read and written "
        "once); the copy moves 2 n elements (read + write) of the same dtype; fraction = op GB/s / copy GB/s; "
        f"medians, each call on the next of {OPS_BUFFER_SETS} sets of buffers (so no size is timed from the cache)")
    for elements in sizes:
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            if ctx.time_left() < 5:
                ctx.note(f"out of time before {dtype} at {elements:.0e} elements")
                return
            repeats = 5 if ctx.quick else (40 if elements <= 10**6 else (20 if elements <= 10**7 else 8))
            for row in _ops_rows(ctx.device, elements, dtype, repeats):
                ctx.row(row)
            if ctx.device == "cuda":
                torch.cuda.empty_cache()
    large = [r for r in ctx.result["rows"] if r["elements"] >= COPY_GOAL_FROM_ELEMENTS]
    if not large:
        ctx.goal("ops", None, "no size of 1e7 elements or more was run")
        return
    worst = min(large, key=lambda r: r["fraction_of_copy"])
    misses = [f"{r['op']} {r['dtype']} {r['elements']:.0e}: {r['fraction_of_copy']:.2f}"
              for r in large if r["fraction_of_copy"] < COPY_FRACTION_GOAL]
    ctx.goal("ops", not misses,
             f"lowest {worst['fraction_of_copy']:.2f} ({worst['op']} {worst['dtype']} {worst['elements']:.0e} "
             f"elements, {worst['GBps']} of {worst['copy_GBps']} GB/s)"
             + (f"; below: {', '.join(misses)}" if misses else ""))


# e2e ----------------------------------------------------------------------------

def _resnet(quick: bool):
    """ResNet-50 (random weights); --quick: its bottleneck blocks, one per stage."""
    from torchvision.models import resnet50
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10) if quick else resnet50(weights=None)


def _bert_config(quick: bool):
    from transformers import BertConfig

    if quick:
        return BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                          max_position_embeddings=64)
    return BertConfig()


def _bert_logits(config):
    """BertForSequenceClassification as a model that returns the logits tensor."""
    import torch
    from transformers import BertForSequenceClassification

    class BertLogits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = BertForSequenceClassification(config)

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    return BertLogits()


def resnet_case(device: str, quick: bool, dtype_name: str = "float32"):
    """IntegratedGradients on ResNet-50 images (batch 16, 3x224x224; --quick: 2, 3x32x32)."""
    import torch

    from igfast.bench.workloads import BenchCase, input_path_floor, input_path_plain_ig

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    model = _resnet(quick).to(device, dtype).eval()
    batch, side = (2, 32) if quick else (16, 224)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, side, side, generator=generator).to(device, dtype)
    baseline = torch.zeros_like(x)
    with torch.no_grad():
        target = model(x).argmax(1)

    def run(library, n_steps, method, with_delta=True):
        return library.IntegratedGradients(model).attribute(
            x, baseline, target=target, n_steps=n_steps, method=method, return_convergence_delta=with_delta)

    label = "ResNet-50" if not quick else "ResNet (bottleneck blocks, one per stage; stand-in)"
    case = BenchCase("resnet50" + ("" if dtype_name == "float32" else "-bf16"),
                     f"{label}, batch {batch}, 3x{side}x{side}, {dtype_name}", run,
                     lambda n, m: input_path_floor(model, x, baseline, target, n, m),
                     lambda n, m: input_path_plain_ig(model, x, baseline, target, n, m))
    return case, batch, "images"


def bert_case(device: str, quick: bool, dtype_name: str = "float32"):
    """LayerIntegratedGradients on BERT-base's embeddings (batch 16, sequence 128)."""
    import torch

    from igfast.bench.workloads import BenchCase, layer_path_floor, layer_path_plain_ig

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    config = _bert_config(quick)
    model = _bert_logits(config).to(device, dtype).eval()
    batch, length = (2, 16) if quick else (16, 128)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, config.vocab_size, (batch, length), generator=generator)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    baselines = torch.zeros_like(ids)  # [PAD] between the same [CLS] and [SEP]
    baselines[:, 0], baselines[:, -1] = 101, 102
    ids, baselines = ids.to(device), baselines.to(device)
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    layer = model.model.bert.embeddings
    with torch.no_grad():
        target = model(ids, mask).argmax(1)

    def run(library, n_steps, method, with_delta=True):
        return library.LayerIntegratedGradients(model, layer).attribute(
            ids, baselines=baselines, target=target, additional_forward_args=(mask,), n_steps=n_steps,
            method=method, return_convergence_delta=with_delta)

    label = "BERT-base" if not quick else "BERT (2 layers, width 64; stand-in)"
    case = BenchCase("bert" + ("" if dtype_name == "float32" else "-bf16"),
                     f"{label} LayerIG on the embeddings, batch {batch}, sequence {length}, {dtype_name}",
                     run, lambda n, m: layer_path_floor(model, layer, ids, baselines, (mask,), n, m),
                     lambda n, m: layer_path_plain_ig(model, layer, ids, baselines, (mask,), n, m))
    return case, batch, "sequences"


def bench_case(key: str, device: str):
    from igfast.bench.workloads import WORKLOADS, input_case

    return input_case(key, device), WORKLOADS[key].input_shape[0], "examples"


E2E_CASES = [
    ("mlp", lambda device, quick: bench_case("mlp", device)),
    ("cnn", lambda device, quick: bench_case("cnn", device)),
    ("resnet50", lambda device, quick: resnet_case(device, quick)),
    ("bert", lambda device, quick: bert_case(device, quick)),
    ("resnet50-bf16", lambda device, quick: resnet_case(device, quick, "bfloat16")),
    ("bert-bf16", lambda device, quick: bert_case(device, quick, "bfloat16")),
]


def _e2e_case(ctx: Context, key: str, build, n_steps: int, captum: bool) -> None:
    import torch

    from igfast.bench.report import Settings, bench_one
    from igfast.memory import format_size

    try:
        case, batch, unit = build(ctx.device, ctx.quick)
    except ImportError as error:
        ctx.note(f"{key} skipped: {error}")
        if key in SPEEDUP_GOALS:
            ctx.goal(f"speedup:{key}", None, f"skipped: {error}")
        return
    repeats = 3 if ctx.quick else (15 if key in ("mlp", "cnn") else 5)
    row = bench_one(case, n_steps, "gausslegendre",
                    Settings([key], [n_steps], ["gausslegendre"], ctx.device, repeats, threads=1, captum=captum))
    row["name"], row["unit"] = case.name, unit
    for variant in ("floor", "igfast", "captum"):
        if f"{variant}_s" in row:
            row[f"{variant}_per_s"] = batch / row[f"{variant}_s"]
        if row.get(f"{variant}_peak_bytes") is not None:
            row[f"{variant}_peak"] = format_size(row[f"{variant}_peak_bytes"])
    ctx.row(row)
    if key in SPEEDUP_GOALS:
        if "speedup_over_captum" not in row:
            ctx.goal(f"speedup:{key}", None, "Captum not available")
        else:
            ctx.goal(f"speedup:{key}", row["speedup_over_captum"] >= SPEEDUP_GOALS[key],
                     f"{row['speedup_over_captum']:.2f}x at n_steps {n_steps} (igfast {row['igfast_s'] * 1e3:.1f} ms, "
                     f"Captum {row['captum_s'] * 1e3:.1f} ms, floor {row['floor_s'] * 1e3:.1f} ms; "
                     f"{row['igfast_per_s']:.1f} {unit}/s)")
    if key in OVERHEAD_PROFILED:
        ctx.attempt(f"{key} profile", lambda: _overhead_profile(ctx, key, case, n_steps))
    del case
    if ctx.device == "cuda":
        torch.cuda.empty_cache()


# The small models, where igfast's own per-call work shows: on the first H200 run igfast
# took 2.47x (MLP) and 1.63x (CNN) the time of a plain PyTorch IG loop, against 1.00-1.02x
# on ResNet-50 and BERT. A host-side profile of those calls says where the time goes.
OVERHEAD_PROFILED = ("mlp", "cnn")
PROFILE_CALLS = 20


def _overhead_profile(ctx: Context, key: str, case, n_steps: int) -> None:
    """The functions igfast's calls spend their host time in (cProfile, self time), and
    the time per call with and without the profiler."""
    import cProfile
    import pstats

    import torch

    import igfast

    def calls(count: int) -> float:
        if ctx.device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(count):
            case.run(igfast, n_steps, "gausslegendre", False)
        if ctx.device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - started) / count

    calls(3)
    plain_seconds = calls(PROFILE_CALLS)
    profiler = cProfile.Profile()
    profiler.enable()
    profiled_seconds = calls(PROFILE_CALLS)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, primitive, self s, cumulative s, callers)
    top = sorted(stats.items(), key=lambda item: -item[1][2])[:15]
    rows = [{"function": f"{os.path.basename(where[0])}:{where[1]}({where[2]})", "calls_per_attribute":
             round(value[0] / PROFILE_CALLS, 1), "self_us_per_attribute": round(value[2] / PROFILE_CALLS * 1e6, 1)}
            for where, value in top]
    ctx.result.setdefault("profiles", {})[key] = {"seconds_per_call": plain_seconds,
                                                  "seconds_per_call_profiled": profiled_seconds, "top": rows}
    ctx.save()
    ctx.note(f"{key}: {plain_seconds * 1e3:.2f} ms a call ({profiled_seconds * 1e3:.2f} profiled); host self time: "
             + "; ".join(f"{r['function']} {r['self_us_per_attribute']:.0f} us x{r['calls_per_attribute']:g}"
                         for r in rows[:8]))


def section_e2e(ctx: Context) -> None:
    import torch

    torch.set_num_threads(1 if ctx.device == "cpu" else torch.get_num_threads())
    captum = importlib.util.find_spec("captum") is not None
    if not captum:
        ctx.note("captum is not importable: igfast and the floor only")
    n_steps = 8 if ctx.quick else 50
    ctx.result["settings"] = {"n_steps": n_steps, "method": "gausslegendre",
                              "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32,
                                       "cudnn": torch.backends.cudnn.allow_tf32}}
    for key, build in E2E_CASES:
        if ctx.time_left() < 20:
            ctx.note(f"out of time before {key}")
            continue
        ctx.attempt(key, lambda: _e2e_case(ctx, key, build, n_steps, captum))
        if key in SPEEDUP_GOALS and not any(g["key"] == f"speedup:{key}" for g in ctx.result["goals"]):
            ctx.goal(f"speedup:{key}", False, "the case failed: " + ctx.result["case_errors"][-1])


# memory -------------------------------------------------------------------------

def _refusing_large_batches(model, max_rows: int):
    """``model`` failing like a full GPU on calls of more than ``max_rows`` rows: the
    CPU stand-in for an out-of-memory error."""
    import torch

    def forward(x):
        if x.shape[0] > max_rows:
            raise torch.OutOfMemoryError(f"out of memory (simulated: {x.shape[0]} rows > {max_rows})")
        return model(x)

    return forward


def _relative_difference(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


class _MemoryCases:
    """The model and images of the memory section: ResNet-50 on a GPU, the CNN of
    `igfast bench` with --quick (3x32x32 images; no torchvision needed)."""

    def __init__(self, ctx: Context) -> None:
        import torch

        self.ctx, self.cuda = ctx, ctx.device == "cuda"
        self.device = torch.device(ctx.device)
        torch.manual_seed(0)
        if ctx.quick:
            from igfast.bench.workloads import SmallCNN

            self.model, self.side, self.name = SmallCNN().to(self.device).eval(), 32, "the bench CNN"
        else:
            self.model, self.side, self.name = _resnet(False).to(self.device).eval(), 224, "ResNet-50"

    def images(self, batch: int, seed: int):
        import torch

        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 3, self.side, self.side, generator=generator).to(self.device)
        with torch.no_grad():
            return x, torch.zeros_like(x), self.model(x).argmax(1)

    def free(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.empty_cache()

    def budgets(self) -> None:
        """The peak of the whole call against the budget, at two budgets."""
        import igfast
        from igfast.bench.peak import AllocationPeak
        from igfast.memory import format_size, parse_memory_size

        ctx = self.ctx
        batch, n_steps = (2, 8) if ctx.quick else (16, 50)
        x, baseline, target = self.images(batch, 1)
        # What stays allocated after a first call (CUDA library workspaces) is no part of a call's budget.
        igfast.IntegratedGradients(self.model).attribute(x, baseline, target=target, n_steps=2)
        results, rows_of = {}, []
        for budget_text in (("1MB", "8MB") if ctx.quick else ("1GB", "8GB")):
            budget = parse_memory_size(budget_text)
            ig = igfast.IntegratedGradients(self.model)
            started = time.time()
            with AllocationPeak(self.device) as meter:
                results[budget_text] = ig.attribute(x, baseline, target=target, n_steps=n_steps, memory_budget=budget)
            rows = [c.rows for c in ig.last_integral.chunks]
            row = {"case": f"memory_budget {budget_text}", "workload": f"{self.name}, batch {batch}, n_steps {n_steps}",
                   "peak_bytes": meter.bytes, "peak": format_size(meter.bytes), "budget_bytes": budget,
                   "within_budget": meter.bytes <= budget, "chunks": len(rows),
                   "rows_per_chunk": f"{min(rows)}..{max(rows)}", "seconds": round(time.time() - started, 2)}
            ctx.row(row)
            rows_of.append(row)
        first, second = results.values()
        ctx.note(f"the two budgets' attributions differ by {_relative_difference(first, second):.1e} "
                 "(relative to the largest)")
        ctx.goal("budgets", all(r["within_budget"] for r in rows_of),
                 "; ".join(f"{r['case'].split()[-1]}: peak {r['peak']} in {r['chunks']} chunks" for r in rows_of))

    def captum_cannot_fit(self) -> None:
        """A call Captum cannot fit (on the CPU: simulated), which igfast finishes under
        its automatic budget."""
        import warnings

        import torch

        import igfast
        from igfast.bench.peak import AllocationPeak
        from igfast.memory import format_size

        ctx = self.ctx
        batch, n_steps = (2, 8) if ctx.quick else (64, 300)
        x, baseline, target = self.images(batch, 2)
        if self.cuda:
            forward, kind = self.model, "on the card"
        else:
            forward = _refusing_large_batches(self.model, batch * n_steps // 4)
            kind = "simulated: the model refuses more than a quarter of the rows"
        captum_outcome = "captum not installed"
        if importlib.util.find_spec("captum") is not None:
            import captum.attr as captum_attr

            started = time.time()
            try:
                captum_attr.IntegratedGradients(forward).attribute(x, baseline, target=target, n_steps=n_steps)
                captum_outcome = f"finished in {time.time() - started:.1f} s"
            except torch.OutOfMemoryError as error:
                first_line = str(error).splitlines()[0][:100]
                captum_outcome = f"out of memory after {time.time() - started:.1f} s ({first_line})"
            self.free()
        ig = igfast.IntegratedGradients(forward)
        started = time.time()
        with warnings.catch_warnings(record=True), AllocationPeak(self.device) as meter:
            warnings.simplefilter("always")
            attributions, delta = ig.attribute(x, baseline, target=target, n_steps=n_steps,
                                               return_convergence_delta=True)
        seconds = time.time() - started
        with torch.no_grad():
            rise = (self.model(x).gather(1, target[:, None]) - self.model(baseline).gather(1, target[:, None])).abs()
        rows = [c.rows for c in ig.last_integral.chunks]
        ctx.row({"case": "Captum cannot fit", "kind": kind,
                 "workload": f"{self.name}, batch {batch}, n_steps {n_steps}, no internal_batch_size",
                 "captum": captum_outcome, "igfast_seconds": round(seconds, 2), "igfast_peak": format_size(meter.bytes),
                 "igfast_chunks": len(rows), "rows_per_chunk": f"{min(rows)}..{max(rows)}",
                 "igfast_out_of_memory_retries": ig.last_integral.out_of_memory,
                 "relative_delta": float(delta.abs().max() / rise.max().clamp_min(1e-30))})
        finished = bool(torch.isfinite(attributions).all())
        ctx.goal("captum-cannot-fit", captum_outcome.startswith("out of memory") and finished,
                 f"Captum: {captum_outcome}; igfast: {seconds:.1f} s in {len(rows)} chunks of {min(rows)}..{max(rows)} "
                 f"rows, peak {format_size(meter.bytes)} ({kind})")

    def forced_out_of_memory(self) -> None:
        """An out-of-memory error forced under the chunk igfast is told to use, which the
        back-off survives with the unchunked result; then the automatic budget under the
        same limit."""
        import warnings

        import torch

        import igfast
        from igfast.bench.peak import AllocationPeak
        from igfast.memory import format_size

        ctx = self.ctx
        batch, n_steps = (2, 8) if ctx.quick else (8, 50)
        x, baseline, target = self.images(batch, 3)
        rows = batch * n_steps
        with AllocationPeak(self.device) as meter:
            unchunked = igfast.IntegratedGradients(self.model).attribute(
                x, baseline, target=target, n_steps=n_steps, internal_batch_size=rows)
        forward = self.model
        if self.cuda:
            self.free()
            _, total = torch.cuda.mem_get_info()
            limit = torch.cuda.memory_reserved() + meter.bytes // 3
            torch.cuda.set_per_process_memory_fraction(limit / total)
            how = (f"set_per_process_memory_fraction({limit / total:.4f}): {format_size(limit)} for a call that "
                   f"peaks at {format_size(meter.bytes)}")
        else:
            forward = _refusing_large_batches(self.model, rows // 3)
            how = f"simulated: the model refuses more than {rows // 3} of the {rows} rows"
        try:
            ig = igfast.IntegratedGradients(forward)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                recovered = ig.attribute(x, baseline, target=target, n_steps=n_steps, internal_batch_size=rows)
            automatic = igfast.IntegratedGradients(forward)
            with warnings.catch_warnings(record=True):
                warnings.simplefilter("always")
                automatic_result = automatic.attribute(x, baseline, target=target, n_steps=n_steps)
        finally:
            if self.cuda:
                torch.cuda.set_per_process_memory_fraction(1.0)
        retries, chunk_rows = ig.last_integral.out_of_memory, [c.rows for c in ig.last_integral.chunks]
        difference = _relative_difference(recovered, unchunked)
        # What chunking alone changes, with no out-of-memory error: the same chunk size
        # given directly. Convolution algorithms chosen per batch size differ in their
        # rounding, so this is the float32 floor under the difference above.
        chunked = igfast.IntegratedGradients(self.model).attribute(
            x, baseline, target=target, n_steps=n_steps, internal_batch_size=max(chunk_rows))
        chunking_alone = _relative_difference(chunked, unchunked)
        ctx.row({"case": "forced out of memory", "how": how, "retries": retries,
                 "warnings": sum("out of memory" in str(w.message) for w in caught),
                 "rows_per_chunk_after": f"{min(chunk_rows)}..{max(chunk_rows)}",
                 "relative_difference_to_unchunked": difference,
                 "same_chunks_without_out_of_memory_relative_difference": chunking_alone,
                 "automatic_budget_retries_under_the_same_limit": automatic.last_integral.out_of_memory,
                 "automatic_budget_relative_difference": _relative_difference(automatic_result, unchunked)})
        ctx.goal("forced-oom", retries >= 1 and difference <= 1e-4,
                 f"{retries} retries, then chunks of {min(chunk_rows)}..{max(chunk_rows)} rows; result within "
                 f"{difference:.1e} of the unchunked one (relative; the same chunks without an out-of-memory "
                 f"error: {chunking_alone:.1e}); {how}")


def section_memory(ctx: Context) -> None:
    import torch

    torch.set_num_threads(1 if ctx.device == "cpu" else torch.get_num_threads())
    # Results are compared across chunkings: in true float32, not TF32.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    cases = _MemoryCases(ctx)
    for key, case, needs_s in (("budgets", cases.budgets, 20), ("captum-cannot-fit", cases.captum_cannot_fit, 40),
                               ("forced-oom", cases.forced_out_of_memory, 20)):
        if ctx.time_left() < (5 if ctx.quick else needs_s):
            ctx.goal(key, None, "out of time")
            continue
        if not ctx.attempt(key, case):
            ctx.goal(key, False, "the case failed: " + ctx.result["case_errors"][-1])
        cases.free()


# llm ----------------------------------------------------------------------------

LLM_FILE = os.path.join(ROOT, "benchmarks", "bench_llm.py")


def section_llm(ctx: Context) -> None:
    """The Llama case of benchmarks/bench_llm.py (llama_case): a Llama config of about
    1.1B parameters in bfloat16 (a 2-layer one on CPU or --quick), prompt 256 and
    target 64 tokens, igfast's LLMGradientAttribution against Captum's: times, peaks,
    model calls, parity and the one-pass bound, measured by bench_llm itself."""
    if not os.path.exists(LLM_FILE):
        raise SectionSkipped("benchmarks/bench_llm.py is not there")
    spec = importlib.util.spec_from_file_location("bench_llm", LLM_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(LLM_FILE))
    try:
        spec.loader.exec_module(module)
    except ImportError as error:
        raise SectionSkipped(f"bench_llm.py needs a package that is missing: {error}") from None
    import torch

    from igfast.memory import format_size
    small = ctx.quick or ctx.device == "cpu"
    dtype = torch.bfloat16 if ctx.device == "cuda" else torch.float32
    row = module.llama_case(ctx.device, dtype, prompt_len=12 if small else 256, target_len=4 if small else 64,
                            n_steps=8 if small else 16, repeats=1 if small else 2, tiny=small)
    shown = {key: row[key] for key in ("prompt", "targets", "n_steps", "dtype", "parameters") if key in row}
    for key, value in row.items():
        if key.startswith("time_"):
            shown[key] = round(value, 3)
        elif key.startswith("peak_"):
            shown[key.replace("_bytes", "")] = format_size(value)
        elif key.startswith(("calls_", "rel_diff_")) or key in ("speedup", "bound", "of_bound"):
            shown[key] = value
    ctx.row(shown)

SECTIONS = [
    # H200 seconds (2026-12-04): build 45 with the system g++ (87 with the two rebuilds),
    # tests 154, ops 18, e2e 57, memory 28, llm 86 and over 100.
    Section("build", 150, 200, section_build),  # a check only, unless it compiles (GPU, or --build)
    Section("tests", 190, 90, section_tests),
    Section("ops", 45, 30, section_ops),
    Section("e2e", 100, 60, section_e2e),
    Section("memory", 60, 45, section_memory),
    # The LLM case of issue 17 (benchmarks/bench_llm.py, llama_case): last, it takes what is left.
    Section("llm", 130, 45, section_llm),
]


# ------------------------------------------------------------ the parent process ---

def ensure_captum(wheels: str, env: dict, log, scratch: str) -> str:
    """'present', 'installed from <wheel>' (into a folder put on PYTHONPATH) or why not."""
    if importlib.util.find_spec("captum") is not None:
        import captum

        return f"present ({getattr(captum, '__version__', '?')})"
    found = sorted(glob.glob(os.path.join(wheels, "captum-*.whl")))
    if not found:
        return f"missing, and no captum-*.whl in {wheels} (benchmarks/GPU.md says how to fetch it)"
    site = os.path.join(scratch, "site")
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                             "--no-compile", "--target", site, found[-1]], capture_output=True, text=True)
    log.write(result.stdout + result.stderr)
    if result.returncode != 0:
        return f"missing: installing {os.path.basename(found[-1])} failed ({result.stderr.strip()[-300:]})"
    env["PYTHONPATH"] = env["PYTHONPATH"] + os.pathsep + site
    sys.path.append(site)
    shown = os.path.relpath(found[-1], ROOT) if found[-1].startswith(ROOT + os.sep) else found[-1]
    return f"installed from {shown} (dependencies: those already there)"


def probe(device: str, env: dict) -> Dict[str, Any]:
    """The machine, from a short child process (the parent never initialises the GPU)."""
    code = r"""
import json, platform, sys, torch
state = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
         "cpus": __import__("os").cpu_count(), "gpu": None}
if sys.argv[1] == "cuda":
    if not torch.cuda.is_available():
        state["error"] = "--device cuda: no CUDA GPU is visible to torch"
    else:
        p = torch.cuda.get_device_properties(0)
        state.update(gpu=p.name, capability="%d.%d" % (p.major, p.minor), memory_gib=round(p.total_memory / 2**30, 1),
                     cudnn=torch.backends.cudnn.version())
        try:
            import subprocess
            state["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                             capture_output=True, text=True, timeout=20).stdout.strip()
        except OSError:
            pass
print(json.dumps(state))
"""
    result = subprocess.run([sys.executable, "-c", code, device], capture_output=True, text=True, env=env, timeout=120)
    if result.returncode != 0:
        return {"error": result.stderr.strip()[-500:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def card_name(machine: Dict[str, Any], device: str) -> str:
    if device != "cuda" or not machine.get("gpu"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", machine["gpu"].lower()).strip("-")


def git_commit() -> str:
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (result.stdout.strip() + (" (with local changes)" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git here)"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.3f}".rstrip("0").rstrip(".")
    return str(value).replace("|", "/")


def _table(rows: List[Dict[str, Any]], columns: List[str]) -> List[str]:
    columns = [c for c in columns if any(c in r for r in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c, "-")) for c in columns) + " |" for r in rows]
    return lines


E2E_COLUMNS = ["workload", "name", "floor_s", "igfast_s", "captum_s", "speedup_over_captum", "igfast_over_floor",
               "captum_over_floor", "unit", "floor_per_s", "igfast_per_s", "captum_per_s", "floor_peak",
               "igfast_peak", "captum_peak", "max_difference", "repeats"]


def goal_rows(report: Dict[str, Any]) -> List[Dict[str, str]]:
    """Every goal of GOALS with what its section measured, or why it measured nothing."""
    sections = {s["name"]: s for s in report["sections"]}
    rows = []
    for key, (section_name, text) in GOALS.items():
        section = sections.get(section_name)
        found = [g for g in (section or {}).get("goals", []) if g["key"] == key]
        if found:
            rows.append({"goal": text, "status": found[-1]["status"], "measured": found[-1]["measured"]})
        else:
            why = f"section {section_name}: {section['status']}" if section else f"section {section_name} not selected"
            rows.append({"goal": text, "status": "not measured", "measured": why})
    return rows


def render(report: Dict[str, Any]) -> str:
    machine, quick = report["machine"], report["quick"]
    title = machine.get("gpu") or "CPU"
    lines = [f"# igfast GPU check: {title}" + (" (--quick smoke run)" if quick else ""), "",
             f"`{report['command']}`, {report['date']}, igfast {report['commit']}; "
             f"Python {machine.get('python')}, torch {machine.get('torch')} (CUDA {machine.get('cuda')}), "
             f"{machine.get('cpus')} CPUs" + (f", {machine.get('memory_gib')} GiB on the GPU, compute capability "
                                             f"{machine.get('capability')}, driver {machine.get('driver', '?')}, "
                                             f"cuDNN {machine.get('cudnn')}" if machine.get("gpu") else "")
             + f"; captum: {report['captum']}; {report['seconds']:.0f} s of the {report['budget_s']:.0f} s budget.", ""]
    if report["device"] != "cuda" or quick:
        lines += ["A smoke run: its figures say the script works, not whether the GPU goals are met.", ""]
    lines += ["## Goals of issue 16", ""]
    lines += _table(goal_rows(report), ["goal", "status", "measured"])
    lines += ["", "## Sections", ""]
    lines += _table([{"section": s["name"], "status": s["status"], "seconds": s["seconds"], "limit s": s["limit_s"]}
                     for s in report["sections"]], ["section", "status", "seconds", "limit s"])
    for section in report["sections"]:
        lines += ["", f"## {section['name']}: {section['status']}", ""]
        for note in section.get("notes", []):
            lines.append(f"- {note}")
        if section["name"] == "build" and section.get("info"):
            lines.append(f"- build: `{section.get('build_command', 'none')}` "
                         f"({section.get('build_seconds', '-')} s); igfast.info(): `{json.dumps(section['info'])}`")
        if section["name"] == "tests" and "tests" in section:
            lines.append(f"- `{section.get('command')}`: {section['passed']} passed, {section['failures']} failed, "
                         f"{section['errors']} errors, {section['skipped']} skipped in {section.get('seconds')} s"
                         + (f"; {section['captum_comparisons']} attribute() calls compared with Captum"
                            if section.get("captum_comparisons") else ""))
            for name in section.get("failed_tests", []):
                lines.append(f"  - failed: `{name}`")
            for reason, count in section.get("skip_reasons", {}).items():
                lines.append(f"  - skipped {count}: {reason}")
        rows = section.get("rows", [])
        if rows and section["name"] == "ops":
            lines += [section.get("definition", ""), ""]
            lines += _table(rows, ["op", "dtype", "elements", "ms", "GBps", "copy_GBps", "fraction_of_copy"])
        elif rows and section["name"] == "e2e":
            settings = section.get("settings", {})
            lines += [f"n_steps {settings.get('n_steps')}, {settings.get('method')}; times are medians in seconds "
                      f"(CUDA events on a GPU); TF32 as PyTorch's defaults: {settings.get('tf32')}.", ""]
            lines += _table(rows, E2E_COLUMNS)
        elif rows:
            for row in rows:
                lines.append("- " + ", ".join(f"{k}: {_cell(v)}" for k, v in row.items()))
        if section.get("error"):
            lines += ["", "```", section["error"][-2500:], "```"]
    return "\n".join(lines) + "\n"


def run_sections(args, selected: List[Section], env: dict, out_base: str, log, report: Dict[str, Any]) -> None:
    started = report["_started"]
    for section in selected:
        elapsed = time.time() - started
        left = args.budget_s - elapsed
        limit = min(args.limits.get(section.name) or (section.quick_limit_s if args.quick else section.limit_s),
                    left)
        entry: Dict[str, Any] = {"name": section.name, "limit_s": round(limit), "seconds": 0}
        report["sections"].append(entry)
        if limit < START_COST_S:
            entry["status"] = f"not run: {left:.0f} s of the budget left"
            write_report(report, out_base)
            continue
        result_path = os.path.join(report["_scratch"], f"{section.name}.json")
        command = [sys.executable, HERE, "--child", section.name, "--device", args.device,
                   "--deadline", str(time.time() + limit - 5), "--result", result_path]
        command += ["--quick"] if args.quick else []
        command += ["--build"] if args.build else []
        log.write(f"\n===== section {section.name} (limit {limit:.0f} s) =====\n")
        log.flush()
        print(f"== {section.name} (limit {limit:.0f} s)", flush=True)
        section_started = time.time()
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            code = None
        stop_session(process.pid)  # also what a finished section left running
        process.wait()
        entry["seconds"] = round(time.time() - section_started, 1)
        if os.path.exists(result_path):
            with open(result_path, encoding="utf-8") as handle:
                entry.update(json.load(handle))
        if code is None:
            entry["status"] = f"stopped at its limit of {limit:.0f} s (what it finished is reported)"
        elif entry.get("section_skipped"):
            entry["status"] = f"skipped: {entry['section_skipped']}"
        elif code != 0:
            entry["status"] = f"failed (exit {code})"
        else:
            entry["status"] = "ok"
        print(f"   {entry['status']} in {entry['seconds']:.1f} s", flush=True)
        write_report(report, out_base)


def write_report(report: Dict[str, Any], out_base: str) -> None:
    report["seconds"] = time.time() - report["_started"]
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    public["goals"] = goal_rows(public)
    with open(out_base + ".json", "w", encoding="utf-8") as handle:
        json.dump(public, handle, indent=1, default=str)
    with open(out_base + ".md", "w", encoding="utf-8") as handle:
        handle.write(render(public))


def child_main(args) -> int:
    sys.path.insert(0, ROOT)
    section = next(s for s in SECTIONS if s.name == args.child)
    ctx = Context(args)
    ctx.save()
    try:
        section.run(ctx)
    except SectionSkipped as reason:
        ctx.result["section_skipped"] = str(reason)
        print(f"  skipped: {reason}", flush=True)
    except Exception:
        ctx.result["error"] = traceback.format_exc()
        ctx.save()
        traceback.print_exc()
        return 1
    if ctx.result.get("case_errors"):
        failures = "\n".join(ctx.result["case_errors"])
        ctx.result["error"] = f"cases that failed (the log has their tracebacks):\n{failures}"
        ctx.save()
        return 1
    ctx.save()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="the folder for the report (created)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and stand-in models (seconds)")
    parser.add_argument("--sections", default=",".join(s.name for s in SECTIONS),
                        help="comma-separated sections to run, in their order (default: all)")
    parser.add_argument("--budget-s", type=float, default=TOTAL_BUDGET_S, help="the whole run's time (default 520)")
    parser.add_argument("--limit", action="append", default=[], metavar="SECTION=SECONDS",
                        help="a section's own time limit instead of its default (repeatable; e.g. tests=300 for "
                             "a run of the build and the tests alone)")
    parser.add_argument("--build", action="store_true", help="on the CPU: rebuild the extension too")
    parser.add_argument("--label", help="what is being run, for the report (e.g. the commit: the device "
                        "machine gets the working tree without its git history)")
    parser.add_argument("--wheels", default=os.path.join(ROOT, ".whl"),
                        help="where captum's wheel is when captum is not installed (default: .whl)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    args.limits = {}
    for item in args.limit:
        name, _, seconds = item.partition("=")
        if name not in {s.name for s in SECTIONS} or not re.fullmatch(r"\d+(\.\d+)?", seconds):
            parser.error(f"--limit takes SECTION=SECONDS with a section of {[s.name for s in SECTIONS]}; got {item!r}")
        args.limits[name] = float(seconds)
    if args.child:
        return child_main(args)
    if not args.out:
        parser.error("--out DIR is required")
    names = [n.strip() for n in args.sections.split(",") if n.strip()]
    unknown = [n for n in names if n not in {s.name for s in SECTIONS}]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {[s.name for s in SECTIONS]}")
    selected = [s for s in SECTIONS if s.name in names]
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p))
    scratch = tempfile.mkdtemp(prefix="igfast-gpu-check-")
    try:
        return run_all(args, selected, env, started, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_all(args, selected: List[Section], env: dict, started: float, scratch: str) -> int:
    """Captum, the machine, every section, the report; the exit code."""
    with open(os.path.join(scratch, "setup.log"), "w") as setup_log:
        captum = ensure_captum(args.wheels, env, setup_log, scratch)
    machine = probe(args.device, env)
    if machine.get("error"):
        print(f"gpu_check: {machine['error']}", file=sys.stderr)
        return 1
    out_base = os.path.join(args.out, f"gpu-{card_name(machine, args.device)}")
    report: Dict[str, Any] = {
        "command": "python benchmarks/gpu_check.py " + " ".join(args.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": args.label or f"commit {git_commit()}", "device": args.device,
        "quick": args.quick, "budget_s": args.budget_s, "captum": captum, "machine": machine,
        "host": platform.node(), "sections": [], "_started": started, "_scratch": scratch,
    }
    print(f"gpu_check: {machine.get('gpu') or 'CPU'}; captum {captum}; report in {out_base}.md", flush=True)
    with open(out_base + ".log", "w", encoding="utf-8") as log:
        run_sections(args, selected, env, out_base, log, report)
    write_report(report, out_base)
    # The end of the output is what a caller sees first (the device tool returns its
    # tail): the goals and the sections; the files hold everything.
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    print("\n## Goals of issue 16\n\n" + "\n".join(_table(goal_rows(public), ["goal", "status", "measured"])))
    print("\n" + "\n".join(_table([{"section": s["name"], "status": s["status"], "seconds": s["seconds"],
                                     "error": ((s.get("error") or "").strip().splitlines() or [""])[-1][:160]}
                                    for s in report["sections"]], ["section", "status", "seconds", "error"])))
    print(f"\nreport: {out_base}.md, .json, .log ({report['seconds']:.0f} s)")
    failed = [s["name"] for s in report["sections"] if not (s["status"] == "ok" or s["status"].startswith("skipped"))]
    if failed:
        print(f"gpu_check: sections that did not finish: {', '.join(failed)} (see {out_base}.log)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
