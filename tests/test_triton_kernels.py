"""The Triton kernels of the causal chunked form against PyTorch references: outputs and gradients.

Without a GPU, conftest sets TRITON_INTERPRET=1 and Triton's interpreter runs the kernels on the CPU
with exact fp32 arithmetic; on a CUDA machine the same tests run the compiled kernels."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import presbn_like

from macformer import MacformerConfig, MacformerForCausalLM
from macformer.attention import causal_feature_attention, linear
from macformer.attention.triton_chunked import chunked_causal_products
from macformer.features import RandomMaclaurinFeatures

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _explicit(q, k, v, initial):
    """O = tril(Q K^T) V + Q S_0 and S_n = S_0 + K^T V with the whole score matrix."""
    out = (q @ k.transpose(-1, -2)).tril() @ v
    final = k.transpose(-1, -2) @ v
    if initial is not None:
        out, final = out + q @ initial, final + initial
    return out, final


def _on_device(tensors) -> list[torch.Tensor | None]:
    return [x.to(DEVICE) if x is not None else None for x in tensors]


def _outputs_and_gradients(function, inputs, cotangents):
    inputs = [x.clone().requires_grad_() if x is not None else None for x in inputs]
    out, final = function(*inputs)
    used = [x for x in inputs if x is not None]
    loss = (out * cotangents[0]).sum() + (final * cotangents[1]).sum()
    return [out, final, *torch.autograd.grad(loss, used)]


@pytest.mark.parametrize(("length", "dim", "values", "chunk", "with_state"), [
    (64, 16, 16, 16, False),  # whole chunks, power-of-two sizes
    (40, 20, 9, 16, True),  # a partial last chunk, D and V that are not powers of two
    (33, 24, 5, 32, True),  # one chunk plus one token
    (7, 16, 3, 16, False),  # shorter than a chunk
    (50, 70, 65, 32, True),  # the state split over tiles both ways (2 x 3), the last ones partial
    (45, 150, 20, 128, True),  # 3 feature tiles; a model chunk above the kernels' largest
])
def test_kernels_equal_the_explicit_products(length: int, dim: int, values: int, chunk: int, with_state: bool) -> None:
    generator = torch.Generator().manual_seed(length)
    q, k = (torch.randn(2, 3, length, dim, generator=generator) for _ in range(2))
    v = torch.randn(2, 3, length, values, generator=generator)
    initial = torch.randn(2, 3, dim, values, generator=generator) if with_state else None
    cotangents = (torch.randn(2, 3, length, values, generator=generator),
                  torch.randn(2, 3, dim, values, generator=generator))
    inputs, cotangents = _on_device([q, k, v, initial]), _on_device(cotangents)
    kernel = _outputs_and_gradients(lambda *x: chunked_causal_products(*x, chunk), inputs, cotangents)
    explicit = _outputs_and_gradients(_explicit, inputs, cotangents)
    assert len(kernel) == len(explicit) == 5 + with_state  # out, final, dq, dk, dv (, d initial)
    for name, got, want in zip(["out", "final", "dq", "dk", "dv", "d initial"], kernel, explicit, strict=False):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=name)


def test_the_kernels_follow_the_final_state_gradient_only_where_given() -> None:
    """A loss on the output alone (training) gives the same gradients as one with a zero final-state term."""
    q, k = torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16)
    v = torch.randn(1, 2, 20, 4)
    inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    out, _ = chunked_causal_products(*inputs, None, 16)
    alone = torch.autograd.grad(out.sum(), inputs)
    explicit = [x.clone().requires_grad_() for x in (q, k, v)]
    out, _ = _explicit(*explicit, None)
    for got, want in zip(alone, torch.autograd.grad(out.sum(), explicit), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _route_to_triton(monkeypatch) -> list[int]:
    """The model's dispatch as on CUDA (the Triton paths of the feature map and the causal products
    whatever the device); returns a list that counts the causal kernel's calls, so a test sees that
    the path it compares was taken."""
    from macformer.attention import triton_chunked
    from macformer.features import maclaurin

    monkeypatch.setattr(maclaurin, "_use_triton", lambda x: True)

    calls = []
    kernel = triton_chunked.chunked_causal_products

    def counted(*args):
        calls.append(1)
        return kernel(*args)

    monkeypatch.setattr(triton_chunked, "chunked_causal_products", counted)
    monkeypatch.setattr(linear, "_use_triton", lambda features: True)
    return calls


def _attention_gradients(q, k, v, feature_map, state=None, eps=1e-2):
    inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    out, new_state = causal_feature_attention(*inputs, feature_map, state=state, chunk_size=16, eps=eps)
    return [out, new_state, *torch.autograd.grad((out * out.detach().sign()).sum(), inputs)]


@pytest.mark.parametrize("eps", [1e-2, 0.9])  # 0.9: the stabiliser's floor acts on most rows
def test_attention_on_the_triton_path_equals_the_pytorch_path(monkeypatch, eps: float) -> None:
    """Features, stabiliser and state hand-over (prefill, then a continuation) as the model uses them."""
    feature_map = RandomMaclaurinFeatures(16, 48, "exp", seed=0, constant_feature=True, linear_features=True)
    q, k = presbn_like((2, 2, 37, 16)), presbn_like((2, 2, 37, 16))
    v = torch.randn(2, 2, 37, 8)

    def whole_and_continued() -> list[torch.Tensor]:
        prefix = causal_feature_attention(q[:, :, :20], k[:, :, :20], v[:, :, :20], feature_map, eps=eps)[1]
        return (_attention_gradients(q, k, v, feature_map, eps=eps)
                + _attention_gradients(q[:, :, 20:], k[:, :, 20:], v[:, :, 20:], feature_map, prefix, eps))

    pytorch = whole_and_continued()
    calls = _route_to_triton(monkeypatch)
    triton = whole_and_continued()
    assert len(calls) == 3
    for got, want in zip(triton, pytorch, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_a_model_trains_the_same_on_both_paths(monkeypatch) -> None:
    config = MacformerConfig(vocab_size=50, d_model=32, num_layers=2, num_heads=2, d_ff=64, num_features=40,
                             max_seq_len=64, causal=True)
    tokens = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(1))

    def loss_and_gradients() -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = MacformerForCausalLM(config)
        loss = model(tokens, labels=tokens).loss
        return [loss, *torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)]

    pytorch = loss_and_gradients()
    calls = _route_to_triton(monkeypatch)
    triton = loss_and_gradients()
    assert len(calls) == config.num_layers
    for got, want in zip(triton, pytorch, strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def _features_and_gradient(feature_map, x, cotangent):
    x = x.clone().requires_grad_()
    features = feature_map(x)
    return [features, *torch.autograd.grad((features * cotangent).sum(), x)]


@pytest.mark.parametrize(("dim", "num_features", "kernel", "exact"), [
    (16, 48, "exp", "both"),  # the default's form: degrees 0 and 1 exact, random degrees >= 2
    (20, 70, "inverse", "constant"),  # dim not a power of two; random degrees >= 1
    (8, 45, "exp", "none"),  # sampled degree 0 (constant random features, no gradient)
    (24, 200, "exp", "both"),  # several feature blocks, the last with the highest degrees
])
def test_feature_map_kernels_equal_the_pytorch_path(monkeypatch, dim: int, num_features: int, kernel: str,
                                                    exact: str) -> None:
    from macformer.features import maclaurin

    feature_map = RandomMaclaurinFeatures(dim, num_features, kernel, seed=dim, p=1.5,
                                          constant_feature=exact != "none", linear_features=exact == "both")
    assert max(feature_map.degrees.tolist()) >= 4  # the loops over factors run past one or two
    x = presbn_like((2, 3, 37, dim), scale=1.0)
    cotangent = torch.randn(2, 3, 37, num_features, generator=torch.Generator().manual_seed(dim))
    pytorch = _features_and_gradient(feature_map, *_on_device([x, cotangent]))
    calls = []
    monkeypatch.setattr(maclaurin, "_use_triton", lambda x: calls.append(1) or True)
    triton = _features_and_gradient(feature_map, *_on_device([x, cotangent]))
    assert calls == [1]
    # Each feature against its own scale: features of high degree are tiny and must be right too.
    feature_scale = pytorch[0].abs().flatten(0, -2).amax(0)
    torch.testing.assert_close(triton[0] / feature_scale, pytorch[0] / feature_scale, atol=1e-5, rtol=1e-4,
                               msg="features")
    torch.testing.assert_close(triton[1], pytorch[1], atol=1e-5, rtol=1e-4, msg="grad x")


# The smallest shared memory per block among current NVIDIA GPUs (sm_86/89: 99 KB; A100 163 KB,
# H100/H200 227 KB): a kernel under it launches on any of them.
SHARED_MEMORY_LIMIT = 99 * 1024


@pytest.mark.slow
def test_kernels_compile_for_sm90_and_fit_any_gpu_at_the_gpu_configs_sizes() -> None:
    """The interpreter compiles nothing; this compiles every kernel for sm_90 (H100/H200) with Triton's
    own compiler and ptxas, on the CPU, at the sizes of configs/lm_gpu.yaml. Kernels holding a whole
    state per program needed 256-336 KB here and could not have launched."""
    root = Path(__file__).resolve().parents[1]
    model = yaml.safe_load((root / "configs/lm_gpu.yaml").read_text())["model"]
    head_dim = model["d_model"] // model["num_heads"]
    sizes = [90, model["num_features"], head_dim + 1, model["chunk_size"], head_dim]  # V: values and a ones column
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(root / "tests/triton_compile_check.py"), *map(str, sizes)],
                            env=environment, capture_output=True, text=True, timeout=600, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    shared = json.loads(result.stdout.splitlines()[-1])
    assert set(shared) == {"forward", "grad_query", "backward", "features", "features_backward"}
    assert all(0 < size <= SHARED_MEMORY_LIMIT for size in shared.values()), shared
