"""StashQuant's block floating point with a Triton kernel each for pack and unpack.

:func:`pack` and :func:`unpack` have the signatures of :func:`peft_quant.stash.bfp.pack` and
:func:`peft_quant.stash.bfp.unpack` (the reference) and return / take the same :class:`PackedBlocks`. They run the
Triton kernels (:mod:`.stash_triton`, imported only then) when :func:`.backend.use_triton` says so and the kernels
cover the case (float32/float16/bfloat16 tensors, 2 to 8 bits), and the reference otherwise, so CPU results are the
reference's bit for bit. Round-to-nearest packing is bit-identical to the reference on the same device; stochastic
rounding draws its own random stream (seeded from ``generator``, or torch's default CPU generator). Outliers
(non-finite values, mask fill values: :func:`peft_quant.stash.bfp.find_outliers`) are found and restored by the same
torch code on both paths; the pack kernel counts them as zeros in their blocks, as the reference does.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..stash import bfp as reference
from ..stash.bfp import MAX_BITS, PackedBlocks, check_format, find_outliers
from .backend import use_triton

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _seed(generator: Optional[torch.Generator]) -> int:
    """A Philox seed drawn from ``generator`` (or torch's default CPU generator), so seeding torch seeds the kernel."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**31 - 1, (), generator=generator, device=device))


def pack(
    x: torch.Tensor, bits: int, block_size: int = 32, stochastic: bool = False,
    generator: Optional[torch.Generator] = None, scale: str = "auto",
) -> PackedBlocks:
    """Compress a floating tensor to block floating point (see :func:`peft_quant.stash.bfp.pack`)."""
    scale = check_format(bits, block_size, scale)
    if bits <= MAX_BITS and x.dtype in KERNEL_DTYPES and use_triton(x):
        from . import stash_triton

        seed = _seed(generator) if stochastic else 0
        outlier_index, outlier_values = find_outliers(x.detach().reshape(-1))
        mantissas, scales = stash_triton.pack(x, bits, block_size, scale, stochastic, seed)
        return PackedBlocks(mantissas, scales, bits, block_size, x.shape, x.dtype, outlier_index, outlier_values)
    return reference.pack(x, bits, block_size, stochastic, generator, scale)


def unpack(packed: PackedBlocks) -> torch.Tensor:
    """Restore a tensor (contiguous, original shape and dtype) from block floating point."""
    if packed.bits <= MAX_BITS and packed.dtype in KERNEL_DTYPES and use_triton(packed.mantissas):
        from . import stash_triton

        return stash_triton.unpack(packed)
    return reference.unpack(packed)
