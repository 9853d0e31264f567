"""Triton kernels for TimestepScale: per-sample expert scaling of channels, and peft-quant's int4/int8 linear layer
with that scaling fused in.

* ``scale``: ``y = (x − b) ⊙ table[k(sample)] + b`` (``b`` optional). ``x`` is seen as ``units`` slabs of
  ``length`` positions × ``C`` channels with arbitrary (position, channel) strides, so one kernel serves Linear inputs
  (channels last), Conv2d inputs (channels at dim 1, or torch's channels_last memory format) and the single-expert
  case (all samples one unit group). Backward reads ``x`` and ``g`` once, writes ``grad_x = g ⊙ table[k]`` and
  per-chunk partial sums of ``g ⊙ (x − b)``; a ``sum`` and a masked sum per expert reduce them (deterministic, no
  atomics).
* ``int_linear``: ``y = s_out[k] ⊙ (W (s_in[k] ⊙ x)) + b`` with ``W = scale ⊙ (q − zero)`` (per output channel).
  Tiles of the integer codes become ``q − zero`` in registers (exact in fp16/bf16: |q − zero| ≤ 255), the input tile
  is scaled by its rows' ``s_in``, the weight scale, ``s_out`` and the bias are applied to the accumulator. Backward
  (:class:`IntLinearScaled`) is the reference decomposition: the weight dequantized once, one matmul, and the scaling
  kernel's backward for the two scale tables.

Intermediate values are rounded to the input's dtype where the reference (:mod:`.timestep_scale`) rounds them, so in
fp16/bf16 the kernels differ from it only by the matmul's accumulation order. The entry points are in
:mod:`.timestep_scale`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import triton
import triton.language as tl

from .backend import interpreting

TILE = 4096  # elements per tile of the scaling kernel
TARGET_PROGRAMS = 1024  # backward of the scaling: about one wave of programs on a large GPU, each reducing a chunk
# float32 matmuls: three tf32 products (≈ float32 accuracy) on tensor cores; fp16/bf16 take Triton's default.
MATMUL_PRECISION = {torch.float32: "tf32x3", torch.float16: "tf32", torch.bfloat16: "tf32"}

Experts = tuple[torch.Tensor, Optional[int]]


# ---- per-sample expert scaling ---------------------------------------------------------------------------------------


@triton.jit
def _scale_kernel(x_ptr, g_ptr, table_ptr, index_ptr, bias_ptr, out_ptr, partial_ptr, C, length, pos_stride,
                  ch_stride, units_per_sample, n_chunks, chunk, HAS_BIAS: tl.constexpr, BACKWARD: tl.constexpr,
                  GRAD_X: tl.constexpr, GRAD_TABLE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """One (unit, chunk of positions, channel block). Forward: ``out = x ⊙ s + b ⊙ (1 − s)``. Backward:
    ``out = g ⊙ s`` and ``partial[program] = Σ_chunk g ⊙ (x − b)`` per channel."""
    pid = tl.program_id(0)
    unit = pid // n_chunks
    start = (pid % n_chunks) * chunk
    dtype = x_ptr.dtype.element_ty
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    expert = tl.load(index_ptr + unit // units_per_sample)
    s = tl.load(table_ptr + expert * C + c, mask=c_mask, other=0.0).to(dtype).to(tl.float32)[None, :]
    if HAS_BIAS:
        b = tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(dtype).to(tl.float32)[None, :]
    base = unit.to(tl.int64) * C * length
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for p0 in range(start, tl.minimum(start + chunk, length), BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        offsets = base + p[:, None] * pos_stride + c[None, :] * ch_stride  # (BLOCK_P, BLOCK_C)
        mask = (p[:, None] < length) & c_mask[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            if HAS_BIAS:
                x = (x - b).to(dtype).to(tl.float32)
            g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            if GRAD_X:
                tl.store(out_ptr + offsets, (g * s).to(dtype), mask=mask)
            if GRAD_TABLE:
                acc += tl.sum(g * x, axis=0)
        else:
            y = x * s
            if HAS_BIAS:  # each product rounded to the dtype, as the reference's ops do
                y = y.to(dtype).to(tl.float32) + (b * (1.0 - s).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
            tl.store(out_ptr + offsets, y.to(dtype), mask=mask)
    if GRAD_TABLE:
        tl.store(partial_ptr + pid * C + c, acc, mask=c_mask)


class _Layout:
    """``x`` (as a tensor with unit stride somewhere) as ``units × length × C`` with position and channel strides.

    ``units`` are consecutive in memory, ``units_per_sample`` of them share one entry of the expert index."""

    def __init__(self, x: torch.Tensor, channel_dim: int, per_sample: bool) -> None:
        batch = x.shape[0]
        if channel_dim == 1 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            self.x = x  # (B, C, H, W) stored as (B, H, W, C): channels last in memory
            self.channels, self.length = x.shape[1], x[0, 0].numel()
            self.strides = (self.channels, 1)
            self.units, self.units_per_sample = batch, 1
        elif channel_dim == 1:
            self.x = x.contiguous()  # (B, C, H, W)
            self.channels, self.length = x.shape[1], x[0, 0].numel()
            self.strides = (1, self.length)
            self.units, self.units_per_sample = batch, 1
        else:
            self.x = x.contiguous()  # (..., C): one unit per sample, or one for all
            self.channels = x.shape[-1]
            self.units, self.units_per_sample = (batch if per_sample else 1), 1
            self.length = x.numel() // max(1, self.channels * self.units)
            self.strides = (self.channels, 1)
        if not per_sample:  # one expert: every unit reads index[0]
            self.units_per_sample = self.units

    @property
    def samples(self) -> int:
        return self.units // self.units_per_sample

    def blocks(self) -> tuple[int, int]:
        """``(BLOCK_P, BLOCK_C)``: up to 256 along the contiguous axis, ``TILE`` elements per tile."""
        if self.strides[1] == 1:
            block_c = min(256, triton.next_power_of_2(self.channels))
            return min(TILE // block_c, triton.next_power_of_2(self.length)), block_c
        block_p = min(256, triton.next_power_of_2(self.length))
        return block_p, min(TILE // block_p, triton.next_power_of_2(self.channels))

    def like(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (same shape as ``x``) with ``x``'s strides."""
        return t if t.stride() == self.x.stride() else torch.empty_like(self.x).copy_(t)


def _launch_scale(layout: _Layout, table: torch.Tensor, index: torch.Tensor, bias: Optional[torch.Tensor],
                  out: Optional[torch.Tensor], g: Optional[torch.Tensor], grad_table: bool, chunks: Optional[int],
                  blocks: Optional[tuple[int, int]]) -> Optional[torch.Tensor]:
    """Run :func:`_scale_kernel`; returns the partial sums ``(programs along dim 0, C)`` when ``grad_table``."""
    block_p, block_c = blocks or layout.blocks()
    c_blocks = triton.cdiv(layout.channels, block_c)
    tiles = triton.cdiv(layout.length, block_p)
    if g is None:
        chunks = tiles
    else:
        chunks = max(1, min(chunks or triton.cdiv(TARGET_PROGRAMS, layout.units * c_blocks), tiles))
    chunk = triton.cdiv(tiles, chunks) * block_p
    chunks = triton.cdiv(layout.length, chunk)
    partial = None
    if grad_table:
        partial = torch.empty(layout.units * chunks, layout.channels, dtype=torch.float32, device=table.device)
    x = layout.x
    _scale_kernel[(layout.units * chunks, c_blocks)](
        x, x if g is None else g, table.contiguous(), index, x if bias is None else bias,
        x if out is None else out, x if partial is None else partial, layout.channels, layout.length,
        *layout.strides, layout.units_per_sample, chunks, chunk, bias is not None, g is not None, out is not None,
        grad_table, block_p, block_c,
    )
    return partial


def _sum_by_expert(partial: torch.Tensor, index: torch.Tensor, samples: int, num_experts: int) -> torch.Tensor:
    """``(K, C)``: the partial sums ``(samples · chunks, C)`` added up per sample, then per expert (no atomics)."""
    per_sample = partial.view(samples, -1, partial.shape[-1]).sum(1)  # (samples, C)
    routed = index[:samples] == torch.arange(num_experts, device=index.device)[:, None]  # (K, samples)
    return torch.where(routed[..., None], per_sample, 0.0).sum(1)


def scale_forward(x: torch.Tensor, table: torch.Tensor, experts: Experts, channel_dim: int,
                  bias: Optional[torch.Tensor] = None, blocks: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """``(x − b) ⊙ table[k] + b`` (``b`` optional) along ``channel_dim`` (``-1``, or ``1`` of a 4-D tensor)."""
    index, single = experts
    layout = _Layout(x, channel_dim, single is None)
    out = torch.empty_like(layout.x)
    if x.numel():
        _launch_scale(layout, table, index, bias, out, None, False, None, blocks)
    return out


def scale_backward(x: torch.Tensor, g: torch.Tensor, table: torch.Tensor, experts: Experts, channel_dim: int,
                   bias: Optional[torch.Tensor], grad_x: bool, grad_table: bool, chunks: Optional[int] = None,
                   blocks: Optional[tuple[int, int]] = None) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of :func:`scale_forward` for ``x`` (in ``x``'s dtype) and ``table`` (in its dtype), each only when
    asked. ``chunks`` (position chunks reduced separately) and ``blocks`` override the defaults (tests)."""
    index, single = experts
    layout = _Layout(x, channel_dim, single is None)
    dx = torch.empty_like(layout.x) if grad_x else None
    dtable = torch.zeros_like(table) if grad_table else None
    if x.numel() and (grad_x or grad_table):
        partial = _launch_scale(layout, table, index, bias, dx, layout.like(g), grad_table, chunks, blocks)
        if grad_table:
            dtable = _sum_by_expert(partial, index, layout.samples, table.shape[0]).to(table.dtype)
    return dx, dtable


class ScaleChannels(torch.autograd.Function):
    """:func:`scale_forward` with its one-pass backward; saves ``x`` (for the table's gradient) and the table. The
    bias gets no gradient (the base layer's bias is frozen; the entry point uses the reference otherwise)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, table: torch.Tensor, index: torch.Tensor, single: Optional[int],
                channel_dim: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, table, index, bias)
        ctx.single, ctx.channel_dim = single, channel_dim
        return scale_forward(x, table, (index, single), channel_dim, bias)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        x, table, index, bias = ctx.saved_tensors
        grad_x, grad_table = ctx.needs_input_grad[:2]
        dx, dtable = scale_backward(g if x is None else x, g, table, (index, ctx.single), ctx.channel_dim, bias,
                                    grad_x, grad_table)
        return dx, dtable, None, None, None, None


# ---- dequantize-matmul of an int4/int8 linear layer, with the scaling fused --------------------------------------


@triton.jit
def _int_linear_kernel(x_ptr, q_ptr, w_scale_ptr, zero_ptr, bias_ptr, table_in_ptr, table_out_ptr, index_ptr, y_ptr,
                       z_ptr, M, N, K, rows_per_sample, q_stride, BITS: tl.constexpr, HAS_S_IN: tl.constexpr,
                       HAS_S_OUT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_Z: tl.constexpr,
                       PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) tile of ``y = s_out ⊙ (scale ⊙ ((s_in ⊙ x) (q − zero)ᵀ)) + b``; ``z`` is the value
    before ``s_out`` and ``b`` (stored for the gradient of ``s_out``)."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * grid_n)  # GROUP_M row tiles sweep the columns together (weight tiles stay in L2)
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % size_m
    pid_n = (pid % (GROUP_M * grid_n)) // size_m
    dtype = x_ptr.dtype.element_ty
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    rows = rm.to(tl.int64)[:, None]
    if HAS_S_IN or HAS_S_OUT:
        expert = tl.load(index_ptr + rm // rows_per_sample, mask=m_mask, other=0)[:, None]
    zero = tl.load(zero_ptr + rn, mask=n_mask, other=0.0)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        a_mask = m_mask[:, None] & k_mask[None, :]
        a = tl.load(x_ptr + rows * K + rk[None, :], mask=a_mask, other=0.0)  # (BLOCK_M, BLOCK_K)
        if HAS_S_IN:
            s = tl.load(table_in_ptr + expert * K + rk[None, :], mask=a_mask, other=0.0).to(dtype)
            a = (a.to(tl.float32) * s.to(tl.float32)).to(dtype)
        w_mask = k_mask[:, None] & n_mask[None, :]
        if BITS == 8:
            q = tl.load(q_ptr + rn[None, :] * q_stride + rk[:, None], mask=w_mask, other=0).to(tl.int32)
        else:  # two codes per byte, low nibble first
            byte = tl.load(q_ptr + rn[None, :] * q_stride + rk[:, None] // 2, mask=w_mask, other=0).to(tl.int32)
            q = (byte >> ((rk[:, None] % 2) * 4)) & 0xF
        w = (q.to(tl.float32) - zero).to(dtype)  # (BLOCK_K, BLOCK_N) of Wᵀ / scale, exact
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    y = acc * tl.load(w_scale_ptr + rn, mask=n_mask, other=0.0)[None, :]
    offsets = rows * N + rn[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if STORE_Z:
        tl.store(z_ptr + offsets, y.to(dtype), mask=mask)
    if HAS_S_OUT:
        s = tl.load(table_out_ptr + expert * N + rn[None, :], mask=mask, other=0.0).to(dtype).to(tl.float32)
        y = y.to(dtype).to(tl.float32) * s
    if HAS_BIAS:
        y = y.to(dtype).to(tl.float32) + tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(dtype).to(tl.float32)
    tl.store(y_ptr + offsets, y.to(dtype), mask=mask)


def _matmul_config(m: int, dtype: torch.dtype) -> dict[str, int]:
    """Tile sizes and launch settings for :func:`_int_linear_kernel`: 16s under the interpreter (a tile is numpy
    work); on GPUs tiles that ptxas compiles without register spills and within the 99 KiB of shared memory of
    sm_86/sm_89 GPUs (tests/compile_kernels.py): 64 × 64 for float32 (three tf32 products), 128 × 128 for halves,
    fewer rows when there are few tokens."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=1)
    rows = max(16, triton.next_power_of_2(m))
    if dtype == torch.float32:
        return dict(BLOCK_M=min(64, rows), BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)
    block_m = min(128, rows)
    return dict(BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8 if block_m == 128 else 4,
                num_stages=3)


def int_linear_forward(x: torch.Tensor, layer: Any, bias: Optional[torch.Tensor] = None,
                       table_in: Optional[torch.Tensor] = None, table_out: Optional[torch.Tensor] = None,
                       experts: Optional[Experts] = None, store_z: bool = False,
                       config: Optional[dict[str, int]] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(y, z)``: ``y = s_out[k] ⊙ (W (s_in[k] ⊙ x)) + b`` for an :class:`~peft_quant.int_quant.IntLinear` ``layer``
    (``x`` (..., in) → (..., out), in ``x``'s dtype), and ``z = W (s_in[k] ⊙ x)`` when ``store_z``."""
    k, n = layer.in_features, layer.out_features
    x2 = x.reshape(-1, k).contiguous()  # (M, in)
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    z = torch.empty_like(y) if store_z else None
    index, single = experts if experts is not None else (None, None)
    rows_per_sample = m if single is not None or index is None else max(1, m // index.shape[0])
    config = config or _matmul_config(m, x.dtype)
    qweight = layer.qweight.contiguous()  # (out, in) bytes, or (out, ⌈in/2⌉) for 4 bits
    grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
    if m:
        _int_linear_kernel[grid](
            x2, qweight, layer.scale, layer.zero, x2 if bias is None else bias,
            x2 if table_in is None else table_in.contiguous(), x2 if table_out is None else table_out.contiguous(),
            x2 if index is None else index, y, x2 if z is None else z, m, n, k, rows_per_sample,
            qweight.stride(0), layer.bits, table_in is not None, table_out is not None, bias is not None,
            store_z, MATMUL_PRECISION[x.dtype], **config,
        )
    shape = (*x.shape[:-1], n)
    return y.view(shape), None if z is None else z.view(shape)


class IntLinearScaled(torch.autograd.Function):
    """:func:`int_linear_forward` with the reference decomposition as backward: the weight dequantized once, one
    matmul for the input gradient, the scaling kernel's backward for ``s_out`` (from the saved ``z``) and ``s_in``
    (from the saved ``x``). Saves ``x`` only when ``s_in`` needs a gradient and ``z`` only when ``s_out`` does; the
    bias gets no gradient (frozen)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, table_in: Optional[torch.Tensor], table_out: Optional[torch.Tensor],
                index: Optional[torch.Tensor], single: Optional[int], layer: Any,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
        experts = None if index is None else (index, single)
        need_z = table_out is not None and ctx.needs_input_grad[2]
        y, z = int_linear_forward(x, layer, bias, table_in, table_out, experts, store_z=need_z)
        ctx.save_for_backward(x if table_in is not None and ctx.needs_input_grad[1] else None, z, table_in,
                              table_out, index)
        ctx.single, ctx.layer = single, layer
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        x, z, table_in, table_out, index = ctx.saved_tensors
        experts = (index, ctx.single)
        layer = ctx.layer
        need_x, need_in, need_out = ctx.needs_input_grad[:3]
        g2 = g.reshape(-1, layer.out_features)  # (M, out)
        d_in = d_out = dx = None
        grad_z = g2
        if table_out is not None and (need_x or need_in or need_out):
            rows = z.view(-1, layer.out_features) if z is not None else g2
            grad_z, d_out = scale_backward(_per_sample_rows(rows, experts), _per_sample_rows(g2, experts), table_out,
                                           experts, -1, None, need_x or need_in, need_out)
            grad_z = None if grad_z is None else grad_z.view(g2.shape)
        if need_x or need_in:
            grad_u = grad_z @ layer.dequantize(grad_z.dtype)  # (M, in)
            if table_in is None:
                dx = grad_u
            else:
                rows = x.reshape(grad_u.shape) if x is not None else grad_u
                dx, d_in = scale_backward(_per_sample_rows(rows, experts), _per_sample_rows(grad_u, experts),
                                          table_in, experts, -1, None, need_x, need_in)
            dx = None if dx is None else dx.reshape(g.shape[:-1] + (layer.in_features,))
        return dx, d_in, d_out, None, None, None, None


def _per_sample_rows(rows: torch.Tensor, experts: Experts) -> torch.Tensor:
    """``(M, C)`` rows as ``(samples, M / samples, C)``, the batch-first shape the scaling kernel routes by."""
    index, single = experts
    samples = 1 if single is not None else index.shape[0]
    return rows.view(samples, -1, rows.shape[-1])
