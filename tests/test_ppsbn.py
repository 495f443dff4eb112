import pytest
import torch

from macformer.ppsbn import PostSBN, PreSBN


def test_presbn_keeps_dot_products_inside_the_radius() -> None:
    pre = PreSBN(num_heads=2, head_dim=16, max_temperature=0.7)
    with torch.no_grad():
        pre.temperature_logit.fill_(30.0)  # push the learnable temperature to its bound
    q, k = pre(torch.randn(3, 2, 50, 16) * 100), pre(torch.randn(3, 2, 50, 16) * 100)
    assert (q @ k.transpose(-1, -2)).abs().max() < 0.7
    centred = pre(torch.randn(1, 2, 5, 16) + 40.0)
    torch.testing.assert_close(centred.mean(-1), torch.zeros(1, 2, 5), atol=1e-5, rtol=0)


def test_presbn_default_scale_is_d_to_minus_quarter() -> None:
    pre = PreSBN(num_heads=1, head_dim=64, max_temperature=2.0)
    x = pre(torch.randn(1, 1, 4, 64))
    torch.testing.assert_close(x.norm(dim=-1), torch.full((1, 1, 4), 64**-0.25))


def test_presbn_is_safe_for_constant_vectors() -> None:
    pre = PreSBN(num_heads=1, head_dim=8, max_temperature=0.9)
    x = torch.full((1, 1, 3, 8), 2.5, requires_grad=True)
    out = pre(x)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and x.grad.isfinite().all()
    assert pre.temperature_logit.grad.isfinite().all()


def test_temperature_is_learnable_and_bounded() -> None:
    pre = PreSBN(num_heads=4, head_dim=16, max_temperature=0.5)
    pre(torch.randn(2, 4, 6, 16)).square().sum().backward()
    assert pre.temperature_logit.grad.abs().sum() > 0
    with torch.no_grad():
        pre.temperature_logit.copy_(torch.tensor([-50.0, -1.0, 1.0, 50.0]).view(4, 1, 1))
    assert torch.all(pre.temperature() >= 0) and torch.all(pre.temperature() <= 0.5)
    fixed = PreSBN(num_heads=4, head_dim=16, max_temperature=0.5, learnable=False)
    assert not any(p.requires_grad for p in fixed.parameters())


def test_postsbn_scale_starts_at_one() -> None:
    post = PostSBN(6)
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(post(x), x)
    assert post.scale.requires_grad


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_temperature": 0.0}, "max_temperature must be positive"),
    ({"max_temperature": 0.5, "initial_temperature": 0.6}, "initial_temperature"),
])
def test_bad_presbn_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PreSBN(num_heads=1, head_dim=8, **kwargs)
