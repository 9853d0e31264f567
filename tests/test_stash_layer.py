"""StashQuant as a PEFT method: its layer (merge, unmerge, disable, dtypes, several adapters, meta creation), the
load-time fit check, config validation, and training through a model whose attention mask holds -inf."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from peft_quant import StashQuantConfig
from peft_quant.stash import enable_stash, stash_packer
from peft_quant.stash.model import StashQuantLayer


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(torch.relu(self.proj(x)))


class Net(nn.Module):
    def __init__(self, layers: int = 2, width: int = 32, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(Block(width) for _ in range(layers))
        self.head = nn.Linear(width, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _trained(model: nn.Module, x: torch.Tensor, steps: int = 2) -> nn.Module:
    """A few SGD steps, so the trained copies differ from the base modules."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    return model


def _peft(config: StashQuantConfig, **kwargs) -> nn.Module:
    return get_peft_model(Net(), config, **kwargs)


X = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))


def test_merge_disable_and_unmerge_restore_the_base_exactly():
    model = _trained(_peft(StashQuantConfig(target_modules=["proj"])), X)
    with torch.no_grad():
        base = Net()(X)
        trained = model(X)
        assert not torch.equal(trained, base)
        model.merge_adapter()
        assert torch.equal(model(X), trained)
        with model.disable_adapter():
            assert torch.equal(model(X), base)  # the base output, not the merged one
        model.merge_adapter()
        model.unmerge_adapter()
        restored = {name.replace(".base_layer.", "."): t for name, t in model.base_model.model.state_dict().items()
                    if "stash_module" not in name}
        original = Net().state_dict()
        assert restored.keys() == original.keys()
        assert all(torch.equal(restored[name], original[name]) for name in original)  # bit for bit
        assert torch.equal(model(X), trained)


def test_merge_skips_layers_without_the_adapter_and_refuses_two_active_adapters():
    model = _peft(StashQuantConfig(target_modules=["proj"]))
    model.add_adapter("head", StashQuantConfig(target_modules=["head"]))
    model.set_adapter("head")
    _trained(model, X)
    with torch.no_grad():
        expected = model(X)
        model.merge_adapter()  # "head" exists on `head` only: the proj layers are skipped
        assert torch.equal(model(X), expected)
        model.unmerge_adapter()
    model.base_model.set_adapter(["default", "head"])
    assert model(X).shape == (4, 8)  # no module holds both adapters
    model.add_adapter("other", StashQuantConfig(target_modules=["proj"]))
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="cannot apply adapters \\['default', 'other'\\] at once.*Fix: "):
        model(X)
    with pytest.raises(ValueError, match="cannot merge adapters \\['default', 'other'\\] at once.*Fix: "):
        model.merge_adapter()


def test_layer_exposes_the_base_features():
    layer = _peft(StashQuantConfig(target_modules=["proj"])).base_model.model.layers[0].proj
    assert isinstance(layer, StashQuantLayer) and (layer.in_features, layer.out_features) == (32, 32)


@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_model_trains_and_merges_in_its_own_dtype(autocast):
    net = Net().to(torch.bfloat16)
    model = get_peft_model(net, StashQuantConfig(target_modules=["proj"]), autocast_adapter_dtype=autocast)
    copy = model.base_model.model.layers[0].proj.stash_module["default"]
    assert copy.weight.dtype == (torch.float32 if autocast else torch.bfloat16)
    x = X.to(torch.bfloat16)
    _trained(model, x)
    with torch.no_grad():
        out = model(x)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        # reference: the trained copy's weights rounded to bf16, run in a plain bf16 model
        reference = Net().to(torch.bfloat16)
        for i, layer in enumerate(reference.layers):
            layer.proj.load_state_dict(model.base_model.model.layers[i].proj.stash_module["default"].state_dict())
        merged = model.merge_and_unload()
        assert all(p.dtype == torch.bfloat16 for p in merged.parameters())
        assert isinstance(merged.layers[0].proj, nn.Linear)
        assert torch.equal(merged(x), reference(x))


def test_low_cpu_mem_usage_creates_the_copies_on_meta_and_loading_fills_them(tmp_path):
    model = _trained(_peft(StashQuantConfig(target_modules=["proj"])), X)
    with torch.no_grad():
        expected = model(X)
    model.save_pretrained(tmp_path)
    empty = _peft(StashQuantConfig(target_modules=["proj"]), low_cpu_mem_usage=True)
    copies = [p for n, p in empty.named_parameters() if "stash_module" in n]
    assert copies and all(p.is_meta for p in copies)
    assert not any(p.is_meta for n, p in empty.named_parameters() if "stash_module" not in n)
    reloaded = PeftModel.from_pretrained(Net(), tmp_path, low_cpu_mem_usage=True)
    with torch.no_grad():
        assert torch.equal(reloaded(X), expected)


def test_an_adapter_refuses_to_load_onto_a_model_it_does_not_fit(tmp_path):
    _peft(StashQuantConfig(target_modules=["proj"])).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not fit.*layers.1.proj.*Fix: "):
        PeftModel.from_pretrained(Net(layers=1), tmp_path)  # the adapter has a second layer this model lacks
    with pytest.raises(ValueError, match="does not fit.*\\(32, 32\\) vs model \\(16, 16\\).*Fix: "):
        PeftModel.from_pretrained(Net(width=16), tmp_path)  # not torch's raw size mismatch


BAD_VALUES = [
    ("min_numel", "1024", "min_numel must be a non-negative integer"),
    ("min_numel", -1, "min_numel must be a non-negative integer"),
    ("bits", 4.0, "bits must be an integer from 2 to 8"),
    ("bits", 1, "bits must be an integer from 2 to 8"),
    ("block_size", 128, "block_size must be a power of two"),
    ("milestones", [[0.5, 8.7]], "milestone must be a pair \\[progress, bits\\]"),
    ("milestones", [[0.5]], "milestone must be a pair"),
    ("milestones", [0.5, 8], "milestone must be a pair"),
    ("milestones", [[1.5, 8]], "must lie in \\[0, 1\\]"),
    ("milestones", "0.5:8", "milestones must be a list of \\[progress, bits\\] pairs"),
    ("unit", "epoch", "unit must be 'fraction' or 'step'"),
    ("plateau_patience", 0, "plateau_patience must be a positive integer"),
    ("plateau_min_delta", -0.1, "plateau_min_delta must be a non-negative number"),
    ("stochastic_rounding", "yes", "stochastic_rounding must be True or False"),
]


@pytest.mark.parametrize("field, value, message", BAD_VALUES)
def test_enable_stash_rejects_bad_values_naming_the_fix(field, value, message):
    with pytest.raises(ValueError, match=f"{message}.*Fix: "):
        enable_stash(Net(), **{field: value})


@pytest.mark.parametrize("field, value, message", BAD_VALUES)
def test_config_rejects_bad_values_naming_the_fix(field, value, message):
    """The config's generic field-type check (config_base) may answer a wrongly typed value first."""
    with pytest.raises(ValueError, match=f"({message}|{field} must be ).*Fix: "):
        StashQuantConfig(target_modules=["proj"], **{field: value})


def _bert_grads(bits, steps=2):
    """Loss per step and the first step's gradients of a tiny SDPA BERT on a padded batch, trained with a StashQuant
    stash of ``bits`` (None: no packer)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    model = BertForSequenceClassification(config)
    packer = enable_stash(model, bits=bits, min_numel=64) if bits else None
    kept = []
    if packer is not None:
        original = packer._pack
        packer._pack = lambda t: kept.append(original(t) is t) or original(t) if _non_finite(t) else original(t)
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 128, (4, 26), generator=generator)
    attention_mask = torch.ones(4, 26, dtype=torch.long)
    attention_mask[1:, 9:] = 0  # padded rows
    labels = torch.tensor([0, 1, 0, 1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, first = [], None
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(input_ids=ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        first = first if first is not None else torch.cat([p.grad.flatten() for p in model.parameters()])
        losses.append(float(loss.detach()))
        optimizer.step()
    return losses, first, packer, kept


def _non_finite(t: torch.Tensor) -> bool:
    return t.is_floating_point() and not bool(torch.isfinite(t).all())


def test_padded_sdpa_bert_trains_with_a_4_bit_stash_and_its_mask_stays_exact():
    plain_losses, plain, _, _ = _bert_grads(None)
    losses, grads, packer, kept = _bert_grads(4)
    assert kept and all(kept)  # the -inf mask was saved for backward, and kept unpacked every time
    assert packer.packed_tensors > 0
    assert all(torch.isfinite(torch.tensor(losses))) and torch.isfinite(grads).all()
    assert losses[0] == plain_losses[0]  # the forward is never changed by the stash
    error = float((grads - plain).norm() / plain.norm())
    assert 0 < error < 0.35  # the 4-bit bound of the LoRA model in test_stash.py
    exact_losses, exact, _, _ = _bert_grads(16)
    assert exact_losses == plain_losses and torch.equal(exact, plain)


def test_stash_quant_model_keeps_a_packer_until_unload():
    model = _peft(StashQuantConfig(target_modules=["proj"], bits=4, min_numel=16))
    _trained(model, X, steps=1)
    assert stash_packer(model).packed_tensors > 0
    assert all(isinstance(m, BaseTunerLayer) for m in model.modules() if isinstance(m, StashQuantLayer))
    assert stash_packer(model.unload()) is None
