"""NoiseTunnel: SmoothGrad, SmoothGrad-squared and VarGrad over an attribution method.

Captum's NoiseTunnel runs the wrapped method once per batch of noise samples. For
igfast's IntegratedGradients and LayerIntegratedGradients, all noisy copies of
all examples form one batch instead, and that batch goes through the streaming
engine once: its chunks of (path nodes x noisy examples) are sized like any other,
so there is one pass over the path, not one per sample. Under a memory budget the
noisy copies and their attributions count too: each batch of samples then runs on
its own, in what the budget leaves beside the running sums (NoiseTunnel._run_each).

The noise is drawn exactly as Captum draws it (the same calls on the same random
generators, in the same order, partitioned by ``nt_samples_batch_size``), so with
the same seed both give the same attributions. Merging the batches keeps that true
only where the method's result depends on nothing but its rows. So, as in Captum,
each batch of samples is drawn and then run on its own, before the next is drawn:

- for another library's method (it may draw random numbers itself: GradientShap's
  baselines and noise come from the same generator as the samples);
- for a model whose outputs depend on the rows of the call or on random draws
  (BatchNorm or Dropout in training mode, an observer on: _train_mode), where one
  merged batch measured 0.04 and 0.06 from Captum on attributions of about 0.25.
"""

import numbers
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from ..chunking import budget_too_small
from ..dtypes import dtype_policy, integer_item
from ..errors import ArgumentError, ArgumentTypeError, RangeError, ShapeError, StdevTypeError
from ..memory import parse_memory_size
from ._captum_protocol import CaptumMembers, captum_bases
from ._forms import format_additional_forward_args, format_baselines, format_inputs
from ._target import normalize_target
from ._train_mode import depends_on_the_call
from .integrated_gradients import IntegratedGradients
from .layer_integrated_gradients import LayerIntegratedGradients

NT_TYPES = ("smoothgrad", "smoothgrad_sq", "vargrad")

# Drawing a batch of noisy copies holds this many tensors of its size at once: the
# standard deviations, the repeated inputs, the noise and their sum (Captum's draw).
NOISE_DRAW_COPIES = 4

# Methods whose attribute() streams any batch through the engine with bounded
# memory: they take all noise samples in one call.
_STREAMING_METHODS = (IntegratedGradients, LayerIntegratedGradients)


@dataclass(frozen=True)
class _Partition:
    """``samples`` noise samples of every example (Captum's batch of samples)."""

    samples: int
    baseline_rows: Optional[Tuple]  # per baseline, its drawn row for each noisy copy


class NoiseTunnel(CaptumMembers, *captum_bases("NoiseTunnel")):
    r"""Adds Gaussian noise to the inputs ``nt_samples`` times and combines the
    attributions of the noisy copies: their mean (``smoothgrad``), the mean of their
    squares (``smoothgrad_sq``) or their variance (``vargrad``). A drop-in for
    ``captum.attr.NoiseTunnel``.

    Args:
        attribution_method: an igfast IntegratedGradients or
            LayerIntegratedGradients (streamed in one pass), or any object with
            Captum's ``attribute`` interface (run once per batch of samples).
    """

    def __init__(self, attribution_method: Any) -> None:
        if not callable(getattr(attribution_method, "attribute", None)):
            raise ArgumentTypeError(
                "`attribution_method` must be an attribution object with an attribute() "
                f"method (e.g. igfast.IntegratedGradients); got {type(attribution_method).__name__}."
            )
        self.attribution_method = attribution_method
        # Captum's attribute, read by code written for it: whether the method is a
        # gradient one (igfast's are; Captum's GradientAttribution where importable).
        self.is_gradient_method = isinstance(
            attribution_method, (IntegratedGradients, LayerIntegratedGradients, *captum_bases("GradientAttribution")))
        self.is_delta_supported = attribution_method.has_convergence_delta()
        self._multiply_by_inputs = attribution_method.multiplies_by_inputs
        self.forward_func = attribution_method.forward_func

    @property
    def multiplies_by_inputs(self) -> bool:
        return self._multiply_by_inputs

    def has_convergence_delta(self) -> bool:
        """Whether the wrapped method can return the convergence delta (Captum's protocol)."""
        return self.is_delta_supported

    def attribute(
        self,
        inputs: Union[torch.Tensor, Tuple[torch.Tensor, ...]],
        nt_type: str = "smoothgrad",
        nt_samples: int = 5,
        nt_samples_batch_size: Optional[int] = None,
        stdevs: Union[float, Tuple[float, ...]] = 1.0,
        draw_baseline_from_distrib: bool = False,
        **kwargs: Any,
    ):
        r"""Smoothed attributions of ``inputs``.

        Args:
            inputs (Tensor or tuple[Tensor, ...]): the inputs, dim 0 indexing examples (as
                for IntegratedGradients).
            nt_type (str, optional): ``smoothgrad``, ``smoothgrad_sq`` or ``vargrad``.
            nt_samples (int, optional): noisy copies per example. Default: 5.
            nt_samples_batch_size (int, optional): how many samples Captum draws (and
                runs) together; igfast draws the noise in the same groups, so that the
                random numbers match, and streams all samples in one pass unless the
                model depends on the call's rows or draws random numbers (then one
                call per group, as in Captum). Default: all samples together.
            stdevs (float or tuple of floats, optional): standard deviation of the
                noise, one for all inputs or one per input. Default: 1.0.
            draw_baseline_from_distrib (bool, optional): draw each noisy copy's
                baseline at random from the rows of ``baselines`` (numpy's global
                random generator, as in Captum). Default: False.
            **kwargs: passed to the wrapped method's attribute() (target, baselines,
                n_steps, return_convergence_delta, memory_budget, ...).

        Returns:
            attributions in the wrapped method's form; with
            ``return_convergence_delta``, ``(attributions, delta)`` where delta has
            one value per noisy copy (nt_samples x examples).
        """
        formatted, is_tuple = format_inputs(inputs)
        _check_nt_type(nt_type)
        if kwargs.get("targets") is not None or isinstance(kwargs.get("target"), str):
            raise ArgumentError(
                "NoiseTunnel smooths one target per call: pass `target` as in Captum (an int, "
                "tuple, list or tensor), not `targets` or 'all'/'topk:k'; call it once per target."
            )
        if kwargs.get("return_adaptive_info"):
            raise ArgumentError(
                "NoiseTunnel does not return `return_adaptive_info`: with n_steps='auto' each "
                "noisy copy is refined on its own; read the wrapped method's "
                "last_integral.info (one entry per copy) instead."
            )
        nt_samples = _positive_int(nt_samples, "nt_samples")
        group = nt_samples if nt_samples_batch_size is None else min(
            nt_samples, _positive_int(nt_samples_batch_size, "nt_samples_batch_size")
        )
        stdev_per_input = _stdevs(stdevs, len(formatted))
        with_delta = bool(kwargs.get("return_convergence_delta", False)) and self.is_delta_supported
        batch_size = formatted[0].shape[0]
        # Checked against the caller's batch before the noisy copies multiply it, so that
        # an error names the sizes the caller gave (3 examples, not 15 noisy rows).
        normalize_target(kwargs.get("target"), batch_size, formatted[0].device)
        if not draw_baseline_from_distrib and kwargs.get("baselines") is not None:
            format_baselines(kwargs["baselines"], formatted)
        elif kwargs.get("baselines") is not None:
            _check_distribution_rows(kwargs["baselines"], formatted)

        drawn = self._draw(formatted, group, nt_samples, stdev_per_input, draw_baseline_from_distrib, kwargs)
        budget = kwargs.get("memory_budget")
        runs: Optional[Iterator] = None
        if self._streams_all_samples() and budget is None:
            partitions, parts = zip(*drawn)
            noisy = tuple(torch.cat(tensors) if len(tensors) > 1 else tensors[0] for tensors in zip(*parts))
            runs = iter([(self._run(noisy, list(partitions), kwargs, is_tuple), list(partitions))])

        moments = _Moments()
        deltas = []
        if runs is None:  # (under a budget: each batch of samples summed, and let go, before the next is drawn)
            runs = self._run_each(drawn, kwargs, is_tuple, budget, formatted, moments)
        for result, group_partitions in runs:
            attributions, delta = result if with_delta else (result, None)
            flat, structure = _flatten(attributions)
            # (igfast's result is its own, but without multiply_by_inputs it is the integral's
            # sums, which last_integral keeps)
            owned = self._streams_all_samples() and self.attribution_method.multiplies_by_inputs
            moments.add(flat, group_partitions, batch_size, owned=owned)
            if delta is not None:
                deltas.append(delta)
            del result, attributions, flat  # (before the next batch of samples is drawn)
        sums, squares = moments.sums, moments.squares
        means = [total / nt_samples for total in sums]
        mean_squares = [total / nt_samples for total in squares]
        if nt_type == "smoothgrad":
            smoothed = means
        elif nt_type == "smoothgrad_sq":
            smoothed = mean_squares
        else:
            smoothed = [sq - mean * mean for mean, sq in zip(means, mean_squares)]
        output = _unflatten(smoothed, structure)
        if with_delta:
            return output, torch.cat(deltas, dim=0)
        return output

    def _run_each(self, drawn, kwargs: Dict[str, Any], is_tuple: bool, budget: Any,
                  inputs: Tuple[torch.Tensor, ...], moments: "_Moments") -> Iterator[Tuple[Any, List[_Partition]]]:
        """Each batch of samples on its own, drawn after the last one ran (as in Captum).
        Under a memory budget (which merging every sample would break: 40 samples of 16
        CIFAR images at 3.9x 8 MiB), each call gets what the budget leaves beside the
        running sums (before the first call, estimated from the inputs: a layer's are
        known once its attributions are) and this batch's noisy copies."""
        estimated_sums = 2 * sum(x.numel() * dtype_policy(x.dtype).accumulate.itemsize for x in inputs)
        for partition, part in drawn:
            if budget is not None:
                held_sums = moments.nbytes if moments.sums is not None else estimated_sums
                total = parse_memory_size(budget)
                noisy_bytes = sum(x.numel() * x.element_size() for x in part)
                # Drawing a batch of copies holds NOISE_DRAW_COPIES of it at once; the call
                # runs beside the copies and, after it, the new sums of its attributions.
                if held_sums + NOISE_DRAW_COPIES * noisy_bytes > total:
                    raise budget_too_small(
                        "memory_budget", total, held_sums + NOISE_DRAW_COPIES * noisy_bytes, measured=False,
                        what=f"the sums of the noisy copies' attributions and drawing a batch of {partition.samples} "
                             "noisy copies of every example (give a smaller nt_samples_batch_size)",
                        beside_rows=False)
                kwargs = {**kwargs, "memory_budget": total - held_sums - 2 * noisy_bytes}
            if not self._streams_all_samples():
                # Gradient methods of other libraries expect inputs that require grad.
                part = tuple(x.detach().requires_grad_(x.is_floating_point()) for x in part)
            try:
                result = self._run(part, [partition], kwargs, is_tuple)
            except ArgumentError as error:
                needed = getattr(error, "needed_bytes", None)
                if budget is None or needed is None:
                    raise
                # (The call was refused the budget left to it: the caller's is restated.)
                raise budget_too_small(
                    "memory_budget", total, needed + held_sums + 2 * noisy_bytes, measured=True,
                    what=f"{error.needed_for}, beside a batch of {partition.samples} noisy copies of every example "
                         "and the sums of their attributions (give a smaller nt_samples_batch_size)",
                    beside_rows=False) from None
            del part
            yield result, [partition]
            del result

    def _streams_all_samples(self) -> bool:
        """Whether all samples may run as one batch (see the module docstring)."""
        return isinstance(self.attribution_method, _STREAMING_METHODS) and not depends_on_the_call(self.forward_func)

    def _draw(
        self,
        inputs: Tuple[torch.Tensor, ...],
        group: int,
        nt_samples: int,
        stdevs: Tuple[Union[float, torch.Tensor], ...],
        draw_baseline: bool,
        kwargs: Dict[str, Any],
    ) -> Iterator[Tuple[_Partition, Tuple[torch.Tensor, ...]]]:
        """The noisy copies of all examples, partition by partition (drawn when the
        caller asks for the partition), with Captum's calls in Captum's order: per
        partition, one torch.normal per input; baseline indices (numpy) once for all
        full partitions and once for the rest."""
        batch_size = inputs[0].shape[0]
        full, remainder = divmod(nt_samples, group)
        sizes = [group] * full + ([remainder] if remainder else [])
        shared_rows = self._baseline_rows(group, batch_size, kwargs) if draw_baseline else None
        for number, samples in enumerate(sizes):
            with torch.no_grad():
                noisy = tuple(_add_noise(x, stdev, samples) for x, stdev in zip(inputs, stdevs))
            if draw_baseline and number == full:  # the remainder draws its own indices
                rows = self._baseline_rows(samples, batch_size, kwargs)
            else:
                rows = shared_rows
            yield _Partition(samples, rows), noisy

    @staticmethod
    def _baseline_rows(samples: int, batch_size: int, kwargs: Dict[str, Any]) -> Optional[Tuple]:
        """Per baseline tensor, the row drawn for each noisy copy (one numpy draw per
        tensor, in order, as Captum); None for numbers."""
        baselines = kwargs.get("baselines")
        if baselines is None:
            return None
        as_tuple = baselines if isinstance(baselines, tuple) else (baselines,)
        return tuple(
            np.random.choice(b.shape[0], samples * batch_size).tolist()
            if isinstance(b, torch.Tensor) and b.dim() > 0 else None
            for b in as_tuple
        )

    def _run(
        self,
        noisy: Tuple[torch.Tensor, ...],
        partitions: List[_Partition],
        kwargs: Dict[str, Any],
        is_tuple: bool,
    ):
        """The wrapped method on the noisy rows of ``partitions``, with baselines,
        targets and additional arguments expanded to those rows."""
        batch_size = noisy[0].shape[0] // sum(p.samples for p in partitions)
        expanded = dict(kwargs)
        if "target" in kwargs:
            expanded["target"] = _expand_target(kwargs["target"], partitions)
        if "additional_forward_args" in kwargs:
            expanded["additional_forward_args"] = _expand_args(
                kwargs["additional_forward_args"], partitions
            )
        if "baselines" in kwargs:
            expanded["baselines"] = _expand_baselines(kwargs["baselines"], partitions, batch_size)
        method = self.attribution_method
        inputs = noisy if is_tuple else noisy[0]
        attribute = getattr(type(method).attribute, "__wrapped__", None)
        if attribute is not None:  # skip Captum's usage-logging decorator, as Captum does
            return attribute(method, inputs, **expanded)
        return method.attribute(inputs, **expanded)

    def attribute_future(self) -> None:
        """Not implemented, as in Captum."""
        raise NotImplementedError("attribute_future is not implemented for NoiseTunnel")


class _Moments:
    """The running sums of the noisy copies' attributions and of their squares, one per
    attribution tensor."""

    def __init__(self) -> None:
        self.sums: Optional[List[torch.Tensor]] = None
        self.squares: Optional[List[torch.Tensor]] = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*(self.sums or ()), *(self.squares or ())))

    def add(self, flat: List[torch.Tensor], partitions: List[_Partition], batch_size: int, owned: bool) -> None:
        """Add the attributions of one call (``flat``, the rows of ``partitions``).
        ``owned``: igfast's own result, squared in place (no copy of its size)."""
        if self.sums is None or self.squares is None:
            self.sums, self.squares = [None] * len(flat), [None] * len(flat)
        begin = 0
        for partition in partitions:
            rows = partition.samples * batch_size
            for index, attribution in enumerate(flat):
                # (examples, samples, ...): the noisy copies of an example are adjacent.
                part = attribution[begin:begin + rows].reshape(
                    (batch_size, partition.samples) + tuple(attribution.shape[1:]))
                part_sum = part.sum(dim=1)
                part_squares = (part.square_() if owned else torch.pow(part, 2)).sum(dim=1)
                self.sums[index] = part_sum if self.sums[index] is None else self.sums[index].add_(part_sum)
                self.squares[index] = (part_squares if self.squares[index] is None
                                       else self.squares[index].add_(part_squares))
            begin += rows


def _check_nt_type(nt_type: Any) -> None:
    if nt_type not in NT_TYPES:
        raise ArgumentError(
            f"`nt_type` must be one of {', '.join(NT_TYPES)}; got {nt_type!r}."
        )


def _positive_int(value: Any, name: str) -> int:
    value = integer_item(value, any_shape=True)  # Captum counts with torch.tensor([3]) as with 3
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"`{name}` must be an integer >= 1; got {value!r}.")
    if value < 1:
        raise RangeError(f"`{name}` must be an integer >= 1; got {value!r}.")
    return int(value)


def _stdevs(stdevs: Any, count: int) -> Tuple[Union[float, torch.Tensor], ...]:
    def one(value: Any, name: str) -> float:
        if (isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool
                and not value.dtype.is_complex):
            if value.dtype.is_floating_point:
                # Captum draws with a one-element tensor in the tensor's dtype (float16,
                # float64: other random streams than a Python float's): kept as it is.
                if float(value) < 0:
                    raise RangeError(f"`{name}` must be a number >= 0; got {value!r}.")
                return value.detach().reshape(())
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise StdevTypeError(f"`{name}` must be a number >= 0 (or a one-element tensor); got {value!r}.")
        if value < 0:
            raise RangeError(f"`{name}` must be a number >= 0; got {value!r}.")
        # A numpy float keeps its type: Captum draws the noise in its dtype (float64 for
        # a numpy.float64), a different random stream from a Python float's.
        return value if isinstance(value, np.floating) else float(value)

    if isinstance(stdevs, tuple):
        if len(stdevs) != count:
            raise ArgumentError(
                f"`stdevs` must give one value per input tensor: got {len(stdevs)} for {count} inputs."
            )
        return tuple(one(s, f"stdevs[{i}]") for i, s in enumerate(stdevs))
    return (one(stdevs, "stdevs"),) * count


def _add_noise(x: torch.Tensor, stdev: Union[float, torch.Tensor], samples: int) -> torch.Tensor:
    """``samples`` noisy copies of each row, adjacent; the draw is Captum's (a
    normal with a tensor of standard deviations: the default dtype for a Python
    float, a numpy float's own dtype). The copies have the dtype x plus noise of the
    default dtype has: a numpy.float64 does not turn float32 inputs into float64 ones
    (Captum's do, and then a float32 model fails)."""
    size = (x.shape[0] * samples,) + tuple(x.shape[1:])
    spread = torch.as_tensor(stdev, device=x.device).repeat(size)
    noisy = x.repeat_interleave(samples, dim=0) + torch.normal(0, spread)
    return noisy.to(torch.promote_types(x.dtype, torch.get_default_dtype()))


def _expand_target(target: Any, partitions: List[_Partition]) -> Any:
    """Per-example targets, each repeated for its noisy copies, partition by partition."""
    if isinstance(target, list):
        return [t for p in partitions for t in target for _ in range(p.samples)]
    if isinstance(target, torch.Tensor) and target.numel() > 1:
        return torch.cat([target.repeat_interleave(p.samples, dim=0) for p in partitions])
    return target


def _expand_args(args: Any, partitions: List[_Partition]) -> Any:
    formatted = format_additional_forward_args(args)
    if formatted is None:
        return None
    return tuple(
        torch.cat([a.repeat_interleave(p.samples, dim=0) for p in partitions])
        if isinstance(a, torch.Tensor) and a.dim() > 0 else a
        for a in formatted
    )


def _check_distribution_rows(baselines: Any, inputs: Tuple[torch.Tensor, ...]) -> None:
    """Baselines to draw from (draw_baseline_from_distrib) are rows, each shaped like a
    row of its input: checked here, so that an error names the shapes the caller gave,
    not those of the noisy rows drawn from them."""
    given = baselines if isinstance(baselines, tuple) else (baselines,)
    for index, (baseline, x) in enumerate(zip(given, inputs)):
        if isinstance(baseline, torch.Tensor) and baseline.dim() > 0 and baseline.shape[1:] != x.shape[1:]:
            name = f"baselines[{index}]" if len(inputs) > 1 else "baselines"
            raise ShapeError(
                f"`{name}` with draw_baseline_from_distrib=True is a set of rows to draw from, each "
                f"shaped like a row of the input, {tuple(x.shape[1:])}; got rows of shape "
                f"{tuple(baseline.shape[1:])} (`{name}` of shape {tuple(baseline.shape)}).")


def _expand_baselines(baselines: Any, partitions: List[_Partition], batch_size: int) -> Any:
    """Per-example baselines follow their noisy copies; drawn baselines take the
    drawn rows; broadcast ones (one row, or numbers) stay as they are."""
    if baselines is None:
        return None
    as_tuple = baselines if isinstance(baselines, tuple) else (baselines,)
    expanded = []
    for index, baseline in enumerate(as_tuple):
        if not isinstance(baseline, torch.Tensor) or baseline.dim() == 0:
            expanded.append(baseline)
        elif partitions[0].baseline_rows is not None:
            expanded.append(torch.cat([baseline[p.baseline_rows[index]] for p in partitions]))
        elif baseline.shape[0] == batch_size and batch_size > 1:
            expanded.append(torch.cat([baseline.repeat_interleave(p.samples, dim=0) for p in partitions]))
        else:
            expanded.append(baseline)
    return tuple(expanded) if isinstance(baselines, tuple) else expanded[0]


def _flatten(attributions: Any) -> Tuple[List[torch.Tensor], Any]:
    """Tensors of a result (tensor, tuple, or a list of those for several layers),
    and the structure to rebuild it."""
    if isinstance(attributions, torch.Tensor):
        return [attributions], None
    if isinstance(attributions, tuple):
        return list(attributions), len(attributions)
    flat, structure = [], []
    for item in attributions:
        tensors, inner = _flatten(item)
        flat.extend(tensors)
        structure.append((len(tensors), inner))
    return flat, structure


def _unflatten(tensors: List[torch.Tensor], structure: Any) -> Any:
    if structure is None:
        return tensors[0]
    if isinstance(structure, int):
        return tuple(tensors)
    items, begin = [], 0
    for count, inner in structure:
        items.append(_unflatten(tensors[begin:begin + count], inner))
        begin += count
    return items
