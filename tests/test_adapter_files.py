"""Adapter files, whole: checked against their manifest and the model on load, typed configs, atomic saves."""

from __future__ import annotations

import errno
import json
import os
import types

import peft.config
import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from peft_quant import QOFTConfig, QuantFullConfig, StashQuantConfig, TimestepScaleConfig
from peft_quant.config_base import _matches, field_types

WIDTH = 16


class Denoiser(nn.Module):
    """A minimal denoiser (TimestepScale reads the timestep argument): ``layers`` applied in turn."""

    def __init__(self, num_layers: int, width: int = WIDTH) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(width, width) for _ in range(num_layers)])

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.layers(sample)


def _config(method: str, num_layers: int = 2):
    targets = [f"layers.{i}" for i in range(num_layers)]
    return {
        "qoft": lambda: QOFTConfig(target_modules=targets, block_size=4, init_weights=False),
        "quant_full": lambda: QuantFullConfig(target_modules=targets),
        "timestep_scale": lambda: TimestepScaleConfig(target_modules=targets, init_weights=False),
        "stash_quant": lambda: StashQuantConfig(target_modules=targets),
    }[method]()


def _base(num_layers: int = 2, width: int = WIDTH) -> Denoiser:
    torch.manual_seed(0)
    return Denoiser(num_layers, width)


def _model(method: str, num_layers: int = 2, width: int = WIDTH, seed: int = 0) -> PeftModel:
    base = _base(num_layers, width)
    torch.manual_seed(seed)  # the adapter's random init (init_weights=False)
    return get_peft_model(base, _config(method, num_layers))


def _output(model: nn.Module) -> torch.Tensor:
    x = torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(x, timestep=torch.tensor([10.0, 600.0, 900.0]))


def _saved(method: str, path, **kwargs) -> str:
    _model(method, **kwargs).save_pretrained(path)
    return str(path)


def _edit_tensors(path: str, edit) -> None:
    file = os.path.join(path, "adapter_model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def _edit_config(path: str, edit) -> None:
    file = os.path.join(path, "adapter_config.json")
    config = json.load(open(file))
    edit(config)
    json.dump(config, open(file, "w"))


def _files(path: str) -> dict[str, bytes]:
    return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))
            if os.path.isfile(os.path.join(path, name))}


# ---- 1. adapter files checked whole on load ------------------------------------------------------------------


@pytest.mark.parametrize("method", ["qoft", "quant_full", "timestep_scale", "stash_quant"])
def test_adapter_of_a_deeper_model_is_refused(tmp_path, method):
    """PEFT's remap leaves keys of layers the model lacks without the adapter name, so a check of
    '<table>.<adapter>' keys never saw them: a 2-layer adapter loaded onto a 1-layer model silently."""
    model = _model(method)
    model.save_pretrained(tmp_path)
    assert torch.equal(_output(PeftModel.from_pretrained(_base(), tmp_path)), _output(model))  # the right model
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors\) does not fit.*base_model\.model\.layers\.1\."
                                         r".*this model has no 'base_model\.model\.layers\.1'.*Fix: load it onto"):
        PeftModel.from_pretrained(_base(1), tmp_path)


def test_wider_model_gets_our_error_for_buffers_too(tmp_path):
    """QuantFull's int8 codes are buffers: torch's raw size mismatch before."""
    path = _saved("quant_full", tmp_path / "a")
    with pytest.raises(ValueError, match=r"QuantFull adapter .*does not fit.*qf_scale: adapter \(16, 1\) vs model "
                                         r"\(32, 1\).*Fix:"):
        PeftModel.from_pretrained(_base(2, width=32), path)


@pytest.mark.parametrize("manifest", [True, False])
def test_missing_buffer_is_refused(tmp_path, manifest):
    path = _saved("quant_full", tmp_path / "a")
    _edit_tensors(path, lambda t: t.pop("base_model.model.layers.0.qf_codes"))
    if not manifest:  # as written by a save without a manifest
        _edit_config(path, lambda c: c.pop("adapter_tensors"))
    expected = "in the manifest but missing from the file" if manifest else "missing from the adapter file"
    with pytest.raises(ValueError, match=rf"base_model\.model\.layers\.0\.qf_codes: {expected}.*Fix:"):
        PeftModel.from_pretrained(_base(), path)


def test_save_records_a_manifest_of_the_file(tmp_path):
    path = _saved("quant_full", tmp_path / "a")
    manifest = json.load(open(os.path.join(path, "adapter_config.json")))["adapter_tensors"]
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    assert manifest == {k: [str(t.dtype).removeprefix("torch."), list(t.shape)] for k, t in tensors.items()}
    assert manifest["base_model.model.layers.0.qf_codes"] == ["int8", [WIDTH, WIDTH]]
    assert "adapter_tensors" not in PeftConfig.from_pretrained(path).to_dict()  # never carried to another save
    # a state dict from memory (here in bfloat16, as after model.to(torch.bfloat16)) is no file: no manifest applies
    model = PeftModel.from_pretrained(_base(), path)
    state = {k: v.bfloat16() if v.is_floating_point() else v for k, v in get_peft_model_state_dict(model).items()}
    set_peft_model_state_dict(model, state)


@pytest.mark.parametrize("method,key,dtype", [
    ("quant_full", "qf_outlier_index", torch.float16),  # indices above 2048 round
    ("quant_full", "qf_scale", torch.float16),
    ("qoft", "qoft_Q", torch.float16),
    ("timestep_scale", "ts_scale_in", torch.bfloat16),
])
def test_cast_file_is_refused(tmp_path, method, key, dtype):
    path = _saved(method, tmp_path / "a")
    name = f"base_model.model.layers.1.{key}"
    saved = load_file(os.path.join(path, "adapter_model.safetensors"))[name].dtype

    def cast(tensors):
        tensors[name] = tensors[name].to(dtype)

    _edit_tensors(path, cast)
    with pytest.raises(ValueError, match=rf"adapter file \(.*adapter_model\.safetensors\) is not the file that was "
                                         rf"saved: {name}: {str(dtype)[6:]} .* was saved as {str(saved)[6:]}.*Fix: use "
                                         "the file exactly as saved"):
        PeftModel.from_pretrained(_base(), path)


def test_integer_tensor_cast_without_manifest_is_refused(tmp_path):
    path = _saved("quant_full", tmp_path / "a")
    _edit_config(path, lambda c: c.pop("adapter_tensors"))

    def cast(tensors):
        tensors["base_model.model.layers.0.qf_codes"] = tensors["base_model.model.layers.0.qf_codes"].half()

    _edit_tensors(path, cast)
    with pytest.raises(ValueError, match=r"qf_codes: float16 \(16, 16\), but the method holds it as int8.*Fix:"):
        PeftModel.from_pretrained(_base(), path)


def test_pickle_adapter_files_are_neither_written_nor_read(tmp_path):
    model = _model("qoft")
    with pytest.raises(ValueError, match="safetensors only.*Fix: drop safe_serialization=False"):
        model.save_pretrained(tmp_path / "a", safe_serialization=False)
    path = _saved("qoft", tmp_path / "b")
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    os.remove(os.path.join(path, "adapter_model.safetensors"))
    torch.save(tensors, os.path.join(path, "adapter_model.bin"))
    with pytest.raises(ValueError, match=r"pickle adapter file \(adapter_model\.bin\).*Fix: convert it"):
        PeftModel.from_pretrained(_base(), path)
    # other PEFT methods keep PEFT's own behaviour
    lora = get_peft_model(_base(), LoraConfig(target_modules=["layers.0"]))
    lora.save_pretrained(tmp_path / "lora", safe_serialization=False)
    assert "adapter_model.bin" in os.listdir(tmp_path / "lora")


# ---- 2. every config field has its type ------------------------------------------------------------------------


@pytest.mark.parametrize("cls,kwargs,message", [
    (QOFTConfig, dict(block_size=4, format_version="1"), r"QOFTConfig\.format_version must be an integer or None, "
                                                         r"got '1' \(str\)\. Fix: pass format_version=1\."),
    (QOFTConfig, dict(block_size=4, target_modules=5), r"target_modules must be a list of strings or a string or None"
                                                       r", got 5 \(int\)\. Fix: give target_modules as"),
    (QOFTConfig, dict(block_size=4, module_dropout="0.1"), r"module_dropout must be a number.*Fix: pass "
                                                           r"module_dropout=0\.1"),
    (QOFTConfig, dict(block_size=4, block_share=1), r"block_share must be true or false, got 1"),
    (QOFTConfig, dict(block_size=4, bias="lora_only"), r"bias must be one of 'none', 'all', 'qoft_only'"),
    (QOFTConfig, dict(block_size=4, stash="yes"), r"QOFTConfig\.stash must be a dict or None, got 'yes'"),
    (QOFTConfig, dict(block_size=4, inference_mode="false"), r"inference_mode must be true or false.*Fix: pass "
                                                             r"inference_mode=False"),
    (QuantFullConfig, dict(target_modules=["a"], group_size=True), r"group_size must be an integer or None, got True"),
    (TimestepScaleConfig, dict(num_experts=2.0), r"num_experts must be an integer, got 2\.0 \(float\)"),
    (TimestepScaleConfig, dict(expert_boundaries=["500"]), r"expert_boundaries must be a list of numbers or None"),
    (StashQuantConfig, dict(target_modules=["a"], min_numel="1024"), r"StashQuantConfig\.min_numel must be an "
                                                                     r"integer.*Fix: pass min_numel=1024"),
    (StashQuantConfig, dict(target_modules=["a"], milestones=[[0.5, "8"]]), r"milestones must be a list of lists "
                                                                            r"of numbers"),
])
def test_wrong_typed_field_names_field_type_and_fix(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_defaults_and_right_types_are_accepted():
    """Each field's annotation is one the check understands and its default fits it; right values pass."""
    for cls in (QOFTConfig, QuantFullConfig, TimestepScaleConfig, StashQuantConfig):
        for name, hint in field_types(cls).items():
            spec = cls.__dataclass_fields__[name]
            default = spec.default_factory() if callable(spec.default_factory) else spec.default
            assert _matches(default, hint), (cls.__name__, name)
    assert QOFTConfig(block_size=4, module_dropout=0, target_modules=("a", "b")).module_dropout == 0  # int is a float
    assert TimestepScaleConfig(num_train_timesteps=1000, expert_boundaries=[500]).boundaries == (500.0,)
    assert StashQuantConfig(target_modules=["a"], milestones=[(0.5, 8)]).milestones == [(0.5, 8)]


def test_wrong_typed_field_in_file_names_the_file(tmp_path):
    path = _saved("qoft", tmp_path / "a")
    _edit_config(path, lambda c: c.update(module_dropout="0.1"))
    config_file = os.path.join(path, "adapter_config.json")
    message = rf"module_dropout must be a number, got '0\.1' \(str\) in {config_file}\. Fix: write module_dropout: 0\.1"
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(_base(), path)
    with pytest.raises(ValueError, match=message):
        PeftConfig.from_pretrained(path)
    _edit_config(path, lambda c: c.update(module_dropout=0.1, blocksize=4))
    with pytest.raises(ValueError, match=rf"unknown field\(s\) 'blocksize' \(did you mean 'block_size'\?\) in "
                                         rf"{config_file}"):
        QOFTConfig.from_pretrained(path)


# ---- 3. atomic saves ------------------------------------------------------------------------------------------


def test_failed_save_leaves_the_previous_adapter_intact(tmp_path, monkeypatch):
    path = tmp_path / "adapter"
    first = _model("qoft", seed=1)
    first.save_pretrained(path)
    before = _files(path)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(peft.config, "json", types.SimpleNamespace(dumps=disk_full))  # writing adapter_config.json
    with pytest.raises(OSError, match="No space left"):
        _model("qoft", seed=2).save_pretrained(path)
    monkeypatch.undo()
    assert _files(path) == before
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no staging folder left behind
    assert torch.equal(_output(PeftModel.from_pretrained(_base(), path)), _output(first))


def test_save_replaces_an_older_adapter_and_keeps_other_files(tmp_path):
    path = tmp_path / "checkpoint-3"
    _model("quant_full").save_pretrained(path)
    (path / "adapter_model.bin").write_bytes(b"stale")
    (path / "optimizer.pt").write_bytes(b"optimizer state")
    (path / "trainer_state.json").write_text("{}")
    model = _model("qoft")
    model.save_pretrained(path)
    assert sorted(os.listdir(path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                        "optimizer.pt", "trainer_state.json"]
    assert (path / "optimizer.pt").read_bytes() == b"optimizer state"
    header = (path / "README.md").read_text().split("---")[1]
    assert "- qoft" in header and "quant_full" not in header and "quant-full" not in header
    assert f'PeftModel.from_pretrained(base, "{path}")' in (path / "README.md").read_text()  # not the staging folder
    assert torch.equal(_output(PeftModel.from_pretrained(_base(), path)), _output(model))


def test_non_default_and_selected_adapters(tmp_path):
    model = get_peft_model(_base(), _config("qoft"))
    model.add_adapter("b", QOFTConfig(target_modules=["layers.0"], block_size=8, init_weights=False))
    model.save_pretrained(tmp_path)
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(os.listdir(tmp_path / "b"))
    root = _files(tmp_path)
    (tmp_path / "b" / "adapter_model.bin").write_bytes(b"stale")
    with torch.no_grad():
        model.base_model.model.layers[0].qoft_Q["b"].add_(0.5)
    model.save_pretrained(tmp_path, selected_adapters=["b"])
    assert _files(tmp_path) == root  # the default adapter's files are untouched
    assert "adapter_model.bin" not in os.listdir(tmp_path / "b")
    loaded = PeftModel.from_pretrained(_base(), tmp_path / "b")
    model.set_adapter("b")
    assert torch.equal(_output(loaded), _output(model))


def test_modules_to_save_are_checked_under_their_file_keys(tmp_path):
    config = QOFTConfig(target_modules=["layers.0"], block_size=4, init_weights=False, modules_to_save=["layers.1"])
    model = get_peft_model(_base(), config)
    model.save_pretrained(tmp_path)
    assert torch.equal(_output(PeftModel.from_pretrained(_base(), tmp_path)), _output(model))

    def cast(tensors):
        tensors["base_model.model.layers.1.weight"] = tensors["base_model.model.layers.1.weight"].half()

    _edit_tensors(str(tmp_path), cast)
    with pytest.raises(ValueError, match=r"saved: base_model\.model\.layers\.1\.weight: float16 \(16, 16\) was saved "
                                         r"as float32"):
        PeftModel.from_pretrained(_base(), tmp_path)


def test_transformers_load_adapter_names_the_file(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from .conftest import TINY_LLAMA

    def llama(num_layers):
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": num_layers}))

    get_peft_model(llama(2), QOFTConfig(target_modules=["q_proj"], block_size=16)).save_pretrained(tmp_path)
    file = os.path.join(tmp_path, "adapter_model.safetensors")
    model = llama(1)
    with pytest.raises(ValueError, match=rf"QOFT adapter \({file}\) does not fit.*model\.layers\.1\.self_attn") as info:
        model.load_adapter(str(tmp_path))
    # removed again, or (a transformers that cannot delete adapters with this peft) the error says so
    assert "default" not in getattr(model, "peft_config", {}) or "load the base model again" in str(info.value)
