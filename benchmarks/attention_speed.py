"""Attention speed and memory against sequence length (the Macformer paper's Figure 4b, extended).

Forward and forward+backward wall time and peak memory of one attention call, batch 1, 8 heads,
head_dim 64, non-causal and causal, for: softmax attention through PyTorch SDPA (the baseline,
reported as ratios), RMFA per kernel and D (preSBN'd q, k; degrees 0 and 1 exact, as the model
uses it; for the first kernel and the middle D also with the features built the plain way), RFA
(trigrf x gaussian on l2-normalised q, k), our FAVOR+ (posrf x orthogonal), performer-pytorch's
FAVOR+ at the same D when that package is installed, and, causal only, the cumulative-sum form of
the Macformer/RFA reference code (a materialised [seq, D, d] tensor) against our chunked form.

    python -m benchmarks.attention_speed --seq-lens 512 1024 2048 4096 8192 16384
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import (
    PeakMemory,
    add_common_arguments,
    check_positive,
    format_table,
    pyplot,
    save_figure,
    time_call,
    write_results,
)
from macformer.attention import feature_attention, softmax_attention
from macformer.attention.linear import DEFAULT_CHUNK_SIZE
from macformer.features import FeatureMap, RandomMaclaurinFeatures, SpectralFeatures
from macformer.host_memory import reuse_freed_host_memory
from macformer.kernels import KERNELS
from macformer.ppsbn import PreSBN

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def cumsum_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feature_map: FeatureMap,
                            eps: float = 1e-6) -> torch.Tensor:
    """The reference implementations' causal form: S_i = cumsum_j phi(k_j) v_j^T materialised as a
    [batch, heads, seq, D, d_v] tensor, then out_i = phi(q_i) S_i / phi(q_i) z_i."""
    query_features, key_features = feature_map(q, is_query=True), feature_map(k)
    states = torch.cumsum(key_features.unsqueeze(-1) * v.unsqueeze(-2), dim=2)
    sums = key_features.cumsum(dim=2)
    numerator = torch.einsum("bhnf,bhnfd->bhnd", query_features, states)
    denominator = (query_features * sums).sum(-1, keepdim=True)
    return numerator / (denominator + eps)


def performer_attention(head_dim: int, num_features: int, causal: bool) -> Attention | None:
    """performer-pytorch's FastAttention (FAVOR+ with orthogonal features), or None if not installed."""
    try:
        from performer_pytorch import FastAttention
    except ImportError:
        return None
    module = FastAttention(dim_heads=head_dim, nb_features=num_features, causal=causal)
    return lambda q, k, v: module(q, k, v)


class PlainFeatures(torch.nn.Module):
    """An RMFA map evaluated through its plain construction (`reference_forward`: a matmul with every
    row, identity block included, products, concatenation; autograd's own backward)."""

    def __init__(self, feature_map: RandomMaclaurinFeatures) -> None:
        super().__init__()
        self.feature_map = feature_map

    def forward(self, x: torch.Tensor, is_query: bool = False) -> torch.Tensor:
        return self.feature_map.reference_forward(x)


class AuthorsEstimatorFeatures(torch.nn.Module):
    """The Macformer authors' construction of the same estimator, reimplemented from its description
    (Guo et al. 2024; their code's Maclaurin + PolynomialSketch classes): per sampled degree n a
    polynomial sketch of n independent Rademacher projections x W_j^T whose elementwise product,
    times sqrt(a_n / P(n) / D_rand), gives that degree's features; the degree groups, the constant
    sqrt(a_0) and the linear sqrt(a_1) x are concatenated; autograd's backward. It takes the draws of
    an RMFA map (same degrees, vectors and scales), so both compute the same features."""

    def __init__(self, feature_map: RandomMaclaurinFeatures) -> None:
        super().__init__()
        _, _, self.constant, self.linear = feature_map._fast_path()
        start = feature_map.dim * int(feature_map.linear_features)
        column = int(feature_map.constant_feature) + start
        self.groups = []
        for degree, count in feature_map._random_groups:
            rows = feature_map.weights[start:start + degree * count].unflatten(0, (count, degree))
            projections = [rows[:, j].T.contiguous() for j in range(degree)]  # one [d, count] matrix per factor
            self.groups.append((projections, feature_map.scales[column:column + count].clone()))
            start, column = start + degree * count, column + count

    def _apply(self, fn, recurse: bool = True):
        self.groups = [([fn(w) for w in projections], fn(scales)) for projections, scales in self.groups]
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor, is_query: bool = False) -> torch.Tensor:
        pieces = []
        for projections, scales in self.groups:
            if not projections:  # sampled degree 0: the constant, importance-weighted
                pieces.append(scales.expand(*x.shape[:-1], -1))
                continue
            sketch = x @ projections[0]
            for weights in projections[1:]:
                sketch = sketch * (x @ weights)
            pieces.append(sketch * scales)
        exact = [x.new_full((*x.shape[:-1], 1), self.constant)] if self.constant is not None else []
        if self.linear is not None:
            exact.append(x * self.linear)
        return torch.cat([*exact, *pieces], dim=-1)


def forward_flops(name: str, seq_len: int, causal: bool, heads: int, head_dim: int, random_rows: dict[str, int],
                  chunk_size: int = DEFAULT_CHUNK_SIZE) -> float:
    """Multiply-adds x 2 of one forward call's matrix products (elementwise work left out): softmax
    4 n^2 d h (halved when causal); a feature attention 2 n d R h per input for its map onto R rows
    (q and k), then 4 n D (d + 1) h for phi(Q) (phi(K)^T V') and, causal, the chunks' 2 n C (D + d + 1) h."""
    if name == "softmax" or name.startswith("performer"):
        return 4 * seq_len**2 * head_dim * heads / (2 if causal else 1) if name == "softmax" else math.nan
    features = int(name.split("-D")[1].split("-")[0])
    values = head_dim + 1
    flops = 2 * 2 * seq_len * head_dim * random_rows.get(name, features) * heads
    flops += 4 * seq_len * features * values * heads
    if causal:
        flops += 2 * seq_len * min(chunk_size, seq_len) * (features + values) * heads
    return flops


def methods(kernels: list[str], dims: list[int], head_dim: int, heads: int, causal: bool,
            device: torch.device) -> tuple[dict[str, Attention], dict[str, int]]:
    """(name -> attention(q, k, v) with its own scaling of q and k, all built once, on `device`;
    name -> rows its feature map multiplies, for the FLOP count)."""
    pre_sbn = PreSBN(heads, max_temperature=2.0, initial_temperature=1.0, learnable=False).to(device)
    scale = head_dim**-0.25
    found: dict[str, Attention] = {"softmax": lambda q, k, v: softmax_attention(q, k, v, causal)}
    random_rows: dict[str, int] = {}

    def with_map(feature_map: FeatureMap, prepare: Callable[[torch.Tensor], torch.Tensor]) -> Attention:
        feature_map = feature_map.to(device)
        return lambda q, k, v: feature_attention(prepare(q), prepare(k), v, feature_map, causal=causal)

    middle = dims[len(dims) // 2]
    for kernel in kernels:
        for d in dims:
            # The model's default: degrees 0 and 1 exact (degree 1 needs D > head_dim + 1).
            rmfa = RandomMaclaurinFeatures(head_dim, d, kernel, seed=0, constant_feature=True,
                                           linear_features=d > head_dim + 1)
            found[f"rmfa-{kernel}-D{d}"] = with_map(rmfa, pre_sbn)
            random_rows[f"rmfa-{kernel}-D{d}"] = rmfa.weights.shape[0] - head_dim * int(rmfa.linear_features)
            if kernel == kernels[0] and d == middle:  # the same features built two other ways, for comparison
                found[f"rmfa-{kernel}-D{d}-plain-features"] = with_map(PlainFeatures(rmfa), pre_sbn)
                random_rows[f"rmfa-{kernel}-D{d}-plain-features"] = rmfa.weights.shape[0]  # identity block too
                found[f"rmfa-{kernel}-D{d}-authors-estimator"] = with_map(AuthorsEstimatorFeatures(rmfa), pre_sbn)
                random_rows[f"rmfa-{kernel}-D{d}-authors-estimator"] = random_rows[f"rmfa-{kernel}-D{d}"]
    found[f"rfa-D{middle}"] = with_map(SpectralFeatures(head_dim, middle, "trigrf", "gaussian", seed=0),
                                       lambda x: F.normalize(x, dim=-1))
    favor = SpectralFeatures(head_dim, middle, "posrf", "orthogonal", seed=0)
    found[f"favor-D{middle}"] = with_map(favor, lambda x: x * scale)
    peer = performer_attention(head_dim, middle, causal)
    if peer is not None:
        found[f"performer_pytorch-D{middle}"] = peer
    if causal:
        favor_on_device = favor.to(device)
        found[f"cumsum-favor-D{middle}"] = lambda q, k, v: cumsum_causal_attention(q * scale, k * scale, v,
                                                                                  favor_on_device)
    return found, random_rows


def measure_one(attention: Attention, seq_len: int, heads: int, head_dim: int, backward: bool,
                device: torch.device, repeats: int) -> tuple[float, float]:
    """(seconds, peak MiB) of one call; inputs are created outside the measured region."""
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq_len, head_dim, device=device, generator=generator,
                           requires_grad=backward) for _ in range(3))

    def call() -> None:
        out = attention(q, k, v)
        if backward:
            out.sum().backward()
            for t in (q, k, v):
                t.grad = None

    with torch.set_grad_enabled(backward):
        seconds = time_call(call, device, repeats=repeats)
        with PeakMemory(device) as memory:
            call()
    return seconds, memory.peak_mib


def measure(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    rows = []
    for causal in (False, True):
        table, random_rows = methods(args.kernels, args.dims, args.head_dim, args.heads, causal, device)
        for backward in (False, True):
            for seq_len in args.seq_lens:
                for name, attention in table.items():
                    if name.startswith("cumsum") and seq_len > args.cumsum_max_len:
                        continue
                    try:
                        seconds, peak = measure_one(attention, seq_len, args.heads, args.head_dim, backward,
                                                    device, args.repeats)
                    except (RuntimeError, MemoryError) as error:  # out of memory: report, go on
                        print(f"{name} at {seq_len}: {str(error).splitlines()[0][:100]}", file=sys.stderr)
                        seconds, peak = math.nan, math.nan
                    flops = (math.nan if name.startswith("cumsum") else
                             forward_flops(name, seq_len, causal, args.heads, args.head_dim, random_rows))
                    rows.append({"method": name, "causal": causal, "pass": "fwd+bwd" if backward else "fwd",
                                 "seq_len": seq_len, "seconds": seconds, "peak_mib": peak, "forward_flops": flops})
                    print(f"{'causal' if causal else 'full'} {rows[-1]['pass']} {name} n={seq_len}: "
                          f"{seconds * 1e3:.1f} ms, {peak:.1f} MiB", flush=True)
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """speedup = softmax time / method time, memory_ratio = softmax peak / method peak (same cell);
    flop_speedup = softmax FLOPs / method FLOPs (the speedup the arithmetic allows) and
    flop_efficiency = speedup / flop_speedup (1: as efficient per FLOP as SDPA)."""
    baseline = {(r["causal"], r["pass"], r["seq_len"]): r for r in rows if r["method"] == "softmax"}
    for row in rows:
        base = baseline.get((row["causal"], row["pass"], row["seq_len"]))
        row["speedup_vs_softmax"] = base["seconds"] / row["seconds"] if base and row["seconds"] > 0 else None
        row["memory_ratio_vs_softmax"] = base["peak_mib"] / row["peak_mib"] if base and row["peak_mib"] > 0 else None
        allowed = base["forward_flops"] / row["forward_flops"] if base and row["forward_flops"] > 0 else None
        row["flop_speedup"] = allowed
        row["flop_efficiency"] = (row["speedup_vs_softmax"] / allowed
                                  if allowed and row["speedup_vs_softmax"] is not None else None)


def targets(rows: list[dict], seq_lens: list[int]) -> dict[str, float]:
    """The issue's targets as numbers: speedups of RMFA-exp D=128 and chunked vs cumulative sum."""
    def cell(method: str, causal: bool, n: int, key: str, kind: str = "fwd") -> float:
        for r in rows:
            if (r["method"], r["causal"], r["pass"], r["seq_len"]) == (method, causal, kind, n):
                return r[key] if r[key] is not None else math.nan
        return math.nan

    summary = {}
    for n in (2048, 8192, 16384):
        if n in seq_lens:
            summary[f"rmfa_exp_d128_speedup_{n}"] = cell("rmfa-exp-D128", False, n, "speedup_vs_softmax")
            summary[f"rmfa_exp_d128_causal_speedup_{n}"] = cell("rmfa-exp-D128", True, n, "speedup_vs_softmax")
    cumsum_n = max((r["seq_len"] for r in rows if r["method"].startswith("cumsum") and r["seconds"] == r["seconds"]),
                   default=None)
    if cumsum_n is not None:
        favor = next(r["method"] for r in rows if r["method"].startswith("favor"))
        cumsum = "cumsum-" + favor
        summary[f"chunked_vs_cumsum_speed_{cumsum_n}"] = (cell(cumsum, True, cumsum_n, "seconds")
                                                          / cell(favor, True, cumsum_n, "seconds"))
        summary[f"chunked_vs_cumsum_memory_{cumsum_n}"] = (cell(cumsum, True, cumsum_n, "peak_mib")
                                                           / cell(favor, True, cumsum_n, "peak_mib"))
        peer = [r["method"] for r in rows if r["method"].startswith("performer_pytorch")]
        if peer:
            for causal in (False, True):
                n = max(seq_lens)
                summary[f"favor_vs_performer_pytorch_speed_{'causal' if causal else 'full'}_{n}"] = (
                    cell(peer[0], causal, n, "seconds") / cell(favor, causal, n, "seconds"))
    rmfa_memory = [r for r in rows if r["method"] == "rmfa-exp-D128" and not r["causal"] and r["pass"] == "fwd"]
    if len(rmfa_memory) >= 2:
        first, last = rmfa_memory[0], rmfa_memory[-1]
        summary["rmfa_memory_growth_per_length_doubling"] = (
            (last["peak_mib"] / first["peak_mib"]) ** (1 / math.log2(last["seq_len"] / first["seq_len"])))
    return summary


def plot(rows: list[dict], args: argparse.Namespace) -> list[Path]:
    plt = pyplot()
    paths = []
    for key, label in (("seconds", "time (s)"), ("peak_mib", "peak memory (MiB)")):
        figure, axes = plt.subplots(2, 2, figsize=(12, 9), sharex=True)
        for column, causal in enumerate((False, True)):
            for line, kind in enumerate(("fwd", "fwd+bwd")):
                ax = axes[line][column]
                names = dict.fromkeys(r["method"] for r in rows if r["causal"] == causal)
                for name in names:
                    if name.startswith("rmfa") and not name.endswith("D128") and not name.startswith("rmfa-exp"):
                        continue  # one D per non-exp kernel keeps the plot readable; the JSON has all
                    points = [(r["seq_len"], r[key]) for r in rows
                              if r["method"] == name and r["causal"] == causal and r["pass"] == kind]
                    ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=name,
                            linewidth=2.5 if name == "softmax" else 1)
                ax.set(xscale="log", yscale="log", title=f"{'causal' if causal else 'non-causal'} {kind}",
                       xlabel="sequence length", ylabel=label)
                ax.grid(alpha=0.3)
        axes[0][1].legend(fontsize=6, ncol=2)
        paths.append(save_figure(figure, args.output / f"attention_{key}.png"))
    paths.append(heat_map(rows, args))
    return paths


def heat_map(rows: list[dict], args: argparse.Namespace) -> Path:
    """softmax time / RMFA-exp time over (sequence length, D), non-causal forward: the paper's figure."""
    plt = pyplot()
    grid = [[next((r["speedup_vs_softmax"] for r in rows if r["method"] == f"rmfa-exp-D{d}" and not r["causal"]
                   and r["pass"] == "fwd" and r["seq_len"] == n), math.nan) or math.nan for n in args.seq_lens]
            for d in args.dims]
    figure, ax = plt.subplots(figsize=(1.2 * len(args.seq_lens) + 2, 0.8 * len(args.dims) + 1.5))
    image = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(len(args.seq_lens)), [str(n) for n in args.seq_lens])
    ax.set_yticks(range(len(args.dims)), [str(d) for d in args.dims])
    for i, line in enumerate(grid):
        for j, value in enumerate(line):
            ax.text(j, i, f"{value:.2f}x", ha="center", va="center", color="white", fontsize=8)
    ax.set(xlabel="sequence length", ylabel="D (random features)", title="RMFA-exp speedup over softmax (fwd)")
    figure.colorbar(image)
    return save_figure(figure, args.output / "rmfa_speedup_heatmap.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="macformer bench attention_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--kernels", nargs="+", default=["exp", "inverse", "log", "trigh", "sqrt"],
                        choices=sorted(KERNELS))
    parser.add_argument("--dims", nargs="+", type=int, default=[64, 128, 256], help="numbers of random features D")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cumsum-max-len", type=int, default=8192,
                        help="longest sequence for the cumulative-sum form (its tensor is seq x D x d floats)")
    add_common_arguments(parser, "attention_speed")
    args = parser.parse_args(argv)
    check_positive(parser, seq_lens=args.seq_lens, dims=args.dims, heads=args.heads, head_dim=args.head_dim,
                   repeats=args.repeats)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reuse_freed_host_memory()  # as the macformer command and every training worker do
    rows = measure(args)
    columns = ["method", "causal", "pass", "seq_len", "seconds", "peak_mib", "speedup_vs_softmax",
               "flop_speedup", "flop_efficiency", "memory_ratio_vs_softmax"]
    print(format_table(rows, columns))
    summary = targets(rows, args.seq_lens)
    for key, value in summary.items():
        print(f"{key}: {value:.3g}")
    args.output.mkdir(parents=True, exist_ok=True)
    write_results(args, "attention_speed", rows, summary, plot(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
