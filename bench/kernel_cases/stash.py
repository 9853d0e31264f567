"""StashQuant's block-floating-point pack and unpack: the Triton kernels, the reference (peft_quant.stash.bfp), and a
plain torch per-block absmax int8 quantize / dequantize as the anchor (the simplest eager alternative).

Memory-bound: ``bytes_moved`` is the values read plus the stream and scales written (the reverse for unpack).
"""

from __future__ import annotations

import torch

from peft_quant.kernels import stash as ops
from peft_quant.stash import bfp

from .common import DEVICE, Case


def _torch_quantize(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and float32 absmax per block, in eager torch."""
    blocks = x.view(-1, block_size).float()  # (blocks, block_size)
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    return (blocks / absmax * 127).round().to(torch.int8), absmax


def _torch_dequantize(codes: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * (absmax / 127)).to(dtype).view(-1)


def cases(size: str) -> list[Case]:
    """Pack and unpack of float32 and bfloat16 tensors (64 Mi values; 4 Ki in the smoke run), 4 and 8 bits, both
    scale formats (quick: 4 bits, bf16 scales)."""
    numel, block_size = (4096 if size == "smoke" else 64 * 2**20), 32
    formats = [(4, "bf16")] if size == "quick" else [(bits, scale) for bits in (4, 8) for scale in ("bf16", "e8m0")]
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(numel, device=DEVICE, dtype=dtype)
        anchor_codes, anchor_absmax = _torch_quantize(x, block_size)
        for bits, scale in formats:
            packed = bfp.pack(x, bits, block_size, scale=scale)
            moved = x.numel() * x.element_size() + packed.nbytes
            count = f"{numel // 2**20} Mi" if numel >= 2**20 else f"{numel // 2**10} Ki"
            shape = f"{count} {str(dtype).removeprefix('torch.')}, {bits} bits, {scale} scale"
            out.append(Case(
                op="stash pack", shape=shape,
                ours=lambda x=x, bits=bits, scale=scale: ops.pack(x, bits, block_size, scale=scale),
                reference=lambda x=x, bits=bits, scale=scale: bfp.pack(x, bits, block_size, scale=scale),
                anchor=lambda x=x: _torch_quantize(x, block_size), anchor_name="torch absmax int8 quantize",
                bytes_moved=moved,
            ))
            out.append(Case(
                op="stash unpack", shape=shape,
                ours=lambda packed=packed: ops.unpack(packed),
                reference=lambda packed=packed: bfp.unpack(packed),
                anchor=lambda codes=anchor_codes, absmax=anchor_absmax, dtype=dtype: _torch_dequantize(
                    codes, absmax, dtype),
                anchor_name="torch absmax int8 dequantize", bytes_moved=moved,
            ))
    return out
