"""Benchmark: QOFT on every base format against dequantize-then-LoRA and PEFT's own LoRA/OFT, in one CPU process.

``python bench/formats.py`` (from the repository root). For each base format (peft-quant int4/int8, bitsandbytes
nf4/int8, FP8 block-scaled, MXFP4, HQQ int4, torchao int8 weight-only, compressed-tensors int4, AWQ int4) a small
stack of two Linear layers ``width → width`` (both in the format, built as the conformance matrix builds its cells:
``tests.conformance_cases.FORMATS`` and ``LIBRARY_BUILDERS``) is tuned four ways:

* **QOFT**: ``peft_quant.QOFTConfig`` (block 32, 5 Neumann terms) on the quantized layers;
* **workaround**: each layer dequantized (``peft_quant.quant_formats.read_weight``) into a bfloat16 ``nn.Linear``,
  then PEFT LoRA r16 (what one does today where no adapter runs on the format);
* **PEFT LoRA r16** and **PEFT OFT** (block 32, Cayley–Neumann, 5 terms) directly on the quantized layers.

Where PEFT refuses a layer type, a forward or backward fails, or the input gets no gradient (``x.grad`` missing or
zero), the table says so: that is a finding about the method on the format, not an error of the script. A format
whose package is not installed gets a "not installed" row.

Compute dtype: bfloat16 for the formats that compute in it (FP8, MXFP4, AWQ), float32 for the others; the workaround
always computes in bfloat16. Inputs ``x`` (``tokens × width``) and the loss weights ``g`` are bfloat16-representable,
so every method sees the same values.

Measurements, per format and method:

* weights held: the bytes of every tensor the two base layers store (parameters, buffers, tensor attributes such as
  bitsandbytes' quant state and HQQ's meta, the inner tensors of tensor subclasses such as torchao's; each storage
  once), per base weight parameter, plus the adapter's trainable parameters;
* saved for backward: the unique bytes of the storages autograd keeps in one forward (with ``x`` requiring a
  gradient), counted with ``torch.autograd.graph.saved_tensors_hooks``; parameters, buffers and the base layers'
  stored tensors are not counted;
* step time: median wall time of ``--steps`` AdamW steps (forward, backward, update; ``x`` itself needs no
  gradient there), the methods of a format interleaved one step each in rotating order so that load from other
  processes falls on all alike; ratio of the medians to QOFT's; the fastest step beside the median shows how much
  load from other processes a median carries;
* input gradient: with adapters at init (the identity), ``loss = sum(out · g)`` and the relative Frobenius error of
  ``dL/dx`` (the first layer's input) against float64 ``g · W2 · W1`` from ``read_weight`` of the quantized layers.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Optional

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
if os.path.abspath(ROOT) not in map(os.path.abspath, sys.path):
    sys.path.append(os.path.abspath(ROOT))  # tests.conformance_cases; appended, so installed packages come first

from qoft import BLOCK_SIZE, NEUMANN_TERMS, cpu_model, markdown_row  # noqa: E402

# format (a key of tests.conformance_cases.FORMATS) -> (label, package it needs or None)
BENCH_FORMATS = {
    "int4": ("peft-quant int4", None),
    "int8": ("peft-quant int8", None),
    "bnb-nf4": ("bitsandbytes nf4", "bitsandbytes"),
    "bnb-int8": ("bitsandbytes int8", "bitsandbytes"),
    "fp8": ("FP8 block-scaled", None),
    "mxfp4": ("MXFP4", None),
    "hqq-int4": ("HQQ int4", "hqq"),
    "torchao-int8": ("torchao int8 weight-only", "torchao"),
    "ct-int4": ("compressed-tensors int4", "compressed_tensors"),
    "awq-int4": ("AWQ int4", "gptqmodel"),
}
BF16_FORMATS = ("fp8", "mxfp4", "awq-int4")  # formats that compute in bfloat16
METHODS = ("QOFT", "workaround", "PEFT LoRA", "PEFT OFT")
LORA_RANK = 16
LAYERS = ("fc1", "fc2")
VERSIONS = ("torch", "peft", "transformers", "bitsandbytes", "hqq", "torchao", "compressed-tensors", "gptqmodel",
            "peft-quant")
_LIBRARY_ROOTS = ("bitsandbytes", "hqq", "torchao", "compressed_tensors", "gptqmodel", "peft_quant")


class Stack(nn.Module):
    """Two Linear layers ``width → width``: the second layer's input gradient reaches the first layer's adapter."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


# ---- building ----------------------------------------------------------------------------------------------------


def build_base(fmt: str, width: int) -> nn.Module:
    """A fresh :class:`Stack` (same weights every call) with both layers in ``fmt``, in training mode."""
    import peft_quant
    from tests.conformance_cases import FORMATS, LIBRARY_BUILDERS

    torch.manual_seed(0)
    dtype = torch.bfloat16 if fmt in BF16_FORMATS else torch.float32
    model = Stack(width).to(dtype)
    spec = FORMATS[fmt]
    if isinstance(spec, str):
        LIBRARY_BUILDERS[spec](model, LAYERS)
    else:
        extra = dict(compute_dtype=dtype) if spec["backend"] == "bitsandbytes" else {}
        peft_quant.quantize_model(model, **spec, **extra)
    return model.train()


def dequantized_copy(model: nn.Module) -> nn.Module:
    """The workaround's base: each quantized layer replaced by a bfloat16 ``nn.Linear`` holding its dequantized
    weight (``read_weight``) and its bias."""
    from peft_quant.quant_formats import read_weight

    for name in LAYERS:
        layer = getattr(model, name)
        weight = read_weight(layer)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=layer.bias is not None, dtype=torch.bfloat16)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if layer.bias is not None:
                linear.bias.copy_(layer.bias.detach().float())
        setattr(model, name, linear)
    return model.train()


def adapter_config(method: str):
    import peft

    import peft_quant

    targets = list(LAYERS)
    if method == "QOFT":
        return peft_quant.QOFTConfig(target_modules=targets, block_size=BLOCK_SIZE, num_neumann_terms=NEUMANN_TERMS)
    if method == "PEFT OFT":
        return peft.OFTConfig(target_modules=targets, oft_block_size=BLOCK_SIZE, r=0, use_cayley_neumann=True,
                              num_cayley_neumann_terms=NEUMANN_TERMS, module_dropout=0.0)
    return peft.LoraConfig(target_modules=targets, r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0)


def short(error: BaseException, limit: int = 90) -> str:
    """The first sentence of an error, shortened for a table cell (``|`` escaped)."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0].replace("|", "/")
    return text if len(text) <= limit else text[:limit - 1] + "…"


# ---- measuring ---------------------------------------------------------------------------------------------------


def plain_tensors(tensor: torch.Tensor):
    """The plain tensors that hold a tensor's data: itself, or a tensor subclass's inner tensors, recursively."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        for name in names:
            yield from plain_tensors(getattr(tensor, name))
    else:
        yield tensor


def storages(tensor: torch.Tensor) -> dict[int, int]:
    """``{storage address: bytes}`` of the plain tensors under ``tensor``."""
    found = {}
    for plain in plain_tensors(tensor):
        storage = plain.untyped_storage()
        found[storage.data_ptr()] = storage.nbytes()
    return found


def held_storages(obj, seen: Optional[set] = None, depth: int = 0) -> dict[int, int]:
    """``{storage address: bytes}`` of every tensor a base layer holds: parameters, buffers, tensor attributes of the
    module, of its tensors (bitsandbytes' ``quant_state``, ``SCB``) and of the quantization libraries' state objects,
    dicts and lists among them (HQQ's ``meta``), and tensor subclasses' inner tensors."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 8:
        return {}
    seen.add(id(obj))
    found: dict[int, int] = {}
    if isinstance(obj, torch.Tensor):
        found.update(storages(obj))
        children = list(getattr(obj, "__dict__", {}).values())
    elif isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    elif isinstance(obj, nn.Module) or type(obj).__module__.split(".")[0] in _LIBRARY_ROOTS:
        children = list(getattr(obj, "__dict__", {}).values())
    else:
        return found
    for child in children:
        found.update(held_storages(child, seen, depth + 1))
    return found


def base_layers(model: nn.Module) -> list[nn.Module]:
    """The two base layers under a PEFT model (or of a plain :class:`Stack`)."""
    stack = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = [getattr(stack, name) for name in LAYERS]
    return [layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer for layer in layers]


def weight_bytes(model: nn.Module) -> tuple[int, int]:
    """``(base layers' stored bytes, adapter's trainable parameter bytes)``."""
    held: dict[int, int] = {}
    for layer in base_layers(model):
        held.update(held_storages(layer))
    adapter = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return sum(held.values()), adapter


def saved_for_backward(model: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[int, Optional[torch.Tensor]]:
    """Unique bytes autograd keeps in one forward of ``x`` (parameters, buffers and the base layers' stored tensors
    not counted), and ``dL/dx`` from its backward (``None`` where the input got no gradient)."""
    owned: set[int] = set()
    for tensor in (*model.parameters(), *model.buffers()):
        owned.update(storages(tensor))
    for layer in base_layers(model):
        owned.update(held_storages(layer))
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        for address, nbytes in storages(tensor).items():
            if address not in owned:
                saved[address] = nbytes
        return tensor

    x = x.detach().clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(x)
    if out.requires_grad:
        (out.float() * g).sum().backward()
    model.zero_grad(set_to_none=True)
    return sum(saved.values()), x.grad


def rel_fro(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---- one format --------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One method on one format: its model, optimizer and what was measured (``outcome`` is "ok" or the finding)."""

    method: str
    dtype: torch.dtype
    outcome: str = "ok"
    model: Optional[nn.Module] = None
    optimizer: Optional[torch.optim.Optimizer] = None
    base_bytes: int = 0
    adapter_bytes: int = 0
    saved_bytes: int = 0
    grad_error: Optional[float] = None
    seconds: list[float] = field(default_factory=list)

    def step(self, x: torch.Tensor, g: torch.Tensor) -> None:
        start = time.perf_counter()
        (self.model(x).float() * g).sum().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.seconds.append(time.perf_counter() - start)


def new_run(method: str, fmt: str, width: int) -> Run:
    """Build the method's model on a fresh base; a refusal is recorded in ``outcome``."""
    from peft import get_peft_model

    dtype = torch.bfloat16 if method == "workaround" or fmt in BF16_FORMATS else torch.float32
    run = Run(method, dtype)
    base = build_base(fmt, width)
    if method == "workaround":
        base = dequantized_copy(base)
    torch.manual_seed(1)
    try:
        run.model = get_peft_model(base, adapter_config("PEFT LoRA" if method == "workaround" else method)).train()
    except Exception as error:
        run.outcome = f"refused: {short(error)}"
        return run
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    run.optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    return run


def first_pass(run: Run, x: torch.Tensor, g: torch.Tensor, reference: torch.Tensor) -> None:
    """Saved bytes and the input gradient's error at init; a failing forward/backward is recorded in ``outcome``."""
    try:
        run.saved_bytes, grad = saved_for_backward(run.model, x.to(run.dtype), g)
    except Exception as error:
        run.outcome = f"failed: {type(error).__name__}: {short(error)}"
        return
    if grad is None or not bool(grad.abs().sum() > 0):
        run.outcome = "no input gradient"
    else:
        run.grad_error = rel_fro(grad, reference)


def bench_format(fmt: str, args) -> tuple[list[Run], Optional[str]]:
    """Every method on ``fmt``, steps interleaved; ``(runs, None)`` or ``([], why the format could not be built)``."""
    from peft_quant.quant_formats import read_weight

    try:
        base = build_base(fmt, args.width)
        w1, w2 = (read_weight(layer).to(torch.float64) for layer in base_layers(base))
    except Exception as error:
        return [], f"failed to build: {type(error).__name__}: {short(error)}"
    del base
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, args.width, generator=generator).to(torch.bfloat16)
    g = torch.randn(args.tokens, args.width, generator=generator).to(torch.bfloat16).float()
    reference = g.to(torch.float64) @ w2 @ w1  # dL/dx of sum(out · g), out = (x W1ᵀ + b1) W2ᵀ + b2

    runs = [new_run(method, fmt, args.width) for method in METHODS]
    for run in runs:
        if run.model is not None:
            first_pass(run, x, g, reference)
    live = [run for run in runs if run.model is not None and not run.outcome.startswith("failed")]
    for i in range(args.steps):
        for k in range(len(live)):
            run = live[(i + k) % len(live)]
            try:
                run.step(x.to(run.dtype), g)
            except Exception as error:
                run.outcome = f"failed in training: {type(error).__name__}: {short(error)}"
        live = [run for run in live if not run.outcome.startswith("failed")]
    for run in runs:
        if run.model is not None:
            run.base_bytes, run.adapter_bytes = weight_bytes(run.model)
    return runs, None


# ---- reporting ---------------------------------------------------------------------------------------------------

COLUMNS = ("format", "method", "compute dtype", "outcome", "base bytes / weight param", "adapter params (KiB)",
           "weights held (MiB)", "saved for backward (MiB)", "median step (ms)", "fastest step (ms)", "step / QOFT",
           "dL/dx rel. error")


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


def row_cells(label: str, run: Run, qoft: Optional[Run], params: int) -> list[str]:
    timed = bool(run.seconds)
    median = statistics.median(run.seconds) if timed else None
    qoft_median = statistics.median(qoft.seconds) if qoft is not None and qoft.seconds else None
    measured = run.model is not None and not run.outcome.startswith("failed:")
    return [
        label, run.method, _dtype_name(run.dtype), run.outcome,
        f"{run.base_bytes / params:.3f}" if measured else "–",
        f"{run.adapter_bytes / 1024:.1f}" if measured else "–",
        f"{(run.base_bytes + run.adapter_bytes) / 2**20:.3f}" if measured else "–",
        f"{run.saved_bytes / 2**20:.3f}" if measured else "–",
        f"{1000 * median:.1f}" if timed else "–",
        f"{1000 * min(run.seconds):.1f}" if timed else "–",
        f"{median / qoft_median:.2f}" if timed and qoft_median else "–",
        f"{run.grad_error:.2e}" if run.grad_error is not None else "–",
    ]


def print_ratios(results: dict[str, tuple[list[Run], Optional[str]]]) -> None:
    """Weights held, saved bytes and step time of each other method over QOFT's, per format."""
    print("\n" + markdown_row(["format", *(f"{m} / QOFT: held, saved, step" for m in METHODS[1:])]))
    print(markdown_row(["---"] + ["---:"] * (len(METHODS) - 1)))
    for fmt, (runs, _) in results.items():
        by_method = {run.method: run for run in runs}
        qoft = by_method.get("QOFT")
        if qoft is None or not qoft.seconds:
            continue
        cells = []
        for method in METHODS[1:]:
            run = by_method[method]
            if not run.seconds:
                cells.append("–")
                continue
            held = (run.base_bytes + run.adapter_bytes) / (qoft.base_bytes + qoft.adapter_bytes)
            saved = run.saved_bytes / qoft.saved_bytes if qoft.saved_bytes else float("nan")
            step = statistics.median(run.seconds) / statistics.median(qoft.seconds)
            cells.append(f"{held:.2f}, {saved:.2f}, {step:.2f}")
        print(markdown_row([BENCH_FORMATS[fmt][0], *cells]))


def print_environment(args) -> None:
    def installed(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    print(f"date: {datetime.date.today().isoformat()}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, CPU only")
    print("versions: " + ", ".join(f"{dist} {installed(dist)}" for dist in VERSIONS))
    print(f"command: python {' '.join(sys.argv)}")
    print(f"model: 2 Linear layers {args.width} -> {args.width} with bias, {args.tokens} tokens; QOFT block "
          f"{BLOCK_SIZE} ({NEUMANN_TERMS} Neumann terms), PEFT OFT block {BLOCK_SIZE} (Cayley-Neumann, "
          f"{NEUMANN_TERMS} terms), LoRA r{LORA_RANK} alpha {2 * LORA_RANK}; AdamW; {args.steps} timed steps per "
          "method, interleaved\n")


def parse_args(argv: Optional[list[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--width", type=int, help="layer width d (default 1024; 64 with --quick)")
    parser.add_argument("--tokens", type=int, help="tokens per batch (default 512; 32 with --quick)")
    parser.add_argument("--steps", type=int, help="timed AdamW steps per method (default 10; 2 with --quick)")
    parser.add_argument("--formats", nargs="+", choices=list(BENCH_FORMATS), default=list(BENCH_FORMATS),
                        help="formats to run (default all)")
    parser.add_argument("--quick", action="store_true", help="smoke run: width 64, 32 tokens, 2 steps")
    args = parser.parse_args(argv)
    args.width = args.width or (64 if args.quick else 1024)
    args.tokens = args.tokens or (32 if args.quick else 512)
    args.steps = args.steps or (2 if args.quick else 10)
    if args.width % 32:
        parser.error("--width must be a multiple of 32 (the block and group sizes)")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    results: dict[str, tuple[list[Run], Optional[str]]] = {}
    for fmt, (label, package) in BENCH_FORMATS.items():
        if fmt not in args.formats:
            continue
        if package is not None and importlib.util.find_spec(package) is None:
            results[fmt] = [], f"not installed ({package})"
            continue
        format_started = time.perf_counter()
        results[fmt] = bench_format(fmt, args)
        print(f"  {label}: {time.perf_counter() - format_started:.0f} s", file=sys.stderr, flush=True)

    print()
    print_environment(args)
    params = 2 * args.width * args.width
    print(markdown_row(COLUMNS))
    print(markdown_row(["---"] * 4 + ["---:"] * (len(COLUMNS) - 4)))
    for fmt, (runs, why) in results.items():
        label = BENCH_FORMATS[fmt][0]
        if why is not None:
            print(markdown_row([label, "all", "–", why, *(["–"] * (len(COLUMNS) - 4))]))
            continue
        qoft = next((run for run in runs if run.method == "QOFT"), None)
        for run in runs:
            print(markdown_row(row_cells(label, run, qoft, params)))
    print_ratios(results)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
