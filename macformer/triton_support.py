"""Where the Triton kernels (macformer/attention/triton_chunked.py, macformer/features/triton_maclaurin.py)
run: fp32 CUDA tensors where Triton is installed. Everything else takes the PyTorch path, which is also
the kernels' tested reference."""

from __future__ import annotations

import importlib.util

import torch


def triton_usable(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and tensor.dtype == torch.float32 and importlib.util.find_spec("triton") is not None
