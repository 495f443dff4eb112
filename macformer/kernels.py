"""Dot-product kernels f(t) = sum_n a_n t^n with non-negative Maclaurin coefficients.

Each kernel knows its coefficients a_0..a_n, its exact closed form (the ground truth that random
Maclaurin features estimate) and its radius of convergence. Inputs with |t| at or beyond the radius
are outside the series' domain: ppSBN keeps |q.k| strictly inside it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from macformer.errors import MacformerError

__all__ = ["KERNELS", "DotProductKernel", "get_kernel", "kernel_from_coefficients"]

# Coefficients of user kernels given as a callable are checked for sign up to this degree.
COEFFICIENT_CHECK_DEGREE = 64


@dataclass(frozen=True)
class DotProductKernel:
    """A dot-product kernel f(t) = sum_{n>=0} a_n t^n with a_n >= 0.

    Attributes:
        name: identifier used in configs and logs.
        coefficient: n -> a_n.
        exact: elementwise closed form of f on a tensor of dot products.
        radius: radius of convergence of the series (math.inf for entire functions).
        max_degree: highest non-zero degree for polynomial kernels, None for infinite series.
        log_exact: log f, where it has a closed form that cannot overflow (exp, trigh: the identity),
            so that normalised attention weights are computable for any |q . k|.
    """

    name: str
    coefficient: Callable[[int], float]
    exact: Callable[[torch.Tensor], torch.Tensor]
    radius: float
    max_degree: int | None = None
    log_exact: Callable[[torch.Tensor], torch.Tensor] | None = None

    def coefficients(self, n: int) -> torch.Tensor:
        """a_0..a_n as a float64 tensor of length n + 1."""
        if not isinstance(n, int) or n < 0:
            raise MacformerError(f"coefficients(n) needs a non-negative integer degree, got {n!r}")
        return torch.tensor([self.coefficient(i) for i in range(n + 1)], dtype=torch.float64)

    def fn(self, t: torch.Tensor) -> torch.Tensor:
        """Exact f(t). Values with |t| >= radius are outside the series' domain."""
        return self.exact(t)

    def series(self, t: torch.Tensor, degree: int) -> torch.Tensor:
        """Partial sum sum_{n<=degree} a_n t^n (what a feature map truncated at `degree` estimates)."""
        return _partial_sum(self.coefficients(degree).tolist(), t)


def _partial_sum(coefficients: Sequence[float], t: torch.Tensor) -> torch.Tensor:
    total = torch.zeros_like(t)
    for a_n in reversed(coefficients):  # Horner's rule
        total = total * t + a_n
    return total


def _exp_coefficient(n: int) -> float:
    return math.exp(-math.lgamma(n + 1))  # 1/n!, underflowing to 0 instead of overflowing n!


def _log_coefficient(n: int) -> float:
    return 1.0 if n == 0 else 1.0 / n


def _sqrt_coefficient(n: int) -> float:
    # 2 - sqrt(1 - t): a_0 = 2 - 1 = 1; for n >= 1, a_n = |binom(1/2, n)|.
    if n == 0:
        return 1.0
    binom = 1.0
    for i in range(n):
        binom *= (0.5 - i) / (i + 1)
    return abs(binom)


def _trigh_exact(t: torch.Tensor) -> torch.Tensor:
    return torch.cosh(t) + torch.sinh(t)


KERNELS: dict[str, DotProductKernel] = {
    "exp": DotProductKernel("exp", _exp_coefficient, torch.exp, math.inf, log_exact=lambda t: t),
    "inverse": DotProductKernel("inverse", lambda n: 1.0, lambda t: 1.0 / (1.0 - t), 1.0),
    "log": DotProductKernel("log", _log_coefficient, lambda t: 1.0 - torch.log1p(-t), 1.0),
    # cosh(t) + sinh(t) has the coefficients of exp(t) term by term (even terms from cosh, odd from
    # sinh): it *is* exp. The name is kept for parity with the Macformer paper's kernel list.
    "trigh": DotProductKernel("trigh", _exp_coefficient, _trigh_exact, math.inf, log_exact=lambda t: t),
    "sqrt": DotProductKernel("sqrt", _sqrt_coefficient, lambda t: 2.0 - torch.sqrt(1.0 - t), 1.0),
}


def kernel_from_coefficients(
    coefficients: Sequence[float] | Callable[[int], float],
    name: str = "custom",
    radius: float | None = None,
    num_terms: int = COEFFICIENT_CHECK_DEGREE,
) -> DotProductKernel:
    """A user-defined kernel from a finite coefficient list (a polynomial) or a callable n -> a_n.

    A finite list defines a polynomial with infinite radius. A callable defines an infinite series:
    give its radius of convergence (default 1.0); its exact value is the partial sum up to `num_terms`.
    Negative coefficients are rejected (the features would need imaginary weights).
    """
    if callable(coefficients):
        values = [float(coefficients(n)) for n in range(num_terms + 1)]
        coefficient = lambda n: float(coefficients(n))
        max_degree = None
        radius = 1.0 if radius is None else radius
    else:
        values = [float(c) for c in coefficients]
        if not values:
            raise MacformerError("a user-defined kernel needs at least one coefficient, got an empty list")
        coefficient = lambda n: values[n] if n < len(values) else 0.0
        max_degree = len(values) - 1
        radius = math.inf if radius is None else radius
    bad = [(n, a) for n, a in enumerate(values) if not math.isfinite(a) or a < 0]
    if bad:
        n, a = bad[0]
        raise MacformerError(
            f"kernel coefficients must be finite and non-negative (random Maclaurin features need "
            f"a_n >= 0); coefficient a_{n} = {a}"
        )
    if not radius > 0:
        raise MacformerError(f"radius of convergence must be positive, got {radius}")
    exact_terms = values if max_degree is not None else values[: num_terms + 1]
    return DotProductKernel(name, coefficient, lambda t: _partial_sum(exact_terms, t), radius, max_degree)


def get_kernel(kernel: str | DotProductKernel | Sequence[float]) -> DotProductKernel:
    """Resolve a kernel by name ("exp", "inverse", "log", "trigh", "sqrt"), pass a kernel through,
    or build a polynomial kernel from a coefficient list."""
    if isinstance(kernel, DotProductKernel):
        return kernel
    if isinstance(kernel, str):
        if kernel not in KERNELS:
            raise MacformerError(
                f"unknown kernel {kernel!r}; valid choices: {', '.join(sorted(KERNELS))}, "
                "or a list of non-negative Maclaurin coefficients"
            )
        return KERNELS[kernel]
    if isinstance(kernel, Sequence):
        return kernel_from_coefficients(kernel)
    raise MacformerError(
        f"kernel must be a name ({', '.join(sorted(KERNELS))}), a DotProductKernel or a coefficient "
        f"list, got {type(kernel).__name__}"
    )
