"""The quadrature table reproduces Captum's alphas and weights exactly."""

import numpy as np
import pytest
import torch

from igfast.errors import ArgumentError
from igfast.quadrature import SUPPORTED_METHODS, alphas_and_weights

approximation = pytest.importorskip("captum.attr._utils.approximation_methods")


@pytest.mark.parametrize("method", SUPPORTED_METHODS)
@pytest.mark.parametrize("n_steps", [2, 3, 7, 16, 50, 51, 200, 1000])
def test_table_equals_captum(method, n_steps):
    step_sizes, alphas_of = approximation.approximation_parameters(method)
    alphas, weights = alphas_and_weights(method, n_steps)
    assert alphas.dtype == weights.dtype == torch.float64
    np.testing.assert_array_equal(alphas.numpy(), np.array(alphas_of(n_steps)))
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
