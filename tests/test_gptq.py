"""QOFT on GPTQ layers loaded through transformers' GPTQ integration (gptqmodel): forward, backward, artifacts."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_quant import QOFTConfig
from peft_quant.qoft.rotation import cayley_neumann, rotate

from .conftest import load_gptq, randomize_adapter

pytest.importorskip("gptqmodel", reason="GPTQ tests need the [gptq] extra")


def _wrapped(tiny_gptq_dir, backend="gptq_torch"):
    model = get_peft_model(load_gptq(tiny_gptq_dir, backend), QOFTConfig(target_modules=["down_proj"], block_size=32))
    randomize_adapter(model)
    return model


def test_forward_backward_against_dequantized_float64(tiny_gptq_dir):
    model = _wrapped(tiny_gptq_dir)
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    assert layer.base_format.backend == "gptq" and layer.base_format.label == "gptq int4 (group size 32)"
    weight = layer.get_base_layer().dequantize_weight().double()  # (in, out)
    packed = layer.qoft_Q["default"]
    x = torch.randn(3, 128, requires_grad=True)
    y = layer(x)
    y.pow(2).sum().backward()
    ref_packed = packed.detach().double().requires_grad_()
    ref = rotate(x.detach().double(), cayley_neumann(ref_packed, 32, 5)) @ weight
    ref.pow(2).sum().backward()
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(packed.grad.double(), ref_packed.grad, rtol=1e-3, atol=1e-4)


def test_merge_is_refused_with_the_fix(tiny_gptq_dir):
    model = _wrapped(tiny_gptq_dir)
    with pytest.raises(ValueError, match=r"cannot merge into these layers.*gptq int4.*Fix: keep the adapter unmerged"):
        model.merge_and_unload()
    assert model.unload().model.layers[1].mlp.down_proj.__class__.__name__ == "TorchLinear"


def test_save_load_identical_logits(tiny_gptq_dir, tmp_path):
    model = _wrapped(tiny_gptq_dir)
    tokens = torch.randint(0, 256, (2, 9))
    model.eval()
    with torch.no_grad():
        expected = model(tokens).logits
    model.save_pretrained(tmp_path)
    assert "gptq int4 (group size 32)" in (tmp_path / "README.md").read_text()
    reloaded = PeftModel.from_pretrained(load_gptq(tiny_gptq_dir), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, expected)


def _reference_grad(layer, x):
    """Gradient of ``sum(base(Rᵀx)²)`` w.r.t. the packed rotation, through the dequantized weight in float64."""
    weight = layer.get_base_layer().dequantize_weight().double()  # (in, out)
    packed = layer.qoft_Q["default"].detach().double().requires_grad_()
    (rotate(x.double(), cayley_neumann(packed, 32, 5)) @ weight).pow(2).sum().backward()
    return packed.grad


def test_torch_kernel_runs_frozen_and_saves_no_float_weight(tiny_gptq_dir, monkeypatch):
    """gptqmodel's torch kernel would save a dequantized float copy of the whole weight for backward: the GPTQ format
    runs it without autograd (even a kernel cut from autograd gives the exact gradient) and backward computes the
    input gradient from the stored codes, so QOFT keeps only its input."""
    model = _wrapped(tiny_gptq_dir)
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    base = layer.get_base_layer()
    monkeypatch.setattr(base, "forward", torch.no_grad()(base.forward))
    x = torch.randn(2, 128, requires_grad=True)
    owned = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = set()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() not in owned:
            saved.add(tensor.untyped_storage().data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = layer(x)
    assert saved == {x.untyped_storage().data_ptr()}
    out.pow(2).sum().backward()
    torch.testing.assert_close(layer.qoft_Q["default"].grad.double(), _reference_grad(layer, x.detach()), rtol=1e-3,
                               atol=1e-4)


def test_aten_kernel_after_eval_forward_is_never_silently_wrong(tiny_gptq_dir):
    """gptqmodel's TorchAtenLinear can switch for good to a no-grad kernel when its first forward runs in eval mode
    without gradients (whether it does depends on the torch build). Training afterwards must either raise QOFT's
    error or give the exact gradient, never a silently missing one."""
    model = _wrapped(tiny_gptq_dir, backend="gptq_torch_aten")
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    model.eval()
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 8)))
    model.train()
    x = torch.randn(3, 128)
    try:
        layer(x).pow(2).sum().backward()
    except RuntimeError as error:
        assert "returned an output without gradient" in str(error)
        return
    reference = _reference_grad(layer, x)
    torch.testing.assert_close(layer.qoft_Q["default"].grad.double(), reference, rtol=1e-3, atol=1e-4)


def test_timestep_scale_on_a_gptq_layer(tiny_gptq_dir):
    """TimestepScale only touches a layer's input and output, so a GPTQ layer works as is: forward and gradients
    against the dequantized weight in float64; merging is refused."""
    from torch import nn

    from peft_quant import TimestepScaleConfig

    class Denoiser(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, sample, timestep):
            return self.layer(sample)

    base = load_gptq(tiny_gptq_dir).model.layers[1].mlp.down_proj
    model = get_peft_model(Denoiser(base), TimestepScaleConfig(init_weights=False))
    layer = model.base_model.model.layer
    x, t = torch.randn(2, 3, 128), torch.tensor([100, 900])  # experts 0 and 1
    model(x, t).pow(2).sum().backward()
    s_in = layer.ts_scale_in["default"].detach().double().requires_grad_()
    s_out = layer.ts_scale_out["default"].detach().double().requires_grad_()
    k = torch.tensor([0, 1])
    weight = base.dequantize_weight().double()  # (in, out)
    reference = s_out[k].view(2, 1, -1) * ((x.double() * s_in[k].view(2, 1, -1)) @ weight)
    reference.pow(2).sum().backward()
    torch.testing.assert_close(layer.ts_scale_in["default"].grad.double(), s_in.grad, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(layer.ts_scale_out["default"].grad.double(), s_out.grad, rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="cannot merge into these layers.*gptq int4"):
        model.merge_and_unload()


def test_quant_full_dequantizes_a_gptq_base_once_and_trains_it(tiny_gptq_dir):
    from peft_quant import QuantFullConfig, QuantFullOptimizer

    base = load_gptq(tiny_gptq_dir)
    original = base.model.layers[1].mlp.down_proj.dequantize_weight().T.float().clone()  # (out, in)
    model = get_peft_model(base, QuantFullConfig(target_modules=["down_proj"]))
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    assert layer.base_format.label == "gptq int4 (group size 32)"
    assert ((layer.weight_of() - original).abs() <= layer.qf_scale["default"] / 2 + 1e-6).all()
    QuantFullOptimizer(model, lr=1e-3)
    before = layer.qf_codes["default"].clone()
    tokens = torch.randint(0, 256, (2, 8))
    model(input_ids=tokens, labels=tokens).loss.backward()
    assert not torch.equal(layer.qf_codes["default"], before)
    merged = model.merge_and_unload()
    assert type(merged.model.layers[1].mlp.down_proj) is torch.nn.Linear
