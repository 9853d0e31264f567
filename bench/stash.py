"""Benchmark: StashQuant's compressed stash on a small Llama trained from scratch, at 16/8/6/4/2 bits and with a
rising schedule, against no compression and against PyTorch's activation checkpointing, in one CPU process.

Why: StashQuant (DSQ) keeps what autograd saves for backward in block floating point (k-bit mantissas, one scale
per block of 32). By default (``scale="auto"``) the scale is a bfloat16 below 8 bits: at 4 bits 4 + 16/32 = 4.5 bits
per value, at most 7.1x less than float32; at 8 bits it is a power-of-two exponent (MXINT8, 8.25 bits, at most
3.9x). A power-of-two exponent at 4 bits (``scale="e8m0"``, MXINT4-like: 4.25 bits, at most 7.5x) loses up to one
bit of precision; the "4-bit e8m0" variant measures what that costs. The saving
is only real if every saved tensor is packed once and its float original is freed; this script checks both, and
what the compression costs in loss and step time.

Task: a Llama (``transformers.LlamaConfig``: 4 layers, width 256, MLP 512, 4 heads, rotary, SDPA) trained from
scratch, every weight, on English sentences from the Python standard library's docstrings, tokenized by a
512-token byte-level BPE trained on them here (``examples/offline_text.py``), joined with eos and cut into
rows. Loss: next-token cross-entropy, computed inside the model's forward (so its saved log-probabilities are
part of the stash).

Variants: no compression; activation checkpointing of every decoder layer (``gradient_checkpointing_enable``,
non-reentrant, transformers' default); ``peft_quant.enable_stash(model, bits=b)`` for b in 16 (stored
unchanged: must equal no compression bit for bit), 8, 6, 4, 2 (default scales); 4 bits with power-of-two scales
(``scale="e8m0"``); and the rising schedule 4 -> 6 (at half of the
run) -> 8 (at 80%), advanced with ``packer.update(step, total_steps)`` after every optimizer step.

Fairness: every variant starts from the same weights (same seed), takes the same batches in the same order with
AdamW at the same learning rate and warm-up; all runs train interleaved, one step each in rotating order, so that
load from other processes on a shared machine falls on all alike. From-scratch runs this short differ by about 1%
in held-out loss from seed to seed of the compression noise alone, so ``--seeds`` repeats the training with other
seeds (data split, order and weights) and the loss columns and goals use the mean.

Measurements (memory on a larger "memory batch", before any training, so that every variant holds the same
weights; training on the training batch):

* held for backward, counted by hooks: the bytes autograd keeps for backward after the forward, parameters
  excluded. Without a packer, an outer ``torch.autograd.graph.saved_tensors_hooks`` counts each saved storage
  once (views of one tensor share it); with checkpointing it adds the inputs each checkpointed layer keeps for
  its recomputation (counted once per storage). With a packer, its pack hook is wrapped: what it returns is
  counted, each packed region once by its bytes (mantissas + scales) and each tensor it passes through once per
  storage. The packer's own counters (``original_bytes / stored_bytes``) are shown beside it, with the number of
  pack calls and of distinct tensors packed: a tensor saved by several operations (the input of q, k and v, the
  rotary cos/sin of every layer) is one tensor without compression.
* RSS growth over the forward: resident memory right after the forward minus right before it; and the peak
  resident memory of the whole forward + backward above the same start (``VmHWM`` reset through
  ``/proc/self/clear_refs``). For RSS to follow live memory, the script re-executes itself with
  ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc serves every allocation of 64 KiB or more with fresh pages from mmap and
  unmaps them when freed) and calls ``malloc_trim(0)`` before each measured forward (freed heap pages are given
  back, so that reuse of pages made resident earlier does not hide growth). Smaller allocations (per-block
  scales, pack temporaries, autograd's nodes) come from the heap, where fragmentation can hold a little more
  than is live; the bytes live in malloc (``mallinfo2``: heap in use + mmapped) are shown for comparison.
  Median of ``--memory-reps`` forward/backward passes after one warm-up pass (the counting pass).
* loss: next-token loss on held-out rows (no gradients, so no packing) after the last step, and the mean
  training loss of the last 10 steps.
* step time: median wall time of a training step (forward, backward, AdamW) after the first, one torch thread
  by default (two OpenMP threads on a busy 2-core machine spin-wait). During training glibc is put back to its
  steady state for speed (``mallopt``: allocations below 32 MiB from the heap), as in ``bench/qoft.py``.
"""

from __future__ import annotations

import os
import sys

MMAP_THRESHOLD = 64 * 1024


def _reexec_with_allocator_settings() -> None:
    """Restart this script with glibc's mmap threshold at 64 KiB: it must be set before the process starts."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != str(MMAP_THRESHOLD):
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), HF_HUB_OFFLINE="1")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


if __name__ == "__main__":
    _reexec_with_allocator_settings()

import argparse  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Optional  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples"))  # offline_text

LLAMA = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=256)
QUICK_LLAMA = dict(LLAMA, num_hidden_layers=2)
VOCAB = 512
HELD_OUT_SENTENCES = 256
RISING = dict(bits=4, milestones=[(0.5, 6), (0.8, 8)])  # the rising schedule: 4 bits, 6 from half, 8 from 80%
VARIANTS = ("none", "checkpointing", "16-bit", "8-bit", "6-bit", "4-bit", "2-bit", "4-bit e8m0", "rising 4→6→8")
GOALS = (  # (variant, minimum memory ratio vs none, maximum relative loss increase vs none)
    ("8-bit", 3.5, None), ("4-bit", 6.0, 0.03), ("rising 4→6→8", None, 0.01),
)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
MIB = 2**20


# ---- measuring ---------------------------------------------------------------------------------------------------


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


LIBC = ctypes.CDLL("libc.so.6")
LIBC.mallinfo2.restype = MallInfo2


def malloc_live_bytes() -> int:
    """Bytes in use in malloc: the main heap's allocated chunks plus mmapped chunks (one torch thread: all in
    the main arena)."""
    info = LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; return that RSS in KiB."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _status_kib("VmRSS")


def rss() -> int:
    return _status_kib("VmRSS")


def peak_rss() -> int:
    return _status_kib("VmHWM")


def allocator_for_speed() -> None:
    """Serve allocations below 32 MiB from the heap and keep freed memory, as glibc's default settles to."""
    if not (LIBC.mallopt(M_MMAP_THRESHOLD, 32 * 2**20) and LIBC.mallopt(M_TRIM_THRESHOLD, 64 * 2**20)):
        raise RuntimeError("glibc's mallopt failed")


def cpu_model() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


# ---- model and data ----------------------------------------------------------------------------------------------


def make_data(args):
    """(tokenizer, training rows, held-out rows): docstring sentences joined with eos, cut into rows."""
    from offline_text import stdlib_sentences, train_tokenizer

    sentences = stdlib_sentences(seed=args.seed)
    held_out, train = sentences[:HELD_OUT_SENTENCES], sentences[HELD_OUT_SENTENCES:]
    tokenizer = train_tokenizer(train, vocab_size=VOCAB)

    def rows(text: list[str]) -> torch.Tensor:
        ids: list[int] = []
        for sentence in text:
            ids += tokenizer(sentence, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        count = len(ids) // args.seq_len
        return torch.tensor(ids[: count * args.seq_len]).view(count, args.seq_len)

    return tokenizer, rows(train), rows(held_out)


def new_model(args, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(**(QUICK_LLAMA if args.quick else LLAMA), vocab_size=len(tokenizer),
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return LlamaForCausalLM(config).train()


def loss_of(model, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, labels=batch).loss  # the loss inside the forward: its stash is packed too


def held_out_loss(model, rows: torch.Tensor, batch_size: int) -> float:
    model.eval()
    with torch.no_grad():
        losses = [float(loss_of(model, rows[i:i + batch_size])) * len(rows[i:i + batch_size])
                  for i in range(0, len(rows), batch_size)]
    model.train()
    return sum(losses) / len(rows)


# ---- variants ----------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One variant: its model, optimizer, packer (if any) and what was measured."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    packer: Optional[object] = None
    memory: dict = field(default_factory=dict)
    step_seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    bits_seen: list[int] = field(default_factory=list)
    held_outs: list[float] = field(default_factory=list)  # held-out loss after the last step, one per seed
    train_finals: list[float] = field(default_factory=list)  # mean training loss of the last 10 steps, one per seed

    def step(self, batch: torch.Tensor, index: int, total: int) -> None:
        start = time.perf_counter()
        loss = loss_of(self.model, batch)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_seconds.append(time.perf_counter() - start)
        self.losses.append(loss.item())
        if self.packer is not None:
            self.bits_seen.append(self.packer.bits)
            self.packer.update(index + 1, total)  # once per optimizer step, as stash_callback does under Trainer


def new_run(name: str, args, tokenizer) -> Run:
    import peft_quant

    model = new_model(args, tokenizer)
    packer = None
    if name == "checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif "-bit" in name:  # "4-bit" (the default scale) or "4-bit e8m0" (power-of-two scales)
        bits, _, scale = name.partition("-bit")
        packer = peft_quant.enable_stash(model, bits=int(bits), scale=scale.strip() or "auto")
    elif name.startswith("rising"):
        packer = peft_quant.enable_stash(model, **RISING)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    return Run(name, model, optimizer, scheduler, packer)


# ---- memory held for backward ------------------------------------------------------------------------------------


def count_held_for_backward(run: Run, batch: torch.Tensor) -> dict:
    """Bytes autograd keeps for backward after one forward on ``batch`` (see the module docstring); runs the
    backward too and drops the gradients."""
    from peft_quant.stash.packer import PackedSave

    model = run.model
    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    kept: dict[int, int] = {}  # storage -> bytes, of tensors kept as they are
    packed: dict[int, int] = {}  # id(packed region) -> bytes
    originals: dict[int, tuple] = {}  # storage -> (bytes, storage): distinct tensors handed to the packer
    calls = [0]

    def keep(tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            kept[storage.data_ptr()] = storage.nbytes()

    handles = []
    if run.packer is None:
        def pack(tensor):
            keep(tensor)
            return tensor

        context = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
        if run.name == "checkpointing":  # the inputs each checkpointed layer keeps for its recomputation
            def layer_inputs(module, args, kwargs):
                if torch.is_grad_enabled():  # not during the recomputation in backward
                    for value in (*args, *kwargs.values()):
                        for tensor in (value if isinstance(value, tuple) else (value,)):
                            if isinstance(tensor, torch.Tensor):
                                keep(tensor)

            handles = [layer.register_forward_pre_hook(layer_inputs, with_kwargs=True) for layer in model.model.layers]
    else:
        packer = run.packer
        original_pack = packer._pack  # the packer's own pack hook, entered for the model's forward

        def counting_pack(tensor):
            calls[0] += 1
            result = original_pack(tensor)
            if isinstance(result, PackedSave):
                packed[id(result.region)] = result.region.nbytes
                storage = tensor.untyped_storage()
                originals[storage.data_ptr()] = (storage.nbytes(), storage)  # held only in this counting pass
            else:
                keep(result)
            return result

        packer._pack = counting_pack
        packer.reset_stats()
        context = None
    try:
        if context is not None:
            with context:
                loss = loss_of(model, batch)
        else:
            loss = loss_of(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        if run.packer is not None:
            del run.packer._pack  # back to the class's method
    loss.backward()
    model.zero_grad(set_to_none=True)
    result = {"held_bytes": sum(kept.values()) + sum(packed.values()), "pack_calls": calls[0]}
    if run.packer is not None:
        result.update(
            packed_distinct=len(originals), packed_calls_counted=run.packer.packed_tensors,
            counter_original=run.packer.original_bytes, counter_stored=run.packer.stored_bytes,
            distinct_original=sum(size for size, _ in originals.values()), passed_through=sum(kept.values()),
        )
        run.packer.reset_stats()
    return result


def measure_resident(run: Run, batch: torch.Tensor, reps: int) -> dict:
    """Median RSS growth over the forward, peak RSS growth over forward + backward, and malloc's live growth."""
    forward, peak, live = [], [], []
    for _ in range(reps):
        run.model.zero_grad(set_to_none=True)
        gc.collect()
        LIBC.malloc_trim(0)
        live_before = malloc_live_bytes()
        before = reset_peak_rss()
        loss = loss_of(run.model, batch)
        after = rss()
        live.append((malloc_live_bytes() - live_before) / MIB)
        loss.backward()
        peak.append((peak_rss() - before) / 1024)
        forward.append((after - before) / 1024)
        del loss
    run.model.zero_grad(set_to_none=True)
    return {"rss_forward_mib": statistics.median(forward), "rss_peak_mib": statistics.median(peak),
            "live_forward_mib": statistics.median(live),
            "rss_spread": f"{min(forward):.1f}–{max(forward):.1f}"}


def measure_memory(runs: list[Run], batch: torch.Tensor, reps: int) -> None:
    for run in runs:
        run.memory = count_held_for_backward(run, batch)  # also the warm-up pass
        run.memory.update(measure_resident(run, batch, reps))
        print(f"  {run.name}: held {run.memory['held_bytes'] / MIB:.2f} MiB, RSS growth over forward "
              f"{run.memory['rss_forward_mib']:.1f} MiB", flush=True)


# ---- training ----------------------------------------------------------------------------------------------------


def train_interleaved(runs: list[Run], batches: list[torch.Tensor]) -> None:
    """One step of every run per round, starting the round at a rotating run."""
    for i, batch in enumerate(batches):
        for k in range(len(runs)):
            runs[(i + k) % len(runs)].step(batch, i, len(batches))
        if (i + 1) % 20 == 0 or i + 1 == len(batches):
            print(f"  step {i + 1}/{len(batches)}: " + ", ".join(f"{run.name} {run.losses[-1]:.3f}" for run in runs),
                  flush=True)


# ---- reporting ---------------------------------------------------------------------------------------------------


def markdown_row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    print(markdown_row(headers))
    print(markdown_row(["---"] + ["---:"] * (len(headers) - 1)))
    for row in rows:
        print(markdown_row(row))


def bits_label(run: Run) -> str:
    if run.packer is None:
        return "–"
    first, last = run.bits_seen[0], run.bits_seen[-1]
    return str(first) if first == last else f"{first}→{last}"


def report(runs: list[Run], args) -> dict:
    base = runs[0]
    base_held = base.memory["held_bytes"]
    print("\nMemory held for backward, on the memory batch "
          f"({args.memory_batch} × {args.seq_len} tokens; RSS: median of {args.memory_reps}):\n")
    rows = []
    for run in runs:
        m = run.memory
        counters = (f"{m['counter_original'] / MIB:.2f} / {m['counter_stored'] / MIB:.2f} = "
                    f"{m['counter_original'] / m['counter_stored']:.2f}×") if m.get("counter_stored") else "–"
        packs = f"{m['pack_calls']} / {m['packed_distinct']}" if run.packer is not None else "–"
        rows.append([
            run.name, packs, counters, f"{m['held_bytes'] / MIB:.2f}", f"{base_held / m['held_bytes']:.2f}×",
            f"{m['rss_forward_mib']:.1f}", m["rss_spread"],
            f"{base.memory['rss_forward_mib'] / m['rss_forward_mib']:.2f}×",
            f"{m['live_forward_mib']:.1f}", f"{m['rss_peak_mib']:.1f}",
            f"{base.memory['rss_peak_mib'] / m['rss_peak_mib']:.2f}×",
        ])
    print_table(["variant", "pack calls / distinct tensors packed", "packer counters: original / stored MiB",
                 "held for backward, hooks (MiB)", "none / this", "RSS growth over forward (MiB)", "range",
                 "none / this", "malloc live growth over forward (MiB)", "peak RSS growth, fwd+bwd (MiB)",
                 "none / this"], rows)

    print(f"\nTraining: {args.steps} steps × {args.batch_size} × {args.seq_len} tokens, held-out loss on "
          f"{args.held_out_rows} rows; losses are means over seeds {args.seeds} (first loss and step time: seed "
          f"{args.seeds[0]}):\n")
    base_loss, base_train = statistics.fmean(base.held_outs), statistics.fmean(base.train_finals)
    base_step = statistics.median(base.step_seconds[1:])
    rows = []
    for run in runs:
        train, held = statistics.fmean(run.train_finals), statistics.fmean(run.held_outs)
        step = statistics.median(run.step_seconds[1:])
        rows.append([run.name, bits_label(run), f"{run.losses[0]:.4f}", f"{train:.4f}",
                     f"{train / base_train - 1:+.2%}", f"{held:.4f}", f"{held / base_loss - 1:+.2%}",
                     " / ".join(f"{h / b - 1:+.2%}" for h, b in zip(run.held_outs, base.held_outs)),
                     f"{step:.3f}", f"{step / base_step:.2f}×"])
    print_table(["variant", "bits (first→last step)", "first loss", "train loss, last 10 steps", "vs none",
                 "held-out loss", "vs none", "vs none, per seed", "median step (s)", "this / none"], rows)

    by_name = {run.name: run for run in runs}
    print("\nGoals:\n")
    rows, verdicts = [], {}
    for name, min_ratio, max_loss in GOALS:
        if name not in by_name:
            continue
        run = by_name[name]
        if min_ratio is not None:
            ratio = base_held / run.memory["held_bytes"]
            rss_ratio = base.memory["rss_forward_mib"] / run.memory["rss_forward_mib"]
            met = ratio >= min_ratio and rss_ratio >= min_ratio
            verdicts[f"{name} memory"] = met
            rows.append([f"{name}: ≥ {min_ratio}× less held for backward",
                         f"hooks {ratio:.2f}×, RSS {rss_ratio:.2f}×", "met" if met else "NOT met"])
        if max_loss is not None:
            change = statistics.fmean(run.held_outs) / base_loss - 1
            met = change <= max_loss
            verdicts[f"{name} loss"] = met
            rows.append([f"{name}: held-out loss within {max_loss:.0%} of none", f"{change:+.2%}",
                         "met" if met else "NOT met"])
    print_table(["goal", "measured", "verdict"], rows)
    if "16-bit" in by_name:
        identical = by_name["16-bit"].losses == base.losses and by_name["16-bit"].held_outs == base.held_outs
        print(f"\n16-bit (stored unchanged) trains bit for bit like no compression: {identical}")
    return verdicts


def print_environment(args) -> None:
    import peft
    import transformers

    import peft_quant

    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, CPU only")
    print(f"versions: torch {torch.__version__}, peft {peft.__version__}, transformers {transformers.__version__}, "
          f"peft-quant {peft_quant.__version__}")
    print(f"command: python {' '.join(sys.argv)}")
    llama = QUICK_LLAMA if args.quick else LLAMA
    print(f"model: Llama {llama['num_hidden_layers']} layers, width {llama['hidden_size']}, MLP "
          f"{llama['intermediate_size']}, {llama['num_attention_heads']} heads, vocab {VOCAB}, trained from scratch "
          f"(every weight); AdamW lr {args.lr:g}, betas (0.9, 0.95), linear warm-up {max(1, args.steps // 10)} steps")
    print(f"stash: block 32, min_numel 1024 (package defaults); rising schedule {RISING}\n")


# ---- main --------------------------------------------------------------------------------------------------------


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--steps", type=int, help="training steps per variant (default 120; 4 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 layers, 4 steps, a small memory batch, one memory repetition")
    parser.add_argument("--batch-size", type=int, help="training sequences per step (default 8)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    parser.add_argument("--memory-batch", type=int,
                        help="sequences in the memory measurements (default 32; 4 with --quick)")
    parser.add_argument("--memory-reps", type=int, help="measured passes per variant (default 3; 1 with --quick)")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default 2e-3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="seeds of the data split and shuffle and of the weights; the memory is measured with the "
                             "first, the losses are averaged over all (default 0)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="variants to run (default all; 'none', the baseline, is always run)")
    args = parser.parse_args()
    args.variants = ["none"] + [name for name in VARIANTS if name in args.variants and name != "none"]
    args.steps = args.steps or (4 if args.quick else 120)
    args.batch_size = args.batch_size or (4 if args.quick else 8)
    args.memory_batch = args.memory_batch or (4 if args.quick else 32)
    args.memory_reps = args.memory_reps or (1 if args.quick else 3)
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step of each run is not timed")
    return args


def main() -> None:
    from transformers.utils import logging as hf_logging

    args = parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    started = time.perf_counter()

    runs: list[Run] = []
    for seed in args.seeds:
        args.seed = seed
        tokenizer, train_rows, held_rows = make_data(args)
        needed = args.steps * args.batch_size
        order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(seed))
        order = order.repeat(needed // len(order) + 1)[:needed]
        batches = [train_rows[order[i:i + args.batch_size]] for i in range(0, needed, args.batch_size)]
        held_rows = held_rows[: 32 if args.quick else 128]
        args.held_out_rows = len(held_rows)
        seed_runs = [new_run(name, args, tokenizer) for name in args.variants]
        if not runs:  # the first seed: memory, step times and the tables' per-run details
            runs = seed_runs
            memory_batch = train_rows[order[: args.memory_batch]] if args.memory_batch <= len(order) else \
                train_rows[: args.memory_batch]
            print_environment(args)
            print(f"data: {len(train_rows)} training rows, {len(held_rows)} held-out rows of {args.seq_len} tokens")
            print("measuring memory (allocator: mmap from 64 KiB) ...", flush=True)
            measure_memory(runs, memory_batch, args.memory_reps)
            allocator_for_speed()
        print(f"seed {seed}: training {len(seed_runs)} variants interleaved ...", flush=True)
        train_interleaved(seed_runs, batches)
        for run, first in zip(seed_runs, runs):
            held_out = held_out_loss(run.model, held_rows, args.batch_size)
            if not math.isfinite(held_out):
                print(f"  {run.name}: held-out loss is not finite", flush=True)
            first.held_outs.append(held_out)
            first.train_finals.append(statistics.fmean(run.losses[-10:]))

    report(runs, args)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
