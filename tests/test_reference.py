"""The pure-PyTorch ops against an elementwise float64 oracle written as loops."""

import zlib

import pytest
import torch

from igfast import reference
from igfast.dtypes import dtype_policy

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def oracle_path(x, b, alphas, k0, k1):
    rows = []
    for k in range(k0, k1):
        for i in range(x.shape[0]):
            bi = b[0] if b.shape[0] == 1 else b[i]
            rows.append(bi.double() + alphas[k].double() * (x[i].double() - bi.double()))
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("broadcast", [False, True])
@pytest.mark.parametrize("chunk", [(0, 5), (2, 4), (4, 5)])
def test_interpolate_path(dtype, broadcast, chunk):
    g = torch.Generator().manual_seed(zlib.crc32(repr((str(dtype), broadcast, chunk)).encode()))
    x = torch.randn(3, 2, 4, generator=g).to(dtype)
    b = torch.randn(1 if broadcast else 3, 2, 4, generator=g).to(dtype)
    alphas = torch.rand(5, generator=g, dtype=torch.float64)
    path = reference.interpolate_path(x, b, alphas, *chunk)
    assert path.dtype == dtype and path.shape == ((chunk[1] - chunk[0]) * 3, 2, 4)
    expected = oracle_path(x, b, alphas, *chunk)
    # One rounding to the dtype, plus the rounding of (x - b) in the dtype.
    tolerance = 4 * torch.finfo(dtype).eps * expected.abs().max().item()
    assert (path.double() - expected).abs().max().item() <= tolerance


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_accumulate_steps(dtype):
    g = torch.Generator().manual_seed(7)
    steps, batch = 38, 4  # two groups of 16 steps (see STEPS_PER_PARTIAL_SUM) and 6 more
    grads = torch.randn(steps * batch, 3, 5, generator=g).to(dtype)
    weights = torch.rand(steps, generator=g, dtype=torch.float64)
    accumulate = dtype_policy(dtype).accumulate
    start = torch.randn(batch, 3, 5, generator=g).to(accumulate)
    accumulator = start.clone()
    reference.accumulate_steps(accumulator, grads, weights)
    expected = start.double().clone()
    for k in range(steps):
        expected += weights[k] * grads[k * batch:(k + 1) * batch].double()
    assert accumulator.dtype == accumulate
    # Groups of 16 products are summed in the accumulation dtype, the groups in float64,
    # and the result is rounded once.
    tolerance = 8 * reference.STEPS_PER_PARTIAL_SUM * torch.finfo(accumulate).eps * expected.abs().max().item()
    assert (accumulator.double() - expected).abs().max().item() <= tolerance
