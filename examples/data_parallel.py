"""Data parallelism for the examples: what a script needs when ``torchrun`` or ``accelerate launch`` starts it once
per rank.

Not part of the installed package. The examples import it as ``data_parallel`` (Python puts a script's folder first
on ``sys.path``). Scripts trained by ``transformers.Trainer`` let the Trainer join the process group and wrap the
model in DistributedDataParallel; the scripts with their own loops call :func:`join_process_group` and
:func:`local_rows`. Every script reports :func:`ranks_report` of its trained adapter, so a run shows that all ranks
ended with the same weights.
"""

from __future__ import annotations

import hashlib
import os

import torch
import torch.distributed as dist


def launched_world_size() -> int:
    """How many processes ``torchrun``/``accelerate launch`` started (``WORLD_SIZE``); 1 for a plain ``python``."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def trainer_ddp_backend() -> str | None:
    """``TrainingArguments(ddp_backend=...)``: gloo for processes launched on CPUs, else None (the Trainer's choice:
    NCCL on GPUs). Never gloo for a single process: accelerate would then take the run for a distributed one and ask
    for a process group nobody started."""
    return "gloo" if launched_world_size() > 1 and not torch.cuda.is_available() else None


def join_process_group(device: torch.device) -> bool:
    """Join the process group the launcher describes in the environment (gloo on CPU, NCCL on CUDA).

    Returns True when this call created the group (the caller then destroys it at the end); False for a single
    process or a group that already exists."""
    if launched_world_size() == 1 or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_device(requested: str | None) -> torch.device:
    """``requested``, else this rank's GPU (``LOCAL_RANK``, set by the launcher) or the default GPU when CUDA is there,
    else the CPU."""
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        local_rank = os.environ.get("LOCAL_RANK")
        return torch.device("cuda", int(local_rank)) if local_rank is not None else torch.device("cuda")
    return torch.device("cpu")


def local_rows(global_batch: int) -> slice:
    """This rank's rows of a global batch: contiguous equal shares, rank 0 first.

    Every rank draws the whole global batch (data, noise, timesteps) from the same seeded generators and keeps its own
    share, so together the ranks train on exactly what one process trains on with the whole batch."""
    size, me = world_size(), rank()
    if global_batch % size:
        raise ValueError(f"A global batch of {global_batch} does not split evenly over {size} processes. Fix: make "
                         f"the batch size a multiple of {size}.")
    share = global_batch // size
    return slice(me * share, (me + 1) * share)


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """``value`` averaged over all ranks (the global batch's loss from each rank's share); itself alone."""
    if world_size() == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / world_size()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def state_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of ``tensors`` (e.g. an adapter's state dict), in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def ranks_report(tensors: dict[str, torch.Tensor]) -> dict:
    """For a script's summary: :func:`state_digest` of ``tensors`` (the trained adapter) on every rank, in rank order,
    and whether they agree. Every rank must call it; a single process gets ``{}`` (its summary stays as it was)."""
    if world_size() == 1:
        return {}
    everyone: list[str | None] = [None] * world_size()
    dist.all_gather_object(everyone, state_digest(tensors))
    # Wait (GIL released) until gloo's worker thread has also dropped that all-gather's tensors: a process group torn
    # down while the worker still needs the GIL for them deadlocks at exit (the destructor joins the worker thread
    # while holding the GIL), which left one rank hanging after a finished run.
    dist.barrier()
    return {"processes": world_size(), "adapter_sha256_per_rank": everyone,
            "ranks_identical": len(set(everyone)) == 1}
