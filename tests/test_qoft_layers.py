"""QOFT layers on every supported base: forward and backward against references computed another way."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn

from peft_quant import QOFTConfig, UnsupportedLayerError
from peft_quant.qoft import QOFTLayer
from peft_quant.qoft.rotation import rotate

from .conftest import BNB_VARIANTS, load_llama, randomize_adapter


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def _f64_rotation(layer: QOFTLayer, name: str = "default") -> torch.Tensor:
    """The layer's rotation blocks recomputed in float64 from its parameters."""
    from peft_quant.qoft.rotation import cayley_neumann

    return cayley_neumann(layer.qoft_Q[name].detach().double(), layer.qoft_block_size[name], layer.qoft_num_terms[name])


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(24, 10)
        self.conv = nn.Conv2d(12, 6, kernel_size=3, stride=2, padding=1)
        self.emb = nn.Embedding(5, 12)


def test_linear_forward_and_identity_at_init():
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(3, 5, 24)
    expected = net.lin(x)
    model = get_peft_model(net, QOFTConfig(target_modules=["lin"], block_size=8))
    layer = model.base_model.model.lin
    assert torch.equal(layer(x), expected)  # exact identity at init
    randomize_adapter(model)
    w, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    reference = rotate(x.double(), _f64_rotation(layer)) @ w.T + b
    torch.testing.assert_close(layer(x).double(), reference, rtol=1e-5, atol=1e-5)
    assert _rel_rms(layer(x), expected) > 1e-3  # the adapter really changes the output


@pytest.mark.parametrize("kernel,stride,padding", [(1, 1, 0), (3, 2, 1), (5, 1, 2)])
def test_conv2d_rotates_input_channels_exactly(kernel, stride, padding):
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 6, kernel_size=kernel, stride=stride, padding=padding)
    net = nn.Sequential(conv)
    x = torch.randn(2, 12, 9, 9)
    expected = conv(x)
    model = get_peft_model(net, QOFTConfig(target_modules=["0"], block_size=4))
    layer = model.base_model.model[0]
    assert torch.equal(layer(x), expected)
    randomize_adapter(model)
    rotated = rotate(x.double(), _f64_rotation(layer), dim=1)
    reference = F.conv2d(rotated, conv.weight.double(), conv.bias.double(), stride=stride, padding=padding)
    torch.testing.assert_close(layer(x).double(), reference, rtol=1e-5, atol=1e-5)


def test_backward_matches_float64_autograd():
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(16, 4)), QOFTConfig(target_modules=["0"], block_size=4))
    randomize_adapter(model)
    layer = model.base_model.model[0]
    x = torch.randn(6, 16)
    layer(x).pow(2).sum().backward()
    packed = layer.qoft_Q["default"].detach().double().requires_grad_()
    from peft_quant.qoft.rotation import cayley_neumann

    out = rotate(x.double(), cayley_neumann(packed, 4, 5)) @ layer.base_layer.weight.double().T
    (out + layer.base_layer.bias.double()).pow(2).sum().backward()
    torch.testing.assert_close(layer.qoft_Q["default"].grad.double(), packed.grad, rtol=1e-4, atol=1e-5)
    assert layer.base_layer.weight.grad is None  # the base stays frozen


@pytest.mark.parametrize("variant", list(BNB_VARIANTS))
def test_bitsandbytes_forward_backward(tiny_llama_dir, variant):
    """On bnb layers QOFT calls the quantized layer on the rotated input; gradients reach only the rotation.

    Reference: the same quantized layer called on an input rotated in float64 (tight), and the dequantized weight
    in float64 (loose: bitsandbytes' CPU kernels round activations, int8 to 8 bits per row).
    """
    base = load_llama(tiny_llama_dir, variant)
    model = get_peft_model(base, QOFTConfig(target_modules=["q_proj", "v_proj"], block_size=16))
    randomize_adapter(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.base_format.backend == "bitsandbytes"
    assert layer.base_format.bits == (8 if variant == "int8" else 4)
    assert layer.base_format.double_quant == variant.endswith("-dq")
    x = torch.randn(2, 5, 64, requires_grad=True)
    y = layer(x)
    # an input that requires grad keeps bnb on its fp32 path (eval + no-grad inputs switch it to a bf16 kernel)
    rotated = rotate(x.detach().double(), _f64_rotation(layer)).float().requires_grad_()
    assert _rel_rms(y, layer.base_layer(rotated)) < 1e-5
    weight = layer.get_base_weight().double()
    assert _rel_rms(y, rotated.double() @ weight.T) < (3e-2 if variant == "int8" else 1e-2)
    y.pow(2).sum().backward()
    grad = layer.qoft_Q["default"].grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is None for n, p in model.named_parameters() if "qoft_" not in n)


@pytest.mark.parametrize("variant", [None, "nf4"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_llama_dir, variant, reentrant):
    """With transformers' gradient checkpointing the decoder layers (and the rotations inside them) are replayed in
    backward: the rotation's own recomputation must compose with that replay and give the same gradients."""
    grads, losses = [], []
    for checkpointing in (False, True):
        base = load_llama(tiny_llama_dir, variant)
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            base.enable_input_require_grads()  # the reentrant replay needs an input that requires grad
        model = get_peft_model(base, QOFTConfig(block_size=16, target_modules="all-linear"))
        randomize_adapter(model)
        model.train()
        ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys() and len(plain) == 14  # 7 projections × 2 layers
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    for name in plain:
        assert plain[name].abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_block_share_and_num_blocks():
    net = nn.Sequential(nn.Linear(24, 3))
    model = get_peft_model(net, QOFTConfig(target_modules=["0"], num_blocks=3, block_share=True))
    layer = model.base_model.model[0]
    assert layer.qoft_block_size["default"] == 8
    assert tuple(layer.qoft_Q["default"].shape) == (1, 28)
    randomize_adapter(model)
    x = torch.randn(4, 24)
    block = _f64_rotation(layer)[0]
    reference = x.double() @ torch.block_diag(block, block, block) @ net[0].weight.double().T + net[0].bias.double()
    torch.testing.assert_close(layer(x).double(), reference, rtol=1e-5, atol=1e-5)


def test_module_dropout_really_applies():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 8))
    model = get_peft_model(net, QOFTConfig(target_modules=["0"], block_size=4, module_dropout=1.0))
    randomize_adapter(model)
    layer = model.base_model.model[0]
    x = torch.randn(3, 64)
    model.train()
    assert torch.equal(layer(x), layer.base_layer(x))  # every block dropped
    model.eval()
    assert _rel_rms(layer(x), layer.base_layer(x)) > 1e-3  # dropout is off in eval
    layer.qoft_dropout["default"] = 0.5
    model.train()
    dropped = [1 - float(layer._dropout_keep("default").float().mean()) for _ in range(200)]
    assert abs(sum(dropped) / len(dropped) - 0.5) < 0.05  # 16 blocks x 200 draws


def test_several_adapters_set_disable_delete():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 4))
    x = torch.randn(5, 16)
    expected = net(x)
    model = get_peft_model(net, QOFTConfig(target_modules=["0"], block_size=4))
    model.add_adapter("other", QOFTConfig(target_modules=["0"], block_size=8))
    randomize_adapter(model)
    layer = model.base_model.model[0]
    out_default = model(x)
    model.set_adapter("other")
    assert layer.qoft_Q["other"].requires_grad and not layer.qoft_Q["default"].requires_grad
    out_other = model(x)
    assert _rel_rms(out_default, out_other) > 1e-3
    reference = rotate(x.double(), _f64_rotation(layer, "other")) @ net[0].weight.double().T + net[0].bias.double()
    torch.testing.assert_close(out_other.double(), reference, rtol=1e-5, atol=1e-5)
    with model.disable_adapter():
        assert torch.equal(model(x), expected)
    model.delete_adapter("other")
    assert "other" not in layer.qoft_Q and model.active_adapter == "default"
    torch.testing.assert_close(model(x), out_default)
    assert torch.equal(model.unload()(x), expected)


def test_bias_qoft_only_trains_targeted_biases():
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    model = get_peft_model(net, QOFTConfig(target_modules=["0"], block_size=4, bias="qoft_only"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"base_model.model.0.qoft_Q.default", "base_model.model.0.base_layer.bias"}


def test_unsupported_layer_names_supported_ones():
    with pytest.raises(UnsupportedLayerError, match="Supported base layers: torch.nn.Linear, torch.nn.Conv2d"):
        get_peft_model(_Net(), QOFTConfig(target_modules=["emb"], block_size=4))


@pytest.mark.parametrize("kwargs", [dict(block_size=5), dict(num_blocks=5)])
def test_block_must_divide_width(kwargs):
    with pytest.raises(ValueError, match=r"does not divide the input width 24 of layer 'lin'"):
        get_peft_model(_Net(), QOFTConfig(target_modules=["lin"], **kwargs))
