import math

import pytest
import torch
from conftest import presbn_like
from hypothesis import given, settings
from hypothesis import strategies as st

from macformer.attention import (
    causal_feature_attention,
    causal_linear_attention,
    feature_attention,
    kernel_attention,
    linear,
    naive_feature_attention,
    recurrent_step,
    softmax_attention,
)
from macformer.features import RandomMaclaurinFeatures, SpectralFeatures

B, H, D_HEAD = 2, 3, 16


def _qkv(length: int, dv: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return presbn_like((B, H, length, D_HEAD)), presbn_like((B, H, length, D_HEAD)), torch.randn(B, H, length, dv)


def _padding(length: int) -> torch.Tensor:
    mask = torch.zeros(B, length, dtype=torch.bool)
    mask[1, length - length // 3:] = True
    return mask


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _reference(q, k, v, feature_map, causal, padding=None, gate=None):
    keep = 1.0 if padding is None else (~padding)[:, None, :, None].float()
    query_features, key_features = feature_map(q, is_query=True), feature_map(k) * keep
    return naive_feature_attention(query_features, key_features, v * keep, causal, padding, gate)


MAPS = {
    "rmfa": lambda: RandomMaclaurinFeatures(D_HEAD, 64, seed=0),
    "rfa": lambda: SpectralFeatures(D_HEAD, 64, "trigrf", "gaussian", seed=0),
    "favor": lambda: SpectralFeatures(D_HEAD, 64, "posrf", "orthogonal", seed=0),
}


@pytest.mark.parametrize("name", sorted(MAPS))
@pytest.mark.parametrize("length", [1, 7, 33, 64])
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64])
@pytest.mark.parametrize("gated", [False, True])
def test_chunked_causal_matches_naive(name: str, length: int, chunk_size: int, gated: bool) -> None:
    q, k, v = _qkv(length)
    padding = _padding(length)
    gate = torch.sigmoid(torch.randn(B, H, length)) if gated else None
    feature_map = MAPS[name]()
    fast = feature_attention(q, k, v, feature_map, causal=True, key_padding_mask=padding, gate=gate,
                             chunk_size=chunk_size)
    torch.testing.assert_close(fast, _reference(q, k, v, feature_map, True, padding, gate), atol=1e-5, rtol=1e-5)


def _gradients(attend, q, k, v, gate, cotangent) -> list[torch.Tensor]:
    inputs = [x.clone().requires_grad_() for x in (q, k, v) + ((gate,) if gate is not None else ())]
    out = attend(*inputs[:3], inputs[3] if gate is not None else None)
    return torch.autograd.grad((out * cotangent).sum(), inputs)


@pytest.mark.parametrize("name", sorted(MAPS))
@pytest.mark.parametrize(("causal", "gated", "chunk_size"),
                         [(False, False, 64), (True, False, 5), (True, False, 64), (True, True, 5), (True, True, 16)])
def test_gradients_match_naive(name: str, causal: bool, gated: bool, chunk_size: int) -> None:
    """dq, dk, dv (and d gate) of the fast forms equal the explicit-matrix reference's."""
    q, k, v = _qkv(33)
    padding = _padding(33)
    gate = torch.sigmoid(torch.randn(B, H, 33)) if gated else None
    feature_map = MAPS[name]()
    cotangent = torch.randn(B, H, 33, v.shape[-1])
    fast = _gradients(lambda q_, k_, v_, g_: feature_attention(q_, k_, v_, feature_map, causal=causal,
                                                               key_padding_mask=padding, gate=g_,
                                                               chunk_size=chunk_size), q, k, v, gate, cotangent)
    naive = _gradients(lambda q_, k_, v_, g_: _reference(q_, k_, v_, feature_map, causal, padding, g_),
                       q, k, v, gate, cotangent)
    for name_, fast_grad, naive_grad in zip(("dq", "dk", "dv", "dgate"), fast, naive, strict=False):
        torch.testing.assert_close(fast_grad, naive_grad, atol=2e-5, rtol=1e-4, msg=lambda m, n=name_: f"{n}: {m}")
    assert fast[0].abs().sum() > 0 and fast[1].abs().sum() > 0  # the gradients reach q and k


@pytest.mark.parametrize("name", sorted(MAPS))
def test_noncausal_matches_naive(name: str) -> None:
    q, k, v = _qkv(29)
    padding = _padding(29)
    feature_map = MAPS[name]()
    fast = feature_attention(q, k, v, feature_map, causal=False, key_padding_mask=padding)
    torch.testing.assert_close(fast, _reference(q, k, v, feature_map, False, padding), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("outputs", ["both", "out", "final"])
def test_chunked_causal_gradients_reach_a_carried_state(outputs: str) -> None:
    """gradcheck (float64) of the chunked form's written-out backward, with a start state that needs
    gradients and with the loss on the output, the final state or both (a padded last chunk)."""
    generator = torch.Generator().manual_seed(0)
    features = [torch.rand(1, 2, 11, 6, dtype=torch.float64, generator=generator) + 0.1 for _ in range(2)]
    v = torch.randn(1, 2, 11, 3, dtype=torch.float64, generator=generator)
    state = torch.rand(1, 2, 6, 4, dtype=torch.float64, generator=generator) + 0.1

    def run(query_features, key_features, values, start):
        out, final = causal_linear_attention(query_features, key_features, values, chunk_size=4, state=start)
        return {"both": (out, final), "out": (out,), "final": (final,)}[outputs]

    inputs = [x.requires_grad_() for x in (*features, v, state)]
    assert torch.autograd.gradcheck(run, inputs)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("inclusive", [False, True])
@pytest.mark.parametrize("with_start", [False, True])
@pytest.mark.parametrize("dim", [-3, -2])
def test_running_sums_match_cumulative_sums(reverse: bool, inclusive: bool, with_start: bool, dim: int) -> None:
    terms = torch.randn(2, 5, 4, 3, dtype=torch.float64)
    start = torch.randn(terms.select(dim, 0).shape, dtype=torch.float64) if with_start else None
    ordered = terms.flip(dim) if reverse else terms
    inclusive_sums = ordered.cumsum(dim)
    expected = inclusive_sums if inclusive else inclusive_sums - ordered
    expected = expected.flip(dim) if reverse else expected
    offset = 0 if start is None else start.unsqueeze(dim)
    sums, total = linear._running_sums(terms, start, dim, reverse=reverse, inclusive=inclusive)
    torch.testing.assert_close(sums, expected + offset)
    torch.testing.assert_close(total, terms.sum(dim) + (0 if start is None else start))


@pytest.mark.parametrize("name", sorted(MAPS))
@pytest.mark.parametrize(("causal", "gated", "chunk_size"), [(False, False, 64), (True, False, 5), (True, True, 4)])
def test_blockwise_evaluation_without_autograd_matches_naive(monkeypatch, name, causal, gated, chunk_size) -> None:
    """Without autograd the features are computed a block of tokens at a time (here blocks of 12, or the
    chunks that fit in them, over 45 tokens: several blocks and a partial one) with the state carried."""
    monkeypatch.setattr(linear, "NO_GRAD_BLOCK", 12)
    q, k, v = _qkv(45)
    padding = _padding(45)
    gate = torch.sigmoid(torch.randn(B, H, 45)) if gated else None
    feature_map = MAPS[name]()
    expected = _reference(q, k, v, feature_map, causal, padding, gate)
    with torch.no_grad():
        if causal:
            out, state = causal_feature_attention(q, k, v, feature_map, key_padding_mask=padding, gate=gate,
                                                  chunk_size=chunk_size)
            keep = (~padding)[:, None, :, None]
            whole = causal_linear_attention(feature_map(q, is_query=True), feature_map(k) * keep, v * keep,
                                            chunk_size=chunk_size, log_gate=linear.log_gate_of(gate, padding))[1]
            torch.testing.assert_close(state, whole, atol=1e-5, rtol=1e-5)  # the state carried across blocks
        else:
            out = feature_attention(q, k, v, feature_map, key_padding_mask=padding)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gated", [False, True])
def test_recurrent_steps_match_chunked_and_naive(gated: bool) -> None:
    length = 23
    q, k, v = _qkv(length)
    feature_map = RandomMaclaurinFeatures(D_HEAD, 64, seed=0)
    phi_q, phi_k = feature_map(q, is_query=True), feature_map(k)
    gate = torch.sigmoid(torch.randn(B, H, length)) if gated else None
    log_gate = None if gate is None else gate.log()
    state, steps = None, []
    for t in range(length):
        out, state = recurrent_step(phi_q[:, :, t:t + 1], phi_k[:, :, t:t + 1], v[:, :, t:t + 1], state=state,
                                    log_gate=None if log_gate is None else log_gate[:, :, t:t + 1])
        steps.append(out)
    assert state.shape == (B, H, 64, v.shape[-1] + 1)  # O(D d_v) per head, whatever the length
    chunked, final = causal_linear_attention(phi_q, phi_k, v, log_gate=log_gate, chunk_size=4)
    naive = naive_feature_attention(phi_q, phi_k, v, causal=True, gate=gate)
    torch.testing.assert_close(torch.cat(steps, 2), naive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked, naive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, state, atol=1e-5, rtol=1e-5)


def test_prefill_then_decode_continues_the_sequence() -> None:
    q, k, v = _qkv(20)
    feature_map = RandomMaclaurinFeatures(D_HEAD, 64, seed=0)
    full = feature_attention(q, k, v, feature_map, causal=True)
    prefix, state = causal_feature_attention(q[:, :, :12], k[:, :, :12], v[:, :, :12], feature_map, chunk_size=5)
    outs = [prefix]
    for t in range(12, 20):
        out, state = causal_feature_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], feature_map,
                                              state=state)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 2), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["exp", "inverse", "log", "sqrt"])
@pytest.mark.parametrize("causal", [False, True])
def test_rmfa_converges_to_kernel_attention(kernel: str, causal: bool) -> None:
    q, k, v = _qkv(48)
    padding = _padding(48)
    exact = kernel_attention(q, k, v, kernel, causal, padding)
    errors = []
    for num_features in (32, 512, 8192):
        draws = [
            _relative_error(feature_attention(q, k, v, RandomMaclaurinFeatures(D_HEAD, num_features, kernel, seed=s,
                                                                               constant_feature=True),
                                              causal=causal, key_padding_mask=padding), exact)
            for s in range(3)
        ]
        errors.append(sum(draws) / len(draws))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.02 and errors[0] / errors[2] > 5  # 1/sqrt(D) predicts 16


def test_exp_kernel_with_matching_scaling_is_softmax() -> None:
    q, k, v = torch.randn(B, H, 40, D_HEAD), torch.randn(B, H, 40, D_HEAD), torch.randn(B, H, 40, 8)
    padding = _padding(40)
    scale = D_HEAD**-0.25
    for causal in (False, True):
        exact = kernel_attention(q * scale, k * scale, v, "exp", causal, padding)
        torch.testing.assert_close(exact, softmax_attention(q, k, v, causal, padding), atol=1e-5, rtol=1e-5)
    small_q, small_k = q * 0.3 * scale, k * 0.3 * scale
    target = softmax_attention(small_q, small_k, v, False, padding, scale=1.0)
    for feature_map in (RandomMaclaurinFeatures(D_HEAD, 4096, "exp", seed=0, constant_feature=True),
                        SpectralFeatures(D_HEAD, 4096, seed=0)):
        out = feature_attention(small_q, small_k, v, feature_map, key_padding_mask=padding)
        assert _relative_error(out, target) < 0.03


def test_fourier_attention_approximates_softmax_of_unit_vectors() -> None:
    q, k = (torch.nn.functional.normalize(torch.randn(B, H, 40, D_HEAD), dim=-1) for _ in range(2))
    v = torch.randn(B, H, 40, 8)
    target = softmax_attention(q, k, v, scale=1.0)
    out = feature_attention(q, k, v, SpectralFeatures(D_HEAD, 8192, "trigrf", "gaussian", seed=0))
    assert _relative_error(out, target) < 0.05


def test_padding_keys_contribute_nothing() -> None:
    q, k, v = _qkv(30)
    padding = _padding(30)
    feature_map = RandomMaclaurinFeatures(D_HEAD, 64, seed=0)
    garbage_k, garbage_v = k.clone(), v.clone()
    garbage_k[padding[:, None, :, None].expand_as(k)] = 5.0
    garbage_v[padding[:, None, :, None].expand_as(v)] = 1e4
    for causal in (False, True):
        torch.testing.assert_close(
            feature_attention(q, garbage_k, garbage_v, feature_map, causal=causal, key_padding_mask=padding),
            feature_attention(q, k, v, feature_map, causal=causal, key_padding_mask=padding),
        )


def test_stabiliser_leaves_well_behaved_rows_alone_and_never_gives_nan() -> None:
    q, k, v = _qkv(64)
    feature_map = RandomMaclaurinFeatures(D_HEAD, 256, seed=0, constant_feature=True)
    phi_q, phi_k = feature_map(q, is_query=True), feature_map(k)
    scores = (phi_q @ phi_k.transpose(-1, -2)).tril()
    plain = scores @ v / scores.sum(-1, keepdim=True)  # the unguarded ratio, first row included
    torch.testing.assert_close(feature_attention(q, k, v, feature_map, causal=True), plain, atol=1e-5, rtol=1e-5)
    # Adversarial features: opposite signs make single-key denominators negative or exactly zero.
    phi_k_bad = -phi_q
    out, _ = causal_linear_attention(phi_q.requires_grad_(), phi_k_bad, v)
    out.sum().backward()
    assert out.isfinite().all() and phi_q.grad.isfinite().all()
    zero = torch.zeros(1, 1, 4, 8)
    out, _ = causal_linear_attention(zero, zero, torch.randn(1, 1, 4, 3))
    assert torch.equal(out, torch.zeros_like(out))


def test_fully_padded_rows_give_zero_not_nan() -> None:
    q, k, v = _qkv(6)
    padding = torch.ones(B, 6, dtype=torch.bool)
    feature_map = RandomMaclaurinFeatures(D_HEAD, 32, seed=0)
    for result in (feature_attention(q, k, v, feature_map, key_padding_mask=padding),
                   kernel_attention(q, k, v, "exp", False, padding),
                   softmax_attention(q, k, v, False, padding)):
        assert torch.equal(result, torch.zeros_like(result))


@pytest.mark.parametrize("causal", [False, True])
def test_16k_tokens_in_bf16_autocast_are_finite(causal: bool) -> None:
    length = 16_384
    q, k = presbn_like((1, 2, length, 32)), presbn_like((1, 2, length, 32))
    v = torch.randn(1, 2, length, 32)
    q, k, v = (t.bfloat16().requires_grad_() for t in (q, k, v))
    feature_map = RandomMaclaurinFeatures(32, 64, seed=0, constant_feature=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = feature_attention(q, k, v, feature_map, causal=causal, chunk_size=128)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert out.isfinite().all()
    assert all(t.grad.isfinite().all() for t in (q, k, v))


def test_kernel_attention_rejects_inputs_outside_the_radius() -> None:
    q = torch.ones(1, 1, 2, 4)
    with pytest.raises(ValueError, match="radius of convergence"):
        kernel_attention(q, q, q, "inverse")


def test_bad_attention_arguments_raise() -> None:
    q, k, v = _qkv(8)
    feature_map = RandomMaclaurinFeatures(D_HEAD, 16, seed=0)
    with pytest.raises(ValueError, match=r"\[batch, heads, seq, head_dim\]"):
        feature_attention(q[0], k[0], v[0], feature_map)
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        feature_attention(q, k, v, feature_map, key_padding_mask=torch.zeros(B, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs causal=True"):
        feature_attention(q, k, v, feature_map, gate=torch.full((B, H, 8), 0.5))
    with pytest.raises(ValueError, match="gate must be"):
        feature_attention(q, k, v, feature_map, causal=True, gate=torch.full((B, H, 7), 0.5))
    with pytest.raises(ValueError, match="chunk_size"):
        feature_attention(q, k, v, feature_map, causal=True, chunk_size=0)
    with pytest.raises(ValueError, match="disagree"):
        feature_attention(q, k[:, :, :5], v, feature_map)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    heads=st.integers(1, 3),
    length=st.integers(1, 40),
    dv=st.integers(1, 9),
    chunk=st.integers(1, 17),
    causal=st.booleans(),
    pad_seed=st.integers(0, 2**16),
)
def test_shapes_and_masks_property(batch, heads, length, dv, chunk, causal, pad_seed) -> None:
    generator = torch.Generator().manual_seed(pad_seed)
    q = torch.randn(batch, heads, length, 8, generator=generator) * 0.3
    k = torch.randn(batch, heads, length, 8, generator=generator) * 0.3
    v = torch.randn(batch, heads, length, dv, generator=generator)
    padding = torch.rand(batch, length, generator=generator) < 0.3
    feature_map = RandomMaclaurinFeatures(8, 24, seed=pad_seed)
    out = feature_attention(q, k, v, feature_map, causal=causal, key_padding_mask=padding, chunk_size=chunk)
    assert out.shape == (batch, heads, length, dv) and out.isfinite().all()
    reference = _reference(q, k, v, feature_map, causal, padding)
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)
    # Rows that see no real key (all of their visible keys padded) are exactly zero.
    visible = (~padding).float()
    visible = visible.cumsum(-1) if causal else visible.sum(-1, keepdim=True).expand(-1, length)
    assert torch.all(out[(visible == 0)[:, None, :].expand(-1, heads, -1)] == 0)
    assert math.isfinite(float(out.sum()))


def test_exact_exp_attention_is_finite_for_any_scores() -> None:
    from macformer.attention import kernel_attention_weights

    q, k, v = torch.randn(1, 2, 9, 8) * 40, torch.randn(1, 2, 9, 8) * 40, torch.randn(1, 2, 9, 8)
    mask = torch.zeros(1, 9, dtype=torch.bool)
    mask[0, 6:] = True
    for kernel in ("exp", "trigh"):
        weights = kernel_attention_weights(q, k, kernel, causal=True, key_padding_mask=mask)
        reference = torch.softmax((q @ k.transpose(-1, -2)).masked_fill(
            torch.ones(9, 9).triu(1).bool() | mask[:, None, None, :], -math.inf), -1)
        torch.testing.assert_close(weights, reference)
        assert kernel_attention(q, k, v, kernel, causal=True, key_padding_mask=mask).isfinite().all()
