"""QuantFull: int8 state, the fused Lion step against a float Lion step, rounding, NaN safety, bases, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn

from peft_quant import QuantFullConfig, QuantFullOptimizer, quantize_model
from peft_quant.quant_full import QuantFullLayer
from peft_quant.quant_full.int8_state import (
    dequantize_blockwise,
    dequantize_weight,
    quantize_blockwise,
    quantize_weight,
    round_codes,
    round_to_int8,
)


def _net(bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 32, bias=bias), nn.GELU(), nn.Linear(32, 16, bias=bias))


def _wrap(net: nn.Module, **config) -> tuple[nn.Module, QuantFullLayer]:
    model = get_peft_model(net, QuantFullConfig(target_modules=["0", "2"], **config))
    return model, model.base_model.model[0]


def test_quantize_keeps_outliers_exactly_and_inliers_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    w[3, 5] = 40.0  # an outlier the int8 grid of its row could not hold
    codes, scale, index, value = quantize_weight(w, group_size=16, outlier_fraction=0.01)
    assert codes.dtype == torch.int8 and scale.shape == (32, 4) and index.dtype == torch.int32
    assert index.numel() == round(0.01 * w.numel()) and (3 * 64 + 5) in index.tolist()
    restored = dequantize_weight(codes, scale, index, value, group_size=16)
    assert torch.equal(restored.view(-1)[index.long()], w.view(-1)[index.long()])  # outliers exact
    step = scale.repeat_interleave(16, dim=1)
    assert ((restored - w).abs() <= step / 2 + 1e-6).all()
    assert scale[3].max() < 40.0 / 127  # the outlier did not stretch its row's grid


def test_forward_and_backward_match_float64():
    model, layer = _wrap(_net())
    seen = {}
    layer.updater = lambda lyr, grad: seen.setdefault("grad", grad.clone())
    model.base_model.model[2].updater = lambda lyr, grad: None
    x = torch.randn(5, 48, dtype=torch.float32, requires_grad=True)
    y = layer(x)
    y.pow(2).sum().backward()
    weight = layer.weight_of(torch.float64)
    bias = layer.qf_bias["default"].detach().double()
    x64 = x.detach().double().requires_grad_()
    w64 = weight.clone().requires_grad_()
    ref = F.linear(x64, w64, bias)
    ref.pow(2).sum().backward()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["grad"].double(), w64.grad, rtol=1e-5, atol=1e-4)
    assert layer.qf_bias["default"].grad is not None  # the float path gets its gradient as usual


@pytest.mark.parametrize("stochastic", [False, True])
def test_fused_step_equals_float_lion_then_the_same_rounding(stochastic):
    model, layer = _wrap(_net(), stochastic_rounding=stochastic)
    opt = QuantFullOptimizer(model, lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1, momentum_block_size=64)
    x = torch.randn(6, 48)
    for step in range(3):  # momentum non-zero from the second step on
        w_before = layer.weight_of().clone()
        codes_before = layer.qf_codes["default"].clone()
        state = opt.state[layer.qf_anchor["default"]]
        m_before = (dequantize_blockwise(state["momentum_codes"], state["momentum_absmax"], 64, w_before.shape)
                    if state else torch.zeros_like(w_before))
        captured = {}
        original = layer.updater
        layer.updater = lambda lyr, grad: (captured.setdefault("g", grad.clone()), original(lyr, grad))
        model(x).pow(2).mean().backward()
        layer.updater = original
        g = captured["g"]
        # float Lion on the dequantized state, added to the codes in code units, then the same rounding
        update = -3e-3 * (torch.sign(0.9 * m_before + 0.1 * g) + 0.1 * w_before)
        m_new = 0.99 * m_before + 0.01 * g
        index = layer.qf_outlier_index["default"].long()
        outliers_before = w_before.view(-1)[index]
        torch.testing.assert_close(layer.qf_outlier_value["default"], outliers_before + update.view(-1)[index])
        update.view(-1)[index] = 0.0
        generator = None
        if stochastic:
            generator = torch.Generator().manual_seed(hash((0, 0, step)) & (2**63 - 1))
        assert torch.equal(codes_before.view(-1)[index], torch.zeros_like(index, dtype=torch.int8))
        expected = round_to_int8(codes_before.float() + update / layer.qf_scale["default"], stochastic, generator)
        assert torch.equal(layer.qf_codes["default"], expected)
        # which is float Lion on the weight to within one int8 step (half a step for round-to-nearest)
        w_lion = w_before + update
        w_lion.view(-1)[index] = 0.0
        inliers_after = layer.weight_of().clone()
        inliers_after.view(-1)[index] = 0.0
        tolerance = layer.qf_scale["default"] * (1.0 if stochastic else 0.5) + 1e-6
        inside = layer.qf_codes["default"].abs() < 127  # codes at the edge of the int8 grid saturate
        assert (((inliers_after - w_lion).abs() <= tolerance) | ~inside).all() and inside.float().mean() > 0.95
        expected_m, expected_absmax = quantize_blockwise(m_new, 64)
        assert torch.equal(state["momentum_codes"], expected_m)
        torch.testing.assert_close(state["momentum_absmax"], expected_absmax)
        opt.step()
        opt.zero_grad()


def test_stochastic_rounding_is_unbiased_and_round_to_nearest_loses_small_steps():
    scale = torch.full((1, 1), 0.01)
    values = torch.full((1, 4000), 0.0123)  # 1.23 int8 steps
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([round_codes(values, scale, None, True, generator).float() for _ in range(50)])
    mean = float(draws.mean()) * 0.01
    sigma = 0.01 * (0.23 * 0.77) ** 0.5 / (draws.numel()) ** 0.5  # Bernoulli spread of one draw, averaged
    assert abs(mean - 0.0123) < 5 * sigma
    assert set(draws.unique().tolist()) == {1.0, 2.0}
    assert torch.equal(round_codes(values, scale, None, False), torch.ones_like(values, dtype=torch.int8))
    # a step of 0.3 int8 units: round-to-nearest keeps the code, stochastic rounding moves 30% of them
    start = torch.zeros(1, 4000)
    assert torch.equal(round_codes(start - 0.003, scale, None, False), torch.zeros(1, 4000, dtype=torch.int8))
    moved = float((round_codes(start - 0.003, scale, None, True, generator) != 0).float().mean())
    assert 0.25 < moved < 0.35


def test_nan_gradient_leaves_the_state_untouched_and_is_counted():
    model, layer = _wrap(_net())
    opt = QuantFullOptimizer(model, lr=1e-2)
    x = torch.randn(4, 48)
    model(x).sum().backward()  # one good step creates the momentum
    opt.step()
    opt.zero_grad()
    before = {n: b.clone() for n, b in model.named_buffers()}
    momentum = opt.state[layer.qf_anchor["default"]]["momentum_codes"].clone()
    x[0, 0] = float("nan")
    model(x).sum().backward()
    opt.step()
    assert opt.skipped_updates >= 2  # both int8 layers (and the NaN biases) skipped
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())
    assert torch.equal(opt.state[layer.qf_anchor["default"]]["momentum_codes"], momentum)
    assert torch.isfinite(layer.qf_bias["default"]).all()


def test_no_weight_gradient_outlives_backward_and_state_is_int8():
    model, layer = _wrap(_net())
    opt = QuantFullOptimizer(model, lr=1e-3)
    model(torch.randn(4, 48)).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "qf_anchor" in n)
    assert not any(p.numel() >= 32 * 48 for p in model.parameters())  # no float weight parameter exists
    state = opt.state[layer.qf_anchor["default"]]
    assert state["momentum_codes"].dtype == torch.int8 and "grad_accum" not in state


@pytest.mark.parametrize("kind", ["nf4", "int8-bnb", "int4"])
def test_quantized_bases_are_dequantized_once_into_int8_state(kind):
    net = _net()
    if kind == "int4":
        quantize_model(net, bits=4, backend="int")
    else:
        pytest.importorskip("bitsandbytes")
        net[0] = nn.Linear(64, 64)  # bitsandbytes' CPU 4-bit kernel wants widths that are multiples of 64
        net[2] = nn.Linear(64, 64)
        quantize_model(net, bits=4 if kind == "nf4" else 8, backend="bitsandbytes")
    from peft_quant.quant_formats import read_weight

    original = read_weight(net[0])
    model, layer = _wrap(net)
    assert layer.base_format.bits == (8 if kind == "int8-bnb" else 4)
    step = layer.qf_scale["default"]
    assert ((layer.weight_of() - original).abs() <= step / 2 + 1e-6).all()
    QuantFullOptimizer(model, lr=1e-3)
    before = layer.qf_codes["default"].clone()
    model(torch.randn(3, layer.in_features)).pow(2).sum().backward()
    assert not torch.equal(layer.qf_codes["default"], before)


def test_merge_and_unload_gives_float_linears_with_the_tuned_weights():
    model, layer = _wrap(_net())
    opt = QuantFullOptimizer(model, lr=1e-2)
    model(torch.randn(4, 48)).sum().backward()
    opt.step()
    x = torch.randn(3, 48)
    with torch.no_grad():
        expected = model(x)
    weight = layer.weight_of().clone()
    merged = model.merge_and_unload()
    assert type(merged[0]) is nn.Linear and torch.equal(merged[0].weight, weight)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), expected)


def test_bad_inputs():
    with pytest.raises(ValueError, match="needs target_modules"):
        QuantFullConfig()
    with pytest.raises(ValueError, match="outlier_fraction must be in"):
        QuantFullConfig(target_modules=["0"], outlier_fraction=0.7)
    with pytest.raises(ValueError, match="unknown field.*'stochastic_round' \\(did you mean 'stochastic_rounding'"):
        QuantFullConfig(target_modules=["0"], stochastic_round=False)
    with pytest.raises(ValueError, match="group_size=5 does not divide the input width 48"):
        _wrap(_net(), group_size=5)
    with pytest.raises(ValueError, match="QuantFull trains Linear layers only"):
        get_peft_model(nn.Sequential(nn.Conv2d(3, 4, 3)), QuantFullConfig(target_modules=["0"]))
    with pytest.raises(ValueError, match="found no QuantFull layer"):
        QuantFullOptimizer(_net())
    model, layer = _wrap(_net())
    with pytest.raises(RuntimeError, match="no QuantFullOptimizer is attached"):
        model(torch.randn(2, 48)).sum().backward()
    with pytest.raises(ValueError, match="unload\\(\\) cannot return them.*merge_and_unload"):
        model.unload()
    with pytest.raises(RuntimeError, match="original weights .* were released"):
        with model.disable_adapter():
            model(torch.randn(2, 48))
    with pytest.raises(ValueError, match="already holds"):
        model.add_adapter("second", QuantFullConfig(target_modules=["0"]))
