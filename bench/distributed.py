"""Per-rank bytes of weights and optimizer state under DDP and FSDP2, for each method, against one process.

``PYTHONPATH=. python bench/distributed.py`` spawns two CPU ranks (gloo). For each method on the conformance MLP
(64 → 128 → 64; the cells of ``tests/distributed_worker.py``) it wraps the model in DDP or ``fully_shard``, takes
one training step and counts, on each rank, the bytes of every parameter and buffer it holds (an FSDP2 DTensor: its
local shard) and of every tensor of the optimizer state (likewise). One process, unwrapped, is the reference. Prints
a table: bytes per rank and the ratio to one process. QuantFull under FSDP2 runs with its int8 state sharded by
rows (``shard_quant_full`` before ``fully_shard``, the recipe of ``tests/distributed_worker.py``); a second table
gives the bytes of its int8 weight state and int8 momentum alone.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from tests.distributed_worker import CASES, _ddp, _fsdp, _optimizer, quant_full_state_bytes

WORLD = 2
METHODS = ("qoft", "timestep_scale", "quant_full", "stash_quant", "qoft_stash")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _nbytes(tensors) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors if torch.is_tensor(t))


def measure(name: str, engine: str) -> tuple[int, int, int]:
    """(weights and buffers, optimizer state, QuantFull's int8 weight state + momentum or 0) bytes this process
    holds after one step of case ``name``."""
    from peft import get_peft_model

    from tests.conformance_cases import build_base, make_config

    case, kind, _, overrides = CASES[name]
    torch.manual_seed(0)
    model = get_peft_model(build_base(case), make_config(case, **overrides))
    wrapped = {"ddp": _ddp, "fsdp": _fsdp, "single": lambda m: m}[engine](model)
    optimizer = _optimizer(model, kind, 1)  # after wrapping: FSDP2 replaces the parameters
    x = torch.randn(8 // (1 if engine == "single" else WORLD), 64)
    F.mse_loss(wrapped(x, timestep=torch.full((len(x),), 500.0)), torch.zeros_like(x)).backward()
    optimizer.step()
    weights = _nbytes(list(model.parameters()) + list(model.buffers()))
    state = _nbytes(value for entry in optimizer.state.values() for value in entry.values())
    return weights, state, quant_full_state_bytes(model, optimizer) if kind == "quant_full" else 0


def _rank(rank: int, port: int, queue) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        for engine in ("ddp", "fsdp"):
            for name in METHODS:
                queue.put((rank, engine, name, measure(name, engine)))
    finally:
        dist.destroy_process_group()


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_rank, args=(port, queue), nprocs=WORLD, join=True)
    results = {}
    while not queue.empty():
        rank, engine, name, numbers = queue.get()
        results[(rank, engine, name)] = numbers
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {WORLD} processes, gloo, CPU; bytes per rank (rank 0 / rank 1)")
    print("| method | one process: weights + optimizer state | engine | rank 0 | rank 1 | rank 0 / one process |")
    print("|---|---|---|---|---|---|")
    singles = {name: measure(name, "single") for name in METHODS}
    for name, single in singles.items():
        for engine in ("ddp", "fsdp"):
            r0, r1 = results[(0, engine, name)], results[(1, engine, name)]
            ratio = (r0[0] / single[0], r0[1] / single[1] if single[1] else float("nan"))
            print(f"| {name} | {single[0]:,} + {single[1]:,} | {engine} | {r0[0]:,} + {r0[1]:,} | "
                  f"{r1[0]:,} + {r1[1]:,} | {ratio[0]:.2f} weights, {ratio[1]:.2f} state |")
    print("\nQuantFull's int8 weight state (codes, scales, outliers) + int8 momentum, bytes per rank")
    print("| engine | one process | rank 0 | rank 1 | rank 0 / one process |")
    print("|---|---|---|---|---|")
    single = singles["quant_full"][2]
    for engine in ("ddp", "fsdp"):
        r0, r1 = results[(0, engine, "quant_full")][2], results[(1, engine, "quant_full")][2]
        print(f"| {engine} | {single:,} | {r0:,} | {r1:,} | {r0 / single:.3f} |")


if __name__ == "__main__":
    sys.exit(main())
