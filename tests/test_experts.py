"""QOFT and TimestepScale on mixture-of-experts expert banks (gpt-oss), float and MXFP4, against references computed
another way: transformers' own MXFP4 decoder and a float64 per-token loop written out here."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import GptOssConfig, GptOssForCausalLM
from transformers.integrations.mxfp4 import Mxfp4GptOssExperts, convert_moe_packed_tensors

from peft_quant import QOFTConfig, TimestepScaleConfig, UnsupportedLayerError
from peft_quant.experts import Mxfp4Experts, quantize_experts
from peft_quant.kernels.block_scaled import mxfp4_dequantize, mxfp4_quantize
from peft_quant.qoft.experts_layer import QOFTExpertsLayer
from peft_quant.timestep_scale.experts_layer import TimestepScaleExpertsLayer
from peft_quant.timestep_scale.routing import RoutingError

BANK = "model.layers.0.mlp.experts"


def tiny_config(layers: int = 1) -> GptOssConfig:
    return GptOssConfig(hidden_size=64, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                        vocab_size=128, experts_implementation="eager")


def tiny_gpt_oss(mxfp4: bool = True, seed: int = 0, layers: int = 1) -> GptOssForCausalLM:
    """A tiny gpt-oss (4 experts, top-2) with non-zero expert biases; its banks in MXFP4 when ``mxfp4``."""
    torch.manual_seed(seed)
    model = GptOssForCausalLM(tiny_config(layers)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.gate_up_proj_bias.normal_(0.0, 0.02)
            layer.mlp.experts.down_proj_bias.normal_(0.0, 0.02)
    if mxfp4:
        quantize_experts(model)
    return model


class TinyDenoiser(nn.Module):
    """A gpt-oss trunk called with a ``timestep``, as TimestepScale's router expects of a denoiser."""

    def __init__(self, model: GptOssForCausalLM) -> None:
        super().__init__()
        self.model = model.model

    def forward(self, input_ids: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).last_hidden_state


def tokens(seed: int = 1, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def routed_input(seed: int = 2, count: int = 24) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden (count, 64), top-2 expert ids, routing weights)`` hitting every expert."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(count, 64, generator=gen)
    indices = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(count)])  # (count, 2)
    weights = torch.softmax(torch.randn(count, 2, generator=gen), -1)
    return hidden, indices, weights


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def reference_experts(bank: Mxfp4Experts, hidden: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                      rotations: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The bank's output in float64, token by token: weights decoded by transformers' MXFP4 decoder, gpt-oss' gate
    written out. ``rotations``: per projection ``(E, in, in)`` matrices ``Rᵀ`` applied to each expert's input."""
    w = {proj: weight.transpose(1, 2) for proj, weight in _dequantized(bank).items()}  # (E, in, out)
    b = {proj: getattr(bank, f"{proj}_bias").double() for proj in w}
    if rotations is not None:
        w = {proj: rotations[proj].transpose(1, 2) @ w[proj] for proj in w}  # rows x become x R, then x R W
    x = hidden.double()
    gate_up = torch.einsum("nh,nkho->nko", x, w["gate_up_proj"][indices]) + b["gate_up_proj"][indices]
    gate, up = gate_up[..., 0::2].clamp(max=bank.limit), gate_up[..., 1::2].clamp(-bank.limit, bank.limit)
    act = (up + 1) * gate * torch.sigmoid(gate * bank.alpha)  # (n, k, I)
    out = torch.einsum("nki,nkih->nkh", act, w["down_proj"][indices]) + b["down_proj"][indices]
    return (out * weights.double()[..., None]).sum(1)


# ---- the MXFP4 bank ------------------------------------------------------------------------------------------------

def test_mxfp4_bank_forward_and_input_gradient_match_float64_reference():
    bank = tiny_gpt_oss().model.layers[0].mlp.experts
    assert isinstance(bank, Mxfp4Experts)
    assert bank.gate_up_proj_blocks.shape == (4, 128, 2, 16) and bank.gate_up_proj_blocks.dtype == torch.uint8
    assert bank.down_proj_scales.shape == (4, 64, 2) and bank.down_proj_scales.dtype == torch.uint8
    hidden, indices, weights = routed_input()
    hidden.requires_grad_(True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = bank(hidden, indices, weights)
    upstream = torch.randn_like(out)
    out.backward(upstream)

    x64 = hidden.detach().double().requires_grad_(True)
    ref = reference_experts(bank, x64, indices, weights)
    ref.backward(upstream.double())
    assert rel(out, ref) < 1e-5
    assert rel(hidden.grad, x64.grad) < 1e-3
    # backward keeps activations and, if anything of the bank, its own codes (views, no copy): never a float weight
    bank_storages = {getattr(bank, n).untyped_storage().data_ptr() for n, _ in bank.named_buffers()}
    assert all(t.untyped_storage().data_ptr() in bank_storages for t in saved if t.dtype == torch.uint8)
    one_projection = 64 * 64
    assert max(t.numel() for t in saved if t.is_floating_point()) < one_projection


def test_requantizing_a_dequantized_bank_is_exact_and_bad_widths_name_the_fix():
    bank = tiny_gpt_oss().model.layers[0].mlp.experts
    weight = mxfp4_dequantize(bank.gate_up_proj_blocks, bank.gate_up_proj_scales, torch.bfloat16)
    assert torch.equal(mxfp4_dequantize(*mxfp4_quantize(weight), torch.float32), weight.float())
    with pytest.raises(ValueError, match="Fix:"):
        Mxfp4Experts(4, 48, 64)


def test_quantize_model_mxfp4_holds_linear_layers_and_expert_banks_alike():
    """``quantize_model(backend="mxfp4")`` stores what gpt-oss ships in MXFP4 (its expert banks) as the same tensors
    :func:`quantize_experts` writes, and Linear layers as :class:`Mxfp4Linear`; widths it cannot block are named."""
    import peft_quant
    from peft_quant.block_scaled import Mxfp4Linear

    expected = tiny_gpt_oss(mxfp4=True).model.layers[0].mlp.experts
    model = tiny_gpt_oss(mxfp4=False)
    peft_quant.quantize_model(model, backend="mxfp4", target_modules=r".*(experts|q_proj)")
    layer = model.model.layers[0]
    assert isinstance(layer.mlp.experts, Mxfp4Experts) and isinstance(layer.self_attn.q_proj, Mxfp4Linear)
    assert type(layer.self_attn.k_proj) is nn.Linear  # not targeted
    for name, tensor in expected.state_dict().items():
        assert torch.equal(layer.mlp.experts.state_dict()[name], tensor), name
    narrow = GptOssForCausalLM(GptOssConfig(**{**tiny_config().to_dict(), "intermediate_size": 48}))
    with pytest.raises(ValueError, match=r"experts \(48\).*Fix:"):
        peft_quant.quantize_model(narrow, backend="mxfp4", target_modules=r".*experts")
    assert type(narrow.model.layers[0].mlp.experts) is not Mxfp4Experts  # refused before swapping anything


def test_transformers_gpu_mxfp4_bank_is_refused_with_the_fix():
    model = tiny_gpt_oss(mxfp4=False)
    model.model.layers[0].mlp.experts = Mxfp4GptOssExperts(tiny_config())
    with pytest.raises(UnsupportedLayerError, match="Mxfp4Config\\(dequantize=True\\).*quantize_experts"):
        get_peft_model(model, QOFTConfig(target_modules=["experts"], block_size=16))


# ---- QOFT ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mxfp4", [False, True], ids=["float", "mxfp4"])
def test_qoft_identity_at_init_and_one_step_trains_exactly_the_adapter(mxfp4):
    model = tiny_gpt_oss(mxfp4)
    ids = tokens()
    with torch.no_grad():
        base = model(ids).logits
    peft_model = get_peft_model(model, QOFTConfig(target_modules=["experts"], block_size=16))
    assert isinstance(peft_model.base_model.model.get_submodule(BANK), QOFTExpertsLayer)
    with torch.no_grad():
        assert torch.equal(peft_model(ids).logits, base)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable == {f"base_model.model.{BANK}.qoft_experts_{p}.default" for p in ("gate_up", "down")}
    before = {k: v.clone() for k, v in peft_model.base_model.model.state_dict().items()}
    peft_model.train()
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model(ids, labels=ids).loss.backward()
    optimizer.step()
    after = peft_model.base_model.model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}  # the bank's codes stay bit for bit
    assert changed == {f"{BANK}.qoft_experts_{p}.default" for p in ("gate_up", "down")}


def test_qoft_expert_rotation_acts_only_on_its_own_tokens():
    peft_model = get_peft_model(tiny_gpt_oss(), QOFTConfig(target_modules=["experts"], block_size=16))
    layer = peft_model.base_model.model.get_submodule(BANK)
    hidden, indices, weights = routed_input()
    with torch.no_grad():
        before = layer(hidden, indices, weights)
        layer.qoft_experts_gate_up["default"][2].normal_(0.0, 0.05)
        layer.qoft_experts_down["default"][2].normal_(0.0, 0.05)
        after = layer(hidden, indices, weights)
        mine = (indices == 2).any(1)
        assert torch.equal(after[~mine], before[~mine])
        assert (after[mine] != before[mine]).any(1).all()
        # and the rotated output is the float64 reference with that expert's R on its inputs
        rotations = {proj: t.to(torch.float64) for proj, t in layer.get_delta_weight("default").items()}
        assert rel(after, reference_experts(layer.get_base_layer(), hidden, indices, weights, rotations)) < 1e-5
        with peft_model.disable_adapter():
            assert torch.equal(layer(hidden, indices, weights), layer.get_base_layer()(hidden, indices, weights))
            assert not torch.equal(layer(hidden, indices, weights), after)


def test_qoft_block_size_not_dividing_a_width_names_the_fix():
    with pytest.raises(ValueError, match="does not divide.*Fix:"):
        get_peft_model(tiny_gpt_oss(), QOFTConfig(target_modules=["experts"], block_size=24))


def test_qoft_merge_float_exact_mxfp4_requantized_with_the_error_reported():
    ids = tokens()
    for mxfp4 in (False, True):
        peft_model = get_peft_model(tiny_gpt_oss(mxfp4),
                                    QOFTConfig(target_modules=["experts"], block_size=16, init_weights=False))
        layer = peft_model.base_model.model.get_submodule(BANK)
        bank = layer.get_base_layer()
        stored = {k: v.clone() for k, v in bank.state_dict().items()}
        hidden, indices, weights = routed_input()
        with torch.no_grad():
            unmerged, unmerged_logits = layer(hidden, indices, weights), peft_model(ids).logits
            for _ in range(2):  # merge/unmerge cycles give the stored tensors back bit for bit
                peft_model.merge_adapter()
                peft_model.unmerge_adapter()
            assert all(torch.equal(v, stored[k]) for k, v in bank.state_dict().items())
            # the target W_e R_eᵀ, from the unmerged bank and the adapter's block-diagonal Rᵀ
            target = {proj: w @ layer.get_delta_weight("default")[proj].double()
                      for proj, w in _dequantized(bank).items()}
            merged = peft_model.merge_and_unload()
            error = merged.peft_quant_merge_report[BANK]["relative_error"]
            merged_bank = merged.get_submodule(BANK)
            new = _dequantized(merged_bank)
            measured = float(torch.cat([(new[p] - target[p]).flatten() for p in new]).norm()
                             / torch.cat([target[p].flatten() for p in new]).norm())
            assert abs(measured - error) <= 1e-6 * max(error, 1e-3)
            out = merged_bank(hidden, indices, weights)
        if mxfp4:
            assert isinstance(merged_bank, Mxfp4Experts) and 0.01 < error < 0.2
            assert rel(out, unmerged) < error
        else:
            assert error < 1e-6 and rel(out, unmerged) < 1e-5
            torch.testing.assert_close(merged(ids).logits, unmerged_logits, rtol=1e-4, atol=1e-5)


def _dequantized(bank: nn.Module) -> dict[str, torch.Tensor]:
    """Each projection's weights ``(E, out, in)`` in float64: transformers' decoder for MXFP4, else the float tensor."""
    projections = ("gate_up_proj", "down_proj")
    if isinstance(bank, Mxfp4Experts):  # transformers' decoder gives gpt-oss' (E, in, out)
        decoded = {p: convert_moe_packed_tensors(getattr(bank, f"{p}_blocks"), getattr(bank, f"{p}_scales"),
                                                 dtype=torch.float64) for p in projections}
    else:
        decoded = {p: getattr(bank, p).detach().double() for p in projections}
    return {p: w.transpose(1, 2) for p, w in decoded.items()}


# ---- TimestepScale -------------------------------------------------------------------------------------------------

def test_timestep_scale_identity_routing_per_sample_and_merge_rules():
    ids, timesteps = tokens(), torch.tensor([100, 900])
    base_model = TinyDenoiser(tiny_gpt_oss())
    with torch.no_grad():
        base = base_model(ids, timesteps)
    model = get_peft_model(base_model, TimestepScaleConfig(target_modules=["experts"], num_experts=2))
    layer = model.base_model.model.get_submodule(BANK)
    assert isinstance(layer, TimestepScaleExpertsLayer)
    assert layer.ts_experts_gate_up_in["default"].shape == (2, 4, 64)
    assert layer.ts_experts_down_out["default"].shape == (2, 4, 64)
    with torch.no_grad():
        assert torch.equal(model(ids, timesteps), base)
        for table in layer.TABLES.values():
            getattr(layer, table)["default"].uniform_(0.5, 1.5)
        mixed = model(ids, timesteps)
        for i in range(2):  # each sample of a mixed batch gets its own timestep expert
            alone = model(ids[i:i + 1], timesteps[i:i + 1])
            torch.testing.assert_close(mixed[i:i + 1], alone, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(model(ids[:1], timesteps[1:]), mixed[:1], atol=1e-4)  # the expert matters
    with pytest.raises(ValueError, match="timestep experts.*Fix:"):
        model.merge_and_unload()
    handle = layer.register_forward_pre_hook(lambda module, args: routed_input(count=25))  # 25 rows, 2 samples
    with pytest.raises(RoutingError, match="cannot be mapped to samples.*Fix:"), torch.no_grad():
        model(ids, timesteps)
    handle.remove()


def test_timestep_scale_single_expert_merges_into_mxfp4_with_the_error_reported():
    ids, timesteps = tokens(), torch.tensor([100, 900])
    model = get_peft_model(TinyDenoiser(tiny_gpt_oss()),
                           TimestepScaleConfig(target_modules=["experts"], num_experts=1, init_weights=False))
    with torch.no_grad():
        unmerged = model(ids, timesteps)
        merged = model.merge_and_unload()
        error = merged.peft_quant_merge_report[BANK]["relative_error"]
        assert 0.01 < error < 0.2
        assert rel(merged(ids, timesteps), unmerged) < error


# ---- save and load -------------------------------------------------------------------------------------------------

def test_save_and_reload_in_a_fresh_process_gives_identical_outputs(tmp_path):
    ids, timesteps = tokens(), torch.tensor([100, 900])
    qoft = get_peft_model(tiny_gpt_oss(), QOFTConfig(target_modules=["experts"], block_size=16, init_weights=False))
    scale = get_peft_model(TinyDenoiser(tiny_gpt_oss()),
                           TimestepScaleConfig(target_modules=["experts"], num_experts=2, init_weights=False))
    qoft.save_pretrained(tmp_path / "qoft")
    scale.save_pretrained(tmp_path / "scale")
    with torch.no_grad():
        expected = {"qoft": qoft(ids).logits, "scale": scale(ids, timesteps)}
    script = textwrap.dedent(f"""
        import torch
        from peft import PeftModel
        from safetensors.torch import save_file
        from tests.test_experts import TinyDenoiser, tiny_gpt_oss, tokens
        ids, timesteps = tokens(), torch.tensor([100, 900])
        qoft = PeftModel.from_pretrained(tiny_gpt_oss(), {str(tmp_path / "qoft")!r})
        scale = PeftModel.from_pretrained(TinyDenoiser(tiny_gpt_oss()), {str(tmp_path / "scale")!r})
        with torch.no_grad():
            save_file({{"qoft": qoft(ids).logits, "scale": scale(ids, timesteps)}}, {str(tmp_path / "out.st")!r})
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", script], check=True, cwd=root, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    got = load_file(str(tmp_path / "out.st"))
    assert torch.equal(got["qoft"], expected["qoft"]) and torch.equal(got["scale"], expected["scale"])


def test_model_card_says_how_to_load_the_mxfp4_base(tmp_path):
    """The card's load snippet rebuilds MXFP4 banks from gpt-oss' own checkpoint (transformers' GPU-only MXFP4 layers
    dequantized, then re-quantized bit for bit), not a plain ``from_pretrained`` that gives other layers."""
    model = get_peft_model(tiny_gpt_oss(), QOFTConfig(target_modules=["experts"], block_size=16))
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "quantization_config=Mxfp4Config(dequantize=True)" in card
    assert 'peft_quant.quantize_model(base, backend="mxfp4", target_modules=r".*experts")' in card
