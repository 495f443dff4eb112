"""Spectraformer's grid at equal D: approximation error and speed of every (component, weights) pair.

Error: relative Frobenius error of each pair's attention against the softmax attention it
estimates, on the same q, k (ppSBN'd: centred, unit norm scaled by sqrt(t); or Gaussian q, k scaled
by head_dim^-1/4, Performer's setting), non-causal and causal, averaged over independent draws. OPRF
uses the rho of those inputs. Speed: forward time of one attention call at `--speed-seq-len`,
against softmax (SDPA) in the same run; RMFA-exp at the same D is shown for reference.

    python -m benchmarks.spectral_grid --num-features 128
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

import torch

from benchmarks.common import (
    add_common_arguments,
    check_positive,
    format_table,
    pyplot,
    save_figure,
    time_call,
    write_results,
)
from macformer.attention import feature_attention, softmax_attention
from macformer.features import COMPONENTS, WEIGHTS, RandomMaclaurinFeatures, SpectralFeatures
from macformer.host_memory import reuse_freed_host_memory
from macformer.ppsbn import PreSBN

# The family's free parameter shown at one value: a mild negative A, trigonometric.
GERF_SETTINGS = {"gerf_a": -0.1, "gerf_sign": -1}


def inputs(kind: str, seq_len: int, heads: int, head_dim: int, temperature: float, device: torch.device):
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq_len, head_dim, generator=generator, device=device) for _ in range(3))
    if kind == "ppSBN":
        pre = PreSBN(heads, max_temperature=2 * temperature, learnable=False,
                     initial_temperature=temperature).to(device)
        return pre(q), pre(k), v
    return q * head_dim**-0.25, k * head_dim**-0.25, v


def make_map(component: str, weights: str, head_dim: int, num_features: int, seed: int, rho: float):
    settings = GERF_SETTINGS if component == "gerf" else {"oprf_rho": rho} if component == "oprf" else {}
    return SpectralFeatures(head_dim, num_features, component, weights, seed=seed, **settings)


def measure(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    rows = []
    pairs = list(itertools.product(COMPONENTS, WEIGHTS))
    for kind in args.inputs:
        q, k, v = inputs(kind, args.seq_len, args.heads, args.head_dim, args.temperature, device)
        rho = ((q.square().sum(-1).mean() + k.square().sum(-1).mean()) / args.head_dim).item()  # E|q+k|^2/d
        for causal in (False, True):
            exact = softmax_attention(q, k, v, causal, scale=1.0)
            for component, weights in pairs:
                errors = []
                for seed in range(args.seeds):
                    feature_map = make_map(component, weights, args.head_dim, args.num_features, seed, rho).to(device)
                    out = feature_attention(q, k, v, feature_map, causal=causal)
                    errors.append(((out - exact).norm() / exact.norm()).item())
                rows.append({"inputs": kind, "causal": causal, "component": component, "weights": weights,
                             "error": sum(errors) / len(errors)})
    return rows


def measure_speed(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    q, k, v = inputs("ppSBN", args.speed_seq_len, args.heads, args.head_dim, args.temperature, device)
    baseline = time_call(lambda: softmax_attention(q, k, v, scale=1.0), device)
    rows = []
    maps = {(c, w): make_map(c, w, args.head_dim, args.num_features, 0, 0.1)
            for c, w in itertools.product(COMPONENTS, WEIGHTS)}
    maps[("rmfa-exp", "rademacher")] = RandomMaclaurinFeatures(args.head_dim, args.num_features, seed=0,
                                                               constant_feature=True, linear_features=True)
    with torch.no_grad():
        for (component, weights), feature_map in maps.items():
            feature_map = feature_map.to(device)
            seconds = time_call(lambda m=feature_map: feature_attention(q, k, v, m), device)
            rows.append({"component": component, "weights": weights, "seconds": seconds,
                         "speedup_vs_softmax": baseline / seconds})
    rows.append({"component": "softmax", "weights": "-", "seconds": baseline, "speedup_vs_softmax": 1.0})
    return rows


def heat_map(rows: list[dict], args: argparse.Namespace) -> Path:
    plt = pyplot()
    panels = list(itertools.product(args.inputs, (False, True)))
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (kind, causal) in zip(axes[0], panels, strict=True):
        grid = [[next(r["error"] for r in rows if (r["inputs"], r["causal"], r["component"], r["weights"])
                      == (kind, causal, c, w)) for w in WEIGHTS] for c in COMPONENTS]
        image = ax.imshow([[math.log10(x) for x in line] for line in grid], cmap="viridis_r", aspect="auto")
        ax.set_xticks(range(len(WEIGHTS)), WEIGHTS, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(COMPONENTS)), COMPONENTS)
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                ax.text(j, i, f"{value:.3f}", ha="center", va="center", color="white", fontsize=7)
        ax.set_title(f"{kind} inputs, {'causal' if causal else 'non-causal'}: rel. error", fontsize=9)
        figure.colorbar(image, ax=ax, label="log10 error")
    return save_figure(figure, args.output / "spectral_grid_error.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="macformer bench spectral_grid", description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-features", type=int, default=128, help="D, the same for every pair")
    parser.add_argument("--seq-len", type=int, default=1024, help="sequence length of the error measurement")
    parser.add_argument("--speed-seq-len", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.5, help="|q|^2 = |k|^2 of the ppSBN inputs")
    parser.add_argument("--inputs", nargs="+", default=["ppSBN", "d^-1/4"], choices=["ppSBN", "d^-1/4"])
    parser.add_argument("--seeds", type=int, default=5)
    add_common_arguments(parser, "spectral_grid")
    args = parser.parse_args(argv)
    check_positive(parser, num_features=args.num_features, seq_len=args.seq_len, speed_seq_len=args.speed_seq_len,
                   heads=args.heads, head_dim=args.head_dim, seeds=args.seeds)
    if args.num_features % 2 or args.num_features // 2 <= args.head_dim:
        parser.error("--num-features must be even and more than 2 x --head-dim (cos/sin pairs; moment matching)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reuse_freed_host_memory()  # as the macformer command and every training worker do
    rows = measure(args)
    print(format_table(rows, ["inputs", "causal", "component", "weights", "error"]))
    speed = measure_speed(args)
    print(format_table(speed, ["component", "weights", "seconds", "speedup_vs_softmax"]))
    summary = {}
    for kind in args.inputs:
        ranked = sorted((r for r in rows if r["inputs"] == kind and not r["causal"]), key=lambda r: r["error"])
        summary[f"best_error_{kind}"] = ranked[0]["error"]
        print(f"{kind}, non-causal: best {ranked[0]['component']} x {ranked[0]['weights']} ({ranked[0]['error']:.4f}), "
              f"worst {ranked[-1]['component']} x {ranked[-1]['weights']} ({ranked[-1]['error']:.4f})")
    args.output.mkdir(parents=True, exist_ok=True)
    figure = heat_map(rows, args)
    write_results(args, "spectral_grid", [*rows, *({"speed": True, **r} for r in speed)], summary, [figure])
    return 0


if __name__ == "__main__":
    sys.exit(main())
