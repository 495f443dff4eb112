import pytest
import torch

from macformer import MacformerConfig
from macformer.attention import kernel_attention
from macformer.models import MacformerModel
from macformer.ppsbn import PostSBN, PreSBN


def test_presbn_keeps_dot_products_inside_the_radius() -> None:
    pre = PreSBN(num_heads=2, max_temperature=0.7, initial_temperature=0.3)
    with torch.no_grad():
        pre.temperature_logit.fill_(30.0)  # push the learnable temperature to its bound
    q, k = pre(torch.randn(3, 2, 50, 16) * 100), pre(torch.randn(3, 2, 50, 16) * 100)
    assert (q @ k.transpose(-1, -2)).abs().max() < 0.7
    centred = pre(torch.randn(1, 2, 5, 16) + 40.0)
    torch.testing.assert_close(centred.mean(-1), torch.zeros(1, 2, 5), atol=1e-5, rtol=0)


def test_presbn_scales_every_vector_to_the_square_root_of_its_temperature() -> None:
    pre = PreSBN(num_heads=2, max_temperature=2.0, initial_temperature=0.7)
    x = pre(torch.randn(1, 2, 4, 64) * 5)
    torch.testing.assert_close(x.norm(dim=-1), torch.full((1, 2, 4), 0.7**0.5))


def test_presbn_is_safe_for_constant_vectors() -> None:
    pre = PreSBN(num_heads=1, max_temperature=0.9, initial_temperature=0.4)
    x = torch.full((1, 1, 3, 8), 2.5, requires_grad=True)
    out = pre(x)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and x.grad.isfinite().all()
    assert pre.temperature_logit.grad.isfinite().all()


def test_temperature_is_learnable_and_bounded() -> None:
    pre = PreSBN(num_heads=4, max_temperature=0.5, initial_temperature=0.25)
    pre(torch.randn(2, 4, 6, 16)).square().sum().backward()
    assert pre.temperature_logit.grad.abs().sum() > 0
    with torch.no_grad():
        pre.temperature_logit.copy_(torch.tensor([-50.0, -1.0, 1.0, 50.0]).view(4, 1, 1))
    torch.testing.assert_close(pre.temperature().flatten(), torch.tensor([0.0, 0.134471, 0.365529, 0.5]))
    fixed = PreSBN(num_heads=4, max_temperature=0.5, initial_temperature=0.25, learnable=False)
    assert not any(p.requires_grad for p in fixed.parameters())


def test_postsbn_scale_starts_at_one() -> None:
    post = PostSBN(6)
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(post(x), x)
    assert post.scale.requires_grad


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_temperature": 0.0, "initial_temperature": 0.1}, "max_temperature must be positive"),
    ({"max_temperature": 0.5, "initial_temperature": 0.6}, "initial_temperature"),
])
def test_bad_presbn_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PreSBN(num_heads=1, **kwargs)


def _retrieval_loss(pre: PreSBN, generator: torch.Generator) -> torch.Tensor:
    """Each query must return the value of the one key that points its way among 63 random ones:
    a task that needs sharp attention (the loss falls as the temperature rises)."""
    q = torch.randn(8, 2, 16, 16, generator=generator)
    close = q + 0.3 * torch.randn(q.shape, generator=generator)
    k = torch.cat([close, torch.randn(8, 2, 48, 16, generator=generator)], 2)
    v = torch.randn(8, 2, 64, 4, generator=generator)
    return (kernel_attention(pre(q), pre(k), v, "exp") - v[:, :, :16]).square().mean()


@pytest.mark.parametrize(("lr_scale", "moves"), [(None, True), (1.0, False)])
def test_the_temperature_learns_within_a_few_hundred_steps(lr_scale: float | None, moves: bool) -> None:
    overrides = {} if lr_scale is None else {"ppsbn_temperature_lr_scale": lr_scale}
    model = MacformerModel(MacformerConfig(attention="kernel", num_heads=2, d_model=32, **overrides))
    pre = model.blocks[0].attention.pre_sbn
    optimizer = torch.optim.AdamW(model.optimizer_groups(learning_rate=2e-3, weight_decay=0.01))
    generator = torch.Generator().manual_seed(0)
    start = pre.temperature().detach().clone()
    for _ in range(200):
        optimizer.zero_grad()
        _retrieval_loss(pre, generator).backward()
        optimizer.step()
    moved = pre.temperature().detach() - start
    if moves:  # from 1.0 to near its bound 2.0
        assert torch.all(moved > 0.6), moved.flatten()
    else:  # Adam moves the logit by <= lr per step: t by <= 200 * 2e-3 * dt/dlogit (0.5 at t = 1)
        assert torch.all(moved.abs() < 0.21), moved.flatten()
