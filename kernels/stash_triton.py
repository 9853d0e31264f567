"""Triton kernels for StashQuant's block floating point: pack (one read, one smaller write) and unpack.

Both kernels see a program's share of the flattened tensor as a ``(blocks, block_size / 8, 8)`` tile: groups of 8
consecutive codes, whose ``8 · bits`` bits are exactly ``bits`` whole bytes of the stream (code ``i``'s bit ``j`` at
stream bit ``i·bits + j``, least significant first). A group's codes are OR-ed into one 64-bit word (``code_l`` at
bit ``l·bits``) and the word's low ``bits`` bytes are its bytes of the stream, so every width from 2 to 8 takes the
same path, and no code tensor ever reaches memory.

* ``pack``: loads the values once (any float dtype, computed in float32; outliers, i.e. NaN and magnitudes not
  below ``limit``, count as zeros, as in the reference, which keeps them aside), writes the bit stream and one scale
  per block. Round-to-nearest output is bit-identical to :func:`peft_quant.stash.bfp.pack` on the same device: the
  scale is ``absmax / qmax`` as torch evaluates it (a true division on CPU; on CUDA torch multiplies by the float32
  reciprocal of a Python-number divisor, and so does the kernel there), rounded to bfloat16 to nearest even
  (bit arithmetic: the interpreter's cast truncates); the e8m0 exponent uses the same ``log2`` as torch's CUDA
  kernels (libdevice; numpy's under the interpreter); values divide by the step with IEEE division
  (``div_rn``: Triton's ``/`` is approximate on NVIDIA GPUs) and round half to even. Stochastic rounding is
  ``floor(v + u)`` with ``u`` from Philox (``tl.randint``, seed and value index) in steps of 2⁻²⁴ like
  ``torch.rand``: the same format and distribution as the reference, another random stream.
* ``unpack``: reads the stream and scales once and writes the tensor in its dtype, bit-identical to
  :func:`peft_quant.stash.bfp.unpack`; the launcher then writes the outliers back.

The public entry points (which pick this or the reference) are in :mod:`.stash`.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..stash.bfp import PackedBlocks, outlier_limit, restore_outliers
from .backend import interpreting

VALUES_PER_PROGRAM = 2048  # each program packs or unpacks this many values: 2048 / block_size whole blocks
RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 · 2^23: (v + M) − M rounds |v| < 2^22 to an integer, half to even


@triton.jit
def _bf16_bits(v):
    """float32 → the int16 bit pattern of bfloat16, rounded to nearest even (torch's ``.to(torch.bfloat16)``, for
    non-NaN values)."""
    b = v.to(tl.int32, bitcast=True)
    b = b + 0x7FFF + ((b >> 16) & 1)
    return (b >> 16).to(tl.int16)


@triton.jit
def _steps(scales_ptr, blocks, inside, E8M0: tl.constexpr):
    """float32 steps of ``blocks`` from their stored scales (``decode_scales``), built from bits: exact."""
    if E8M0:
        e = tl.load(scales_ptr + blocks, mask=inside, other=0).to(tl.int32)
        bits = tl.where(e > -127, (e + 127) << 23, 1 << 22)  # 2^e; e = −127 is the subnormal 2^−127
    else:
        bits = (tl.load(scales_ptr + blocks, mask=inside, other=0).to(tl.int32) & 0xFFFF) << 16
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _pack_kernel(x_ptr, stream_ptr, scales_ptr, numel, num_blocks, seed, inv_qmax, limit,
                 BITS: tl.constexpr, BLOCK: tl.constexpr, BLOCKS: tl.constexpr, E8M0: tl.constexpr,
                 STOCHASTIC: tl.constexpr, RECIPROCAL: tl.constexpr, LIBDEVICE: tl.constexpr):
    QMAX: tl.constexpr = 2 ** (BITS - 1) - 1
    GROUPS: tl.constexpr = BLOCK // 8
    blocks = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)  # (BLOCKS,)
    groups = tl.arange(0, GROUPS)[None, :, None]
    lanes = tl.arange(0, 8)[None, None, :]
    index = blocks[:, None, None].to(tl.int64) * BLOCK + groups * 8 + lanes  # (BLOCKS, GROUPS, 8) value index
    x = tl.load(x_ptr + index, mask=index < numel, other=0.0).to(tl.float32)  # padding: zeros, as F.pad
    x = tl.where(tl.abs(x) < limit, x, 0.0)  # outliers (±inf, NaN, mask fill values): zeros, as the reference
    absmax = tl.max(tl.max(tl.abs(x), axis=2), axis=1)  # (BLOCKS,)
    inside = blocks < num_blocks

    if E8M0:
        clamped = tl.maximum(absmax, 2.0**-126)
        ratio = clamped * inv_qmax if RECIPROCAL else tl.math.div_rn(clamped, QMAX * 1.0)
        log2 = libdevice.log2(ratio) if LIBDEVICE else tl.log2(ratio)
        e = tl.minimum(tl.maximum(tl.ceil(log2), -127.0), 127.0).to(tl.int32)
        tl.store(scales_ptr + blocks, e.to(tl.int8), mask=inside)
        step_bits = tl.where(e > -127, (e + 127) << 23, 1 << 22)  # 2^e, as _steps
    else:
        ratio = absmax * inv_qmax if RECIPROCAL else tl.math.div_rn(absmax, QMAX * 1.0)
        scale = _bf16_bits(tl.where(absmax > 0, ratio, 1.0))
        tl.store(scales_ptr + blocks, scale, mask=inside)
        step_bits = (scale.to(tl.int32) & 0xFFFF) << 16
    step = step_bits.to(tl.float32, bitcast=True)[:, None, None]

    v = tl.math.div_rn(x, tl.broadcast_to(step, x.shape))
    if STOCHASTIC:
        u = (tl.randint(seed, index) >> 8).to(tl.float32) * (2.0**-24)  # [0, 1) in steps of 2^-24, as torch.rand
        v = tl.floor(v + u)
    else:
        v = (v + RNE_MAGIC) - RNE_MAGIC  # torch.round; |v| ≥ 2^22 only for values the clamp saturates anyway
    codes = (tl.minimum(tl.maximum(v, -QMAX), QMAX) + QMAX).to(tl.int64)  # offset to [0, 2·qmax]

    word = tl.sum(codes << (lanes * BITS), axis=2)  # (BLOCKS, GROUPS): a group's 8 codes, disjoint bit fields
    out_bytes = (word[:, :, None] >> (lanes * 8)) & 0xFF  # (BLOCKS, GROUPS, 8): byte l of the word, l < BITS
    byte_index = (blocks[:, None, None].to(tl.int64) * GROUPS + groups) * BITS + lanes
    tl.store(stream_ptr + byte_index, out_bytes.to(tl.uint8), mask=inside[:, None, None] & (lanes < BITS))


@triton.jit
def _unpack_kernel(stream_ptr, scales_ptr, out_ptr, numel, num_blocks,
                   BITS: tl.constexpr, BLOCK: tl.constexpr, BLOCKS: tl.constexpr, E8M0: tl.constexpr,
                   OUT_BF16: tl.constexpr):
    QMAX: tl.constexpr = 2 ** (BITS - 1) - 1
    GROUPS: tl.constexpr = BLOCK // 8
    blocks = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)  # (BLOCKS,)
    groups = tl.arange(0, GROUPS)[None, :, None]
    lanes = tl.arange(0, 8)[None, None, :]
    inside = blocks < num_blocks
    byte_index = (blocks[:, None, None].to(tl.int64) * GROUPS + groups) * BITS + lanes
    stream = tl.load(stream_ptr + byte_index, mask=inside[:, None, None] & (lanes < BITS), other=0).to(tl.int64)
    word = tl.sum(stream << (lanes * 8), axis=2)  # (BLOCKS, GROUPS): a group's BITS bytes
    codes = (word[:, :, None] >> (lanes * BITS)) & ((1 << BITS) - 1)  # (BLOCKS, GROUPS, 8)
    step = _steps(scales_ptr, blocks, inside, E8M0)[:, None, None]
    values = (codes.to(tl.float32) - QMAX) * step
    index = blocks[:, None, None].to(tl.int64) * BLOCK + groups * 8 + lanes
    if OUT_BF16:
        tl.store(out_ptr + index, _bf16_bits(values), mask=index < numel)
    else:
        tl.store(out_ptr + index, values.to(out_ptr.dtype.element_ty), mask=index < numel)


def _geometry(numel: int, block_size: int) -> tuple[int, int, tuple[int]]:
    """Blocks in the tensor, blocks per program, and the grid."""
    num_blocks = triton.cdiv(numel, block_size)
    per_program = VALUES_PER_PROGRAM // block_size
    return num_blocks, per_program, (triton.cdiv(num_blocks, per_program),)


def pack(
    x: torch.Tensor, bits: int, block_size: int, scale: str, stochastic: bool, seed: int,
    mantissas: Optional[torch.Tensor] = None, scales: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The bit stream ``(padded numel · bits / 8,)`` uint8 and the scales ``(blocks,)`` (bfloat16 or int8) of ``x``,
    its outliers counted as zeros (the caller keeps them: :func:`peft_quant.stash.bfp.find_outliers`); ``mantissas``
    and ``scales`` are optional output buffers."""
    flat = x.detach().reshape(-1)  # a view when x is contiguous
    num_blocks, per_program, grid = _geometry(flat.numel(), block_size)
    if mantissas is None:
        mantissas = torch.empty(num_blocks * block_size * bits // 8, dtype=torch.uint8, device=x.device)
    if scales is None:
        scales = torch.empty(num_blocks, dtype=torch.int8 if scale == "e8m0" else torch.bfloat16, device=x.device)
    qmax = 2 ** (bits - 1) - 1
    _pack_kernel[grid](
        flat, mantissas, scales.view(torch.int16) if scale == "bf16" else scales, flat.numel(), num_blocks, seed,
        1.0 / qmax, outlier_limit(x.dtype), BITS=bits, BLOCK=block_size, BLOCKS=per_program, E8M0=scale == "e8m0",
        STOCHASTIC=stochastic, RECIPROCAL=x.is_cuda, LIBDEVICE=not interpreting(),
    )
    return mantissas, scales


def unpack(packed: PackedBlocks, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The tensor ``packed`` holds (contiguous, its shape and dtype, outliers restored); ``out`` is an optional output
    buffer."""
    if out is None:
        out = torch.empty(packed.shape, dtype=packed.dtype, device=packed.mantissas.device)
    num_blocks, per_program, grid = _geometry(out.numel(), packed.block_size)
    e8m0 = packed.scales.dtype == torch.int8
    bf16 = out.dtype == torch.bfloat16
    _unpack_kernel[grid](
        packed.mantissas, packed.scales if e8m0 else packed.scales.view(torch.int16),
        out.view(torch.int16) if bf16 else out, out.numel(), num_blocks,
        BITS=packed.bits, BLOCK=packed.block_size, BLOCKS=per_program, E8M0=e8m0, OUT_BF16=bf16,
    )
    return restore_outliers(out, packed)
