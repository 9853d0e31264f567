"""Triton kernels of QuantFull: the int8 dequantize-matmul, and the weight gradient fused with the Lion step.

* :func:`int8_matmul` computes ``a Wᵀ`` (forward) or ``a W`` (input gradient) with ``W = scale · codes`` dequantized
  tile by tile in registers; the outliers' contribution (codes 0 there) is added in the epilogue from a small sparse
  product computed in PyTorch (``S aᵀ`` in float32, ``S`` the ``k`` outliers as a sparse matrix).
* :func:`lion_step_from_activations_` lets each program compute one ``(rows, cols)`` tile of the weight gradient
  ``G = gradᵀ x`` over all tokens in float32 registers, then apply :func:`~peft_quant.quant_full.int8_state.lion_step_`
  to that tile: momentum dequantized, Lion's step added to the codes in code units, rounded to nearest (ties to even,
  as ``torch.round``) or stochastically (``tl.rand`` keyed by the seed and the element's flat index), codes and
  re-quantized momentum written back in place. ``G`` never reaches global memory. Momentum blocks must lie inside a
  tile (``in_features % block_size == 0``, the tile width a multiple of ``block_size``); a tile's outliers are found
  by a binary search of the sorted outlier indices of its rows and updated in ``outlier_value``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ..quant_full.int8_state import QMAX, LionHyper
from .backend import interpreting


def _dot_mode(*tensors: torch.Tensor) -> tuple[bool, str]:
    """(dot in float32?, input precision). Half inputs of one dtype dot in that dtype with float32 accumulation; the
    interpreter gets float32 (its bf16 arithmetic is wrong); float32 dots as three tf32 products (≈ float32, on tensor
    cores), or as one where torch's matmul would use TF32."""
    dtypes = {t.dtype for t in tensors}
    half = len(dtypes) == 1 and dtypes <= {torch.float16, torch.bfloat16}
    precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
    return (not half) or interpreting(), precision


@triton.jit
def _dot_accumulate(acc, a, w, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ w`` as :func:`_dot_mode` chose: float32 operands at ``PRECISION``, or ``w`` in ``a``'s half dtype
    (float32 accumulation either way)."""
    if DOT_FP32:
        acc = tl.dot(a.to(tl.float32), w, acc, input_precision=PRECISION)
    else:
        acc = tl.dot(a, w.to(a.dtype), acc)
    return acc


QMAX_F = tl.constexpr(float(QMAX))


@triton.jit
def _round_to_int8(moved, seed, offsets, STOCHASTIC: tl.constexpr):
    """Real-valued codes → integer-valued float32 in [-127, 127]: stochastically (``floor(v)`` + 1 with probability
    ``v − floor(v)``) or to nearest with ties to even, exactly as ``torch.round`` (``v − floor(v)`` is exact)."""
    low = tl.floor(moved)
    fraction = moved - low
    if STOCHASTIC:
        up = tl.rand(seed, offsets) < fraction
    else:
        odd = low * 0.5 != tl.floor(low * 0.5)
        up = (fraction > 0.5) | ((fraction == 0.5) & odd)
    return tl.minimum(tl.maximum(low + up.to(tl.float32), -QMAX_F), QMAX_F)


@triton.jit
def _dequant_matmul_kernel(
    a_ptr, codes_ptr, scale_ptr, add_ptr, out_ptr,
    M, N, K, in_features, groups, group_size,
    stride_am, stride_ak, stride_addm, stride_addn, stride_om, stride_on,
    TRANS_W: tl.constexpr, ROW_SCALE: tl.constexpr, HAS_ADD: tl.constexpr, DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """``out[M, N] = a[M, K] @ B (+ add)`` with ``B = Wᵀ`` (``TRANS_W``: ``N`` = out features, ``K`` = in) or ``B = W``
    (``N`` = in, ``K`` = out), ``W[r, c] = codes[r, c] · scale[r, c // group_size]`` dequantized in registers."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None].to(tl.int64) * stride_am + kk[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        if TRANS_W:
            row, col, rows = rn[None, :], kk[:, None], N  # B[k, n] = W[n, k]
        else:
            row, col, rows = kk[:, None], rn[None, :], K  # B[k, n] = W[k, n]
        b_mask = (kk[:, None] < K) & (rn[None, :] < N)
        q = tl.load(codes_ptr + row.to(tl.int64) * in_features + col, mask=b_mask, other=0)
        if ROW_SCALE:  # one scale per W row: a (1, BN) or (BK, 1) load
            s = tl.load(scale_ptr + row, mask=row < rows, other=0.0)
        else:
            s = tl.load(scale_ptr + row.to(tl.int64) * groups + col // group_size, mask=b_mask, other=0.0)
        w = q.to(tl.float32) * s  # (BK, BN), as dequantize_weight computes it
        acc = _dot_accumulate(acc, a, w, DOT_FP32, PRECISION)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if HAS_ADD:
        acc += tl.load(add_ptr + rm[:, None].to(tl.int64) * stride_addm + rn[None, :].to(tl.int64) * stride_addn,
                       mask=mask, other=0.0)
    tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


def _matmul_blocks(a: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(BM, BN, BK, num_warps, num_stages): small tiles under the interpreter (each program is numpy work); on GPUs
    tensor-core tiles (fewer rows when there are few tokens) that ptxas compiles without register spills and within
    the 99 KiB of shared memory of sm_86/sm_89 GPUs (tests/compile_kernels.py): float32 operands, split into three
    tf32 products, take 64 × 64 tiles; half operands 128 × 128."""
    if interpreting():
        return 32, 32, 32, 4, 1
    rows = max(16, triton.next_power_of_2(a.shape[0]))
    if a.dtype == torch.float32:
        return min(64, rows), 64, 32, 4, 3
    bm = min(128, rows)
    return bm, 128, 32, 8 if bm == 128 else 4, 4


def _outlier_matrix(index: torch.Tensor, value: torch.Tensor, shape: tuple[int, int], transpose: bool) -> torch.Tensor:
    """The outliers as a sparse float32 matrix of ``shape`` ``(out, in)`` (``transpose``: ``(in, out)``)."""
    flat = index.long()
    rows, cols = flat // shape[1], flat % shape[1]
    indices = torch.stack([cols, rows] if transpose else [rows, cols])  # (2, k)
    size = (shape[1], shape[0]) if transpose else shape
    return torch.sparse_coo_tensor(indices, value.float(), size, check_invariants=False).coalesce()


def int8_matmul(
    a: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    outlier_index: torch.Tensor,
    outlier_value: torch.Tensor,
    group_size: Optional[int],
    transpose_weight: bool,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``a Wᵀ`` (``transpose_weight``) or ``a W`` for ``a`` of shape ``(..., K)``, in ``a``'s dtype (written into
    ``out``, ``(tokens, N)``, when given)."""
    out_features, in_features = codes.shape
    a2 = a.reshape(-1, a.shape[-1])  # (tokens, K)
    m = a2.shape[0]
    n = out_features if transpose_weight else in_features
    if out is None:
        out = torch.empty((m, n), dtype=a.dtype, device=a.device)
    if m == 0:
        return out.reshape(*a.shape[:-1], n)
    add = None
    if outlier_index.numel():
        # outliers: out += a Sᵀ (or a S), computed as (S aᵀ)ᵀ in float32; S holds the k outliers, sparse
        sparse = _outlier_matrix(outlier_index, outlier_value, (out_features, in_features), not transpose_weight)
        add = torch.sparse.mm(sparse, a2.T.float()).T  # (tokens, n), strides (1, tokens)
    bm, bn, bk, warps, stages = _matmul_blocks(a2)
    dot_fp32, precision = _dot_mode(a2)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _dequant_matmul_kernel[grid](
        a2, codes, scale, out if add is None else add, out,
        m, n, a2.shape[1], in_features, scale.shape[1], group_size or in_features,
        a2.stride(0), a2.stride(1), *(add.stride() if add is not None else (0, 0)), out.stride(0), out.stride(1),
        TRANS_W=transpose_weight, ROW_SCALE=group_size is None, HAS_ADD=add is not None, DOT_FP32=dot_fp32,
        PRECISION=precision, BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages,
    )
    return out.reshape(*a.shape[:-1], n)


@triton.jit
def _lion_kernel(
    grad_ptr, x_ptr, codes_ptr, scale_ptr, mcodes_ptr, mabsmax_ptr, row_ptr, oindex_ptr, ovalue_ptr,
    T, OUT, IN, groups, group_size, search_steps,
    stride_gt, stride_gn, stride_xt, stride_xk,
    lr, beta1, one_minus_beta1, beta2, one_minus_beta2, weight_decay, seed,
    BLOCK: tl.constexpr, ROW_SCALE: tl.constexpr, HAS_OUTLIERS: tl.constexpr, STOCHASTIC: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
):
    """One ``(BN, BK)`` tile of ``G = gradᵀ x`` in registers, then :func:`lion_step_` on that tile, in place."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    rt = tl.arange(0, BT)
    g = tl.zeros((BN, BK), dtype=tl.float32)
    for t0 in range(0, T, BT):
        tt = t0 + rt
        go = tl.load(grad_ptr + tt[:, None].to(tl.int64) * stride_gt + rn[None, :] * stride_gn,
                     mask=(tt[:, None] < T) & (rn[None, :] < OUT), other=0.0)  # (BT, BN)
        xs = tl.load(x_ptr + tt[:, None].to(tl.int64) * stride_xt + rk[None, :] * stride_xk,
                     mask=(tt[:, None] < T) & (rk[None, :] < IN), other=0.0)  # (BT, BK)
        if DOT_FP32:
            g = tl.dot(tl.trans(go.to(tl.float32)), xs.to(tl.float32), g, input_precision=PRECISION)
        else:
            g = tl.dot(tl.trans(go), xs.to(go.dtype), g)

    mask = (rn[:, None] < OUT) & (rk[None, :] < IN)
    flat = rn[:, None].to(tl.int64) * IN + rk[None, :]  # (BN, BK) flat indices into the weight
    q = tl.load(codes_ptr + flat, mask=mask, other=0).to(tl.float32)
    if ROW_SCALE:  # one scale per row: (BN, 1)
        s = tl.load(scale_ptr + rn[:, None], mask=rn[:, None] < OUT, other=1.0)
    else:
        s = tl.load(scale_ptr + rn[:, None].to(tl.int64) * groups + rk[None, :] // group_size, mask=mask, other=1.0)
    w = q * s
    absmax = tl.load(mabsmax_ptr + flat // BLOCK, mask=mask, other=0.0)
    m = tl.load(mcodes_ptr + flat, mask=mask, other=0).to(tl.float32) * (absmax / QMAX_F)
    if HAS_OUTLIERS:
        # lower bound of each element's flat index among its row's sorted outlier indices [start, end)
        row_start = tl.load(row_ptr + rn, mask=rn < OUT, other=0)
        row_end = tl.load(row_ptr + rn + 1, mask=rn < OUT, other=0)
        lo = tl.zeros((BN, BK), dtype=tl.int64) + row_start[:, None]
        hi = tl.zeros((BN, BK), dtype=tl.int64) + row_end[:, None]
        for _ in range(search_steps):
            active = mask & (lo < hi)
            mid = (lo + hi) // 2
            below = tl.load(oindex_ptr + mid, mask=active, other=0).to(tl.int64) < flat
            lo = tl.where(active & below, mid + 1, lo)
            hi = tl.where(active & ~below, mid, hi)
        found = mask & (lo < row_end[:, None])
        outlier = found & (tl.load(oindex_ptr + lo, mask=found, other=-1).to(tl.int64) == flat)
        outlier_w = tl.load(ovalue_ptr + lo, mask=outlier, other=0.0)
        w = tl.where(outlier, outlier_w, w)  # weight decay sees the outliers' float values

    c = m * beta1 + g * one_minus_beta1
    step = (c > 0).to(tl.float32) - (c < 0).to(tl.float32)  # sign(c), 0 at 0 as torch.sign
    step = (step + w * weight_decay) * (-lr)  # Lion's step, in weight units
    if HAS_OUTLIERS:
        tl.store(ovalue_ptr + lo, outlier_w + step, mask=outlier)
        step = tl.where(outlier, 0.0, step)  # outlier positions keep code 0
    new_q = _round_to_int8(step / s + q, seed, flat, STOCHASTIC)
    tl.store(codes_ptr + flat, new_q.to(tl.int8), mask=mask)

    m = tl.where(mask, m * beta2 + g * one_minus_beta2, 0.0)
    blocks = tl.reshape(m, (BN, BK // BLOCK, BLOCK))  # each momentum block inside one row of the tile
    new_absmax = tl.max(tl.abs(blocks), axis=2)  # (BN, BK // BLOCK)
    safe = tl.where(new_absmax > 0, new_absmax, 1.0)
    mq = _round_to_int8(blocks / safe[:, :, None] * QMAX_F, seed, flat, False)
    tl.store(mcodes_ptr + flat, tl.reshape(mq, (BN, BK)).to(tl.int8), mask=mask)
    rb = tl.arange(0, BK // BLOCK)
    block_col = tl.program_id(1) * (BK // BLOCK) + rb
    tl.store(mabsmax_ptr + rn[:, None].to(tl.int64) * (IN // BLOCK) + block_col[None, :], new_absmax,
             mask=(rn[:, None] < OUT) & (block_col[None, :] < IN // BLOCK))


MAX_BLOCK = 256  # widest momentum block the fused kernel holds: a tile is at least 16 rows of whole blocks


def fits(in_features: int, block_size: int) -> bool:
    """Whether the fused kernel can hold whole momentum blocks in its tiles: ``block_size`` a power of two up to
    :data:`MAX_BLOCK` dividing ``in_features`` (so no block crosses a row)."""
    return block_size <= MAX_BLOCK and block_size & (block_size - 1) == 0 and in_features % block_size == 0


def _lion_blocks(block_size: int) -> tuple[int, int, int, int, int]:
    """(BN, BK, BT, num_warps, num_stages): the tile width a multiple of the momentum block; 16 tile values per thread,
    since the epilogue holds several tensors of the tile's shape: more spill registers (tests/compile_kernels.py)."""
    bk = max(64, block_size)
    if interpreting():
        return 32, bk, 32, 4, 1
    bn = 32 if bk == 64 else 16
    return bn, bk, 32, bn * bk // (16 * 32), 3


def lion_step_from_activations_(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    outlier_index: torch.Tensor,
    outlier_value: torch.Tensor,
    momentum_codes: torch.Tensor,
    momentum_absmax: torch.Tensor,
    hyper: LionHyper,
    group_size: Optional[int],
    block_size: int,
    stochastic: bool,
    seed: int,
) -> None:
    """Lion on the int8 state from ``grad_output (tokens, out)`` and ``x (tokens, in)``, in place (see module doc)."""
    out_features, in_features = codes.shape
    has_outliers = outlier_index.numel() > 0
    row_ptr = index = value = codes  # placeholders the kernel never reads when there are no outliers
    if has_outliers:
        boundaries = torch.arange(out_features + 1, device=codes.device, dtype=torch.int64) * in_features
        row_ptr = torch.searchsorted(outlier_index, boundaries.to(outlier_index.dtype))  # (out + 1,) per-row ranges
        index, value = outlier_index, outlier_value
    bn, bk, bt, warps, stages = _lion_blocks(block_size)
    dot_fp32, precision = _dot_mode(grad_output, x)
    grid = (triton.cdiv(out_features, bn), triton.cdiv(in_features, bk))
    _lion_kernel[grid](
        grad_output, x, codes, scale, momentum_codes, momentum_absmax, row_ptr, index, value,
        grad_output.shape[0], out_features, in_features, scale.shape[1], group_size or in_features,
        max(1, math.ceil(math.log2(in_features + 1))),
        grad_output.stride(0), grad_output.stride(1), x.stride(0), x.stride(1),
        hyper.lr, hyper.beta1, 1 - hyper.beta1, hyper.beta2, 1 - hyper.beta2, hyper.weight_decay, seed,
        BLOCK=block_size, ROW_SCALE=group_size is None, HAS_OUTLIERS=has_outliers, STOCHASTIC=stochastic,
        DOT_FP32=dot_fp32, PRECISION=precision, BN=bn, BK=bk, BT=bt, num_warps=warps, num_stages=stages,
    )
