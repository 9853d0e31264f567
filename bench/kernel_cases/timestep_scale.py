"""Timing cases for TimestepScale's kernels: per-sample expert scaling, and the int4/int8 dequantize-matmul with that
scaling fused.

* Scaling, a Linear input (batch 8 × 4096 tokens × 1280 channels) and a Conv2d input (8, 320, 64, 64), bfloat16,
  two experts mixed over the batch, with the output side's bias. Reference: :func:`scale_channels_reference` (the
  layer's gather-and-multiply); anchor: the same written as one eager expression, ``(x − b) * table[idx][:, None, :]
  + b``. Forward alone, and forward + backward (gradients of ``x`` and the table).
* Dequantize-matmul, tokens 4096 × (in, out) of (1280, 1280) and (4096, 4096), bfloat16, 4 and 8 bits: plain, and
  with both scalings (batch 8, two experts) and the bias. Reference: dequantize, then ``F.linear`` (and the eager
  scalings); anchor: bitsandbytes NF4 (``quantize_4bit``/``dequantize_4bit``, block 64) dequantized, then ``F.linear``
  (and the eager scalings), for both widths: what a 4-bit base from bitsandbytes costs per forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import DEVICE, Case, no_grad, with_grads

BATCH = 8
EXPERTS = 2
DTYPE = torch.bfloat16
SCALE_SHAPES = {  # (x shape, channel dim)
    "full": [((BATCH, 4096, 1280), -1), ((BATCH, 320, 64, 64), 1)],
    "smoke": [((BATCH, 6, 40), -1), ((BATCH, 8, 5, 5), 1)],
}
SCALE_SHAPES["quick"] = SCALE_SHAPES["full"]
MATMUL_SHAPES = {  # (tokens, in, out)
    "full": [(4096, 1280, 1280), (4096, 4096, 4096)],
    "quick": [(4096, 1280, 1280)],
    "smoke": [(64, 64, 48)],
}


def _experts() -> tuple[torch.Tensor, None]:
    return torch.arange(BATCH, device=DEVICE) % EXPERTS, None


def _scale_cases(shape: tuple[int, ...], channel_dim: int) -> list[Case]:
    from peft_quant.kernels import timestep_scale as ops
    from peft_quant.kernels import timestep_scale_triton

    channels = shape[channel_dim]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(shape, device=DEVICE, generator=g).to(DTYPE).requires_grad_()
    table = (torch.rand(EXPERTS, channels, device=DEVICE, generator=g) + 0.5).requires_grad_()
    bias = torch.randn(channels, device=DEVICE, generator=g).to(DTYPE)
    experts = _experts()
    index = experts[0]
    grad_out = torch.randn_like(x)
    view = (lambda t: t[:, None, :]) if channel_dim == -1 else (lambda t: t[:, :, None, None])
    b = bias if channel_dim == -1 else bias[:, None, None]
    label = "x".join(map(str, shape)) + (" channels-last" if channel_dim == -1 else " conv")

    def ours():
        return timestep_scale_triton.ScaleChannels.apply(x, table, index, None, channel_dim, bias)

    def reference():
        return ops.scale_channels_reference(x, table, experts, channel_dim, bias)

    def anchor():
        return (x - b) * view(table[index]).to(x.dtype) + b

    element = x.element_size()
    return [
        Case("timestep_scale scale fwd", label, no_grad(ours), no_grad(reference), no_grad(anchor),
             "eager gather-multiply", bytes_moved=2 * x.numel() * element),
        Case("timestep_scale scale fwd+bwd", label, with_grads(ours, (x, table), grad_out),
             with_grads(reference, (x, table), grad_out), with_grads(anchor, (x, table), grad_out),
             "eager gather-multiply", bytes_moved=5 * x.numel() * element,
             notes="forward reads x, writes y; backward reads x and grad, writes grad_x"),
    ]


def _matmul_cases(tokens: int, in_features: int, out_features: int, bits: int) -> list[Case]:
    import bitsandbytes.functional as bnbf

    from peft_quant.int_quant import IntLinear
    from peft_quant.kernels import timestep_scale as ops
    from peft_quant.kernels import timestep_scale_triton

    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, device=DEVICE, dtype=DTYPE)
    layer = IntLinear(linear, bits)
    nf4, state = bnbf.quantize_4bit(linear.weight.detach(), blocksize=64, quant_type="nf4")
    x = torch.randn(tokens, in_features, device=DEVICE).to(DTYPE)
    table_in = torch.rand(EXPERTS, in_features, device=DEVICE) + 0.5
    table_out = torch.rand(EXPERTS, out_features, device=DEVICE) + 0.5
    experts = _experts()
    rows = tokens // BATCH
    index = experts[0].repeat_interleave(rows)  # (tokens,): each row's expert, for the eager scalings
    shape = f"{tokens}x{in_features}->{out_features} int{bits}"
    cases = []
    for scaled in (False, True):
        tables = (table_in, table_out, experts) if scaled else (None, None, None)
        bias = linear.bias if scaled else None

        def ours(tables=tables, bias=bias):
            return timestep_scale_triton.int_linear_forward(x, layer, bias, *tables)[0]

        def reference(tables=tables, bias=bias):
            return ops.int_linear_reference(x.view(BATCH, rows, -1), layer, bias, *tables).view(tokens, -1)

        def anchor(scaled=scaled):
            weight = bnbf.dequantize_4bit(nf4, state)
            if not scaled:
                return F.linear(x, weight)
            out = F.linear(x * table_in[index].to(DTYPE), weight)
            return out * table_out[index].to(DTYPE) + linear.bias

        op = "timestep_scale int-linear" + (" +scales+bias" if scaled else "")
        cases.append(Case(op, shape, no_grad(ours), no_grad(reference), no_grad(anchor),
                          "bnb nf4 dequantize + F.linear", notes="forward; bf16; per-output-channel RTN codes"))
    return cases


def cases(size: str) -> list[Case]:
    """Scaling at both layouts, then the dequantize-matmul, at the shapes of ``size``."""
    out = [case for shape, channel_dim in SCALE_SHAPES[size] for case in _scale_cases(shape, channel_dim)]
    for tokens, in_features, out_features in MATMUL_SHAPES[size]:
        for bits in (4, 8):
            out += _matmul_cases(tokens, in_features, out_features, bits)
    return out
