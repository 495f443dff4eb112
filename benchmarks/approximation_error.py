"""Approximation error of RMFA against exact kernelized attention (the Macformer paper's Figure 4a).

For each kernel, number of random features D, ppSBN on/off and causal/non-causal: the relative
Frobenius error ||A_rmfa - A_exact||_F / ||A_exact||_F of the attention outputs, averaged over
independent feature draws. Inputs are Gaussian q, k, v of shape [batch, heads, seq, head_dim].

Two estimators: "const" (a deterministic degree-0 feature, degrees >= 1 sampled) and "const+lin"
(degrees 0 and 1 exact through 1 + head_dim features, degrees >= 2 sampled; needs D > head_dim + 1).
Both have the same output size D. "ppSBN" feeds both paths preSBN'd q and k (centred,
l2-normalised, scaled by head_dim^-1/4, so |q.k| <= head_dim^-1/2); "plain" scales raw q and k
by head_dim^-1/4 as standard attention does. Plain inputs reach |q.k| > 1, outside the radius of
convergence of inverse, log and sqrt: those cells are reported as diverging instead of a number.

    python -m benchmarks.approximation_error --kernels exp inverse log sqrt --dims 16 64 256 1024
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from macformer.attention import feature_attention, kernel_attention
from macformer.features import RandomMaclaurinFeatures
from macformer.kernels import KERNELS, get_kernel
from macformer.ppsbn import PreSBN


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx - exact).norm() / exact.norm()).item()


def make_inputs(seq_len: int, head_dim: int, heads: int, seed: int, ppsbn: bool):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, seq_len, head_dim, generator=generator) for _ in range(3))
    if ppsbn:
        pre = PreSBN(heads, head_dim, max_temperature=1.0, learnable=False)  # default t = head_dim^-1/2
        return pre(q), pre(k), v
    return q * head_dim**-0.25, k * head_dim**-0.25, v


ESTIMATORS = {
    "const": {"constant_feature": True},
    "const+lin": {"constant_feature": True, "linear_features": True},
}


def mean_error(q, k, v, exact, causal: bool, kernel: str, num_features: int, seeds: int, options: dict) -> float:
    errors = []
    for seed in range(seeds):
        feature_map = RandomMaclaurinFeatures(q.shape[-1], num_features, kernel, seed=seed, **options)
        errors.append(relative_error(feature_attention(q, k, v, feature_map, causal), exact))
    return sum(errors) / len(errors)


def measure(args: argparse.Namespace) -> list[dict]:
    rows = []
    for kernel_name in args.kernels:
        kernel = get_kernel(kernel_name)
        for ppsbn in (True, False):
            q, k, v = make_inputs(args.seq_len, args.head_dim, args.heads, 0, ppsbn)
            max_dot = (q @ k.transpose(-1, -2)).abs().max().item()
            for causal in (False, True):
                exact = None if max_dot >= kernel.radius else kernel_attention(q, k, v, kernel_name, causal)
                for estimator, options in ESTIMATORS.items():
                    row = {"kernel": kernel_name, "ppsbn": ppsbn, "causal": causal, "estimator": estimator,
                           "max_abs_qk": max_dot, "errors": {}}
                    if exact is None:
                        row["diverges"] = True
                    else:
                        for num_features in args.dims:
                            if num_features > args.head_dim + 1 or "linear_features" not in options:
                                row["errors"][num_features] = mean_error(
                                    q, k, v, exact, causal, kernel_name, num_features, args.seeds, options
                                )
                    rows.append(row)
    return rows


def format_table(rows: list[dict], dims: list[int]) -> str:
    header = "| kernel | inputs | causal | features | max abs q.k | " + " | ".join(f"D={d}" for d in dims) + " |"
    lines = [header, "|" + "---|" * (5 + len(dims))]
    for row in rows:
        cells = (["diverges (outside radius)"] + [""] * (len(dims) - 1) if row.get("diverges")
                 else [f"{row['errors'][d]:.4f}" if d in row["errors"] else "n/a" for d in dims])
        lines.append(
            f"| {row['kernel']} | {'ppSBN' if row['ppsbn'] else 'plain'} | {'yes' if row['causal'] else 'no'} "
            f"| {row['estimator']} | {row['max_abs_qk']:.3f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", nargs="+", default=["exp", "inverse", "log", "sqrt"], choices=sorted(KERNELS))
    parser.add_argument("--dims", nargs="+", type=int, default=[16, 32, 64, 128, 256, 512, 1024])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=5, help="independent feature draws averaged per cell")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/out/approximation_error.json"))
    args = parser.parse_args(argv)
    for name in ("seq_len", "head_dim", "heads", "seeds"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if any(d <= 0 for d in args.dims):
        parser.error("--dims must all be positive (D is a number of random features)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    rows = measure(args)
    print(format_table(rows, args.dims))
    print(f"\nseq_len={args.seq_len} head_dim={args.head_dim} heads={args.heads} seeds={args.seeds} "
          f"({time.perf_counter() - start:.1f} s); 1/sqrt(D) predicts x{math.sqrt(args.dims[-1] / args.dims[0]):.1f} "
          f"from D={args.dims[0]} to D={args.dims[-1]}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
