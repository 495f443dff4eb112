"""Random Maclaurin estimators at sharp temperatures: attention error against exact kernel attention
for ppSBN inputs |q|^2 = |k|^2 = t, at equal output size D, for the library's estimator and the
variance-reduction candidates of issue #13.

Estimators (all compute degrees 0 and 1 exactly with 1 + head_dim features and sample the rest):
- "kar-karnick": the library's RandomMaclaurinFeatures (i.i.d. degrees, P(n) ∝ 2^-n, Rademacher).
- "tuned-law": degrees drawn by systematic sampling (counts within one of D P(n)) from
  P(n) ∝ a_n t^n, the allocation that minimises the variance sum_n a_n^2 t^2n / P(n) for pairs with
  x . y ~ 0 (unbiased: each degree is importance-weighted by a_n / P(n)).
- "tuned-law-srht": the same with each product slot's projections taken from randomly signed,
  permuted Hadamard rows (orthogonal within a block; still Rademacher marginally, so unbiased).
- "tuned-law-complex": the tuned law with complex Rademacher projections (entries +-1, +-i; Wacker,
  Kanagawa, Filippone 2022): a product's second moment per factor is |x|^2|y|^2 + (x . y)^2 instead of
  |x|^2|y|^2 + 2 (x . y)^2, lower for aligned pairs; each complex feature z gives the two real
  features Re z and Im z (Re z(x) conj z(y) is what they estimate), so half as many are drawn.
- "degree-2-only": the same machinery with only degree 2 sampled: biased (it drops sum_{n>2} a_n s^n);
  it shows how much of the error the higher degrees carry.

- "floor" (isotropic inputs only): no estimator, a bound: the error that the best possible unbiased
  map with D columns would have, to first order, as the ratio sqrt(floor / variance) times
  Kar & Karnick's measured error, where "floor" is the smallest mean pair variance any unbiased
  random feature map can have on these inputs (benchmarks/variance_floor.py) and "variance" is
  Kar & Karnick's, in closed form on the same pairs. First order holds where the denominators'
  relative error is small (0.014 at t = 1, 0.058 at t = 2, 0.45 at t = 4 for Kar & Karnick, D = 128).

Inputs: "isotropic" (Gaussian q, k, v through preSBN) and "clustered" (queries and keys near 16 shared
directions, as with a small vocabulary: per-pair errors then no longer average out over keys).

    python -m benchmarks.maclaurin_estimators --temperatures 0.5 1 2 3 4 --dims 64 128 256
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

from benchmarks.common import add_common_arguments, check_positive, format_table, pyplot, save_figure, write_results
from benchmarks.variance_floor import kar_karnick_variance, unbiased_variance_floor
from macformer.attention import feature_attention, kernel_attention
from macformer.features import FeatureMap, RandomMaclaurinFeatures
from macformer.host_memory import reuse_freed_host_memory
from macformer.kernels import get_kernel

ESTIMATORS = ("kar-karnick", "tuned-law", "tuned-law-srht", "tuned-law-complex", "degree-2-only")
INPUTS = ("isotropic", "clustered")
# Degrees beyond this carry less than 1e-12 of the law's mass for t <= 4 (exp) and are not drawn.
LAW_MAX_DEGREE = 48


def _hadamard(size: int) -> torch.Tensor:
    matrix = torch.ones(1, 1)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix


PROJECTIONS = ("rademacher", "hadamard", "complex")


class SampledDegreeFeatures(FeatureMap):
    """Degrees 0 and 1 exact; the other features have the degrees `law` assigns by systematic sampling,
    each sqrt(a_n / P(n) / m) prod_j (w_j . x) with w_j Rademacher ("rademacher"), randomly signed and
    permuted Hadamard rows ("hadamard") or complex Rademacher ("complex": m = half the random features,
    each giving its real and imaginary part)."""

    def __init__(self, dim: int, num_features: int, kernel: str, law: dict[int, float], projections: str,
                 seed: int) -> None:
        super().__init__(dim, num_features, seed)
        if projections not in PROJECTIONS:
            raise ValueError(f"unknown projections {projections!r}; valid: {', '.join(PROJECTIONS)}")
        self.kernel = get_kernel(kernel)
        self.law, self.projections = law, projections
        self._draw(self._generator())

    def _draw(self, generator: torch.Generator) -> None:
        slots_out = self.num_features - 1 - self.dim
        count = slots_out // 2 if self.projections == "complex" else slots_out
        degrees_sorted = sorted(self.law)
        cdf = torch.tensor([self.law[n] for n in degrees_sorted], dtype=torch.float64).cumsum(0)
        quantiles = (torch.arange(count, dtype=torch.float64) + torch.rand((), generator=generator,
                                                                           dtype=torch.float64)) / count
        index = torch.searchsorted(cdf / cdf[-1], quantiles).clamp(max=len(degrees_sorted) - 1)
        self.degrees = [degrees_sorted[i] for i in index.tolist()]
        coefficients = self.kernel.coefficients(max(self.degrees))
        self.scales = torch.tensor([math.sqrt(coefficients[n] / self.law[n] / count) for n in self.degrees])
        # An odd number of output slots leaves one unused by complex features: it stays zero.
        self.padding = slots_out - 2 * count if self.projections == "complex" else 0
        slots = max(self.degrees)
        weights = torch.empty(slots, count, self.dim, dtype=torch.complex64 if self.projections == "complex"
                              else torch.float32)
        for slot in range(slots):  # slot j of every feature: one block-orthogonal or i.i.d. set
            if self.projections == "hadamard":
                blocks = []
                while sum(b.shape[0] for b in blocks) < count:
                    signs = torch.randint(0, 2, (self.dim,), generator=generator) * 2 - 1
                    block = _hadamard(self.dim) * signs
                    blocks.append(block[torch.randperm(self.dim, generator=generator)])
                weights[slot] = torch.cat(blocks)[:count]
            else:
                signs = torch.randint(0, 2, (count, self.dim), generator=generator).float() * 2 - 1
                if self.projections == "complex":  # +-1 or +-i with equal probability: E[w conj(w)^T] = I
                    imaginary = torch.randint(0, 2, (count, self.dim), generator=generator).bool()
                    weights[slot] = torch.complex(signs * ~imaginary, signs * imaginary)
                else:
                    weights[slot] = signs
        self.weights = weights

    def forward(self, x: torch.Tensor, is_query: bool = False) -> torch.Tensor:
        projections = torch.einsum("...d,sfd->...sf", x.to(self.weights.dtype), self.weights)  # [..., slots, f]
        used = torch.arange(projections.shape[-2])[:, None] < torch.tensor(self.degrees)[None, :]
        random = torch.where(used, projections, torch.ones_like(projections)).prod(-2) * self.scales
        if self.projections == "complex":
            random = torch.cat([random.real, random.imag, x.new_zeros(*x.shape[:-1], self.padding)], dim=-1)
        exact = [x.new_ones(*x.shape[:-1], 1), x * self.kernel.coefficients(1)[1].sqrt().item()]
        return torch.cat([*exact, random], dim=-1)


def tuned_law(kernel: str, temperature: float) -> dict[int, float]:
    coefficients = get_kernel(kernel).coefficients(LAW_MAX_DEGREE)
    weights = {n: float(coefficients[n]) * temperature**n for n in range(2, LAW_MAX_DEGREE + 1)}
    total = sum(weights.values())
    return {n: w / total for n, w in weights.items() if w / total > 1e-12}


def make_estimator(name: str, kernel: str, dim: int, num_features: int, temperature: float, seed: int) -> FeatureMap:
    if name == "kar-karnick":
        return RandomMaclaurinFeatures(dim, num_features, kernel, seed=seed, constant_feature=True,
                                       linear_features=True)
    law = {2: 1.0} if name == "degree-2-only" else tuned_law(kernel, temperature)
    projections = {"tuned-law-srht": "hadamard", "tuned-law-complex": "complex"}.get(name, "rademacher")
    return SampledDegreeFeatures(dim, num_features, kernel, law, projections, seed)


def make_inputs(kind: str, temperature: float, args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    shape = (1, args.heads, args.seq_len, args.head_dim)
    if kind == "isotropic":
        q, k = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    else:
        centres = torch.randn(16, args.head_dim, generator=generator)
        pick = lambda: centres[torch.randint(0, 16, shape[:-1], generator=generator)]
        q = pick() + 0.2 * torch.randn(shape, generator=generator)
        k = pick() + 0.2 * torch.randn(shape, generator=generator)

    def presbn(x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(-1, keepdim=True)
        return centred / centred.norm(dim=-1, keepdim=True) * math.sqrt(temperature)

    return presbn(q), presbn(k), torch.randn(shape, generator=generator)


def measure(args: argparse.Namespace) -> list[dict]:
    rows = []
    for kind in args.inputs:
        for temperature in args.temperatures:
            q, k, v = make_inputs(kind, temperature, args)
            exact = kernel_attention(q, k, v, args.kernel)
            for num_features in args.dims:
                for name in ESTIMATORS:
                    errors = []
                    for seed in range(args.seeds):
                        approx = feature_attention(q, k, v, make_estimator(name, args.kernel, args.head_dim,
                                                                           num_features, temperature, seed))
                        errors.append(float((approx - exact).norm() / exact.norm()))
                    rows.append({"inputs": kind, "temperature": temperature, "num_features": num_features,
                                 "estimator": name, "error": statistics.fmean(errors)})
                if kind == "isotropic":
                    kar_karnick_error = next(r["error"] for r in rows[-len(ESTIMATORS):]
                                             if r["estimator"] == "kar-karnick")
                    rows.append(floor_row(q, k, temperature, num_features, kar_karnick_error, args))
            print(f"{kind} t={temperature}: " + ", ".join(
                f"D={r['num_features']} {r['estimator']} {r['error']:.3g}" for r in rows
                if (r["inputs"], r["temperature"]) == (kind, temperature)), flush=True)
    baseline = {(r["inputs"], r["temperature"], r["num_features"]): r["error"] for r in rows
                if r["estimator"] == "kar-karnick"}
    for row in rows:
        row["vs_kar_karnick"] = row["error"] / baseline[(row["inputs"], row["temperature"], row["num_features"])]
    return rows


def floor_row(q: torch.Tensor, k: torch.Tensor, temperature: float, num_features: int, kar_karnick_error: float,
              args: argparse.Namespace) -> dict:
    """The "floor" row: Kar & Karnick's error scaled by the smallest standard deviation any unbiased map
    with num_features columns can have on these inputs, relative to Kar & Karnick's own (preSBN
    centres the inputs: they are uniform on the sphere of the head_dim - 1 dimensions orthogonal to
    the all-ones vector)."""
    # every (query, key) pair of a head
    variance = kar_karnick_variance(args.kernel, q.unsqueeze(-2), k.unsqueeze(-3), num_features)
    floor = unbiased_variance_floor(args.kernel, temperature, args.head_dim - 1, num_features)
    ratio = math.sqrt(floor / float(variance.mean()))
    return {"inputs": "isotropic", "temperature": temperature, "num_features": num_features, "estimator": "floor",
            "error": ratio * kar_karnick_error}


def plot(rows: list[dict], args: argparse.Namespace) -> Path:
    plt = pyplot()
    figure, axes = plt.subplots(1, len(args.inputs), figsize=(6 * len(args.inputs), 4), squeeze=False)
    for ax, kind in zip(axes[0], args.inputs, strict=True):
        for name in (*ESTIMATORS, "floor"):
            points = [r for r in rows if r["inputs"] == kind and r["estimator"] == name
                      and r["num_features"] == args.dims[len(args.dims) // 2]]
            if points:
                ax.plot([r["temperature"] for r in points], [r["error"] for r in points], marker="o", label=name,
                        linestyle="--" if name == "floor" else "-")
        ax.set(title=f"{kind} inputs, D={args.dims[len(args.dims) // 2]}", xlabel="temperature t = |q|^2 = |k|^2",
               ylabel="relative attention error", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(figure, args.output / "maclaurin_estimators.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="macformer bench maclaurin_estimators",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", default="exp", choices=("exp", "trigh"))
    parser.add_argument("--temperatures", nargs="+", type=float, default=[0.5, 1.0, 2.0, 3.0, 4.0])
    parser.add_argument("--dims", nargs="+", type=int, default=[64, 128, 256])
    parser.add_argument("--inputs", nargs="+", choices=INPUTS, default=list(INPUTS))
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--head-dim", type=int, default=32, help="a power of two (Hadamard blocks)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=12, help="independent feature draws per cell")
    add_common_arguments(parser, "maclaurin_estimators")
    args = parser.parse_args(argv)
    check_positive(parser, temperatures=args.temperatures, seq_len=args.seq_len, head_dim=args.head_dim,
                   heads=args.heads, seeds=args.seeds)
    if args.head_dim & (args.head_dim - 1):
        parser.error(f"--head-dim must be a power of two for the Hadamard blocks, got {args.head_dim}")
    if min(args.dims) <= args.head_dim + 1:
        parser.error(f"--dims must exceed head_dim + 1 = {args.head_dim + 1} (degrees 0 and 1 are exact)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reuse_freed_host_memory()  # as the macformer command and every training worker do
    rows = measure(args)
    print(format_table(rows, ["inputs", "temperature", "num_features", "estimator", "error", "vs_kar_karnick"]))
    summary = {f"{r['inputs']}_t{r['temperature']:g}_D{r['num_features']}_{r['estimator']}_vs_kar_karnick":
               r["vs_kar_karnick"] for r in rows if r["estimator"] != "kar-karnick"}
    args.output.mkdir(parents=True, exist_ok=True)
    write_results(args, "maclaurin_estimators", rows, summary, [plot(rows, args)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
