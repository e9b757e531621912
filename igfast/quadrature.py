"""The quadrature table: nodes (alphas) and weights of every integration method.

Every path of igfast (pure PyTorch, C++ and CUDA kernels, chunked or not) takes its
alphas and weights from here, so a method is defined exactly once.

The values reproduce Captum 0.9 bit for bit, quirks included:

* Riemann alphas come from ``torch.linspace`` in float32, as Captum computes them.
* ``riemann_trapezoid`` puts n nodes on [0, 1] with weights 1/n (halved at both
  ends), so its weights sum to 1 - 1/n, not 1.
* Captum converts the step sizes to a float32 tensor before weighting the gradients,
  even for float64 inputs; the weights here are rounded through float32 likewise
  (a relative change of about 1e-8, far below any quadrature error).
"""

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

from .errors import ArgumentError


def _riemann(position: str) -> Callable[[int], Tuple[np.ndarray, np.ndarray]]:
    def nodes_and_weights(n: int) -> Tuple[np.ndarray, np.ndarray]:
        start, end = {
            "left": (0.0, 1 - 1 / n),
            "right": (1 / n, 1.0),
            "middle": (1 / (2 * n), 1 - 1 / (2 * n)),
            "trapezoid": (0.0, 1.0),
        }[position]
        alphas = torch.linspace(start, end, n, dtype=torch.float32).double().numpy()
        weights = np.full(n, 1 / n)
        if position == "trapezoid":
            weights[0] /= 2
            weights[-1] /= 2
        return alphas, weights

    return nodes_and_weights


def _gauss_legendre(n: int) -> Tuple[np.ndarray, np.ndarray]:
    # Nodes and weights on [-1, 1], mapped to [0, 1].
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return 0.5 * (1 + nodes), 0.5 * weights


@dataclass(frozen=True)
class Rule:
    name: str
    min_steps: int
    nodes_and_weights: Callable[[int], Tuple[np.ndarray, np.ndarray]]


RULES: Dict[str, Rule] = {
    rule.name: rule
    for rule in (
        Rule("riemann_left", 2, _riemann("left")),
        Rule("riemann_right", 2, _riemann("right")),
        Rule("riemann_middle", 2, _riemann("middle")),
        Rule("riemann_trapezoid", 2, _riemann("trapezoid")),
        Rule("gausslegendre", 1, _gauss_legendre),
    )
}

SUPPORTED_METHODS = tuple(RULES)


def validate_method_and_steps(method: str, n_steps: int) -> Rule:
    """The rule for ``method``, after checking that it can use ``n_steps`` nodes."""
    if not isinstance(method, str) or method not in RULES:
        raise ArgumentError(
            f"`method` must be one of {list(SUPPORTED_METHODS)}; got {method!r}."
        )
    rule = RULES[method]
    if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)):
        raise ArgumentError(
            f"`n_steps` must be an integer >= {rule.min_steps}; got {n_steps!r}."
        )
    if n_steps < rule.min_steps:
        raise ArgumentError(
            f"`n_steps` must be >= {rule.min_steps} for method {method!r}; "
            f"got {n_steps}."
        )
    return rule


@lru_cache(maxsize=64)
def _table(method: str, n_steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
    alphas, weights = RULES[method].nodes_and_weights(n_steps)
    alphas_t = torch.tensor(alphas, dtype=torch.float64)
    weights_t = torch.tensor(weights, dtype=torch.float32).double()
    return alphas_t, weights_t


def alphas_and_weights(method: str, n_steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Alphas and weights of ``method`` with ``n_steps`` nodes, as float64 CPU tensors.

    The tensors are cached and shared: callers convert them (``.to``) and never write
    into them.
    """
    validate_method_and_steps(method, n_steps)
    return _table(method, int(n_steps))


@dataclass(frozen=True)
class PathNodes:
    """The points of the path a computation evaluates, and which of them carry
    quadrature weights.

    ``alphas`` are the quadrature nodes, then any endpoint (alpha 0 or 1) the rule
    lacks but the convergence delta needs; only the first ``len(weights)`` nodes
    are summed. ``start_node`` and ``end_node`` index the nodes at alpha 0 and 1,
    where the forward values F(x') and F(x) are read, or are None.
    """

    alphas: torch.Tensor
    weights: torch.Tensor
    start_node: Optional[int] = None
    end_node: Optional[int] = None

    @property
    def count(self) -> int:
        return self.alphas.shape[0]

    @property
    def quadrature_count(self) -> int:
        return self.weights.shape[0]


def path_nodes(method: str, n_steps: int, with_endpoints: bool) -> PathNodes:
    """The nodes of ``method``; with_endpoints adds alpha 0 and 1 unless the rule
    already has them (riemann_left has 0, riemann_right 1, riemann_trapezoid both),
    so the convergence delta needs no separate model calls."""
    alphas, weights = alphas_and_weights(method, n_steps)
    if not with_endpoints:
        return PathNodes(alphas, weights)
    nodes = alphas.tolist()
    missing = [a for a in (0.0, 1.0) if a not in nodes]
    if missing:
        alphas = torch.cat([alphas, torch.tensor(missing, dtype=alphas.dtype)])
        nodes = alphas.tolist()
    return PathNodes(alphas, weights, nodes.index(0.0), nodes.index(1.0))
