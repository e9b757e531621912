"""The quadrature table reproduces Captum's alphas and weights exactly (Gauss-Legendre
up to LARGEST_NUMPY_GAUSS_LEGENDRE nodes; above, igfast's own nodes are checked against
numpy's and against the rule's defining exactness)."""

import numpy as np
import pytest
import torch

from igfast.errors import ArgumentError
from igfast import quadrature
from igfast.quadrature import LARGEST_NUMPY_GAUSS_LEGENDRE, SUPPORTED_METHODS, alphas_and_weights

approximation = pytest.importorskip("captum.attr._utils.approximation_methods")


@pytest.mark.parametrize("method", SUPPORTED_METHODS)
@pytest.mark.parametrize("n_steps", [2, 3, 7, 16, 50, 51, 200, 1000])
@pytest.mark.parametrize("default_dtype", [torch.float32, torch.float64])
def test_table_equals_captum(method, n_steps, default_dtype):
    """Bit for bit, under either default dtype: Captum's Riemann alphas come from
    torch.linspace in the default dtype (igfast's were always float32's: 4.7e-9 apart
    from Captum under torch.set_default_dtype(torch.float64))."""
    if method == "gausslegendre" and n_steps > LARGEST_NUMPY_GAUSS_LEGENDRE:
        n_steps = LARGEST_NUMPY_GAUSS_LEGENDRE
    step_sizes, alphas_of = approximation.approximation_parameters(method)
    before = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        alphas, weights = alphas_and_weights(method, n_steps)
        captum_alphas = np.array(alphas_of(n_steps))
    finally:
        torch.set_default_dtype(before)
    assert alphas.dtype == weights.dtype == torch.float64
    np.testing.assert_array_equal(alphas.numpy(), captum_alphas)
    # Captum weights the gradients with torch.tensor(step_sizes).float().
    captum_weights = torch.tensor(step_sizes(n_steps)).float().double()
    np.testing.assert_array_equal(weights.numpy(), captum_weights.numpy())


def test_trapezoid_weights_sum_to_one_minus_one_over_n():
    _, weights = alphas_and_weights("riemann_trapezoid", 10)
    assert weights.sum().item() == pytest.approx(0.9, abs=1e-7)


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_middle"])
def test_rules_integrate_polynomials(method):
    alphas, weights = alphas_and_weights(method, 64)
    assert (weights * alphas**3).sum().item() == pytest.approx(0.25, abs=1e-4)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "5"])
def test_bad_step_counts(bad):
    with pytest.raises(ArgumentError, match="n_steps"):
        alphas_and_weights("gausslegendre", bad)


@pytest.mark.parametrize("n", list(range(1, 40)) + [64, 101, 256, LARGEST_NUMPY_GAUSS_LEGENDRE])
def test_newton_gauss_legendre_matches_numpy(n):
    """Where numpy's leggauss is accurate (its weights drift by 1e-10 relative at 512
    nodes, 4.6e-7 at 4096), igfast's Newton rule gives the same nodes and weights."""
    nodes, weights = quadrature._gauss_legendre_by_newton(n)
    numpy_nodes, numpy_weights = np.polynomial.legendre.leggauss(n)
    np.testing.assert_allclose(nodes, numpy_nodes, rtol=0, atol=4e-16)
    np.testing.assert_allclose(weights, numpy_weights, rtol=5e-10, atol=0)
    assert np.all(np.diff(nodes) > 0)


@pytest.mark.parametrize("n", [LARGEST_NUMPY_GAUSS_LEGENDRE + 1, 2048, 10000])
def test_large_gauss_legendre_rules_are_exact_on_polynomials(n):
    """Above numpy's range the table's Gauss-Legendre rule (computed by igfast, in
    about a second at 10,000 nodes where numpy's leggauss takes minutes) integrates
    t^k on [0, 1] exactly up to k = 2n - 1: the highest power weighs only the nodes
    next to t = 1, where the weights are hardest to get right."""
    alphas, _ = alphas_and_weights("gausslegendre", n)
    nodes, weights = quadrature._gauss_legendre(n)  # float64 weights, before float32 rounding
    np.testing.assert_array_equal(alphas.numpy(), nodes)
    assert nodes.shape == weights.shape == (n,) and np.all(np.diff(nodes) > 0)
    assert 0 < nodes[0] and nodes[-1] < 1
    for degree in (0, 1, 2, 7, n // 2, n, 2 * n - 1):
        exact = 1 / (degree + 1)
        assert abs(float(weights @ nodes**degree) - exact) <= 1e-12 * exact + 1e-15, degree
    np.testing.assert_allclose(weights, weights[::-1], rtol=0, atol=1e-17)


@pytest.mark.parametrize("intervals", [1, 2, 3, 4, 7, 8, 16, 33, 256, 4096])
def test_clenshaw_curtis_weights_by_fft_equal_the_cosine_sum(intervals):
    """auto's Clenshaw-Curtis weights (one FFT) equal the defining cosine sum, summed
    term by term here, and the rule integrates t^k on [0, 1] exactly up to k = n."""
    nodes, weights = quadrature._clenshaw_curtis(intervals)
    angles = np.arange(intervals + 1) * np.pi / intervals
    direct = np.ones(intervals + 1)
    for m in range(1, intervals // 2 + 1):
        direct -= (1.0 if 2 * m == intervals else 2.0) / (4 * m * m - 1) * np.cos(2 * m * angles)
    direct *= np.where(np.arange(intervals + 1) % intervals == 0, 1.0, 2.0) / intervals / 2
    np.testing.assert_allclose(weights, direct, rtol=0, atol=1e-15)
    assert np.all(np.diff(nodes) > 0) and nodes[0] == 0 and abs(nodes[-1] - 1) < 1e-15
    for degree in {0, 1, intervals // 2, intervals}:
        assert abs(float(weights @ nodes**degree) - 1 / (degree + 1)) <= 1e-13, degree
