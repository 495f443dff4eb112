"""Weight-matrix samplers for Gaussian-based random features (the Spectraformer weight family).

Each sampler returns a [num_rows, dim] matrix whose rows are (marginally, or in their moments)
standard Gaussian vectors: the estimators built on them stay unbiased while the structure lowers
their variance.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from macformer.errors import MacformerError

__all__ = ["SAMPLERS", "fastfood_matrix", "get_sampler", "hadamard", "padded_size"]

Sampler = Callable[[int, int, torch.Generator], torch.Tensor]


def gaussian(num_rows: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """I.i.d. N(0, 1) entries."""
    return torch.randn(num_rows, dim, generator=generator)


def _chi_norms(num_rows: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    # Norms of independent Gaussian vectors: chi(dim) distributed, as the rows of a Gaussian matrix.
    return torch.randn(num_rows, dim, generator=generator).norm(dim=-1, keepdim=True)


def orthogonal(num_rows: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """ORF: stacked blocks of orthonormal rows (Haar-distributed), each row rescaled by a chi(dim) norm.

    Every row is marginally N(0, I); rows within a block are exactly orthogonal.
    """
    blocks = []
    for _ in range(-(-num_rows // dim)):
        q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
        blocks.append((q * torch.sign(torch.diagonal(r))).T)  # sign fix makes Q Haar-distributed
    directions = torch.cat(blocks)[:num_rows]
    return directions * _chi_norms(num_rows, dim, generator)


def hadamard(size: int) -> torch.Tensor:
    """The normalised Sylvester-Hadamard matrix H / sqrt(size): orthonormal rows (size a power of 2)."""
    if size < 1 or size & (size - 1):
        raise MacformerError(f"Hadamard size must be a power of two, got {size}")
    matrix = torch.ones(1, 1)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)])
    return matrix / size**0.5


def padded_size(dim: int) -> int:
    """The Hadamard size structured samplers work in: dim rounded up to a power of two."""
    return 1 << (dim - 1).bit_length()


def structured_orthogonal(num_rows: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """SORF: blocks sqrt(n) * H D1 H D2 H D3 with H the *normalised* Hadamard matrix and D_i random
    sign diagonals (n = dim rounded up to a power of two; the first `dim` columns are kept).

    Each block has orthogonal rows of norm sqrt(n); keeping `dim` of n columns leaves squared row
    norms of dim on average, as for a Gaussian row. Without the 1/sqrt(n) in each H the norms
    would be n^1.5 times too large.
    """
    size = padded_size(dim)
    h = hadamard(size)
    blocks = []
    for _ in range(-(-num_rows // size)):
        signs = torch.randint(0, 2, (3, size), generator=generator) * 2.0 - 1.0
        block = torch.eye(size)
        for diagonal in signs:
            block = block @ h * diagonal  # (block @ H) D_i
        blocks.append(block * size**0.5)
    return torch.cat(blocks)[:num_rows, :dim]


def fastfood_matrix(
    scales: torch.Tensor, gaussians: torch.Tensor, signs: torch.Tensor, permutations: torch.Tensor, dim: int
) -> torch.Tensor:
    """FastFood blocks sqrt(n) diag(S) H diag(G) P H diag(B) (Le et al. 2013) with H the normalised
    Hadamard matrix; all inputs are [blocks, n]. Returns the stacked blocks' first `dim` columns.

    Row i of a block has norm |S_i| |G|: with S_i = chi(n) / |G| rows have the norms of Gaussian
    rows, as the FastFood paper prescribes. Differentiable in S, G and B (FastFoodL learns them).
    """
    size = scales.shape[-1]
    h = hadamard(size).to(scales)
    mixed = h * signs[:, None, :]  # H diag(B), one per block: [blocks, n, n]
    mixed = torch.take_along_dim(mixed, permutations[:, :, None], dim=1)  # P H diag(B): rows permuted
    blocks = size**0.5 * scales[:, :, None] * (h @ (gaussians[:, :, None] * mixed))
    return blocks.reshape(-1, size)[:, :dim]


def fastfood_parameters(num_rows: int, dim: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random (S, G, B, P) for `fastfood_matrix`, enough blocks of size n = padded_size(dim) for num_rows."""
    size = padded_size(dim)
    blocks = -(-num_rows // size)
    signs = torch.randint(0, 2, (blocks, size), generator=generator) * 2.0 - 1.0
    gaussians = torch.randn(blocks, size, generator=generator)
    permutations = torch.stack([torch.randperm(size, generator=generator) for _ in range(blocks)])
    # chi(n) norms: the n-dimensional row is Gaussian-like, so its first dim coordinates are too.
    scales = _chi_norms(blocks * size, size, generator).view(blocks, size) / gaussians.norm(dim=-1, keepdim=True)
    return scales, gaussians, signs, permutations


def fastfood(num_rows: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """FastFood: random S, G, B and permutation P (see `fastfood_matrix`); O(n log n) to apply with a
    fast Hadamard transform, though here the [num_rows, dim] matrix is formed once per draw."""
    return fastfood_matrix(*fastfood_parameters(num_rows, dim, generator), dim)[:num_rows]


def quasi_monte_carlo(num_rows: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """QMC: a scrambled Sobol sequence mapped through the inverse normal CDF."""
    seed = int(torch.randint(0, 2**31 - 1, (), generator=generator))
    uniforms = torch.quasirandom.SobolEngine(dim, scramble=True, seed=seed).draw(num_rows, dtype=torch.float64)
    tiny = torch.finfo(torch.float32).eps
    return torch.special.ndtri(uniforms.clamp(tiny, 1 - tiny)).float()


def moment_matched(num_rows: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """MM: Gaussian rows transformed to exactly zero sample mean and identity sample covariance."""
    if num_rows <= dim:
        raise MacformerError(
            f"moment-matched weights need more rows than dim to have identity covariance "
            f"(got {num_rows} rows for dim {dim}); raise num_features or use the 'orthogonal' sampler"
        )
    samples = torch.randn(num_rows, dim, generator=generator, dtype=torch.float64)
    centred = samples - samples.mean(0)
    covariance = centred.T @ centred / num_rows
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    inverse_sqrt = eigenvectors @ torch.diag(eigenvalues.rsqrt()) @ eigenvectors.T
    return (centred @ inverse_sqrt).float()


SAMPLERS: dict[str, Sampler] = {
    "gaussian": gaussian,
    "orthogonal": orthogonal,
    "sorf": structured_orthogonal,
    "qmc": quasi_monte_carlo,
    "moment_matched": moment_matched,
    "fastfood": fastfood,
}


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise MacformerError(f"unknown weight sampler {name!r}; valid choices: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
