"""peft-quant's own integer weight format: uniform, per output channel, asymmetric round-to-nearest, 4 or 8 bits.

This is the canonical base of PEQA-style scale tuning (TuneQDM's code quantizes this way): each output channel
``o`` of a weight ``W`` (Linear ``out × in``, Conv2d ``out × in × kh × kw``) is stored as integer codes
``q ∈ [0, 2^bits)`` with a float ``scale[o]`` and integer-valued ``zero[o]``:

    W[o] ≈ scale[o] · (q[o] - zero[o]),   scale = (max - min) / (2^bits - 1),   zero = round(-min / scale)

where ``min``/``max`` are taken over the channel with 0 included (so 0 is exactly representable). 4-bit codes are
packed two per byte. :class:`IntLinear` and :class:`IntConv2d` compute with the dequantized weight but keep only the
codes for backward (the input gradient recomputes the weight), so training never holds a float copy of ``W``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .kernels.timestep_scale import int_linear

SUPPORTED_BITS = (4, 8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"peft-quant's integer format supports bits in {SUPPORTED_BITS}, got {bits!r}.")


def quantize_rtn(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest per output channel: ``(codes (out, k) uint8, scale (out,) fp32, zero (out,) fp32)``."""
    _check_bits(bits)
    w = weight.detach().reshape(weight.shape[0], -1).to(torch.float32)  # (out, k)
    top = 2**bits - 1
    low = w.amin(dim=1).clamp(max=0.0)
    high = w.amax(dim=1).clamp(min=0.0)
    scale = (high - low) / top
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero channel
    zero = torch.round(-low / scale)
    codes = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, top).to(torch.uint8)
    return codes, scale, zero


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``(out, k)`` codes → storage: unchanged for 8 bits, two 4-bit codes per byte (low nibble first)."""
    if bits == 8:
        return codes
    if codes.shape[1] % 2:
        codes = F.pad(codes, (0, 1))
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack(stored: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``(out, k)`` uint8 codes."""
    if bits == 8:
        return stored
    codes = torch.stack((stored & 0x0F, stored >> 4), dim=-1).reshape(stored.shape[0], -1)  # (out, 2·⌈k/2⌉)
    return codes[:, :k]


class IntQuantized(nn.Module):
    """Common part of :class:`IntLinear` and :class:`IntConv2d`: the codes, per-channel scale and zero buffers."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, bits: int) -> None:
        super().__init__()
        _check_bits(bits)
        self.bits = bits
        self.weight_shape = tuple(weight.shape)
        codes, scale, zero = quantize_rtn(weight, bits)
        self.register_buffer("qweight", pack(codes, bits))
        self.register_buffer("scale", scale.to(weight.device))
        self.register_buffer("zero", zero.to(weight.device))
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.bias.dtype if self.bias is not None else torch.float32

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``scale · (q - zero)`` in the layer's shape."""
        k = math.prod(self.weight_shape[1:])
        codes = unpack(self.qweight, self.bits, k).to(torch.float32)
        return ((codes - self.zero[:, None]) * self.scale[:, None]).reshape(self.weight_shape).to(dtype)

    def requantize_(self, weight: torch.Tensor) -> None:
        """Store a new float weight (same shape) in this format, in place."""
        if tuple(weight.shape) != self.weight_shape:
            raise ValueError(
                f"Weight of shape {tuple(weight.shape)} does not fit a layer of shape {self.weight_shape}."
            )
        codes, scale, zero = quantize_rtn(weight, self.bits)
        self.qweight = pack(codes, self.bits).to(self.qweight.device)
        self.scale = scale.to(self.scale.device)
        self.zero = zero.to(self.zero.device)

    def scale_output_channels_(self, factor: torch.Tensor) -> None:
        """Multiply output channel ``o`` by ``factor[o]`` exactly (up to float rounding): folds into ``scale``."""
        self.scale = self.scale * factor.to(self.scale)

    def _op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _input_grad(self, grad: torch.Tensor, weight: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _DequantOp.apply(x, self)
        return out if self.bias is None else out + _bias_view(self.bias.to(out.dtype), out, self)

    def extra_repr(self) -> str:
        return f"weight_shape={self.weight_shape}, bits={self.bits}, bias={self.bias is not None}"


def _bias_view(bias: torch.Tensor, out: torch.Tensor, layer: IntQuantized) -> torch.Tensor:
    return bias.view(-1, 1, 1) if isinstance(layer, IntConv2d) else bias


class _DequantOp(torch.autograd.Function):
    """``op(x, dequantize(W))`` that saves nothing float of ``W`` for backward (it re-dequantizes instead)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: IntQuantized) -> torch.Tensor:
        ctx.layer = layer
        ctx.input_shape = x.shape
        if isinstance(layer, IntLinear):  # one Triton kernel on CUDA (codes dequantized in registers), else _op's math
            return int_linear(x, layer)
        return layer._op(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        layer = ctx.layer
        return layer._input_grad(grad, layer.dequantize(grad.dtype), ctx.input_shape), None


class IntLinear(IntQuantized):
    """A frozen ``nn.Linear`` held in peft-quant's integer format."""

    def __init__(self, linear: nn.Linear, bits: int) -> None:
        super().__init__(linear.weight, linear.bias, bits)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def _op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)

    def _input_grad(self, grad: torch.Tensor, weight: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
        return grad @ weight


class IntConv2d(IntQuantized):
    """A frozen ``nn.Conv2d`` (zero padding) held in peft-quant's integer format."""

    def __init__(self, conv: nn.Conv2d, bits: int) -> None:
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str) and conv.padding != "valid":
            raise ValueError(
                f"peft-quant's integer Conv2d supports numeric zero padding only, got padding={conv.padding!r}, "
                f"padding_mode={conv.padding_mode!r}. Fix: leave this layer unquantized (skip it in quantize_model)."
            )
        super().__init__(conv.weight, conv.bias, bits)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.dilation, self.groups = conv.dilation, conv.groups
        self.padding = (0, 0) if conv.padding == "valid" else conv.padding

    def _op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def _input_grad(self, grad: torch.Tensor, weight: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
        return torch.nn.grad.conv2d_input(input_shape, weight, grad, self.stride, self.padding, self.dilation,
                                          self.groups)
