"""Memory sizes, budgets and peak meters: what the chunk sizing measures with.

A budget is the memory one ``attribute`` call may add on top of what was allocated
before it: the accumulators plus the peak of one chunk (path rows, the model's
activations for them, their gradients). Chunks are sized from measured peaks:

- CUDA: measured, ``torch.cuda.max_memory_allocated`` (the meter resets the peak
  statistics of the device, as a profiler would; meters around it, such as a
  benchmark's, still see the whole peak);
- CPU: estimated, since PyTorch keeps no statistics of its CPU allocator: the bytes
  autograd saves for backward (seen through ``torch.autograd.graph.saved_tensors_hooks``)
  plus the path and its gradient, times ``ESTIMATE_MARGIN``. Saved tensors are most of
  a forward+backward's peak; the margin covers the backward's temporaries.

Only public APIs change state, so the meter composes with anything else a model does:
``torch.autograd.Function``, compiled graphs (their saved tensors pass the same
hooks), custom ops, a running profiler, the caller's own saved-tensor hooks (read with
PyTorch's private reader, and kept: see PeakMeter.__enter__). The out-of-memory back-off of the engine is
the safety net for a model whose peak the estimate misses.
"""

import math
import numbers
import os
import re
import sys
import threading
import time
from typing import Callable, List, Optional, Tuple, Union

import torch

from .errors import ArgumentError, ArgumentTypeError

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")

# On CPU, backward temporaries (which autograd does not save) are covered by this
# factor on top of the saved tensors, path and gradient. Measured with the profiler
# (igfast.bench.peak): a one-hidden-GELU MLP peaks at 1.76x its saved bytes (1.5
# overran a 4 MB budget by 0.04%), a CNN at 1.2x, a transformer encoder below 1.1x;
# 2.0 overran a 0.7 MB budget by 3% on a ReLU MLP (128-512-10, 500 steps: its backward's
# temporaries are two hidden-layer copies against one saved).
ESTIMATE_MARGIN = 2.25
# The automatic budget: this share of the memory the device has free at the call.
AUTO_SHARE_CUDA = 0.9
AUTO_SHARE_CPU = 0.5
# On CPU a chunk's working memory beyond this brings no speed, and costs it: fresh
# blocks page-fault and leave the caches. glibc serves a block above its mmap threshold
# (at most 32 MiB) with fresh pages each time and returns freed memory above its trim
# threshold, so a chunk whose tensors are tens of MiB page-faults on every chunk. The
# budget remains the hard limit. History, one thread, medians of interleaved runs:
# - 56af9fe: NoiseTunnel(IG) on the small CNN ran 1.43 s with 128 MiB chunks, 3.37 s
#   with 512 MiB and 3.65 s in one 0.9 GiB chunk; LayerIG on MiniLM 12.6 s with 256 MiB
#   chunks and 20.2 s in one 3.7 GiB chunk.
# - d49de3f (this machine's page faults counted with getrusage), 16 / 32 / 64 / 128 MiB:
#   igfast bench's MLP (batch 64) at 1056 Gauss-Legendre steps 139.8 / 137.7 / 170.3 /
#   174.1 ms (1, 0, 14,753 and 21,648 page faults a call), at 200 steps 27.3 / 27.1 /
#   35.6 / 29.4 ms, at 16 and 50 steps within 8% of each other; the CNN (batch 16) at 200
#   steps 1076 / 1005 / 1011 / 1251 ms, at 50 steps 282 / 248 / 242 / 242 ms, at 16 steps
#   85 / 79 / 78 / 84 ms. 32 MiB is at or within 2.5% of the fastest on each. (The
#   encoder at 16 steps, batch 8, medians of 3: 7.6 / 8.4 / 7.6 / 7.5 s; its weights raise
#   its chunks to 64-128 MiB at every one of these settings, see raised_for_weights.)
CPU_PREFERRED_CHUNK_BYTES = 32 * 2**20
# The exact walk's passes (method="exact", "gausslegendre_pieces", n_steps="auto" where
# it walks) pay more per chunk: BreakpointMode reads every op of every chunk in Python
# and the walk's kernels. On the MLP (batch 64, d49de3f) 32 MiB split its two large
# rounds into five chunks, and method="exact" took 59.7 ms against 49.5 ms with 128 MiB
# (auto at 1e-3, which walks: 71.1 against 60.2 ms). Walk passes keep 128 MiB.
CPU_PREFERRED_WALK_CHUNK_BYTES = 128 * 2**20
# The first chunk under the automatic budget is sized before anything is measured, from
# the path's row bytes (chunking.FIRST_CHUNK_ROW_FACTOR): on CPU within this many times
# CPU_PREFERRED_CHUNK_BYTES, 128 MiB, what it was before that fell from 128 to 32 MiB. A
# model whose weights raise its chunks (below) is known to have them only once the first
# chunk ran: within 32 MiB MiniLM's LayerIG at 6 steps split its 12 rows into two
# chunks; within 128 MiB they are one, as before (and as in Captum).
FIRST_CHUNK_PREFERENCE_FACTOR = 4
# Every chunk reads the model's weights again, once in its forward and once in its
# backward: a cost per chunk, whatever its rows, that larger chunks spread thinner. For
# a model whose weights are large beside a row's activations, the preferred size is
# raised to this many times the weight bytes a chunk's graph saved, up to
# WEIGHTS_RAISED_CHUNK_CAP. Measured here (one thread, medians of interleaved runs):
# MiniLM's LayerIG path, 41 MiB of saved weights and 10 MiB estimated per row, costs
# about 11 ms per chunk beyond its rows (0.7 rows of work); a plain chunked forward and
# backward of its 200 rows took 3.45 s in 8-row chunks (82 MiB, what 128 MiB gave),
# 3.24 s in 20, 3.21 s in 40 and 3.35 s in 100 (1 GiB). With this rule (28-row chunks)
# igfast's LayerIG at 50 and 16 steps took 0.947x and 0.940x the time of 8-row chunks;
# on a random GPT-2-small (471 MiB of weights, 32 tokens, 5-6 rows instead of 4) 0.968x.
# The small CNN and MLP (0.1 MiB of weights) and the encoder workload (12 MiB) keep the
# preferred size, where they are fastest.
CHUNK_BYTES_PER_WEIGHT_BYTE = 8
WEIGHTS_RAISED_CHUNK_CAP = 512 * 2**20


def preferred_chunk_bytes(device: torch.device, walk: bool = False) -> Optional[int]:
    """The chunk working memory that runs fastest on the device, before the model's
    weights are known (see raised_for_weights); None: no limit besides the budget (GPUs
    are fastest with the largest chunks that fit). ``walk``: for the passes of the exact
    walk (see CPU_PREFERRED_WALK_CHUNK_BYTES)."""
    if device.type != "cpu":
        return None
    return CPU_PREFERRED_WALK_CHUNK_BYTES if walk else CPU_PREFERRED_CHUNK_BYTES


def first_chunk_bytes(device: torch.device) -> Optional[int]:
    """The working memory of a first chunk under the automatic budget (see
    FIRST_CHUNK_PREFERENCE_FACTOR); None: no limit besides the budget (GPUs)."""
    return FIRST_CHUNK_PREFERENCE_FACTOR * CPU_PREFERRED_CHUNK_BYTES if device.type == "cpu" else None


def raised_for_weights(preferred: int, weight_bytes: int) -> int:
    """``preferred`` chunk bytes, raised for chunks that re-read ``weight_bytes`` of
    weights (see CHUNK_BYTES_PER_WEIGHT_BYTE), to WEIGHTS_RAISED_CHUNK_CAP at most."""
    return max(preferred, min(WEIGHTS_RAISED_CHUNK_CAP, CHUNK_BYTES_PER_WEIGHT_BYTE * weight_bytes))


def parse_memory_size(value: Union[int, float, str], argument: str = "memory_budget") -> int:
    """Bytes from an int, or a string such as "2GB", "512MiB", "1.5e9"."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex() and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool):
        raise ArgumentTypeError(f"`{argument}` must be a number of bytes or a size such as '2GB'; got {value!r}.")
    if isinstance(value, numbers.Real):  # Python or numpy numbers
        number, unit = float(value), ""
    elif isinstance(value, str) and _SIZE.match(value):
        text, unit = _SIZE.match(value).groups()
        number, unit = float(text), unit.lower()
    else:
        kind = ArgumentError if isinstance(value, str) else ArgumentTypeError
        raise kind(f"`{argument}` must be a number of bytes or a size such as '2GB' or '512MiB'; got {value!r}.")
    if not math.isfinite(number):
        raise ArgumentError(f"`{argument}` must be a finite number of bytes; got {value!r}.")
    if unit not in _UNITS:
        raise ArgumentError(
            f"`{argument}` has an unknown unit {unit!r}; use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB."
        )
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ArgumentError(f"`{argument}` must be positive; got {value!r}.")
    return size


def format_size(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(size) >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


# MemAvailable is read at most this often (reading /proc/meminfo costs about 50 us,
# a noticeable share of a small model's attribute() call); memory that changes within
# it is covered by the budget's share and the out-of-memory back-off.
AVAILABLE_MEMORY_REFRESH_SECONDS = 1.0
_available_memory: Tuple[float, Optional[int]] = (-float("inf"), None)


def _cpu_available_bytes() -> Optional[int]:
    global _available_memory
    read_at, available = _available_memory
    now = time.monotonic()
    if now - read_at > AVAILABLE_MEMORY_REFRESH_SECONDS:
        available = _read_cpu_available_bytes()
        _available_memory = (now, available)
    return available


def _read_cpu_available_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def cuda_allocator_counts(index: int) -> Tuple[int, int, int]:
    """(allocated, peak allocated, reserved) bytes of the caching allocator on a device,
    from one read of its statistics. torch.cuda.memory_allocated and its siblings each
    flatten the whole statistics table in Python: on the H200 machine two such calls per
    attribute took about a fifth of a small MLP's 1.6 ms call (cProfile of gpu_check)."""
    stats = torch.cuda.memory_stats_as_nested_dict(index)  # {} before CUDA is initialised

    def read(kind: str, which: str) -> int:
        return int(stats.get(kind, {}).get("all", {}).get(which, 0))

    return read("allocated_bytes", "current"), read("allocated_bytes", "peak"), read("reserved_bytes", "current")


def automatic_budget(device: torch.device) -> int:
    """The budget when none is given: a share of the memory free on the device."""
    if device.type == "cuda":
        index = _cuda_index(device)
        free, total = torch.cuda.mem_get_info(index)
        allocated, _, reserved = cuda_allocator_counts(index)
        # Blocks the caching allocator holds but does not use are free to us too.
        usable = free + reserved - allocated
        # torch.cuda.set_per_process_memory_fraction caps what this process may hold,
        # however much the device has free.
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        if fraction is not None:
            usable = min(usable, int(fraction(index) * total) - allocated)
        return max(0, int(AUTO_SHARE_CUDA * usable))
    available = _cpu_available_bytes()
    # Unknown platforms get a fixed 4 GiB: bounded, and enough for most models.
    return int(AUTO_SHARE_CPU * available) if available else 4 * 2**30


# The CUDA meters open now, outermost first: a meter that resets the device's peak
# statistics first hands the peak so far to the meters around it.
_open_cuda_meters: List["PeakMeter"] = []
# The estimating (CPU) meters open now in this thread, outermost first (see
# add_to_estimate): per thread, as the saved-tensor hooks they count through are (a walk
# in one thread charged its bytes to a chunk another thread was measuring).
class _OpenEstimates(threading.local):
    def __init__(self) -> None:
        self.meters: List["PeakMeter"] = []


_open_estimates = _OpenEstimates()


def add_to_estimate(nbytes: int) -> None:
    """Bytes a chunk's own code holds at its peak that autograd does not save (method=
    "exact"'s walk keeps float64 copies of every unit along the path): added to the
    innermost open estimating meter of this thread, if any. Measured meters (CUDA) see
    them anyway."""
    if _open_estimates.meters:
        _open_estimates.meters[-1].add_estimate(nbytes)


class PeakMeter:
    """Peak bytes allocated inside a ``with`` block, above the memory at its start.

    ``peak`` is set on exit; ``exact`` says whether it was measured (CUDA) or is the
    saved-tensor estimate (CPU and other devices), ``measured`` whether there is one (a
    caller who disabled saved-tensor hooks leaves the CPU meter blind). The estimating meter also sets
    ``weight_bytes``: the bytes of the parameters (``nn.Parameter``) the block's graph
    saved, which every chunk reads again (0 where not estimated, and for weights that
    no backward needs, such as an embedding table's). CUDA meters nest (the engine's
    per-chunk meters inside a benchmark's, say): each sees the peak of its own block.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self.exact = device.type == "cuda"
        self._saved_hooks = None
        self._saved = {}
        self._weights = {}
        self._unseen_bytes = 0
        self.weight_bytes = 0
        self.measured = True  # False: nothing was measured, peak says nothing

    def __enter__(self) -> "PeakMeter":
        if self.exact:
            # The caching allocator counts on the host, in launch order, so no
            # synchronisation is needed (and none stalls the chunks' pipeline).
            self.device = torch.device("cuda", _cuda_index(self.device))
            self._start, peak_so_far, _ = cuda_allocator_counts(self.device.index)
            for outer in _open_cuda_meters:
                if outer.device == self.device:
                    outer._hidden_peak = max(outer._hidden_peak, peak_so_far)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._hidden_peak = 0
            _open_cuda_meters.append(self)
            return self
        # A caller's own hooks (saved_tensors_hooks or save_on_cpu around attribute()) still
        # pack and unpack every saved tensor: PyTorch applies only the innermost pair, so
        # the meter's hands each tensor on to theirs (before, theirs were skipped in every
        # chunk the engine measured: a lossy pack gave other results than in the others).
        outer = _callers_saved_tensor_hooks()
        pack, unpack = (self._pack, _unpack) if outer is None else (_chained(self._pack, outer[0]), outer[1])
        hooks = torch.autograd.graph.saved_tensors_hooks(_outside_compiled_code(pack), unpack)
        try:
            hooks.__enter__()
        except RuntimeError:
            # The caller disabled saved-tensor hooks (disable_saved_tensors_hooks, which
            # raises its message at any push): this chunk runs unmeasured, as Captum runs.
            self.measured = False
            return self
        self._saved_hooks = hooks
        _open_estimates.meters.append(self)
        return self

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        # Trainable parameters and the path itself (leaves that require grad, and views
        # of them) exist before the forward: not its cost. Frozen parameters stay in
        # the estimate although they exist before it too: some ops (a CPU LSTM, a
        # convolution above one row) allocate weight-sized temporaries in every chunk
        # that no hook sees, and these bytes covered them (without them, a frozen LSTM
        # ran 6-12x over a small explicit budget).
        # A parameter's own bytes (not its storage's: it may be a view into a larger
        # buffer) are also kept apart as weight_bytes: each chunk reads them again.
        # A forward-mode zero tangent (a ZeroTensor, which BatchNorm's forward AD saves
        # when run along a path) has no storage and holds no memory.
        if not tensor._is_zerotensor() and tensor.device == self.device:
            base = tensor._base if tensor._base is not None else tensor
            if isinstance(base, torch.nn.Parameter):
                self._weights[base.data_ptr()] = base.numel() * base.element_size()
            if not (base.is_leaf and base.requires_grad):
                storage = tensor.untyped_storage()
                self._saved[storage.data_ptr()] = storage.nbytes()
        # Detached: the tensor itself, where an op saves its own output (ReLU, tanh), made
        # a cycle through C++ (output, its grad_fn, the saved variable, the output) that
        # no gc frees when that graph never runs backward, as a layer output that
        # LayerIG replaces: 4 tensors and the meter leaked per call. Autograd gives the
        # unpacked tensor its grad_fn back, so nothing is lost.
        return tensor.detach()

    def add_estimate(self, nbytes: int) -> None:
        """Tensors the estimate cannot see (the path and its gradient)."""
        if not self.exact:
            self._unseen_bytes += nbytes

    def __exit__(self, *exc) -> None:
        if self.exact:
            _open_cuda_meters.remove(self)
            self.peak = max(self._hidden_peak, cuda_allocator_counts(self.device.index)[1]) - self._start
            return
        if not self.measured:
            return
        _open_estimates.meters.remove(self)
        self._saved_hooks.__exit__(*exc)
        saved = sum(self._saved.values()) + self._unseen_bytes
        self.weight_bytes = sum(self._weights.values())
        self._saved.clear()  # drop the references to storages (data pointers only)
        self._weights.clear()
        self.peak = int(ESTIMATE_MARGIN * saved)


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _callers_saved_tensor_hooks() -> Optional[Tuple[Callable, Callable]]:
    """The (pack, unpack) saved-tensor hooks in force where the meter starts, or None.
    PyTorch has no public reader of them; without its private one (renamed in some
    later version) the meter's hooks replace the caller's in measured chunks, as they
    did before."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return None
    try:
        return top(False)
    except Exception:  # (another signature): as without the reader
        return None


def _chained(pack: Callable, outer_pack: Callable) -> Callable:
    def both(tensor: torch.Tensor):
        pack(tensor)
        return outer_pack(tensor)

    return both


def _outside_compiled_code(pack: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The meter's pack hook, kept out of torch.compile'd graphs (torch.compiler.disable):
    dynamo traced it into the forward of a model compiled in place (nn.Module.compile),
    and inductor failed on the hook's ``tensor._base`` (AttributeError: 'NoneType'
    object has no attribute 'is_leaf'), so every measured chunk of such a model raised
    (n_steps=4000 on 3 examples, a memory_budget that chunks, n_steps="auto", a smooth
    head's Gauss nodes under method="exact"). Run outside, it still sees what the
    compiled graph saves. Only where torch._dynamo is imported: without it nothing is
    compiled, and importing it takes about a second."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    if disable is None or "torch._dynamo" not in sys.modules:
        return pack
    return disable(pack)
