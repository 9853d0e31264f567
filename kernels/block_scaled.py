"""Block-scaled weight formats as the Hub stores them, and a linear op that trains through them: the PyTorch reference.

Two codecs, one mechanism (a :class:`Codec` says how to slice and decode its stored tensors; everything else is
shared):

* ``fp8_block`` (DeepSeek-V3/R1, Qwen3-FP8): ``weight`` float8_e4m3fn ``(out, in)`` and ``weight_scale_inv`` float32
  ``(ceil(out/b0), ceil(in/b1))``, one scale per ``b0 × b1`` block (``weight_block_size``, ``[128, 128]`` on the Hub;
  edge blocks partially filled), ``W = weight · weight_scale_inv``. Quantization follows transformers'
  ``Fp8Quantize``: per block ``scale = 448 / amax`` (1 for an all-zero block), ``q = clamp(w · scale, ±448)`` cast to
  e4m3, ``weight_scale_inv = 1 / scale``.
* ``mxfp4`` (gpt-oss; OCP microscaling): e2m1 values packed two per uint8 (the even element in the low nibble, as
  transformers' ``_convert_moe_packed_tensors`` decodes them) with one e8m0 scale (uint8, exponent bias 127) per 32
  input values: ``<name>_blocks`` uint8 ``(..., out, in/32, 16)``, ``<name>_scales`` uint8 ``(..., out, in/32)``,
  ``W = e2m1[code] · 2^(scale − 127)``. Quantization picks the smallest power of two with ``amax / 2^e ≤ 6`` (so no
  value saturates) and rounds each value to the nearest e2m1 value, ties to the even code.

Both decode in float32 (as transformers' own dequantization does) and then cast to the asked dtype.

:func:`linear` computes ``x · dequant(W)ᵀ (+ bias)`` with an input gradient ``dX = dY · dequant(W)``, both tile by
tile: the forward decodes ``tile`` output rows at a time, the backward ``tile`` input columns at a time, so no float
copy of the whole layer is ever alive, and backward keeps only references to the stored (quantized) tensors. The
base weights are frozen: they get no gradient. On CUDA tensors (:mod:`.backend`) the backward runs the Triton kernel
of :mod:`.block_scaled_triton`, which decodes the tiles in registers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F

from .backend import use_triton

Stored = tuple[torch.Tensor, ...]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
MX_GROUP = 32  # input values per e8m0 scale
E8M0_BIAS = 127
#: the e2m1 value of each 4-bit code (bit 3 is the sign), as transformers' ``FP4_VALUES``
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
#: default tile width (rows in the forward, input columns in the backward): one FP8 block, four MXFP4 groups
DEFAULT_TILE = 128


class BlockScaledError(ValueError):
    """Stored tensors or a weight that a block-scaled codec cannot take (the message names the fix)."""


def _check_float_weight(weight: torch.Tensor, what: str) -> None:
    if not weight.is_floating_point() or weight.dtype in (FP8_DTYPE,):
        raise BlockScaledError(f"{what} takes a float weight (float32/bfloat16/float16), got {weight.dtype}. "
                               "Fix: pass the layer's float weight.")
    if weight.dim() < 2:
        raise BlockScaledError(f"{what} takes a weight of shape (..., out, in), got {tuple(weight.shape)}. "
                               "Fix: pass a Linear weight or an expert bank.")
    if not bool(torch.isfinite(weight).all()):
        raise BlockScaledError(f"{what}: the weight holds NaN or Inf, which no block scale can represent. "
                               "Fix: find where the non-finite values came from (a diverged merge or training run).")


# ---- MXFP4 ---------------------------------------------------------------------------------------------------------

def _e2m1_table(device: torch.device) -> torch.Tensor:
    return torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)


def mxfp4_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(blocks, scales)`` of a float weight ``(..., out, in)`` (``in`` a multiple of 32): ``blocks`` uint8
    ``(..., out, in/32, 16)``, ``scales`` uint8 ``(..., out, in/32)``, gpt-oss' layout (see the module doc)."""
    _check_float_weight(weight, "mxfp4_quantize")
    *lead, width = weight.shape
    if width % MX_GROUP:
        raise BlockScaledError(
            f"MXFP4 holds one scale per {MX_GROUP} input values; a weight of input width {width} is not a multiple "
            f"of {MX_GROUP}. Fix: keep this layer in float (exclude_modules / modules_to_not_convert), or use fp8."
        )
    groups = weight.detach().to(torch.float32).reshape(*lead, width // MX_GROUP, MX_GROUP)  # (..., out, G, 32)
    amax = groups.abs().amax(dim=-1)  # (..., out, G)
    # smallest e with amax / 2^e <= 6 (e2m1's largest value): nothing saturates; all-zero groups take the smallest
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-E8M0_BIAS, E8M0_BIAS)
    exponent = torch.where(amax > 0, exponent, torch.full_like(exponent, -E8M0_BIAS))
    scaled = groups / torch.exp2(exponent)[..., None]  # exact: a power of two
    magnitude = scaled.abs()
    table = _e2m1_table(weight.device)[:8]
    midpoints = (table[1:] + table[:-1]) / 2  # (7,)
    code = torch.bucketize(magnitude, midpoints)  # ties go down, to the lower code
    at_tie = (code < 7) & (magnitude == midpoints[code.clamp(max=6)])
    code = code + (at_tie & (code % 2 == 1)).to(code.dtype)  # ties to the even code (as round-half-even)
    code = (code | ((scaled < 0).to(code.dtype) << 3)).to(torch.uint8)  # (..., out, G, 32)
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)  # (..., out, G, 16): even element in the low nibble
    scales = (exponent + E8M0_BIAS).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The float weight ``(..., out, in)`` of MXFP4 ``blocks`` ``(..., out, in/32, 16)`` and ``scales``
    ``(..., out, in/32)`` (both uint8), decoded in float32 and cast to ``dtype``."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise BlockScaledError(f"MXFP4 blocks and scales are uint8, got {blocks.dtype} and {scales.dtype}. Fix: load "
                               "them from the checkpoint without casting (they are codes, not numbers).")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != MX_GROUP // 2:
        raise BlockScaledError(
            f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not fit: blocks must be "
            f"(..., out, in/32, 16) and scales (..., out, in/32). Fix: pass the checkpoint's *_blocks and *_scales of "
            "the same tensor."
        )
    table = _e2m1_table(blocks.device)
    pairs = torch.stack((table.repeat(16), table.repeat_interleave(16)), dim=-1)  # (256, 2): byte → (low, high)
    values = F.embedding(blocks.to(torch.int32), pairs)  # (..., out, G, 16, 2): one gather, no int64 indices
    values = values.view(*scales.shape, MX_GROUP)  # (..., out, G, 32)
    values.mul_(torch.exp2(scales.to(torch.float32) - E8M0_BIAS)[..., None])  # exact: powers of two
    return values.view(*scales.shape[:-1], scales.shape[-1] * MX_GROUP).to(dtype)  # (..., out, in)


# ---- FP8 with 2-D block scales ---------------------------------------------------------------------------------------

def fp8_block_quantize(weight: torch.Tensor, block_size: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """``(weight e4m3 (..., out, in), weight_scale_inv float32 (..., ceil(out/b0), ceil(in/b1)))`` of a float weight
    (transformers' ``Fp8Quantize`` arithmetic; edge blocks partially filled)."""
    _check_float_weight(weight, "fp8_block_quantize")
    b0, b1 = block_size
    *lead, rows, cols = weight.shape
    r, c = math.ceil(rows / b0), math.ceil(cols / b1)
    padded = F.pad(weight.detach().to(torch.float32), (0, c * b1 - cols, 0, r * b0 - rows))
    tiles = padded.reshape(*lead, r, b0, c, b1)  # (..., r, b0, c, b1)
    amax = tiles.abs().amax(dim=(-3, -1))  # (..., r, c)
    scale = torch.where(amax > 0, FP8_MAX / torch.where(amax > 0, amax, torch.ones_like(amax)), torch.ones_like(amax))
    codes = torch.clamp(tiles * scale[..., :, None, :, None], -FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    codes = codes.reshape(*lead, r * b0, c * b1)[..., :rows, :cols].clone()  # own storage, not the padded one's
    return codes, (1.0 / scale).to(torch.float32)


def fp8_block_dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                         block_size: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """``weight · weight_scale_inv`` (each scale over its ``b0 × b1`` block), in float32, cast to ``dtype``."""
    if weight.dtype != FP8_DTYPE:
        raise BlockScaledError(f"An FP8 block-scaled weight is float8_e4m3fn, got {weight.dtype}. Fix: load the "
                               "checkpoint's weight without casting it (e.g. no model.to(dtype) before loading).")
    if not scale_inv.is_floating_point():
        raise BlockScaledError(f"weight_scale_inv must be float32 (or e8m0), got {scale_inv.dtype}. Fix: load it "
                               "from the checkpoint without casting.")
    b0, b1 = block_size
    rows, cols = weight.shape[-2:]
    grid = (math.ceil(rows / b0), math.ceil(cols / b1))
    if tuple(scale_inv.shape[-2:]) != grid or scale_inv.shape[:-2] != weight.shape[:-2]:
        raise BlockScaledError(
            f"weight_scale_inv {tuple(scale_inv.shape)} does not fit a weight {tuple(weight.shape)} in blocks "
            f"{b0}x{b1} (expected (..., {grid[0]}, {grid[1]})). Fix: pass the checkpoint's weight_block_size."
        )
    row_block = torch.arange(rows, device=weight.device) // b0
    scale = scale_inv.to(torch.float32).index_select(-2, row_block)  # (..., out, ceil(in/b1)): per row, per block
    result = weight.to(torch.float32)
    full, rest = divmod(cols, b1)  # whole column blocks scaled in place through a view; the partial one after
    result[..., :full * b1].unflatten(-1, (full, b1)).mul_(scale[..., :full, None])  # (..., out, full, b1)
    if rest:
        result[..., full * b1:].mul_(scale[..., full:])
    return result.to(dtype)


# ---- codecs --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Codec:
    """How one block-scaled format stores a weight ``(out, in)``: its tensors' names, how to quantize, decode and cut
    them into row or column tiles (tile edges on multiples of ``row_step`` / ``col_step``)."""

    name: ClassVar[str]
    tensor_names: ClassVar[tuple[str, ...]]
    kernel_id: ClassVar[int]  # the Triton kernel's CODEC constexpr

    def quantize(self, weight: torch.Tensor) -> Stored:
        raise NotImplementedError

    def dequantize(self, stored: Stored, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def shape(self, stored: Stored) -> tuple[int, int]:
        raise NotImplementedError

    @property
    def row_step(self) -> int:
        raise NotImplementedError

    @property
    def col_step(self) -> int:
        raise NotImplementedError

    def rows(self, stored: Stored, start: int, stop: int) -> Stored:
        """The stored tensors of weight rows ``[start, stop)`` (``start`` a multiple of ``row_step``): views."""
        raise NotImplementedError

    def columns(self, stored: Stored, start: int, stop: int) -> Stored:
        """The stored tensors of weight columns ``[start, stop)`` (``start`` a multiple of ``col_step``): views."""
        raise NotImplementedError


@dataclass(frozen=True)
class Fp8BlockCodec(Codec):
    """``(weight e4m3 (out, in), weight_scale_inv float32 (ceil(out/b0), ceil(in/b1)))``."""

    block_size: tuple[int, int] = (128, 128)
    name: ClassVar[str] = "fp8_block"
    tensor_names: ClassVar[tuple[str, ...]] = ("weight", "weight_scale_inv")
    kernel_id: ClassVar[int] = 0

    def quantize(self, weight: torch.Tensor) -> Stored:
        return fp8_block_quantize(weight, self.block_size)

    def dequantize(self, stored: Stored, dtype: torch.dtype) -> torch.Tensor:
        return fp8_block_dequantize(stored[0], stored[1], dtype, self.block_size)

    def shape(self, stored: Stored) -> tuple[int, int]:
        return tuple(stored[0].shape[-2:])

    @property
    def row_step(self) -> int:
        return self.block_size[0]

    @property
    def col_step(self) -> int:
        return self.block_size[1]

    def rows(self, stored: Stored, start: int, stop: int) -> Stored:
        b0 = self.block_size[0]
        return stored[0][start:stop], stored[1][start // b0:math.ceil(stop / b0)]

    def columns(self, stored: Stored, start: int, stop: int) -> Stored:
        b1 = self.block_size[1]
        return stored[0][:, start:stop], stored[1][:, start // b1:math.ceil(stop / b1)]


@dataclass(frozen=True)
class Mxfp4Codec(Codec):
    """``(blocks uint8 (out, in/32, 16), scales uint8 (out, in/32))``."""

    name: ClassVar[str] = "mxfp4"
    tensor_names: ClassVar[tuple[str, ...]] = ("weight_blocks", "weight_scales")
    kernel_id: ClassVar[int] = 1

    def quantize(self, weight: torch.Tensor) -> Stored:
        return mxfp4_quantize(weight)

    def dequantize(self, stored: Stored, dtype: torch.dtype) -> torch.Tensor:
        return mxfp4_dequantize(stored[0], stored[1], dtype)

    def shape(self, stored: Stored) -> tuple[int, int]:
        return stored[1].shape[-2], stored[1].shape[-1] * MX_GROUP

    @property
    def row_step(self) -> int:
        return 1

    @property
    def col_step(self) -> int:
        return MX_GROUP

    def rows(self, stored: Stored, start: int, stop: int) -> Stored:
        return stored[0][start:stop], stored[1][start:stop]

    def columns(self, stored: Stored, start: int, stop: int) -> Stored:
        return stored[0][:, start // MX_GROUP:math.ceil(stop / MX_GROUP)], stored[1][:, start // MX_GROUP:
                                                                                      math.ceil(stop / MX_GROUP)]


FP8_BLOCK = Fp8BlockCodec()
MXFP4 = Mxfp4Codec()
CODECS: dict[str, Codec] = {FP8_BLOCK.name: FP8_BLOCK, MXFP4.name: MXFP4}


def _tile(step: int, tile: Optional[int]) -> int:
    """The tile width: ``tile`` (default :data:`DEFAULT_TILE`) rounded up to a multiple of the codec's ``step``."""
    width = tile or DEFAULT_TILE
    return max(step, math.ceil(width / step) * step)


# ---- the linear op -------------------------------------------------------------------------------------------------

def matmul_weight_t(x: torch.Tensor, stored: Stored, codec: Codec, tile: Optional[int] = None) -> torch.Tensor:
    """``x · dequant(W)ᵀ`` for ``x`` ``(..., in)``, in ``x``'s dtype, decoding ``tile`` rows of ``W`` at a time."""
    out_features, in_features = codec.shape(stored)
    x2 = x.reshape(-1, in_features)  # (tokens, in)
    out = x2.new_empty(x2.shape[0], out_features)
    step = _tile(codec.row_step, tile)
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        out[:, start:stop] = x2 @ codec.dequantize(codec.rows(stored, start, stop), x.dtype).T
    return out.reshape(*x.shape[:-1], out_features)


def matmul_weight(grad: torch.Tensor, stored: Stored, codec: Codec, tile: Optional[int] = None) -> torch.Tensor:
    """``grad · dequant(W)`` for ``grad`` ``(..., out)`` (a Linear's input gradient), in ``grad``'s dtype, decoding
    ``tile`` input columns of ``W`` at a time; the Triton kernel on CUDA tensors."""
    out_features, in_features = codec.shape(stored)
    if use_triton(grad, *stored):
        from . import block_scaled_triton

        return block_scaled_triton.matmul_weight(grad, stored, codec)
    g2 = grad.reshape(-1, out_features)  # (tokens, out)
    result = g2.new_empty(g2.shape[0], in_features)
    step = _tile(codec.col_step, tile)
    for start in range(0, in_features, step):
        stop = min(start + step, in_features)
        result[:, start:stop] = g2 @ codec.dequantize(codec.columns(stored, start, stop), grad.dtype)
    return result.reshape(*grad.shape[:-1], in_features)


class BlockScaledLinearFunction(torch.autograd.Function):
    """``x · dequant(W)ᵀ`` whose backward gives ``dX`` from the stored tensors alone; ``W`` is frozen (no gradient
    for the stored tensors).

    Nothing goes through ``save_for_backward``: the context keeps references to the layer's own stored tensors (no
    copy, no byte added), so saved-tensor hooks (activation compression such as StashQuant's packer, offloading)
    never see, copy or compress the frozen weights, and ``x`` is not kept at all."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, codec: Codec, tile: Optional[int], *stored: torch.Tensor) -> torch.Tensor:
        ctx.codec, ctx.tile, ctx.stored = codec, tile, stored
        return matmul_weight_t(x, stored, codec, tile)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        grad_x = matmul_weight(grad, ctx.stored, ctx.codec, ctx.tile) if ctx.needs_input_grad[0] else None
        return (grad_x, None, None) + (None,) * len(ctx.stored)


def linear(x: torch.Tensor, stored: Stored, codec: Codec, bias: Optional[torch.Tensor] = None,
           tile: Optional[int] = None) -> torch.Tensor:
    """``x · dequant(W)ᵀ + bias`` in ``x``'s dtype, differentiable w.r.t. ``x`` (and ``bias``) only; ``stored`` are the
    codec's tensors (:attr:`Codec.tensor_names`)."""
    if torch.is_grad_enabled() and x.requires_grad:
        out = BlockScaledLinearFunction.apply(x, codec, tile, *stored)
    else:
        out = matmul_weight_t(x, stored, codec, tile)
    return out if bias is None else out + bias.to(out.dtype)
