"""QuantFull's Triton kernels against their references: the int8 dequantize-matmul (forward and input gradient) and
the weight gradient fused with the Lion step (round-to-nearest against ``lion_step_`` fed the same gradient;
stochastic rounding for determinism and unbiasedness), non-finite inputs, dispatch, and one training step end to end
through the layer and the optimizer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn

from peft_quant import QuantFullConfig, QuantFullOptimizer
from peft_quant.kernels import quant_full as ops
from peft_quant.kernels import quant_full_triton
from peft_quant.quant_full.int8_state import (
    LionHyper,
    dequantize_blockwise,
    dequantize_weight,
    lion_step_,
    quantize_blockwise,
    quantize_weight,
)

from .kernel_utils import DEVICE, kernels, poisoned, relative_rms

# relative RMS bounds against float64 by input dtype: the output's own rounding, with margin
MATMUL_RMS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
TIES = 3  # codes may differ where the real-valued code lies within float rounding of .5 (or G within it of 0)


def _state(out: int, width: int, group_size, fraction: float, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, width, generator=generator) * 0.1
    return [t.to(DEVICE) for t in quantize_weight(weight, group_size, fraction)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("transpose_weight", [True, False])
@pytest.mark.parametrize("tokens,out,width,group_size,fraction", [
    (7, 40, 96, None, 0.0),
    (33, 37, 80, 16, 0.03),
])
def test_int8_matmul_matches_float64(dtype, transpose_weight, tokens, out, width, group_size, fraction):
    codes, scale, index, value = _state(out, width, group_size, fraction)
    a = torch.randn(tokens, width if transpose_weight else out, device=DEVICE).to(dtype)
    weight = dequantize_weight(codes, scale, index, value, group_size, torch.float64)
    expected = a.double() @ (weight.T if transpose_weight else weight)
    result = poisoned(tuple(expected.shape), dtype)
    quant_full_triton.int8_matmul(a, codes, scale, index, value, group_size, transpose_weight, out=result)
    assert result.dtype == dtype
    assert relative_rms(result, expected) < MATMUL_RMS[dtype]
    with kernels("triton"):  # the public entry point, batched input
        batched = ops.int8_matmul(a.reshape(1, tokens, -1), codes, scale, index, value, group_size,
                                  transpose_weight=transpose_weight)
    assert torch.equal(batched.reshape(result.shape), result)


def _momentum(numel: int, block_size: int, seed: int = 1):
    values = torch.randn(numel, generator=torch.Generator().manual_seed(seed)) * 1e-2
    return [t.to(DEVICE) for t in quantize_blockwise(values, block_size)]


def _clone(tensors):
    return [t.clone() for t in tensors]


@pytest.mark.parametrize("tokens,out,width,group_size,fraction,weight_decay,block_size", [
    (19, 37, 96, None, 0.0, 0.0, 32),
    (19, 37, 96, 16, 0.02, 0.1, 32),
    (5, 17, 48, 16, 0.05, 0.1, 16),
    (33, 20, 256, 64, 0.01, 0.1, 256),
])
def test_fused_lion_round_to_nearest_matches_lion_step(tokens, out, width, group_size, fraction, weight_decay,
                                                       block_size):
    weight = _state(out, width, group_size, fraction)
    momentum = _momentum(out * width, block_size)
    grad_output = torch.randn(tokens, out, device=DEVICE)
    x = torch.randn(tokens, width, device=DEVICE)
    hyper = LionHyper(lr=1.3 * float(weight[1].median()), beta1=0.9, beta2=0.99, weight_decay=weight_decay)
    expected_w, expected_m = _clone(weight), _clone(momentum)
    lion_step_(*expected_w, *expected_m, grad_output.T @ x, hyper, group_size, block_size, stochastic=False)
    fused_w, fused_m = _clone(weight), _clone(momentum)
    with kernels("triton"):
        assert ops.fused_step_supported(grad_output, x, fused_w[0], block_size)
        ops.lion_step_from_activations_(grad_output, x, *fused_w, *fused_m, hyper, group_size, block_size, False)
    codes, _, _, outliers = fused_w
    assert (expected_w[0] != weight[0]).float().mean() > 0.5  # the step moves most codes
    assert int((codes != expected_w[0]).sum()) <= TIES
    assert torch.equal(codes.view(-1)[weight[2].long()], torch.zeros_like(weight[3], dtype=torch.int8))
    torch.testing.assert_close(outliers, expected_w[3], rtol=1e-6, atol=1e-7)
    if fraction:
        assert not torch.equal(outliers, weight[3])  # the outliers took their step
    momentum_diff = (fused_m[0].int() - expected_m[0].int()).abs()
    assert int(momentum_diff.max()) <= 1 and int((momentum_diff > 0).sum()) <= TIES
    torch.testing.assert_close(fused_m[1], expected_m[1], rtol=5e-6, atol=0)


def _rounding_case():
    """Codes 0, zero momentum, a positive gradient everywhere: every weight's real-valued code is ``−lr/scale`` of
    its row, a different fraction per row."""
    out, width, block_size = 32, 256, 64
    codes = torch.zeros(out, width, dtype=torch.int8, device=DEVICE)
    scale = torch.linspace(0.011, 0.097, out, device=DEVICE)[:, None]  # (out, 1)
    empty_index, empty_value = torch.zeros(0, dtype=torch.int32, device=DEVICE), torch.zeros(0, device=DEVICE)
    momentum = [torch.zeros(out * width, dtype=torch.int8, device=DEVICE),
                torch.zeros(out * width // block_size, device=DEVICE)]
    grad_output, x = torch.rand(9, out, device=DEVICE) + 0.1, torch.rand(9, width, device=DEVICE) + 0.1
    hyper = LionHyper(lr=0.023)
    return [codes, scale, empty_index, empty_value], momentum, grad_output, x, hyper, block_size


def _stochastic_codes(seed: int, lr: float = 0.023) -> torch.Tensor:
    weight, momentum, grad_output, x, hyper, block_size = _rounding_case()
    hyper.lr = lr
    with kernels("triton"):
        ops.lion_step_from_activations_(grad_output, x, *weight, *momentum, hyper, None, block_size, True, seed)
    return weight[0]


def test_stochastic_rounding_is_deterministic_per_seed_and_unbiased():
    draws = torch.stack([_stochastic_codes(seed).float() for seed in (11, 11, 2**40 + 3, 5, 6)])
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    weight, *_, hyper, _ = _rounding_case()
    real = (-hyper.lr / weight[1]).expand_as(draws[0])  # (out, width) real-valued codes
    assert ((draws == torch.floor(real)) | (draws == torch.floor(real) + 1)).all()
    draws = draws[1:]  # four independent seeds
    fraction = real - torch.floor(real)
    per_row = draws.mean(dim=(0, 2))  # (out,)
    sigma = (fraction[:, 0] * (1 - fraction[:, 0]) / (draws.shape[0] * draws.shape[2])).sqrt()
    assert ((per_row - real[:, 0]).abs() <= 5 * sigma + 1e-6).all()
    total_sigma = float((fraction * (1 - fraction)).sum().sqrt()) / real.numel() / draws.shape[0] ** 0.5
    assert abs(float(draws.mean() - real.mean())) <= 5 * total_sigma


def test_round_to_nearest_loses_the_small_step_stochastic_keeps_it():
    weight, momentum, grad_output, x, hyper, block_size = _rounding_case()
    hyper.lr = 0.004  # below half a step of every row
    with kernels("triton"):
        ops.lion_step_from_activations_(grad_output, x, *weight, *momentum, hyper, None, block_size, False)
    assert not weight[0].any()
    assert _stochastic_codes(3, lr=0.004).any()


def _net(width: int = 48) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, 32), nn.GELU(), nn.Linear(32, 16)).to(DEVICE)


def _trained(mode: str, steps: int = 2, stochastic: bool = False, **optimizer_kwargs):
    """A tiny model wrapped with QuantFull, trained ``steps`` steps under ``PEFT_QUANT_KERNELS=mode``; returns the
    layers, the optimizer, the first step's output and input gradient, and the output after training."""
    model = get_peft_model(_net(), QuantFullConfig(target_modules=["0", "2"], group_size=16, outlier_fraction=0.02,
                                                  stochastic_rounding=stochastic))
    optimizer = QuantFullOptimizer(model, lr=4e-3, weight_decay=0.1, **optimizer_kwargs)
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(2, 5, 48, generator=generator).to(DEVICE) for _ in range(steps)]
    first = None
    with kernels(mode):
        for x in inputs:
            x = x.requires_grad_()
            y = model(x)
            y.pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            first = first or (y.detach(), x.grad)
        after = model(inputs[0]).detach()
    layers = [model.base_model.model[0], model.base_model.model[2]]
    return layers, optimizer, first, after


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the fused kernel's launches."""
    calls = []
    launcher = quant_full_triton.lion_step_from_activations_
    monkeypatch.setattr(quant_full_triton, "lion_step_from_activations_",
                        lambda *args, **kwargs: (calls.append(1), launcher(*args, **kwargs))[1])
    return calls


@pytest.mark.parametrize("optimizer_kwargs,fused", [
    (dict(momentum_block_size=16), True),
    (dict(momentum_block_size=256), False),  # 48 inputs hold no whole block: the reference update
    (dict(momentum_block_size=16, max_grad_norm=1.0), False),  # clipping needs the whole gradient
])
def test_training_steps_through_the_kernels_match_the_reference(optimizer_kwargs, fused, fused_calls):
    torch_layers, torch_opt, (y_ref, gx_ref), after_ref = _trained("torch", **optimizer_kwargs)
    triton_layers, triton_opt, (y, gx), after = _trained("triton", **optimizer_kwargs)
    assert len(fused_calls) == (4 if fused else 0)
    assert relative_rms(y, y_ref) < 1e-5 and relative_rms(gx, gx_ref) < 1e-5
    assert relative_rms(after, after_ref) < 1e-3
    for ours, ref in zip(triton_layers, torch_layers):
        name = ref.adapter
        initial = quantize_weight(_net()[0 if ref.in_features == 48 else 2].weight, 16, 0.02)[0]
        assert (ref.qf_codes[name] != initial.to(DEVICE)).float().mean() > 0.5  # the steps moved most codes
        assert int((ours.qf_codes[name] != ref.qf_codes[name]).sum()) <= TIES
        torch.testing.assert_close(ours.qf_outlier_value[name], ref.qf_outlier_value[name], rtol=1e-5, atol=1e-6)
        ours_state, ref_state = triton_opt.state[ours.qf_anchor[name]], torch_opt.state[ref.qf_anchor[name]]
        assert ours_state["step"] == ref_state["step"] == 2
        diff = (ours_state["momentum_codes"].int() - ref_state["momentum_codes"].int()).abs()
        assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= TIES
        torch.testing.assert_close(ours_state["momentum_absmax"], ref_state["momentum_absmax"], rtol=1e-4, atol=0)


def test_stochastic_training_step_is_reproducible_and_moves_small_steps(fused_calls):
    first, _, _, after = _trained("triton", steps=1, stochastic=True, momentum_block_size=16)
    second, _, _, again = _trained("triton", steps=1, stochastic=True, momentum_block_size=16)
    assert len(fused_calls) == 4
    assert torch.equal(after, again)
    for a, b in zip(first, second):
        assert torch.equal(a.qf_codes[a.adapter], b.qf_codes[b.adapter])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("where", ["input", "output gradient"])
def test_non_finite_inputs_leave_the_state_untouched_and_are_counted(where, fused_calls):
    model = get_peft_model(_net(), QuantFullConfig(target_modules=["0", "2"], outlier_fraction=0.02))
    optimizer = QuantFullOptimizer(model, lr=1e-2, momentum_block_size=16)
    layers = [model.base_model.model[0], model.base_model.model[2]]
    x = torch.randn(4, 48, device=DEVICE)
    with kernels("triton"):
        model(x).pow(2).mean().backward()  # one good step: momentum non-zero
        before = [[t.clone() for t in (*layer.int8_weight()[:4], *optimizer.state[layer.qf_anchor[layer.adapter]]
                                       .values()) if isinstance(t, torch.Tensor)] for layer in layers]
        if where == "input":
            x[1, 3] = float("nan")
            model(x).sum().backward()
        else:
            (model(x) * torch.tensor([float("inf")] + [1.0] * 15, device=DEVICE)).sum().backward()
    assert optimizer.skipped_updates == 2 and len(fused_calls) == 2
    for layer, saved in zip(layers, before):
        now = [t for t in (*layer.int8_weight()[:4], *optimizer.state[layer.qf_anchor[layer.adapter]].values())
               if isinstance(t, torch.Tensor)]
        assert all(torch.equal(a, b) for a, b in zip(now, saved))
        assert optimizer.state[layer.qf_anchor[layer.adapter]]["step"] == 1


def test_auto_mode_runs_the_reference_on_cpu_and_triton_when_forced(monkeypatch):
    codes, scale, index, value = [t.cpu() for t in _state(8, 32, None, 0.05)]
    a = torch.randn(3, 32)

    def forbidden(*args, **kwargs):
        raise AssertionError("the Triton kernel ran in auto mode on CPU")

    monkeypatch.setattr(quant_full_triton, "int8_matmul", forbidden)
    monkeypatch.setattr(quant_full_triton, "lion_step_from_activations_", forbidden)
    with kernels("auto"):
        y = ops.int8_matmul(a, codes, scale, index, value, None)
        assert torch.equal(y, F.linear(a, dequantize_weight(codes, scale, index, value, None)))
        assert not ops.fused_step_supported(torch.randn(3, 8), a, codes, 16)
        momentum = _momentum(8 * 32, 16)
        ops.lion_step_from_activations_(torch.randn(3, 8), a, codes, scale, index, value,
                                        *[t.cpu() for t in momentum], LionHyper(lr=1e-3), None, 16, True, 0)
    with kernels("triton"), pytest.raises(AssertionError, match="auto mode"):
        ops.int8_matmul(a.to(DEVICE), *[t.to(DEVICE) for t in (codes, scale, index, value)], None)


def test_autocast_gives_the_autocast_dtype_like_the_reference():
    codes, scale, index, value = _state(24, 32, None, 0.05)
    a = torch.randn(6, 32, device=DEVICE)
    outputs = {}
    for mode in ("torch", "triton"):
        with kernels(mode), torch.autocast(DEVICE, dtype=torch.bfloat16):
            outputs[mode] = ops.int8_matmul(a, codes, scale, index, value, None)
    assert outputs["triton"].dtype == outputs["torch"].dtype == torch.bfloat16
    assert relative_rms(outputs["triton"], outputs["torch"]) < MATMUL_RMS[torch.bfloat16]


def test_momentum_reference_roundtrip_is_what_the_kernel_reads():
    """The fused kernel dequantizes momentum exactly as ``dequantize_blockwise`` (a zero-step update keeps it)."""
    codes, scale, index, value = _state(16, 64, None, 0.0)
    momentum = _momentum(16 * 64, 32)
    grad_output = torch.zeros(4, 16, device=DEVICE)
    x = torch.randn(4, 64, device=DEVICE)
    m_before = dequantize_blockwise(*momentum, 32, codes.shape)
    with kernels("triton"):
        ops.lion_step_from_activations_(grad_output, x, codes, scale, index, value, *momentum,
                                        LionHyper(lr=1e-3, beta2=0.5), None, 32, False)
    expected_codes, expected_absmax = quantize_blockwise(m_before * 0.5, 32)
    assert torch.equal(momentum[0], expected_codes)
    torch.testing.assert_close(momentum[1], expected_absmax, rtol=1e-6, atol=0)
