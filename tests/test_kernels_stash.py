"""StashQuant's Triton pack/unpack against the reference (peft_quant.stash.bfp): bytes and scales bit for bit,
stochastic rounding unbiased and seeded, dispatch, and a model's gradients through the packer."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from peft_quant.kernels import stash as stash_kernels
from peft_quant.kernels import stash_triton
from peft_quant.stash import bfp, enable_stash

from .kernel_utils import DEVICE, kernels, poisoned

NUMELS = (1, 37, 1000, 4133)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _wide(numel: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random values over five decades, with many multiples of 0.5 and a zero block's worth of zeros."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=generator) * torch.logspace(-3, 2, numel)
    x[: numel // 4] = torch.round(x[: numel // 4] * 4) / 2  # many exact halves and integers
    x[numel // 2: numel // 2 + 64] = 0.0
    return x.to(dtype).to(DEVICE)


def _pack_into(x, bits, block_size, scale, sentinel: int, stochastic=False, seed=0):
    """The kernel's stream and scales, written into buffers pre-filled with ``sentinel`` bytes / poisoned scales."""
    blocks = -(-x.numel() // block_size)
    stream = torch.full((blocks * block_size * bits // 8,), sentinel, dtype=torch.uint8, device=DEVICE)
    # NaN, or −128 (not an exponent the format uses)
    scales = poisoned((blocks,), torch.int8 if scale == "e8m0" else torch.bfloat16)
    return stash_triton.pack(x, bits, block_size, scale, stochastic, seed, mantissas=stream, scales=scales)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("scale", ["bf16", "e8m0"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_and_unpack_are_bit_identical_to_the_reference(bits, scale):
    for i, block_size in enumerate(bfp.BLOCK_SIZES):  # every numel and dtype meets every block size over the bits
        numel, dtype = NUMELS[(bits + i) % len(NUMELS)], DTYPES[(bits + i) % len(DTYPES)]
        x = _wide(numel, dtype, seed=bits * 10 + i)
        expected = bfp.pack(x, bits, block_size, scale=scale)
        stream, scales = _pack_into(x, bits, block_size, scale, sentinel=0xFF * (i % 2))
        assert _same_bits(stream, expected.mantissas), (block_size, numel, dtype)
        assert _same_bits(scales, expected.scales), (block_size, numel, dtype)
        restored = stash_triton.unpack(expected, out=poisoned((numel,), dtype))
        assert _same_bits(restored, bfp.unpack(expected)), (block_size, numel, dtype)


@pytest.mark.parametrize("bits, block_size", [(3, 16), (5, 64), (8, 32)])
def test_every_byte_is_written(bits, block_size):
    x = _wide(4133, torch.float32, seed=bits)
    expected = bfp.pack(x, bits, block_size, scale="bf16")
    for sentinel in (0x00, 0xFF):  # a byte the kernel skips shows under one sentinel or the other
        stream, _ = _pack_into(x, bits, block_size, "bf16", sentinel)
        assert torch.equal(stream, expected.mantissas)


def test_ties_round_half_to_even_in_codes_and_bf16_scales():
    halves = torch.arange(-127, 128).float() + 0.5  # with absmax 127 and 8 bits the step is exactly 1
    halves[-1] = 127.0
    scale_ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 3 * (1 + 2**-8), 0.0]).repeat_interleave(16)  # bf16 midpoints
    for x, bits in ((halves, 8), (scale_ties, 2), (scale_ties, 3)):
        x = x.to(DEVICE)
        expected = bfp.pack(x, bits, 16, scale="bf16")
        stream, scales = _pack_into(x, bits, 16, "bf16", sentinel=0xFF)
        assert torch.equal(stream, expected.mantissas) and _same_bits(scales, expected.scales)


def test_public_entry_points_keep_shape_dtype_and_views():
    x = torch.randn(6, 10, 12, device=DEVICE).to(torch.bfloat16).transpose(0, 2)  # non-contiguous
    with kernels("triton"):
        packed = stash_kernels.pack(x, 4, 32, scale="e8m0")
        restored = stash_kernels.unpack(packed)
    expected = bfp.pack(x, 4, 32, scale="e8m0")
    assert torch.equal(packed.mantissas, expected.mantissas) and torch.equal(packed.scales, expected.scales)
    assert (packed.shape, packed.dtype, packed.nbytes) == (x.shape, x.dtype, expected.nbytes)
    assert restored.shape == x.shape and restored.is_contiguous() and _same_bits(restored, bfp.unpack(expected))


@pytest.mark.parametrize("scale", ["bf16", "e8m0"])
def test_stochastic_rounding_is_unbiased_within_a_step_and_seeded(scale):
    copies = 512
    x = (torch.full((16,), 0.3) * torch.tensor([1.0, 7.0]).repeat(8)).repeat(copies).to(DEVICE)  # absmax 2.1
    with kernels("triton"):
        packed = stash_kernels.pack(x, 3, 16, stochastic=True, generator=torch.Generator().manual_seed(0),
                                    scale=scale)
        draws = stash_kernels.unpack(packed).view(copies, 16)  # (copies, block): independent draws per position
        again = stash_kernels.pack(x, 3, 16, stochastic=True, generator=torch.Generator().manual_seed(0), scale=scale)
        other = stash_kernels.pack(x, 3, 16, stochastic=True, generator=torch.Generator().manual_seed(1), scale=scale)
    nearest = bfp.pack(x, 3, 16, scale=scale)
    assert torch.equal(packed.scales, nearest.scales)  # the scales do not depend on the rounding
    step = float(bfp.decode_scales(nearest.scales)[0])  # 3 bits, qmax 3: 0.7 (bf16) or 1 (e8m0)
    assert (draws - x.view(copies, 16)).abs().max() < step  # never a full step off
    assert torch.allclose(draws.mean(0), x[:16], atol=4 * 0.5 * step / copies**0.5)  # 4σ of a mean of Bernoullis
    assert (bfp.unpack(nearest)[:16] - x[:16]).abs().max() > 4 * 0.5 * step / copies**0.5  # nearest is biased here
    assert torch.equal(again.mantissas, packed.mantissas) and not torch.equal(other.mantissas, packed.mantissas)


def test_stochastic_codes_are_within_a_step_of_the_value_and_of_the_nearest_code():
    x = _wide(1000, torch.float16, seed=3)
    with kernels("triton"):
        packed = stash_kernels.pack(x, 5, 32, stochastic=True, generator=torch.Generator().manual_seed(2))
    nearest = bfp.pack(x, 5, 32)
    assert torch.equal(packed.scales, nearest.scales)
    codes, nearest_codes = (bfp._unpack_bits(p.mantissas, 5).int() for p in (packed, nearest))
    assert (codes - nearest_codes).abs().max() == 1  # a floor or a ceiling, never further
    step = bfp.decode_scales(nearest.scales).repeat_interleave(32)[:1000].to(DEVICE)
    restored = bfp.unpack(dataclasses.replace(packed, dtype=torch.float32))  # q·s exactly, before float16 rounding
    assert ((restored - x.float()).abs() < step).all()


def test_dispatch_uses_the_reference_on_cpu_in_auto_mode_and_the_kernel_when_forced(monkeypatch):
    calls = []
    original_pack, original_unpack = stash_triton.pack, stash_triton.unpack
    monkeypatch.setattr(stash_triton, "pack", lambda *a, **k: calls.append("pack") or original_pack(*a, **k))
    monkeypatch.setattr(stash_triton, "unpack", lambda *a, **k: calls.append("unpack") or original_unpack(*a, **k))
    x = torch.randn(300)
    with kernels("auto"):
        packed = stash_kernels.pack(x, 4, stochastic=True, generator=torch.Generator().manual_seed(0))
        restored = stash_kernels.unpack(packed)
    reference = bfp.pack(x, 4, stochastic=True, generator=torch.Generator().manual_seed(0))
    assert calls == [] and torch.equal(packed.mantissas, reference.mantissas)  # the reference's own random stream
    assert torch.equal(restored, bfp.unpack(reference))
    with kernels("triton"):
        stash_kernels.unpack(stash_kernels.pack(x.to(DEVICE), 4))
        stash_kernels.pack(x.to(DEVICE, torch.float64), 4)  # a dtype the kernel does not cover: the reference
    assert calls == ["pack", "unpack"]


@pytest.mark.parametrize("bits, scale", [(4, "bf16"), (3, "e8m0")])
def test_model_gradients_through_the_packer_equal_the_reference(bits, scale):
    def grads(mode):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64)).to(DEVICE)
        packer = enable_stash(model, bits=bits, scale=scale, min_numel=64)
        x = torch.randn(5, 13, 64, device=DEVICE, requires_grad=True)  # 4160 values: not whole programs
        with kernels(mode):
            model(x).pow(2).sum().backward()
        assert packer.packed_tensors >= 3
        return [x.grad] + [p.grad for p in model.parameters()]

    for ours, reference in zip(grads("triton"), grads("torch")):
        assert torch.equal(ours, reference)


@pytest.mark.parametrize("bits, scale, dtype", [(4, "bf16", torch.float32), (8, "e8m0", torch.bfloat16),
                                                (3, "bf16", torch.float16)])
def test_outliers_round_trip_exactly_and_the_kernel_matches_the_reference(bits, scale, dtype):
    """A float attention mask (-inf past each row's length) with NaN, +inf and finfo.min among the values: the kernel
    alone counts them as zeros (bit-identical to the reference's blocks), and the entry points restore them exactly
    and leave their neighbours finite."""
    generator = torch.Generator().manual_seed(bits)
    x = torch.randn(4, 1, 26, 26, generator=generator)
    x.masked_fill_(torch.arange(26) >= torch.tensor([26, 20, 9, 3])[:, None, None, None], float("-inf"))
    x.view(-1)[[5, 600, 601]] = torch.tensor([float("nan"), float("inf"), torch.finfo(dtype).min])
    x = x.to(dtype).to(DEVICE)
    outlier = ~(x.abs() < torch.finfo(dtype).max / 2)
    expected = bfp.pack(x, bits, 32, scale=scale)
    stream, scales = _pack_into(x, bits, 32, scale, sentinel=0xFF)
    assert _same_bits(stream, expected.mantissas) and _same_bits(scales, expected.scales)
    with kernels("triton"):
        packed = stash_kernels.pack(x, bits, 32, scale=scale)
        restored = stash_kernels.unpack(packed)
    assert torch.equal(packed.outlier_index, expected.outlier_index) and packed.outliers == int(outlier.sum())
    assert _same_bits(restored, bfp.unpack(expected))
    assert _same_bits(restored[outlier], x[outlier]) and torch.isfinite(restored[~outlier]).all()
