"""Benchmark: peft-quant's Triton kernels against their PyTorch references and the anchors they replace, on a GPU.

Ops (cases in ``bench/kernel_cases/``): QOFT's Cayley-Neumann builder and block rotation (anchor: PEFT's OFT),
TimestepScale's per-sample expert scaling and int4/int8 dequantize-matmul (anchor: bitsandbytes dequantize +
matmul), QuantFull's int8 dequantize-matmul and fused backward Lion update (anchor: bitsandbytes ``Lion8bit``),
StashQuant's block-floating-point pack/unpack (anchor: a plain torch per-block quantize); then whole training steps
of a 4-bit model: QOFT vs PEFT OFT vs PEFT LoRA.

Timing: ``triton.testing.do_bench`` (median and 20/80% quantiles, ms). For memory-bound ops the achieved bandwidth
(minimum bytes moved / time) is shown as a fraction of the device's measured copy bandwidth (goal ≥ 70%).

Without a CUDA device there is nothing to time: the script says so and exits 0 (the kernels' correctness is tested
on CPU under Triton's interpreter by ``make test``). ``--smoke`` runs every case once at tiny shapes instead, on CPU
under Triton's interpreter when there is no GPU, and checks that ours, the reference and the anchor return results
of the same shapes and dtypes: it tests the benchmark code, so a GPU session's minutes are not spent on its bugs
(``tests/test_bench_kernels.py`` runs it in CI). It times nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import platform
import sys
from datetime import date

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

OPS = ("qoft", "timestep_scale", "quant_full", "stash")


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(headers) + " |")
    print("| " + " | ".join(["---"] + ["---:"] * (len(headers) - 1)) + " |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def run_cases(cases, copy_gbps: float) -> list[list[str]]:
    from kernel_cases.common import time_ms

    rows = []
    for case in cases:
        timed = {"ours": time_ms(case.ours), "reference": time_ms(case.reference)}
        if case.anchor is not None:
            timed["anchor"] = time_ms(case.anchor)
        ours = timed["ours"][0]
        for impl, (median, low, high) in timed.items():
            name = case.anchor_name if impl == "anchor" and case.anchor_name else impl
            if case.bytes_moved:
                gbps = case.bytes_moved / (median * 1e-3) / 1e9
                bandwidth = f"{gbps:.0f} ({gbps / copy_gbps:.0%})"
            else:
                bandwidth = "–"
            rows.append([case.op, case.shape, name, f"{median:.3f}", f"{low:.3f}–{high:.3f}", bandwidth,
                         f"{median / ours:.2f}×", case.notes if impl == "ours" else ""])
        torch.cuda.empty_cache()
    return rows


def _signature(result: object) -> object:
    """Shapes and dtypes of what a case's callable returned (tensors inside tuples and lists too)."""
    if isinstance(result, torch.Tensor):
        return tuple(result.shape), result.dtype
    if isinstance(result, (tuple, list)):
        return [_signature(item) for item in result]
    if dataclasses.is_dataclass(result):
        return {field.name: _signature(getattr(result, field.name)) for field in dataclasses.fields(result)}
    return type(result).__name__


def smoke(ops: list[str], training_steps: bool) -> None:
    """Run every case's callables once at the smoke size and check that they agree in shapes and dtypes."""
    from kernel_cases.common import DEVICE

    os.environ.setdefault("PEFT_QUANT_KERNELS", "triton")  # the layers' kernels too (the interpreter on CPU)
    cases = [case for op in ops for case in importlib.import_module(f"kernel_cases.{op}").cases("smoke")]
    if training_steps and "qoft" in ops:
        cases += importlib.import_module("kernel_cases.qoft").training_step_cases("smoke")
    for case in cases:
        results = {"ours": case.ours(), "reference": case.reference()}
        if case.anchor is not None:
            results["anchor"] = case.anchor()
        ours = _signature(results["ours"])
        if _signature(results["reference"]) != ours:
            raise SystemExit(f"{case.op} {case.shape}: ours returns {ours}, the reference "
                             f"{_signature(results['reference'])}")
        print(f"ok  {case.op:40} {case.shape:40} {', '.join(results)}")
    print(f"bench/triton_kernels.py --smoke: {len(cases)} cases ran on {DEVICE}; nothing was timed.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes")
    parser.add_argument("--smoke", action="store_true",
                        help="run every case once at tiny shapes (CPU: Triton's interpreter), time nothing")
    parser.add_argument("--ops", nargs="*", default=list(OPS), choices=OPS, help="which ops to time")
    parser.add_argument("--no-training-steps", action="store_true", help="skip the whole-training-step comparison")
    args = parser.parse_args()
    if args.smoke:
        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
        smoke(args.ops, not args.no_training_steps)
        return
    if not torch.cuda.is_available():
        print("bench/triton_kernels.py: no CUDA device here, so no kernel is timed (bench/RESULTS.md: not yet timed). "
              "Correctness is tested on CPU under TRITON_INTERPRET=1 by `make test`.")
        return
    import triton

    from kernel_cases.common import copy_bandwidth_gbps

    os.environ.setdefault("PEFT_QUANT_KERNELS", "auto")
    copy_gbps = copy_bandwidth_gbps()
    print(f"date {date.today()}, {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}, python {platform.python_version()}; measured copy bandwidth {copy_gbps:.0f} GB/s\n")
    headers = ["op", "shape", "impl", "median ms", "20–80% ms", "GB/s (of copy)", "time / ours", "notes"]
    size = "quick" if args.quick else "full"
    rows = []
    for op in args.ops:
        module = importlib.import_module(f"kernel_cases.{op}")
        rows += run_cases(module.cases(size), copy_gbps)
    print_table(headers, rows)
    if not args.no_training_steps and "qoft" in args.ops:
        module = importlib.import_module("kernel_cases.qoft")
        print("\nWhole training step of a 4-bit model (forward + backward + optimizer step):\n")
        print_table(headers, run_cases(module.training_step_cases(size), copy_gbps))


if __name__ == "__main__":
    main()
