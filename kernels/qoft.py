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


def _rotate_values(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """The forward of :func:`rotate` without autograd (Triton kernel or reference)."""
    if _covered(blocks.shape[-1], MAX_BLOCK, x, blocks) and use_triton(x, blocks):
        from . import qoft_triton

        return qoft_triton.rotate_forward(x, blocks)
    return _blockwise(x, blocks)


def _blockwise(x: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
    """Each width block ``x_j`` of ``x`` (..., n·b) times ``mats[j]`` (``(n, b, b)``, or ``(1, b, b)`` shared), in
    ``mats``' precision, returned in ``x``'s dtype; without autograd, the batched product written straight into the
    output's layout (no transposed copy)."""
    b = mats.shape[-1]
    rows = x.to(mats.dtype).reshape(-1, b)  # (tokens·n, b)
    if mats.shape[0] == 1:
        return (rows @ mats[0]).reshape(x.shape).to(x.dtype)
    n = mats.shape[0]
    out = torch.empty_like(rows)
    torch.bmm(rows.view(-1, n, b).transpose(0, 1), mats, out=out.view(-1, n, b).transpose(0, 1))  # (n, tokens, b)
    return out.reshape(x.shape).to(x.dtype)


def _rotate_grads(x: torch.Tensor, blocks: torch.Tensor, grad_out: torch.Tensor, need_x: bool, need_r: bool
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`rotate` for ``x`` (in ``x``'s dtype) and ``blocks`` (in theirs), each only when asked."""
    b = blocks.shape[-1]
    if _covered(b, MAX_BLOCK, x, blocks) and use_triton(x, blocks, grad_out):
        from . import qoft_triton

        return qoft_triton.rotate_backward(x, blocks, grad_out, need_x, need_r)
    n = x.shape[-1] // b
    g = grad_out.to(blocks.dtype).reshape(-1, n, b).transpose(0, 1)  # (n, tokens, b)
    grad_x = grad_r = None
    if need_x:
        grad_x = _blockwise(grad_out, blocks.transpose(-1, -2)).reshape(x.shape)
    if need_r:
        xb = x.to(blocks.dtype).reshape(-1, n, b).transpose(0, 1)  # (n, tokens, b)
        grad_r = torch.bmm(xb.transpose(-1, -2), g)  # (n, b, b)
        grad_r = grad_r.sum(0, keepdim=True) if blocks.shape[0] == 1 else grad_r
    return grad_x, grad_r


class _Builder:
    """Builds one layer's rotation blocks from packed parameters and takes the gradient back to them, without autograd:
    the Triton builder and its backward where they cover the case, else the reference, whose skew-symmetric blocks
    and their powers are formed once for both."""

    def __init__(self, packed: torch.Tensor, block_size: int, num_terms: int) -> None:
        self.packed, self.block_size, self.num_terms = packed, block_size, num_terms
        self.triton = _covered(block_size, BUILD_MAX_BLOCK, packed) and use_triton(packed)
        self.q = None if self.triton else reference.skew_symmetric(packed.detach(), block_size)
        self.powers = None

    def blocks(self) -> torch.Tensor:
        if self.triton:
            from . import qoft_triton

            return qoft_triton.build(self.packed, self.block_size, self.num_terms)
        rotation, self.powers = reference.neumann(self.q, self.num_terms)
        return rotation

    def backward(self, grad_blocks: torch.Tensor) -> torch.Tensor:
        """The packed parameters' gradient from ``dL/dR`` (after :meth:`blocks`, whose powers of ``Q`` it reuses)."""
        if self.triton:
            from . import qoft_triton

            return qoft_triton.build_backward(self.packed, grad_blocks, self.num_terms)
        return reference.cayley_neumann_backward(self.q, grad_blocks.to(self.q.dtype), self.num_terms, self.powers)


def _with_dropout(blocks: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``blocks`` where ``keep`` (``(count, 1, 1)`` bools) is True, the identity elsewhere."""
    if keep is None:
        return blocks
    eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype)
    return torch.where(keep, blocks.expand(keep.shape[0], -1, -1), eye)


class _RotateInput(torch.autograd.Function):
    """``x`` rotated by the blocks built from ``packed``, saving only ``x`` and ``packed`` for backward.

    The blocks are rebuilt in backward, at ``n·b³·k`` operations, a fraction ``~b/d`` of the layer's matmul, and the
    packed parameters' gradient comes from the builder's own backward (no autograd graph); the rotated input is
    never kept (the base layer's backward does not need it when its weight is frozen). So a rotated layer saves no
    more than a LoRA layer, whose ``A`` keeps the same ``x``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, block_size: int, num_terms: int,
                keep: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, packed, keep)
        ctx.block_size, ctx.num_terms = block_size, num_terms
        return _rotate_values(x, _with_dropout(_Builder(packed, block_size, num_terms).blocks(), keep))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, packed, keep = ctx.saved_tensors
        need_x, need_r = ctx.needs_input_grad[:2]
        builder = _Builder(packed, ctx.block_size, ctx.num_terms)
        grad_x, grad_r = _rotate_grads(x, _with_dropout(builder.blocks(), keep), grad_out, need_x, need_r)
        grad_packed = None
        if need_r:
            if keep is not None:  # dropped blocks were the identity: no gradient; a shared block sums its copies
                grad_r = (grad_r * keep).sum(0, keepdim=True) if packed.shape[0] == 1 else grad_r * keep
            grad_packed = builder.backward(grad_r.to(packed.dtype))
        return grad_x, grad_packed, None, None, None


def rotate_input(x: torch.Tensor, packed: torch.Tensor, block_size: int, num_terms: int,
                 keep: torch.Tensor | None = None, dim: int = -1) -> torch.Tensor:
    """``x`` with each block of its ``dim`` axis rotated by the blocks built from ``packed`` (see :func:`rotate`),
    differentiable in ``x`` and ``packed``, keeping only ``x`` and ``packed`` for backward.

    ``keep`` (``(width / b, 1, 1)`` bools, optional) replaces the blocks where it is False by the identity (OFT's
    multiplicative dropout).
    """
    n = packed.shape[0] if keep is None else keep.shape[0]
    if x.shape[dim] % block_size or n not in (1, x.shape[dim] // block_size):
        raise ValueError(f"{n} rotation blocks of width {block_size} do not fit an input of width {x.shape[dim]}.")
    if dim in (-1, x.dim() - 1):
        return _RotateInput.apply(x, packed, block_size, num_terms, keep)
    moved = x.movedim(dim, -1)
    out = _RotateInput.apply(moved, packed, block_size, num_terms, keep)
    return out.movedim(-1, dim).contiguous()  # the base layer's kernel then sees the layout it was given
