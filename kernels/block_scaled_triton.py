"""Triton kernel of the block-scaled formats' input gradient: ``dX = dY · dequant(W)`` with ``W`` decoded in registers.

One kernel for both codecs (``CODEC`` constexpr: 0 = ``fp8_block``, 1 = ``mxfp4``, as :attr:`Codec.kernel_id`). Each
program computes a ``(BM, BN)`` tile of ``dX`` over all output rows ``K`` of ``W``, loading per step a ``(BK, BN)``
tile of codes and its scales and decoding them from their bits (e4m3: sign, 4 exponent bits with bias 7, 3 mantissa
bits, subnormals, NaN at ``0x7F``; e2m1: sign, 2 exponent bits with bias 1, 1 mantissa bit; e8m0 scales: the float32
exponent field), so the kernel reads only the stored bytes, never a float weight, and decodes the same values as the
reference (:mod:`.block_scaled`) bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .block_scaled import MX_GROUP, Codec, Fp8BlockCodec, Stored
from .quant_full_triton import _dot_accumulate, _dot_mode, _matmul_blocks

TWO_POW_M9: tl.constexpr = tl.constexpr(2.0**-9)  # e4m3's subnormal step
TWO_POW_M127: tl.constexpr = tl.constexpr(2.0**-127)  # e8m0 code 0 (a float32 subnormal)


@triton.jit
def _bits_to_float(sign, exponent, mantissa_bits):
    """float32 from its fields (``exponent`` biased by 127, ``mantissa_bits`` already at bit 22 downward)."""
    return ((sign << 31) | (exponent << 23) | mantissa_bits).to(tl.float32, bitcast=True)


@triton.jit
def _decode_minifloat(code, EXPONENT_BITS: tl.constexpr, MANTISSA_BITS: tl.constexpr, BIAS: tl.constexpr,
                      SUBNORMAL_STEP: tl.constexpr):
    """A sign/exponent/mantissa code (int32, the sign bit above the exponent) → float32, subnormals (exponent 0:
    ``mantissa · SUBNORMAL_STEP``, ``SUBNORMAL_STEP = 2^(1 − BIAS − MANTISSA_BITS)``) included."""
    sign = code >> (EXPONENT_BITS + MANTISSA_BITS)
    exponent = (code >> MANTISSA_BITS) & ((1 << EXPONENT_BITS) - 1)
    mantissa = code & ((1 << MANTISSA_BITS) - 1)
    normal = _bits_to_float(sign, exponent + (127 - BIAS), mantissa << (23 - MANTISSA_BITS))
    subnormal = mantissa.to(tl.float32) * SUBNORMAL_STEP
    subnormal = tl.where(sign == 1, -subnormal, subnormal)
    return tl.where(exponent == 0, subnormal, normal)


@triton.jit
def _decode_e4m3(byte):
    """float8_e4m3fn byte (int32 0-255) → float32: 4 exponent bits with bias 7, 3 mantissa bits, NaN at ±0x7F."""
    value = _decode_minifloat(byte, 4, 3, 7, TWO_POW_M9)
    return tl.where((byte & 127) == 127, float("nan"), value)


@triton.jit
def _decode_e2m1(nibble):
    """e2m1 nibble (int32 0-15) → float32: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives."""
    return _decode_minifloat(nibble, 2, 1, 1, 0.5)


@triton.jit
def _decode_e8m0(code):
    """e8m0 scale (int32 0-254) → ``2^(code − 127)`` in float32."""
    return tl.where(code == 0, TWO_POW_M127, _bits_to_float(code * 0, code, code * 0))


@triton.jit
def _input_grad_kernel(
    g_ptr, codes_ptr, scale_ptr, out_ptr,
    M, N, K, code_stride, scale_stride, block_rows, block_cols,
    stride_gm, stride_gk, stride_om, stride_on,
    CODEC: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """``out[M, N] = g[M, K] @ W[K, N]``: ``K`` = out features, ``N`` = in features; ``W`` decoded per tile."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        g = tl.load(g_ptr + rm[:, None].to(tl.int64) * stride_gm + kk[None, :] * stride_gk,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        mask = (kk[:, None] < K) & (rn[None, :] < N)
        row = kk[:, None].to(tl.int64)
        if CODEC == 0:  # fp8_block: codes (K, N) bytes; scales (ceil(K/b0), ceil(N/b1)) float32
            byte = tl.load(codes_ptr + row * code_stride + rn[None, :], mask=mask, other=0).to(tl.int32)
            scale = tl.load(scale_ptr + (row // block_rows) * scale_stride + rn[None, :] // block_cols, mask=mask,
                            other=0.0)
            w = _decode_e4m3(byte) * scale
        else:  # blocks (K, N/2) bytes, element 2j in the low nibble; scales (K, N/32) e8m0
            byte = tl.load(codes_ptr + row * code_stride + rn[None, :] // 2, mask=mask, other=0).to(tl.int32)
            nibble = tl.where(rn[None, :] % 2 == 0, byte & 15, byte >> 4)
            code = tl.load(scale_ptr + row * scale_stride + rn[None, :] // block_cols, mask=mask, other=127)
            w = _decode_e2m1(nibble) * _decode_e8m0(code.to(tl.int32))
        acc = _dot_accumulate(acc, g, w, DOT_FP32, PRECISION)
    tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def _kernel_tensors(stored: Stored, codec: Codec) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(codes as bytes (K, row bytes), scales as float32 or uint8 (K-blocks, N-blocks), block rows, block cols)."""
    out_features, in_features = codec.shape(stored)
    if isinstance(codec, Fp8BlockCodec):
        codes = stored[0].view(torch.uint8)
        scale = stored[1] if stored[1].dtype == torch.float32 else stored[1].to(torch.float32)  # e8m0 scales
        return codes.contiguous(), scale.contiguous(), *codec.block_size
    codes = stored[0].reshape(out_features, in_features // 2)  # (out, in/32, 16) → (out, in/2) bytes
    return codes.contiguous(), stored[1].contiguous(), 1, MX_GROUP


def matmul_weight(grad: torch.Tensor, stored: Stored, codec: Codec) -> torch.Tensor:
    """``grad · dequant(W)`` for ``grad`` ``(..., out)``, in ``grad``'s dtype (see the module doc)."""
    out_features, in_features = codec.shape(stored)
    g2 = grad.reshape(-1, out_features)  # (tokens, out)
    m = g2.shape[0]
    out = torch.empty((m, in_features), dtype=grad.dtype, device=grad.device)
    if m:
        codes, scale, block_rows, block_cols = _kernel_tensors(stored, codec)
        bm, bn, bk, warps, stages = _matmul_blocks(g2)
        dot_fp32, precision = _dot_mode(g2)
        grid = (triton.cdiv(m, bm), triton.cdiv(in_features, bn))
        _input_grad_kernel[grid](
            g2, codes, scale, out, m, in_features, out_features, codes.stride(0), scale.stride(0), block_rows,
            block_cols, g2.stride(0), g2.stride(1), out.stride(0), out.stride(1),
            CODEC=codec.kernel_id, DOT_FP32=dot_fp32, PRECISION=precision, BM=bm, BN=bn, BK=bk, num_warps=warps,
            num_stages=stages,
        )
    return out.reshape(*grad.shape[:-1], in_features)
