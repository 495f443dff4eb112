"""The variance floor of unbiased random-feature estimators (benchmarks/variance_floor.py): its harmonic
expansion, the closed-form variance of the library's estimator, and the bound against estimators."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks.maclaurin_estimators import PROJECTIONS, SampledDegreeFeatures, tuned_law
from benchmarks.variance_floor import (
    harmonic_coefficients,
    kar_karnick_variance,
    unbiased_variance_floor,
    water_filling_floor,
)
from macformer.features import RandomMaclaurinFeatures
from macformer.kernels import get_kernel


def _uniform_on_sphere(count: int, dim: int, temperature: float, seed: int) -> torch.Tensor:
    x = torch.randn(count, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True) * math.sqrt(temperature)


def _mean_pair_variance(features: list, x: torch.Tensor, y: torch.Tensor) -> float:
    estimates = torch.stack([(feature(x.float()) * feature(y.float())).sum(-1).double() for feature in features])
    return float(estimates.var(0).mean())


@pytest.mark.parametrize(("kernel", "temperature"), [("exp", 2.0), ("inverse", 0.5), ("log", 0.4)])
def test_the_harmonic_expansion_reproduces_the_kernel(kernel: str, temperature: float) -> None:
    fn = get_kernel(kernel).fn
    # On the 2-sphere the P_l are Legendre polynomials (numpy's, not the module's recurrence) and N_l = 2l + 1.
    coefficients, multiplicities = harmonic_coefficients(kernel, temperature, 3)
    assert multiplicities == [2 * degree + 1 for degree in range(len(coefficients))]
    for z in (-1.0, -0.3, 0.0, 0.6, 1.0):
        series = np.polynomial.legendre.legval(z, np.array(coefficients) * np.array(multiplicities))
        assert series == pytest.approx(float(fn(torch.tensor(temperature * z, dtype=torch.float64))), rel=1e-6)
    # In 31 dimensions, at z = +-1 where P_l(+-1) = (+-1)^l.
    coefficients, multiplicities = harmonic_coefficients(kernel, temperature, 31)
    for sign in (1, -1):
        terms = enumerate(zip(coefficients, multiplicities, strict=True))
        series = sum(b * n * sign**degree for degree, (b, n) in terms)
        assert series == pytest.approx(float(fn(torch.tensor(sign * temperature, dtype=torch.float64))), rel=1e-6)


def test_the_closed_form_variance_of_the_library_estimator_matches_its_draws() -> None:
    x, y = _uniform_on_sphere(64, 8, 1.5, 0), _uniform_on_sphere(64, 8, 1.5, 1)
    features = [RandomMaclaurinFeatures(8, 24, "exp", seed=seed, constant_feature=True, linear_features=True)
                for seed in range(3000)]
    closed_form = float(kar_karnick_variance("exp", x, y, 24).mean())
    assert _mean_pair_variance(features, x, y) == pytest.approx(closed_form, rel=0.1)


def test_the_floor_is_reached_where_coordinate_sampling_is_optimal() -> None:
    # Linear kernel f(s) = s on the sphere |x|^2 = t in R^n: one harmonic degree, n equal eigenvalues t / n.
    # D of the n coordinates, sampled without replacement and scaled by sqrt(n / D), are unbiased with mean
    # pair variance t^2 (1 / D - 1 / n): the floor, which is therefore tight here.
    n, columns, temperature = 12, 5, 2.0
    floor = unbiased_variance_floor([0.0, 1.0], temperature, n, columns)
    assert floor == pytest.approx(temperature**2 * (1 / columns - 1 / n), rel=1e-6)
    assert unbiased_variance_floor([0.0, 1.0], temperature, n, n) == pytest.approx(0.0, abs=1e-9)  # exact map

    def coordinate_sample(seed: int):
        kept = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:columns]
        return lambda x: x[..., kept] * math.sqrt(n / columns)

    x, y = _uniform_on_sphere(256, n, temperature, 0), _uniform_on_sphere(256, n, temperature, 1)
    assert _mean_pair_variance([coordinate_sample(seed) for seed in range(3000)], x, y) == pytest.approx(floor, rel=0.1)


def test_the_water_level_keeps_large_eigenvalues_exact_and_samples_the_rest() -> None:
    # (10, 1, 1) with 2 columns: 10 stays exact (10 > (10 + 1 + 1) / 2), the two 1s share one column, sampled
    # with probability 1/2 each: E||P||^2 = 100 + 2 * 1 / (1/2), minus ||Lambda||^2 = 102.
    assert water_filling_floor([(10.0, 1), (1.0, 2)], 2) == pytest.approx(2.0)
    assert water_filling_floor([(1.0, 4)], 2) == pytest.approx(4.0)  # 2 of 4 equal ones: 4^2 / 2 - 4
    assert water_filling_floor([(3.0, 2), (1.0, 1)], 3) == 0.0  # as many columns as coordinates: exact
    # The sampler that attains it: P = diag(10, 2, 0) or diag(10, 0, 2), each with probability 1/2.
    draws = [torch.tensor([10.0, 2.0, 0.0]), torch.tensor([10.0, 0.0, 2.0])]
    torch.testing.assert_close(sum(draws) / 2, torch.tensor([10.0, 1.0, 1.0]))  # E P = Lambda: unbiased
    assert sum(float((d**2).sum()) for d in draws) / 2 - 102.0 == pytest.approx(2.0)


def test_no_estimator_goes_below_the_floor() -> None:
    dim, columns, temperature = 8, 24, 1.0
    x, y = _uniform_on_sphere(128, dim, temperature, 0), _uniform_on_sphere(128, dim, temperature, 1)
    floor = unbiased_variance_floor("exp", temperature, dim, columns)
    assert floor > 0
    assert float(kar_karnick_variance("exp", x, y, columns).mean()) > floor
    for projections in PROJECTIONS:
        features = [SampledDegreeFeatures(dim, columns, "exp", tuned_law("exp", temperature), projections, seed)
                    for seed in range(1500)]
        assert _mean_pair_variance(features, x, y) > 0.95 * floor, projections  # 0.95: sampling noise of 1500 draws


def test_issue_13s_target_is_below_the_floor() -> None:
    # Issue #13 asks for 0.7x Kar & Karnick's attention error at t = 1 and 2 (D = 128, head_dim 32; preSBN's
    # centred inputs lie on the 31-sphere). The best unbiased map reaches 0.81x and 0.89x.
    x, y = _uniform_on_sphere(4096, 32, 1.0, 0), _uniform_on_sphere(4096, 32, 1.0, 1)
    x, y = x - x.mean(-1, keepdim=True), y - y.mean(-1, keepdim=True)
    x, y = x / x.norm(dim=-1, keepdim=True), y / y.norm(dim=-1, keepdim=True)
    ratios = {}
    for temperature in (1.0, 2.0):
        scale = math.sqrt(temperature)
        variance = float(kar_karnick_variance("exp", x * scale, y * scale, 128).mean())
        ratios[temperature] = math.sqrt(unbiased_variance_floor("exp", temperature, 31, 128) / variance)
    assert 0.78 < ratios[1.0] < 0.85 and 0.86 < ratios[2.0] < 0.93, ratios
