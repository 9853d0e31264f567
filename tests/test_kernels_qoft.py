"""QOFT's Triton kernels against the reference in peft_quant.qoft.rotation, forward and backward, and end to end
through QOFTLayer (the layer's output and every gradient equal through both paths)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

from peft_quant import QOFTConfig
from peft_quant.kernels import qoft as qoft_kernels
from peft_quant.kernels import qoft_triton
from peft_quant.kernels.backend import interpreting
from peft_quant.qoft import rotation as reference

from .conftest import randomize_adapter
from .kernel_utils import DEVICE, kernels, poisoned, relative_rms

FP32 = 1e-5  # relative RMS bound for float32 results (matmuls of ≤ 64-wide blocks in float32)
# Outputs rounded to a half-precision dtype: the kernel and the reference round the same float32 values, up to
# float32 summation order, so a few elements may land one unit in the last place apart. Triton's interpreter
# truncates float32 → bfloat16 instead of rounding to nearest, which puts about half the elements one bf16 unit
# (2⁻⁸ relative) apart: relative RMS ≈ 4e-3 there.
ROUNDED = {torch.float32: FP32, torch.float16: 1e-4, torch.bfloat16: 8e-3 if interpreting() else 1e-3}


def _packed(n: int, b: int, seed: int, scale: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, reference.num_packed(b), generator=g) * scale / b**0.5).to(DEVICE)


@pytest.mark.parametrize("b,terms,n", [(3, 2, 1), (5, 3, 3), (24, 4, 2), (32, 5, 1), (32, 6, 3), (64, 5, 2)])
def test_build_forward_and_backward_match_reference(b, terms, n):
    packed = _packed(n, b, seed=b + terms)
    expected = reference.cayley_neumann(packed, b, terms)
    built = qoft_triton.build(packed, b, terms, out=poisoned((n, b, b)))
    assert relative_rms(built, expected) < FP32

    grad_r = torch.randn(n, b, b, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    leaf = packed.clone().requires_grad_()
    (expected_grad,) = torch.autograd.grad(reference.cayley_neumann(leaf, b, terms), leaf, grad_r)
    grad = qoft_triton.build_backward(packed, grad_r, terms, out=poisoned(tuple(packed.shape)))
    assert relative_rms(grad, expected_grad) < FP32


def test_build_is_identity_at_zero():
    built = qoft_triton.build(torch.zeros(3, reference.num_packed(7), device=DEVICE), 7, 5, out=poisoned((3, 7, 7)))
    assert torch.equal(built, torch.eye(7, device=DEVICE).expand(3, 7, 7))


# (tokens, width, b, blocks): odd token counts and widths, shared blocks, b below and above one 16-wide tile
ROTATE_SHAPES = [(37, 24, 8, 3), (37, 24, 8, 1), (50, 40, 5, 8), (19, 96, 32, 3), (21, 64, 64, 1)]


def _rotation_inputs(tokens: int, width: int, b: int, n: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=g).to(DEVICE, dtype)
    grad_out = torch.randn(tokens, width, generator=g).to(DEVICE, dtype)
    return x, reference.cayley_neumann(_packed(n, b, seed), b, 5), grad_out


def _reference_rotation(x: torch.Tensor, blocks: torch.Tensor, grad_out: torch.Tensor):
    """The layer's reference path (cast to the blocks' dtype, rotate, cast back): output and both gradients."""
    x, blocks = x.clone().requires_grad_(), blocks.clone().requires_grad_()
    out = reference.rotate(x.to(blocks.dtype), blocks).to(x.dtype)
    return (out, *torch.autograd.grad(out, (x, blocks), grad_out))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens,width,b,n", ROTATE_SHAPES)
def test_rotate_launchers_match_reference(tokens, width, b, n, dtype):
    """16-token tiles and 3 token chunks, so that tile masks and the chunked reduction of grad R both run."""
    x, blocks, grad_out = _rotation_inputs(tokens, width, b, n, dtype)
    out, grad_x, grad_r = _reference_rotation(x, blocks, grad_out)

    mine = qoft_triton.rotate_forward(x, blocks, out=poisoned((tokens, width), dtype), block_t=16)
    assert mine.dtype == dtype and relative_rms(mine, out) < ROUNDED[dtype]
    my_grad_x, my_grad_r = qoft_triton.rotate_backward(
        x, blocks, grad_out, True, True, grad_x_out=poisoned((tokens, width), dtype), block_t=16, chunks=3
    )
    assert my_grad_x.dtype == dtype and relative_rms(my_grad_x, grad_x) < ROUNDED[dtype]
    assert my_grad_r.shape == blocks.shape and relative_rms(my_grad_r, grad_r) < FP32


@pytest.mark.parametrize("needs", [(True, False), (False, True)])
def test_rotate_backward_computes_only_what_is_asked(needs):
    x, blocks, grad_out = _rotation_inputs(23, 24, 8, 3, torch.float32)
    _, grad_x, grad_r = _reference_rotation(x, blocks, grad_out)
    mine = qoft_triton.rotate_backward(x, blocks, grad_out, *needs)
    for asked, got, expected in zip(needs, mine, (grad_x, grad_r)):
        assert (got is None) != asked
        if asked:
            assert relative_rms(got, expected) < FP32


def test_rotate_entry_point_autograd_on_strided_3d_input():
    """Through kernels.qoft.rotate: a (batch, seq, width) view with row stride > width, forward and backward."""
    x, blocks, grad_out = _rotation_inputs(2 * 9, 48, 16, 3, torch.float32, seed=3)
    wide = torch.cat([x, x[:, :8]], dim=1).view(2, 9, 56)
    x3, grad3 = wide[..., :48], grad_out.view(2, 9, 48)
    out, grad_x, grad_r = _reference_rotation(x3, blocks, grad3)
    with kernels("triton"):
        leaf_x, leaf_r = x3.detach().requires_grad_(), blocks.clone().requires_grad_()
        mine = qoft_kernels.rotate(leaf_x, leaf_r)
        my_grads = torch.autograd.grad(mine, (leaf_x, leaf_r), grad3)
    assert relative_rms(mine, out) < FP32
    assert relative_rms(my_grads[0], grad_x) < FP32 and relative_rms(my_grads[1], grad_r) < FP32


def test_rotate_rejects_blocks_that_do_not_fit():
    with pytest.raises(ValueError, match="do not fit"):
        qoft_kernels.rotate(torch.zeros(2, 24), torch.zeros(2, 8, 8))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(48, 20)
        self.conv = nn.Conv2d(16, 4, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.lin(x).sum() + self.conv(image).pow(2).sum()


def _layer_run(config: QOFTConfig, mode: str, train: bool):
    """Loss, input gradients and every qoft_Q gradient of a tiny model with a random adapter, in ``mode``."""
    torch.manual_seed(0)
    model = get_peft_model(_Net(), config).to(DEVICE)
    randomize_adapter(model)
    model.train(train)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 48, generator=g).to(DEVICE).requires_grad_()
    image = torch.randn(2, 16, 5, 5, generator=g).to(DEVICE).requires_grad_()
    torch.manual_seed(2)  # module_dropout draws the same blocks in both runs
    with kernels(mode):
        loss = model(x, image)
        loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if "qoft_" in name}
    return loss, x.grad, image.grad, grads


@pytest.mark.parametrize(
    "options,train",
    [
        (dict(block_size=8), False),
        (dict(block_size=16, block_share=True), False),
        (dict(block_size=8, module_dropout=0.5), True),  # blocks expanded to (width / b, b, b), some the identity
    ],
)
def test_layer_is_the_same_through_triton_and_reference(options, train):
    config = QOFTConfig(target_modules=["lin", "conv"], **options)
    loss, grad_x, grad_image, grads = _layer_run(config, "torch", train)
    my_loss, my_grad_x, my_grad_image, my_grads = _layer_run(config, "triton", train)
    assert relative_rms(my_loss, loss) < FP32
    assert relative_rms(my_grad_x, grad_x) < FP32 and relative_rms(my_grad_image, grad_image) < FP32
    assert grads.keys() == my_grads.keys() and len(grads) == 2
    for name in grads:
        assert relative_rms(my_grads[name], grads[name]) < FP32, name


def test_auto_mode_on_cpu_runs_the_reference(monkeypatch):
    """In auto mode CPU tensors take the reference path (bit-identical to it); forcing Triton runs the kernels."""
    calls = []
    for name in ("Rotate", "CayleyNeumann"):
        original = getattr(qoft_triton, name).apply
        spy = lambda *args, _f=original, _name=name: calls.append(_name) or _f(*args)  # noqa: E731
        monkeypatch.setattr(getattr(qoft_triton, name), "apply", spy)
    x, blocks, _ = _rotation_inputs(5, 24, 8, 3, torch.float32)
    packed = _packed(3, 8, seed=0)
    cpu_x, cpu_blocks, cpu_packed = x.cpu(), blocks.cpu(), packed.cpu()
    with kernels("auto"):
        assert torch.equal(qoft_kernels.rotate(cpu_x, cpu_blocks), reference.rotate(cpu_x, cpu_blocks))
        assert torch.equal(qoft_kernels.cayley_neumann(cpu_packed, 8, 5), reference.cayley_neumann(cpu_packed, 8, 5))
    assert calls == []
    with kernels("triton"):
        qoft_kernels.rotate(x, blocks)
        qoft_kernels.cayley_neumann(packed, 8, 5)
    assert calls == ["Rotate", "CayleyNeumann"]
    wide = _packed(1, 64, seed=0)
    with kernels("triton"):  # wider than the builder's limit: built by the reference, rotated by the kernel
        blocks = qoft_kernels.cayley_neumann(wide, 64, 5)
        qoft_kernels.rotate(torch.randn(3, 64, device=DEVICE), blocks)
    assert torch.equal(blocks, reference.cayley_neumann(wide, 64, 5))
    assert calls == ["Rotate", "CayleyNeumann", "Rotate"]


@pytest.mark.parametrize("tokens,width,b,n", [(37, 24, 8, 3), (21, 64, 32, 1)])
def test_rotate_input_kernel_path_matches_reference_path(tokens, width, b, n):
    """The recomputing rotation (blocks rebuilt in backward) through the Triton builder and rotation kernels equals
    its reference path, values and gradients."""
    x, _, grad_out = _rotation_inputs(tokens, width, b, n, torch.float32)
    packed = _packed(n, b, seed=3)
    results = {}
    for mode in ("triton", "torch"):
        leaf_x, leaf_p = x.clone().requires_grad_(), packed.clone().requires_grad_()
        with kernels(mode):
            out = qoft_kernels.rotate_input(leaf_x, leaf_p, b, 5)
            results[mode] = (out, *torch.autograd.grad(out, (leaf_x, leaf_p), grad_out))
    for got, expected in zip(results["triton"], results["torch"]):
        assert relative_rms(got, expected) < FP32
