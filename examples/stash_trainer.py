"""Train a small causal LM with PEFT's LoRA under ``transformers.Trainer`` while StashQuant keeps the activations
saved for backward in block floating point, with a bit width that rises over training.

By default a tiny Llama is built from a config (seeded; nothing is downloaded); ``--model_name_or_path`` takes a
local checkpoint instead. The text is English sentences from the Python standard library's docstrings, tokenized
by a small byte-level BPE trained on them here. The stash is compressed with
``peft_quant.enable_stash(model, bits=..., milestones=...)`` and the schedule advanced by
``callbacks=[peft_quant.stash_callback()]``; a second small callback reads the packer's counters every step.

Data parallel: ``torchrun --nproc_per_node 2 examples/stash_trainer.py`` or ``accelerate launch --config_file
examples/accelerate_ddp.yaml examples/stash_trainer.py``; the Trainer wraps the model in DistributedDataParallel (gloo
on CPU), ``--per_device_train_batch_size`` is per process, and each rank packs the activations of its own share of
the batch. The first process trains the tokenizer (its training is not reproducible across processes) and saves it
for the others; only the first process evaluates and prints.

Prints a JSON summary: the stash bits at the first and last step (and where they changed), the bytes held for
backward per optimizer step as the packer counts them (float originals vs block-floating-point stored) at the
first and last step and over the run, the first/last training loss, the held-out loss before/after, and time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings

TINY_LLAMA = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=256)
HELD_OUT_SENTENCES = 64


def milestones_arg(text: str) -> list[tuple[float, int]]:
    """``"0.5:6,0.8:8"`` -> ``[(0.5, 6), (0.8, 8)]``; empty -> no milestones."""
    try:
        return [(float(p), int(b)) for p, b in (item.split(":") for item in text.split(",") if item.strip())]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PROGRESS:BITS[,PROGRESS:BITS...], got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model_name_or_path", default=None,
                        help="local causal-LM checkpoint (a directory); default: a tiny Llama built from a config")
    parser.add_argument("--output_dir", default="out/stash-trainer", help="LoRA adapter + tokenizer directory")
    parser.add_argument("--max_steps", type=int, default=40, help="optimizer steps")
    parser.add_argument("--learning_rate", type=float, default=2e-3, help="AdamW learning rate")
    parser.add_argument("--per_device_train_batch_size", type=int, default=8, help="sequences per micro-batch")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--block_size", type=int, default=64, help="tokens per training sequence")
    parser.add_argument("--lora_r", type=int, default=16, help="LoRA rank")
    parser.add_argument("--lora_target_modules", default="all-linear", help="PEFT's LoraConfig target_modules")
    parser.add_argument("--stash_bits", type=int, default=4, help="stash mantissa bits at the start (2-8, or 16)")
    parser.add_argument("--stash_milestones", type=milestones_arg, default="0.5:6,0.8:8",
                        help="PROGRESS:BITS pairs, progress in fractions of the run: the rising bit schedule")
    parser.add_argument("--stash_block_size", type=int, default=32, help="values sharing one exponent: 16, 32, 64")
    parser.add_argument("--stash_min_numel", type=int, default=1024, help="smaller saved tensors stay unchanged")
    parser.add_argument("--vocab_size", type=int, default=512,
                        help="BPE vocabulary trained on the docstrings (ignored when the checkpoint has a tokenizer)")
    parser.add_argument("--logging_steps", type=int, default=10, help="print the loss every N steps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.max_steps < 1 or args.gradient_accumulation_steps < 1 or args.per_device_train_batch_size < 1:
        parser.error("--max_steps, --gradient_accumulation_steps and --per_device_train_batch_size must be >= 1")
    return args


# ---- model, tokenizer, data ---------------------------------------------------------------------------------------


def load_base_and_tokenizer(args, sentences: list[str], first_process: bool = True):
    """The given checkpoint with its tokenizer, or a tiny Llama built from a config with a BPE trained here (by the
    first process, which saves it to ``--output_dir``; the others, called after it finished, load it from there)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from offline_text import train_tokenizer

    if args.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32)
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
        except (OSError, ValueError, TypeError):
            raise SystemExit("The checkpoint has no tokenizer. Fix: save one with it (tokenizer.save_pretrained).")
        if tokenizer.eos_token_id is None:
            raise SystemExit("The checkpoint's tokenizer has no eos token, needed to join sentences.")
        return model, tokenizer
    if first_process:
        tokenizer = train_tokenizer(sentences, vocab_size=args.vocab_size)
        tokenizer.save_pretrained(args.output_dir)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.output_dir)
    torch.manual_seed(args.seed)
    config = LlamaConfig(**TINY_LLAMA, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return LlamaForCausalLM(config), tokenizer


def blocks(tokenizer, sentences: list[str], block_size: int):
    """The sentences tokenized, joined with eos and cut into rows of ``block_size`` tokens."""
    import torch

    ids: list[int] = []
    for sentence in sentences:
        ids += tokenizer(sentence, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    rows = len(ids) // block_size
    if rows == 0:
        raise SystemExit(f"Not enough text for one block of {block_size} tokens.")
    return torch.tensor(ids[: rows * block_size]).view(rows, block_size)


class BlockDataset:
    def __init__(self, rows) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.rows[index], "labels": self.rows[index].clone()}


def mean_loss(model, rows, batch_size: int = 16) -> float:
    """Mean next-token loss over ``rows`` (no gradients: nothing is saved for backward, nothing is packed)."""
    import torch

    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = rows[i:i + batch_size]
            total += model(input_ids=batch, labels=batch).loss.item() * len(batch)
    model.train()
    return total / len(rows)


# ---- main -----------------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    args = parse_args(argv)  # before the heavy imports: --help answers at once

    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    import data_parallel
    import peft_quant
    from offline_text import stdlib_sentences

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")  # transformers, internal
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.output_dir, exist_ok=True)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=args.max_steps // 10,
        logging_steps=1,
        save_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        ddp_backend=data_parallel.trainer_ddp_backend(),  # gloo when torchrun/accelerate start CPU processes
        report_to=[],
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    sentences = stdlib_sentences(seed=args.seed)
    held_out_text, train_text = sentences[:HELD_OUT_SENTENCES], sentences[HELD_OUT_SENTENCES:]
    with training_args.main_process_first(local=False, desc="tokenizer"):
        base, tokenizer = load_base_and_tokenizer(args, train_text, training_args.process_index == 0)
    train_rows = blocks(tokenizer, train_text, args.block_size)
    held_out = blocks(tokenizer, held_out_text, args.block_size)

    torch.manual_seed(args.seed)
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=args.lora_target_modules)
    model = get_peft_model(base, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    packer = peft_quant.enable_stash(  # after get_peft_model: it hooks the forward of the model PEFT wraps
        model, bits=args.stash_bits, milestones=args.stash_milestones, unit="fraction",
        block_size=args.stash_block_size, min_numel=args.stash_min_numel,
    )
    held_out_before = mean_loss(model, held_out)

    per_step: list[dict] = []

    class StashCounters(TrainerCallback):
        """Reads the packer's counters over each optimizer step (all its micro-batches' forwards)."""

        def on_step_begin(self, _args, state, control, model=None, **kwargs):
            packer.reset_stats()
            per_step.append({"step": state.global_step + 1, "bits": packer.bits})

        def on_step_end(self, _args, state, control, model=None, **kwargs):
            per_step[-1].update(packed_tensors=packer.packed_tensors, original_bytes=packer.original_bytes,
                                stored_bytes=packer.stored_bytes)

    class PrintLoss(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs and "loss" in logs and (
                    state.global_step == 1 or state.global_step % args.logging_steps == 0):
                print(f"step {state.global_step:5d}  loss {logs['loss']:.4f}  stash bits {per_step[-1]['bits']}",
                      flush=True)

    trainer = Trainer(model=model, args=training_args, train_dataset=BlockDataset(train_rows),
                      processing_class=tokenizer,
                      callbacks=[StashCounters(), peft_quant.stash_callback(), PrintLoss()])
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    trainer.save_model(args.output_dir)  # PEFT's LoRA adapter + tokenizer
    ranks = data_parallel.ranks_report(get_peft_model_state_dict(model))
    if not trainer.is_world_process_zero():
        return

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    held_out_after = mean_loss(model, held_out)
    changes = {str(s["step"]): s["bits"] for i, s in enumerate(per_step)
               if i == 0 or s["bits"] != per_step[i - 1]["bits"]}

    def held(step: dict) -> dict:
        return {"original_bytes": step["original_bytes"], "stored_bytes": step["stored_bytes"],
                "packed_tensors": step["packed_tensors"], "bits": step["bits"],
                "ratio": round(step["original_bytes"] / step["stored_bytes"], 3) if step["stored_bytes"] else None}

    original = sum(s["original_bytes"] for s in per_step)
    stored = sum(s["stored_bytes"] for s in per_step)
    print(json.dumps({
        "base": args.model_name_or_path or "tiny Llama from a config (random weights)",
        "lora_trainable_parameters": trainable,
        "steps": trainer.state.global_step,
        "sequences_per_step": args.per_device_train_batch_size * args.gradient_accumulation_steps
        * training_args.world_size,
        "tokens_per_sequence": args.block_size,
        "stash": {
            "bits_start": per_step[0]["bits"], "bits_end": per_step[-1]["bits"],
            "bits_from_step": changes,
            "milestones": [list(m) for m in args.stash_milestones], "block_size": args.stash_block_size,
        },
        "held_for_backward_per_step": {
            "counted_by": "packer counters: float bytes of each tensor handed to the packer vs its packed bytes",
            "first_step": held(per_step[0]),
            "last_step": held(per_step[-1]),
            "mean_original_bytes": round(original / len(per_step)),
            "mean_stored_bytes": round(stored / len(per_step)),
            "ratio_over_run": round(original / stored, 3) if stored else None,
        },
        "loss": {"first": losses[0] if losses else None, "last": losses[-1] if losses else None},
        "held_out_loss": {"before": round(held_out_before, 4), "after": round(held_out_after, 4),
                          "uniform": round(math.log(len(tokenizer)), 4)},
        "adapter_dir": args.output_dir,
        "train_seconds": round(train_seconds, 2),
        **ranks,
    }, indent=2))


if __name__ == "__main__":
    main()
