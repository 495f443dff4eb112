"""Approximation error of RMFA against exact kernelized attention (the Macformer paper's Figure 4a).

For each sequence length, kernel, number of random features D, ppSBN on/off and causal/non-causal: the relative
Frobenius error ||A_rmfa - A_exact||_F / ||A_exact||_F of the attention outputs, averaged over
independent feature draws. Inputs are Gaussian q, k, v of shape [batch, heads, seq, head_dim].

Two estimators: "const" (a deterministic degree-0 feature, degrees >= 1 sampled) and "const+lin"
(degrees 0 and 1 exact through 1 + head_dim features, degrees >= 2 sampled; needs D > head_dim + 1).
Both have the same output size D. "ppSBN" feeds both paths preSBN'd q and k (centred,
l2-normalised, scaled by head_dim^-1/4, so |q.k| <= head_dim^-1/2); "plain" scales raw q and k
by head_dim^-1/4 as standard attention does. Plain inputs reach |q.k| > 1, outside the radius of
convergence of inverse, log and sqrt: those cells are reported as diverging instead of a number.
RFA (trigrf x gaussian on l2-normalised q, k) and FAVOR+ (posrf x orthogonal on q, k scaled by
head_dim^-1/4) are measured against the softmax attention they estimate, on the same raw q, k.

    python -m benchmarks.approximation_error --kernels exp inverse log sqrt --dims 16 64 256 1024
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import add_common_arguments, check_positive, line_style, pyplot, save_figure, write_results
from macformer.attention import feature_attention, kernel_attention, softmax_attention
from macformer.features import RandomMaclaurinFeatures, SpectralFeatures
from macformer.host_memory import reuse_freed_host_memory
from macformer.kernels import KERNELS, get_kernel
from macformer.ppsbn import PreSBN


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx - exact).norm() / exact.norm()).item()


def make_inputs(seq_len: int, head_dim: int, heads: int, seed: int, ppsbn: bool):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, seq_len, head_dim, generator=generator) for _ in range(3))
    if ppsbn:
        # the paper's scale, t = head_dim^-1/2
        pre = PreSBN(heads, max_temperature=1.0, initial_temperature=head_dim**-0.5, learnable=False)
        return pre(q), pre(k), v
    return q * head_dim**-0.25, k * head_dim**-0.25, v


ESTIMATORS = {
    "const": {"constant_feature": True},
    "const+lin": {"constant_feature": True, "linear_features": True},
}


def mean_error(make_map, q, k, v, exact, causal: bool, seeds: int) -> float:
    errors = [relative_error(feature_attention(q, k, v, make_map(seed), causal=causal), exact) for seed in range(seeds)]
    return sum(errors) / len(errors)


def _measured(row: dict) -> dict:
    """Report each finished row at once: the full grid takes minutes."""
    largest = max(row["errors"], default=None)
    shown = ("diverges" if row.get("diverges") else "no D measured" if largest is None
             else f"error {row['errors'][largest]:.4f} at D={largest}")
    print(f"  {row['method']} ({row['inputs']}, {'causal' if row['causal'] else 'non-causal'}, {row['estimator']}, "
          f"n={row['seq_len']}): {shown}", flush=True)
    return row


def rmfa_rows(args: argparse.Namespace, seq_len: int) -> list[dict]:
    rows = []
    for kernel_name in args.kernels:
        kernel = get_kernel(kernel_name)
        for ppsbn in (True, False):
            q, k, v = make_inputs(seq_len, args.head_dim, args.heads, 0, ppsbn)
            max_dot = (q @ k.transpose(-1, -2)).abs().max().item()
            for causal in (False, True):
                exact = None if max_dot >= kernel.radius else kernel_attention(q, k, v, kernel_name, causal)
                for estimator, options in ESTIMATORS.items():
                    row = {"seq_len": seq_len, "method": f"rmfa-{kernel_name}", "inputs": "ppSBN" if ppsbn else "plain",
                           "causal": causal, "estimator": estimator, "max_abs_qk": max_dot, "errors": {}}
                    if exact is None:
                        row["diverges"] = True
                    else:
                        for num_features in args.dims:
                            if num_features > args.head_dim + 1 or "linear_features" not in options:
                                make = lambda seed, d=num_features, o=options, f=kernel_name: RandomMaclaurinFeatures(
                                    args.head_dim, d, f, seed=seed, **o)
                                row["errors"][num_features] = mean_error(make, q, k, v, exact, causal, args.seeds)
                    rows.append(_measured(row))
    return rows


def softmax_estimator_rows(args: argparse.Namespace, seq_len: int) -> list[dict]:
    """RFA and FAVOR+ against softmax attention of the same raw q, k (RFA on l2-normalised q, k,
    whose softmax it estimates)."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, seq_len, args.head_dim, generator=generator) for _ in range(3))
    scale = args.head_dim**-0.25
    pre = PreSBN(args.heads, max_temperature=2.0, initial_temperature=args.head_dim**-0.5, learnable=False)
    settings = [
        ("rfa", "l2", "trigrf", "gaussian", F.normalize(q, dim=-1), F.normalize(k, dim=-1)),
        ("favor", "d^-1/4", "posrf", "orthogonal", q * scale, k * scale),
        ("favor", "ppSBN", "posrf", "orthogonal", pre(q), pre(k)),
    ]
    rows = []
    for method, inputs, component, weights, q_in, k_in in settings:
        for causal in (False, True):
            exact = softmax_attention(q_in, k_in, v, causal, scale=1.0)
            row = {"seq_len": seq_len, "method": method, "inputs": inputs,
                   "causal": causal, "estimator": f"{component} x {weights}",
                   "max_abs_qk": (q_in @ k_in.transpose(-1, -2)).abs().max().item(), "errors": {}}
            for num_features in args.dims:
                make = lambda seed, d=num_features, c=component, w=weights: SpectralFeatures(
                    args.head_dim, d, c, w, seed=seed)
                if weights != "moment_matched" or num_features > args.head_dim:
                    row["errors"][num_features] = mean_error(make, q_in, k_in, v, exact, causal, args.seeds)
            rows.append(_measured(row))
    return rows


def measure(args: argparse.Namespace) -> list[dict]:
    rows = []
    for seq_len in args.seq_lens:
        rows += rmfa_rows(args, seq_len) + softmax_estimator_rows(args, seq_len)
    return rows


def format_table(rows: list[dict], dims: list[int]) -> str:
    header = ("| seq | method | inputs | causal | features | max abs q.k | "
              + " | ".join(f"D={d}" for d in dims) + " |")
    lines = [header, "|" + "---|" * (6 + len(dims))]
    for row in rows:
        cells = (["diverges (outside radius)"] + [""] * (len(dims) - 1) if row.get("diverges")
                 else [f"{row['errors'][d]:.4f}" if d in row["errors"] else "n/a" for d in dims])
        lines.append(
            f"| {row['seq_len']} | {row['method']} | {row['inputs']} | {'yes' if row['causal'] else 'no'} "
            f"| {row['estimator']} | {row['max_abs_qk']:.3f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], args: argparse.Namespace) -> Path:
    """Error vs D on log-log axes, one panel per (causal, sequence length), with a 1/sqrt(D) line."""
    plt = pyplot()
    figure, axes = plt.subplots(2, len(args.seq_lens), figsize=(6 * len(args.seq_lens), 9), squeeze=False)
    for column, seq_len in enumerate(args.seq_lens):
        for line, causal in enumerate((False, True)):
            ax = axes[line][column]
            series = [r for r in rows if r["seq_len"] == seq_len and r["causal"] == causal and r["errors"]]
            for index, row in enumerate(series):
                dims = sorted(row["errors"])
                ax.plot(dims, [row["errors"][d] for d in dims], **line_style(index),
                        label=f"{row['method']} {row['inputs']} {row['estimator']}")
            reference = [1 / math.sqrt(d) for d in args.dims]
            ax.plot(args.dims, reference, "k--", linewidth=1, label="1/sqrt(D)")
            ax.set(xscale="log", yscale="log", xlabel="D (random features)", ylabel="relative error",
                   title=f"n={seq_len} {'causal' if causal else 'non-causal'}")
            ax.grid(alpha=0.3)
    figure.suptitle("RMFA attention error vs D (mean over draws): each kernel, inputs and estimator")
    return save_figure(figure, args.output / "approximation_error.png", legend_axes=axes[0][0])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="macformer bench approximation_error",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", nargs="+", default=["exp", "inverse", "log", "sqrt"], choices=sorted(KERNELS))
    parser.add_argument("--dims", nargs="+", type=int, default=[16, 32, 64, 128, 256, 512, 1024],
                        help="numbers of random features D")
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[1024])
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=5, help="independent feature draws averaged per cell")
    add_common_arguments(parser, "approximation_error")
    args = parser.parse_args(argv)
    check_positive(parser, seq_lens=args.seq_lens, dims=args.dims, head_dim=args.head_dim, heads=args.heads,
                   seeds=args.seeds)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reuse_freed_host_memory()  # as the macformer command and every training worker do
    start = time.perf_counter()
    rows = measure(args)
    print(format_table(rows, args.dims))
    first, last = args.dims[0], args.dims[-1]
    print(f"\nhead_dim={args.head_dim} heads={args.heads} seeds={args.seeds} ({time.perf_counter() - start:.1f} s); "
          f"1/sqrt(D) predicts x{math.sqrt(last / first):.1f} from D={first} to D={last}")
    summary = {f"{r['method']}_{r['inputs']}_{'causal' if r['causal'] else 'full'}_{r['estimator']}_n{r['seq_len']}_"
               f"D{last}": r["errors"][last] for r in rows if last in r["errors"]}
    falls = [r["errors"][first] / r["errors"][last] for r in rows if first in r["errors"] and last in r["errors"]]
    if falls:
        summary["median_error_ratio_first_to_last_D"] = sorted(falls)[len(falls) // 2]
    args.output.mkdir(parents=True, exist_ok=True)
    write_results(args, "approximation_error", rows, summary, [plot(rows, args)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
