"""Triton kernels for the random Maclaurin feature map's random part (CUDA).

The same features as `maclaurin._MaclaurinFeatures` computes with PyTorch, from the same inputs: the
scale-folded rows W' [R, d] of `RandomMaclaurinFeatures._build_random_rows` and the factor index
[max degree, F] of `_factor_index` (the row holding factor j of random feature f, or R where f has
fewer factors). One program per (block of input rows, block of features) keeps its projections on
chip and never writes them to memory:

    forward:   phi_f(x) = prod_{j < degree_f} (w'_{index[j, f]} . x)
    backward:  dx = sum_f sum_j g_f prod_{i != j} (w'_{index[i, f]} . x) w'_{index[j, f]}
               (one program per block of rows, looping over the feature blocks, so no atomics; the
               products without factor j are a running prefix times a recomputed suffix: no
               division, exact where a projection is 0).

Features are sorted by degree, so a block's loop runs to the largest degree in that block only
(`block_degrees`). Products run in fp32 with IEEE precision (no TF32: signed features cancel). With
TRITON_INTERPRET=1 Triton's interpreter runs these kernels on the CPU, which is how CI tests them
against the PyTorch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from macformer.attention.triton_chunked import block_size

BLOCK_ROWS = 32
BLOCK_FEATURES = 32


@triton.jit
def _projection(x, rows_ptr, index_ptr, j, features, feature_ids, num_rows, dim, dim_cols):
    """(x . w'_{index[j, f]} for the block's features, or 1 where f has fewer than j + 1 factors;
    the rows w', zero where unused) for x [BLOCK_ROWS, BLOCK_DIM]."""
    index = tl.load(index_ptr + j * features + feature_ids, mask=feature_ids < features, other=num_rows)
    used = index < num_rows
    w = tl.load(rows_ptr + index[:, None] * dim + dim_cols[None, :], mask=used[:, None] & (dim_cols < dim)[None, :],
                other=0.0)
    return tl.where(used[None, :], tl.dot(x, tl.trans(w), input_precision="ieee"), 1.0), w


@triton.jit
def _load_inputs(x_ptr, row_ids, n, dim_cols, dim):
    return tl.load(x_ptr + row_ids[:, None] * dim + dim_cols[None, :],
                   mask=(row_ids < n)[:, None] & (dim_cols < dim)[None, :], other=0.0)


@triton.jit
def _forward_kernel(x_ptr, rows_ptr, index_ptr, block_degrees_ptr, out_ptr, n, dim, num_rows, features,
                    out_stride, out_offset, BLOCK_ROWS: tl.constexpr, BLOCK_FEATURES: tl.constexpr,
                    BLOCK_DIM: tl.constexpr):
    row_ids = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    feature_ids = tl.program_id(1) * BLOCK_FEATURES + tl.arange(0, BLOCK_FEATURES)
    dim_cols = tl.arange(0, BLOCK_DIM)
    x = _load_inputs(x_ptr, row_ids, n, dim_cols, dim)
    products = tl.full([BLOCK_ROWS, BLOCK_FEATURES], 1.0, dtype=tl.float32)
    for j in range(0, tl.load(block_degrees_ptr + tl.program_id(1))):
        projection, _ = _projection(x, rows_ptr, index_ptr, j, features, feature_ids, num_rows, dim, dim_cols)
        products *= projection
    tl.store(out_ptr + row_ids[:, None] * out_stride + out_offset + feature_ids[None, :], products,
             mask=(row_ids < n)[:, None] & (feature_ids < features)[None, :])


@triton.jit
def _backward_kernel(x_ptr, rows_ptr, index_ptr, block_degrees_ptr, grad_out_ptr, grad_x_ptr, n, dim, num_rows,
                     features, grad_stride, grad_offset, BLOCK_ROWS: tl.constexpr, BLOCK_FEATURES: tl.constexpr,
                     BLOCK_DIM: tl.constexpr):
    row_ids = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    dim_cols = tl.arange(0, BLOCK_DIM)
    x = _load_inputs(x_ptr, row_ids, n, dim_cols, dim)
    grad_x = tl.zeros([BLOCK_ROWS, BLOCK_DIM], dtype=tl.float32)
    for block in range(0, tl.cdiv(features, BLOCK_FEATURES)):
        feature_ids = block * BLOCK_FEATURES + tl.arange(0, BLOCK_FEATURES)
        degree = tl.load(block_degrees_ptr + block)
        prefix = tl.load(grad_out_ptr + row_ids[:, None] * grad_stride + grad_offset + feature_ids[None, :],
                         mask=(row_ids < n)[:, None] & (feature_ids < features)[None, :], other=0.0)
        for j in range(0, degree):
            projection, w = _projection(x, rows_ptr, index_ptr, j, features, feature_ids, num_rows, dim, dim_cols)
            suffix = tl.full([BLOCK_ROWS, BLOCK_FEATURES], 1.0, dtype=tl.float32)
            for i in range(j + 1, degree):
                later, _ = _projection(x, rows_ptr, index_ptr, i, features, feature_ids, num_rows, dim, dim_cols)
                suffix *= later
            grad_x += tl.dot(prefix * suffix, w, input_precision="ieee")
            prefix *= projection
    tl.store(grad_x_ptr + row_ids[:, None] * dim + dim_cols[None, :], grad_x,
             mask=(row_ids < n)[:, None] & (dim_cols < dim)[None, :])


def block_degrees(factor_index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The largest degree among each block of BLOCK_FEATURES features: how far a block's loop runs."""
    degrees = (factor_index < num_rows).sum(0, dtype=torch.int32)
    padding = -degrees.shape[0] % BLOCK_FEATURES
    return torch.nn.functional.pad(degrees, (0, padding)).view(-1, BLOCK_FEATURES).amax(1).contiguous()


def _grid_and_blocks(rows_count: int, features: int, dim: int) -> tuple[tuple[int, int], dict[str, int]]:
    grid = (triton.cdiv(rows_count, BLOCK_ROWS), triton.cdiv(features, BLOCK_FEATURES))
    return grid, {"BLOCK_ROWS": BLOCK_ROWS, "BLOCK_FEATURES": BLOCK_FEATURES, "BLOCK_DIM": block_size(dim)}


class TritonMaclaurinFeatures(torch.autograd.Function):
    """`maclaurin._MaclaurinFeatures` with the random part in the kernels above (same arguments and
    result; fp32 inputs)."""

    @staticmethod
    def forward(ctx, x, rows, factor_index, groups, constant, linear):
        exact = int(constant is not None) + (x.shape[-1] if linear is not None else 0)
        features = factor_index.shape[1]
        out = x.new_empty(*x.shape[:-1], exact + features)
        if constant is not None:
            out[..., 0] = constant
        if linear is not None:
            torch.mul(x, linear, out=out[..., int(constant is not None):exact])
        flat_x = x.reshape(-1, x.shape[-1]).contiguous()
        rows, factor_index = rows.contiguous(), factor_index.contiguous()
        degrees = block_degrees(factor_index, rows.shape[0])
        grid, blocks = _grid_and_blocks(flat_x.shape[0], features, flat_x.shape[1])
        _forward_kernel[grid](flat_x, rows, factor_index, degrees, out, flat_x.shape[0], flat_x.shape[1],
                              rows.shape[0], features, out.shape[-1], exact, **blocks)
        if groups[0][0] == 0:  # sampled degree 0 comes first; the scales sit in its rows' first entry
            out[..., exact:exact + groups[0][1]] = rows[:groups[0][1], 0]
        ctx.save_for_backward(flat_x, rows, factor_index, degrees)
        ctx.exact, ctx.constant, ctx.linear, ctx.shape = exact, constant, linear, x.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        flat_x, rows, factor_index, degrees = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = torch.empty_like(flat_x)
        grid, blocks = _grid_and_blocks(flat_x.shape[0], factor_index.shape[1], flat_x.shape[1])
        _backward_kernel[grid[:1]](flat_x, rows, factor_index, degrees, grad_out, grad_x, flat_x.shape[0],
                                   flat_x.shape[1], rows.shape[0], factor_index.shape[1], grad_out.shape[-1],
                                   ctx.exact, **blocks)
        grad_x = grad_x.view(ctx.shape)
        if ctx.linear is not None:
            first = int(ctx.constant is not None)
            grad_x += grad_out[..., first:ctx.exact] * ctx.linear
        return grad_x, None, None, None, None, None
