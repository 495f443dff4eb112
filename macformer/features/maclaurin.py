"""Random Maclaurin features (Kar & Karnick, 2012) for dot-product kernels with a_n >= 0."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from macformer.errors import MacformerError
from macformer.features.base import FeatureMap
from macformer.kernels import DotProductKernel, get_kernel
from macformer.triton_support import triton_usable as _use_triton

__all__ = ["RandomMaclaurinFeatures", "aligned_pair_relative_std", "degree_distribution"]

# Terms of the variance series summed before it is declared convergent or divergent.
VARIANCE_TERMS = 400
# Inputs of at most this many rows (decoding: batch x heads) take the fast path's gather form.
FEW_ROWS = 256
# The fast path's projection matrix gets zero rows up to a multiple of this: CPU BLAS multiplies by an
# odd row count (e.g. 183) at about half the speed of the next multiple of 8 (measured at 65k x 64 inputs).
ROW_MULTIPLE = 8
# Rows of input per block of the fast path: the projections of a block (~3 MB at D = 128) stay in cache
# across the products' passes over them (8 x 8192 rows, head_dim 64: forward 43 -> 25 ms, the
# backward's products and matmuls 104 -> 63 ms against one block; 1024 and 16384 were slower).
ROWS_PER_BLOCK = 4096


def degree_distribution(p: float, min_degree: int, max_degree: int | None) -> tuple[float, float]:
    """(ratio r, normaliser) of P(N = n) = r^(n - min_degree) (1 - r) / normaliser on
    [min_degree, max_degree], with r = 1/p. Untruncated from degree 0 this is Kar & Karnick's
    P(N = n) = p^-(n+1) at p = 2; for other p it is the normalised geometric law."""
    ratio = 1.0 / p
    support = math.inf if max_degree is None else max_degree - min_degree + 1
    return ratio, 1.0 - ratio**support


def aligned_pair_relative_std(
    kernel: DotProductKernel, temperature: float, num_random: int, p: float, min_degree: int,
    max_degree: int | None = None,
) -> float:
    """Largest standard deviation of the random part of phi(x) . phi(y), over pairs with
    |x|^2 = |y|^2 = t, relative to the largest kernel value f(t); inf where it diverges. The largest
    standard deviation is reached as x -> y, whose kernel value is f(t): this is the relative noise
    of the estimate of the weight that sharp attention picks out.

    A feature of degree n is importance-weighted by a_n / P(n), and its Rademacher product has second
    moment E[(w.x)^2 (w.y)^2]^n <= (3 t^2)^n (reached as x -> +-y), so the variance of the mean of
    `num_random` features is at most sum_n a_n^2 (3 t^2)^n / P(n) / num_random over the sampled degrees.
    """
    ratio, normaliser = degree_distribution(p, min_degree, max_degree)
    last = min_degree + VARIANCE_TERMS if max_degree is None else max_degree
    coefficients = kernel.coefficients(last).tolist()
    variance, term = 0.0, 0.0
    for n in range(min_degree, last + 1):
        log_probability = (n - min_degree) * math.log(ratio) + math.log((1 - ratio) / normaliser)
        if coefficients[n] > 0:
            log_term = 2 * math.log(coefficients[n]) + n * math.log(3 * temperature**2) - log_probability
            if log_term > 700:  # beyond float range: the series diverges here
                return math.inf
            term = math.exp(log_term)
            variance += term
    if max_degree is None and term > 1e-12 * variance:  # the tail has not died out: divergent
        return math.inf
    largest = float(kernel.fn(torch.tensor(temperature, dtype=torch.float64)))
    return math.sqrt(variance / num_random) / largest


class RandomMaclaurinFeatures(FeatureMap):
    """phi(x) in R^D with E[phi(x) . phi(y)] = f(x . y) for a dot-product kernel f, on the map's
    own input (no scaling inside the map: scale q and k before it, e.g. with ppSBN).

    Each random feature draws a degree N ~ P(N = n) ∝ p^-n and N Rademacher vectors w_1..w_N, and
    is sqrt(a_N / P(N) / D_rand) * prod_j (w_j . x). Then E[feature(x) feature(y)] = sum_n a_n t^n / D_rand.

    Args:
        dim: input dimension d.
        num_features: output dimension D.
        kernel: a kernel name ("exp", "inverse", "log", "trigh", "sqrt"), a DotProductKernel, or a
            coefficient list.
        p: parameter of the degree distribution (> 1). Larger p favours low degrees. The variance
            is finite only where p * |x|^2 * |y|^2 < 1 for radius-1 kernels (ppSBN ensures it).
        seed: seed of the draws (None: drawn from torch's global RNG).
        constant_feature: use one deterministic feature sqrt(a_0) for the degree-0 term instead of
            sampling degree 0 (lower variance); the other D - 1 features sample degrees >= 1.
        linear_features: also compute the degree-1 term exactly with the `dim` features sqrt(a_1) x
            (the "h01" variant; needs constant_feature). The D - 1 - dim random features then sample
            degrees >= 2 only. For inputs of small norm (ppSBN) degree 1 carries most of f(t) - a_0,
            so this removes most of the variance at equal output size D.
        max_degree: sample degrees up to this value only, with P renormalised on the truncated
            support. The map then estimates the partial sum sum_{n<=max_degree} a_n t^n exactly; the
            bias is the tail sum_{n>max_degree} a_n t^n (at most a_{M+1}|t|^{M+1}/(1-|t|) for
            kernels with non-increasing a_n, e.g. < 1e-9 for exp at |t| <= 1 and M = 12).
            Polynomial kernels are truncated at their degree automatically, without bias.
        redraw_interval: redraw every this many training forward passes (see FeatureMap).
    """

    def __init__(
        self,
        dim: int,
        num_features: int,
        kernel: str | DotProductKernel | Sequence[float] = "exp",
        p: float = 2.0,
        seed: int | None = None,
        constant_feature: bool = False,
        linear_features: bool = False,
        max_degree: int | None = None,
        redraw_interval: int | None = None,
    ) -> None:
        super().__init__(dim, num_features, seed, redraw_interval)
        self.kernel = get_kernel(kernel)
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not p > 1.0 or not math.isfinite(p):
            raise MacformerError(f"p must be a finite number > 1 (P(N=n) ∝ p^-n must be summable), got {p!r}")
        if max_degree is not None and (isinstance(max_degree, bool) or not isinstance(max_degree, int)
                                       or max_degree < 0):
            raise MacformerError(f"max_degree must be a non-negative integer or None, got {max_degree!r}")
        if linear_features and not constant_feature:
            raise MacformerError("linear_features=True needs constant_feature=True (degrees 0 and 1 both exact)")
        self.exact_degrees = int(constant_feature) + int(linear_features)  # degrees below this are exact
        num_exact = int(constant_feature) + dim * int(linear_features)
        if num_features <= num_exact:
            raise MacformerError(
                f"num_features={num_features} leaves no random feature after {num_exact} exact ones "
                f"(constant_feature={constant_feature}, linear_features={linear_features}, dim={dim}); "
                f"use num_features > {num_exact}"
            )
        if self.kernel.max_degree is not None:
            max_degree = self.kernel.max_degree if max_degree is None else min(max_degree, self.kernel.max_degree)
        if max_degree is not None and max_degree < self.exact_degrees:
            raise MacformerError(f"max_degree={max_degree} leaves no degree to sample above the exact terms")
        self.p = float(p)
        self.constant_feature = constant_feature
        self.linear_features = linear_features
        self.max_degree = max_degree
        # Degrees sorted ascending so that features of one degree are contiguous; `weights` stacks
        # their Rademacher vectors in the same order (feature i owns degrees[i] consecutive rows).
        self.register_buffer("degrees", torch.zeros(num_features, dtype=torch.int64))
        self.register_buffer("scales", torch.zeros(num_features))
        self.register_buffer("weights", torch.zeros(0, dim))
        self._degree_groups: list[tuple[int, int]] = []
        self._draw(self._generator())

    def _draw(self, generator: torch.Generator) -> None:
        min_degree = self.exact_degrees
        num_random = self.num_features - int(self.constant_feature) - self.dim * int(self.linear_features)
        ratio, normaliser = degree_distribution(self.p, min_degree, self.max_degree)
        # Inverse CDF of the (truncated) geometric law: P(N - min_degree >= k) ∝ r^k - r^support.
        uniforms = torch.rand(num_random, generator=generator, dtype=torch.float64)
        offsets = torch.floor(torch.log1p(-uniforms * normaliser) / math.log(ratio))
        if self.max_degree is not None:
            offsets = offsets.clamp(max=self.max_degree - min_degree)
        degrees = (offsets.long() + min_degree).sort().values
        log_prob = (degrees - min_degree).double() * math.log(ratio) + math.log((1 - ratio) / normaliser)
        coefficients = self.kernel.coefficients(int(degrees.max()))
        scales = torch.sqrt(coefficients[degrees] * torch.exp(-log_prob) / num_random)
        weights = torch.randint(0, 2, (int(degrees.sum()), self.dim), generator=generator).float() * 2 - 1
        if self.linear_features:  # degree-1 features with identity projections: sqrt(a_1) x_i
            a_1 = self.kernel.coefficients(1)[1]
            degrees = torch.cat([torch.ones(self.dim, dtype=torch.int64), degrees])
            scales = torch.cat([a_1.sqrt().expand(self.dim), scales])
            weights = torch.cat([torch.eye(self.dim), weights])
        if self.constant_feature:
            degrees = torch.cat([torch.zeros(1, dtype=torch.int64), degrees])
            scales = torch.cat([coefficients[:1].sqrt(), scales])
        self._set_buffer("degrees", degrees)
        self._set_buffer("scales", scales.float())
        self._set_buffer("weights", weights)
        self._buffers_changed()

    def _buffers_changed(self) -> None:
        self._fast_path_cache = None
        values, counts = torch.unique_consecutive(self.degrees.cpu(), return_counts=True)
        self._degree_groups = list(zip(values.tolist(), counts.tolist(), strict=True))
        self._random_groups = [(d, c) for d, c in self._degree_groups if d >= self.exact_degrees]

    def forward(self, x: torch.Tensor, is_query: bool = False) -> torch.Tensor:
        rows, factor_index, constant, linear = self._fast_path()
        if torch.compiler.is_compiling():  # dynamo cannot trace the Function's out= writes: plain ops, any size
            features = _gathered_features(x.reshape(-1, x.shape[-1]), rows.to(x.dtype), factor_index,
                                          self._random_groups, constant, linear)
            return features.reshape(*x.shape[:-1], -1)
        function = _MaclaurinFeatures
        if _use_triton(x):
            from macformer.features import triton_maclaurin

            function = triton_maclaurin.TritonMaclaurinFeatures
        return function.apply(x, rows.to(x.dtype), factor_index, self._random_groups, constant, linear)

    def _fast_path(self) -> tuple[torch.Tensor, torch.Tensor, float | None, float | None]:
        """(`_build_random_rows()`, `_factor_index()`, sqrt(a_0) or None, sqrt(a_1) or None), built
        once per draw, load, move or in-place edit of the buffers (decoding calls the map once per
        token); the scales are kept on the host so that a call does not wait for the device."""
        if torch.compiler.is_compiling() and self._fast_path_cache is not None:  # _version is not traceable
            return self._fast_path_cache[1]
        version = (self.weights._version, self.scales._version)
        if self._fast_path_cache is None or self._fast_path_cache[0] != version:
            exact_scales = self.scales[: int(self.constant_feature) + self.dim * int(self.linear_features)].tolist()
            self._fast_path_cache = (version, (self._build_random_rows(), self._factor_index(),
                                               exact_scales[0] if self.constant_feature else None,
                                               exact_scales[-1] if self.linear_features else None))
        return self._fast_path_cache[1]

    def _factor_index(self) -> torch.Tensor:
        """[max degree, random features]: the column of `_build_random_rows()` holding factor j of
        each random feature, or one past the last row (a column of ones) where the feature has fewer
        factors; the fast path's few-rows form gathers all factors with it at once."""
        ones = _padded(sum(max(degree, 1) * count for degree, count in self._random_groups))  # degree 0: one row
        most = max(max(degree for degree, _ in self._random_groups), 1)
        columns, start = [], 0
        for degree, count in self._random_groups:
            block = torch.full((most, count), ones, dtype=torch.int64)
            for j in range(degree):
                block[j] = torch.arange(start + j * count, start + (j + 1) * count)
            columns.append(block)
            start += max(degree, 1) * count
        return torch.cat(columns, dim=1).to(self.weights.device)

    def _build_random_rows(self) -> torch.Tensor:
        """The random features' Rademacher rows for the fast path: each degree group's rows reordered
        degree-major (factor j of every feature of the group is one contiguous block of columns, so
        products and their gradients run over contiguous memory) and each feature's scale folded into
        its first factor's row (no scaling pass). Degree-0 features (no rows) get one row of zeros
        each, which the fast path never multiplies: it writes their scale (kept in the row's first
        entry) as the feature. The identity block of exact degree-1 features is left out; zero rows pad
        the matrix to a multiple of ROW_MULTIPLE (their projections are never read)."""
        start = self.dim * int(self.linear_features)
        column = int(self.constant_feature) + start
        blocks = []
        for degree, count in self._random_groups:
            scales = self.scales[column:column + count]
            if degree == 0:
                blocks.append(torch.nn.functional.pad(scales[:, None], (0, self.dim - 1)))
            else:
                rows = self.weights[start:start + degree * count].unflatten(0, (count, degree))
                rows = torch.cat([rows[:, :1] * scales[:, None, None], rows[:, 1:]], dim=1)
                blocks.append(rows.transpose(0, 1).reshape(degree * count, self.dim))
            start, column = start + degree * count, column + count
        rows = torch.cat(blocks)
        return torch.nn.functional.pad(rows, (0, 0, 0, _padded(rows.shape[0]) - rows.shape[0]))

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same features the plain way (one matmul with every row, identity block included, one
        product per degree group, concatenation, scaling): the reference `forward` is tested against."""
        projections = x @ self.weights.T.to(x.dtype)
        lead = x.shape[:-1]
        pieces, start = [], 0
        for degree, count in self._degree_groups:
            if degree == 0:
                pieces.append(x.new_ones(*lead, count))
                continue
            stop = start + degree * count
            pieces.append(projections[..., start:stop].reshape(*lead, count, degree).prod(-1))
            start = stop
        return torch.cat(pieces, dim=-1) * self.scales.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, kernel={self.kernel.name}, p={self.p}, "
            f"constant_feature={self.constant_feature}, linear_features={self.linear_features}, "
            f"max_degree={self.max_degree}"
        )


def _gathered_features(flat_x: torch.Tensor, rows: torch.Tensor, factor_index: torch.Tensor,
                       groups: list[tuple[int, int]], constant: float | None, linear: float | None) -> torch.Tensor:
    """Every feature of flat_x [n, d] in a handful of ops (no loop over degree groups): one matmul with
    `_build_random_rows()`, a column of ones appended, and all factors gathered through
    `_factor_index()` and multiplied at once. The form for few rows (decoding) and for torch.compile."""
    projections = flat_x @ rows.T
    padded = torch.cat([projections, projections.new_ones(projections.shape[0], 1)], dim=-1)
    random = padded[:, factor_index].prod(dim=-2)  # [n, max degree, random features] -> [n, random features]
    pieces = []
    if constant is not None:
        pieces.append(flat_x.new_full((flat_x.shape[0], 1), constant))
    if linear is not None:
        pieces.append(flat_x * linear)
    if groups[0][0] == 0:  # sampled degree 0 comes first; the scales sit in its rows' first entry
        pieces.append(rows[:groups[0][1], 0].expand(flat_x.shape[0], -1))
        random = random[:, groups[0][1]:]
    return torch.cat([*pieces, random], dim=-1)


def _padded(num_rows: int) -> int:
    return -(-num_rows // ROW_MULTIPLE) * ROW_MULTIPLE


def _write_products(factors: torch.Tensor, out: torch.Tensor) -> None:
    """out = prod_j factors[j] for factors [degree, count, rows], degree >= 1."""
    if factors.shape[0] == 1:
        out.copy_(factors[0])
        return
    torch.mul(factors[0], factors[1], out=out)
    for j in range(2, factors.shape[0]):
        out.mul_(factors[j])


def _write_product_gradient(factors: torch.Tensor, incoming: torch.Tensor, target: torch.Tensor) -> None:
    """target[j] = incoming * prod_{i != j} factors[i] (factors and target [degree, count, rows]): the
    products after j from the right straight into the target, then those before j from the left (no
    division: exact where a factor is 0; 3 degree - 4 passes, two for pairs)."""
    degree = factors.shape[0]
    if degree == 1:
        target[0].copy_(incoming)
        return
    torch.mul(incoming, factors[degree - 1], out=target[degree - 2])
    for j in range(degree - 3, -1, -1):
        torch.mul(target[j + 1], factors[j + 1], out=target[j])
    before = factors[0]
    for j in range(1, degree - 1):
        target[j].mul_(before)
        before = before * factors[j]
    torch.mul(incoming, before, out=target[degree - 1])


def _write_random_features(projections: torch.Tensor, rows: torch.Tensor, groups: list[tuple[int, int]],
                           out: torch.Tensor) -> None:
    """out [random features, n] from projections [rows, n] onto `_build_random_rows()` (both
    feature-major: every factor of a degree group is a contiguous [count, n] block): each degree
    group's products into its rows of out."""
    start, first = 0, 0
    for degree, count in groups:
        if degree == 0:  # the scales sit in the first entry of these rows
            out[first:first + count] = rows[start:start + count, :1]
            start += count
        else:
            _write_products(projections[start:start + degree * count].unflatten(0, (degree, count)),
                            out[first:first + count])
            start += degree * count
        first += count


def _random_features_gradient(projections: torch.Tensor, groups: list[tuple[int, int]],
                              grad_out: torch.Tensor) -> torch.Tensor:
    """The gradient with respect to the projections [rows, n] given that of the random features
    [random features, n] (feature-major, as above): every row written once (no zero fill)."""
    grad_projections = torch.empty_like(projections)
    start, first = 0, 0
    for degree, count in groups:
        if degree == 0:  # constant features: no gradient; their rows get none either
            grad_projections[start:start + count] = 0
            start += count
        else:
            stop = start + degree * count
            _write_product_gradient(projections[start:stop].unflatten(0, (degree, count)),
                                    grad_out[first:first + count],
                                    grad_projections[start:stop].unflatten(0, (degree, count)))
            start = stop
        first += count
    grad_projections[start:] = 0  # the padding rows (zero rows: any finite value would do, not NaN)
    return grad_projections


class _MaclaurinFeatures(torch.autograd.Function):
    """phi(x) = [sqrt(a_0), sqrt(a_1) x, prod_j (w'_ji . x)] written into one preallocated output,
    with w' the degree-major, scale-folded rows of `RandomMaclaurinFeatures._build_random_rows`: one
    matmul, no concatenation and no scaling pass (up to FEW_ROWS input rows, as in decoding, the
    forward is `_gathered_features` instead: a handful of ops). Both directions run over blocks of ROWS_PER_BLOCK
    input rows, so that a block's projections stay in cache between the passes over them, and work
    feature-major: a block's projections are W' x^T, [rows, block], so every factor of a degree group
    is one contiguous [count, block] slab, and the products are transposed into the output once per
    block (8 heads x 8192 rows, head_dim 64: forward+backward 88 -> 72 ms against the token-major
    layout). The backward writes every group's gradient into one buffer of the size of the
    projections (every row once, no zero fill) and recomputes the projections from x instead of
    storing them (x is d wide, the projections ~2.5 D)."""

    @staticmethod
    def forward(ctx, x, rows, factor_index, groups, constant, linear):
        exact = int(constant is not None) + (x.shape[-1] if linear is not None else 0)
        flat_x = x.reshape(-1, x.shape[-1])
        if flat_x.shape[0] <= FEW_ROWS:  # decoding: a handful of ops instead of a loop over degree groups
            out = _gathered_features(flat_x, rows, factor_index, groups, constant, linear).reshape(*x.shape[:-1], -1)
        else:
            out = x.new_empty(*x.shape[:-1], exact + sum(count for _, count in groups))
            if constant is not None:
                out[..., 0] = constant
            if linear is not None:
                torch.mul(x, linear, out=out[..., int(constant is not None):exact])
            random_out = out.view(-1, out.shape[-1])[:, exact:]
            features = random_out.new_empty(random_out.shape[1], min(ROWS_PER_BLOCK, flat_x.shape[0]))
            for block in range(0, flat_x.shape[0], ROWS_PER_BLOCK):
                x_block = flat_x[block:block + ROWS_PER_BLOCK]
                block_features = features[:, :x_block.shape[0]]
                _write_random_features(rows @ x_block.T, rows, groups, block_features)
                random_out[block:block + ROWS_PER_BLOCK] = block_features.T
        ctx.save_for_backward(x, rows)
        ctx.groups, ctx.exact, ctx.constant, ctx.linear = groups, exact, constant, linear
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, rows = ctx.saved_tensors
        flat_x = x.reshape(-1, x.shape[-1])
        random_grad = grad_out.reshape(-1, grad_out.shape[-1])[:, ctx.exact:]
        grad_x = torch.empty_like(flat_x)
        for block in range(0, flat_x.shape[0], ROWS_PER_BLOCK):
            projections = rows @ flat_x[block:block + ROWS_PER_BLOCK].T
            incoming = random_grad[block:block + ROWS_PER_BLOCK].T.contiguous()
            torch.mm(_random_features_gradient(projections, ctx.groups, incoming).T, rows,
                     out=grad_x[block:block + ROWS_PER_BLOCK])
        grad_x = grad_x.view(x.shape)
        if ctx.linear is not None:
            first = int(ctx.constant is not None)
            grad_x += grad_out[..., first:ctx.exact] * ctx.linear
        return grad_x, None, None, None, None, None
