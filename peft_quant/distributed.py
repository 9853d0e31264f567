"""Data parallelism for updates that run inside backward (QuantFull's int8 Lion step), and FSDP2 over bitsandbytes
4-bit bases.

DDP averages gradients after backward produced them; an update applied inside backward runs before that, so each
rank would step its own copy with its own gradient and the ranks would silently train different models. The
update therefore averages the gradient itself, over the data-parallel group, right before applying it
(:func:`average_gradient_`). FSDP2 shards parameters into DTensors and gathers them only around each forward and
backward, which the int8 state (buffers, updated in place) does not follow: :func:`refuse_sharded` names DDP
instead. FSDP2 also drops the ``quant_state`` of bitsandbytes 4-bit weights it shards: :func:`fsdp_ignored_params`
lists them for ``fully_shard(..., ignored_params=...)``, and :func:`check_4bit_base` refuses a layer that lost it.
"""

from __future__ import annotations

import sys
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


def _params4bit() -> Optional[type]:
    try:
        from bitsandbytes.nn import Params4bit
    except ImportError:  # no bitsandbytes: no 4-bit bitsandbytes weights to guard
        return None
    return Params4bit


def fsdp_ignored_params(model: nn.Module) -> set[nn.Parameter]:
    """The parameters ``fully_shard`` must leave alone in ``model``: bitsandbytes 4-bit weights (``Params4bit``).

    ``fully_shard`` by default replaces every parameter by a DTensor shard and, around each forward, by a plain
    gathered tensor; both drop the ``quant_state`` a ``Params4bit`` carries, and bitsandbytes then cannot
    dequantize the weight. Pass this set as ``fully_shard(module, ignored_params=fsdp_ignored_params(model))``: the
    frozen 4-bit weights stay whole on every rank (like peft-quant's own int4/int8 buffers) and the adapters are
    sharded and averaged as usual."""
    params4bit = _params4bit()
    if params4bit is None:
        return set()
    return {param for param in model.parameters() if isinstance(param, params4bit)}


def check_4bit_base(base_layer: nn.Module, method: str) -> None:
    """Raise when ``base_layer`` is a bitsandbytes ``Linear4bit`` whose weight lost its ``quant_state`` (what
    ``fully_shard`` without ``ignored_params`` does), instead of bitsandbytes failing deep inside its matmul. Call
    it at the start of the adapter layer's forward."""
    bnb = sys.modules.get("bitsandbytes")  # never imported here: without it in memory, no such layer exists
    if bnb is None:
        return
    Linear4bit = bnb.nn.Linear4bit

    if not isinstance(base_layer, Linear4bit) or getattr(base_layer.weight, "quant_state", None) is not None:
        return
    if getattr(base_layer, "quant_state", None) is not None:  # bitsandbytes restores the weight's state from it
        return
    raise ValueError(
        f"{method} cannot run on this bitsandbytes 4-bit layer: its weight is a {type(base_layer.weight).__name__}, "
        "not a Params4bit carrying its quant_state, which is what FSDP2's fully_shard does to every parameter it "
        "shards. Fix: leave the 4-bit weights out of the sharding with "
        "fully_shard(module, ignored_params=peft_quant.distributed.fsdp_ignored_params(model)), or wrap the model "
        "with DistributedDataParallel instead.",
    )
