"""The block-scaled input-gradient kernel against its reference: every e4m3 and e2m1 byte decoded exactly, odd shapes
with partial FP8 blocks and several MXFP4 groups against float64, dispatch through ``PEFT_QUANT_KERNELS``, and a layer's
backward end to end. Float32 only on CPU (Triton's interpreter gets half-precision arithmetic wrong); half dtypes on a
GPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_quant.block_scaled import Fp8BlockLinear, Mxfp4Linear
from peft_quant.kernels import block_scaled as bs
from peft_quant.kernels import block_scaled_triton

from .kernel_utils import DEVICE, kernels, relative_rms
from .test_block_scaled import reference_fp8, reference_mxfp4

DTYPES = [torch.float32] + ([torch.bfloat16, torch.float16] if DEVICE == "cuda" else [])
RMS = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}  # vs float64, the output's own rounding


def test_every_code_byte_decodes_exactly():
    """One row per byte value (scales 1): ``onehot · W`` reads the rows back, decoded by the kernel."""
    codes = torch.arange(256, dtype=torch.uint8)
    fp8 = codes[(codes & 0x7F) != 0x7F].view(torch.float8_e4m3fn)  # NaN codes aside: checked below
    fp8_weight = fp8[:, None].expand(-1, 3).contiguous()  # (254, 3)
    stored = (fp8_weight.to(DEVICE), torch.ones(1, 1, device=DEVICE))
    eye = torch.eye(254, device=DEVICE)
    got = block_scaled_triton.matmul_weight(eye, stored, bs.Fp8BlockCodec((256, 256)))
    assert torch.equal(got.cpu(), fp8_weight.to(torch.float32))  # torch's own cast decodes the same bytes
    nan = block_scaled_triton.matmul_weight(torch.ones(1, 2, device=DEVICE), (
        torch.tensor([[0x7F], [0xFF]], dtype=torch.uint8).view(torch.float8_e4m3fn).to(DEVICE),
        torch.ones(1, 1, device=DEVICE)), bs.Fp8BlockCodec((128, 128)))
    assert torch.isnan(nan).all()
    blocks = codes.view(256, 1, 1).expand(256, 1, 16).contiguous()  # (256, 1, 16): each row one byte repeated
    scales = torch.full((256, 1), 127, dtype=torch.uint8)
    got = block_scaled_triton.matmul_weight(torch.eye(256, device=DEVICE), (blocks.to(DEVICE), scales.to(DEVICE)),
                                            bs.MXFP4)
    assert torch.equal(got.cpu().double(), reference_mxfp4(blocks, scales))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,out,width,block", [(5, 37, 150, (16, 32)), (9, 130, 67, (128, 128))])
def test_fp8_input_gradient_matches_float64(dtype, tokens, out, width, block):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(out, width, generator=g)
    codec = bs.Fp8BlockCodec(block)
    stored = tuple(t.to(DEVICE) for t in codec.quantize(weight))
    grad = torch.randn(tokens, out, generator=g).to(DEVICE, dtype)
    expected = grad.double().cpu() @ reference_fp8(*[t.cpu() for t in stored], block)
    got = block_scaled_triton.matmul_weight(grad, stored, codec)
    assert got.dtype == dtype and relative_rms(got.cpu(), expected) < RMS[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,out,width", [(5, 37, 96), (3, 70, 160)])
def test_mxfp4_input_gradient_matches_float64(dtype, tokens, out, width):
    g = torch.Generator().manual_seed(1)
    stored = tuple(t.to(DEVICE) for t in bs.mxfp4_quantize(torch.randn(out, width, generator=g)))
    grad = torch.randn(2, tokens, out, generator=g).to(DEVICE, dtype)  # batched: leading dims kept
    expected = grad.double().cpu() @ reference_mxfp4(*[t.cpu() for t in stored])
    with kernels("triton"):
        got = bs.matmul_weight(grad, stored, bs.MXFP4)
    assert got.shape == (2, tokens, width) and relative_rms(got.cpu(), expected) < RMS[dtype]


def test_auto_mode_runs_the_reference_on_cpu_and_triton_when_forced(monkeypatch):
    calls = []
    real = block_scaled_triton.matmul_weight
    monkeypatch.setattr(block_scaled_triton, "matmul_weight", lambda *a: calls.append(1) or real(*a))
    stored = bs.mxfp4_quantize(torch.randn(8, 32))
    with kernels("auto"):
        bs.matmul_weight(torch.randn(2, 8), stored, bs.MXFP4)
    assert calls == []
    with kernels("triton"):
        bs.matmul_weight(torch.randn(2, 8), stored, bs.MXFP4)
    assert calls == [1]


@pytest.mark.parametrize("cls", [Fp8BlockLinear, Mxfp4Linear])
def test_layer_backward_through_the_kernel_matches_the_reference(cls):
    torch.manual_seed(2)
    layer = cls.from_linear(nn.Linear(96, 45)).to(DEVICE)
    x = torch.randn(3, 96, device=DEVICE)
    grads = {}
    for mode in ("torch", "triton"):
        xi = x.clone().requires_grad_()
        with kernels(mode):
            layer(xi).pow(2).sum().backward()
        grads[mode] = xi.grad
    assert relative_rms(grads["triton"], grads["torch"]) < 1e-6
