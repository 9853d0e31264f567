"""Merging QOFT into its base: exact for float layers, bounded re-quantization error for bitsandbytes."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

from peft_quant import QOFTConfig

from .conftest import BNB_VARIANTS, load_llama, randomize_adapter

# Relative RMS error of a merged, re-quantized layer's output vs the unmerged adapter's output, on this tiny Llama
# (64-wide layers, adapter std 0.05). Measured on 2026-11-24 (bitsandbytes 0.50.2, CPU): nf4 ≈ 0.09, fp4 ≈ 0.12,
# int8 ≈ 0.01; the bounds leave ~1.5x headroom. Quantizing the original float layer once costs about the same
# (second assertion): merging adds one re-quantization and nothing else.
MERGE_BOUNDS = {"nf4": 0.15, "fp4": 0.2, "nf4-dq": 0.15, "int8": 0.03}


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


@pytest.mark.parametrize("layer", [nn.Linear(32, 8), nn.Conv2d(8, 4, kernel_size=3, padding=1)])
def test_float_merge_unmerge_exact(layer):
    torch.manual_seed(0)
    original = layer.weight.detach().clone()
    model = get_peft_model(nn.Sequential(layer), QOFTConfig(target_modules=["0"], block_size=4))
    randomize_adapter(model, std=0.2)
    x = torch.randn(2, 32) if isinstance(layer, nn.Linear) else torch.randn(2, 8, 5, 5)
    unmerged = model(x)
    model.merge_adapter()
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(layer.weight, original, rtol=1e-6, atol=1e-6)  # inverse, not transpose
    merged = model.merge_and_unload()
    assert isinstance(merged[0], type(layer))
    torch.testing.assert_close(merged(x), unmerged, rtol=1e-5, atol=1e-5)
    assert merged.peft_quant_merge_report["0"]["relative_error"] < 1e-6


def test_several_adapters_merge_in_forward_order():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 4))
    model = get_peft_model(net, QOFTConfig(target_modules=["0"], block_size=4))
    model.add_adapter("b", QOFTConfig(target_modules=["0"], block_size=8))
    randomize_adapter(model, std=0.3)
    model.base_model.set_adapter(["default", "b"])
    x = torch.randn(3, 16)
    both = model(x)
    merged = model.merge_and_unload(adapter_names=["default", "b"])
    torch.testing.assert_close(merged(x), both, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", list(BNB_VARIANTS))
def test_bnb_merge_requantizes_into_same_format(tiny_llama_dir, variant):
    model = get_peft_model(load_llama(tiny_llama_dir, variant), QOFTConfig(target_modules=["q_proj"], block_size=16))
    randomize_adapter(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    base = layer.base_layer
    before = type(base), getattr(base.weight, "quant_type", None), getattr(base.weight, "compress_statistics", None)
    x = torch.randn(4, 64, requires_grad=True)
    unmerged = layer(x)
    float_q = load_llama(tiny_llama_dir).model.layers[0].self_attn.q_proj
    quantization_error = _rel_rms(layer.base_layer(x), float_q(x))  # what quantizing this layer once costs
    merged = model.merge_and_unload()
    new_base = merged.model.layers[0].self_attn.q_proj
    assert (type(new_base), getattr(new_base.weight, "quant_type", None),
            getattr(new_base.weight, "compress_statistics", None)) == before
    error = _rel_rms(new_base(x), unmerged)
    assert 0 < error < MERGE_BOUNDS[variant]
    assert error < 1.5 * quantization_error + 0.005
    report = merged.peft_quant_merge_report
    assert set(report) == {f"model.layers.{i}.self_attn.q_proj" for i in range(2)}
    assert all(0 < r["relative_error"] < MERGE_BOUNDS[variant] for r in report.values())
    assert report["model.layers.0.self_attn.q_proj"]["base"].startswith("bitsandbytes")


def test_bnb_merge_after_cpu_eval_forward(tiny_llama_dir):
    """bitsandbytes repacks 4-bit weights in place at the first eval-mode no-grad CPU forward (AVX512-BF16
    CPUs); merging must undo that layout first, or the merged weight is garbage."""
    model = get_peft_model(load_llama(tiny_llama_dir, "nf4"), QOFTConfig(target_modules=["q_proj"], block_size=16))
    randomize_adapter(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(4, 64)
    reference = layer(x.clone().requires_grad_())
    model.eval()
    with torch.no_grad():
        layer(x)  # repacks on AVX512-BF16 CPUs; elsewhere do what bitsandbytes would have done
    weight = layer.base_layer.weight
    if not getattr(weight.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu(weight.data, weight.quant_state)
    model.merge_adapter()
    assert _rel_rms(layer(x.clone().requires_grad_()), reference) < MERGE_BOUNDS["nf4"]


def test_safe_merge_refuses_nan():
    model = get_peft_model(nn.Sequential(nn.Linear(8, 2)), QOFTConfig(target_modules=["0"], block_size=4))
    with torch.no_grad():
        model.base_model.model[0].qoft_Q["default"].fill_(float("nan"))
    weight = model.base_model.model[0].base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaNs or Infs"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(model.base_model.model[0].base_layer.weight, weight)
