"""Compile every Triton kernel of ``peft_quant.kernels`` to NVIDIA machine code on a machine without a GPU.

The interpreter (``TRITON_INTERPRET=1``), which runs the kernels in CI, executes them as numpy code and accepts what
the GPU compiler rejects (non-constexpr globals, loop-carried values changing type, ``tl.dot`` shapes), and it never
allocates shared memory. This script closes that gap without a GPU: a stand-in driver reports a CUDA target, each
launcher of the ``*_triton`` modules runs on CPU tensors over the cases below (every dtype and ``tl.constexpr`` branch
the launchers produce), and Triton's launch hook records the specialization each launch asks for instead of compiling
and launching it. Each recorded specialization is then compiled for each target architecture down to a cubin with
Triton's own compiler and bundled ``ptxas`` (Ampere/Ada, Hopper and consumer Blackwell), and checked against the
shared memory the smallest GPU of that architecture grants one block, and against :data:`SPILL_LIMIT` bytes of
register spills per thread (from ``ptxas -v``, which Triton runs with the same flags).

Usage: ``python tests/compile_kernels.py [--arch 80 90 120] [--jobs N] [--only NAME]``; exits 1 when a kernel fails to
compile, needs too much shared memory, spills more than the limit, or was never launched by any case. It must run
without ``TRITON_INTERPRET`` (under the interpreter ``triton.jit`` builds interpreter objects that cannot be
compiled); ``tests/test_kernels_compile.py`` runs it in a subprocess.
"""

from __future__ import annotations

import argparse
import inspect
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

# Shared memory one block may use, per target: the smallest GPU compiling to that target (sm_80 code also runs on
# sm_86/sm_89 consumer GPUs, which grant 99 KiB; an A100 grants 163 KiB; H100/H200 227 KiB; the RTX 50 series, sm_120,
# 99 KiB).
SHARED_LIMIT = {80: 99 * 1024, 90: 227 * 1024, 120: 99 * 1024}
# Register spill stores per thread a kernel may need. A few words are harmless; kilobytes mean the tile does not fit
# the register file and local-memory traffic would rival the kernel's real traffic (the tile choices in the launchers
# keep every kernel below this; see their docstrings).
SPILL_LIMIT = 256


@dataclass
class Specialization:
    """One launch's compile request: the kernel, its signature, constexprs, attributes and options."""

    kernel: Any  # triton JITFunction
    signature: dict[str, str]
    constants: dict
    attrs: dict
    options: dict[str, Any]

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def describe(self) -> str:
        names = self.kernel.arg_names
        consts = ",".join(f"{names[k[0]]}={v}" for k, v in sorted(self.constants.items()))
        dtypes = ",".join(sorted({t[1:] for t in self.signature.values() if t.startswith("*")}))
        return f"{self.name}[{dtypes}|{consts}|warps={self.options['num_warps']},stages={self.options['num_stages']}]"


class _StandInDriver:
    """Just enough of a Triton driver for launches to specialize against a CUDA target (nothing is launched)."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        return self.target


def record_launches(cases: list[Callable[[], None]], arch: int) -> list[Specialization]:
    """Run ``cases`` (calls into the launchers on CPU tensors) and return the distinct specializations launched."""
    from triton import knobs
    from triton.runtime import driver

    found: dict[tuple, Specialization] = {}

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled) -> bool:
        options = {name: compile[name] for name in ("num_warps", "num_ctas", "num_stages", "enable_fp_fusion")}
        found.setdefault((fn.jit_function.fn.__qualname__, str(key)), Specialization(
            fn.jit_function, compile["signature"], compile["constants"], compile["configs"][0], options))
        return True  # handled: Triton neither compiles nor launches

    driver.set_active(_StandInDriver(arch))
    knobs.runtime.jit_cache_hook = hook
    try:
        for case in cases:
            case()
    finally:
        knobs.runtime.jit_cache_hook = None
        driver.set_active(None)  # the real driver again, created when next asked for
    return list(found.values())


# ---- the cases: every launcher, dtype and constexpr branch, tile shapes in full ------------------------------------
# Axes that set tile shapes (and so shared memory and registers) are crossed in full; the others (branches inside a
# kernel) are covered: every value at least once, spread over the crossed cases.

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def cover(*axes: tuple) -> list[tuple]:
    """Combinations taking every value of every axis at least once: the ``i``-th takes value ``i mod len`` of each."""
    return [tuple(axis[i % len(axis)] for axis in axes) for i in range(max(map(len, axes)))]


def crossed(full: list[tuple], *axes: tuple) -> list[tuple]:
    """Each combination of ``full`` extended by one combination of :func:`cover` over ``axes``, in turn."""
    extra = cover(*axes)
    return [tuple(f) + extra[i % len(extra)] for i, f in enumerate(full)] + [
        tuple(full[i % len(full)]) + e for i, e in enumerate(extra) if i >= len(full)]


def qoft_cases() -> list[Callable[[], None]]:
    from peft_quant.kernels import qoft_triton as k
    from peft_quant.kernels.qoft import BUILD_MAX_BLOCK

    def case(b: int, dtype: torch.dtype, block_dtype: torch.dtype, grads: tuple[bool, bool]) -> Callable[[], None]:
        def run() -> None:
            blocks = torch.randn(4, b, b, dtype=block_dtype)
            if b <= BUILD_MAX_BLOCK:  # wider blocks are built by the reference
                packed = torch.randn(4, b * (b - 1) // 2, dtype=block_dtype)
                k.build(packed, b, 5)
                k.build_backward(packed, blocks, 5)
            x = torch.randn(300, 4 * b, dtype=dtype)
            k.rotate_forward(x, blocks)
            k.rotate_backward(x, blocks, x, *grads)
        return run

    # blocks of 8, 32, 64 (tiles of 16, 32, 64) × activation dtype; blocks in float32 or the activations' dtype
    shapes = [(b, dtype) for b in (8, 32, 64) for dtype in DTYPES]
    return [case(b, dtype, torch.float32 if same else dtype, grads) for b, dtype, same, grads in crossed(
        shapes, (True, False), ((True, True), (True, False), (False, True)))]


def quant_full_cases() -> list[Callable[[], None]]:
    from peft_quant.kernels import quant_full_triton as k
    from peft_quant.quant_full.int8_state import LionHyper

    out_f, in_f = 96, 1024
    codes = torch.zeros(out_f, in_f, dtype=torch.int8)
    hyper = LionHyper(lr=1e-4)
    outliers = {False: (torch.zeros(0, dtype=torch.int64), torch.zeros(0)),
                True: (torch.tensor([3, 700, 9000], dtype=torch.int64), torch.ones(3))}

    def scale(group_size: int | None, dtype: torch.dtype) -> torch.Tensor:
        """Weight scales; a model cast to bfloat16 casts its buffers too."""
        return torch.ones(out_f, 1 if group_size is None else in_f // group_size, dtype=dtype)

    def matmul(dtype: torch.dtype, tokens: int, transpose: bool, group_size: int | None, has_outliers: bool,
               scale_dtype: torch.dtype) -> Callable[[], None]:
        a = torch.randn(tokens, in_f if transpose else out_f, dtype=dtype)
        return lambda: k.int8_matmul(a, codes, scale(group_size, scale_dtype), *outliers[has_outliers], group_size,
                                     transpose)

    def lion(dtype: torch.dtype, block: int, stochastic: bool, group_size: int | None, has_outliers: bool,
             scale_dtype: torch.dtype) -> Callable[[], None]:
        g, x = torch.randn(300, out_f, dtype=dtype), torch.randn(300, in_f, dtype=dtype)
        momentum, absmax = torch.zeros(out_f, in_f, dtype=torch.int8), torch.zeros(out_f * in_f // block)
        return lambda: k.lion_step_from_activations_(g, x, codes, scale(group_size, scale_dtype),
                                                     *outliers[has_outliers], momentum, absmax, hyper, group_size,
                                                     block, stochastic, 0)

    # matmul tiles: dtype × rows (few tokens: a narrower tile) × orientation; Lion tiles: dtype × momentum block
    matmuls = [(d, t, tr) for d in DTYPES for t in (8, 300) for tr in (True, False)]
    lions = [(d, block) for d in DTYPES for block in (64, 128, k.MAX_BLOCK)]
    scale_dtypes = (torch.float32, torch.float32, torch.bfloat16)
    return ([matmul(*c) for c in crossed(matmuls, (None, 128), (False, True), scale_dtypes)]
            + [lion(*c) for c in crossed(lions, (False, True), (None, 128), (False, True), scale_dtypes)])


def stash_cases() -> list[Callable[[], None]]:
    from peft_quant.kernels import stash_triton as k
    from peft_quant.stash.bfp import BLOCK_SIZES, MAX_BITS, MIN_BITS, PackedBlocks

    def case(bits: int, block: int, dtype: torch.dtype, scale: str, stochastic: bool) -> Callable[[], None]:
        def run() -> None:
            x = torch.randn(1000, dtype=dtype)
            mantissas, scales = k.pack(x, bits, block, scale, stochastic, 0)
            k.unpack(PackedBlocks(mantissas, scales, bits, block, x.shape, x.dtype))
        return run

    # every width × block size (the tile is blocks × block / 8 groups × 8); dtype, scale format, rounding covered
    shapes = [(bits, block) for bits in range(MIN_BITS, MAX_BITS + 1) for block in BLOCK_SIZES]
    return [case(*c) for c in crossed(shapes, DTYPES, ("bf16", "e8m0"), (False, True, True, False))]


def timestep_scale_cases() -> list[Callable[[], None]]:
    from peft_quant.int_quant import IntLinear
    from peft_quant.kernels import timestep_scale_triton as k

    table = torch.rand(3, 64) + 0.5
    index = torch.tensor([0, 2])
    layouts = {  # channels last (Linear), Conv2d NCHW, Conv2d channels_last
        "linear": (-1, lambda dtype: torch.randn(2, 50, 64, dtype=dtype)),
        "nchw": (1, lambda dtype: torch.randn(2, 64, 9, 9, dtype=dtype)),
        "nhwc": (1, lambda dtype: torch.randn(2, 64, 9, 9, dtype=dtype).contiguous(
            memory_format=torch.channels_last)),
    }

    def scale(layout: str, dtype: torch.dtype, per_sample: bool, has_bias: bool, grads: tuple[bool, bool],
              table_dtype: torch.dtype) -> Callable[[], None]:
        channel_dim, make = layouts[layout]
        x, bias = make(dtype), torch.randn(64, dtype=dtype) if has_bias else None
        experts = (index, None) if per_sample else (index[:1], 1)
        scales = table.to(table_dtype)  # a model cast to bfloat16 casts its scale tables too
        return lambda: (k.scale_forward(x, scales, experts, channel_dim, bias),
                        k.scale_backward(x, x, scales, experts, channel_dim, bias, *grads))

    def linear(bits: int, dtype: torch.dtype, tokens: int, s_in: bool, s_out: bool, has_bias: bool,
               store_z: bool, table_dtype: torch.dtype) -> Callable[[], None]:
        layer = IntLinear(torch.nn.Linear(64, 96), bits)
        x = torch.randn(2, tokens // 2, 64, dtype=dtype)
        t_in = table.to(table_dtype) if s_in else None
        t_out = (torch.rand(3, 96) + 0.5).to(table_dtype) if s_out else None
        bias = torch.randn(96, dtype=dtype) if has_bias else None
        return lambda: k.int_linear_forward(x, layer, bias, t_in, t_out, (index, None), store_z=store_z)

    # scaling tiles: layout × dtype; linear tiles: bits × dtype × rows (few tokens: a narrower tile)
    scales = [(layout, dtype) for layout in layouts for dtype in DTYPES]
    linears = [(bits, dtype, tokens) for bits in (4, 8) for dtype in DTYPES for tokens in (8, 200)]
    table_dtypes = (torch.float32, torch.float32, torch.bfloat16)
    return ([scale(*c) for c in crossed(scales, (True, False), (False, True, True),
                                        ((True, True), (True, False), (False, True)), table_dtypes)]
            + [linear(*c) for c in crossed(linears, (False, True), (True, False, True), (False, True, True),
                                           (False, True), table_dtypes)])


CASES = (qoft_cases, quant_full_cases, stash_cases, timestep_scale_cases)


def kernel_modules() -> list[Any]:
    from peft_quant.kernels import qoft_triton, quant_full_triton, stash_triton, timestep_scale_triton

    return [qoft_triton, quant_full_triton, stash_triton, timestep_scale_triton]


def all_kernels() -> set[str]:
    """Names of the launchable kernels (``@triton.jit`` functions named ``*_kernel``) in the kernel modules."""
    from triton.runtime.jit import JITFunction

    return {name for module in kernel_modules() for name, obj in inspect.getmembers(module)
            if isinstance(obj, JITFunction) and name.endswith("_kernel")}


# ---- compiling ---------------------------------------------------------------------------------------------------

_RECORDED: list[Specialization] = []  # inherited by forked workers


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers per thread, spill bytes stored) that ``ptxas -v`` reports for ``ptx``."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        log = subprocess.run([get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",  # Triton's flags
                              f"--gpu-name={sm_arch_from_capability(arch)}", source,
                              "-o", os.path.join(folder, "kernel.cubin")], capture_output=True, text=True,
                             check=True).stderr
    registers = max((int(n) for n in re.findall(r"Used (\d+) registers", log)), default=0)
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", log))
    return registers, spills


def _compile(job: tuple[int, int]) -> tuple[int, int, str, int, int, int, float]:
    """Compile recorded specialization ``job[0]`` for architecture ``job[1]``: (index, arch, error, shared bytes,
    registers, spill bytes, seconds)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    index, arch = job
    spec = _RECORDED[index]
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(spec.kernel, spec.signature, spec.constants, spec.attrs),
                                  target=GPUTarget("cuda", arch, 32), options=spec.options)
        registers, spills = _ptxas_usage(compiled.asm["ptx"], arch)
    except Exception as error:  # noqa: BLE001 - reported per kernel; the script fails at the end
        return index, arch, f"{type(error).__name__}: {error}", 0, 0, 0, time.perf_counter() - start
    return index, arch, "", compiled.metadata.shared, registers, spills, time.perf_counter() - start


def _summary(error: str) -> str:
    """The first line of an error and, for Triton's multi-line compilation errors, the message on its last."""
    lines = [line for line in error.splitlines() if line.strip()]
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1].strip()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=sorted(SHARED_LIMIT), choices=sorted(SHARED_LIMIT),
                        help="compute capabilities to compile for (80: Ampere/Ada, 90: Hopper, 120: RTX 50)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compilations")
    parser.add_argument("--only", default="", help="compile only kernels whose name contains this")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("compile_kernels.py compiles real kernels: run it without TRITON_INTERPRET.")

    start = time.perf_counter()
    _RECORDED.extend(record_launches([case for make in CASES for case in make()], max(args.arch)))
    missing = all_kernels() - {spec.name for spec in _RECORDED}
    _RECORDED[:] = [spec for spec in _RECORDED if args.only in spec.name]
    print(f"{len(_RECORDED)} specializations recorded in {time.perf_counter() - start:.1f} s")

    jobs = [(i, arch) for i in range(len(_RECORDED)) for arch in args.arch]
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        results = sorted(pool.imap_unordered(_compile, jobs))
    failures = 0
    print(f"{'arch':>4} {'shared':>7} {'regs':>4} {'spill':>5} {'s':>5}  kernel")
    for index, arch, error, shared, registers, spills, seconds in results:
        spec = _RECORDED[index]
        if not error and shared > SHARED_LIMIT[arch]:
            error = f"needs {shared} bytes of shared memory; sm_{arch} GPUs may grant {SHARED_LIMIT[arch]}"
        if not error and spills > SPILL_LIMIT:
            error = (f"spills {spills} bytes of registers per thread (limit {SPILL_LIMIT}): use smaller tiles or "
                     "more warps")
        failures += bool(error)
        print(f"{arch:>4} {shared:>7} {registers:>4} {spills:>5} {seconds:>5.1f}  {spec.describe()}"
              + (f"\n      FAILED: {_summary(error)}" if error else ""))
    for name in sorted(missing):
        print(f"FAILED: {name} was launched by no case; add one to tests/compile_kernels.py")
    print(f"{len(results) - failures}/{len(results)} compilations passed, {len(missing)} kernels missed, "
          f"{time.perf_counter() - start:.0f} s")
    return 1 if failures or missing else 0


if __name__ == "__main__":
    sys.exit(main())
