import math

import pytest
import torch

from macformer.kernels import KERNELS, get_kernel, kernel_from_coefficients

T = torch.linspace(-0.9, 0.9, 37, dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_series_matches_closed_form_inside_radius(name: str) -> None:
    kernel = get_kernel(name)
    assert kernel.coefficients(0).tolist() == [1.0]  # a_0 = 1 for all built-ins
    torch.testing.assert_close(kernel.series(T, 400), kernel.fn(T), rtol=1e-9, atol=1e-9)


def test_known_coefficients() -> None:
    assert get_kernel("exp").coefficients(4).tolist() == pytest.approx([1, 1, 1 / 2, 1 / 6, 1 / 24])
    assert get_kernel("inverse").coefficients(3).tolist() == [1, 1, 1, 1]
    assert get_kernel("log").coefficients(3).tolist() == pytest.approx([1, 1, 1 / 2, 1 / 3])
    assert get_kernel("sqrt").coefficients(3).tolist() == pytest.approx([1, 1 / 2, 1 / 8, 1 / 16])
    assert get_kernel("exp").radius == math.inf and get_kernel("inverse").radius == 1.0


def test_trigh_is_exp() -> None:
    trigh, exp = get_kernel("trigh"), get_kernel("exp")
    assert torch.equal(trigh.coefficients(30), exp.coefficients(30))
    torch.testing.assert_close(trigh.fn(T * 5), exp.fn(T * 5))


def test_user_kernels() -> None:
    poly = get_kernel([1.0, 0.0, 2.0])  # 1 + 2 t^2
    assert poly.max_degree == 2 and poly.radius == math.inf
    torch.testing.assert_close(poly.fn(T), 1 + 2 * T**2)
    series = kernel_from_coefficients(lambda n: 0.5**n, name="halves", radius=2.0)
    torch.testing.assert_close(series.fn(T), 1 / (1 - T / 2))


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("gaussian", "valid choices: exp, inverse, log, sqrt, trigh"),
        ([1.0, -0.5], "a_1 = -0.5"),
        ([], "at least one coefficient"),
        (3.0, "must be a name"),
        ([1.0, float("nan")], "finite and non-negative"),
    ],
)
def test_bad_kernels_raise(arg: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_kernel(arg)  # type: ignore[arg-type]


def test_callable_with_negative_coefficient_and_bad_degree() -> None:
    with pytest.raises(ValueError, match="a_3"):
        kernel_from_coefficients(lambda n: -1.0 if n == 3 else 1.0)
    with pytest.raises(ValueError, match="non-negative integer"):
        get_kernel("exp").coefficients(-1)
