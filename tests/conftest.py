"""Shared fixtures: tiny models built from configs (nothing is downloaded), quantized on CPU."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# gptqmodel: it refuses to quantize with fewer than 2 CPU workers (it asks for half the cores); its C++ packer
# costs a ~20 s compile, the pure-Python one ~1 s on the tiny model.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
# Kernel tests run the Triton kernels in Triton's CPU interpreter when no GPU is there. Triton reads this when a kernel
# module is imported, so it is set before any test imports one; ops in auto mode still take the PyTorch path on CPU.
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")

import pytest  # noqa: E402
import torch  # noqa: E402

import peft_quant  # noqa: E402,F401  (registers the methods)

TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=256,
    max_position_embeddings=128,
)

# bitsandbytes variants a QOFT layer must run on: name -> BitsAndBytesConfig kwargs
BNB_VARIANTS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "nf4-dq": dict(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    ),
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    """A tiny random Llama saved to disk, so it can be loaded quantized like a real checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).save_pretrained(path)
    return str(path)


def load_llama(path: str, variant: str | None = None):
    """Load the tiny Llama in float32 (``variant=None``) or quantized with a :data:`BNB_VARIANTS` entry."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    if variant is None:
        return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    return LlamaForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(**BNB_VARIANTS[variant]))


def randomize_adapter(model, std: float = 0.05, seed: int = 0) -> None:
    """Give every QOFT parameter a random value (identity would hide most bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "qoft_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


@pytest.fixture(scope="session")
def tiny_gptq_dir(tmp_path_factory) -> str:
    """The tiny Llama GPTQ-quantized to 4 bits (group size 32) with gptqmodel's own API, on CPU, in ~1 s."""
    pytest.importorskip("gptqmodel", reason="GPTQ tests need the [gptq] extra")
    import gptqmodel.looper.loop_processor as loop_processor
    from gptqmodel import GPTQModel, QuantizeConfig
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    float_dir = tmp_path_factory.mktemp("tiny_llama_for_gptq")
    loop_processor._PROJECT_LOG_DIR = float_dir / "logs"  # it would write ./logs/ into the working directory
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, tie_word_embeddings=False)).save_pretrained(float_dir)
    words = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(256)}, unk_token="<0>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()  # gptqmodel's loader insists on a tokenizer
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<0>", pad_token="<1>", eos_token="<3>").save_pretrained(
        float_dir
    )
    model = GPTQModel.load(
        str(float_dir), QuantizeConfig(bits=4, group_size=32, desc_act=False, sym=True, offload_to_disk=False),
        device="cpu", dtype=torch.float32,
    )
    g = torch.Generator().manual_seed(0)
    model.quantize([{"input_ids": torch.randint(0, 256, (32,), generator=g).tolist(), "attention_mask": [1] * 32}
                    for _ in range(8)], batch_size=1)
    path = tmp_path_factory.mktemp("tiny_gptq")
    model.save(str(path))
    return str(path)


def load_gptq(path: str, backend: str = "gptq_torch"):
    """Load a GPTQ checkpoint through transformers' GPTQ integration (gptqmodel), in float32 on CPU."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=GPTQConfig(bits=4, backend=backend)
    )
    for module in model.modules():
        # gptqmodel wraps dequantize_weight in torch.compile per instance: ~15 s of codegen at the first CPU
        # forward, for a 64-wide layer. The eager method computes the same.
        module.__dict__.pop("dequantize_weight", None)
    return model


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP's byte-level alphabet: each of the 256 bytes as a printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def write_clip_tokenizer(folder: Path) -> str:
    """vocab.json + merges.txt of a tiny CLIP BPE written offline (every byte alone and word-final, the special
    tokens, and merges that make "cat", "and", "dog" single tokens); returns the folder for ``from_pretrained``."""
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("a", "n"), ("an", "d</w>")]
    alphabet = _byte_alphabet()
    tokens = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(c + "</w>" for c in alphabet), *map("".join, merges)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), "utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), "utf-8")
    return str(folder)
