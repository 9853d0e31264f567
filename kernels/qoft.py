"""QOFT's ops with a Triton kernel each: rotation blocks from packed parameters, and rotating activations.

Each entry point runs the Triton kernel (:mod:`.qoft_triton`, imported only then) when :func:`.backend.use_triton`
says so and the kernel covers the case (float32/float16/bfloat16; blocks up to :data:`BUILD_MAX_BLOCK` wide for the
builder, :data:`MAX_BLOCK` for the rotation), and the reference of :mod:`peft_quant.qoft.rotation` otherwise, so CPU
results are those of the reference bit for bit.
"""

from __future__ import annotations

import torch

from ..qoft import rotation as reference
from .backend import use_triton

MAX_BLOCK = 64  # widest block the rotation kernels handle (their tiles pad it to a power of two ≥ 16)
BUILD_MAX_BLOCK = 32  # widest block the builder handles: its backward holds five b × b float32 matrices, which at
# b = 64 spill tens of KiB of registers per thread (tests/compile_kernels.py); torch's batched matmuls do better there
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _covered(block_size: int, widest: int, *tensors: torch.Tensor) -> bool:
    return block_size <= widest and all(t.dtype in KERNEL_DTYPES for t in tensors)


def cayley_neumann(packed: torch.Tensor, block_size: int, num_terms: int) -> torch.Tensor:
    """Rotation blocks ``(n, b, b)`` from packed skew parameters ``(n, b(b-1)/2)`` (see the reference
    :func:`peft_quant.qoft.rotation.cayley_neumann`); differentiable in ``packed``."""
    if _covered(block_size, BUILD_MAX_BLOCK, packed) and use_triton(packed):
        from . import qoft_triton

        return qoft_triton.CayleyNeumann.apply(packed, block_size, num_terms)
    return reference.cayley_neumann(packed, block_size, num_terms)


def rotate(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x`` (..., width) with each width block ``x_j`` replaced by ``x_j R_j``, computed in ``blocks``' precision
    (at least float32 in the kernel) and returned in ``x``'s dtype; differentiable in ``x`` and ``blocks``.

    ``blocks`` is ``(1, b, b)`` (one block shared across the width) or ``(width / b, b, b)``.
    """
    n, b = blocks.shape[0], blocks.shape[-1]
    if x.shape[-1] % b or n not in (1, x.shape[-1] // b):
        raise ValueError(f"{n} rotation blocks of width {b} do not fit an input of width {x.shape[-1]}.")
    if _covered(b, MAX_BLOCK, x, blocks) and use_triton(x, blocks):
        from . import qoft_triton

        return qoft_triton.Rotate.apply(x, blocks)
    return reference.rotate(x.to(blocks.dtype), blocks).to(x.dtype)
