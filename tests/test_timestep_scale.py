"""TimestepScale: per-sample expert routing, every base layer kind against float64, checkpointing, merge, errors."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from torch import nn

from peft_quant import RoutingError, TimestepScaleConfig, UnsupportedLayerError, quantize_model
from peft_quant.int_quant import IntQuantized
from peft_quant.timestep_scale import TimestepScaleLayer


class _Single(nn.Module):
    """A minimal denoiser: ``forward(sample, timestep)`` applies one layer."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        return self.layer(sample)


def _experts(t: torch.Tensor, k: int = 2, total: float = 1000.0) -> torch.Tensor:
    return torch.clamp(torch.floor(t.double() * k / total), max=k - 1).long()


def _base(kind: str) -> tuple[nn.Module, torch.Tensor]:
    """A base layer of ``kind`` and an input for it."""
    torch.manual_seed(0)
    if kind.startswith("conv"):
        layer, x = nn.Conv2d(6, 8, kernel_size=3, padding=1), torch.randn(4, 6, 5, 5)
    else:
        layer, x = nn.Linear(64, 32), torch.randn(4, 3, 64)
    holder = nn.Sequential(layer)
    if kind.endswith("int4") or kind.endswith("int8"):
        quantize_model(holder, bits=int(kind[-1]), backend="int")
    elif kind in ("nf4", "int8-bnb"):
        pytest.importorskip("bitsandbytes")
        quantize_model(holder, bits=4 if kind == "nf4" else 8, backend="bitsandbytes")
    return holder[0], x


def _randomize(model: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ts_scale" in name:
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)


KINDS = ["linear", "conv", "linear-int4", "linear-int8", "conv-int4", "nf4", "int8-bnb"]


@pytest.mark.parametrize("kind", KINDS)
def test_identity_at_init_and_per_sample_routing_against_reference(kind):
    base, x = _base(kind)
    model = get_peft_model(_Single(base), TimestepScaleConfig())
    layer = model.base_model.model.layer
    t = torch.tensor([10, 999, 499, 500])  # experts 0, 1, 0, 1
    model.train()
    with torch.no_grad():
        expected_base = base(x)
        assert torch.equal(model(x, t), expected_base)  # all scales one: the base layer's output, bit for bit
    _randomize(model)
    out = model(x, t)
    k = _experts(t)
    s_in, s_out = layer.ts_scale_in["default"].detach()[k], layer.ts_scale_out["default"].detach()[k]
    view = (lambda s: s.view(4, -1, 1, 1)) if kind.startswith("conv") else (lambda s: s.view(4, 1, -1))
    bias = base.bias.detach()
    bias = bias.view(-1, 1, 1) if kind.startswith("conv") else bias
    if isinstance(base, IntQuantized) or type(base) in (nn.Linear, nn.Conv2d):
        # float64 reference: dequantize, then the textbook formula per sample
        weight = base.dequantize(torch.float64) if isinstance(base, IntQuantized) else base.weight.double()
        op = (lambda v: F.conv2d(v, weight, padding=1)) if kind.startswith("conv") else (lambda v: v @ weight.T)
        reference = view(s_out).double() * op(x.double() * view(s_in).double()) + bias.double()
        torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)
    else:
        # bitsandbytes: the base kernel on the scaled input is the reference for the quantized matmul
        with torch.no_grad():
            reference = view(s_out) * (base(x * view(s_in)) - bias) + bias
        torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
    assert (out - expected_base).abs().max() > 1e-2


def test_gradient_reaches_only_each_samples_expert_and_matches_float64():
    base, x = _base("linear-int4")
    model = get_peft_model(_Single(base), TimestepScaleConfig(num_experts=4))
    _randomize(model)
    layer = model.base_model.model.layer
    t = torch.tensor([100, 120, 760, 990])  # experts 0, 0, 3, 3: experts 1 and 2 unused
    model(x, t).pow(2).sum().backward()
    g_in, g_out = layer.ts_scale_in["default"].grad, layer.ts_scale_out["default"].grad
    assert torch.equal(g_in[1:3], torch.zeros_like(g_in[1:3])) and torch.equal(g_out[1:3], torch.zeros_like(g_out[1:3]))
    assert g_in[0].abs().sum() > 0 and g_in[3].abs().sum() > 0
    # float64 autograd reference
    s_in = layer.ts_scale_in["default"].detach().double().requires_grad_()
    s_out = layer.ts_scale_out["default"].detach().double().requires_grad_()
    k = _experts(t, 4)
    w = base.dequantize(torch.float64)
    y = s_out[k].view(4, 1, -1) * ((x.double() * s_in[k].view(4, 1, -1)) @ w.T) + base.bias.double()
    y.pow(2).sum().backward()
    torch.testing.assert_close(g_in.double(), s_in.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_out.double(), s_out.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("timestep,experts", [
    (torch.tensor(700), [1, 1, 1, 1]),  # scalar: the whole batch
    (torch.tensor([250]), [0, 0, 0, 0]),  # one value for all samples
    (300, [0, 0, 0, 0]),  # python int
    (torch.tensor([999.5, 0.0, 500.0, 1000.0]), [1, 0, 1, 1]),  # flow-matching floats; t = T belongs to the last
])
def test_timestep_forms(timestep, experts):
    base, x = _base("linear")
    model = get_peft_model(_Single(base), TimestepScaleConfig())
    model(x, timestep)
    router = model.base_model.model._peft_quant_timestep_router
    assert router.last_experts[(500.0,)].tolist() == experts


def test_explicit_boundaries_and_positional_or_keyword_timestep():
    base, x = _base("linear")
    config = TimestepScaleConfig(num_experts=3, expert_boundaries=[200, 300])
    model = get_peft_model(_Single(base), config)
    model(x, timestep=torch.tensor([199.9, 200, 299, 800]))
    assert model.base_model.model._peft_quant_timestep_router.last_experts[(200.0, 300.0)].tolist() == [0, 1, 1, 2]


@pytest.mark.diffusers
def test_classifier_free_guidance_doubled_batch_in_a_real_unet():
    """diffusers' UNet with CFG's doubled batch (timestep expanded to the batch): outputs of each half equal a
    separate call, and every sample uses its own expert."""
    unet = _tiny_unet()
    quantize_model(unet, bits=8)
    model = get_peft_model(unet, TimestepScaleConfig(init_weights=False))
    sample, enc = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    t = torch.tensor([900, 100])
    with torch.no_grad():
        doubled = model(torch.cat([sample, sample]), torch.cat([t, t]), encoder_hidden_states=torch.cat([enc, enc]))
        doubled = doubled.sample
        single = torch.cat([model(sample[i:i + 1], t[i], encoder_hidden_states=enc[i:i + 1]).sample for i in range(2)])
    torch.testing.assert_close(doubled[:2], single, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(doubled[2:], single, rtol=1e-5, atol=1e-5)


def _tiny_unet(layers_per_block: int = 1):
    pytest.importorskip("diffusers", reason="needs the [diffusers] extra")
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=layers_per_block, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
    )


@pytest.mark.diffusers
@pytest.mark.parametrize("enable_after_wrapping", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(enable_after_wrapping):
    """diffusers replays checkpointed blocks in backward, after the denoiser forward has returned (PEFT issue
    2826): the replay must route to the same experts, or gradients silently change."""
    grads = []
    for checkpointing in (False, True):
        unet = _tiny_unet()
        quantize_model(unet, bits=4)
        if checkpointing and not enable_after_wrapping:
            unet.enable_gradient_checkpointing()
        model = get_peft_model(unet, TimestepScaleConfig(init_weights=False))
        if checkpointing and enable_after_wrapping:
            model.base_model.model.enable_gradient_checkpointing()
        model.train()
        torch.manual_seed(1)
        out = model(torch.randn(3, 4, 8, 8), torch.tensor([50, 950, 600]), encoder_hidden_states=torch.randn(3, 5, 32))
        out.sample.pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys() and len(plain) > 20
    assert any("transformer_blocks" in n for n in plain)  # layers inside checkpointed blocks are covered
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-8, msg=name)
        assert plain[name].abs().sum() > 0, name


@pytest.mark.diffusers
def test_default_targets_every_linear_and_conv_and_second_adapter():
    unet = _tiny_unet()
    quantize_model(unet, bits=4)
    count = sum(isinstance(m, IntQuantized) for m in unet.modules())
    model = get_peft_model(unet, TimestepScaleConfig())
    layers = [m for m in model.modules() if isinstance(m, TimestepScaleLayer)]
    assert len(layers) == count
    model.add_adapter("other", TimestepScaleConfig(num_experts=1, train_input_scales=False))
    layers = [m for m in model.modules() if isinstance(m, TimestepScaleLayer)]
    assert len(layers) == count  # the second adapter joined the same wrappers, wrapping nothing inside them
    assert all(set(layer.ts_scale_out) == {"default", "other"} for layer in layers)


def _unet_output(model: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(2)
    with torch.no_grad():
        sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
        return model(sample, torch.tensor([50, 950]), encoder_hidden_states=text).sample


@pytest.mark.diffusers
def test_default_targets_are_saved_as_exact_names_and_reload(tmp_path):
    """The resolved defaults are saved as the layers' full names and a regex that fullmatches exactly them: PEFT's
    suffix matching of a list (which it also shortens to suffixes such as "2" for ff.net.2) hits other layers, or
    whole blocks, of a model with more layers per block."""
    model = get_peft_model(_tiny_unet(), TimestepScaleConfig(init_weights=False))
    wrapped = sorted(n for n, m in model.base_model.model.named_modules() if isinstance(m, TimestepScaleLayer))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["resolved_targets"] == wrapped
    bigger = [name for name, _ in _tiny_unet(layers_per_block=2).named_modules()]
    assert sorted(n for n in bigger if re.fullmatch(saved["target_modules"], n)) == wrapped
    loaded = PeftModel.from_pretrained(_tiny_unet(), tmp_path)
    assert sorted(n for n, m in loaded.base_model.model.named_modules() if isinstance(m, TimestepScaleLayer)) == wrapped
    torch.testing.assert_close(_unet_output(loaded), _unet_output(model), rtol=0, atol=0)


@pytest.mark.diffusers
@pytest.mark.parametrize("trained,loaded,problem", [(1, 2, r"\d+ not in the adapter"), (2, 1, r"\d+ missing here")])
def test_default_targeted_adapter_refuses_another_architecture(tmp_path, trained, loaded, problem):
    """A default-targeted adapter covers every supported layer of its model: loaded onto a UNet with more (or fewer)
    resnets per block it would leave layers unscaled (or scales unused), so it is refused before anything changes."""
    get_peft_model(_tiny_unet(trained), TimestepScaleConfig()).save_pretrained(tmp_path)
    other = _tiny_unet(loaded)
    with pytest.raises(ValueError, match=f"other ones: .*{problem}.*Fix: load it onto the model it was trained on"):
        PeftModel.from_pretrained(other, tmp_path)
    assert not any(isinstance(m, TimestepScaleLayer) for m in other.modules())
    assert not hasattr(other, "_peft_quant_timestep_router")


@pytest.mark.diffusers
def test_quantizing_after_wrapping_equals_quantizing_first():
    """quantize_model on a wrapped UNet swaps the base layers inside the wrappers: same targets, same outputs, and
    the layers know their new base format."""
    first = get_peft_model(quantize_model(_tiny_unet(), bits=4), TimestepScaleConfig(init_weights=False))
    after = get_peft_model(_tiny_unet(), TimestepScaleConfig())
    quantize_model(after, bits=4)
    scales = {k: v for k, v in first.state_dict().items() if "ts_scale" in k}
    assert after.load_state_dict(scales, strict=False).unexpected_keys == []
    assert after.peft_config["default"].resolved_targets == first.peft_config["default"].resolved_targets
    layers = [m for m in after.modules() if isinstance(m, TimestepScaleLayer)]
    assert {layer.base_format.label for layer in layers} == {"peft_quant int4"}
    torch.testing.assert_close(_unet_output(after), _unet_output(first), rtol=0, atol=0)


def test_called_outside_a_denoiser_forward_raises():
    base, x = _base("linear")
    model = get_peft_model(_Single(base), TimestepScaleConfig())
    with pytest.raises(RoutingError, match="outside a forward of the denoiser"):
        model.base_model.model.layer(x)


def test_bad_inputs():
    base, x = _base("linear")
    with pytest.raises(ValueError, match="unknown field.*'num_expert' \\(did you mean 'num_experts'\\?\\)"):
        TimestepScaleConfig(num_expert=2)
    with pytest.raises(ValueError, match="needs 2"):
        TimestepScaleConfig(num_experts=3, expert_boundaries=[500])
    with pytest.raises(ValueError, match="increase strictly"):
        TimestepScaleConfig(num_experts=3, expert_boundaries=[600, 300])
    with pytest.raises(ValueError, match="trains nothing"):
        TimestepScaleConfig(train_input_scales=False, train_output_scales=False)
    with pytest.raises(ValueError, match="target_modules and resolved_targets disagree.*Fix: set resolved_targets="):
        TimestepScaleConfig(target_modules=["conv_in"], resolved_targets=["conv_in", "conv_out"])
    model = get_peft_model(_Single(base), TimestepScaleConfig())
    with pytest.raises(RoutingError, match="outside \\[0, 1000\\].*num_train_timesteps"):
        model(x, torch.tensor([5000, 1, 2, 3]))
    with pytest.raises(RoutingError, match="called without its `timestep` argument"):
        model(x)

    class NoTimestep(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, sample):
            return self.lin(sample)

    with pytest.raises(ValueError, match="has no argument 'timestep'.*timestep_argument"):
        get_peft_model(NoTimestep(), TimestepScaleConfig())

    class WithEmbedding(_Single):
        def __init__(self):
            super().__init__(nn.Embedding(4, 4))

    with pytest.raises(UnsupportedLayerError, match="Supported base layers"):
        get_peft_model(WithEmbedding(), TimestepScaleConfig(target_modules=["layer"]))


# ---- merging -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "conv", "linear-int4", "conv-int8", "int8-bnb", "nf4"])
def test_single_expert_output_scales_merge_exactly(kind):
    """PEQA-style (output scales, one expert): the scales fold into the format's own scales, no re-quantization."""
    base, x = _base(kind)
    model = get_peft_model(_Single(base), TimestepScaleConfig(num_experts=1, train_input_scales=False))
    _randomize(model)
    model.train()
    with torch.no_grad():
        expected = model(x, 10)
    merged = model.merge_and_unload()
    assert type(merged.layer) is type(base)
    assert merged.peft_quant_merge_report["layer"]["relative_error"] < 1e-6  # float rounding of the folded scales
    with torch.no_grad():
        out = merged(x, 10)
    torch.testing.assert_close(out, expected, rtol=2e-6, atol=2e-6)  # float rounding only


@pytest.mark.parametrize("kind", ["linear", "linear-int4"])
def test_single_expert_input_scales_merge(kind):
    """Input scales fold exactly into a float weight; into a row-wise quantized format only by re-quantizing,
    whose error is reported."""
    base, x = _base(kind)
    model = get_peft_model(_Single(base), TimestepScaleConfig(num_experts=1))
    _randomize(model)
    with torch.no_grad():
        expected = model(x, 10)
    merged = model.merge_and_unload()
    error = merged.peft_quant_merge_report["layer"]["relative_error"]
    with torch.no_grad():
        out = merged(x, 10)
    if kind == "linear":
        assert error < 1e-6
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    else:
        assert 1e-3 < error < 0.2
        assert float((out - expected).norm() / expected.norm()) < 0.2


def test_merge_unmerge_roundtrip_and_several_experts_refused():
    base, x = _base("linear-int8")
    model = get_peft_model(_Single(copy.deepcopy(base)), TimestepScaleConfig(num_experts=1, train_input_scales=False))
    _randomize(model)
    with torch.no_grad():
        before = model(x, 3)
        model.merge_adapter()
        merged = model(x, 3)
        model.unmerge_adapter()
        after = model(x, 3)
    torch.testing.assert_close(merged, before, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(after, before, rtol=2e-6, atol=2e-6)
    several = get_peft_model(_Single(base), TimestepScaleConfig(num_experts=2))
    with pytest.raises(ValueError, match="2 timestep experts.*Fix: keep the adapter unmerged"):
        several.merge_and_unload()


def test_unload_detaches_the_router():
    base, x = _base("linear")
    model = get_peft_model(_Single(base), TimestepScaleConfig())
    plain = model.unload()
    assert not hasattr(plain, "_peft_quant_timestep_router")
    assert not plain._forward_pre_hooks and not plain._forward_hooks
    torch.testing.assert_close(plain(x, 5), base(x))


def test_adapters_must_agree_on_how_to_read_the_timestep():
    base, x = _base("linear")
    model = get_peft_model(_Single(base), TimestepScaleConfig())
    with pytest.raises(ValueError, match="must read the timestep the same way.*\\['default'\\]"):
        model.add_adapter("fraction", TimestepScaleConfig(timestep_multiplier=1000))
    model.base_model.delete_adapter("default")
    model.add_adapter("fraction", TimestepScaleConfig(timestep_multiplier=1000))  # no other adapter left: allowed
    model.set_adapter("fraction")
    model(x, torch.tensor([0.1, 0.2, 0.7, 0.9]))
    assert model.base_model.model._peft_quant_timestep_router.last_experts[(500.0,)].tolist() == [0, 0, 1, 1]
