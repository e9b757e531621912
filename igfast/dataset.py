"""Attributions of a whole data set, on one or several processes, resumable, to disk.

``attribute_dataset`` cuts the data set into shards of consecutive examples. Shard
k belongs to rank k mod world_size (torch.distributed decides the ranks: torchrun,
or any init_process_group), so the split is deterministic, and every shard is
attributed in the same batches whatever the number of processes: the files equal
those of a one-process run. Each shard is written whole and renamed into place
(see ``igfast.shards``); a new run with the same arguments skips the shards that
exist, so a killed run resumes where it stopped.
"""

import atexit
import hashlib
import json
import math
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, SequentialSampler, default_collate

from .attr import IntegratedGradients, LayerIntegratedGradients
from .attr._train_mode import root_modules, running_state_kept
from .dtypes import integer_item
from .errors import ArgumentError, OutputTypeError, TargetError
from .adaptive import DEFAULT_TOLERANCE
from .quadrature import PIECE_METHODS, validate_method_and_steps
from .shards import (
    CONFIG, FORMAT_VERSION, INPUT_DIGEST, MANIFEST, complete_shards, read_json, read_shard_note,
    remove_partial_shards, shard_name, shard_ranges, write_json_atomically, write_shard,
)

TARGET_FORMS = ("predicted", "label")


def _explainer(model_or_method: Any):
    if isinstance(model_or_method, (IntegratedGradients, LayerIntegratedGradients)):
        return model_or_method
    if callable(model_or_method) and not hasattr(model_or_method, "attribute"):
        return IntegratedGradients(model_or_method)
    raise ArgumentError(
        "`model_or_method` must be a model (callable) or an igfast IntegratedGradients / "
        f"LayerIntegratedGradients; got {type(model_or_method).__name__}."
    )


def _dataset_and_batch(data: Any, batch_size: Optional[int]) -> Tuple[Dataset, int, Callable, Optional[dict]]:
    """The data set, the examples per attribute() call, how a list of items becomes a
    batch (a DataLoader's collate_fn: it may normalise or pad; else default_collate) and
    the DataLoader's worker settings where it loads in worker processes (else None)."""
    if isinstance(data, IterableDataset) or isinstance(getattr(data, "dataset", None), IterableDataset):
        raise ArgumentError(
            "`data` is (or reads) an iterable-style Dataset: attribute_dataset needs a map-style one "
            "(__len__ and __getitem__), whose examples it can cut into shards and find again to resume."
        )
    if isinstance(data, DataLoader):
        if data.batch_size is None:
            if data.batch_sampler is not None:
                raise ArgumentError(
                    "`data` is a DataLoader with a batch_sampler of its own: attribute_dataset forms the "
                    "batches itself (the shards decide which items). Pass a DataLoader with batch_size and "
                    "shuffle=False (its collate_fn and workers are used), or the Dataset.")
            raise ArgumentError(
                "`data` is a DataLoader with batch_size=None (items are not batched): give it a "
                "batch_size, or pass the Dataset and attribute_dataset's batch_size."
            )
        if not isinstance(data.sampler, SequentialSampler) or data.batch_sampler is None:
            raise ArgumentError(
                "`data` is a DataLoader that does not read the data set in order (shuffle or a "
                "custom sampler): attribute_dataset needs the examples' order; pass the Dataset "
                "or a DataLoader with shuffle=False."
            )
        workers = None
        if data.num_workers:
            workers = {"num_workers": data.num_workers, "worker_init_fn": data.worker_init_fn,
                       "multiprocessing_context": data.multiprocessing_context, "generator": data.generator,
                       "prefetch_factor": data.prefetch_factor, "timeout": data.timeout}
        return (data.dataset, (data.batch_size or 32) if batch_size is None else batch_size, data.collate_fn,
                workers)
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise ArgumentError(
            "`data` must be a map-style torch Dataset (with __len__ and __getitem__) or a "
            f"DataLoader over one; got {type(data).__name__}."
        )
    return data, 32 if batch_size is None else batch_size, default_collate, None


def _plain_int(value: Any) -> Any:
    """A numpy integer as the int it is; anything else as given."""
    return int(value) if isinstance(value, np.integer) else value


def _plain_float(value: Any) -> Any:
    """A numpy number as the Python number it is; anything else as given."""
    return value.item() if isinstance(value, np.generic) else value


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ArgumentError(f"`{name}` must be an integer >= 1; got {value!r}.")
    return value


def _digest_tensors(tensors) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        data = tensor.detach().to("cpu").contiguous()
        digest.update(str((tuple(data.shape), str(data.dtype))).encode())
        # (1-D first: a 0-dim tensor has no byte view)
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()[:16]


def _model_identity(forward_func: Any) -> str:
    """The forward's name, the weights and train/eval modes of the modules it calls
    (for a function: those it names, see _train_mode.root_modules) and a function's
    code: a resumed run with another model, mode or wrapper is refused, not mixed in."""
    modules = root_modules(forward_func)
    state = [value for m in modules for value in m.state_dict().values()]
    # (A sparse buffer as its dense values. A module's extra state, any object, is left to
    # the check of results on resume, _check_shard_results: a repr may hold an address or
    # a set's hash order, which change between processes.)
    weights = _digest_tensors(t.to_dense() if t.layout != torch.strided else t
                              for t in state if isinstance(t, torch.Tensor))
    modes = "".join("t" if m.training else "e" for root in modules for m in root.modules())
    name = type(forward_func).__name__ if isinstance(forward_func, nn.Module) else getattr(
        forward_func, "__qualname__", type(forward_func).__name__)
    code = getattr(forward_func, "__code__", None)
    code_digest = hashlib.sha256(_code_text(code).encode()).hexdigest()[:16] if code is not None else ""
    return f"{name}:{weights}:{hashlib.sha256(modes.encode()).hexdigest()[:8]}:{code_digest}"


def _code_text(code) -> str:
    """A function's bytecode, names and constants, nested functions included (a code
    object's repr carries its address, which changes between processes)."""
    constants = [_code_text(c) if hasattr(c, "co_code") else repr(c) for c in code.co_consts]
    return f"{code.co_code.hex()}|{code.co_names}|{constants}"


def _layer_names(explainer: Any) -> Optional[List[str]]:
    if not isinstance(explainer, LayerIntegratedGradients):
        return None
    names = {id(m): n for n, m in explainer.forward_func.named_modules()} if isinstance(
        explainer.forward_func, nn.Module) else {}
    return [names.get(id(layer), type(layer).__name__) for layer in explainer._layers]


def _baseline_identity(baselines: Any) -> str:
    if baselines is None or isinstance(baselines, (int, float)):
        return repr(baselines)
    as_tuple = baselines if isinstance(baselines, tuple) else (baselines,)
    return _digest_tensors(b if isinstance(b, torch.Tensor) else torch.tensor(b) for b in as_tuple)


class _Distributed:
    """rank and world size from torch.distributed; initialised here when torchrun set
    the environment but the caller did not."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Only barriers go through the group, so gloo serves every device; nccl
            # would need one GPU per rank and a device for each barrier.
            dist.init_process_group(backend="gloo")
            # Kept for the rest of the process, as a torchrun script keeps its group: made
            # and torn down per call, a second call in one script failed to connect in 3 of
            # 9 runs (the new group read the old one's addresses from torchrun's store).
            atexit.register(_destroy_process_group, dist)
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1

    def barrier(self) -> None:
        if self.active:
            self.dist.barrier()

    def anyone(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (every rank calls it)."""
        if not self.active:
            return flag
        # (A caller's nccl-only group reduces device tensors only.)
        backend = str(self.dist.get_backend())
        on_gpu = "nccl" in backend and "cpu" not in backend and "gloo" not in backend
        value = torch.tensor([1 if flag else 0], device=torch.cuda.current_device() if on_gpu else "cpu")
        self.dist.all_reduce(value, op=self.dist.ReduceOp.MAX)
        return bool(value.item())


def _destroy_process_group(dist) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _split_item(batch: Any) -> Dict[str, Any]:
    """A collated batch as {inputs, label, additional_forward_args, baselines}."""
    if isinstance(batch, dict):
        if "inputs" not in batch:
            raise ArgumentError("Data-set items given as dicts need an 'inputs' key.")
        inputs = batch["inputs"]
        extra = batch.get("additional_forward_args")
        return {
            "inputs": tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,),
            "label": batch.get("label"),
            "additional_forward_args": tuple(extra) if isinstance(extra, (tuple, list)) else (
                None if extra is None else (extra,)),
            # default_collate turns a tuple of per-example baselines into a list
            "baselines": tuple(batch["baselines"]) if isinstance(batch.get("baselines"), list) else batch.get(
                "baselines"),
        }
    if isinstance(batch, torch.Tensor):
        return {"inputs": (batch,), "label": None, "additional_forward_args": None, "baselines": None}
    if isinstance(batch, (tuple, list)) and len(batch) == 1 and isinstance(batch[0], torch.Tensor):
        return {"inputs": (batch[0],), "label": None, "additional_forward_args": None, "baselines": None}
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor):
        return {"inputs": (batch[0],), "label": batch[1], "additional_forward_args": None,
                "baselines": None}
    raise ArgumentError(
        "Data-set items must be a tensor (the input), a pair (input, label), or a dict with "
        "'inputs' and optionally 'label', 'additional_forward_args', 'baselines'; got "
        f"{type(batch).__name__}."
    )


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


class _Progress:
    """Rank 0's progress line: examples per second and the time left."""

    def __init__(self, total: int, world: int, enabled: bool) -> None:
        self.total, self.world, self.enabled = total, world, enabled
        self.started = time.perf_counter()
        self.done = 0
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def add(self, examples: int, remaining_for_all: int) -> None:
        self.done += examples
        if not self.enabled:
            return
        now = time.perf_counter()
        if not self.tty and now - self._last < 5 and remaining_for_all:
            return  # logs get a line every few seconds
        self._last = now
        rate = self.done / max(now - self.started, 1e-9) * self.world
        left = remaining_for_all / rate if rate else float("nan")
        text = (f"igfast attribute_dataset: {self.total - remaining_for_all}/{self.total} examples, "
                f"{rate:.1f} examples/s, {left:.0f} s left")
        sys.stderr.write(("\r" + text.ljust(90)) if self.tty else text + "\n")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


def attribute_dataset(
    model_or_method: Any,
    data: Any,
    output_dir: str,
    *,
    target: Union[None, int, str] = "predicted",
    baselines: Any = None,
    n_steps: Union[int, str] = 50,
    method: str = "gausslegendre",
    batch_size: Optional[int] = None,
    shard_size: int = 1024,
    internal_batch_size: Union[None, int, str] = None,
    memory_budget: Union[None, int, str] = None,
    tolerance: Optional[float] = None,
    max_steps: Optional[int] = None,
    device: Union[None, str, torch.device] = None,
    progress: bool = True,
) -> Dict[str, Any]:
    r"""Attribute every example of a data set and write the results to ``output_dir``.

    Args:
        model_or_method: a model (IntegratedGradients is used) or an igfast
            IntegratedGradients / LayerIntegratedGradients object.
        data: a map-style Dataset, or a DataLoader over one that keeps its order
            (its collate_fn forms the batches, its num_workers load them; the shards
            decide which items).
            Items: a tensor (the input), a pair (input, label), or a dict with
            ``inputs`` (tensor or tuple) and optionally ``label``,
            ``additional_forward_args`` (per-example tensors) and ``baselines``.
        output_dir: where the shards and the manifest go (created if needed).
        target: ``"predicted"`` (the argmax of the model's output, per example),
            ``"label"`` (the items' labels), an int, or None (one output per example).
        baselines: for all examples (a number, or a tensor shaped like one batch of
            inputs with first dimension 1); per-example baselines go in dict items.
        n_steps, method, internal_batch_size, memory_budget, tolerance, max_steps: as
            in attribute() (n_steps="auto" with its tolerance; method="exact").
        batch_size: examples per attribute() call (default: the DataLoader's, or 32).
        shard_size: examples per shard file, the unit of resuming and of the split
            between processes. Default 1024.
        device: where batches go (default: the model's device).
        progress: a progress line on rank 0 and a summary at the end.

    Runs on every rank of an initialised torch.distributed group (or one that
    torchrun's environment describes); each rank writes its shards, rank 0 the
    manifest. Returns the summary: examples, seconds, examples per second, mean
    and max |delta|, the output directory.

    Resuming re-reads the first and last batch of each shard already written and
    refuses to go on if they or the collate_fn changed; a changed model (weights,
    train/eval mode, a function's code) or argument is refused, and one batch is
    attributed again and compared with what was written (a model held where its
    weights cannot be read, another layer of the same kind).
    """
    explainer = _explainer(model_or_method)
    # attribute() takes numpy integers and a one-element integer tensor for n_steps (as
    # Captum does); the run's config is JSON, so they are recorded as the ints they are.
    n_steps, max_steps = _plain_int(integer_item(n_steps, any_shape=True)), _plain_int(max_steps)
    target, tolerance = _plain_int(integer_item(target)), _plain_float(tolerance)
    dataset, batch_size, collate, workers = _dataset_and_batch(data, batch_size)
    batch_size = _positive(batch_size, "batch_size")
    shard_size = _positive(shard_size, "shard_size")
    if method not in PIECE_METHODS and n_steps != "auto":  # attribute() checks the others' arguments
        validate_method_and_steps(method, n_steps)
    if not (target is None or (isinstance(target, str) and target in TARGET_FORMS)
            or (isinstance(target, int) and not isinstance(target, bool))):
        raise ArgumentError(f"`target` must be 'predicted', 'label', an int or None; got {target!r}.")
    forward = explainer.forward_func
    if device is None:
        parameter = next(forward.parameters(), None) if isinstance(forward, nn.Module) else None
        device = parameter.device if parameter is not None else torch.device("cpu")
    device = torch.device(device)
    num_examples = len(dataset)
    if num_examples == 0:
        raise ArgumentError("`data` holds no examples: there is nothing to attribute.")
    ranges = shard_ranges(num_examples, shard_size)
    config = {
        "format": FORMAT_VERSION,
        "attribution": type(explainer).__name__,
        "layers": _layer_names(explainer),
        "multiply_by_inputs": explainer.multiplies_by_inputs,
        "model": _model_identity(forward),
        "n_steps": n_steps,
        "method": method,
        "tolerance": tolerance,
        "max_steps": max_steps,
        "target": target,
        "baselines": _baseline_identity(baselines),
        "batch_size": batch_size,
        "shard_size": shard_size,
        "num_examples": num_examples,
        "num_shards": len(ranges),
    }

    group = _Distributed()
    os.makedirs(output_dir, exist_ok=True)
    _check_config(output_dir, config)
    config_path = os.path.join(output_dir, CONFIG)
    made_config = group.rank == 0 and read_json(config_path) is None
    try:
        if group.rank == 0:
            if made_config:
                write_json_atomically(config_path, config)
            remove_partial_shards(output_dir)
        group.barrier()
        _check_config(output_dir, config)

        started = time.perf_counter()
        finished = set(complete_shards(output_dir))
        refused: Optional[ArgumentError] = None
        attribute_options = dict(n_steps=n_steps, method=method, internal_batch_size=internal_batch_size,
                                 memory_budget=memory_budget)
        if tolerance is not None or max_steps is not None:  # (attribute() refuses them without "auto")
            attribute_options.update(tolerance=tolerance, max_steps=max_steps)
        work = _ShardWork(explainer, dataset, collate, workers, batch_size, device, target, baselines,
                          attribute_options)
        checked_results = False
        for shard in sorted(finished):
            if shard % group.world == group.rank:
                try:
                    _check_shard_data(output_dir, shard, work, *ranges[shard])
                    if not checked_results:  # one batch, recomputed: a changed model or layer shows there
                        _check_shard_results(output_dir, shard, work, *ranges[shard])
                        checked_results = True
                except ArgumentError as error:
                    refused = error
                    break
        # Every rank stops if one found changed data: the others would go on writing shards
        # of the changed data set into the store before torchrun stopped them.
        if group.anyone(refused is not None):
            raise refused or ArgumentError(
                f"`data` differs from the data the run in {output_dir!r} attributed (another process "
                "found the changed examples). Nothing was written: use another directory, or the same "
                "data to resume that run.")
        mine = [k for k in range(len(ranges)) if k % group.world == group.rank and k not in finished]
        left_overall = sum(e - b for k, (b, e) in enumerate(ranges) if k not in finished)
        computed = left_overall  # by all ranks in this run (a resumed run skips the rest)
        bar = _Progress(num_examples, group.world, progress and group.rank == 0)
        for shard in mine:
            begin, end = ranges[shard]
            fields, digest = work.attribute(begin, end)
            _check_like_written_shards(output_dir, fields, begin)
            # (The process in the tag: two runs not in one group may write the same shard.)
            write_shard(output_dir, shard, fields, tag=f"r{group.rank}-{os.getpid()}", notes={INPUT_DIGEST: digest})
            left_overall -= (end - begin) * group.world
            bar.add(end - begin, max(left_overall, 0))
        bar.finish()
        group.barrier()
        if group.rank == 0 and read_json(os.path.join(output_dir, MANIFEST)) is None:
            _write_manifest(output_dir, config, ranges)
        group.barrier()
        summary = _summary(output_dir, num_examples, computed, time.perf_counter() - started, group.world)
        if progress and group.rank == 0:
            print(f"igfast attribute_dataset: {summary['examples']} examples in {summary['seconds']:.1f} s "
                  f"({summary['computed']} computed now, {summary['examples_per_second']:.1f}/s on "
                  f"{group.world} process(es)); |delta| mean "
                  f"{summary['delta_mean']:.2e}, max {summary['delta_max']:.2e}; written to {output_dir}")
        return summary
    except BaseException:
        # A run refused before it wrote anything leaves no config behind: the corrected
        # call in the same directory would be refused as "a run with other arguments".
        # (One process only: another rank may be writing shards under this config.)
        if made_config and group.world == 1 and not complete_shards(output_dir):
            os.remove(config_path)
        raise


def _check_config(output_dir: str, config: dict) -> None:
    """The run in ``output_dir`` (if any) has these arguments; a manifest there is its."""
    existing = read_json(os.path.join(output_dir, CONFIG))
    wanted = json.loads(json.dumps(config))  # as it reads back from disk (tuples become lists)
    manifest = read_json(os.path.join(output_dir, MANIFEST))
    if manifest is not None and any(manifest.get(k) != v for k, v in (existing or wanted).items()):
        raise ArgumentError(
            f"`output_dir` {output_dir!r} holds a {MANIFEST} that is not this run's (another "
            "run's, or not igfast's): nothing was written; use another directory."
        )
    if existing is None:
        return
    changed = sorted(k for k in set(existing) | set(wanted) if existing.get(k) != wanted.get(k))
    if not changed:
        return
    details = ", ".join(f"{k}: {existing.get(k)!r} there, {wanted.get(k)!r} now" for k in changed)
    raise ArgumentError(
        f"`output_dir` {output_dir!r} holds a run with other arguments ({details}). Nothing was "
        "overwritten: use another directory, or the same arguments to resume that run."
    )


def _batches(dataset, collate, begin: int, end: int, batch_size: int, workers: Optional[dict] = None):
    """(first example, the collated batch split into its parts) for examples [begin, end);
    loaded in worker processes with ``workers`` (a DataLoader's settings), as the
    caller's DataLoader would load them (it was read in this process alone)."""
    if workers:
        # The data set itself with the shard's indices (not a Subset): a worker_init_fn
        # that opens a file per worker finds its own dataset in get_worker_info().dataset.
        loader = DataLoader(dataset, batch_size=batch_size, sampler=range(begin, end), collate_fn=collate,
                            **workers)
        for index, batch in enumerate(loader):
            yield begin + index * batch_size, _split_item(batch)
        return
    for first in range(begin, end, batch_size):
        yield first, _split_item(collate([dataset[i] for i in range(first, min(first + batch_size, end))]))


def _add_to_digest(digest, value: Any) -> None:
    """A batch part (tensors, tuples of them, numbers, lists of labels) into ``digest``."""
    if isinstance(value, torch.Tensor):
        digest.update(_digest_tensors([value]).encode())
    elif isinstance(value, (tuple, list)):
        for part in value:
            _add_to_digest(digest, part)
    else:
        digest.update(repr(value).encode())


def _batch_digest(batch: Dict[str, Any]) -> str:
    """What a batch was attributed from: its inputs, labels, forward args and
    per-example baselines, as the collate_fn formed them."""
    digest = hashlib.sha256()
    _add_to_digest(digest, [batch[key] for key in BATCH_PARTS])
    return digest.hexdigest()[:32]


BATCH_PARTS = ("inputs", "label", "additional_forward_args", "baselines")


class _ShardWork:
    """What every shard of a run is attributed with: the explainer, the data and how it
    is batched and loaded, and attribute()'s arguments."""

    def __init__(self, explainer, dataset, collate, workers, batch_size: int, device: torch.device, target,
                 baselines, attribute_options: Dict[str, Any]) -> None:
        self.explainer, self.dataset, self.collate, self.workers = explainer, dataset, collate, workers
        self.batch_size, self.device, self.target, self.baselines = batch_size, device, target, baselines
        self.attribute_options = attribute_options

    def batches(self, begin: int, end: int):
        return _batches(self.dataset, self.collate, begin, end, self.batch_size, self.workers)

    def attribute(self, begin: int, end: int) -> Tuple[Dict[str, np.ndarray], str]:
        """The fields of examples [begin, end) and the digests of the batches they were
        attributed from (one line each)."""
        collected: Dict[str, List[np.ndarray]] = {}
        digests = []
        for first, batch in self.batches(begin, end):
            digests.append(_batch_digest(batch))
            for name, tensor in self._attribute_batch(batch).items():
                tensor = tensor.detach().to("cpu")
                if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
                    tensor = tensor.float()
                earlier = collected.get(name)
                if earlier and earlier[0].shape[1:] != tuple(tensor.shape[1:]):
                    raise _shape_error(name, first, tuple(tensor.shape[1:]), earlier[0].shape[1:])
                collected.setdefault(name, []).append(tensor.numpy())
        return {name: np.concatenate(parts) for name, parts in collected.items()}, "\n".join(digests)

    def _attribute_batch(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        explainer = self.explainer
        inputs = _to(batch["inputs"], self.device)
        args = _to(batch["additional_forward_args"], self.device)
        # (a training-mode BatchNorm would update its running statistics here)
        with torch.no_grad(), running_state_kept(explainer.forward_func):
            outputs = explainer.forward_func(*inputs, *(args or ()))
        targets = _targets(self.target, outputs, batch["label"], self.device)
        if batch["baselines"] is not None and self.baselines is not None:
            raise ArgumentError(
                "Baselines are given twice: as `baselines` and in the data-set items' 'baselines'. Give "
                "them one way: per item, or for all examples.")
        batch_baselines = _to(batch["baselines"], self.device) if batch["baselines"] is not None else self.baselines
        attributions, delta = explainer.attribute(
            inputs if len(inputs) > 1 else inputs[0], baselines=batch_baselines,
            target=targets, additional_forward_args=args, return_convergence_delta=True, **self.attribute_options,
        )
        if isinstance(attributions, torch.Tensor):
            named = {"attributions": attributions}
        else:  # tuple inputs, tuple-output layers, lists of layers
            named = {f"attributions_{i}": part for i, part in enumerate(attributions)}
        named.update(outputs=outputs, deltas=delta)
        if targets is not None:
            named["targets"] = targets if isinstance(targets, torch.Tensor) else torch.full(
                (outputs.shape[0],), targets, dtype=torch.long)
        return named


def _shape_error(name: str, first: int, shape: tuple, before: tuple) -> ArgumentError:
    return ArgumentError(
        f"The {name} of the examples from {first} on have shape {shape} per example, those before "
        f"{before}: a store holds one shape per field. A collate_fn that pads each batch to its "
        "longest item gives batch-dependent shapes: pad every batch to one length (and mask it)."
    )


def _check_like_written_shards(output_dir: str, fields: Dict[str, np.ndarray], first: int) -> None:
    """A shard's fields have the per-example shapes of the shards already written."""
    written = complete_shards(output_dir)
    if not written:
        return
    shard = os.path.join(output_dir, shard_name(written[0]))
    for name, array in fields.items():
        path = os.path.join(shard, f"{name}.npy")
        before = np.load(path, mmap_mode="r").shape[1:] if os.path.exists(path) else None
        if before is not None and before != array.shape[1:]:
            raise _shape_error(name, first, array.shape[1:], before)


def _check_shard_data(output_dir: str, shard: int, work: _ShardWork, begin: int, end: int) -> None:
    """The first and last batches of a written shard are what they were: changed data
    or a changed collate_fn would otherwise mix two data sets in one store. (Two
    batches, not all: resuming a large run should not read the whole data set again.)
    They are loaded as the run loads them, in its workers where it has them (a data set
    may open its file in a worker_init_fn)."""
    written_from = read_shard_note(output_dir, shard, INPUT_DIGEST)
    if written_from is None:  # (a shard of an older igfast)
        return
    recorded = written_from.split("\n")
    firsts = list(range(begin, end, work.batch_size))
    for position in sorted({0, len(firsts) - 1}):
        first = firsts[position]
        batch = next(work.batches(first, min(first + work.batch_size, end)))[1]
        if position >= len(recorded) or _batch_digest(batch) != recorded[position]:
            raise ArgumentError(
                f"`data` differs from the data the run in {output_dir!r} attributed: the examples "
                f"from {first} ({shard_name(shard)}), as the collate_fn batches them, have changed. "
                "Nothing was overwritten: use another directory, or the same data to resume that run."
            )


# A resumed run recomputes the first batch of a written shard and compares it with what
# was written, relative to its size (per field, over the batch): the same batch and
# arguments give the same numbers up to the order of sums in chunks (a first call under
# a memory budget sizes its chunks before later ones can: 7.5e-9 apart in float32), and
# n_steps="auto" up to its tolerance on each side. A changed model or layer moves them
# by far more (another layer of the same kind: 0.5 and more).
RESUMED_RESULTS_RTOL = 1e-4
RESUMED_AUTO_TOLERANCES = 4


def _check_shard_results(output_dir: str, shard: int, work: _ShardWork, begin: int, end: int) -> None:
    """The first batch of a written shard, attributed again, gives what was written: a
    model whose weights igfast cannot see (held in a plain object a function calls), or
    another layer of the same kind, would otherwise mix two runs' results in one store."""
    fields, _ = work.attribute(begin, min(begin + work.batch_size, end))
    options = work.attribute_options
    allowed = RESUMED_RESULTS_RTOL
    if options["n_steps"] == "auto" or options.get("tolerance") is not None:
        allowed += RESUMED_AUTO_TOLERANCES * (options.get("tolerance") or DEFAULT_TOLERANCE)
    for name, array in fields.items():
        path = os.path.join(output_dir, shard_name(shard), f"{name}.npy")
        if name == "deltas" or not os.path.exists(path):  # (deltas: a difference of near-equal numbers)
            continue
        written = np.load(path, mmap_mode="r")[:len(array)].astype(np.float64)
        again = array.astype(np.float64)
        if written.shape != again.shape or not np.array_equal(np.isfinite(written), np.isfinite(again)):
            moved = math.inf
        else:  # (NaN and inf where they were before, compared as equal)
            written, again = (np.where(np.isfinite(written), a, 0.0) for a in (written, again))
            scale = max(float(np.linalg.norm(written)), np.finfo(np.float64).tiny)
            moved = float(np.linalg.norm(again - written)) / scale
        if not moved <= allowed:
            raise ArgumentError(
                f"The model or its arguments differ from the run's in {output_dir!r}: its first examples "
                f"({shard_name(shard)}), attributed again, give {name} {moved:.2g} relative from those "
                "written (a model held where igfast cannot read its weights, or another layer, changed). "
                "Nothing was overwritten: use another directory, or the same model and arguments to resume "
                "that run.")


def _targets(target, outputs: Any, label: Any, device: torch.device):
    if target == "predicted":
        if not isinstance(outputs, torch.Tensor):
            raise OutputTypeError(
                f"target='predicted' needs the model to return a (batch, classes) tensor; it returns a "
                f"{type(outputs).__name__}. Wrap the model so that it returns the tensor to attribute.")
        if outputs.dim() != 2:
            raise ArgumentError(
                f"target='predicted' needs (batch, classes) outputs; the model gives shape "
                f"{tuple(outputs.shape)}. Pass an int, 'label' or None."
            )
        return outputs.argmax(1)
    if target == "label":
        if label is None:
            raise ArgumentError("target='label' needs data-set items with labels: (input, label) "
                                "pairs or dicts with a 'label'.")
        return _label_targets(label, device)
    return target


def _label_targets(label: Any, device: torch.device) -> torch.Tensor:
    """The items' labels as class indices: a float label that is not a whole number
    (a regression target) is refused, not cut to an index."""
    try:
        labels = torch.as_tensor(label, device=device)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TargetError(f"target='label' needs integer class labels; the items' labels are {label!r:.80} "
                          f"({error}).") from None
    whole = not labels.is_floating_point() or bool((labels == labels.round()).all())
    if labels.dtype == torch.bool or labels.is_complex() or not whole:
        raise TargetError(
            f"target='label' needs integer class labels; the items' labels are {labels.dtype} "
            f"(e.g. {labels.reshape(-1)[:3].tolist()}). Give an int target, or items whose label is the class.")
    return labels.long()


def _write_manifest(output_dir: str, config: dict, ranges) -> None:
    first = os.path.join(output_dir, "shard-000000")
    names = sorted(f[:-4] for f in os.listdir(first) if f.endswith(".npy"))
    attribution_names = [n for n in names if n == "attributions" or n.startswith("attributions_")]
    attribution_names.sort(key=lambda n: int(n.split("_")[1]) if "_" in n else 0)
    fields = {}
    for name in names:
        array = np.load(os.path.join(first, f"{name}.npy"), mmap_mode="r")
        fields[name] = {"dtype": str(array.dtype), "shape_per_example": list(array.shape[1:])}
    write_json_atomically(os.path.join(output_dir, MANIFEST), {
        **config,
        "shards": [list(r) for r in ranges],
        "fields": fields,
        "attribution_fields": attribution_names,
        "attributions_are_tuple": attribution_names != ["attributions"],
        "has_targets": "targets" in names,
    })


def _summary(output_dir: str, num_examples: int, computed: int, seconds: float,
             world: int) -> Dict[str, Any]:
    deltas = [np.load(os.path.join(output_dir, f"shard-{k:06d}", "deltas.npy"), mmap_mode="r")
              for k in complete_shards(output_dir)]
    magnitudes = np.abs(np.concatenate(deltas)) if deltas else np.zeros(0)
    return {
        "examples": num_examples,
        "computed": computed,
        "seconds": seconds,
        "examples_per_second": computed / seconds if seconds > 0 else float("inf"),
        "processes": world,
        "delta_mean": float(magnitudes.mean()) if magnitudes.size else 0.0,
        "delta_max": float(magnitudes.max()) if magnitudes.size else 0.0,
        "output_dir": output_dir,
    }
