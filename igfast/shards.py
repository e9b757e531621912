"""Attributions on disk: shards of consecutive examples, written atomically, and a
manifest that makes a run readable.

Layout of an output directory:

    config.json            the run's arguments (fingerprint); written first
    shard-000000/          examples [0, S): one .npy file per field
        attributions.npy   (or attributions_0.npy, attributions_1.npy, ...)
        outputs.npy, deltas.npy, targets.npy (when there are targets)
    shard-000001/ ...
    manifest.json          written last: examples, shards, fields (shape, dtype)

A shard is written into ``.shard-NNNNNN.tmp-<rank>`` and renamed when complete,
so a shard directory with its final name is always whole; a killed run leaves at
most temporary directories, which the next run removes.
"""

import json
import os
import re
import shutil
from bisect import bisect_right
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .errors import ArgumentError

MANIFEST = "manifest.json"
CONFIG = "config.json"
FORMAT_VERSION = 1
MANIFEST_KEYS = ("num_examples", "shards", "attribution_fields", "attributions_are_tuple", "has_targets")
# In each shard: a digest of the batches it was attributed from (resuming checks it).
INPUT_DIGEST = "inputs.sha256"
# Every shard holds it: a shard-NNNNNN directory without it is not igfast's.
ALWAYS_WRITTEN = "deltas.npy"
_SHARD_NAME = re.compile(r"shard-(\d{6,})")


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


def shard_ranges(num_examples: int, shard_size: int) -> List[Tuple[int, int]]:
    return [(begin, min(begin + shard_size, num_examples)) for begin in range(0, num_examples, shard_size)]


def complete_shards(directory: str) -> List[int]:
    """Indices of the shards whose directories carry their final name (other entries,
    "shard-backup" say, are not shards; a shard-NNNNNN igfast did not write is an error)."""
    found = []
    for entry in os.listdir(directory):
        match = _SHARD_NAME.fullmatch(entry)
        if match is None or not os.path.isdir(os.path.join(directory, entry)):
            continue
        if not os.path.exists(os.path.join(directory, entry, ALWAYS_WRITTEN)):
            raise ArgumentError(
                f"{os.path.join(directory, entry)!r} has the name of a shard but no {ALWAYS_WRITTEN}: igfast "
                "did not write it. Move it out of the output directory."
            )
        found.append(int(match.group(1)))
    return sorted(found)


def remove_partial_shards(directory: str) -> int:
    """Delete what killed runs left half-written; returns how many."""
    removed = 0
    for entry in os.listdir(directory):
        if entry.startswith(".shard-") and ".tmp" in entry:
            shutil.rmtree(os.path.join(directory, entry), ignore_errors=True)
            removed += 1
        elif ".json.tmp-" in entry:  # write_json_atomically's, of a process killed while writing
            os.remove(os.path.join(directory, entry))
            removed += 1
    return removed


def write_shard(directory: str, index: int, fields: Dict[str, np.ndarray], tag: str,
                notes: Optional[Dict[str, str]] = None) -> None:
    """Write the fields of one shard (and its notes: small text files), then make it
    visible in one rename."""
    temporary = os.path.join(directory, f".{shard_name(index)}.tmp-{tag}")
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)
    for name, text in (notes or {}).items():
        with open(os.path.join(temporary, name), "w", encoding="utf-8") as handle:
            handle.write(text)
    for name, array in fields.items():
        path = os.path.join(temporary, f"{name}.npy")
        with open(path, "wb") as handle:
            np.save(handle, array)
            handle.flush()
            os.fsync(handle.fileno())
    final = os.path.join(directory, shard_name(index))
    try:
        os.rename(temporary, final)
    except OSError:
        # Another process not in this run's group wrote the same shard first (two
        # launches on one directory): its shard stands, as it would on a resume.
        if not os.path.exists(os.path.join(final, ALWAYS_WRITTEN)):
            raise
        shutil.rmtree(temporary, ignore_errors=True)


def write_json_atomically(path: str, content: dict) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def read_shard_note(directory: str, index: int, name: str) -> Optional[str]:
    """A note write_shard wrote, or None (a shard of an older igfast has none)."""
    path = os.path.join(directory, shard_name(index), name)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def read_json(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        try:
            content = json.load(handle)
        except json.JSONDecodeError as error:
            raise ArgumentError(f"{path!r} is not igfast's: it is not JSON ({error}). Move it away.") from error
    if not isinstance(content, dict):
        raise ArgumentError(f"{path!r} is not igfast's: it holds a {type(content).__name__}, not an object.")
    return content


class ShardedArray:
    """One field across all shards, indexed like one array of ``len`` examples.

    Indexing returns a torch tensor (a copy); ``numpy(index)`` returns numpy data,
    a read-only memory map when the selection lies within one shard.
    """

    def __init__(self, directory: str, name: str, ranges: Sequence[Tuple[int, int]], mmap: bool):
        self._paths = [os.path.join(directory, shard_name(i), f"{name}.npy") for i in range(len(ranges))]
        self._begins = [begin for begin, _ in ranges]
        self._length = ranges[-1][1] if ranges else 0
        self._mmap = "r" if mmap else None
        self._loaded: Dict[int, np.ndarray] = {}
        self.name = name

    def __len__(self) -> int:
        return self._length

    def _header(self) -> np.ndarray:
        # A memory map reads only the .npy header, however this store was opened.
        return np.load(self._paths[0], mmap_mode="r")

    @property
    def shape(self) -> Tuple[int, ...]:
        """(examples, *one example's shape), as the whole field would have."""
        if not self._paths:
            return (0,)
        return (self._length,) + tuple(self._header().shape[1:])

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype that indexing returns."""
        if not self._paths:
            return torch.float32
        return torch.from_numpy(np.empty(0, dtype=self._header().dtype)).dtype

    def __repr__(self) -> str:
        return f"ShardedArray({self.name!r}, shape={self.shape}, dtype={self.dtype}, shards={len(self._paths)})"

    def _shard(self, index: int) -> np.ndarray:
        if index not in self._loaded:
            self._loaded[index] = np.load(self._paths[index], mmap_mode=self._mmap)
        return self._loaded[index]

    def numpy(self, key: Union[int, slice]):
        if isinstance(key, (int, np.integer)):
            position = int(key) + (self._length if key < 0 else 0)
            if not 0 <= position < self._length:
                raise IndexError(f"example {key} is out of range for {self._length} examples")
            shard = bisect_right(self._begins, position) - 1
            return self._shard(shard)[position - self._begins[shard]]
        if not isinstance(key, slice):
            raise TypeError(f"index with an int or a slice; got {type(key).__name__}")
        start, stop, step = key.indices(self._length)
        if step != 1:
            chosen = range(start, stop, step)
            return np.stack([self.numpy(i) for i in chosen]) if len(chosen) else self.numpy(slice(0, 0))
        parts = []
        position = start
        while position < stop:
            shard = bisect_right(self._begins, position) - 1
            data = self._shard(shard)
            begin = self._begins[shard]
            end = min(stop, begin + data.shape[0])
            parts.append(data[position - begin:end - begin])
            position = end
        if not parts:
            first = self._shard(0) if self._paths else np.empty((0,))
            return first[:0]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __getitem__(self, key: Union[int, slice]) -> torch.Tensor:
        return torch.from_numpy(np.array(self.numpy(key)))


@dataclass
class Attributions:
    """A finished run of attribute_dataset, read back (see ``open_attributions``)."""

    manifest: dict
    attributions: Union[ShardedArray, Tuple[ShardedArray, ...]]
    outputs: ShardedArray
    deltas: ShardedArray
    targets: Optional[ShardedArray]

    def __len__(self) -> int:
        return self.manifest["num_examples"]

    def __getitem__(self, key: Union[int, slice]) -> Dict[str, object]:
        """The fields of one example or a slice of examples, as tensors."""
        item = {
            "attributions": tuple(a[key] for a in self.attributions)
            if isinstance(self.attributions, tuple) else self.attributions[key],
            "outputs": self.outputs[key],
            "deltas": self.deltas[key],
        }
        if self.targets is not None:
            item["targets"] = self.targets[key]
        return item


def open_attributions(path: str, mmap: bool = True) -> Attributions:
    """Open the output directory (``path``) of a finished ``attribute_dataset`` run.

    Fields index like arrays over all examples, in data-set order:
    ``store.attributions[10:20]`` (a tensor), ``store.deltas[3]``, ``store[5]``
    (a dict of the example's fields); ``store.attributions.numpy(slice)`` gives
    numpy memory maps. ``mmap=False`` loads each shard fully when first touched.
    """
    if not os.path.isdir(path):
        raise ArgumentError(f"`path` {path!r} is not a directory of attributions.")
    manifest = read_json(os.path.join(path, MANIFEST))
    if manifest is None:
        config = read_json(os.path.join(path, CONFIG))
        if config is None:
            raise ArgumentError(f"`path` {path!r} holds no attribute_dataset run (no {MANIFEST}).")
        done = len(complete_shards(path))
        raise ArgumentError(
            f"The run in {path!r} is not finished: {done} of {config['num_shards']} shards are "
            "written. Call attribute_dataset again with the same arguments to resume it."
        )
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise ArgumentError(f"The {MANIFEST} in {path!r} is not igfast's: it has no {', '.join(missing)}.")
    ranges = [tuple(r) for r in manifest["shards"]]
    attribution_names = manifest["attribution_fields"]
    fields = {name: ShardedArray(path, name, ranges, mmap) for name in attribution_names}
    attributions = (
        tuple(fields[name] for name in attribution_names)
        if manifest["attributions_are_tuple"] else fields[attribution_names[0]]
    )
    return Attributions(
        manifest=manifest,
        attributions=attributions,
        outputs=ShardedArray(path, "outputs", ranges, mmap),
        deltas=ShardedArray(path, "deltas", ranges, mmap),
        targets=ShardedArray(path, "targets", ranges, mmap) if manifest["has_targets"] else None,
    )
