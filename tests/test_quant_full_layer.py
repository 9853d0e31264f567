"""QuantFull's layer contract with PEFT: frozen biases, inactive adapters, merge/unmerge, dtypes, anchor shape,
hyperparameter checks, low_cpu_mem_usage and autocast_adapter_dtype. Tiny models; references recomputed from the
dequantized int8 state with ``F.linear``."""

from __future__ import annotations

import gc
import json
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from torch import nn

from peft_quant import QuantFullConfig, QuantFullOptimizer
from peft_quant.config_base import AdapterFormatError
from peft_quant.quant_full import QuantFullLayer
from peft_quant.quant_full.layer import ReleasedLinear

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# relative RMS error of one Linear computed in a dtype against float64: a few units of the dtype's rounding
REL_RMS = {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def _net(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 32), nn.GELU(), nn.Linear(32, 16)).to(dtype)


def _layers(model: nn.Module) -> list[QuantFullLayer]:
    return [m for m in model.modules() if isinstance(m, QuantFullLayer)]


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The wrapped ``_net`` recomputed in float64 from each layer's dequantized int8 state and bias."""
    layers = {i: model.base_model.model[i] for i in (0, 2)}
    h = x.double()
    for i in (0, 2):
        layer = layers[i]
        bias = layer.qf_bias[layer.adapter].detach().double()
        h = F.linear(h, layer.weight_of(torch.float64), bias)
        h = F.gelu(h) if i == 0 else h
    return h


def _rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def _trainable(model: nn.Module) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, p in model.named_parameters() if p.requires_grad}


# ---- 1. train_bias=False holds on creation, after set_adapter and after loading trainable ----------------------------


def test_train_bias_false_holds_on_every_path_and_per_adapter(tmp_path):
    model = get_peft_model(_net(), QuantFullConfig(target_modules=["0"], train_bias=False))
    model.add_adapter("b", QuantFullConfig(target_modules=["2"]))  # train_bias=True
    model.base_model.set_adapter(["default", "b"])
    expected = {"0.qf_anchor.default", "2.qf_anchor.b", "2.qf_bias.b"}
    assert _trainable(model) == expected
    model.base_model.set_adapter(["b", "default"])  # PEFT's set_adapter turns every adapter tensor back on
    assert _trainable(model) == expected
    with model.disable_adapter():
        pass  # re-enabling goes through set_adapter too
    assert _trainable(model) == expected

    single = get_peft_model(_net(), QuantFullConfig(target_modules=["0", "2"], train_bias=False))
    assert _trainable(single) == {"0.qf_anchor.default", "2.qf_anchor.default"}
    single.set_adapter("default")
    assert _trainable(single) == {"0.qf_anchor.default", "2.qf_anchor.default"}
    single.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_net(), tmp_path, is_trainable=True)
    assert _trainable(loaded) == {"0.qf_anchor.default", "2.qf_anchor.default"}
    bias = loaded.base_model.model[0].qf_bias["default"].detach().clone()
    optimizer = QuantFullOptimizer(loaded, lr=1e-2)
    loaded(torch.randn(4, 48)).sum().backward()
    optimizer.step()
    assert torch.equal(loaded.base_model.model[0].qf_bias["default"], bias)


# ---- 2. a layer whose adapter is inactive refuses to run -------------------------------------------------------------


def test_inactive_adapter_raises_and_activating_both_runs_each_layers_own_state():
    model = get_peft_model(_net(), QuantFullConfig(target_modules=["0"]))
    model.add_adapter("b", QuantFullConfig(target_modules=["2"]))
    x = torch.randn(3, 48)
    model.set_adapter("b")
    with pytest.raises(RuntimeError, match="holds adapter 'default', which is not active.*Fix: keep every QuantFull"):
        model(x)
    model.base_model.set_adapter(["default", "b"])
    with torch.no_grad():
        assert _rel_rms(model(x), _reference(model, x)) < REL_RMS[torch.float32]
    with pytest.raises(ValueError, match=r"adapter is not merged.*0 \('default'\).*Fix: .*\['b', 'default'\]"):
        model.merge_and_unload(adapter_names=["b"])


# ---- 3. merge and unmerge are a pair ---------------------------------------------------------------------------------


def test_merge_unmerge_round_trip_keeps_the_int8_state_driving():
    model = get_peft_model(_net(), QuantFullConfig(target_modules=["0", "2"]))
    optimizer = QuantFullOptimizer(model, lr=1e-2)
    model(torch.randn(4, 48)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    x = torch.randn(3, 48)
    with torch.no_grad():
        before = model(x)
    layer = model.base_model.model[0]
    model.merge_adapter()
    assert type(layer.base_layer) is nn.Linear and layer.merged_adapters == ["default"]
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert layer.merged_adapters == ["default"]  # not recorded twice
    with torch.no_grad():
        assert _rel_rms(model(x), _reference(model, x)) < REL_RMS[torch.float32]
    with pytest.raises(RuntimeError, match="were released"):  # disabled: unmerges, never runs the tuned weights
        with model.disable_adapter():
            model(x)
    assert not layer.merged and isinstance(layer.base_layer, ReleasedLinear)
    model.merge_adapter()
    model.unmerge_adapter()
    assert all(isinstance(m.base_layer, ReleasedLinear) and not m.merged for m in _layers(model))
    with torch.no_grad():
        assert torch.equal(model(x), before)
    codes = layer.qf_codes["default"].clone()
    model(x).sum().backward()  # the int8 state trains again
    assert not torch.equal(layer.qf_codes["default"], codes)


def test_wrapping_frees_the_base_weights():
    net = _net()
    base = weakref.ref(net[0])
    model = get_peft_model(net, QuantFullConfig(target_modules=["0"]))
    del net
    gc.collect()
    assert base() is None, "the replaced base Linear (and its weight) is still referenced"
    assert model.base_model.model[0].base_format.label == "torch float32"


# ---- 4. dtypes -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_of_any_dtype_trains_and_merges_to_its_dtype(dtype):
    model = get_peft_model(_net(dtype), QuantFullConfig(target_modules=["0", "2"]))
    optimizer = QuantFullOptimizer(model, lr=1e-2)
    layer = model.base_model.model[0]
    codes, bias = layer.qf_codes["default"].clone(), layer.qf_bias["default"].detach().clone()
    x = torch.randn(4, 48, dtype=dtype, requires_grad=True)
    out = model(x)
    assert out.dtype == dtype
    out.float().pow(2).mean().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    optimizer.step()
    assert not torch.equal(layer.qf_codes["default"], codes) and not torch.equal(layer.qf_bias["default"], bias)
    probe = torch.randn(5, 48, dtype=dtype)
    tuned = {str(i): model.base_model.model[i].weight_of(torch.float64) for i in (0, 2)}
    with torch.no_grad():
        unmerged = model(probe)
        assert _rel_rms(unmerged, _reference(model, probe)) < REL_RMS[dtype]
        merged = model.merge_and_unload()
        assert all(m.weight.dtype == dtype and m.bias.dtype == dtype for m in merged.modules()
                   if isinstance(m, nn.Linear))
        assert _rel_rms(merged(probe), unmerged) < REL_RMS[dtype]
    for name, weight in tuned.items():  # the report states the rounding to the model's dtype
        error = _rel_rms(merged.get_submodule(name).weight, weight)
        assert merged.peft_quant_merge_report[name]["relative_error"] == pytest.approx(error, rel=1e-6, abs=1e-12)
        assert (error == 0.0) == (dtype == torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_casting_after_wrapping_keeps_int8_codes_and_merges_to_the_new_dtype(dtype):
    model = get_peft_model(_net(), QuantFullConfig(target_modules=["0", "2"]))
    model = model.half() if dtype == torch.float16 else model.to(dtype)
    layer = model.base_model.model[0]
    assert layer.qf_codes["default"].dtype == torch.int8 and layer.qf_outlier_index["default"].dtype == torch.int32
    x = torch.randn(5, 48, dtype=dtype)
    with torch.no_grad():
        out = model(x)
        assert out.dtype == dtype
        assert _rel_rms(out, _reference(model, x)) < REL_RMS[dtype]
        merged = model.merge_and_unload()
        assert merged[0].weight.dtype == dtype
        assert _rel_rms(merged(x), out) < REL_RMS[dtype]


# ---- 5. the anchor is 1-D, format version 2 --------------------------------------------------------------------------


def test_anchor_is_one_dimensional_and_the_adapter_is_format_2(tmp_path):
    model = get_peft_model(_net(), QuantFullConfig(target_modules=["0", "2"]))
    assert all(m.qf_anchor["default"].shape == (1,) for m in _layers(model))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["format_version"] == 2
    loaded = PeftModel.from_pretrained(_net(), tmp_path)
    x = torch.randn(3, 48)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    config["format_version"] = 1
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFormatError, match="format_version=1.*reads format_version=2"):
        PeftModel.from_pretrained(_net(), tmp_path)


# ---- 6. non-finite hyperparameters -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"lr": math.inf}, "finite lr > 0"),
    ({"weight_decay": math.nan}, "weight_decay=nan"),
    ({"betas": (0.9, math.nan)}, "betas=\\(0.9, nan\\)"),
    ({"max_grad_norm": math.inf}, "max_grad_norm=inf"),
])
def test_optimizer_refuses_non_finite_hyperparameters(kwargs, match):
    model = get_peft_model(_net(), QuantFullConfig(target_modules=["0"]))
    with pytest.raises(ValueError, match=f"{match}.*Fix: "):
        QuantFullOptimizer(model, **{"lr": 1e-3, **kwargs})


def test_scheduler_writing_inf_raises_before_the_state_changes():
    model = get_peft_model(_net(), QuantFullConfig(target_modules=["0", "2"]))
    optimizer = QuantFullOptimizer(model, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 if step == 0 else math.inf)
    x = torch.randn(4, 48)
    model(x).sum().backward()
    optimizer.step()
    scheduler.step()  # writes lr = inf into every group
    assert optimizer.param_groups[0]["lr"] == math.inf
    state = {n: t.clone() for n, t in model.state_dict().items()}
    momentum = [s["momentum_codes"].clone() for s in optimizer.state.values() if "momentum_codes" in s]
    with pytest.raises(ValueError, match=r"param_groups\[0\] \('int8'\) holds lr=inf.*Fix: "):
        model(x).sum().backward()
    with pytest.raises(ValueError, match=r"param_groups\[0\] \('int8'\) holds lr=inf"):
        optimizer.step()
    assert all(torch.equal(t, state[n]) for n, t in model.state_dict().items())
    assert all(torch.equal(s["momentum_codes"], m) for s, m in
               zip([s for s in optimizer.state.values() if "momentum_codes" in s], momentum))
    optimizer.param_groups[0]["lr"] = 1e-3
    optimizer.param_groups[1].update(lr=1e-3, weight_decay=math.nan)
    with pytest.raises(ValueError, match=r"param_groups\[1\] \('float'\) holds weight_decay=nan"):
        optimizer.step()


# ---- 7. low_cpu_mem_usage and autocast_adapter_dtype -----------------------------------------------------------------


def test_low_cpu_mem_usage_new_adapter_raises_and_loading_with_it_is_exact(tmp_path):
    empty = get_peft_model(_net(), QuantFullConfig(target_modules=["0", "2"]), low_cpu_mem_usage=True)
    with pytest.raises(RuntimeError, match="meta device.*low_cpu_mem_usage=True.*Fix: "):
        empty(torch.randn(2, 48))
    model = get_peft_model(_net(), QuantFullConfig(target_modules=["0", "2"]))
    optimizer = QuantFullOptimizer(model, lr=1e-2)
    model(torch.randn(4, 48)).sum().backward()
    optimizer.step()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_net(), tmp_path, low_cpu_mem_usage=True)
    assert not any(t.is_meta for t in loaded.state_dict().values())
    x = torch.randn(3, 48)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_autocast_adapter_dtype_leaves_the_float32_state_of_a_bf16_model(autocast_adapter_dtype):
    model = get_peft_model(_net(torch.bfloat16), QuantFullConfig(target_modules=["0", "2"]),
                           autocast_adapter_dtype=autocast_adapter_dtype)
    layer = model.base_model.model[0]
    assert layer.qf_codes["default"].dtype == torch.int8
    assert {t.dtype for t in (layer.qf_scale["default"], layer.qf_outlier_value["default"],
                              layer.qf_bias["default"], layer.qf_anchor["default"])} == {torch.float32}
    x = torch.randn(3, 48, dtype=torch.bfloat16)
    with torch.no_grad():
        assert _rel_rms(model(x), _reference(model, x)) < REL_RMS[torch.bfloat16]


def test_a_layer_whose_adapter_was_deleted_says_so():
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4)), QuantFullConfig(target_modules=["0"]))
    model.add_adapter("other", QuantFullConfig(target_modules=["1"]))
    model.delete_adapter("default")
    model.set_adapter("other")
    with pytest.raises(RuntimeError, match="adapter was deleted.*Fix: load the adapter again"):
        model(torch.randn(2, 16))
