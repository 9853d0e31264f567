"""Block floating point: blocks of values sharing one power-of-two scale, with k-bit integer mantissas.

A tensor is flattened and cut into blocks of ``block_size`` values (a power of two, 16 to 64). Each block stores
one shared exponent ``e`` (int8, as OCP Microscaling's E8M0 scale) and per value a signed ``k``-bit mantissa
``q ∈ [-(2^(k-1) - 1), 2^(k-1) - 1]`` (``k`` from 2 to 8), so ``x ≈ q · 2^e`` with ``e`` the smallest exponent
for which the block's absmax fits. Mantissas are bit-packed: ``k`` bits per value, exactly. With ``k = 8`` and
blocks of 32 this is MXINT8; MXINT-k generalizes it to fewer bits.

Error bound: round-to-nearest errs by at most ``2^(e-1)`` per value (half a step); stochastic rounding by less
than one step, unbiased. Relative to the block's absmax ``a``, a step is below ``2a / (2^(k-1) - 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

MIN_BITS, MAX_BITS = 2, 8
BLOCK_SIZES = (16, 32, 64)


def check_format(bits: int, block_size: int) -> None:
    """Raise a clear error for an unsupported format."""
    if not isinstance(bits, int) or not (MIN_BITS <= bits <= MAX_BITS or bits == 16):
        raise ValueError(
            f"StashQuant bits must be an integer from {MIN_BITS} to {MAX_BITS}, or 16 (stored unchanged), got {bits!r}."
        )
    if block_size not in BLOCK_SIZES:
        raise ValueError(
            f"StashQuant block_size must be a power of two in {BLOCK_SIZES} (values sharing one exponent), got "
            f"{block_size!r}."
        )


@dataclass
class PackedBlocks:
    """A tensor in block floating point: bit-packed mantissas, one exponent per block, and how to restore it."""

    mantissas: torch.Tensor  # uint8, bits·numel/8 bytes (padded to whole blocks)
    exponents: torch.Tensor  # int8, one per block
    bits: int
    block_size: int
    shape: torch.Size
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.mantissas.numel() + self.exponents.numel()


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


def pack(
    x: torch.Tensor, bits: int, block_size: int = 32, stochastic: bool = False,
    generator: Optional[torch.Generator] = None,
) -> PackedBlocks:
    """Compress a floating tensor to block floating point."""
    check_format(bits, block_size)
    flat = x.detach().reshape(-1).to(torch.float32)
    blocks = F.pad(flat, (0, (-flat.numel()) % block_size)).view(-1, block_size)  # (blocks, block_size)
    qmax = 2 ** (bits - 1) - 1
    absmax = blocks.abs().amax(dim=1)
    # smallest e with absmax / 2^e ≤ qmax; all-zero blocks get the smallest exponent
    exponent = torch.ceil(torch.log2(absmax.clamp_min(2.0**-126) / qmax)).clamp(-127, 127)
    scaled = blocks / torch.exp2(exponent)[:, None]
    if stochastic:
        scaled = torch.floor(scaled + torch.rand(scaled.shape, generator=generator, device=scaled.device))
    else:
        scaled = torch.round(scaled)
    codes = (scaled.clamp(-qmax, qmax) + qmax).to(torch.uint8).reshape(-1)  # offset to [0, 2·qmax]
    return PackedBlocks(_pack_bits(codes, bits), exponent.to(torch.int8), bits, block_size, x.shape, x.dtype)


def unpack(packed: PackedBlocks) -> torch.Tensor:
    """Restore a tensor (contiguous, original shape and dtype) from block floating point."""
    qmax = 2 ** (packed.bits - 1) - 1
    codes = _unpack_bits(packed.mantissas, packed.bits).to(torch.float32) - qmax
    blocks = codes.view(-1, packed.block_size) * torch.exp2(packed.exponents.to(torch.float32))[:, None]
    numel = packed.shape.numel()
    return blocks.reshape(-1)[:numel].reshape(packed.shape).to(packed.dtype)
