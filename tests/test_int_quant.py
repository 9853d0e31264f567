"""peft-quant's own int4/int8 format and quantize_model: exact codes, error bounds, forward/backward references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peft_quant import quantize_model
from peft_quant.int_quant import IntConv2d, IntLinear, pack, quantize_rtn, unpack
from peft_quant.quant_formats import describe, fold_output_scale


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [7, 16])
def test_pack_unpack_is_exact(bits, k):
    codes = torch.randint(0, 2**bits, (5, k), dtype=torch.uint8)
    stored = pack(codes, bits)
    assert stored.dtype == torch.uint8 and stored.shape[1] == (k if bits == 8 else (k + 1) // 2)
    assert torch.equal(unpack(stored, bits, k), codes)


@pytest.mark.parametrize("bits", [4, 8])
def test_round_to_nearest_error_bound_and_zero_exact(bits):
    torch.manual_seed(0)
    w = torch.randn(32, 48, dtype=torch.float64) * torch.rand(32, 1, dtype=torch.float64)  # rows of unequal range
    w[3] = 0.0
    w[4] = w[4].abs() + 0.1  # all positive: zero point at code 0
    w[5, ::3] = 0.0  # exact zeros inside a row of mixed signs
    codes, scale, zero = quantize_rtn(w, bits)
    assert codes.max() <= 2**bits - 1
    deq = (codes.double() - zero.double()[:, None]) * scale.double()[:, None]
    # round-to-nearest: every weight within half a step of its code (plus float32 scale rounding)
    assert ((deq - w).abs() <= scale.double()[:, None] * (0.5 + 1e-5)).all()
    assert torch.equal(deq[3], torch.zeros(48, dtype=torch.float64))
    assert (deq[w == 0] == 0).all()  # 0 is exactly representable by construction
    # more bits, smaller error: int8's mean error is far below int4's (statistical, 16x fewer steps per range)
    if bits == 8:
        c4, s4, z4 = quantize_rtn(w, 4)
        deq4 = (c4.double() - z4.double()[:, None]) * s4.double()[:, None]
        assert (deq - w).abs().mean() < (deq4 - w).abs().mean() / 8


def _layers(bits):
    torch.manual_seed(0)
    linear, conv = nn.Linear(24, 10), nn.Conv2d(6, 8, kernel_size=3, stride=2, padding=1, groups=2)
    return (linear, IntLinear(linear, bits)), (conv, IntConv2d(conv, bits))


@pytest.mark.parametrize("bits", [4, 8])
def test_forward_backward_match_dequantize_then_float64(bits):
    (linear, qlinear), (conv, qconv) = _layers(bits)
    cases = [
        (qlinear, torch.randn(3, 5, 24), lambda x, w: F.linear(x, w, linear.bias.double())),
        (qconv, torch.randn(2, 6, 9, 9),
         lambda x, w: F.conv2d(x, w, conv.bias.double(), stride=2, padding=1, groups=2)),
    ]
    for layer, x, op in cases:
        x.requires_grad_()
        y = layer(x)
        y.pow(2).sum().backward()
        x64 = x.detach().double().requires_grad_()
        ref = op(x64, layer.dequantize(torch.float64))
        ref.pow(2).sum().backward()
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
        assert layer.bias.grad is None  # frozen


def test_backward_keeps_no_float_copy_of_the_weight():
    """The layer saves nothing for backward: the input gradient re-dequantizes the integer codes."""
    (_, qlinear), _ = _layers(4)
    saved = []
    x = torch.randn(4, 24, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = qlinear(x)
    assert not any(t.shape == (10, 24) for t in saved), [tuple(t.shape) for t in saved]
    y.sum().backward()
    assert x.grad is not None


def test_fold_output_scale_is_exact_in_the_scale():
    (_, qlinear), (_, qconv) = _layers(4)
    for layer in (qlinear, qconv):
        factor = torch.rand(layer.weight_shape[0]) + 0.5
        before = layer.dequantize(torch.float64)
        codes = layer.qweight.clone()
        assert fold_output_scale(layer, factor)
        assert torch.equal(layer.qweight, codes)  # codes untouched: nothing re-quantized
        expected = before * factor.double().view(-1, *([1] * (before.dim() - 1)))
        torch.testing.assert_close(layer.dequantize(torch.float64), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend,bits,linear_type", [
    ("int", 4, "IntLinear"), ("int", 8, "IntLinear"), ("bitsandbytes", 4, "Linear4bit"),
    ("bitsandbytes", 8, "Linear8bitLt"),
])
def test_quantize_model_swaps_layers_and_stays_close(backend, bits, linear_type):
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 16, 64), nn.ReLU(),
                          nn.Linear(64, 10))
    x = torch.randn(4, 3, 4, 4)
    with torch.no_grad():
        reference = model(x)
        quantize_model(model, bits=bits, backend=backend, exclude_modules=["4"])
        out = model(x)
    assert [type(m).__name__ for m in model] == ["IntConv2d", "Flatten", linear_type, "ReLU", "Linear"]
    assert describe(model[0]).label == f"peft_quant int{bits}"
    rel = float((out - reference).norm() / reference.norm())
    assert 0 < rel < (0.25 if bits == 4 else 0.02)


def test_quantize_model_bad_inputs():
    with pytest.raises(ValueError, match="bits=4 or bits=8"):
        quantize_model(nn.Linear(4, 4), bits=3)
    with pytest.raises(ValueError, match="backend must be"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), backend="gguf")
    with pytest.raises(ValueError, match="found no nn.Linear or nn.Conv2d.*target_modules"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), target_modules=["nothing"])
    pytest.importorskip("bitsandbytes")
    with pytest.raises(ValueError, match="width 32 cannot be quantized to bitsandbytes 4-bit on CPU.*backend='int'"):
        quantize_model(nn.Sequential(nn.Linear(32, 128)), bits=4, backend="bitsandbytes")
    with pytest.raises(ValueError, match="zero padding only"):
        IntConv2d(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"), 4)
