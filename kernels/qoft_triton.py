"""Triton kernels for QOFT: rotation blocks from packed skew parameters, and the block-diagonal rotation of activations.

* ``build``: one launch builds every block ``R = I + 2Q + … + 2Q^{k-2} + Q^{k-1}`` (one program per block, the
  ``b × b`` block padded to a power of two ≥ 16 for ``tl.dot``); its backward is one launch too.
* ``rotate``: ``x_j → x_j R_j`` over the last dim, ``x`` loaded in its own dtype, computed in float32, stored in
  ``x``'s dtype; backward reads ``x`` and the output gradient once, writing ``grad_x = g Rᵀ`` and per-chunk partial
  sums of ``xᵀ g`` that one ``sum`` reduces (deterministic, no atomics).

The math is :mod:`peft_quant.qoft.rotation` (the reference); the public entry points are in :mod:`.qoft`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Products of float32 values on tensor cores split into three tf32 products (≈ float32 accuracy): the rotation then
# stays memory-bound; plain float32 FMAs ("ieee") would make it compute-bound at b = 32. The builder too: with "ieee"
# its b × b products spill registers from b = 32 on (tests/compile_kernels.py prints ptxas's figures).
ROTATE_PRECISION = tl.constexpr("tf32x3")
BUILD_PRECISION = tl.constexpr("tf32x3")
TARGET_PROGRAMS = 1024  # backward: about one wave of programs on a large GPU, each reducing a chunk of tokens


def padded(block_size: int) -> int:
    """The power-of-two tile (≥ 16, what ``tl.dot`` needs) holding one ``block_size × block_size`` block."""
    return max(16, triton.next_power_of_2(block_size))


def rotate_tiles(block_size: int, backward: bool) -> tuple[int, int]:
    """``(tokens per tile, warps)`` of the rotation kernels: a ``tile × padded(b)`` slab of activations per program
    step. Chosen from ptxas's figures (tests/compile_kernels.py): no register spills on sm_90, at most 88 bytes per
    thread on sm_80 (the backward of 64-wide blocks); the backward holds four such slabs and a ``b × b``
    accumulator, so its tiles are shorter."""
    wide = padded(block_size) >= 64
    if backward:
        return 32, 8 if wide else 4
    return (32 if wide else 128), 8


# ---- building R ----------------------------------------------------------------------------------------------------


@triton.jit
def _skew(packed_ptr, b, rows, cols):
    """``Q = U − Uᵀ`` (BP, BP) in float32 from one block's packed upper triangle (row-major: ``triu_indices``)."""
    index = rows * (b - 1) - rows * (rows - 1) // 2 + cols - rows - 1  # position of (row, col), row < col
    upper = tl.load(packed_ptr + index, mask=(rows < cols) & (cols < b), other=0.0).to(tl.float32)
    return upper - tl.trans(upper)


@triton.jit
def _build_kernel(packed_ptr, out_ptr, b, n_packed, NUM_TERMS: tl.constexpr, BP: tl.constexpr):
    block = tl.program_id(0)
    rows = tl.arange(0, BP)[:, None]
    cols = tl.arange(0, BP)[None, :]
    q = _skew(packed_ptr + block * n_packed, b, rows, cols)
    rotation = (rows == cols).to(tl.float32)
    power = q
    for i in tl.static_range(1, NUM_TERMS):
        if i > 1:
            power = tl.dot(power, q, input_precision=BUILD_PRECISION)  # Qⁱ
        if i == NUM_TERMS - 1:
            rotation += power
        else:
            rotation += 2.0 * power
    tl.store(out_ptr + block * b * b + rows * b + cols, rotation.to(out_ptr.dtype.element_ty),
             mask=(rows < b) & (cols < b))


@triton.jit
def _build_backward_kernel(packed_ptr, grad_r_ptr, grad_packed_ptr, b, n_packed, NUM_TERMS: tl.constexpr,
                           BP: tl.constexpr):
    """For ``R = Σᵢ cᵢ Qⁱ``: dL/dQ = Σᵢ cᵢ Sᵢ₋₁ with Sₘ = Σ_{a+c=m} Pᵃ G Pᶜ (P = Qᵀ = −Q, G = dL/dR), built by
    Sₘ = P Sₘ₋₁ + G Pᵐ; then dL/dU = dL/dQ − (dL/dQ)ᵀ on the upper triangle."""
    block = tl.program_id(0)
    rows = tl.arange(0, BP)[:, None]
    cols = tl.arange(0, BP)[None, :]
    inside = (rows < b) & (cols < b)
    p = -_skew(packed_ptr + block * n_packed, b, rows, cols)
    g = tl.load(grad_r_ptr + block * b * b + rows * b + cols, mask=inside, other=0.0).to(tl.float32)
    grad_q = tl.zeros((BP, BP), dtype=tl.float32)
    s = g  # S₀
    p_power = (rows == cols).to(tl.float32)
    for i in tl.static_range(1, NUM_TERMS):
        if i > 1:
            p_power = tl.dot(p_power, p, input_precision=BUILD_PRECISION)  # Pⁱ⁻¹
            s = tl.dot(p, s, input_precision=BUILD_PRECISION) + tl.dot(g, p_power, input_precision=BUILD_PRECISION)
        if i == NUM_TERMS - 1:
            grad_q += s
        else:
            grad_q += 2.0 * s
    grad_u = grad_q - tl.trans(grad_q)
    index = rows * (b - 1) - rows * (rows - 1) // 2 + cols - rows - 1
    tl.store(grad_packed_ptr + block * n_packed + index, grad_u.to(grad_packed_ptr.dtype.element_ty),
             mask=(rows < cols) & (cols < b))


def build(packed: torch.Tensor, block_size: int, num_terms: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotation blocks ``(n, b, b)`` in ``packed``'s dtype from packed parameters ``(n, b(b-1)/2)``."""
    packed = packed.contiguous()
    out = packed.new_empty(packed.shape[0], block_size, block_size) if out is None else out
    _build_kernel[(packed.shape[0],)](packed, out, block_size, packed.shape[1], num_terms, padded(block_size))
    return out


def build_backward(packed: torch.Tensor, grad_rotation: torch.Tensor, num_terms: int,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient ``(n, b(b-1)/2)`` for the packed parameters, given ``dL/dR`` ``(n, b, b)``."""
    packed, grad_rotation = packed.contiguous(), grad_rotation.contiguous()
    block_size = grad_rotation.shape[-1]
    grad_packed = torch.empty_like(packed) if out is None else out
    _build_backward_kernel[(packed.shape[0],)](packed, grad_rotation, grad_packed, block_size, packed.shape[1],
                                               num_terms, padded(block_size))
    return grad_packed


class CayleyNeumann(torch.autograd.Function):
    """``build`` with its Triton backward; saves only the packed parameters."""

    @staticmethod
    def forward(ctx, packed: torch.Tensor, block_size: int, num_terms: int) -> torch.Tensor:
        ctx.save_for_backward(packed)
        ctx.num_terms = num_terms
        return build(packed, block_size, num_terms)

    @staticmethod
    def backward(ctx, grad_rotation: torch.Tensor):
        (packed,) = ctx.saved_tensors
        return build_backward(packed, grad_rotation, ctx.num_terms), None, None


# ---- applying R to activations -------------------------------------------------------------------------------------


@triton.jit
def _rotate_kernel(x_ptr, r_ptr, out_ptr, tokens, x_stride, out_stride, b, r_stride, n_width_blocks,
                   BLOCK_T: tl.constexpr, BP: tl.constexpr):
    pid = tl.program_id(0)
    j = pid % n_width_blocks  # neighbouring programs cover one token tile's full rows
    t = ((pid // n_width_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]).to(tl.int64)  # offsets may pass 2³¹
    rows = tl.arange(0, BP)[:, None]
    cols = tl.arange(0, BP)[None, :]
    mask = (t < tokens) & (cols < b)
    x = tl.load(x_ptr + t * x_stride + j * b + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + j * r_stride + rows * b + cols, mask=(rows < b) & (cols < b), other=0.0).to(tl.float32)
    y = tl.dot(x, r, input_precision=ROTATE_PRECISION)
    tl.store(out_ptr + t * out_stride + j * b + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_backward_kernel(x_ptr, g_ptr, r_ptr, grad_x_ptr, partial_ptr, tokens, x_stride, g_stride, grad_x_stride,
                            b, r_stride, n_width_blocks, chunk_tokens, BLOCK_T: tl.constexpr, BP: tl.constexpr,
                            GRAD_X: tl.constexpr, GRAD_R: tl.constexpr):
    """One (chunk of tokens, width block): ``grad_x = g Rᵀ`` per tile, and ``Σ_tiles xᵀ g`` into one partial."""
    pid = tl.program_id(0)
    j = pid % n_width_blocks
    chunk = pid // n_width_blocks
    rows = tl.arange(0, BP)[:, None]
    cols = tl.arange(0, BP)[None, :]
    inside = (rows < b) & (cols < b)
    r_t = tl.load(r_ptr + j * r_stride + cols * b + rows, mask=inside, other=0.0).to(tl.float32)  # Rᵀ
    grad_r = tl.zeros((BP, BP), dtype=tl.float32)
    start = chunk * chunk_tokens
    for t0 in range(start, tl.minimum(start + chunk_tokens, tokens), BLOCK_T):
        t = (t0 + tl.arange(0, BLOCK_T)[:, None]).to(tl.int64)
        mask = (t < tokens) & (cols < b)
        g = tl.load(g_ptr + t * g_stride + j * b + cols, mask=mask, other=0.0).to(tl.float32)
        if GRAD_X:
            grad_x = tl.dot(g, r_t, input_precision=ROTATE_PRECISION)
            tl.store(grad_x_ptr + t * grad_x_stride + j * b + cols, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
        if GRAD_R:
            x = tl.load(x_ptr + t * x_stride + j * b + cols, mask=mask, other=0.0).to(tl.float32)
            grad_r = tl.dot(tl.trans(x), g, grad_r, input_precision=ROTATE_PRECISION)
    if GRAD_R:
        tl.store(partial_ptr + pid * b * b + rows * b + cols, grad_r, mask=inside)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``(tokens, width)`` with unit stride along the width (a view when possible)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rotate_forward(x: torch.Tensor, blocks: torch.Tensor, out: torch.Tensor | None = None,
                   block_t: int | None = None) -> torch.Tensor:
    """``x`` (..., width) with each width block ``x_j`` replaced by ``x_j R_j``, in ``x``'s dtype.

    ``blocks`` is ``(1, b, b)`` (shared) or ``(width / b, b, b)``; ``out``, when given, is a contiguous buffer shaped
    like ``x``. ``block_t`` overrides the token tile (tests).
    """
    b = blocks.shape[-1]
    blocks = blocks.contiguous()
    x2 = _rows(x)  # (tokens, width)
    tokens, width = x2.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    tile, warps = rotate_tiles(b, backward=False)
    block_t = block_t or tile
    n_width_blocks = width // b
    grid = (n_width_blocks * triton.cdiv(tokens, block_t),)
    if tokens:
        _rotate_kernel[grid](x2, blocks, out, tokens, x2.stride(0), width, b, 0 if blocks.shape[0] == 1 else b * b,
                             n_width_blocks, block_t, padded(b), num_warps=warps)
    return out


def rotate_backward(x: torch.Tensor, blocks: torch.Tensor, grad_out: torch.Tensor, grad_x: bool, grad_r: bool,
                    grad_x_out: torch.Tensor | None = None, block_t: int | None = None, chunks: int | None = None
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`rotate_forward` for ``x`` (in ``x``'s dtype; into the contiguous ``grad_x_out`` when
    given) and ``blocks`` (in their dtype), each only when asked. ``block_t`` and ``chunks`` (token chunks reduced
    separately) override the defaults (tests)."""
    b = blocks.shape[-1]
    blocks = blocks.contiguous()
    x2, g2 = _rows(x), _rows(grad_out)  # (tokens, width)
    tokens, width = x2.shape
    n_width_blocks = width // b
    tile, warps = rotate_tiles(b, backward=True)
    block_t = block_t or tile
    tiles = max(1, triton.cdiv(tokens, block_t))
    chunks = max(1, min(chunks or triton.cdiv(TARGET_PROGRAMS, n_width_blocks), tiles))
    chunk_tokens = triton.cdiv(tiles, chunks) * block_t
    chunks = triton.cdiv(tokens, chunk_tokens)
    dx = None
    if grad_x:
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if grad_x_out is None else grad_x_out
    partial = torch.empty((chunks, n_width_blocks, b, b), dtype=torch.float32, device=x.device) if grad_r else None
    if tokens:
        _rotate_backward_kernel[(chunks * n_width_blocks,)](
            x2, g2, blocks, dx if grad_x else g2, partial if grad_r else blocks, tokens, x2.stride(0), g2.stride(0),
            width, b, 0 if blocks.shape[0] == 1 else b * b, n_width_blocks, chunk_tokens,
            block_t, padded(b), grad_x, grad_r, num_warps=warps,
        )
    dr = None
    if grad_r:
        dr = partial.view(-1, b, b).sum(0, keepdim=True) if blocks.shape[0] == 1 else partial.sum(0)
        dr = dr.to(blocks.dtype)
    return dx, dr


class Rotate(torch.autograd.Function):
    """:func:`rotate_forward` with its one-pass backward; saves only ``x`` and the blocks (no rotated copy)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, blocks)
        return rotate_forward(x, blocks)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, blocks = ctx.saved_tensors
        return rotate_backward(x, blocks, grad_out, *ctx.needs_input_grad)
