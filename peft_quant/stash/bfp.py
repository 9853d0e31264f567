"""Block floating point: blocks of values sharing one scale, with k-bit integer mantissas.

A tensor is flattened and cut into blocks of ``block_size`` values (a power of two, 16 to 64). Each block stores
one shared scale and per value a signed ``k``-bit mantissa ``q ∈ [-(2^(k-1) - 1), 2^(k-1) - 1]`` (``k`` from 2 to
8), so ``x ≈ q · s``. Mantissas are bit-packed: ``k`` bits per value, exactly. Two scale formats, and ``"auto"``
(the default), which takes ``"e8m0"`` at 8 bits (MXINT8) and ``"bf16"`` below:

* ``"bf16"``: ``s = absmax / (2^(k-1) - 1)`` rounded to bfloat16 (16 bits per block), so the block's
  largest value uses the whole code range. At 4 bits and blocks of 32: 4.5 bits per value, at most 7.1× smaller
  than float32.
* ``"e8m0"``: ``s = 2^e``, one int8 exponent per block (OCP Microscaling's E8M0 scale), ``e`` the smallest
  exponent for which the block's absmax fits; with ``k = 8`` and blocks of 32 this is MXINT8, and MXINT-k
  generalizes it to fewer bits. A power of two leaves the block's largest value between half and all of the code
  range, so it costs up to one bit of precision: measured in ``bench/stash.py``, 4-bit training loses ~1.5–2× more
  than with ``"bf16"``, while at 8 bits the lost bit is of no consequence and the 8-bit scale saves 6% of memory.

Outliers: values a block cannot hold exactly or safely — non-finite values (±inf, NaN) and magnitudes of at least
half the largest finite float32 or the tensor's dtype (attention-mask fill values such as ``torch.finfo(dtype).min``,
or activations about to overflow, whose scaled codes could round past the largest finite value) — are kept aside
exactly with their flat index (``PackedBlocks.outlier_index`` / ``outlier_values``) and count as zero in their block, so
they round-trip bit for bit and never touch their neighbours' scale. Without this, one ``-inf`` made its block's
scale infinite and its finite neighbours ``0 · inf = NaN``. The side table costs 8 bytes plus the value per
outlier; :class:`peft_quant.stash.packer.StashPacker` keeps tensors holding any outlier unpacked altogether.

Error bound: round-to-nearest errs by at most half a step ``s/2`` per value; stochastic rounding by less than one
step, unbiased. Relative to the block's absmax ``a``, a step is ``a / (2^(k-1) - 1)`` for ``"bf16"`` (to within
bfloat16's rounding of ``s``, 2⁻⁸) and below ``2a / (2^(k-1) - 1)`` for ``"e8m0"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

MIN_BITS, MAX_BITS = 2, 8
BLOCK_SIZES = (16, 32, 64)
SCALE_FORMATS = ("auto", "bf16", "e8m0")


def check_format(bits: int, block_size: int, scale: str = "auto") -> str:
    """Raise a clear error for an unsupported format; return the scale format in force (``"auto"`` resolved)."""
    if not isinstance(bits, int) or not (MIN_BITS <= bits <= MAX_BITS or bits == 16):
        raise ValueError(
            f"StashQuant bits must be an integer from {MIN_BITS} to {MAX_BITS}, or 16 (stored unchanged), got "
            f"{bits!r}. Fix: e.g. bits=4 (8 for a near-lossless stash)."
        )
    if block_size not in BLOCK_SIZES:
        raise ValueError(
            f"StashQuant block_size must be a power of two in {BLOCK_SIZES} (values sharing one exponent), got "
            f"{block_size!r}. Fix: block_size=32 (the default)."
        )
    if scale not in SCALE_FORMATS:
        raise ValueError(
            f"StashQuant scale must be one of {SCALE_FORMATS} (a bfloat16 scale or a power-of-two exponent per block; "
            f"auto: the exponent at 8 bits, bfloat16 below), got {scale!r}. Fix: scale='auto'."
        )
    if scale == "auto":
        return "e8m0" if bits == MAX_BITS else "bf16"
    return scale


@dataclass
class PackedBlocks:
    """A tensor in block floating point: bit-packed mantissas, one scale per block, and how to restore it."""

    mantissas: torch.Tensor  # uint8, bits·numel/8 bytes (padded to whole blocks)
    scales: torch.Tensor  # one per block: bfloat16 scales ("bf16") or int8 exponents ("e8m0")
    bits: int
    block_size: int
    shape: torch.Size
    dtype: torch.dtype
    outlier_index: Optional[torch.Tensor] = None  # int64 flat indices of the values kept exactly (None: none)
    outlier_values: Optional[torch.Tensor] = None  # those values, in ``dtype``

    @property
    def outliers(self) -> int:
        """How many values are kept exactly beside the blocks."""
        return 0 if self.outlier_index is None else self.outlier_index.numel()

    @property
    def nbytes(self) -> int:
        size = self.mantissas.numel() + self.scales.numel() * self.scales.element_size()
        if self.outlier_index is not None:
            size += self.outlier_index.numel() * 8 + self.outlier_values.numel() * self.outlier_values.element_size()
        return size


def outlier_limit(dtype: torch.dtype) -> float:
    """Magnitudes from this one up are outliers (see the module docstring): half the largest finite value of
    ``dtype`` or float32 (the blocks compute in float32), whichever is smaller. Below it, a block's scale and every
    decoded value stay finite in both scale formats (a bf16 scale rounds up by at most 2⁻⁸, an e8m0 one by below 2×)."""
    return min(torch.finfo(dtype).max, torch.finfo(torch.float32).max) / 2


def find_outliers(flat: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The flat indices (int64) and values of ``flat``'s (1-D) outliers, or ``(None, None)`` when it has none.
    Costs one elementwise pass and, on CUDA, one device synchronization."""
    outlier = ~(flat.abs() < outlier_limit(flat.dtype))  # ±inf, NaN and mask fill values
    if not bool(outlier.any()):
        return None, None
    index = outlier.nonzero().view(-1)
    return index, flat[index]


def restore_outliers(out: torch.Tensor, packed: PackedBlocks) -> torch.Tensor:
    """Write ``packed``'s outliers back into ``out`` (its unpacked contiguous tensor), in place; returns ``out``."""
    if packed.outlier_index is not None:
        out.view(-1)[packed.outlier_index] = packed.outlier_values
    return out


def _pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``(n,)`` uint8 codes below ``2^bits`` (n a multiple of 8) → ``(n·bits/8,)`` bytes (code ``i``'s bit ``j`` at
    bit ``i·bits + j`` of the stream, least significant first). Widths dividing 8 take a shift-or fast path that
    writes the same bytes."""
    if bits == 8:
        return codes.clone()
    if 8 % bits == 0:
        per_byte = 8 // bits
        lanes = codes.view(-1, per_byte)
        out = lanes[:, 0].clone()
        for lane in range(1, per_byte):
            out |= lanes[:, lane] << (lane * bits)
        return out
    shifts = torch.arange(bits, device=codes.device, dtype=torch.uint8)
    planes = (codes.view(-1, 8, 1) >> shifts) & 1  # (groups, 8 codes, bits)
    stream = planes.reshape(-1, 8 * bits // 8, 8)  # (groups, bits bytes, 8 bits)
    weights = (1 << torch.arange(8, device=codes.device, dtype=torch.int32)).to(torch.uint8)
    return (stream * weights).sum(dim=-1, dtype=torch.uint8).reshape(-1)


def _unpack_bits(stream: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`_pack_bits`."""
    if bits == 8:
        return stream.clone()
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, device=stream.device, dtype=torch.uint8)  # one per code in a byte
        return ((stream.view(-1, 1) >> shifts) & (2**bits - 1)).reshape(-1)  # (bytes, 8 / bits) → codes
    shifts = torch.arange(8, device=stream.device, dtype=torch.uint8)
    planes = ((stream.view(-1, bits, 1) >> shifts) & 1).reshape(-1, 8, bits)  # (groups, 8 codes, bits)
    weights = (1 << torch.arange(bits, device=stream.device, dtype=torch.int32)).to(torch.uint8)
    return (planes * weights).sum(dim=-1, dtype=torch.uint8).reshape(-1)


def encode_scales(absmax: torch.Tensor, bits: int, scale: str) -> torch.Tensor:
    """Per-block scales in their stored dtype, from the blocks' absmax (float32): see the module docstring."""
    qmax = 2 ** (bits - 1) - 1
    if scale == "e8m0":  # smallest e with absmax / 2^e ≤ qmax; all-zero blocks get the smallest exponent
        return torch.ceil(torch.log2(absmax.clamp_min(2.0**-126) / qmax)).clamp(-127, 127).to(torch.int8)
    return torch.where(absmax > 0, absmax / qmax, 1.0).to(torch.bfloat16)  # all-zero blocks: any nonzero scale


def decode_scales(stored: torch.Tensor) -> torch.Tensor:
    """Stored per-block scales (bfloat16 values or int8 exponents) → float32 steps ``s``."""
    if stored.dtype == torch.int8:
        return torch.exp2(stored.to(torch.float32))
    return stored.to(torch.float32)


def pack(
    x: torch.Tensor, bits: int, block_size: int = 32, stochastic: bool = False,
    generator: Optional[torch.Generator] = None, scale: str = "auto",
) -> PackedBlocks:
    """Compress a floating tensor to block floating point (outliers kept exactly beside the blocks)."""
    scale = check_format(bits, block_size, scale)
    flat = x.detach().reshape(-1)
    outlier_index, outlier_values = find_outliers(flat)
    if outlier_index is not None:  # outliers count as zeros in their blocks
        flat = flat.index_fill(0, outlier_index, 0.0)
    flat = flat.to(torch.float32)
    blocks = F.pad(flat, (0, (-flat.numel()) % block_size)).view(-1, block_size)  # (blocks, block_size)
    qmax = 2 ** (bits - 1) - 1
    scales = encode_scales(blocks.abs().amax(dim=1), bits, scale)
    scaled = blocks / decode_scales(scales)[:, None]
    if stochastic:
        scaled = torch.floor(scaled + torch.rand(scaled.shape, generator=generator, device=scaled.device))
    else:
        scaled = torch.round(scaled)
    codes = (scaled.clamp(-qmax, qmax) + qmax).to(torch.uint8).reshape(-1)  # offset to [0, 2·qmax]
    return PackedBlocks(_pack_bits(codes, bits), scales, bits, block_size, x.shape, x.dtype, outlier_index,
                        outlier_values)


def unpack(packed: PackedBlocks) -> torch.Tensor:
    """Restore a tensor (contiguous, original shape and dtype) from block floating point."""
    qmax = 2 ** (packed.bits - 1) - 1
    codes = _unpack_bits(packed.mantissas, packed.bits).to(torch.float32) - qmax
    blocks = codes.view(-1, packed.block_size) * decode_scales(packed.scales)[:, None]
    numel = packed.shape.numel()
    return restore_outliers(blocks.reshape(-1)[:numel].reshape(packed.shape).to(packed.dtype), packed)
