"""Compile the Triton kernels for an NVIDIA architecture without a GPU (Triton's compiler and its
bundled ptxas run on the CPU) at the launch configuration of given sizes, and print each kernel's
shared memory per program as JSON. The interpreter the other tests use does not compile anything, so
only this sees whether a kernel fits on a real GPU. Run by tests/test_triton_kernels.py in a process
without TRITON_INTERPRET:

    python tests/triton_compile_check.py ARCH D V CHUNK HEAD_DIM
"""

from __future__ import annotations

import inspect
import json
import os
import sys

import triton
from triton.backends.compiler import GPUTarget

from macformer.attention import triton_chunked
from macformer.features import triton_maclaurin

# Integer buffers; every other pointer is fp32 and every other argument an int32 size.
POINTER_TYPES = {"index_ptr": "*i64", "block_degrees_ptr": "*i32"}


def compile_kernel(kernel, constexprs: dict, arch: int, num_stages: int):
    signature = {name: "constexpr" if name in constexprs
                 else POINTER_TYPES.get(name, "*fp32" if name.endswith("_ptr") else "i32")
                 for name in inspect.signature(kernel.fn).parameters}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_stages": num_stages})


def main(arch: int, D: int, V: int, chunk: int, head_dim: int) -> dict[str, int]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter compiles nothing")
    stages = triton_chunked.NUM_STAGES
    kernels = {  # dQ runs the forward kernel with D and V swapped
        "forward": (triton_chunked._forward_kernel, triton_chunked.kernel_blocks(D, V, chunk), "HAS_INITIAL"),
        "grad_query": (triton_chunked._forward_kernel, triton_chunked.kernel_blocks(V, D, chunk), "HAS_INITIAL"),
        "backward": (triton_chunked._backward_kernel, triton_chunked.kernel_blocks(D, V, chunk), "HAS_GRAD_FINAL"),
    }
    shared = {name: compile_kernel(kernel, {flag: True, **blocks}, arch, stages).metadata.shared
              for name, (kernel, blocks, flag) in kernels.items()}
    _, feature_blocks = triton_maclaurin._grid_and_blocks(1, 1, head_dim)
    for name, kernel in (("features", triton_maclaurin._forward_kernel),
                         ("features_backward", triton_maclaurin._backward_kernel)):
        shared[name] = compile_kernel(kernel, feature_blocks, arch, 3).metadata.shared
    return shared


if __name__ == "__main__":
    print(json.dumps(main(*map(int, sys.argv[1:6]))))
