"""Row sharding of QuantFull layers over data-parallel ranks, for training under FSDP2 (``fully_shard``).

A sharded layer keeps rows ``[r·n/W, (r+1)·n/W)`` of its int8 weight on rank ``r`` of ``W``: the int8 codes, the
scales of those rows and the float outliers that lie in them (indices counted from the shard's first row); the
optimizer's int8 momentum follows the codes, so it is sharded too. Forward and backward all-gather the int8 state
into the whole int8 weight for the matmul (one byte per weight, the scales and the outliers, never a float weight),
and drop it again. The weight gradient each rank computes from its part of the batch is reduce-scattered by rows
(averaged, as FSDP averages), and each rank applies Lion to its own rows; stochastic rounding draws the whole
layer's noise from the shared seed and keeps its rows' part, so a sharded step rounds exactly as one process does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist

from .int8_state import dequantize_blockwise, quantize_blockwise

if TYPE_CHECKING:
    from .layer import QuantFullLayer

Int8Weight = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Optional[int]]


@dataclass
class RowShard:
    """Where a sharded layer's rows lie: this process is ``rank`` of ``world`` in ``group`` and holds ``rows`` of
    the weight's ``total_rows`` rows, from ``rank · rows`` on; ``outlier_counts[r]`` outliers lie in rank ``r``'s
    rows (fixed: outliers keep their positions while training)."""

    group: object
    rank: int
    world: int
    rows: int
    total_rows: int
    in_features: int
    outlier_counts: tuple[int, ...]

    @property
    def first_row(self) -> int:
        return self.rank * self.rows


def gather_rows(local: torch.Tensor, shard: RowShard) -> torch.Tensor:
    """The whole tensor from every rank's equal row shard (``all_gather`` along dim 0)."""
    whole = local.new_empty((shard.world * local.shape[0], *local.shape[1:]))
    dist.all_gather_single(whole, local.contiguous(), group=shard.group)
    return whole


def reduce_scatter_rows(grad: torch.Tensor, shard: RowShard) -> torch.Tensor:
    """This rank's rows of the mean of ``grad`` (each rank's whole weight gradient) over the group: a sum
    reduce-scatter divided by the world size, as FSDP averages gradients (gloo has no average op)."""
    local = grad.new_empty((shard.rows, *grad.shape[1:]))
    dist.reduce_scatter_single(local, grad.contiguous(), group=shard.group)
    return local.div_(shard.world)


def all_ranks_sum(value: torch.Tensor, shard: RowShard) -> torch.Tensor:
    """``value`` summed over the group (in place; one small all-reduce)."""
    dist.all_reduce(value, group=shard.group)
    return value


def _gather_outliers(index: torch.Tensor, value: torch.Tensor, shard: RowShard) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's outliers, with indices into the whole weight: each rank pads its own to the largest count, one
    all-gather each for the indices and the values, and the padding is dropped again."""
    most = max(shard.outlier_counts)
    if most == 0:
        return index, value
    padded_index = torch.nn.functional.pad(index, (0, most - index.numel()))
    padded_value = torch.nn.functional.pad(value, (0, most - value.numel()))
    all_index = gather_rows(padded_index, shard).view(shard.world, most)
    all_value = gather_rows(padded_value, shard).view(shard.world, most)
    offsets = torch.arange(shard.world, device=index.device, dtype=index.dtype) * (shard.rows * shard.in_features)
    all_index = all_index + offsets[:, None]
    counts = torch.tensor(shard.outlier_counts, device=index.device)
    keep = torch.arange(most, device=index.device)[None, :] < counts[:, None]
    return all_index[keep], all_value[keep]


def gather_int8_weight(layer: "QuantFullLayer") -> Int8Weight:
    """The whole int8 weight ``(codes, scale, outlier_index, outlier_value, group_size)`` of a sharded layer, from
    every rank's rows (a collective: every rank of the group must call it, in the same order)."""
    shard = layer.qf_shard
    codes, scale, index, value, group_size = layer.int8_weight()
    index, value = _gather_outliers(index, value, shard)
    return gather_rows(codes, shard), gather_rows(scale, shard), index, value, group_size


def shard_layer_(layer: "QuantFullLayer", group: object) -> None:
    """Keep only this rank's rows of ``layer``'s int8 state. The whole state is first broadcast from the group's
    first rank, so every rank shards the same weight (as DDP synchronizes at wrap time)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    name = layer.adapter
    codes, scale, index, value, _ = layer.int8_weight()
    for tensor in (codes, scale, index, value):
        dist.broadcast(tensor, group_src=0, group=group)
    rows = layer.out_features // world
    width = layer.in_features
    owner = torch.div(index, rows * width, rounding_mode="floor")
    counts = tuple(int(c) for c in torch.bincount(owner.long(), minlength=world)) if index.numel() else (0,) * world
    first = rank * rows
    mine = owner == rank
    layer.qf_codes[name] = codes[first:first + rows].clone()
    layer.qf_scale[name] = scale[first:first + rows].clone()
    layer.qf_outlier_index[name] = index[mine] - first * width
    layer.qf_outlier_value[name] = value[mine].clone()
    layer.qf_shard = RowShard(group, rank, world, rows, layer.out_features, width, counts)


def unshard_layer_(layer: "QuantFullLayer", momentum: Optional[dict], block_size: int) -> None:
    """Put the whole int8 state back on every rank (a collective), and with ``momentum`` (the layer's optimizer
    state) the whole int8 momentum: concatenated as it is when each shard's momentum fills whole blocks, else
    dequantized, gathered and quantized again in the whole layer's blocks."""
    shard = layer.qf_shard
    name = layer.adapter
    codes, scale, index, value, _ = gather_int8_weight(layer)
    if momentum and "momentum_codes" in momentum:
        local_codes, local_absmax = momentum["momentum_codes"], momentum["momentum_absmax"]
        if local_codes.numel() % block_size == 0:
            momentum["momentum_codes"] = gather_rows(local_codes, shard)
            momentum["momentum_absmax"] = gather_rows(local_absmax, shard)
        else:
            local = dequantize_blockwise(local_codes, local_absmax, block_size, local_codes.shape)
            momentum["momentum_codes"], momentum["momentum_absmax"] = quantize_blockwise(
                gather_rows(local, shard), block_size)
        if "grad_accum" in momentum:
            momentum["grad_accum"] = gather_rows(momentum["grad_accum"], shard)
    layer.qf_codes[name], layer.qf_scale[name] = codes, scale
    layer.qf_outlier_index[name], layer.qf_outlier_value[name] = index, value
    layer.qf_shard = None
