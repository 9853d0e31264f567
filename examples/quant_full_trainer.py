"""Fine-tune every weight of a small causal LM with QuantFull under ``transformers.Trainer``: int8 weights and int8
Lion momentum, updated inside backward.

By default a tiny Llama is built from a config (seeded; nothing is downloaded) and saved next to the adapter, so the
adapter directory can be reloaded like any PEFT adapter; ``--model_name_or_path`` takes a local checkpoint instead.
``--load_in_4bit`` loads that base in bitsandbytes NF4 first: QuantFull dequantizes each 4-bit layer once into its
int8 training state and releases the 4-bit weight. The text is English sentences from the Python standard library's
docstrings, tokenized by a small byte-level BPE trained on them here (saved with the adapter: its ids are not
reproducible across processes: the first process trains it, the others load it). The optimizer is passed to the
Trainer as documented, ``optimizers=(QuantFullOptimizer(model, lr=...), None)``; the Trainer's LR schedule drives the
fused int8 step.

Data parallel: ``torchrun --nproc_per_node 2 examples/quant_full_trainer.py`` or ``accelerate launch --config_file
examples/accelerate_ddp.yaml examples/quant_full_trainer.py``; the Trainer wraps the model in DistributedDataParallel
(gloo on CPU), ``--per_device_train_batch_size`` is per process, and ``QuantFullOptimizer`` averages each layer's
weight gradient over the ranks before its int8 step. Only the first process evaluates, checks the reload and prints.

Prints a JSON summary: tuned parameters, bytes of int8 training state per tuned parameter (counted from the
tensors), first/last training loss, held-out loss before/after, adapter bytes on disk, time, and whether the saved
adapter reloads (PEFT's own ``PeftModel.from_pretrained``) to identical logits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings

TINY_LLAMA = dict(  # every width a multiple of 64, as bitsandbytes' CPU 4-bit kernels want
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
    max_position_embeddings=256,
)
HELD_OUT_SENTENCES = 64


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model_name_or_path", default=None,
                        help="local causal-LM checkpoint (a directory); default: a tiny Llama built from a config")
    parser.add_argument("--load_in_4bit", action="store_true",
                        help="load the base in bitsandbytes NF4; QuantFull dequantizes it once into int8 state")
    parser.add_argument("--output_dir", default="out/quant_full_trainer", help="adapter + tokenizer (+ base) directory")
    parser.add_argument("--max_steps", type=int, default=60, help="optimizer steps")
    parser.add_argument("--learning_rate", type=float, default=3e-3,
                        help="Lion learning rate (fits the tiny random model; pretrained models want ~1e-5..1e-4)")
    parser.add_argument("--weight_decay", type=float, default=0.0, help="Lion's decoupled weight decay")
    parser.add_argument("--warmup_steps", type=int, default=None,
                        help="linear warm-up steps (default: max_steps // 10)")
    parser.add_argument("--per_device_train_batch_size", type=int, default=8, help="sequences per micro-batch")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1,
                        help="micro-batches per optimizer step (passed to the Trainer and to QuantFullOptimizer)")
    parser.add_argument("--block_size", type=int, default=64, help="tokens per training sequence")
    parser.add_argument("--stochastic_rounding", action=argparse.BooleanOptionalAction, default=True,
                        help="round updated weights to int8 stochastically (unbiased) rather than to nearest")
    parser.add_argument("--target_modules", default="all-linear,lm_head",
                        help="comma-separated names of the Linear layers to train fully; 'all-linear' stands for every "
                        "Linear but the output layer (PEFT's meaning), so the default trains every Linear")
    parser.add_argument("--vocab_size", type=int, default=512,
                        help="BPE vocabulary trained on the docstrings (ignored when the checkpoint has a tokenizer)")
    parser.add_argument("--save_steps", type=int, default=0, help="write a checkpoint every N steps (0: none)")
    parser.add_argument("--resume_from_checkpoint", default=None,
                        help="a checkpoint-N directory of an earlier run with the same settings")
    parser.add_argument("--logging_steps", type=int, default=10, help="print the loss every N steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.max_steps < 1 or args.gradient_accumulation_steps < 1 or args.per_device_train_batch_size < 1:
        parser.error("--max_steps, --gradient_accumulation_steps and --per_device_train_batch_size must be >= 1")
    return args


# ---- model, tokenizer, data ---------------------------------------------------------------------------------------


def load_base(path: str, load_in_4bit: bool):
    import torch
    from transformers import AutoModelForCausalLM

    if not load_in_4bit:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    from peft_quant.quant_formats import require

    require("bitsandbytes")
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant)


def prepare_base_and_tokenizer(args, sentences: list[str], first_process: bool = True):
    """(base directory, tokenizer): the given checkpoint, or a tiny Llama built from a config and saved.

    A tokenizer trained here is not reproducible across processes: only the first process trains (and saves) it and
    builds the base; the others (``first_process=False``, called after it finished) load what it saved."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from offline_text import train_tokenizer

    trained_tokenizer_dir = os.path.join(args.output_dir, "tokenizer")
    if args.model_name_or_path:
        path = args.model_name_or_path
        try:
            return path, AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError):
            if not first_process:
                return path, AutoTokenizer.from_pretrained(trained_tokenizer_dir)
            vocab = AutoConfig.from_pretrained(path).vocab_size
            tokenizer = train_tokenizer(sentences, vocab_size=vocab)
            if len(tokenizer) > vocab:
                raise SystemExit(f"The checkpoint has no tokenizer and a vocabulary of {vocab} < {len(tokenizer)}, "
                                 "too small for a byte-level BPE. Fix: save a tokenizer with the checkpoint.")
            tokenizer.save_pretrained(trained_tokenizer_dir)
            return path, tokenizer
    path = os.path.join(args.output_dir, "base_model")
    if not first_process:
        return path, AutoTokenizer.from_pretrained(path)
    tokenizer = train_tokenizer(sentences, vocab_size=args.vocab_size)
    torch.manual_seed(args.seed)
    config = LlamaConfig(**TINY_LLAMA, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, tokenizer


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
    """Mean next-token loss over ``rows`` (no gradients: nothing is updated)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = rows[i:i + batch_size]
            total += model(input_ids=batch, labels=batch).loss.item() * len(batch)
            count += len(batch)
    model.train()
    return total / count


def target_modules(model, spec: str) -> list[str]:
    """``--target_modules`` as a list of module names, with 'all-linear' expanded to every Linear (bitsandbytes'
    4-bit layers are Linears too) but the output layer."""
    import torch

    output_layer = model.get_output_embeddings()
    names: list[str] = []
    for item in spec.split(","):
        item = item.strip()
        if item == "all-linear":
            names += [name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                      if isinstance(module, torch.nn.Linear) and module is not output_layer]
        elif item:
            names.append(item)
    return sorted(set(names))


# ---- the int8 state, counted from the tensors ---------------------------------------------------------------------


def int8_state_bytes(model, optimizer) -> dict:
    """Tuned parameters and the bytes of QuantFull's training state (weights + momentum), from the tensors."""
    from peft_quant.quant_full import QuantFullLayer

    tuned = weight_bytes = momentum_bytes = 0
    formats: dict[str, int] = {}
    for layer in model.modules():
        if not isinstance(layer, QuantFullLayer):
            continue
        name = layer.adapter
        codes = layer.qf_codes[name]
        assert codes.dtype.itemsize == 1, codes.dtype
        tuned += codes.numel()
        weight_bytes += sum(t.numel() * t.element_size() for t in (
            codes, layer.qf_scale[name], layer.qf_outlier_index[name], layer.qf_outlier_value[name]))
        state = optimizer.state.get(layer.qf_anchor[name], {})
        momentum_bytes += sum(t.numel() * t.element_size() for t in state.values() if hasattr(t, "element_size"))
        formats[layer.base_format.label] = formats.get(layer.base_format.label, 0) + 1
    return {
        "tuned_layers": sum(formats.values()),
        "base_layer_formats": formats,
        "tuned_parameters": tuned,
        "int8_state_bytes_per_tuned_parameter": {
            "weights (codes, scales, outliers)": round(weight_bytes / tuned, 4),
            "lion_momentum (codes, absmax)": round(momentum_bytes / tuned, 4),
            "total": round((weight_bytes + momentum_bytes) / tuned, 4),
            "for comparison: fp32 weights, gradients and AdamW states": 16,
        },
    }


# ---- main -----------------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    args = parse_args(argv)  # before the heavy imports: --help answers at once

    import torch
    from peft import PeftModel, get_peft_model, get_peft_model_state_dict
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    import data_parallel
    import peft_quant
    from offline_text import stdlib_sentences

    hf_logging.set_verbosity_error()
    # PEFT warns when a target is named lm_head that it will also save "embedding layers"; QuantFull's adapter still
    # holds only the int8 state of the targeted layers (the output layer's own weight was released on wrap).
    warnings.filterwarnings("ignore", message="Setting `save_embedding_layers` to `True`")
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")  # transformers, internal
    os.makedirs(args.output_dir, exist_ok=True)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        lr_scheduler_type="linear",
        warmup_steps=args.max_steps // 10 if args.warmup_steps is None else args.warmup_steps,
        logging_steps=1,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        use_cpu=not torch.cuda.is_available(),
        ddp_backend=data_parallel.trainer_ddp_backend(),  # gloo when torchrun/accelerate start CPU processes
        ddp_broadcast_buffers=False,  # the int8 codes are buffers, the same on every rank: no need to resend them
        report_to=[],
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    sentences = stdlib_sentences(seed=args.seed)
    held_out_text, train_text = sentences[:HELD_OUT_SENTENCES], sentences[HELD_OUT_SENTENCES:]
    with training_args.main_process_first(local=False, desc="tokenizer and base model"):
        base_path, tokenizer = prepare_base_and_tokenizer(args, train_text, training_args.process_index == 0)
    train_rows = blocks(tokenizer, train_text, args.block_size)
    per_update = args.per_device_train_batch_size * args.gradient_accumulation_steps
    if len(train_rows) < per_update:
        raise SystemExit(f"Not enough text for one optimizer step of {per_update} sequences of {args.block_size}.")
    held_out = blocks(tokenizer, held_out_text, args.block_size)

    base = load_base(base_path, args.load_in_4bit)
    config = peft_quant.QuantFullConfig(target_modules=target_modules(base, args.target_modules),
                                        stochastic_rounding=args.stochastic_rounding, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    optimizer = peft_quant.QuantFullOptimizer(  # before the first backward: the int8 update happens there
        model, lr=args.learning_rate, weight_decay=args.weight_decay,
        gradient_accumulation_steps=args.gradient_accumulation_steps, seed=args.seed,
    )
    float_trainable = sum(p.numel() for g in optimizer.param_groups[1:] for p in g["params"])
    held_out_before = mean_loss(model, held_out)

    class PrintLoss(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs and "loss" in logs and (
                    state.global_step == 1 or state.global_step % args.logging_steps == 0):
                print(f"step {state.global_step:5d}  loss {logs['loss']:.4f}  lr {logs.get('learning_rate', 0):.3g}",
                      flush=True)

    trainer = Trainer(model=model, args=training_args, train_dataset=BlockDataset(train_rows),
                      processing_class=tokenizer, optimizers=(optimizer, None))
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(PrintLoss())
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    train_seconds = time.perf_counter() - start
    trainer.save_model(args.output_dir)  # adapter (int8 codes, scales, outliers) + tokenizer + card
    ranks = data_parallel.ranks_report(get_peft_model_state_dict(model))
    if not trainer.is_world_process_zero():
        return

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    state = int8_state_bytes(model, optimizer)
    held_out_after = mean_loss(model, held_out)

    # PEFT's own loader on a fresh base: the adapter directory is all a user needs
    reloaded = PeftModel.from_pretrained(load_base(base_path, args.load_in_4bit), args.output_dir)
    reloaded.eval()
    model.eval()
    with torch.no_grad():
        probe = held_out[:4]
        identical = bool(torch.equal(reloaded(input_ids=probe).logits, model(input_ids=probe).logits))

    adapter_file = os.path.join(args.output_dir, "adapter_model.safetensors")
    print(json.dumps({
        "base": (args.model_name_or_path or "tiny Llama from a config") + (" in bitsandbytes nf4" if args.load_in_4bit
                                                                           else ""),
        "base_model_dir": base_path,
        **state,
        "float_trainable_parameters": float_trainable,
        "steps": trainer.state.global_step,
        "train_sequences": len(train_rows),
        "tokens_per_sequence": args.block_size,
        "learning_rate": args.learning_rate,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "stochastic_rounding": args.stochastic_rounding,
        "loss": {"first": losses[0] if losses else None, "last": losses[-1] if losses else None},
        "held_out_loss": {"before": round(held_out_before, 4), "after": round(held_out_after, 4),
                          "uniform": round(math.log(len(tokenizer)), 4)},
        "skipped_updates": optimizer.skipped_updates,
        "adapter_bytes_on_disk": os.path.getsize(adapter_file),
        "adapter_dir": args.output_dir,
        "train_seconds": round(train_seconds, 2),
        "reloaded_logits_identical": identical,
        **ranks,
    }, indent=2))


if __name__ == "__main__":
    main()
