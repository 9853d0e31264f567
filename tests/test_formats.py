"""The format layer: one object per base format, checked against references computed another way."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

import peft_quant
from peft_quant.quant_formats import UnsupportedLayerError, resolve_format

from .test_timestep_scale import _Single  # a denoiser-shaped wrapper: forward(sample, timestep)

# name -> quantize_model arguments (None: the float layer itself)
FORMATS = {
    "float": None,
    "int4": dict(bits=4),
    "int8": dict(bits=8),
    "nf4": dict(bits=4, backend="bitsandbytes", quant_type="nf4"),
    "fp4": dict(bits=4, backend="bitsandbytes", quant_type="fp4"),
    "nf4-dq": dict(bits=4, backend="bitsandbytes", quant_type="nf4", double_quant=True),
    "bnb-int8": dict(bits=8, backend="bitsandbytes"),
}
EXACT_FOLD = {"float", "int4", "int8", "nf4", "fp4", "bnb-int8"}  # nf4-dq re-quantizes its block scales


def _layer(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    linear = nn.Linear(128, 64)
    if FORMATS[name] is None:
        return linear
    if FORMATS[name].get("backend") == "bitsandbytes":
        pytest.importorskip("bitsandbytes")
    return peft_quant.quantize_model(linear, **FORMATS[name])


def _reference_weight(layer: nn.Module) -> torch.Tensor:
    """The float weight each format's own primitives give, without peft-quant's format objects."""
    if isinstance(layer, peft_quant.int_quant.IntQuantized):
        codes = peft_quant.int_quant.unpack(layer.qweight, layer.bits, layer.weight_shape[1]).double()
        return (codes - layer.zero.double()[:, None]) * layer.scale.double()[:, None]
    if type(layer) is nn.Linear:
        return layer.weight.detach().double()
    import bitsandbytes as bnb

    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).double()
    scb = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
    return layer.weight.data.double() * scb.double()[:, None] / 127


def _stored(layer: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the layer stores (bitsandbytes' quant state included), for bit-for-bit comparisons."""
    tensors = {k: v.detach().clone() for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}
    state = getattr(getattr(layer, "weight", None), "quant_state", None)
    if state is not None:
        tensors["absmax"] = state.absmax.clone()
    return tensors


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name", list(FORMATS))
def test_dequantize_matches_the_formats_own_primitives_and_the_forward(name):
    layer = _layer(name)
    fmt = resolve_format(layer)
    weight = fmt.dequantize(torch.float64)
    torch.testing.assert_close(weight, _reference_weight(layer), rtol=0, atol=1e-6)
    x = torch.randn(5, 128)
    with torch.no_grad():
        out = layer(x).double()
    expected = x.double() @ weight.T + layer.bias.double()
    assert float((out - expected).norm() / expected.norm()) < (2e-2 if name == "bnb-int8" else 1e-5)


@pytest.mark.parametrize("name", list(FORMATS))
def test_requantize_then_restore_is_bit_exact(name):
    layer = _layer(name)
    fmt = resolve_format(layer)
    before = _stored(layer)
    state = fmt.save_state()
    target = fmt.dequantize(torch.float64) * 1.5 + 0.01
    fmt.requantize(target)
    stored = fmt.dequantize(torch.float64)
    assert not torch.equal(stored, _reference_weight(_layer(name)))  # something was really written
    assert float((stored - target).norm() / target.norm()) < 0.15  # in the same format, within its precision
    assert type(resolve_format(layer)) is type(fmt)
    fmt.restore_state(state)
    _assert_same(_stored(layer), before)
    with torch.no_grad():
        torch.testing.assert_close(layer(torch.ones(2, 128)), _layer(name)(torch.ones(2, 128)), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(FORMATS))
def test_output_folds_are_exact_where_the_format_has_row_scales(name):
    layer = _layer(name)
    factor = torch.linspace(0.5, 1.5, 64)
    x = torch.randn(3, 128)
    with torch.no_grad():
        expected = (layer(x) - layer.bias) * factor + layer.bias
    folded = resolve_format(layer).fold_output_scale(factor)
    assert folded == (name in EXACT_FOLD)
    if folded:
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    else:
        _assert_same(_stored(layer), _stored(_layer(name)))  # unchanged


def test_unsupported_layers_say_why_and_name_the_fix():
    with pytest.raises(UnsupportedLayerError, match="not a supported layer type.*Fix"):
        resolve_format(nn.Embedding(4, 4))
    layer = nn.Linear(4, 4)
    layer.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(UnsupportedLayerError, match="dtype torch.int8, not a float dtype.*Fix"):
        resolve_format(layer)


def test_quantize_model_on_a_root_layer_returns_the_quantized_layer():
    linear = nn.Linear(64, 32)
    quantized = peft_quant.quantize_model(linear, bits=4)
    assert isinstance(quantized, peft_quant.int_quant.IntLinear)
    torch.testing.assert_close(resolve_format(quantized).dequantize(), resolve_format(linear).dequantize(),
                               rtol=0, atol=float(quantized.scale.max()) / 2 + 1e-7)


def test_quantize_model_after_get_peft_model_quantizes_the_base_and_re_resolves_its_format():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    model = get_peft_model(net, peft_quant.QOFTConfig(target_modules=["0"], block_size=8, init_weights=False))
    peft_quant.quantize_model(model, bits=4)
    layer = model.base_model.model[0]
    assert layer.base_format.label == "peft_quant int4"
    x = torch.randn(4, 64)
    with torch.no_grad():
        unmerged = model(x)
        merged = model.merge_and_unload()
        error = float((merged(x) - unmerged).norm() / unmerged.norm())
    assert 0 < error < 0.2 and merged.peft_quant_merge_report["0"]["base"] == "peft_quant int4"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["float", "int4", "nf4"])
def test_adapter_dtype_follows_peft_policy(name, dtype):
    """float32 adapters by default (PEFT's autocast_adapter_dtype=True); the base's dtype when it is False."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64)).to(dtype)
    if FORMATS[name] is not None:
        if FORMATS[name].get("backend") == "bitsandbytes":
            pytest.importorskip("bitsandbytes")
        peft_quant.quantize_model(net, **FORMATS[name])
    for autocast, expected in ((True, torch.float32), (False, dtype)):
        for config in (peft_quant.QOFTConfig(target_modules=["0"], block_size=8),
                       peft_quant.TimestepScaleConfig(target_modules=["0"], num_experts=1)):
            model = get_peft_model(_Single(net), config, autocast_adapter_dtype=autocast)
            params = [p for n, p in model.named_parameters() if p.requires_grad]
            assert params and all(p.dtype == expected for p in params)
            out = model(torch.randn(2, 64, dtype=dtype), 3)
            assert out.dtype == dtype
            out.float().sum().backward()
            assert all(p.grad is not None and p.grad.dtype == expected for p in params)
            model.unload()



def test_quantize_model_leaves_adapter_modules_and_modules_to_save_in_float():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 8))
    model = get_peft_model(net, peft_quant.StashQuantConfig(target_modules=["0"], modules_to_save=["3"]))
    peft_quant.quantize_model(model, bits=8, exclude_modules=["0"])
    inner = model.base_model.model
    assert isinstance(inner[2], peft_quant.int_quant.IntLinear)  # an ordinary base layer
    assert type(inner[0].stash_module["default"]) is nn.Linear  # StashQuant's trained copy
    assert type(inner[3].modules_to_save["default"]) is nn.Linear  # the trained copy of modules_to_save
    assert isinstance(inner[3].original_module, peft_quant.int_quant.IntLinear)  # its frozen original is a base
