"""StashQuant: block floating point error bounds, what is packed, exact 16-bit bypass, schedule, composition."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import peft_quant
from peft_quant import QOFTConfig, QuantFullConfig, QuantFullOptimizer, StashQuantConfig, TimestepScaleConfig
from peft_quant.stash import BitSchedule, enable_stash, stash_packer
from peft_quant.stash.bfp import _pack_bits, _unpack_bits, decode_scales, pack, unpack

from .conftest import TINY_LLAMA


@pytest.mark.parametrize("bits", range(2, 9))
def test_bit_packing_is_exact(bits):
    codes = torch.randint(0, 2**bits, (8 * 13,), dtype=torch.uint8)
    stream = _pack_bits(codes, bits)
    assert stream.numel() == 13 * bits
    assert torch.equal(_unpack_bits(stream, bits), codes)


@pytest.mark.parametrize("scale", ["bf16", "e8m0"])
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_round_to_nearest_error_within_half_a_step_of_the_block_scale(bits, block_size, scale):
    torch.manual_seed(bits)
    x = torch.randn(8, 96, dtype=torch.float64) * torch.logspace(-3, 2, 96, dtype=torch.float64)  # wide range
    packed = pack(x, bits, block_size, scale=scale)
    restored = unpack(packed).to(torch.float64)
    scale_bytes = 2 if scale == "bf16" else 1
    assert packed.nbytes == x.numel() * bits // 8 + x.numel() // block_size * scale_bytes  # k bits + a scale per block
    step = decode_scales(packed.scales).double()  # (blocks,)
    assert ((restored - x).abs() <= step.repeat_interleave(block_size).view_as(x) / 2 * (1 + 1e-12)).all()
    qmax = 2 ** (bits - 1) - 1
    used = x.reshape(-1, block_size).abs().amax(dim=1) / step / qmax  # share of the code range the block max uses
    if scale == "e8m0":
        assert (used <= 1).all() and (used > 0.5).all()  # a power of two: between half and all of the range
    else:
        assert (used - 1).abs().max() <= 2**-8  # bfloat16's rounding of absmax / qmax: the whole range


@pytest.mark.parametrize("scale", ["bf16", "e8m0"])
def test_stochastic_rounding_is_unbiased(scale):
    x = torch.full((64,), 0.3) * torch.tensor([1.0, 7.0]).repeat(32)  # absmax 2.1 per block: a coarse 3-bit step
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([unpack(pack(x, 3, 16, stochastic=True, generator=generator, scale=scale))
                         for _ in range(400)])
    step = float(decode_scales(pack(x, 3, 16, scale=scale).scales)[0])  # 3 bits, qmax 3: 0.7 (bf16) or 1 (e8m0)
    assert (draws - x).abs().max() < step
    assert torch.allclose(draws.mean(0), x, atol=4 * 0.5 * step / 400**0.5)
    assert not torch.allclose(unpack(pack(x, 3, 16, scale=scale)), x, atol=0.05)  # nearest rounding is biased here


def test_auto_scale_is_mxint8_at_8_bits_and_bfloat16_below():
    x = torch.randn(256)
    assert pack(x, 8, 32).scales.dtype == torch.int8 and pack(x, 8, 32).nbytes == 256 + 8  # MXINT8: 8.25 bits
    assert pack(x, 4, 32).scales.dtype == torch.bfloat16 and pack(x, 4, 32).nbytes == 128 + 16  # 4.5 bits
    assert torch.equal(pack(x, 8, 32).mantissas, pack(x, 8, 32, scale="e8m0").mantissas)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unpack_restores_shape_dtype_and_values_of_views(dtype):
    x = torch.randn(6, 10, 12).to(dtype).transpose(0, 2)  # non-contiguous
    restored = unpack(pack(x, 8, 32))
    assert restored.shape == x.shape and restored.dtype == dtype and restored.is_contiguous()
    torch.testing.assert_close(restored.float(), x.float(), rtol=0.02, atol=0.02)


def test_bad_inputs():
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8, or 16"):
        pack(torch.randn(64), 1)
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8"):
        StashQuantConfig(target_modules=["0"], bits=12)
    with pytest.raises(ValueError, match="power of two in \\(16, 32, 64\\)"):
        StashQuantConfig(target_modules=["0"], block_size=24)
    with pytest.raises(ValueError, match="scale must be one of \\('auto', 'bf16', 'e8m0'\\)"):
        StashQuantConfig(target_modules=["0"], scale="fp8")
    with pytest.raises(ValueError, match="rise monotonically"):
        StashQuantConfig(target_modules=["0"], bits=6, milestones=[[0.5, 4]])
    with pytest.raises(ValueError, match="needs target_modules as a list"):
        StashQuantConfig()
    with pytest.raises(ValueError, match="unknown field.*'bit' \\(did you mean 'bits'"):
        StashQuantConfig(target_modules=["0"], bit=4)


def test_schedule_is_monotone_over_milestones_and_plateaus():
    schedule = BitSchedule(initial_bits=2, milestones=[(0.25, 4), (0.5, 6), (0.75, 8)], plateau_patience=2)
    seen = [schedule.update(step, 100) for step in range(0, 101, 5)]
    assert seen == sorted(seen) and seen[0] == 2 and seen[-1] == 8 and {4, 6} <= set(seen)
    steps = BitSchedule(initial_bits=3, milestones=[(10, 5)], unit="step")
    assert [steps.update(s) for s in (0, 9, 10, 3)] == [3, 3, 5, 5]  # never decreases, even going back
    plateau = BitSchedule(initial_bits=4, plateau_patience=2, plateau_min_delta=0.01)
    bits = [plateau.update(s, loss=loss) for s, loss in enumerate([2.0, 1.5, 1.499, 1.498, 1.2, 1.199, 1.2])]
    assert bits == [4, 4, 4, 5, 5, 5, 6]


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))


def _lora_grads(bits=None, checkpointing=False, **settings):
    model = get_peft_model(_llama(), LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"],
                                                init_lora_weights=False))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    packer = enable_stash(model, bits=bits, **settings) if bits else None
    model.train()
    tokens = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(1))
    model(input_ids=tokens, labels=tokens).loss.backward()
    grads = torch.cat([p.grad.flatten() for _, p in sorted(model.named_parameters()) if p.requires_grad])
    return grads, packer, model


def test_16_bit_bypass_gives_exactly_the_uncompressed_gradients():
    plain, _, _ = _lora_grads()
    bypass, packer, _ = _lora_grads(16, min_numel=1)
    assert packer.packed_tensors == 0 and torch.equal(bypass, plain)


def test_compressed_gradients_within_bounds_and_memory_ratio():
    plain, _, _ = _lora_grads()
    for bits, bound, ratio in ((8, 0.03, 3.5), (4, 0.35, 6.0)):
        grads, packer, _ = _lora_grads(bits)
        error = float((grads - plain).norm() / plain.norm())
        assert 0 < error < bound, (bits, error)
        assert packer.packed_tensors > 10 and packer.original_bytes / packer.stored_bytes > ratio


def test_parameters_and_their_views_are_never_packed():
    _, packer, model = _lora_grads(4, min_numel=1)
    shapes = []
    original = packer._pack

    def spy(tensor):
        out = original(tensor)
        if out is not tensor:
            shapes.append(tensor.shape)
            storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
            assert tensor.untyped_storage().data_ptr() not in storages
        return out

    packer._pack = spy
    tokens = torch.randint(0, 256, (2, 8))
    model(input_ids=tokens, labels=tokens).loss.backward()
    assert shapes  # activations were packed
    weight_shapes = {p.shape for p in model.parameters()} | {p.T.shape for p in model.parameters() if p.dim() == 2}
    assert not any(s in weight_shapes for s in shapes if len(s) == 2 and s[0] != 2 * 8)


def test_gradient_checkpointing_recomputation_is_not_packed_twice():
    plain, _, _ = _lora_grads(checkpointing=True)
    bypass, _, _ = _lora_grads(16, checkpointing=True)
    assert torch.equal(bypass, plain)
    grads, packer, model = _lora_grads(8, checkpointing=True)
    after_backward = packer.packed_tensors
    packer.reset_stats()
    tokens = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=tokens, labels=tokens).loss
    after_forward = packer.packed_tensors
    loss.backward()
    assert packer.packed_tensors == after_forward == after_backward  # backward's recomputation packed nothing
    no_checkpoint, packer_full, _ = _lora_grads(8)
    assert after_forward < packer_full.packed_tensors  # checkpointed segments keep nothing to pack


def test_stash_quant_config_trains_target_copies_and_reloads(tmp_path):
    model = get_peft_model(_llama(), StashQuantConfig(target_modules=["q_proj"], bits=4, milestones=[[0.5, 8]]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("q_proj.stash_module" in n for n in trainable)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    tokens = torch.randint(0, 256, (2, 16))
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()
    assert stash_packer(model).packed_tensors > 0
    model.eval()
    with torch.no_grad():
        expected = model(tokens).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(_llama(), tmp_path)
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, expected)
        assert not torch.equal(_llama()(tokens).logits, expected)  # training changed the targets
    merged = model.merge_and_unload()
    with torch.no_grad():
        assert torch.equal(merged(tokens).logits, expected)
    assert stash_packer(merged) is None


def test_composes_with_every_method_and_lora():
    tokens = torch.randint(0, 256, (2, 16))
    models = {
        "qoft": get_peft_model(_llama(), QOFTConfig(target_modules=["q_proj"], block_size=16, stash={"bits": 4})),
        "quant_full": get_peft_model(_llama(), QuantFullConfig(target_modules=["q_proj"], stash={"bits": 6})),
        "lora": get_peft_model(_llama(), LoraConfig(target_modules=["q_proj"])),
    }
    enable_stash(models["lora"], bits=8)
    QuantFullOptimizer(models["quant_full"], lr=1e-3)
    for name, model in models.items():
        model(input_ids=tokens, labels=tokens).loss.backward()
        packer = stash_packer(model)
        assert packer is not None and packer.packed_tensors > 0, name
        assert any(p.grad is not None for p in model.parameters() if p.requires_grad) or name == "quant_full"

    class Denoiser(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))

        def forward(self, sample, timestep):
            return self.net(sample)

    denoiser = get_peft_model(Denoiser(), TimestepScaleConfig(stash={"bits": 4, "min_numel": 64}))
    denoiser(torch.randn(4, 8, 64), torch.tensor([1, 900, 2, 800])).sum().backward()
    assert stash_packer(denoiser).packed_tensors > 0
    assert denoiser.base_model.model.net[0].ts_scale_in["default"].grad is not None


def test_trainer_callback_advances_the_schedule():
    model = get_peft_model(_llama(), LoraConfig(target_modules=["q_proj"]))
    packer = enable_stash(model, bits=4, milestones=[(0.5, 8)], plateau_patience=1)
    callback = peft_quant.stash_callback()
    state = SimpleNamespace(global_step=4, max_steps=10)
    callback.on_step_end(None, state, None, model=model)
    assert packer.bits == 4
    state.global_step = 5
    callback.on_step_end(None, state, None, model=model)
    assert packer.bits == 8
    callback.on_log(None, state, None, model=model, logs={"loss": 1.0})
    callback.on_log(None, state, None, model=model, logs={"loss": 1.0})  # a plateau: next width up
    assert packer.bits == 16


def test_stash_on_a_bitsandbytes_4bit_model_with_qoft(tiny_llama_dir):
    pytest.importorskip("bitsandbytes")
    from .conftest import load_llama

    tokens = torch.randint(0, 256, (2, 16))
    grads = []
    for bits in (None, 16, 8):
        torch.manual_seed(0)  # the same random rotations each time
        model = get_peft_model(load_llama(tiny_llama_dir, "nf4"), QOFTConfig(target_modules=["q_proj", "down_proj"],
                                                                             block_size=16, init_weights=False))
        packer = enable_stash(model, bits=bits, min_numel=64) if bits else None
        model.train()
        model(input_ids=tokens, labels=tokens).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for _, p in sorted(model.named_parameters()) if p.requires_grad]))
        if bits == 8:
            assert packer.packed_tensors > 0
    assert torch.equal(grads[1], grads[0])  # 16-bit bypass: exact
    assert 0 < float((grads[2] - grads[0]).norm() / grads[0].norm()) < 0.03


def test_a_tensor_saved_by_several_operations_is_packed_once_and_statistics_are_kept():
    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (nn.Linear(64, 64) for _ in range(3))

        def forward(self, x):
            return self.q(x) + self.k(x) + self.v(x)

    model = QKV()
    packer = enable_stash(model, bits=4)
    x = torch.randn(64, 64, requires_grad=True)
    model(x).sum().backward()
    assert packer.packed_tensors == 1 and packer.original_bytes == x.numel() * 4  # one copy for q, k and v

    class Attention(nn.Module):
        def forward(self, q):
            return torch.nn.functional.scaled_dot_product_attention(q, q * 2, q * 3, is_causal=True)

    attention = Attention()
    packer = enable_stash(attention, bits=4)
    saved = []
    original = packer._pack
    packer._pack = lambda t: saved.append((tuple(t.shape), original(t) is t)) or original(t)
    attention(torch.randn(2, 4, 256, 32, requires_grad=True)).sum().backward()  # log-sum-exp above min_numel
    assert any(shape == (2, 4, 256) and kept for shape, kept in saved)  # the (B, heads, T) log-sum-exp stays exact


def test_views_of_one_memory_region_are_packed_once_and_restored_with_their_strides():
    """A hidden state saved as (batch, seq, width) by tanh, as (batch·seq, width) by a matmul and transposed by a
    bmm is one packed region; each view comes back with its own shape and strides (wrong strides would scramble the
    gradients far beyond the 8-bit error). A view with gaps is packed on its own and comes back contiguous."""

    class Views(nn.Module):
        def __init__(self):
            super().__init__()
            generator = torch.Generator().manual_seed(1)
            self.weight = nn.Parameter(torch.randn(64, 48, dtype=torch.float64, generator=generator) / 8)
            self.other = nn.Parameter(torch.randn(4, 16, 5, dtype=torch.float64, generator=generator))
            self.every_other = nn.Parameter(torch.randn(32, dtype=torch.float64, generator=generator))

        def forward(self, x):
            h = torch.tanh(x)  # saves h (4, 16, 64)
            flat = h.reshape(-1, 64) @ self.weight  # saves the (64, 64) view of h
            mixed = torch.bmm(h.transpose(1, 2), self.other)  # saves the transposed view of h
            gapped = h[..., ::2] * self.every_other  # saves a view with gaps: packed on its own
            return (flat.sum(dim=0) * torch.arange(48.0)).sum() + mixed.sum() + gapped.square().sum()

    x = torch.randn(4, 16, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    exact_model, model = Views(), Views()
    exact = torch.autograd.grad(exact_model(x), [x, *exact_model.parameters()])
    packer = enable_stash(model, bits=8)
    compressed = torch.autograd.grad(model(x), [x, *model.parameters()])
    assert packer.packed_tensors == 3  # h once (three dense views), its gapped view, gapped
    assert packer.original_bytes == (x.numel() + 2 * x.numel() // 2) * 8
    for got, want in zip(compressed, exact):
        assert float((got - want).norm() / want.norm()) < 0.02


def _with_outliers(dtype=torch.float32) -> torch.Tensor:
    """A (16, 1, 26, 26) float attention mask (-inf past each row's length) plus NaN, +inf and a mask fill value
    (``finfo.min``) scattered among random activations."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 26, 26, generator=generator).to(dtype)
    lengths = torch.randint(5, 27, (16,), generator=generator)
    x.masked_fill_(torch.arange(26) >= lengths[:, None, None, None], float("-inf"))
    flat = x.view(-1)
    flat[[3, 700, 701]] = torch.tensor([float("nan"), float("inf"), torch.finfo(dtype).min], dtype=dtype)
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits, scale", [(4, "bf16"), (8, "e8m0"), (2, "bf16")])
def test_outliers_round_trip_exactly_and_leave_their_neighbours_alone(bits, scale, dtype):
    x = _with_outliers(dtype)
    outlier = ~(x.abs() < torch.finfo(dtype).max / 2)
    assert outlier.sum() > 400
    packed = pack(x, bits, 32, scale=scale)
    restored = unpack(packed)
    assert packed.outliers == int(outlier.sum())
    assert torch.equal(restored[outlier].view(torch.uint8), x[outlier].view(torch.uint8))  # bit for bit, NaN too
    # every other value as if the outliers were zeros: the same blocks, scales and codes
    zeroed = unpack(pack(x.masked_fill(outlier, 0.0), bits, 32, scale=scale))
    assert torch.equal(restored[~outlier], zeroed[~outlier]) and torch.isfinite(restored[~outlier]).all()
    assert packed.nbytes == pack(x.masked_fill(outlier, 0.0), bits, 32, scale=scale).nbytes + int(
        outlier.sum()) * (8 + x.element_size())


def test_tensors_holding_outliers_are_kept_unpacked():
    """SDPA with a float mask saves the mask (-inf where masked) for backward: it stays the very tensor, while the
    activations beside it are packed, and the gradients stay finite and within the 8-bit bound."""

    class Attention(nn.Module):
        def forward(self, q, mask):
            return torch.nn.functional.scaled_dot_product_attention(q, q * 2, q * 3, attn_mask=mask)

    q = torch.randn(4, 2, 26, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    mask = torch.where(torch.arange(26) < torch.tensor([26, 20, 9, 4])[:, None, None, None], 0.0, float("-inf"))
    mask = mask.expand(4, 1, 26, 26).contiguous()
    exact = torch.autograd.grad(Attention()(q, mask).square().sum(), q)[0]
    module = Attention()
    packer = enable_stash(module, bits=8, min_numel=64)
    saved = []
    original = packer._pack
    packer._pack = lambda t: saved.append((t, original(t))) or saved[-1][1]
    compressed = torch.autograd.grad(module(q, mask).square().sum(), q)[0]
    assert any(tensor is mask and kept is mask for tensor, kept in saved)
    assert packer.packed_tensors > 0 and torch.isfinite(compressed).all()
    assert 0 < float((compressed - exact).norm() / exact.norm()) < 0.03  # the 8-bit bound of the LoRA model
