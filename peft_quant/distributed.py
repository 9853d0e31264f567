"""Data parallelism for updates that run inside backward (QuantFull's int8 Lion step), and FSDP2 over bitsandbytes
4-bit bases.

DDP averages gradients after backward produced them; an update applied inside backward runs before that, so each
rank would step its own copy with its own gradient and the ranks would silently train different models. The
update therefore averages the gradient itself, over the data-parallel group, right before applying it
(:func:`average_gradient_`). FSDP2 shards parameters into DTensors and gathers them only around each forward and
backward, which QuantFull's int8 state (buffers, updated in place inside backward) does not follow: under FSDP2 it is
sharded by QuantFull itself, by rows (:func:`shard_quant_full`, called before ``fully_shard``), while ``fully_shard``
shards the float trainables; :func:`check_engines` refuses the combinations that would train wrongly or save nothing.
FSDP2 also drops the ``quant_state`` of bitsandbytes 4-bit weights it shards: :func:`fsdp_ignored_params` lists them
(and QuantFull's anchors) for ``fully_shard(..., ignored_params=...)``, and :func:`check_4bit_base` refuses a layer
that lost it.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import nn

SUPPORTED_ENGINES = (
    "QuantFull supports data parallelism through DDP (torch.nn.parallel.DistributedDataParallel; the default of "
    "`torchrun`/`accelerate launch` with transformers.Trainer), which keeps a full int8 copy on every rank, and "
    "through FSDP2 with its int8 state sharded by rows: peft_quant.distributed.shard_quant_full(model), then "
    "fully_shard(model, ignored_params=peft_quant.distributed.fsdp_ignored_params(model))"
)
FSDP2_RECIPE = (
    "peft_quant.distributed.shard_quant_full(model) on every rank, then "
    "fully_shard(model, ignored_params=peft_quant.distributed.fsdp_ignored_params(model)), then "
    "QuantFullOptimizer(model, ...), in a training loop of your own (transformers.Trainer under accelerate's FSDP "
    "wraps the model itself and cannot follow this order: train it with DDP instead)"
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


def whole_value(t: torch.Tensor) -> torch.Tensor:
    """``t``, or for a DTensor its whole value on every rank: a reduction of an FSDP2-sharded gradient (its norm,
    whether all of it is finite) is a partial result that each rank would otherwise read from its own shard alone,
    so the ranks could decide differently."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _quant_full_layers(model: nn.Module) -> list[nn.Module]:
    from .quant_full.layer import QuantFullLayer

    return [module for module in model.modules() if isinstance(module, QuantFullLayer)]


def check_engines(model: nn.Module, method: str) -> None:
    """Raise when ``model``'s data-parallel wrapping would make ``method`` (QuantFull) train wrongly: FSDP1, DTensor
    parameters without FSDP2, or FSDP2 where a QuantFull layer is not row-sharded (:func:`shard_quant_full`), where
    ``fully_shard`` took over its anchor (it swaps the parameter the optimizer state is keyed by), or with a mixed
    precision policy (not supported). DDP, FSDP2 with the recipe, and a single process pass."""
    if not torch.distributed.is_available():  # a torch build without distributed support shards nothing
        return
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel, MixedPrecisionPolicy
    from torch.distributed.tensor import DTensor

    fsdp1 = [name for name, module in model.named_modules() if isinstance(module, FullyShardedDataParallel)]
    if fsdp1:
        raise ValueError(
            f"{method} cannot train under FSDP1 (FullyShardedDataParallel, first: {fsdp1[0] or 'the root module'!r}): "
            "it flattens QuantFull's anchors, and its int8 buffers would be neither sharded nor averaged. "
            f"{SUPPORTED_ENGINES}. Fix: use DistributedDataParallel, or FSDP2: {FSDP2_RECIPE}."
        )
    fsdp2 = [module for module in model.modules() if isinstance(module, FSDPModule)]
    dtensors = [name for name, param in model.named_parameters() if isinstance(param, DTensor)]
    if dtensors and not fsdp2:
        raise ValueError(
            f"{method} cannot train a model holding DTensor parameters outside FSDP2 (first: {dtensors[0]!r}): its "
            f"in-backward update would neither average nor shard them. {SUPPORTED_ENGINES}. Fix: use "
            "DistributedDataParallel or FSDP2 on the unsharded model."
        )
    layers = _quant_full_layers(model)
    if not fsdp2:
        sharded = [layer.layer_name for layer in layers if layer.qf_shard is not None]
        if sharded:
            raise ValueError(
                f"QuantFull layer {sharded[0]!r} is row-sharded (shard_quant_full) but the model is not under FSDP2: "
                "DistributedDataParallel would overwrite every rank's rows with rank 0's at its start-up broadcast of "
                "buffers, and without a data-parallel engine the other parameters' gradients are never averaged. Fix: "
                f"{FSDP2_RECIPE}; or, for DDP, call unshard_quant_full(model, optimizer) (or skip shard_quant_full)."
            )
        return
    whole = [layer.layer_name for layer in layers if layer.qf_shard is None]
    if whole:
        raise ValueError(
            f"{method} found fully_shard (FSDP2) on this model but QuantFull layer {whole[0]!r} holds its whole int8 "
            "weight: FSDP2 does not shard buffers, so every rank would keep the whole int8 state and momentum (no "
            f"memory saved). Fix: {FSDP2_RECIPE} (shard_quant_full must come before fully_shard); or use "
            "DistributedDataParallel."
        )
    taken = [layer.layer_name for layer in layers if isinstance(layer.qf_anchor[layer.adapter], DTensor)]
    if taken:
        raise ValueError(
            f"fully_shard sharded the anchor of QuantFull layer {taken[0]!r}: {method}'s state is keyed by it, and "
            "FSDP2 swaps it for a gathered copy during forward and backward. Fix: leave the anchors out of FSDP2 with "
            "fully_shard(model, ignored_params=peft_quant.distributed.fsdp_ignored_params(model))."
        )
    for module in fsdp2:
        policy = getattr(module._get_fsdp_state(), "_mp_policy", MixedPrecisionPolicy())
        if policy != MixedPrecisionPolicy():
            raise ValueError(
                f"{method} under FSDP2 supports only the default MixedPrecisionPolicy(), got {policy}: QuantFull "
                "layers compute in their input's dtype and reduce their own float32 weight gradients, so a param or "
                "reduce dtype would apply to the float trainables only (not tested). Fix: "
                "fully_shard(..., mp_policy=MixedPrecisionPolicy()) and torch.autocast for lower-precision compute."
            )


def _refuse_state_dict_of_shard(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    module.refuse_row_shard("saving its state_dict (a checkpoint, save_pretrained)")


def shard_quant_full(model: nn.Module, process_group: Optional[object] = None) -> None:
    """Shard every QuantFull layer of ``model`` by rows over ``process_group`` (default: the default group), for
    FSDP2. Call it on every rank, on the unsharded model, before ``fully_shard``::

        shard_quant_full(model)
        fully_shard(model, ignored_params=fsdp_ignored_params(model))
        optimizer = QuantFullOptimizer(model, lr=...)

    Rank ``r`` of ``W`` keeps rows ``[r·n/W, (r+1)·n/W)`` of each layer's int8 codes and scales and the float
    outliers in those rows; the optimizer's int8 momentum follows. The whole int8 state is first broadcast from the
    group's first rank, so every rank shards the same weights. Forward and backward all-gather the int8 weight, the
    weight gradient is reduce-scattered by rows (averaged) and each rank steps its own rows (see
    :mod:`peft_quant.quant_full.sharding`). ``fully_shard`` then shards the float trainables (biases, norms,
    ``modules_to_save``). Saving a sharded layer's ``state_dict`` is refused; :func:`unshard_quant_full` gathers the
    whole weights (and momentum) back first.

    Raises when ``torch.distributed`` is not initialized with more than one process in the group, when the model
    was already wrapped by ``fully_shard``, when a layer's output width is not a multiple of the group size, or when
    the optimizer already holds whole-layer momentum (shard before the first step)."""
    from torch.distributed.fsdp import FSDPModule

    group = data_parallel_group(process_group)
    if group is None:
        raise ValueError(
            "shard_quant_full needs torch.distributed initialized with more than one process in the group: there is "
            "nothing to shard over. Fix: launch with torchrun and call torch.distributed.init_process_group() first, "
            "or train without it in a single process."
        )
    if any(isinstance(module, FSDPModule) for module in model.modules()):
        raise ValueError(
            "shard_quant_full was called on a model already wrapped by fully_shard. Fix: call it on the unsharded "
            f"model first: {FSDP2_RECIPE}."
        )
    layers = _quant_full_layers(model)
    if not layers:
        raise ValueError(
            "shard_quant_full found no QuantFull layer in this model. Fix: wrap it first with "
            "peft.get_peft_model(model, peft_quant.QuantFullConfig(target_modules=...))."
        )
    world = torch.distributed.get_world_size(group)
    ragged = [(layer.layer_name, layer.out_features) for layer in layers if layer.out_features % world]
    if ragged:
        raise ValueError(
            f"shard_quant_full splits each QuantFull layer's rows evenly over the {world} ranks, but layer "
            f"{ragged[0][0]!r} has {ragged[0][1]} output rows. Fix: use a number of ranks dividing every targeted "
            "layer's output width, leave such layers out of target_modules, or use DistributedDataParallel."
        )
    layers = [layer for layer in layers if layer.qf_shard is None]  # not sharded by an earlier call
    for layer in layers:  # every check before any layer changes, so a refusal leaves the model as it was
        if layer.merged:
            raise ValueError(
                f"QuantFull layer {layer.layer_name!r} is merged. Fix: unmerge_adapter() before shard_quant_full."
            )
        optimizer = getattr(layer.updater, "optimizer", None)  # a QuantFullOptimizer created before this call
        if optimizer is not None and optimizer.state.get(layer.qf_anchor[layer.adapter]):
            raise ValueError(
                f"The QuantFullOptimizer of layer {layer.layer_name!r} already holds whole-layer momentum: sharding "
                "now would leave it unmatched to the layer's rows. Fix: shard before training starts, "
                f"{FSDP2_RECIPE}."
            )
    from .quant_full.sharding import shard_layer_

    for layer in layers:
        shard_layer_(layer, group)
        layer._shard_state_dict_hook = layer.register_state_dict_pre_hook(_refuse_state_dict_of_shard)


def unshard_quant_full(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Gather every row-sharded QuantFull layer of ``model`` back to its whole int8 weight on every rank, and with
    ``optimizer`` (its ``QuantFullOptimizer``) the whole int8 momentum, e.g. to save the adapter or merge. A
    collective: call it on every rank. Training on afterwards stays correct (each layer then averages its whole
    weight gradient, as under DDP) but keeps the whole int8 state on every rank again."""
    from .quant_full.sharding import unshard_layer_

    for layer in _quant_full_layers(model):
        if layer.qf_shard is None:
            continue
        state = optimizer.state.get(layer.qf_anchor[layer.adapter]) if optimizer is not None else None
        unshard_layer_(layer, state, getattr(optimizer, "momentum_block_size", 1))
        layer._shard_state_dict_hook.remove()


def _params4bit() -> Optional[type]:
    try:
        from bitsandbytes.nn import Params4bit
    except ImportError:  # no bitsandbytes: no 4-bit bitsandbytes weights to guard
        return None
    return Params4bit


def fsdp_ignored_params(model: nn.Module) -> set[nn.Parameter]:
    """The parameters ``fully_shard`` must leave alone in ``model``: bitsandbytes 4-bit weights (``Params4bit``) and
    QuantFull's one-element anchors (they never get a gradient; ``QuantFullOptimizer`` keys each layer's state by
    its anchor, which FSDP2 would swap for a DTensor shard and, around each forward and backward, a gathered copy).

    ``fully_shard`` by default replaces every parameter by a DTensor shard and, around each forward, by a plain
    gathered tensor; both drop the ``quant_state`` a ``Params4bit`` carries, and bitsandbytes then cannot
    dequantize the weight. Pass this set as ``fully_shard(module, ignored_params=fsdp_ignored_params(model))``: the
    frozen 4-bit weights stay whole on every rank (like peft-quant's own int4/int8 buffers) and the adapters are
    sharded and averaged as usual."""
    anchors = {param for layer in _quant_full_layers(model) for param in layer.qf_anchor.values()}
    params4bit = _params4bit()
    if params4bit is None:
        return anchors
    return anchors | {param for param in model.parameters() if isinstance(param, params4bit)}


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
