import math

import pytest
import torch
from conftest import unit_rows

from macformer.features import SAMPLERS, RandomMaclaurinFeatures, SpectralFeatures, get_sampler
from macformer.features.maclaurin import FEW_ROWS, ROWS_PER_BLOCK
from macformer.features.samplers import hadamard
from macformer.kernels import get_kernel

DIM = 16
KERNEL_NAMES = ["exp", "inverse", "log", "trigh", "sqrt"]


def _pairs(norm: float = 0.7, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return unit_rows(n, DIM, norm, generator), unit_rows(n, DIM, norm, generator)


def _estimates(make, x: torch.Tensor, y: torch.Tensor, draws: int) -> torch.Tensor:
    """[draws, pairs] of phi(x) . phi(y), one independent map per draw."""
    return torch.stack([(lambda m: (m(x) * m(y)).sum(-1))(make(seed)) for seed in range(draws)]).double()


def _assert_unbiased(estimates: torch.Tensor, exact: torch.Tensor) -> None:
    # The mean of R i.i.d. draws has standard error sd / sqrt(R); 5 standard errors per pair keeps
    # the chance of a false alarm over 8 pairs below 1e-5 while a bias of that size is caught.
    mean, stderr = estimates.mean(0), estimates.std(0) / math.sqrt(estimates.shape[0])
    assert torch.all((mean - exact.double()).abs() <= 5 * stderr + 1e-6), (mean, exact, stderr)


EXACT_TERMS = {"none": {}, "constant": {"constant_feature": True},
               "constant+linear": {"constant_feature": True, "linear_features": True}}


@pytest.mark.parametrize("name", KERNEL_NAMES)
@pytest.mark.parametrize("exact_terms", sorted(EXACT_TERMS))
def test_maclaurin_estimator_is_unbiased(name: str, exact_terms: str) -> None:
    x, y = _pairs()
    make = lambda s: RandomMaclaurinFeatures(DIM, 64, kernel=name, seed=s, **EXACT_TERMS[exact_terms])
    estimates = _estimates(make, x, y, draws=400)
    exact = get_kernel(name).fn((x * y).sum(-1))
    _assert_unbiased(estimates, exact)
    # The estimate of the same point pair also has the right value: phi(x).phi(x) ~ f(|x|^2).
    self_estimates = torch.stack([(lambda m: m(x).square().sum(-1))(make(s)) for s in range(400)])
    assert torch.allclose(self_estimates.mean(0), get_kernel(name).fn(x.square().sum(-1)), rtol=0.05)


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_maclaurin_error_shrinks_like_inverse_sqrt_d(name: str) -> None:
    x, y = _pairs(n=64)
    exact = get_kernel(name).fn((x * y).sum(-1))
    errors = []
    dims = [64, 256, 1024, 4096]
    for num_features in dims:
        make = lambda s, size=num_features: RandomMaclaurinFeatures(DIM, size, kernel=name, seed=s)
        estimates = _estimates(make, x, y, 8)
        errors.append((estimates - exact).square().mean().sqrt().item())
    slope = (math.log(errors[-1]) - math.log(errors[0])) / (math.log(dims[-1]) - math.log(dims[0]))
    assert -0.7 < slope < -0.3, (errors, slope)
    assert 4 < errors[0] / errors[-1] < 16  # sqrt(4096 / 64) = 8


def test_exact_terms_lower_variance() -> None:
    x, y = _pairs(norm=0.4)
    variances = {
        name: _estimates(lambda s, kw=kwargs: RandomMaclaurinFeatures(DIM, 64, seed=s, **kw), x, y, 200).var(0).mean()
        for name, kwargs in EXACT_TERMS.items()
    }
    assert variances["constant"] < 0.7 * variances["none"]
    assert variances["constant+linear"] < 0.2 * variances["constant"]
    mapped = RandomMaclaurinFeatures(DIM, 64, seed=0, constant_feature=True, linear_features=True)
    assert mapped.degrees[: DIM + 1].tolist() == [0] + [1] * DIM and int(mapped.degrees[DIM + 1:].min()) >= 2


def test_max_degree_estimates_the_truncated_series() -> None:
    x, y = _pairs(norm=0.95)
    t = (x * y).sum(-1)
    kernel = get_kernel("inverse")
    estimates = _estimates(lambda s: RandomMaclaurinFeatures(DIM, 64, "inverse", seed=s, max_degree=2), x, y, 400)
    _assert_unbiased(estimates, kernel.series(t, 2))
    mapped = RandomMaclaurinFeatures(DIM, 256, "inverse", seed=0, max_degree=2)
    assert int(mapped.degrees.max()) <= 2


def test_polynomial_kernel_is_truncated_at_its_degree() -> None:
    x, y = _pairs()
    mapped = RandomMaclaurinFeatures(DIM, 128, kernel=[0.5, 0.0, 1.0], seed=0)
    assert int(mapped.degrees.max()) <= 2
    estimates = _estimates(lambda s: RandomMaclaurinFeatures(DIM, 64, kernel=[0.5, 0.0, 1.0], seed=s), x, y, 300)
    _assert_unbiased(estimates, 0.5 + (x * y).sum(-1) ** 2)


def test_degree_distribution_is_geometric() -> None:
    degrees = RandomMaclaurinFeatures(4, 200_000, seed=0).degrees.double()
    for n in range(4):
        assert (degrees == n).double().mean().item() == pytest.approx(2.0 ** -(n + 1), abs=0.005)
    p3 = RandomMaclaurinFeatures(4, 200_000, p=3.0, seed=0).degrees.double()
    assert (p3 == 0).double().mean().item() == pytest.approx(2 / 3, abs=0.005)


def test_projections_are_stacked_in_one_matrix() -> None:
    mapped = RandomMaclaurinFeatures(DIM, 256, seed=0)
    assert mapped.weights.shape == (int(mapped.degrees.sum()), DIM)
    assert set(mapped.weights.unique().tolist()) <= {-1.0, 1.0}
    # Feature i is sqrt(a_N / P(N) / D) * prod of its own rows' projections: check one by hand.
    x = torch.randn(3, DIM)
    index = int((mapped.degrees == 2).nonzero()[0])
    start = int(mapped.degrees[:index].sum())
    by_hand = (x @ mapped.weights[start:start + 2].T).prod(-1) * mapped.scales[index]
    torch.testing.assert_close(mapped(x)[:, index], by_hand)


@pytest.mark.parametrize("settings", [
    {}, {"constant_feature": True}, {"constant_feature": True, "linear_features": True}, {"max_degree": 3},
    {"kernel": "inverse", "p": 3.0}, {"kernel": "sqrt", "p": 1.5},
])
def test_fast_features_and_gradients_equal_the_reference(settings: dict) -> None:
    """The fused forward/backward against the plain construction (matmul with every row, products,
    concatenation), in float64, including an all-zero input row (padding)."""
    feature_map = RandomMaclaurinFeatures(DIM, 96, seed=3, **settings).double()
    x = torch.randn(2, 3, 11, DIM, dtype=torch.float64) * 0.4
    x[1, 0, 4] = 0
    x.requires_grad_()
    cotangent = torch.randn(2, 3, 11, 96, dtype=torch.float64)
    fast, reference = feature_map(x), feature_map.reference_forward(x)
    torch.testing.assert_close(fast, reference, atol=1e-12, rtol=1e-12)
    (fast_grad,) = torch.autograd.grad((fast * cotangent).sum(), x)
    (reference_grad,) = torch.autograd.grad((reference * cotangent).sum(), x)
    torch.testing.assert_close(fast_grad, reference_grad, atol=1e-12, rtol=1e-10)
    assert int(feature_map.degrees.max()) >= 3  # products of 3+ factors exercised, not only pairs
    assert torch.autograd.gradcheck(feature_map, (x[:1, :1, :3].detach().clone().requires_grad_(),))
    assert FEW_ROWS >= 2 * 3 * 11  # above: the gather form
    # The per-group form over row blocks: two full blocks and a partial one.
    many = (torch.randn(2 * ROWS_PER_BLOCK + 3, DIM, dtype=torch.float64) * 0.4).requires_grad_()
    fast, reference = feature_map(many), feature_map.reference_forward(many)
    torch.testing.assert_close(fast, reference, atol=1e-12, rtol=1e-12)
    cotangent = torch.randn_like(fast)
    (fast_grad,) = torch.autograd.grad((fast * cotangent).sum(), many)
    (reference_grad,) = torch.autograd.grad((reference * cotangent).sum(), many)
    torch.testing.assert_close(fast_grad, reference_grad, atol=1e-12, rtol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("settings", [{}, {"constant_feature": True, "linear_features": True}])
def test_the_feature_map_under_torch_compile_equals_the_reference(settings: dict) -> None:
    # Dynamo cannot trace the fused Function's out= writes: compiled, the map takes the gather form at
    # every size (here above FEW_ROWS; settings {} sample degree 0, whose scales the gather form writes).
    feature_map = RandomMaclaurinFeatures(DIM, 96, seed=3, **settings).double()
    x = torch.randn(FEW_ROWS + 5, DIM, dtype=torch.float64) * 0.4
    reference = feature_map.reference_forward(x)
    torch.testing.assert_close(feature_map(x), reference, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(torch.compile(feature_map)(x), reference, atol=1e-12, rtol=1e-12)


def test_the_fast_path_follows_redraws_loads_moves_and_in_place_edits() -> None:
    """Its rows are built once per draw: every way the draws can change rebuilds them."""
    feature_map = RandomMaclaurinFeatures(DIM, 64, seed=3, constant_feature=True, linear_features=True)
    x = torch.randn(5, DIM) * 0.4

    def check() -> None:
        torch.testing.assert_close(feature_map(x), feature_map.reference_forward(x), atol=1e-6, rtol=1e-5)

    first = feature_map(x)
    feature_map.redraw()
    check()
    assert not torch.allclose(feature_map(x), first)
    feature_map.load_state_dict(RandomMaclaurinFeatures(DIM, 64, seed=4, constant_feature=True,
                                                        linear_features=True).state_dict())
    check()
    with torch.no_grad():
        feature_map.weights[DIM:].neg_()  # the random rows (the first DIM are the exact identity block)
        feature_map.scales.mul_(2)
    check()
    feature_map.double()
    torch.testing.assert_close(feature_map(x.double()), feature_map.reference_forward(x.double()))


def test_orthogonal_sampler_statistics() -> None:
    weights = get_sampler("orthogonal")(40, DIM, torch.Generator().manual_seed(0))
    block = weights[:DIM]
    directions = block / block.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(directions @ directions.T, torch.eye(DIM), atol=1e-5, rtol=0)
    many = get_sampler("orthogonal")(DIM * 500, DIM, torch.Generator().manual_seed(1))
    assert many.norm(dim=-1).square().mean().item() == pytest.approx(DIM, rel=0.03)  # E chi^2(d) = d


@pytest.mark.parametrize("dim", [16, 12])
def test_sorf_rows_have_gaussian_norms(dim: int) -> None:
    h = hadamard(16)
    torch.testing.assert_close(h @ h.T, torch.eye(16))
    weights = get_sampler("sorf")(dim * 200, dim, torch.Generator().manual_seed(0))
    squared = weights.norm(dim=-1).square()
    assert squared.mean().item() == pytest.approx(dim, rel=0.05)  # not dim^1.5 times larger
    if dim == 16:  # a power of two: rows of one block are exactly orthogonal with norm sqrt(d)
        block = weights[:16]
        torch.testing.assert_close(block @ block.T, 16 * torch.eye(16), atol=1e-4, rtol=0)


def test_moment_matched_and_qmc_moments() -> None:
    mm = get_sampler("moment_matched")(64, DIM, torch.Generator().manual_seed(0)).double()
    torch.testing.assert_close(mm.mean(0), torch.zeros(DIM, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(mm.T @ mm / 64, torch.eye(DIM, dtype=torch.float64), atol=1e-5, rtol=0)
    qmc = get_sampler("qmc")(4096, DIM, torch.Generator().manual_seed(0)).double()
    assert qmc.mean().abs().item() < 0.01 and qmc.var().item() == pytest.approx(1.0, abs=0.02)
    with pytest.raises(ValueError, match="more rows than dim"):
        get_sampler("moment_matched")(DIM, DIM, torch.Generator())
    with pytest.raises(ValueError, match="valid choices"):
        get_sampler("halton")
    assert set(SAMPLERS) == {"gaussian", "orthogonal", "sorf", "qmc", "moment_matched", "fastfood"}


@pytest.mark.parametrize(
    "make",
    [
        lambda: RandomMaclaurinFeatures(DIM, 64, seed=0),
        lambda: SpectralFeatures(DIM, 64, "trigrf", "gaussian", seed=0),
        lambda: SpectralFeatures(DIM, 64, "posrf", "orthogonal", seed=0),
        lambda: SpectralFeatures(DIM, 64, "oprf", "fastfood", seed=0),
    ],
)
def test_draws_are_buffers_redrawn_only_on_request(make) -> None:
    mapped, x = make(), torch.randn(5, DIM)
    before = mapped(x)
    torch.testing.assert_close(mapped(x), before, rtol=0, atol=0)  # forward never redraws
    twin = make()
    twin.redraw()
    twin.load_state_dict(mapped.state_dict())  # buffers travel in the state dict, whatever their shape
    torch.testing.assert_close(twin(x), before, rtol=0, atol=0)
    mapped.redraw()
    assert not torch.allclose(mapped(x), before)
    twin.redraw()  # the reloaded map continues the same seeded sequence of draws
    torch.testing.assert_close(twin(x), mapped(x), rtol=0, atol=0)


def test_redraw_interval_counts_training_calls_only() -> None:
    mapped, x = RandomMaclaurinFeatures(DIM, 32, seed=0, redraw_interval=3), torch.randn(2, DIM)
    first = mapped(x)
    mapped.eval()
    for _ in range(5):
        mapped.maybe_redraw()
    torch.testing.assert_close(mapped(x), first, rtol=0, atol=0)
    mapped.train()
    mapped.maybe_redraw()
    mapped.maybe_redraw()
    torch.testing.assert_close(mapped(x), first, rtol=0, atol=0)
    mapped.maybe_redraw()
    assert int(mapped.draw_index) == 1 and not torch.allclose(mapped(x), first)


def test_low_precision_cast_keeps_draws_in_fp32() -> None:
    mapped = SpectralFeatures(DIM, 32, seed=0)
    weights = mapped.weights.clone()
    mapped.bfloat16()
    assert mapped.weights.dtype == torch.float32 and torch.equal(mapped.weights, weights)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_features": 0}, "num_features must be a positive integer"),
        ({"num_features": -4}, "num_features must be a positive integer"),
        ({"dim": 2.5}, "dim must be a positive integer"),
        ({"p": 1.0}, "p must be a finite number > 1"),
        ({"kernel": "gauss"}, "valid choices"),
        ({"max_degree": -1}, "max_degree"),
        ({"seed": "x"}, "seed must be an integer"),
        ({"redraw_interval": 0}, "redraw_interval"),
        ({"constant_feature": True, "num_features": 1}, "leaves no random feature"),
        ({"linear_features": True}, "needs constant_feature=True"),
        ({"linear_features": True, "constant_feature": True, "num_features": 17}, "num_features > 17"),
        ({"constant_feature": True, "max_degree": 0}, "max_degree=0 leaves no degree"),
    ],
)
def test_bad_feature_arguments_raise(kwargs: dict, message: str) -> None:
    arguments = {"dim": DIM, "num_features": 16, **kwargs}
    with pytest.raises(ValueError, match=message):
        RandomMaclaurinFeatures(**arguments)


def test_a_reloaded_model_redraws_on_the_same_calls_as_the_original(tmp_path) -> None:
    from macformer import MacformerConfig, MacformerForCausalLM

    config = MacformerConfig(attention="rmfa", causal=True, vocab_size=40, d_model=32, num_features=48,
                             feature_redraw_interval=3, max_seq_len=64)
    original = MacformerForCausalLM(config).train()
    tokens = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        for _ in range(2):  # one call short of a redraw
            original(tokens)
        original.save_pretrained(tmp_path)
        reloaded = MacformerForCausalLM.from_pretrained(tmp_path).train()
        for _ in range(5):  # the redraws at calls 3 and 6 must coincide
            torch.testing.assert_close(reloaded(tokens).logits, original(tokens).logits, rtol=0, atol=0)
    # a state dict saved before the counter existed still loads (as 0 calls since the last draw)
    legacy = {k: v for k, v in original.state_dict().items() if not k.endswith("calls_since_draw")}
    fresh = MacformerForCausalLM(config)
    fresh.load_state_dict(legacy)
    assert all(b.attention.feature_map._calls_since_draw == 0 for b in fresh.model.blocks)
