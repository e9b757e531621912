"""The three examples of Captum's Integrated Gradients documentation, run with igfast,
reproduce their published values."""

import pytest
import torch

import igfast
from models import PaperToyModel, SoftmaxModel, ToyModelWithAdditionalForwardArgs


def test_paper_toy_model():
    ig = igfast.IntegratedGradients(PaperToyModel())
    (a1, a2), delta = ig.attribute(
        (torch.tensor([3.0]), torch.tensor([1.0])),
        baselines=(torch.tensor([0.0]), torch.tensor([0.0])),
        method="gausslegendre",
        return_convergence_delta=True,
    )
    assert a1.item() == pytest.approx(1.5, abs=1e-4)
    assert a2.item() == pytest.approx(-0.5, abs=1e-4)
    # Published: 1.18e-05 (an older Captum); Captum 0.9 gives 0 here.
    assert abs(delta.item()) <= 1.2e-5


def test_model_with_additional_forward_args():
    ig = igfast.IntegratedGradients(ToyModelWithAdditionalForwardArgs())
    input1 = torch.tensor([[1.0, 3.0], [3.0, 5.0]], requires_grad=True)
    input2 = torch.tensor([[1.0, 4.0], [0.0, 2.0]], requires_grad=True)
    (attr1, attr2), delta = ig.attribute(
        (input1, input2), n_steps=100, additional_forward_args=1,
        return_convergence_delta=True,
    )
    torch.testing.assert_close(attr1, torch.tensor([[0.0, 0.0], [0.0, 3.3428]]), atol=1e-4, rtol=0)
    torch.testing.assert_close(attr2, torch.tensor([[0.0, 0.0], [0.0, -1.3371]]), atol=1e-4, rtol=0)
    # Published: 0.005693793296813965 (the second example; the first has none).
    assert delta.abs().max().item() == pytest.approx(0.0057, abs=1e-4)
    assert delta[0].item() == pytest.approx(0.0, abs=1e-6)


def test_softmax_classifier_target_5():
    torch.manual_seed(0)
    model = SoftmaxModel(40, 20, 10)
    x = torch.arange(0.0, 40.0).unsqueeze(0)
    attributions, delta = igfast.IntegratedGradients(model).attribute(
        x, target=5, return_convergence_delta=True
    )
    assert attributions.shape == x.shape
    assert attributions.abs().sum() > 0
    # Completeness: sum of attributions = F(x)[5] - F(0)[5], up to the quadrature error.
    with torch.no_grad():
        difference = model(x)[0, 5] - model(torch.zeros_like(x))[0, 5]
    assert attributions.sum().item() - difference.item() == pytest.approx(delta.item(), abs=1e-6)
    assert abs(delta.item()) < 1e-2
