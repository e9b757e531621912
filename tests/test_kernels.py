"""The compiled ops against the pure-PyTorch reference (and a float64 oracle), on
every device and dtype; opcheck, torch.compile, autograd, errors, empty inputs.

Skipped where the extension was not built (CI builds it and checks that it did).
"""

import math
import os
import re
import signal
import subprocess
import sys
import zlib

import pytest
import torch

import igfast
from igfast import ops, reference
from igfast.dtypes import dtype_policy
from igfast.quadrature import alphas_and_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPE_IDS = ["float32", "float64", "float16", "bfloat16"]


def require_kernels(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not ops.kernels_available(device):
        pytest.skip(f"kernels not built for {device}: {ops.why_not_kernels(device)}")


def generator_for(*parts):
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def randn(shape, dtype, device, generator):
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).to(device)


def assert_matches_reference(kernel, ref, oracle, dtype):
    """float32 within 1e-6 relative, float64 within 1e-12; half types: error against
    the float64 oracle at most twice the reference's error in the same dtype, plus two
    roundings of the output's dtype at the result's scale. That floor is for a reference
    that happens to land nearer the oracle than one rounding: on the H200 a float32
    accumulator of bfloat16 gradients was 1.2e-7 off where the reference was 4e-8 off
    (the CUDA kernel fuses multiply and add), while an accumulator that lost precision
    to the half type would be off by about 1e-2."""
    assert kernel.dtype == ref.dtype and kernel.shape == ref.shape
    assert torch.isfinite(kernel).all()
    if kernel.numel() == 0:
        return
    if dtype in (torch.float32, torch.float64):
        rtol = 1e-6 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(kernel, ref, rtol=rtol, atol=rtol * ref.abs().max().item())
    else:
        kernel_error = (kernel.double() - oracle).abs().max().item()
        ref_error = (ref.double() - oracle).abs().max().item()
        rounding = torch.finfo(kernel.dtype).eps * oracle.abs().max().item()
        assert kernel_error <= 2 * ref_error + 2 * rounding + 1e-12, (kernel_error, ref_error, rounding)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("broadcast", [False, True], ids=["full_baseline", "broadcast_baseline"])
# Shapes cover short rows (broadcast baselines expanded), long rows (read in place),
# and blocks of 32768 elements that end in the middle of an example.
@pytest.mark.parametrize("shape, chunk", [((4, 5), (0, 7)), ((3, 2, 33), (2, 5)), ((2, 3, 64, 64), (6, 7)),
                                          ((5, 8), (3, 3)), ((5, 10000), (1, 4)), ((40, 1000), (4, 6))])
def test_interpolate_path(device, dtype, broadcast, shape, chunk):
    require_kernels(device)
    g = generator_for("interpolate", str(dtype), broadcast, shape, chunk)
    x = randn(shape, dtype, device, g)
    b = randn((1 if broadcast else shape[0],) + shape[1:], dtype, device, g)
    alphas = alphas_and_weights("gausslegendre", 7)[0].to(device)
    kernel = torch.ops.igfast.interpolate_path(x, b, alphas, *chunk)
    ref = reference.interpolate_path(x, b, alphas, *chunk)
    steps = chunk[1] - chunk[0]
    a = alphas[chunk[0]:chunk[1]].view((steps,) + (1,) * x.dim())
    oracle = (b.double() + a * (x.double() - b.double())).reshape(ref.shape)
    assert_matches_reference(kernel, ref, oracle, dtype)
    # Bit for bit Captum's points, baseline + alpha * (input - baseline) as two rounded ops
    # (a fused multiply-add put a point Captum rounds to 0, or to a clamp's bound, 1 ulp off).
    captums = torch.cat([b + alpha * (x - b) for alpha in alphas[chunk[0]:chunk[1]].tolist()]) if steps else ref
    assert torch.equal(ref, captums) and torch.equal(kernel, captums)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "offset"])
def test_interpolate_path_into_writes_every_element(device, dtype, aligned):
    """Into a NaN-poisoned buffer; an offset of one element puts the tensors off the
    16-byte boundary, so the CUDA kernel takes its one-element path instead of packs."""
    require_kernels(device)
    g = generator_for("into", str(dtype), aligned)
    offset = 0 if aligned else 1
    x = randn((5 * 48 + offset,), dtype, device, g)[offset:].view(5, 3, 16)
    b = randn((48 + offset,), dtype, device, g)[offset:].view(1, 3, 16)
    alphas = torch.rand(9, generator=g, dtype=torch.float64).to(device)
    storage = torch.full((4 * 5 * 48 + offset,), float("nan"), dtype=dtype, device=device)
    out = storage[offset:].view(20, 3, 16)
    torch.ops.igfast.interpolate_path_into(out, x, b, alphas, 2, 6)
    ref = reference.interpolate_path(x, b, alphas, 2, 6)
    a = alphas[2:6].view(4, 1, 1, 1)
    oracle = (b.double() + a * (x.double() - b.double())).reshape(ref.shape)
    assert_matches_reference(out, ref, oracle, dtype)
    assert storage[:offset].isnan().all()  # nothing written outside `out`


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_accumulate_steps_off_the_16_byte_boundary(device, dtype):
    require_kernels(device)
    g = generator_for("accumulate-offset", str(dtype))
    grads = randn((3 * 4 * 24 + 1,), dtype, device, g)[1:].view(12, 24)
    weights = torch.rand(3, generator=g, dtype=torch.float64).to(device)
    start = randn((4, 24), dtype_policy(dtype).accumulate, device, g)
    kernel, ref = start.clone(), start.clone()
    torch.ops.igfast.accumulate_steps(kernel, grads, weights)
    reference.accumulate_steps(ref, grads, weights)
    oracle = start.double() + (weights.view(3, 1, 1) * grads.double().view(3, 4, 24)).sum(0)
    assert_matches_reference(kernel, ref, oracle, dtype)


@pytest.mark.cuda
def test_cuda_grid_stride_loops_cover_more_than_one_grid():
    """More work items than the largest grid (65535 blocks x 256 threads) of the
    one-element kernels: every element still written and summed."""
    require_kernels("cuda")
    g = generator_for("grid-stride")
    features = 65535 * 256 + 7  # odd: the one-element kernels
    x = randn((1, features), torch.float32, "cuda", g)
    b = randn((1, features), torch.float32, "cuda", g)
    alphas = torch.rand(3, generator=g, dtype=torch.float64).to("cuda")
    path = torch.full((2, features), float("nan"), device="cuda")
    torch.ops.igfast.interpolate_path_into(path, x, b, alphas, 1, 3)
    torch.testing.assert_close(path, reference.interpolate_path(x, b, alphas, 1, 3), rtol=1e-6, atol=1e-6)
    accumulator = torch.zeros(1, features, device="cuda")
    torch.ops.igfast.accumulate_steps(accumulator, path, alphas[:2])
    expected = torch.zeros(1, features, device="cuda")
    reference.accumulate_steps(expected, path, alphas[:2])
    torch.testing.assert_close(accumulator, expected, rtol=1e-6, atol=1e-6)
    scaled = torch.ops.igfast.scale_by_difference(accumulator, x, b)
    torch.testing.assert_close(scaled, reference.scale_by_difference(accumulator, x, b), rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
def test_cuda_kernels_run_on_the_current_stream_and_device():
    """Work launched on a side stream is ordered with that stream's other work."""
    require_kernels("cuda")
    g = generator_for("stream")
    x = randn((64, 4096), torch.float32, "cuda", g)
    b = randn((1, 4096), torch.float32, "cuda", g)
    alphas = torch.rand(8, generator=g, dtype=torch.float64).to("cuda")
    expected = reference.interpolate_path(x, b, alphas, 0, 8)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = torch.full_like(expected, float("nan"))
        for _ in range(3):  # later launches find the buffer written by earlier ones
            torch.ops.igfast.interpolate_path_into(out, x, b, alphas, 0, 8)
            accumulator = torch.zeros_like(x)
            torch.ops.igfast.accumulate_steps(accumulator, out, torch.ones(8, device="cuda"))
        total = accumulator.clone()
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(total, expected.view(8, 64, 4096).sum(0), rtol=1e-5, atol=1e-4)


def test_cpu_kernels_on_several_threads():
    """Tasks split over threads (at::parallel_for) give the single-thread result."""
    require_kernels("cpu")
    g = generator_for("threads")
    x = torch.randn(16, 3, 40, 40, generator=g)
    b = torch.randn(1, 3, 40, 40, generator=g)
    alphas = torch.rand(20, generator=g, dtype=torch.float64)
    grads = torch.randn(20 * 16, 3, 40, 40, generator=g)
    start = torch.randn(16, 3, 40, 40, generator=g)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        accumulator = start.clone()
        torch.ops.igfast.accumulate_steps(accumulator, grads, alphas)
        results.append((torch.ops.igfast.interpolate_path(x, b, alphas, 3, 17), accumulator,
                        torch.ops.igfast.scale_by_difference(accumulator, x, b)))
    for single, multi in zip(*results):
        assert torch.equal(single, multi)
    reference_accumulator = start.clone()
    reference.accumulate_steps(reference_accumulator, grads, alphas)
    torch.testing.assert_close(results[1][1], reference_accumulator, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_interpolate_path_non_contiguous(device):
    require_kernels(device)
    g = generator_for("non-contiguous")
    x = randn((6, 5, 4), torch.float32, device, g).transpose(1, 2)
    b = randn((6, 5, 4), torch.float32, device, g).transpose(1, 2)[:1]
    alphas = torch.rand(9, generator=g, dtype=torch.float64).to(device)
    torch.testing.assert_close(
        torch.ops.igfast.interpolate_path(x, b, alphas, 1, 8),
        reference.interpolate_path(x, b, alphas, 1, 8), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("steps, shape", [(1, (3, 4)), (7, (4, 3, 10)), (50, (2, 4100)), (3, (5, 1))])
def test_accumulate_steps(device, dtype, steps, shape):
    require_kernels(device)
    g = generator_for("accumulate", str(dtype), steps, shape)
    accumulate = dtype_policy(dtype).accumulate
    grads = randn((steps * shape[0],) + shape[1:], dtype, device, g)
    weights = torch.rand(steps, generator=g, dtype=torch.float64).to(device)
    # The accumulator starts from random values (not zeros): they must be kept and added to.
    start = randn(shape, accumulate, device, g)
    kernel, ref = start.clone(), start.clone()
    torch.ops.igfast.accumulate_steps(kernel, grads, weights)
    reference.accumulate_steps(ref, grads, weights)
    oracle = start.double() + (weights.view((steps,) + (1,) * len(shape)) * grads.double().view((steps,) + shape)).sum(0)
    assert_matches_reference(kernel, ref, oracle, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_accumulate_steps_sums_ten_thousand_steps_without_drift(device, backend):
    """riemann_left's 10,000 weights of 1/n on float32 gradients near 1: a running
    float32 sum drifted by about 1e-4 (6.9e-5 relative on a Linear model, against
    Captum's 1.1e-7). Each chunk's steps are now summed in float64 and added to the
    float32 accumulator once: a few roundings of float32 in all."""
    if backend == "kernel":
        require_kernels(device)
    elif device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    g = generator_for("drift", device, backend)
    steps, examples = 10000, 3
    grads = (1 + 0.1 * torch.rand(steps * examples, 64, generator=g)).to(device)
    _, weights = alphas_and_weights("riemann_left", steps)
    weights = weights.to(device)
    accumulator = torch.zeros(examples, 64, device=device)
    accumulate = torch.ops.igfast.accumulate_steps if backend == "kernel" else reference.accumulate_steps
    # In chunks, as the engine calls it: 7 steps (no group of 16), then 4096, then the rest.
    for begin, end in [(0, 7), (7, 4103), (4103, steps)]:
        accumulate(accumulator, grads[begin * examples:end * examples], weights[begin:end])
    # The oracle multiplies by the float32 weights, as both do (and Captum's step sizes).
    oracle = (grads.double().view(steps, examples, 64) * weights.float().double().view(steps, 1, 1)).sum(0)
    error = ((accumulator.double() - oracle).abs().max() / oracle.abs().max()).item()
    assert error < 3e-7, error


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("broadcast", [False, True], ids=["full_baseline", "broadcast_baseline"])
def test_scale_by_difference(device, dtype, broadcast):
    require_kernels(device)
    g = generator_for("scale", str(dtype), broadcast)
    x = randn((4, 3, 7), dtype, device, g)
    b = randn((1 if broadcast else 4, 3, 7), dtype, device, g)
    accumulator = randn((4, 3, 7), dtype_policy(dtype).accumulate, device, g)
    kernel = torch.ops.igfast.scale_by_difference(accumulator, x, b)
    ref = reference.scale_by_difference(accumulator, x, b)
    oracle = accumulator.double() * (x.double() - b.double())
    assert_matches_reference(kernel, ref, oracle, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs_give_empty_results(device):
    require_kernels(device)
    alphas = torch.rand(4, dtype=torch.float64, device=device)
    empty = torch.randn(0, 3, device=device)
    assert torch.ops.igfast.interpolate_path(empty, empty[:0], alphas, 0, 4).shape == (0, 3)
    x = torch.randn(2, 3, device=device)
    assert torch.ops.igfast.interpolate_path(x, x, alphas, 2, 2).shape == (0, 3)
    accumulator = torch.randn(0, 3, device=device)
    torch.ops.igfast.accumulate_steps(accumulator, torch.randn(0, 3, device=device), alphas)
    assert torch.ops.igfast.scale_by_difference(accumulator, empty, empty[:0]).shape == (0, 3)


BAD_CALLS = [
    ("inputs_integer", lambda d: torch.ops.igfast.interpolate_path(torch.ones(2, 3, dtype=torch.int64, device=d), torch.ones(2, 3, dtype=torch.int64, device=d), torch.rand(4, device=d), 0, 4), "inputs"),
    ("baselines_dtype", lambda d: torch.ops.igfast.interpolate_path(torch.rand(2, 3, device=d), torch.rand(2, 3, dtype=torch.float64, device=d), torch.rand(4, device=d), 0, 4), "baselines"),
    ("baselines_shape", lambda d: torch.ops.igfast.interpolate_path(torch.rand(2, 3, device=d), torch.rand(2, 4, device=d), torch.rand(4, device=d), 0, 4), "baselines"),
    ("baselines_rows", lambda d: torch.ops.igfast.interpolate_path(torch.rand(4, 3, device=d), torch.rand(2, 3, device=d), torch.rand(4, device=d), 0, 4), "baselines"),
    ("alphas_2d", lambda d: torch.ops.igfast.interpolate_path(torch.rand(2, 3, device=d), torch.rand(2, 3, device=d), torch.rand(4, 1, device=d), 0, 4), "alphas"),
    ("chunk_out_of_range", lambda d: torch.ops.igfast.interpolate_path(torch.rand(2, 3, device=d), torch.rand(2, 3, device=d), torch.rand(4, device=d), 2, 5), "chunk"),
    ("chunk_reversed", lambda d: torch.ops.igfast.interpolate_path(torch.rand(2, 3, device=d), torch.rand(2, 3, device=d), torch.rand(4, device=d), 3, 1), "chunk"),
    ("grads_rows", lambda d: torch.ops.igfast.accumulate_steps(torch.zeros(2, 3, device=d), torch.rand(5, 3, device=d), torch.rand(2, device=d)), "grads"),
    ("grads_complex", lambda d: torch.ops.igfast.accumulate_steps(torch.zeros(2, 3, device=d), torch.rand(4, 3, dtype=torch.complex64, device=d), torch.rand(2, device=d)), "grads"),
    ("accumulator_dtype", lambda d: torch.ops.igfast.accumulate_steps(torch.zeros(2, 3, dtype=torch.float64, device=d), torch.rand(4, 3, device=d), torch.rand(2, device=d)), "accumulator"),
    ("accumulator_non_contiguous", lambda d: torch.ops.igfast.accumulate_steps(torch.zeros(3, 2, device=d).t(), torch.rand(4, 3, device=d), torch.rand(2, device=d)), "contiguous"),
    ("weights_2d", lambda d: torch.ops.igfast.accumulate_steps(torch.zeros(2, 3, device=d), torch.rand(4, 3, device=d), torch.rand(2, 1, device=d)), "weights"),
    ("scale_shape", lambda d: torch.ops.igfast.scale_by_difference(torch.zeros(2, 4, device=d), torch.rand(2, 3, device=d), torch.rand(2, 3, device=d)), "accumulator"),
]


# Bad only when `d` is a GPU.
DEVICE_MIXING_CALLS = [
    ("baselines_on_the_cpu", lambda d: torch.ops.igfast.interpolate_path(torch.rand(2, 3, device=d), torch.rand(2, 3), torch.rand(4, device=d), 0, 4), "same device"),
]


def raise_bad_call(name, device):
    """Make the bad call ``name`` in this process; exit 0 when it raised RuntimeError."""
    call = next(c[1] for c in BAD_CALLS + DEVICE_MIXING_CALLS if c[0] == name)
    try:
        call(device)
    except RuntimeError as error:
        print("raised RuntimeError:", error)
        sys.exit(0)
    print("no error raised")
    sys.exit(1)


def bad_call_in_child(name, device):
    """The bad call made in a child process: on the first GPU run such calls on CUDA
    tensors ended the process (SIGSEGV), which took a pytest-xdist worker with them."""
    code = (f"import importlib.util; spec = importlib.util.spec_from_file_location('test_kernels', {__file__!r}); "
            "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
            f"module.raise_bad_call({name!r}, {device!r})")
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    child = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True,
                           env=environment, cwd=ROOT, timeout=120)
    if child.returncode < 0:
        pytest.fail(f"{name} on {device} ended the process with {signal.Signals(-child.returncode).name} instead of "
                    f"raising RuntimeError:\n{child.stderr[-3000:]}")
    assert child.returncode == 0, child.stdout + child.stderr[-3000:]
    return child.stdout


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, call, word", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_raise_clear_errors(device, name, call, word):
    require_kernels(device)
    if device == "cuda":
        assert re.search(word, bad_call_in_child(name, device))
        return
    with pytest.raises(RuntimeError, match=word):
        call(device)


@pytest.mark.cuda
def test_tensors_on_different_devices_raise():
    require_kernels("cuda")
    assert "same device" in bad_call_in_child("baselines_on_the_cpu", "cuda")


def opcheck_samples(device):
    g = generator_for("opcheck", device)
    x = randn((3, 4, 5), torch.float64, device, g)
    b = randn((1, 4, 5), torch.float64, device, g)
    alphas = torch.rand(6, generator=g, dtype=torch.float64).to(device)
    grads = randn((12, 4, 5), torch.float64, device, g)
    weights = torch.rand(4, generator=g, dtype=torch.float64).to(device)
    accumulator = randn((3, 4, 5), torch.float64, device, g)
    return [
        (torch.ops.igfast.interpolate_path.default, (x, b, alphas, 1, 5)),
        (torch.ops.igfast.interpolate_path.default, (x.clone().requires_grad_(), b.clone().requires_grad_(), alphas, 0, 6)),
        (torch.ops.igfast.interpolate_path_into.default, (torch.full((12, 4, 5), float("nan"), dtype=torch.float64, device=device), x, b, alphas, 2, 6)),
        (torch.ops.igfast.accumulate_steps.default, (accumulator, grads, weights)),
        (torch.ops.igfast.scale_by_difference.default, (accumulator, x, b)),
        (torch.ops.igfast.scale_by_difference.default, (accumulator.clone().requires_grad_(), x.clone().requires_grad_(), b.clone().requires_grad_())),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    require_kernels(device)
    for op, args in opcheck_samples(device):
        torch.library.opcheck(op, args)


def test_autograd_formulas_match_gradcheck():
    require_kernels("cpu")
    g = generator_for("gradcheck")
    x = torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 3, generator=g, dtype=torch.float64, requires_grad=True)
    alphas = torch.rand(5, generator=g, dtype=torch.float64)
    acc = torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: torch.ops.igfast.interpolate_path(x, b, alphas, 1, 4), (x, b))
    assert torch.autograd.gradcheck(torch.ops.igfast.scale_by_difference, (acc, x, b))


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph_traces_the_ops(backend):
    require_kernels("cpu")
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend=backend)
    def path_and_scale(x, b, alphas, accumulator):
        path = torch.ops.igfast.interpolate_path(x, b, alphas, 0, 4)
        return path.sum(), torch.ops.igfast.scale_by_difference(accumulator, x, b)

    x, b, accumulator = torch.randn(3, 5), torch.randn(1, 5), torch.randn(3, 5)
    alphas = torch.rand(4, dtype=torch.float64)
    total, scaled = path_and_scale(x, b, alphas, accumulator)
    torch.testing.assert_close(total, reference.interpolate_path(x, b, alphas, 0, 4).sum())
    torch.testing.assert_close(scaled, reference.scale_by_difference(accumulator, x, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid"])
def test_integrated_gradients_kernels_equal_pure_pytorch(device, dtype, method):
    require_kernels(device)
    torch.manual_seed(0)
    model64 = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                                  torch.nn.Linear(4 * 6 * 6, 5)).double().to(device).eval()
    model = torch.nn.Sequential(*[m for m in __import__("copy").deepcopy(model64)]).to(dtype)
    g = generator_for("ig", str(dtype), method)
    x = randn((4, 3, 8, 8), dtype, device, g)
    baseline = randn((1, 3, 8, 8), dtype, device, g)
    kwargs = dict(baselines=baseline, target=[0, 1, 2, 4], n_steps=12, method=method, internal_batch_size=20)
    with_kernels = igfast.IntegratedGradients(model).attribute(x, **kwargs)
    with ops.kernels_disabled():
        assert not ops.kernels_available(device)
        pure = igfast.IntegratedGradients(model).attribute(x, **kwargs)
    oracle = igfast.IntegratedGradients(model64).attribute(x.double(), **{**kwargs, "baselines": baseline.double()})
    assert_matches_reference(with_kernels, pure, oracle, dtype)


# -- scalar_kinks: the walk of method="exact" at ReLU-like ops (a CPU kernel only) ------

def scalar_kinks_case(dtype, kink, g, rows=6, per_row=(4, 25)):
    """Units (rows * 4, 25) with every edge case in them: a unit on its kink at the point
    (z = 0 at kink 0, or z = kink), a tangent of 0 (an inf step, or nan with z on the
    kink), steps just inside and just outside the window's margin, and windows that hold
    nothing, part of the row, or all of it."""
    shape = (rows * per_row[0], per_row[1])
    z = randn(shape, torch.float64, "cpu", g) + kink
    dz = randn(shape, torch.float64, "cpu", g)
    z[0, :3] = kink
    dz[1, :2] = 0.0
    z[2, 0], dz[2, 0] = kink, 0.0
    z[20, 0], dz[20, 0] = kink, 0.0  # row 5's only unit at its kink stays there (nan): not near one
    low = -torch.rand(rows, generator=g, dtype=torch.float64)
    high = torch.rand(rows, generator=g, dtype=torch.float64)
    low[1], high[1] = 0.0, 0.0  # a window of one point: no kink inside
    low[2], high[2] = -1e9, 1e9  # every step inside
    margin = 1e-6 if dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-12
    # Steps a hair inside and outside the window's ends, and within the margin of the point.
    for unit, step in enumerate((float(high[0]) - margin * 0.5, float(high[0]) - margin * 2, float(low[0]) + margin * 0.5,
                                 float(low[0]) + margin * 2, margin * 0.5, -margin * 2, margin * 2)):
        z[3, 5 + unit] = kink - step * dz[3, 5 + unit]
    return z.to(dtype), dz.to(dtype), margin, low, high, rows


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kink", [0.0, 0.75])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_scalar_kinks_equal_the_reference(dtype, kink, layout):
    """Every output equal to the pure-PyTorch reference, to the bit: both work in
    float64 from the same values (a unit's side by one fused multiply-add, its step by
    one division), and list the kinks row-major."""
    require_kernels("cpu")
    z, dz, margin, low, high, rows = scalar_kinks_case(dtype, kink, generator_for("kinks", str(dtype), kink))
    if layout == "transposed":  # the same logical tensors in another memory order
        z, dz = z.t().contiguous().t(), dz.t().contiguous().t()
        assert not z.is_contiguous()
    for window in ((low, high), (None, None)):
        for factors in ((-1.0, 0.0, 1.0), (0.0, 0.0, 1.0), (0.1, 0.1, 1.0)):  # sign, ReLU, LeakyReLU
            kernel = torch.ops.igfast.scalar_kinks(z, dz, kink, margin, rows, *window, *factors)
            pure = reference.scalar_kinks(z, dz, kink, margin, rows, *window, *factors)
            names = ("factor", "tangent * factor", "kink rows", "kink steps", "ahead", "behind", "near")
            for name, k, p in zip(names, kernel, pure):
                assert k.dtype == p.dtype and k.shape == p.shape, name
                assert torch.equal(k, p), name
    sign, scaled, kink_rows, kink_steps, ahead, behind, near = torch.ops.igfast.scalar_kinks(
        z, dz, kink, margin, rows, low, high, -1.0, 0.0, 1.0)
    # The case holds what it is meant to: kinks found, a row with none, units on their kink.
    assert kink_rows.numel() > rows and bool(near[0]) and not bool(near[4]) and not bool(near[5])
    assert set(sign.unique().tolist()) == {-1.0, 0.0, 1.0}
    assert torch.equal(scaled, dz * sign)
    assert not bool((kink_rows == 1).any()) and float(ahead[1]) == float("inf")


def test_scalar_kinks_on_several_threads_equal_one():
    require_kernels("cpu")
    g = generator_for("kinks threads")
    rows = 3000
    z, dz = randn((rows, 64), torch.float32, "cpu", g), randn((rows, 64), torch.float32, "cpu", g)
    low, high = -torch.rand(rows, generator=g, dtype=torch.float64), torch.rand(rows, generator=g, dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.igfast.scalar_kinks(z, dz, 0.0, 1e-6, rows, low, high, 0.0, 0.0, 1.0)
        torch.set_num_threads(4)
        several = torch.ops.igfast.scalar_kinks(z, dz, 0.0, 1e-6, rows, low, high, 0.0, 0.0, 1.0)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, several))


SCALAR_KINKS_BAD_CALLS = [
    ("tangent_dtype", lambda: torch.ops.igfast.scalar_kinks(torch.rand(4, 3), torch.rand(4, 3, dtype=torch.float64), 0.0, 1e-6, 2, None, None, -1.0, 0.0, 1.0), "tangent"),
    ("tangent_shape", lambda: torch.ops.igfast.scalar_kinks(torch.rand(4, 3), torch.rand(4, 2), 0.0, 1e-6, 2, None, None, -1.0, 0.0, 1.0), "tangent"),
    ("rows", lambda: torch.ops.igfast.scalar_kinks(torch.rand(4, 3), torch.rand(4, 3), 0.0, 1e-6, 3, None, None, -1.0, 0.0, 1.0), "rows"),
    ("integer_primal", lambda: torch.ops.igfast.scalar_kinks(torch.ones(4, 3, dtype=torch.long), torch.ones(4, 3, dtype=torch.long), 0.0, 1e-6, 2, None, None, -1.0, 0.0, 1.0), "primal"),
    ("one_end", lambda: torch.ops.igfast.scalar_kinks(torch.rand(4, 3), torch.rand(4, 3), 0.0, 1e-6, 2, torch.zeros(2, dtype=torch.float64), None, -1.0, 0.0, 1.0), "low"),
    ("window_dtype", lambda: torch.ops.igfast.scalar_kinks(torch.rand(4, 3), torch.rand(4, 3), 0.0, 1e-6, 2, torch.zeros(2), torch.ones(2), -1.0, 0.0, 1.0), "window"),
    ("window_rows", lambda: torch.ops.igfast.scalar_kinks(torch.rand(4, 3), torch.rand(4, 3), 0.0, 1e-6, 2, torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64), -1.0, 0.0, 1.0), "window"),
]


def test_scalar_kinks_opcheck():
    require_kernels("cpu")
    z, dz, margin, low, high, rows = scalar_kinks_case(torch.float64, 0.0, generator_for("kinks opcheck"))
    torch.library.opcheck(torch.ops.igfast.scalar_kinks.default, (z, dz, 0.0, margin, rows, low, high, 0.0, 0.0, 1.0))
    torch.library.opcheck(torch.ops.igfast.scalar_kinks.default, (z, dz, 0.5, margin, rows, None, None, -1.0, 0.0, 1.0))


class _KinkZoo(torch.nn.Module):
    """A ReLU, a LeakyReLU, an abs and a PReLU, after a convolution and a linear layer:
    every op the fused walk reads (ops.scalar_kinks), with a max-pool it does not."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.prelu = torch.nn.PReLU(4)
        self.fc1 = torch.nn.Linear(4 * 4 * 4, 24)
        self.fc2 = torch.nn.Linear(24, 16)
        self.out = torch.nn.Linear(16, 3)

    def forward(self, x):
        h = torch.nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        h = self.prelu(h).flatten(1)
        h = torch.nn.functional.leaky_relu(self.fc1(h), 0.1)
        return self.out(self.fc2(h).abs())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_exact_walk_with_the_kernel_equals_pure_pytorch(dtype):
    """method="exact" and n_steps="auto" (which walks these paths) give the same
    attributions, pieces and evaluations with the kernel as on the pure-PyTorch path."""
    require_kernels("cpu")
    torch.manual_seed(0)
    model = _KinkZoo().to(dtype).eval()
    g = generator_for("exact walk", str(dtype))
    x, baseline = randn((5, 2, 8, 8), dtype, "cpu", g), randn((5, 2, 8, 8), dtype, "cpu", g) * 0.1
    ig = igfast.IntegratedGradients(model)
    for kwargs in (dict(method="exact"), dict(n_steps="auto", tolerance=1e-4, max_steps=1025)):
        fused, fused_info = ig.attribute(x, baseline, target=[0, 1, 2, 0, 1], return_adaptive_info=True, **kwargs)
        with ops.kernels_disabled():
            pure, pure_info = ig.attribute(x, baseline, target=[0, 1, 2, 0, 1], return_adaptive_info=True, **kwargs)
        assert torch.equal(fused, pure)
        assert torch.equal(fused_info.evaluations, pure_info.evaluations)
        if kwargs.get("method") == "exact":
            assert torch.equal(fused_info.pieces, pure_info.pieces) and int(fused_info.pieces.min()) > 10


def overtakings_case(g, shape=(4, 3, 5, 7)):
    """A max-pool's windows first: padding (-inf, rate 0), an element level with its
    winner at the point, one overtaking ahead and one behind within the margin's reach."""
    values = torch.randn(shape, generator=g, dtype=torch.float64)
    rates = torch.randn(shape, generator=g, dtype=torch.float64)
    values[0, 0, 0, :3], rates[0, 0, 0, :3] = -math.inf, 0.0
    winner = values.argmax(0, keepdim=True)
    winner_values, winner_rates = values.gather(0, winner)[0], rates.gather(0, winner)[0]
    if shape[0] == 1:  # windows of one element: each its own winner, never overtaken
        return values, rates, winner_values, winner_rates
    other = (winner[0, 1, 1, 1] + 1) % shape[0]
    values[other, 1, 1, 1], rates[other, 1, 1, 1] = winner_values[1, 1, 1] - 1e-13, winner_rates[1, 1, 1] + 1.0
    return values, rates, winner_values, winner_rates


@pytest.mark.parametrize("shape", [(4, 3, 5, 7), (9, 2, 3, 4100), (1, 2, 3, 6)])
def test_overtakings_equal_the_reference(shape):
    require_kernels("cpu")
    values, rates, winner_values, winner_rates = overtakings_case(generator_for("overtakings", shape), shape)
    kernel = torch.ops.igfast.overtakings(values, rates, winner_values, winner_rates, 1e-12)
    _, pure = reference.overtakings(values.clone(), rates, winner_values, winner_rates, 1e-12)
    assert kernel.shape == pure.shape == (*shape[1:], 3)
    assert torch.equal(kernel, pure)
    if shape[0] > 1:  # the case holds a tie at the point, steps ahead and behind, and windows with none
        assert float(kernel[1, 1, 1, 2]) == 0.0 and bool(torch.isfinite(kernel[..., :2]).any())
        assert bool(torch.isinf(kernel[..., 0]).any())
    else:
        assert bool(torch.isinf(kernel).all())


OVERTAKINGS_BAD_CALLS = [
    ("float32", lambda: torch.ops.igfast.overtakings(torch.rand(2, 3), torch.rand(2, 3), torch.rand(3), torch.rand(3), 1e-6), "float64"),
    ("rates_shape", lambda: torch.ops.igfast.overtakings(*(torch.rand(s, dtype=torch.float64) for s in ((2, 3), (2, 4), (3,), (3,))), 1e-6), "rates"),
    ("winners_shape", lambda: torch.ops.igfast.overtakings(*(torch.rand(s, dtype=torch.float64) for s in ((2, 3), (2, 3), (2,), (2,))), 1e-6), "winner_values"),
]


def cut_case(g, segments=7, kinks=60, margin=1e-12):
    """The walk's segments (middles evaluated, the piece around each, kinks listed in no
    order): kinks at one place twice, a chain of kinks each within the margin of the
    one before, kinks on a segment's end and on its piece's ends, a piece that is the
    whole segment, segments without kinks, and one with more than 32 cuts."""
    low = torch.rand(segments, generator=g, dtype=torch.float64) * 0.5
    high = low + torch.rand(segments, generator=g, dtype=torch.float64) * 0.5 + 1e-3
    middle = 0.5 * (low + high)
    piece_start = middle - torch.rand(segments, generator=g, dtype=torch.float64) * (middle - low)
    piece_end = middle + torch.rand(segments, generator=g, dtype=torch.float64) * (high - middle)
    rows = torch.randint(0, max(1, segments - 2), (kinks,), generator=g)  # the last two have none
    steps = (torch.rand(kinks, generator=g, dtype=torch.float64) - 0.5) * (high - low)[rows]
    if segments >= 3 and kinks >= 8:
        piece_start[1], piece_end[1] = low[1], high[1]
        rows[:8] = 0
        steps[1] = steps[0]
        steps[3], steps[4] = steps[2] + 0.6 * margin, steps[2] + 1.2 * margin
        steps[5] = low[0] - middle[0]
        steps[6] = piece_end[0] - middle[0]
        rows[8:48] = segments - 3
    return low, high, middle, piece_start, piece_end, rows, steps, margin


@pytest.mark.parametrize("segments, kinks", [(7, 60), (2000, 9000), (3, 0), (0, 0)])
def test_cut_at_kinks_equals_the_reference(segments, kinks):
    require_kernels("cpu")
    case = cut_case(generator_for("cut", segments, kinks), segments, kinks)
    kernel = torch.ops.igfast.cut_at_kinks(*case)
    pure = reference.cut_at_kinks(*case)
    for k, p, dtype in zip(kernel, pure, (torch.long, torch.float64, torch.float64, torch.bool)):
        assert k.dtype == p.dtype == dtype and torch.equal(k, p)
    part_segment, part_low, part_high, holds = kernel
    if segments:  # every segment has parts that tile it, one of them around its middle
        assert torch.equal(torch.bincount(part_segment[holds], minlength=segments), torch.ones(segments, dtype=torch.long))
        assert bool((part_high > part_low).all())
    if kinks:  # the kinks a rounding apart made no sliver: fewer parts than cuts
        assert part_segment.numel() < 3 * segments + kinks


CUT_BAD_CALLS = [
    ("cut_dtype", lambda: torch.ops.igfast.cut_at_kinks(*(torch.rand(3) for _ in range(5)), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64), 1e-9), "float64"),
    ("cut_rows_dtype", lambda: torch.ops.igfast.cut_at_kinks(*(torch.rand(3, dtype=torch.float64) for _ in range(5)), torch.zeros(2, dtype=torch.int32), torch.zeros(2, dtype=torch.float64), 1e-9), "kink_rows"),
    ("cut_lengths", lambda: torch.ops.igfast.cut_at_kinks(*(torch.rand(3, dtype=torch.float64) for _ in range(4)), torch.rand(2, dtype=torch.float64), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64), 1e-9), "piece_end"),
    ("cut_kinks", lambda: torch.ops.igfast.cut_at_kinks(*(torch.rand(3, dtype=torch.float64) for _ in range(5)), torch.zeros(2, dtype=torch.long), torch.zeros(3, dtype=torch.float64), 1e-9), "kink_steps"),
    ("cut_row_range", lambda: torch.ops.igfast.cut_at_kinks(*(torch.rand(3, dtype=torch.float64) for _ in range(5)), torch.tensor([0, 3]), torch.zeros(2, dtype=torch.float64), 1e-9), "kink_rows"),
]


def test_cut_at_kinks_opcheck():
    require_kernels("cpu")
    torch.library.opcheck(torch.ops.igfast.cut_at_kinks.default, cut_case(generator_for("cut opcheck")))


WALK_BAD_CALLS = SCALAR_KINKS_BAD_CALLS + OVERTAKINGS_BAD_CALLS + CUT_BAD_CALLS


@pytest.mark.parametrize("name, call, word", WALK_BAD_CALLS, ids=[c[0] for c in WALK_BAD_CALLS])
def test_walk_ops_bad_arguments_raise_clear_errors(name, call, word):
    """scalar_kinks, overtakings and cut_at_kinks (CPU kernels only)."""
    require_kernels("cpu")
    with pytest.raises(RuntimeError, match=word):
        call()


def test_overtakings_opcheck():
    require_kernels("cpu")
    torch.library.opcheck(torch.ops.igfast.overtakings.default,
                          (*overtakings_case(generator_for("overtakings opcheck")), 1e-12))
