"""Shared fixtures: tiny models built from configs (nothing is downloaded), quantized on CPU."""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
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
