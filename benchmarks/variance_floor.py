"""The smallest variance any unbiased random-feature estimator of a dot-product kernel can have with D
output columns, for inputs uniform on a sphere (issue #13's "isotropic" ppSBN inputs), next to the
closed-form variance of the library's Kar & Karnick estimator on the same inputs.

Why a floor exists. Let phi: sphere -> R^D be any random map (Rademacher, Hadamard, complex or
positive projections, any degree law, exact features included) with E[phi(x) . phi(y)] = k(x, y).
Write phi(x) = A psi(x) in an orthonormal basis psi of L2(sphere) that diagonalises k (spherical
harmonics: k(x, y) = sum_i lambda_i psi_i(x) psi_i(y), Funk-Hecke). Unbiasedness is E[A^T A] = Lambda,
and for x, y independent and uniform E_xy[(phi(x) . phi(y))^2] = ||P||_F^2 with P = A^T A, which is
PSD of rank <= D. The convex envelope of ||P||_F^2 over matrices of rank <= D is the squared spectral
D-support norm (Argyriou, Foygel & Srebro 2012; McDonald, Pontil & Stamos 2014), so by Jensen
    E ||P||_F^2 >= sum_E lambda_i^2 + (sum_T lambda_i)^2 / (D - |E|),
where E holds the largest eigenvalues above the water level (sum_T lambda_i) / (D - |E|) and T the
rest. Keeping E exactly and sampling D - |E| of the others without replacement, with probabilities
proportional to lambda_i, attains it: the floor is the exact minimum of the mean pair variance,
    (sum_T lambda_i)^2 / (D - |E|) - sum_T lambda_i^2.
To first order in the noise, the mean squared error of attention with independent values is this
same functional (the query's and the keys' features enter only through P), so sqrt(floor / variance)
bounds how far an estimator's attention error can fall below another's while both errors are small.
"""

from __future__ import annotations

import math

import torch

from macformer.kernels import DotProductKernel, get_kernel

QUADRATURE_POINTS = 20001  # trapezoid rule in the angle: the integrands are smooth and periodic
# Harmonic degrees are added until one carries less than this fraction of k(x, x) and their sum is
# within SERIES_CHECK of it: the quadrature's rounding times the multiplicities reaches ~1e-9 of k(x, x)
# by degree 20-25 (exp, inverse, log), after which the terms would be noise.
SERIES_TOLERANCE = 1e-8
SERIES_CHECK = 1e-6
MAX_HARMONIC_DEGREE = 200


def multiplicity(degree: int, sphere_dim: int) -> int:
    """Dimension of the degree-l spherical harmonics on the sphere in R^sphere_dim."""
    lower = math.comb(degree + sphere_dim - 3, degree - 2) if degree >= 2 else 0
    return math.comb(degree + sphere_dim - 1, degree) - lower


def _angle_grid(sphere_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Points z = cos(theta) and trapezoid weights of the law of x . y / |x|^2 for x, y uniform."""
    theta = torch.linspace(0, math.pi, QUADRATURE_POINTS, dtype=torch.float64)
    density = torch.sin(theta) ** (sphere_dim - 2)
    weights = density * (theta[1] - theta[0])
    weights[[0, -1]] /= 2
    return torch.cos(theta), weights / weights.sum()


def harmonic_coefficients(kernel: str | DotProductKernel, temperature: float,
                          sphere_dim: int) -> tuple[list[float], list[int]]:
    """(b_l, N_l): k(x, y) = f(x . y) on the sphere |x|^2 = temperature in R^sphere_dim is
    sum_l b_l N_l P_l(x . y / t), P_l the Gegenbauer polynomial with P_l(1) = 1; b_l is the eigenvalue
    of each of the N_l orthonormal degree-l harmonics (Funk-Hecke: b_l = E_z[f(t z) P_l(z)])."""
    if sphere_dim < 3:
        raise ValueError(f"sphere_dim must be >= 3, got {sphere_dim}")
    fn = get_kernel(kernel).fn
    z, weights = _angle_grid(sphere_dim)
    values = fn(temperature * z) * weights
    total = float(fn(torch.tensor(temperature, dtype=torch.float64)))
    previous, current = torch.ones_like(z), z.clone()
    coefficients, multiplicities, captured = [], [], 0.0
    for degree in range(MAX_HARMONIC_DEGREE):
        coefficient = float((values * previous).sum())
        coefficients.append(coefficient)
        multiplicities.append(multiplicity(degree, sphere_dim))
        captured += coefficient * multiplicities[-1]
        # A zero term before convergence is a kernel without this degree (e.g. odd or even ones).
        if abs(coefficient * multiplicities[-1]) <= SERIES_TOLERANCE * total \
                and abs(total - captured) <= SERIES_CHECK * total:
            return coefficients, multiplicities
        # (l + n - 2) P_{l+1} = (2 l + n - 2) z P_l - l P_{l-1}, n = sphere_dim
        previous, current = current, ((2 * degree + sphere_dim) * z * current
                                      - (degree + 1) * previous) / (degree + sphere_dim - 1)
    raise ValueError(f"the harmonic series of {kernel!r} at t={temperature} did not converge to k(x, x) = "
                     f"{total:.9g} within degree {MAX_HARMONIC_DEGREE} (more QUADRATURE_POINTS needed?)")


def unbiased_variance_floor(kernel: str | DotProductKernel, temperature: float, sphere_dim: int,
                            num_features: int) -> float:
    """The smallest mean, over independent uniform pairs on the sphere, of Var[phi(x) . phi(y)] that
    any unbiased random feature map with num_features columns can have (see the module docstring)."""
    coefficients, multiplicities = harmonic_coefficients(kernel, temperature, sphere_dim)
    if min(coefficients) < -SERIES_CHECK * max(coefficients):
        raise ValueError(f"{kernel!r} is not positive definite on the sphere: no real unbiased features exist")
    return water_filling_floor(list(zip(coefficients, multiplicities, strict=True)), num_features)


def water_filling_floor(eigenvalues: list[tuple[float, int]], num_features: int) -> float:
    """min E ||P||_F^2 - ||Lambda||_F^2 over random PSD P of rank <= num_features with E P = Lambda, for
    Lambda given as (eigenvalue, multiplicity) pairs: the largest eigenvalues are kept exactly while
    one exceeds the water level (the rest's sum over the columns left), the rest sampled."""
    groups = sorted(eigenvalues, key=lambda group: -group[0])
    tail_sum = sum(value * count for value, count in groups)
    tail_squares = sum(value * value * count for value, count in groups)
    exact = 0  # |E|, one coordinate at a time
    for value, count in groups:
        for _ in range(count):
            # Always true by the last column (the tail holds the next coordinate): exact < num_features here.
            if value * (num_features - exact) <= tail_sum:
                return max(tail_sum**2 / (num_features - exact) - tail_squares, 0.0)
            tail_sum -= value
            tail_squares -= value**2
            exact += 1
    return 0.0  # no more coordinates than columns: the map can be exact


def kar_karnick_variance(kernel: str | DotProductKernel, x: torch.Tensor, y: torch.Tensor, num_features: int,
                         p: float = 2.0, series_terms: int = 60) -> torch.Tensor:
    """Per pair Var[phi(x) . phi(y)] of RandomMaclaurinFeatures with degrees 0 and 1 exact (the
    library's default map): its num_features - 1 - d random features are i.i.d., each of degree
    n >= 2 with P(n) = (1 - 1/p) p^-(n-2) and Rademacher factors whose product has the second moment
    E[(w.x)^2 (w.y)^2] = |x|^2 |y|^2 + 2 (x.y)^2 - 2 sum_i x_i^2 y_i^2 per degree."""
    kernel = get_kernel(kernel)
    x, y = x.double(), y.double()
    num_random = num_features - 1 - x.shape[-1]
    dot = (x * y).sum(-1)
    factor_moment = (x * x).sum(-1) * (y * y).sum(-1) + 2 * dot**2 - 2 * (x * x * y * y).sum(-1)
    coefficients = kernel.coefficients(series_terms).double()
    second_moment = torch.zeros_like(dot)
    for degree in range(2, series_terms + 1):
        probability = (1 - 1 / p) * p ** -(degree - 2)
        second_moment += coefficients[degree] ** 2 / probability * factor_moment**degree
    random_part_mean = kernel.fn(dot) - coefficients[0] - coefficients[1] * dot
    return (second_moment - random_part_mean**2) / num_random
