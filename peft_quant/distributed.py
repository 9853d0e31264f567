"""Data parallelism for updates that run inside backward (QuantFull's int8 Lion step).

DDP averages gradients after backward produced them; an update applied inside backward runs before that, so each
rank would step its own copy with its own gradient and the ranks would silently train different models. The
update therefore averages the gradient itself, over the data-parallel group, right before applying it
(:func:`average_gradient_`). FSDP2 shards parameters into DTensors and gathers them only around each forward and
backward, which the int8 state (buffers, updated in place) does not follow: :func:`refuse_sharded` names DDP
instead.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

SUPPORTED_ENGINES = (
    "QuantFull supports data parallelism through DDP (torch.nn.parallel.DistributedDataParallel; the default of "
    "`torchrun`/`accelerate launch` with transformers.Trainer), which keeps a full int8 copy on every rank"
)


def data_parallel_group(group: Optional[object] = None) -> Optional[object]:
    """The process group to average gradients over: ``group`` if given, else the default group; ``None`` when there
    is nothing to average (``torch.distributed`` unavailable or not initialized, or a group of one process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    group = group if group is not None else torch.distributed.group.WORLD
    return group if torch.distributed.get_world_size(group) > 1 else None


def average_gradient_(grad: torch.Tensor, group: Optional[object]) -> torch.Tensor:
    """``grad`` replaced in place by its mean over ``group`` (a sum all-reduce divided by the group size, as DDP
    averages; gloo has no average op). Every rank of ``group`` must call it for the same tensor shape in the same
    order, which holds when every rank runs the same model on the same number of micro-batches."""
    if group is not None:
        torch.distributed.all_reduce(grad, group=group)
        grad.div_(torch.distributed.get_world_size(group))
    return grad


def refuse_sharded(model: nn.Module, method: str) -> None:
    """Raise when ``model`` is (or contains) an FSDP module (FSDP2 or FSDP1) or holds DTensor parameters:
    ``method``'s in-place int8 state would be neither sharded nor averaged, and its optimizer would hold shards of
    its anchors."""
    if not torch.distributed.is_available():  # a torch build without distributed support shards nothing
        return
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    engines = (FSDPModule, FullyShardedDataParallel)
    sharded = [name for name, module in model.named_modules() if isinstance(module, engines)]
    sharded += [name for name, param in model.named_parameters() if isinstance(param, DTensor)]
    if sharded:
        raise ValueError(
            f"{method} cannot train a model sharded by FSDP (fully_shard) or holding DTensor parameters (first: "
            f"{sharded[0] or 'the root module'!r}): its int8 weights are buffers updated in place inside backward, "
            "which FSDP neither shards (no memory saved) nor averages across ranks, and FSDP swaps the parameters "
            f"its optimizer state is keyed by. {SUPPORTED_ENGINES}. Fix: wrap the model with DistributedDataParallel "
            "instead of fully_shard (Trainer/accelerate: drop the fsdp settings), and create the optimizer on the "
            "unsharded model.",
        )
