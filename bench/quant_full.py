"""Benchmark: QuantFull (int8 weights + int8 Lion momentum, updated inside backward) against fp32 AdamW, float Lion
and bitsandbytes Lion8bit, fine-tuning a small causal LM on CPU, side by side in one process.

Why: QuantFull (QFT, Li et al. 2023) promises full-parameter tuning with every training state in int8. The questions
are how many bytes of model state per tuned parameter it really holds, whether it reaches float Lion's loss, and
whether stochastic rounding is needed (under round-to-nearest a Lion step of ``lr`` below half an int8 step of a
weight vanishes).

Task: a small Llama (``transformers.LlamaConfig``, see ``MODEL``) with a byte-level BPE trained here
(``train_tokenizer`` of ``examples/offline_text.py``) on English sentences from Python standard-library
docstrings (``stdlib_sentences``, same file). Sentences are split into test, validation and training sentences;
each split is tokenized, joined with ``<eos>`` and cut into blocks of ``--seq-len`` tokens. The model is
pre-trained here in float32 (AdamW on every parameter, warm-up and cosine decay) on the training blocks, briefly,
then each method fine-tunes a copy of that checkpoint for ``--steps`` steps on held-in text (training blocks, in a
new order), with the same batches for every method. Loss: next-token cross-entropy.

Methods (all tune the same weights: every Linear of the decoder layers, i.e. q/k/v/o/gate/up/down projections =
PEFT's ``"all-linear"``; embeddings, RMSNorms and ``lm_head`` are frozen in every method, so they are equal
everywhere and left out of the per-parameter counts):

* fp32 AdamW: ``torch.optim.AdamW`` (betas 0.9/0.999, no weight decay) on float32 weights;
* float Lion: :class:`Lion` below, a plain reference (Chen et al. 2023; betas 0.9/0.99, no weight decay);
* bnb Lion8bit: ``bitsandbytes.optim.Lion8bit`` (same betas) on float32 weights and gradients;
* QuantFull RTN / SR: ``get_peft_model(model, QuantFullConfig(target_modules="all-linear",
  stochastic_rounding=False/True, outlier_fraction=0.01))`` and ``QuantFullOptimizer(model, lr)`` (same betas,
  momentum blocks of 256): int8 codes with one scale per output channel and 1% float outliers, updated inside
  backward.

Every method runs a small learning-rate grid (``ADAMW_GRID`` for AdamW, ``LION_GRID`` for the Lion family, which
needs a ~10x smaller lr), constant lr; the lr is picked on the validation loss after the last step and the test loss
of that run is reported. All runs train interleaved, one step each in rotating order, so that load from other
processes falls on all methods alike; torch runs on one thread (``--threads``; two threads on the shared 2-core
machine were erratic and up to 30x slower).

Measurements:

* model state per tuned parameter, counted exactly from the tensors: weights (float: 4 B; QuantFull: int8 codes +
  per-channel scales + outlier values + int32 outlier indices, + one scalar anchor per layer), gradients alive
  between backward and ``optimizer.step()`` (the ``.grad`` of the tuned weights, read right after ``backward``; for
  QuantFull every parameter's ``.grad`` and any accumulation buffer in the optimizer state, which must be none), and
  optimizer state (every tensor in ``optimizer.state`` of the tuned weights, shared tensors such as bitsandbytes'
  quantization map counted once). Read on a probe copy of each method after its first and second step.
* peak tensor memory of a step: the exact peak of the bytes held by tensors during a step (forward, backward,
  optimizer step, ``zero_grad``): the model's parameters and buffers and the optimizer state held before the step,
  plus the peak of the tensors torch's operators create during it (activations, gradients, optimizer state created
  in the first step, temporaries such as a dequantized weight), counted by a ``TorchDispatchMode`` until each
  storage is freed. Allocator-independent: what a GPU's ``max_memory_allocated`` would give. Reported for the first
  step (which creates the optimizer state) and the second (steady state). Resident memory (RSS) is not used: on a
  model this small most tensors are below glibc's mmap threshold and come from a heap that hides reuse. For
  QuantFull, one more step measures the temporaries of each fused update inside backward on their own (bytes per
  parameter of the layer being updated): on a large model, where one layer is big, they add to the peak.
* step time: median wall time of the training steps after the first two, pooled over a method's lr grid.
* quality: training loss (mean over the last 10 steps' batches, the same batches for every method), validation
  loss (lr choice) and test loss of the held-out sentences after the last step, and the share of float Lion's
  test-loss improvement over the untuned checkpoint that a method reaches (a fine-tuning run moves the loss by a
  few percent only, so "within 2% of float Lion" alone says little). The validation loss is also
  recorded every ``--eval-every`` steps: the stochastic-rounding curve (float Lion vs QuantFull RTN vs SR) is
  printed at every Lion-family lr up to float Lion's pick, and per lr the share of int8 codes that moved, the share
  of inlier weights whose int8 step is at most ``2·lr`` (the only ones round-to-nearest can move) and each Lion
  variant's validation loss after the last step.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples"))  # offline_text

MODEL = dict(
    vocab_size=2048, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=False,
)
TARGET_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAMW_GRID = (3e-4, 1e-3, 3e-3)
LION_GRID = (3e-5, 3e-4, 1e-3, 3e-3)
QUICK_ADAMW_GRID, QUICK_LION_GRID = (1e-3,), (1e-4,)
METHODS = ("fp32 AdamW", "float Lion", "bnb Lion8bit", "QuantFull RTN", "QuantFull SR")
LION_BETAS = (0.9, 0.99)
OUTLIER_FRACTION = 0.01
GOAL_BYTES, GOAL_LOSS = 2.2, 0.02


# ---- float Lion (reference) --------------------------------------------------------------------------------------


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023): ``c = β1·m + (1−β1)·g``; ``w ← w(1 − lr·λ) − lr·sign(c)``; ``m ← β2·m + (1−β2)·g``."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = LION_BETAS, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m * beta1 + p.grad * (1 - beta1)), alpha=-group["lr"])
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)


# ---- measuring ---------------------------------------------------------------------------------------------------


class TensorMemoryTracker(TorchDispatchMode):
    """Exact bytes of the tensors created by torch operators while the mode is active, and their peak.

    Every operator output whose storage is not one of the operator's inputs (views and in-place results are not
    new) is counted until its storage is freed (a weak reference's callback). Autograd's backward (QuantFull's fused
    update included) and the optimizers run through the same operators, so activations, gradients, optimizer state
    and temporaries are all seen; tensors that existed before (weights) are not.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in inputs and id(storage) not in self.live and storage.nbytes():
                    self._add(storage)
        return out

    def _add(self, storage: torch.UntypedStorage) -> None:
        key, size = id(storage), storage.nbytes()

        def freed(_ref, key=key, size=size) -> None:
            if self.live.pop(key, None) is not None:
                self.current -= size

        self.live[key] = weakref.ref(storage, freed)
        self.current += size
        self.peak = max(self.peak, self.current)


def unique_bytes(tensors) -> int:
    """Bytes of the storages behind ``tensors``, each storage once."""
    storages = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def cpu_model() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


# ---- data --------------------------------------------------------------------------------------------------------


@dataclass
class Data:
    train: torch.Tensor  # (blocks, seq_len) token ids
    val: torch.Tensor
    test: torch.Tensor
    vocab_size: int


def make_data(args) -> Data:
    from offline_text import stdlib_sentences, train_tokenizer

    sentences = stdlib_sentences(seed=args.seed)
    n_test = n_val = len(sentences) // 12
    test, val, train = sentences[:n_test], sentences[n_test:n_test + n_val], sentences[n_test + n_val:]
    tokenizer = train_tokenizer(train, MODEL["vocab_size"])

    def blocks(part: list[str]) -> torch.Tensor:
        ids = [i for row in tokenizer(part)["input_ids"] for i in (*row, tokenizer.eos_token_id)]
        usable = len(ids) // args.seq_len * args.seq_len
        return torch.tensor(ids[:usable], dtype=torch.long).view(-1, args.seq_len)

    return Data(blocks(train), blocks(val), blocks(test), len(tokenizer))


def batches_of(blocks: torch.Tensor, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """``steps`` batches drawn without replacement, epoch after epoch, in an order fixed by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order += torch.randperm(len(blocks), generator=generator).tolist()
    return [blocks[order[i * batch_size:(i + 1) * batch_size]] for i in range(steps)]


@torch.no_grad()
def mean_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int) -> float:
    """Token-mean cross-entropy over ``blocks`` (every block has the same length)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(blocks), batch_size):
        batch = blocks[i:i + batch_size]
        total += float(model(input_ids=batch, labels=batch).loss) * len(batch)
    model.train(was_training)
    return total / len(blocks)


# ---- model and methods -------------------------------------------------------------------------------------------


def new_model(state: Optional[dict] = None) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**MODEL))
    if state is not None:
        model.load_state_dict(state)
    return model


def pretrain(data: Data, args) -> dict:
    """The float32 checkpoint every method starts from: AdamW on every parameter, warm-up and cosine decay."""
    torch.manual_seed(args.seed)
    model = new_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, weight_decay=0.0)
    warmup = max(1, args.pretrain_steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.pretrain_steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    losses = []
    started = time.perf_counter()
    for step, batch in enumerate(batches_of(data.train, args.batch_size, args.pretrain_steps, args.seed + 1)):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if (step + 1) % 100 == 0 or step + 1 == args.pretrain_steps:
            print(f"  pre-training step {step + 1}/{args.pretrain_steps}: train loss "
                  f"{statistics.mean(losses[-50:]):.4f}", flush=True)
    args.pretrain_seconds = time.perf_counter() - started
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def is_target(name: str) -> bool:
    return name.split(".")[-1] in TARGET_SUFFIXES and ".layers." in f".{name}"


def build(method: str, state: dict, lr: float):
    """``(model, optimizer, tuned)``: a fresh copy of the checkpoint set up for ``method``; ``tuned`` maps each
    tuned layer's name to its float weight (float methods) or its QuantFull layer."""
    import bitsandbytes as bnb
    from peft import get_peft_model

    from peft_quant import QuantFullConfig, QuantFullOptimizer
    from peft_quant.quant_full import QuantFullLayer

    model = new_model(state).train()
    if method.startswith("QuantFull"):
        config = QuantFullConfig(target_modules="all-linear", stochastic_rounding=method.endswith("SR"),
                                 outlier_fraction=OUTLIER_FRACTION)
        model = get_peft_model(model, config).train()
        tuned = {name.removeprefix("base_model.model."): m for name, m in model.named_modules()
                 if isinstance(m, QuantFullLayer)}
        return model, QuantFullOptimizer(model, lr=lr, betas=LION_BETAS), tuned
    model.requires_grad_(False)
    tuned = {name: m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear) and is_target(name)}
    params = [w.requires_grad_(True) for w in tuned.values()]
    if method == "fp32 AdamW":
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    elif method == "float Lion":
        optimizer = Lion(params, lr=lr)
    else:
        optimizer = bnb.optim.Lion8bit(params, lr=lr, betas=LION_BETAS, weight_decay=0.0)
    return model, optimizer, tuned


def quant_full_weight_tensors(layer) -> dict[str, torch.Tensor]:
    name = layer.adapter
    return {"codes": layer.qf_codes[name], "scales": layer.qf_scale[name],
            "outlier values": layer.qf_outlier_value[name], "outlier indices": layer.qf_outlier_index[name],
            "anchor": layer.qf_anchor[name]}


def tuned_numel(tuned: dict) -> int:
    return sum(t.in_features * t.out_features if not isinstance(t, torch.Tensor) else t.numel()
               for t in tuned.values())


def state_tensors(optimizer, keys) -> list[torch.Tensor]:
    return [v for key in keys for v in optimizer.state.get(key, {}).values() if isinstance(v, torch.Tensor)]


def model_state(method: str, model: nn.Module, optimizer, tuned: dict) -> dict:
    """Bytes of the tuned layers' weights and optimizer state, exactly as stored."""
    if method.startswith("QuantFull"):
        parts = {}
        for layer in tuned.values():
            for part, tensor in quant_full_weight_tensors(layer).items():
                parts[part] = parts.get(part, 0) + tensor.numel() * tensor.element_size()
        anchors = [layer.qf_anchor[layer.adapter] for layer in tuned.values()]
        return {"weights": sum(parts.values()), "weight parts": parts,
                "optimizer": unique_bytes(state_tensors(optimizer, anchors))}
    return {"weights": unique_bytes(tuned.values()),
            "optimizer": unique_bytes(state_tensors(optimizer, tuned.values()))}


def gradients_alive(method: str, model: nn.Module, optimizer, tuned: dict) -> tuple[int, list[str]]:
    """Bytes of gradients held between backward and step, and the names of the parameters holding one."""
    if method.startswith("QuantFull"):
        holders = [name for name, p in model.named_parameters() if p.grad is not None]
        accumulating = [t for s in optimizer.state.values() for k, t in s.items() if k == "grad_accum"]
        grads = [p.grad for p in model.parameters() if p.grad is not None] + accumulating
        return unique_bytes(grads), holders
    holders = [name for name, w in tuned.items() if w.grad is not None]
    return unique_bytes(w.grad for w in tuned.values() if w.grad is not None), holders


def held_bytes(model: nn.Module, optimizer) -> int:
    """Every parameter and buffer of the model and every optimizer state tensor, as stored."""
    return unique_bytes([*model.parameters(), *model.buffers(),
                         *(v for s in optimizer.state.values() for v in s.values())])


def probe(method: str, state: dict, lr: float, batches: list[torch.Tensor]) -> dict:
    """Memory of a fresh copy of ``method`` over its first two steps; the copy is discarded."""
    import gc

    reference = new_model(state)
    originals = [weakref.ref(m.weight) for name, m in reference.named_modules()
                 if isinstance(m, nn.Linear) and is_target(name)]
    del reference
    model, optimizer, tuned = build(method, state, lr)
    gc.collect()
    row: dict = {"params": tuned_numel(tuned)}
    if method.startswith("QuantFull"):  # the base weights must really be gone (no reference kept anywhere)
        row["base released"] = all(ref() is None for ref in originals)
    for i, batch in enumerate(batches[:2]):
        held = held_bytes(model, optimizer)
        tracker = TensorMemoryTracker()
        with tracker:
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            grad_bytes, holders = gradients_alive(method, model, optimizer, tuned)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del loss
        row[f"peak step {i + 1}"] = held + tracker.peak
        row[f"grads step {i + 1}"] = grad_bytes
        row["grad holders"] = holders
    row.update(model_state(method, model, optimizer, tuned))
    row["grads"] = max(row["grads step 1"], row["grads step 2"])
    row["held"] = held_bytes(model, optimizer)
    if method.startswith("QuantFull"):
        row["fused transient"] = fused_update_transient(model, tuned, batches[2 % len(batches)])
    return row


def fused_update_transient(model: nn.Module, tuned: dict, batch: torch.Tensor) -> float:
    """Peak bytes of the tensors one fused update creates, per parameter of the layer it updates (the largest over
    the layers, in one more step); the layer's fp32 weight gradient, made before the call, is not included."""
    worst = 0.0

    def measured(updater):
        def update(layer, grad):
            nonlocal worst
            tracker = TensorMemoryTracker()
            with tracker:
                updater(layer, grad)
            worst = max(worst, tracker.peak / grad.numel())
        return update

    originals = {name: layer.updater for name, layer in tuned.items()}
    for name, layer in tuned.items():
        layer.updater = measured(originals[name])
    try:
        model(input_ids=batch, labels=batch).loss.backward()
    finally:
        for name, layer in tuned.items():
            layer.updater = originals[name]
    return worst


# ---- training ----------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One method at one learning rate."""

    method: str
    lr: float
    model: nn.Module
    optimizer: torch.optim.Optimizer
    tuned: dict
    initial_codes: dict = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    curve: dict[int, float] = field(default_factory=dict)  # step -> validation loss

    def step(self, batch: torch.Tensor) -> None:
        start = time.perf_counter()
        loss = self.model(input_ids=batch, labels=batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_seconds.append(time.perf_counter() - start)
        self.losses.append(float(loss))


def new_run(method: str, lr: float, state: dict) -> Run:
    model, optimizer, tuned = build(method, state, lr)
    run = Run(method, lr, model, optimizer, tuned)
    if method.startswith("QuantFull"):
        run.initial_codes = {name: layer.qf_codes[layer.adapter].clone() for name, layer in tuned.items()}
    return run


def train_interleaved(runs: list[Run], batches: list[torch.Tensor], data: Data, args) -> None:
    """One step of every run per round, starting the round at a rotating run; validation loss every
    ``args.eval_every`` steps."""
    started = time.perf_counter()
    for run in runs:
        run.curve[0] = mean_loss(run.model, data.val, args.batch_size)
    for i, batch in enumerate(batches):
        for k in range(len(runs)):
            runs[(i + k) % len(runs)].step(batch)
        if (i + 1) % args.eval_every == 0 or i + 1 == len(batches):
            for run in runs:
                run.curve[i + 1] = mean_loss(run.model, data.val, args.batch_size)
            print(f"  step {i + 1}/{len(batches)} ({time.perf_counter() - started:.0f} s)", flush=True)


def codes_moved(run: Run) -> float:
    """Share of int8 codes that differ from the quantized checkpoint's."""
    moved = total = 0
    for name, layer in run.tuned.items():
        codes = layer.qf_codes[layer.adapter]
        moved += int((codes != run.initial_codes[name]).sum())
        total += codes.numel()
    return moved / total


def movable_share(run: Run, lr: float) -> float:
    """Share of inlier weights whose int8 step (their channel's scale) is at most ``2·lr``: the only ones a Lion
    step of ``lr`` can move under round-to-nearest (without weight decay every step is exactly ``±lr``)."""
    movable = total = 0
    for layer in run.tuned.values():
        scale = layer.qf_scale[layer.adapter]  # (out, groups)
        per_scale = layer.in_features // scale.shape[1]
        movable += int((scale <= 2 * lr).sum()) * per_scale
        total += scale.numel() * per_scale
    return movable / total


# ---- reporting ---------------------------------------------------------------------------------------------------


def markdown_row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def print_table(header: list[str], rows: list[list]) -> None:
    print(markdown_row(header))
    print(markdown_row(["---"] + ["---:"] * (len(header) - 1)))
    for row in rows:
        print(markdown_row(row))


def summarize(method: str, runs: list[Run], data: Data, args) -> dict:
    val = {id(run): run.curve[max(run.curve)] for run in runs}
    best = min(runs, key=lambda run: val[id(run)])
    row = {
        "method": method, "lr": best.lr, "run": best,
        "train": statistics.mean(best.losses[-10:]), "val": val[id(best)], "val0": best.curve[0],
        "test": mean_loss(best.model, data.test, args.batch_size),
        "step_s": statistics.median(s for run in runs for s in run.step_seconds[2:] or run.step_seconds),
        "grid": ", ".join(f"{run.lr:g}: {val[id(run)]:.4f}" for run in runs),
    }
    if method.startswith("QuantFull"):
        row["moved"] = codes_moved(best)
    return row


def print_environment(args, data: Data) -> None:
    import bitsandbytes
    import peft
    import transformers

    import peft_quant

    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, CPU only")
    print(f"versions: torch {torch.__version__}, peft {peft.__version__}, transformers {transformers.__version__}, "
          f"bitsandbytes {bitsandbytes.__version__}, peft-quant {peft_quant.__version__}")
    print(f"command: python {' '.join(sys.argv)}")
    print(f"model: Llama {MODEL}; data: {len(data.train)} training, {len(data.val)} validation, {len(data.test)} "
          f"test blocks of {args.seq_len} tokens (BPE vocabulary {data.vocab_size}); batch {args.batch_size}")
    print(f"pre-training: {args.pretrain_steps} steps AdamW lr {args.pretrain_lr:g} (warm-up 10%, cosine to 10%); "
          f"fine-tuning: {args.steps} steps, constant lr; grids: AdamW {list(args.adamw_grid)}, "
          f"Lion family {list(args.lion_grid)}\n", flush=True)


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    data = make_data(args)
    print_environment(args, data)
    print("pre-training ...", flush=True)
    state = pretrain(data, args)
    checkpoint = new_model(state)
    base = {"val": mean_loss(checkpoint, data.val, args.batch_size),
            "test": mean_loss(checkpoint, data.test, args.batch_size)}
    del checkpoint
    batches = batches_of(data.train, args.batch_size, args.steps, args.seed + 2)
    grids = {m: args.adamw_grid if m == "fp32 AdamW" else args.lion_grid for m in METHODS}

    print("memory probes ...", flush=True)
    probes = {m: probe(m, state, grids[m][0], batches) for m in METHODS}

    runs = {m: [new_run(m, lr, state) for lr in grids[m]] for m in METHODS}
    quantized = {m: mean_loss(runs[m][0].model, data.test, args.batch_size) for m in METHODS if "QuantFull" in m}
    print(f"training {sum(map(len, runs.values()))} runs interleaved ...", flush=True)
    train_interleaved([run for method_runs in runs.values() for run in method_runs], batches, data, args)
    rows = {m: summarize(m, runs[m], data, args) for m in METHODS}
    for m in METHODS:
        rows[m].update(probes[m])

    report(rows, runs, probes, base, quantized, args)
    print(f"\ntotal {time.perf_counter() - started:.0f} s (pre-training {args.pretrain_seconds:.0f} s)")


def report(rows: dict, runs: dict, probes: dict, base: dict, quantized: dict, args) -> None:
    mib = 2**20
    print(f"\npre-trained float32 checkpoint: validation loss {base['val']:.5f}, test loss {base['test']:.5f}; "
          f"quantized by QuantFull (int8 + 1% outliers) before tuning: test loss {quantized['QuantFull SR']:.5f} "
          f"({quantized['QuantFull SR'] / base['test'] - 1:+.3%})")
    adamw, lion = rows["fp32 AdamW"], rows["float Lion"]

    print("\nModel state of the tuned layers, bytes per tuned parameter (exact tensor bytes)\n")
    header = ["method", "tuned params", "weights", "grads alive after backward", "optimizer state",
              "model state", "vs fp32 AdamW", "held before step 2 (MiB)", "peak tensor memory, step 1 (MiB)",
              "step 2 (MiB)"]
    table = []
    for m, row in rows.items():
        p = row["params"]
        total = (row["weights"] + row["grads"] + row["optimizer"]) / p
        row["bytes"] = total
        table.append([m, f"{p:,}", f"{row['weights'] / p:.3f}", f"{row['grads'] / p:.3f}",
                      f"{row['optimizer'] / p:.3f}", f"**{total:.3f}**",
                      f"{total / (adamw['weights'] + adamw['grads'] + adamw['optimizer']) * adamw['params']:.1%}",
                      f"{row['held'] / mib:.2f}", f"{row['peak step 1'] / mib:.2f}", f"{row['peak step 2'] / mib:.2f}"])
    print_table(header, table)
    for m in ("QuantFull RTN", "QuantFull SR"):
        parts = rows[m]["weight parts"]
        p = rows[m]["params"]
        print(f"\n{m} weights: " + ", ".join(f"{k} {v / p:.4f}" for k, v in parts.items()) + " B/param; "
              f"momentum (int8 codes + absmax per 256) {rows[m]['optimizer'] / p:.4f} B/param; parameters holding "
              f".grad after backward: {rows[m]['grad holders'] or 'none'}; base Linear weights freed: "
              f"{rows[m]['base released']}; one fused update inside backward creates up to "
              f"{rows[m]['fused transient']:.1f} B per parameter of its layer in temporaries (beside the layer's "
              f"4 B fp32 gradient)")

    print("\nQuality and speed (lr picked on validation loss after the last step)\n")
    header = ["method", "lr", f"train loss (last {min(10, args.steps)} of {args.steps} steps)", "validation loss",
              "test loss", "test vs float Lion", "test-loss gain vs float Lion's", "median step (s)",
              "int8 codes moved"]
    for r in rows.values():
        r["gain"] = (base["test"] - r["test"]) / (base["test"] - lion["test"])
    print_table(header, [[m, f"{r['lr']:g}", f"{r['train']:.4f}", f"{r['val']:.4f}", f"**{r['test']:.4f}**",
                          f"{r['test'] / lion['test'] - 1:+.2%}", f"{r['gain']:.1%}", f"{r['step_s']:.3f}",
                          f"{r['moved']:.1%}" if "moved" in r else "–"] for m, r in rows.items()])

    print("\nRatios (QuantFull at its picked lr)\n")
    keys = (("model state B/param", "bytes"), ("held tensors before step 2", "held"),
            ("peak tensor memory, step 2", "peak step 2"),
            ("median step time", "step_s"), ("test loss", "test"), ("train loss", "train"))
    table = []
    for m in ("QuantFull SR", "QuantFull RTN", "bnb Lion8bit", "float Lion"):
        for other in ("fp32 AdamW", "float Lion"):
            if m != other:
                table.append([f"{m} / {other}", *(f"{rows[m][k] / rows[other][k]:.3f}" for _, k in keys)])
    print_table(["ratio", *(name for name, _ in keys)], table)

    print("\nValidation loss after the last step per lr: " + "; ".join(f"{m}: {r['grid']}" for m, r in rows.items()))

    # the curve at every Lion-family lr up to float Lion's pick: from where RTN stalls to where it works
    curve_lrs = [lr for lr in args.lion_grid if lr <= lion["lr"]]
    curve_methods = ("float Lion", "QuantFull RTN", "QuantFull SR")
    picked = {(m, lr): next(run for run in runs[m] if run.lr == lr) for lr in curve_lrs for m in curve_methods}
    print("\nStochastic-rounding curve: validation loss over fine-tuning steps (same batches for every run)\n")
    steps = sorted(picked["float Lion", curve_lrs[0]].curve)
    print_table(["step", *(f"{m} {lr:g}" for m, lr in picked)],
                [[step, *(f"{run.curve[step]:.4f}" for run in picked.values())] for step in steps])
    print(f"\nPer Lion-family lr (validation loss before tuning: {lion['val0']:.4f})\n")
    header = ["lr", "inlier weights RTN can move (int8 step ≤ 2·lr)", "codes moved: RTN", "codes moved: SR",
              *(f"val. loss after {args.steps}: {m}" for m in METHODS[1:])]
    table = []
    for lr in args.lion_grid:
        at = {m: next(run for run in runs[m] if run.lr == lr) for m in METHODS[1:]}
        table.append([f"{lr:g}", f"{movable_share(at['QuantFull RTN'], lr):.1%}",
                      f"{codes_moved(at['QuantFull RTN']):.1%}", f"{codes_moved(at['QuantFull SR']):.1%}",
                      *(f"{run.curve[max(run.curve)]:.4f}" for run in at.values())])
    print_table(header, table)

    sr_row = rows["QuantFull SR"]
    print(f"\ngoals: model state {sr_row['bytes']:.3f} B/param (goal ≤ {GOAL_BYTES}): "
          f"{'met' if sr_row['bytes'] <= GOAL_BYTES else 'NOT met'}; QuantFull SR test loss "
          f"{sr_row['test'] / lion['test'] - 1:+.2%} vs float Lion (goal within {GOAL_LOSS:.0%}): "
          f"{'met' if abs(sr_row['test'] / lion['test'] - 1) <= GOAL_LOSS else 'NOT met'}; for scale: the untuned "
          f"checkpoint is {base['test'] / lion['test'] - 1:+.2%} from float Lion, so the test-loss gain column "
          f"(share of float Lion's improvement over the checkpoint) is the sharper measure")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 40 pre-training steps, 6 fine-tuning steps, one lr per method")
    parser.add_argument("--steps", type=int, help="fine-tuning steps per run (default 100; 6 with --quick)")
    parser.add_argument("--pretrain-steps", type=int, help="pre-training steps (default 200; 40 with --quick)")
    parser.add_argument("--pretrain-lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, help="validation every this many steps (default steps/10)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.steps = args.steps or (6 if args.quick else 100)
    args.pretrain_steps = args.pretrain_steps or (40 if args.quick else 200)
    args.eval_every = args.eval_every or max(1, args.steps // (2 if args.quick else 10))
    if args.steps < 3:
        parser.error("--steps must be at least 3: the first two steps of each run are not timed")
    args.adamw_grid = QUICK_ADAMW_GRID if args.quick else ADAMW_GRID
    args.lion_grid = QUICK_LION_GRID if args.quick else LION_GRID
    return args


if __name__ == "__main__":
    main()
