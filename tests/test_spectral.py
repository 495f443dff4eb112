"""Spectraformer's (component, weights) grid: estimators, weight samplers, attention through one path."""

import itertools
import math

import pytest
import torch
from conftest import presbn_like, unit_rows

from macformer.attention import causal_feature_attention, feature_attention, kernel_attention, naive_feature_attention
from macformer.features import COMPONENTS, WEIGHTS, SpectralFeatures, get_sampler
from macformer.features.spectral import gerf_parameters, oprf_a

DIM = 16
# Each component with its parameters; "gerf" is shown at a non-zero A in both signs.
COMPONENT_SETTINGS = {
    "trigrf": {}, "posrf": {}, "oprf": {"oprf_rho": 0.1},
    "gerf-pos": {"component": "gerf", "gerf_a": -0.05, "gerf_sign": 1},
    "gerf-trig": {"component": "gerf", "gerf_a": -0.05, "gerf_sign": -1},
}


def _map(name: str, weights: str, num_features: int, seed: int, **kwargs) -> SpectralFeatures:
    settings = {"component": name, **COMPONENT_SETTINGS[name], **kwargs}
    return SpectralFeatures(DIM, num_features, weights=weights, seed=seed, **settings)


def _pairs(norm: float, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return unit_rows(n, DIM, norm, generator), unit_rows(n, DIM, norm, generator)


def _estimates(make, x: torch.Tensor, y: torch.Tensor, draws: int) -> torch.Tensor:
    return torch.stack([(lambda m: (m(x) * m(y)).sum(-1))(make(seed)) for seed in range(draws)]).double()


@pytest.mark.parametrize("name", sorted(COMPONENT_SETTINGS))
def test_every_component_estimates_the_softmax_kernel(name: str) -> None:
    x, y = _pairs(norm=0.8)
    sigma = 0.9
    estimates = _estimates(lambda s: _map(name, "gaussian", 64, s, sigma=sigma), x, y, 400)
    exact = torch.exp(sigma**2 * (x * y).sum(-1)).double()
    mean, stderr = estimates.mean(0), estimates.std(0) / math.sqrt(estimates.shape[0])
    assert torch.all((mean - exact).abs() <= 5 * stderr + 1e-6), (mean, exact, stderr)


def test_trigonometric_features_without_their_norm_factor_estimate_the_gaussian_kernel() -> None:
    x, y = _pairs(norm=1.3)
    estimates = _estimates(lambda s: _map("trigrf", "gaussian", 64, s), x, y, 400)
    gaussian = torch.exp(-(x - y).square().sum(-1) / 2).double()
    norms = torch.exp((x.square().sum(-1) + y.square().sum(-1)) / 2).double()
    mean, stderr = (estimates / norms).mean(0), (estimates / norms).std(0) / 20
    assert torch.all((mean - gaussian).abs() <= 5 * stderr + 1e-6)


def test_named_components_are_members_of_the_gerf_family() -> None:
    x = torch.randn(5, DIM) * 0.5
    for name, sign in (("trigrf", -1), ("posrf", 1)):
        torch.testing.assert_close(_map(name, "gaussian", 32, 0)(x),
                                   SpectralFeatures(DIM, 32, "gerf", "gaussian", gerf_sign=sign, seed=0)(x))
    rho = 0.7
    a = oprf_a(rho)
    torch.testing.assert_close(SpectralFeatures(DIM, 32, "oprf", "gaussian", oprf_rho=rho, seed=0)(x),
                               SpectralFeatures(DIM, 32, "gerf", "gaussian", gerf_a=a, seed=0)(x))
    # A* solves d Var / dA = 0: 16 A^2 + (4 rho - 2) A - rho = 0, and A* = 0 at rho = 0.
    assert 16 * a**2 + (4 * rho - 2) * a - rho == pytest.approx(0, abs=1e-12) and a < 0 and oprf_a(0.0) == 0


def test_oprf_has_lower_variance_than_posrf_for_large_inputs() -> None:
    x, y = _pairs(norm=2.0)
    rho = ((x[:, None] + y[None]).square().sum(-1) / DIM).mean().item()
    variances = {}
    for name, kwargs in (("posrf", {}), ("oprf", {"oprf_rho": rho})):
        make = lambda s, component=name, kw=kwargs: SpectralFeatures(DIM, 64, component, "gaussian", seed=s, **kw)
        estimates = _estimates(make, x, y, 300)
        variances[name] = (estimates / torch.exp((x * y).sum(-1)).double()).var(0).mean().item()
    assert variances["oprf"] < 0.6 * variances["posrf"], variances


def test_query_features_drop_only_a_per_row_factor() -> None:
    x = torch.randn(4, DIM)
    for name in COMPONENT_SETTINGS:
        mapped = _map(name, "orthogonal", 32, 0)
        ratio = mapped(x, is_query=True) / mapped(x)
        torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))
    positive = _map("posrf", "orthogonal", 32, 0)
    assert positive(x * 30, is_query=True).isfinite().all() and positive(x * 30, is_query=True).amax(-1).gt(0).all()


def test_fastfood_rows_have_gaussian_norms_and_learned_weights_train() -> None:
    for dim in (16, 12):
        weights = get_sampler("fastfood")(dim * 300, dim, torch.Generator().manual_seed(0))
        assert weights.norm(dim=-1).square().mean().item() == pytest.approx(dim, rel=0.05)
    block = get_sampler("fastfood")(16, 16, torch.Generator().manual_seed(0))
    directions = block / block.norm(dim=-1, keepdim=True)
    assert (directions @ directions.T - torch.eye(16)).abs().max() < 1.0  # mixed, not a permuted identity
    mapped = _map("oprf", "fastfood_learned", 48, 0)
    parameters = dict(mapped.named_parameters())
    assert set(parameters) == {"fastfood.scales", "fastfood.gaussians", "fastfood.signs"}
    mapped(torch.randn(3, DIM)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in parameters.values())
    with pytest.raises(RuntimeError, match="trained, not redrawn"):
        mapped.redraw()
    with pytest.raises(ValueError, match="leave redraw_interval unset"):
        _map("posrf", "fastfood_learned", 48, 0, redraw_interval=3)
    twin = _map("oprf", "fastfood_learned", 48, 1)
    twin.load_state_dict(mapped.state_dict())
    x = torch.randn(3, DIM)
    torch.testing.assert_close(twin(x), mapped(x), rtol=0, atol=0)


def test_learned_sigma_is_per_head_and_trainable() -> None:
    mapped = SpectralFeatures(DIM, 32, "trigrf", "gaussian", learned_sigma=True, num_heads=3, sigma=0.5, seed=0)
    x = torch.randn(2, 3, 5, DIM)
    mapped(x).sum().backward()
    assert mapped.log_sigma.shape == (3, 1, 1) and mapped.log_sigma.grad is not None
    torch.testing.assert_close(mapped.bandwidth().flatten(), torch.full((3,), 0.5))


GRID = list(itertools.product(sorted(COMPONENT_SETTINGS), WEIGHTS))


@pytest.mark.parametrize(("name", "weights"), GRID)
def test_every_pair_runs_noncausal_causal_and_recurrent_through_one_path(name: str, weights: str) -> None:
    q, k, v = presbn_like((2, 2, 13, DIM)), presbn_like((2, 2, 13, DIM)), torch.randn(2, 2, 13, 8)
    padding = torch.zeros(2, 13, dtype=torch.bool)
    padding[1, 10:] = True
    feature_map = _map(name, weights, 40, 0)
    keep = (~padding)[:, None, :, None].float()
    query_features, key_features = feature_map(q, is_query=True), feature_map(k) * keep
    for causal in (False, True):
        reference = naive_feature_attention(query_features, key_features, v * keep, causal, padding)
        fast = feature_attention(q, k, v, feature_map, causal=causal, key_padding_mask=padding, chunk_size=4)
        torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    state, steps = None, []
    for t in range(13):
        out, state = causal_feature_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], feature_map,
                                              state=state, key_padding_mask=padding[:, t:t + 1])
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 2)[0], fast[0], atol=1e-5, rtol=1e-5)  # row 0 has no padding


def _attention_error(name: str, weights: str, num_features: int, q, k, v, exact) -> float:
    errors = [((feature_attention(q, k, v, _map(name, weights, num_features, s)) - exact).norm() / exact.norm()).item()
              for s in range(3)]
    return sum(errors) / len(errors)


@pytest.mark.parametrize(("name", "weights"), GRID)
def test_attention_of_every_pair_converges_to_softmax_attention(name: str, weights: str) -> None:
    q, k, v = presbn_like((2, 2, 48, DIM), 0.5), presbn_like((2, 2, 48, DIM), 0.5), torch.randn(2, 2, 48, 8)
    exact = kernel_attention(q, k, v, "exp")
    small, large = (_attention_error(name, weights, d, q, k, v, exact) for d in (34, 2048))
    _, a = gerf_parameters(**{"component": name, **COMPONENT_SETTINGS[name]}, dim=DIM)
    if weights == "sorf" and a != 0:
        # SORF rows all have norm sqrt(d); with A != 0 each feature is weighted by exp(A |w|^2), whose
        # mean the (1 - 4A)^(d/4) factor computes for chi(d) norms: a bias that more features keep.
        assert large < 0.05, (small, large)
    else:
        assert large < 0.02 and small / large > 3, (small, large)


def test_every_component_and_weight_name_is_covered() -> None:
    assert set(COMPONENTS) == {"trigrf", "posrf", "oprf", "gerf"}
    assert set(WEIGHTS) == {"gaussian", "orthogonal", "sorf", "qmc", "moment_matched", "fastfood", "fastfood_learned"}
    with pytest.raises(ValueError, match="unknown component function 'arccos'"):
        SpectralFeatures(DIM, 16, "arccos")
    with pytest.raises(ValueError, match="unknown weight matrix 'sgq'"):
        SpectralFeatures(DIM, 16, weights="sgq")
    with pytest.raises(ValueError, match="cos/sin pairs"):
        SpectralFeatures(DIM, 15, "trigrf")
    with pytest.raises(ValueError, match="below 1/8"):
        SpectralFeatures(DIM, 16, "gerf", gerf_a=0.125)
    with pytest.raises(ValueError, match=r"\+1 \(positive\) or -1"):
        SpectralFeatures(DIM, 16, "gerf", gerf_sign=0)
    with pytest.raises(ValueError, match="num_heads"):
        SpectralFeatures(DIM, 16, learned_sigma=True)
