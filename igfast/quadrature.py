"""The quadrature table: nodes (alphas) and weights of every integration method.

Every path of igfast (pure PyTorch, C++ and CUDA kernels, chunked or not) takes its
alphas and weights from here, so a method is defined exactly once.

The values reproduce Captum 0.9 bit for bit, quirks included:

* Riemann alphas come from ``torch.linspace`` in the default dtype (float32 unless set),
  as Captum computes them.
* ``riemann_trapezoid`` puts n nodes on [0, 1] with weights 1/n (halved at both
  ends), so its weights sum to 1 - 1/n, not 1.
* Gauss-Legendre above LARGEST_NUMPY_GAUSS_LEGENDRE nodes is computed by igfast
  (numpy's solver takes minutes there); it agrees with numpy's nodes to 1e-16 and is
  closer to the true weights than numpy's.
* Captum converts the step sizes to a float32 tensor before weighting the gradients,
  even for float64 inputs; the weights here are rounded through float32 likewise
  (a relative change of about 1e-8, far below any quadrature error).
"""

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch

from .errors import ArgumentError, ArgumentTypeError


def _riemann(position: str) -> Callable[..., Tuple[np.ndarray, np.ndarray]]:
    def nodes_and_weights(n: int, linspace_dtype: torch.dtype = torch.float32) -> Tuple[np.ndarray, np.ndarray]:
        start, end = {
            "left": (0.0, 1 - 1 / n),
            "right": (1 / n, 1.0),
            "middle": (1 / (2 * n), 1 - 1 / (2 * n)),
            "trapezoid": (0.0, 1.0),
        }[position]
        alphas = torch.linspace(start, end, n, dtype=linspace_dtype).double().numpy()
        weights = np.full(n, 1 / n)
        if position == "trapezoid":
            weights[0] /= 2
            weights[-1] /= 2
        return alphas, weights

    return nodes_and_weights


# Up to this many nodes Gauss-Legendre comes from numpy's leggauss, as Captum's does
# (bit for bit). Beyond it numpy's dense eigenvalue solve costs O(n^3), measured here
# at 7 s for 1024 nodes, 23 s for 4096 and minutes for 10,000, and its weights drift
# (4.6e-7 relative at 4096 against a 40-digit reference, above float32's rounding):
# Newton's method on the Legendre recurrence costs O(n^2), 1.1 s for 10,000 nodes,
# with weights within 7e-11 at 4096.
LARGEST_NUMPY_GAUSS_LEGENDRE = 512
NEWTON_ITERATIONS = 10


def _legendre_and_previous(n: int, x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """P_n(x) and P_{n-1}(x) by the three-term recurrence (n >= 1)."""
    previous, current = np.ones_like(x), x.copy()
    for degree in range(2, n + 1):
        previous, current = current, ((2 * degree - 1) * x * current - (degree - 1) * previous) / degree
    return current, previous


def _gauss_legendre_by_newton(n: int) -> Tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes (ascending) and weights on [-1, 1], for any n >= 1."""
    # The rule is symmetric: find the nonnegative half, from Tricomi's asymptotic
    # estimate of the roots, close enough for Newton to converge in 2-3 steps.
    k = np.arange(1, (n + 1) // 2 + 1)
    x = (1 - (n - 1) / (8.0 * n**3)) * np.cos(np.pi * (4 * k - 1) / (4 * n + 2))
    for _ in range(NEWTON_ITERATIONS):
        value, previous = _legendre_and_previous(n, x)
        derivative = n * (previous - x * value) / (1 - x * x)
        step = value / derivative
        x = x - step
        if np.abs(step).max() <= 4 * np.finfo(np.float64).eps:
            break
    value, previous = _legendre_and_previous(n, x)
    derivative = n * (previous - x * value) / (1 - x * x)
    weights = 2 / ((1 - x * x) * derivative**2)
    if n % 2:
        x[-1] = 0.0  # the middle root; its mirror image is itself
        return np.concatenate([-x, x[-2::-1]]), np.concatenate([weights, weights[-2::-1]])
    return np.concatenate([-x, x[::-1]]), np.concatenate([weights, weights[::-1]])


def _gauss_legendre(n: int) -> Tuple[np.ndarray, np.ndarray]:
    # Nodes and weights on [-1, 1], mapped to [0, 1].
    if n <= LARGEST_NUMPY_GAUSS_LEGENDRE:
        nodes, weights = np.polynomial.legendre.leggauss(n)
    else:
        nodes, weights = _gauss_legendre_by_newton(n)
    return 0.5 * (1 + nodes), 0.5 * weights


@dataclass(frozen=True)
class Rule:
    name: str
    min_steps: int
    nodes_and_weights: Callable[..., Tuple[np.ndarray, np.ndarray]]
    # Whether its nodes come from torch.linspace, in the default dtype as Captum's do
    # (nodes_and_weights then takes linspace_dtype).
    uses_default_dtype: bool = False


RULES: Dict[str, Rule] = {
    rule.name: rule
    for rule in (
        Rule("riemann_left", 2, _riemann("left"), uses_default_dtype=True),
        Rule("riemann_right", 2, _riemann("right"), uses_default_dtype=True),
        Rule("riemann_middle", 2, _riemann("middle"), uses_default_dtype=True),
        Rule("riemann_trapezoid", 2, _riemann("trapezoid"), uses_default_dtype=True),
        Rule("gausslegendre", 1, _gauss_legendre),
    )
}

SUPPORTED_METHODS = tuple(RULES)

# The methods that integrate along the path's pieces (igfast's own, see exact.py), and
# whether they allow smooth ops before kinks (curved pre-activations, whose kinks are
# searched for). Named here so that a misspelt method's error lists them too.
PIECE_METHODS = {"exact": False, "gausslegendre_pieces": True}


def validate_method_and_steps(method: str, n_steps: int) -> Rule:
    """The rule for ``method``, after checking that it can use ``n_steps`` nodes."""
    if not isinstance(method, str) or method not in RULES:
        raise ArgumentError(
            f"`method` must be one of {list(SUPPORTED_METHODS)}, or igfast's {list(PIECE_METHODS)}; "
            f"got {method!r}."
        )
    rule = RULES[method]
    if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)):
        raise ArgumentTypeError(
            f"`n_steps` must be an integer >= {rule.min_steps}; got {n_steps!r}."
        )
    if n_steps < rule.min_steps:
        raise ArgumentError(
            f"`n_steps` must be >= {rule.min_steps} for method {method!r}; "
            f"got {n_steps}."
        )
    return rule


@lru_cache(maxsize=64)
def _table(method: str, n_steps: int, default_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    rule = RULES[method]
    alphas, weights = (rule.nodes_and_weights(n_steps, linspace_dtype=default_dtype) if rule.uses_default_dtype
                       else rule.nodes_and_weights(n_steps))
    alphas_t = torch.tensor(alphas, dtype=torch.float64)
    weights_t = torch.tensor(weights, dtype=torch.float32).double()
    return alphas_t, weights_t


def alphas_and_weights(method: str, n_steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Alphas and weights of ``method`` with ``n_steps`` nodes, as float64 CPU tensors.

    The tensors are cached and shared: callers convert them (``.to``) and never write
    into them.
    """
    validate_method_and_steps(method, n_steps)
    # Captum's Riemann alphas come from torch.linspace in the default dtype (float64 under
    # torch.set_default_dtype(torch.float64): 4.7e-9 apart from float32's).
    return _table(method, int(n_steps), torch.get_default_dtype())


@dataclass(frozen=True)
class PathNodes:
    """The points of the path a computation evaluates, and which of them carry
    quadrature weights.

    ``weights`` is (n,) for one rule, or (levels, n) for nested rules accumulated
    side by side (n_steps="auto"). ``alphas`` are the quadrature nodes; only the
    first ``len(weights)`` of them are summed, later ones are evaluated for their
    forward values only. ``start_node`` and ``end_node`` index the nodes at alpha 0
    and 1, where the forward values F(x') and F(x) are read, or are None.
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
        return self.weights.shape[-1]

    @property
    def rule_count(self) -> Optional[int]:
        """The number of rules of a (levels, n) weight table; None for one rule."""
        return self.weights.shape[0] if self.weights.dim() == 2 else None


def path_nodes(method: str, n_steps: int) -> PathNodes:
    """The nodes of a fixed rule. F(x) and F(x') for the convergence delta are not
    read from them: the path's rows are batched differently from a plain forward
    call on the inputs, which changes the last bits of F (Captum's delta, and
    ``compute_convergence_delta``, come from such plain calls)."""
    alphas, weights = alphas_and_weights(method, n_steps)
    return PathNodes(alphas, weights)


# Nested Clenshaw-Curtis levels: the rules of n_steps="auto".
#
# Gauss-Legendre nodes of different counts share no inner node, so refining a GL rule
# would throw every model evaluation away. Clenshaw-Curtis nodes (1 - cos(j pi / N)) / 2
# are nested: the 2N + 1 nodes contain the N + 1 nodes, so each refinement evaluates
# only the N new ones. Its accuracy per node is close to Gauss-Legendre's on the
# integrands of attribution (Trefethen, SIAM Review 2008; measured in benchmarks/),
# and it contains alpha 0 and 1, so F(x') and F(x) come from the same evaluations.

# The smallest level: its difference to the first round's rule is the first estimate.
SMALLEST_LEVEL_STEPS = 5
# The first round evaluates this level (which contains the smallest one).
FIRST_ROUND_STEPS = 9
# On a smooth network (n_steps="auto" finds one by a forward with tangents) the levels
# start lower: its integrand is analytic along the path, 2 to 5 Gauss nodes reach
# 1e-3 to 1e-6, and the 3- to 5-node change overstates the 5-node rule's error by
# 50x or more (measured on a GELU MLP: 5.4e-5 error for a 5.9e-3 change).
SMOOTH_SMALLEST_LEVEL_STEPS = 3
DEFAULT_MAX_STEPS = 257
# Weights cost O(N^2) to form; beyond this a fixed n_steps is the better tool anyway.
LARGEST_MAX_STEPS = 16385


def _clenshaw_curtis(intervals: int) -> Tuple[np.ndarray, np.ndarray]:
    """The intervals + 1 Clenshaw-Curtis nodes and weights on [0, 1], ascending."""
    angles = np.arange(intervals + 1) * np.pi / intervals
    # Node k's weight is c_k / n * (1 - sum_m b_m / (4 m^2 - 1) * cos(2 pi m k / n)),
    # m = 1 .. n/2 (b_m = 1 at m = n/2, else 2; c_k = 1 at both ends, else 2): a
    # cosine sum, so one FFT of length n gives every node's in O(n log n) (summing it
    # directly cost 2.9 s at 16,384 intervals).
    coefficients = np.zeros(intervals)
    coefficients[0] = 1.0
    m = np.arange(1, intervals // 2 + 1)
    coefficients[m] -= np.where(2 * m == intervals, 1.0, 2.0) / (4.0 * m * m - 1)
    sums = np.fft.fft(coefficients).real
    sums = np.append(sums, sums[0])  # k = n: cos(2 pi m) = cos(0)
    weights = sums * np.where((np.arange(intervals + 1) % intervals) == 0, 1.0, 2.0) / intervals
    return (1 - np.cos(angles)) / 2, weights / 2


@dataclass(frozen=True)
class NestedLevels:
    """The nested rules of an adaptive integration, and the order rounds evaluate
    their nodes in.

    ``alphas`` holds every node of the finest level once: round 0's nodes (the
    FIRST_ROUND_STEPS-node level), then each finer level's new nodes.
    ``weights[level, node]`` is the node's weight in that level's rule (0 where the
    level lacks the node), so one pass accumulates every level's estimate at once.
    """

    alphas: torch.Tensor
    weights: torch.Tensor  # (levels, nodes)
    steps: Tuple[int, ...]  # nodes of each level, coarsest first
    round_ends: Tuple[int, ...]  # round r evaluates nodes [round_ends[r - 1], round_ends[r])

    @property
    def rounds(self) -> int:
        return len(self.round_ends)

    def round_nodes(self, round_index: int) -> PathNodes:
        """Round r's nodes, weighted for every level that contains them (levels r + 1
        and finer; round 0 also for the smallest level). Round 0 has alpha 0 and 1."""
        begin = self.round_ends[round_index - 1] if round_index else 0
        end = self.round_ends[round_index]
        first_level = self.first_level_of_round(round_index)
        alphas = self.alphas[begin:end]
        nodes = alphas.tolist()
        endpoints = (nodes.index(0.0), nodes.index(1.0)) if round_index == 0 else (None, None)
        return PathNodes(alphas, self.weights[first_level:, begin:end].contiguous(), *endpoints)

    def first_level_of_round(self, round_index: int) -> int:
        """The coarsest level holding round r's nodes: round r >= 1 adds level r + 1's."""
        return round_index + 1 if round_index else 0


def validate_max_steps(max_steps: Any) -> int:
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)):
        raise ArgumentError(f"`max_steps` must be an integer; got {max_steps!r}.")
    if not FIRST_ROUND_STEPS <= max_steps <= LARGEST_MAX_STEPS:
        raise ArgumentError(
            f"`max_steps` must be between {FIRST_ROUND_STEPS} (the first round of "
            f"n_steps='auto') and {LARGEST_MAX_STEPS}; got {max_steps}."
        )
    return int(max_steps)


@lru_cache(maxsize=16)
def nested_levels(max_steps: int, smallest: int = SMALLEST_LEVEL_STEPS) -> NestedLevels:
    """The Clenshaw-Curtis levels of smallest (5 or 3), 2 smallest - 1, ... nodes, up to
    at most max_steps; round 0 evaluates the second level."""
    max_steps = validate_max_steps(max_steps)
    steps = [smallest]
    while 2 * steps[-1] - 1 <= max_steps:
        steps.append(2 * steps[-1] - 1)
    finest = steps[-1] - 1  # intervals of the finest level
    # Nodes by their index on the finest grid, in round order.
    first = list(range(0, finest + 1, finest // (steps[1] - 1)))
    order, round_ends = list(first), [len(first)]
    for level_steps in steps[2:]:
        stride = finest // (level_steps - 1)
        order += list(range(stride, finest, 2 * stride))
        round_ends.append(len(order))
    position = {grid_index: column for column, grid_index in enumerate(order)}
    weights = np.zeros((len(steps), len(order)))
    for level, level_steps in enumerate(steps):
        stride = finest // (level_steps - 1)
        _, level_weights = _clenshaw_curtis(level_steps - 1)
        for j, w in enumerate(level_weights):
            weights[level, position[j * stride]] = w
    finest_alphas, _ = _clenshaw_curtis(finest)
    # Exact 0, 0.5 and 1 where the cosine formula leaves rounding (1 - cos(pi/2) is 1 - 6e-17).
    alphas = np.round(finest_alphas[order], 15)
    return NestedLevels(torch.tensor(alphas, dtype=torch.float64),
                        torch.tensor(weights, dtype=torch.float64), tuple(steps), tuple(round_ends))
