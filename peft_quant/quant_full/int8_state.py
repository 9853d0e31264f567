"""QuantFull's int8 training state and its fused Lion step, in plain PyTorch (the reference for any kernel).

Weight: ``W ≈ scale · codes`` with symmetric int8 ``codes ∈ [-127, 127]`` and one float ``scale`` per output channel
and group of ``group_size`` inputs (``(out, groups)``), except the ``k`` largest-magnitude weights (the outliers),
which are kept exactly as float values at flat indices (their codes are 0). Lion's momentum: int8 codes with one
absmax per block of ``block_size`` consecutive values.

Lion (Chen et al. 2023), as QFT uses it: ``c = β1·m + (1−β1)·g``; ``w ← w − lr·(sign(c) + λ·w)``;
``m ← β2·m + (1−β2)·g``. The step is added to the codes in code units (``codes + Δw / scale``) and rounded to
int8 by round-to-nearest or stochastically (``floor(v)`` + 1 with probability ``v − floor(v)``), which is unbiased,
so updates far below one int8 step still move the weight in expectation; a zero step changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

QMAX = 127


def _grouped(t: torch.Tensor, group_size: Optional[int]) -> torch.Tensor:
    """``(out, in)`` → ``(out, groups, g)`` view (one group per row when ``group_size`` is None)."""
    out, width = t.shape
    g = width if group_size is None else group_size
    return t.reshape(out, width // g, g)


def quantize_weight(
    weight: torch.Tensor, group_size: Optional[int], outlier_fraction: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes int8 (out, in), scale fp32 (out, groups), outlier_index int32 (k,), outlier_value fp32 (k,))``."""
    w = weight.detach().to(torch.float32)
    k = num_outliers(w.numel(), outlier_fraction)
    index = torch.topk(w.reshape(-1).abs(), k).indices.sort().values if k else torch.zeros(0, dtype=torch.long)
    value = w.reshape(-1)[index].clone()
    inliers = w.clone()
    inliers.view(-1)[index] = 0.0
    scale = _grouped(inliers, group_size).abs().amax(dim=-1) / QMAX  # (out, groups)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = round_codes(inliers, scale, group_size, stochastic=False)
    index_dtype = torch.int32 if w.numel() < 2**31 else torch.int64  # 4 bytes per outlier where it suffices
    return codes, scale, index.to(device=w.device, dtype=index_dtype), value


def num_outliers(numel: int, fraction: float) -> int:
    return int(round(numel * fraction))


def round_to_int8(
    v: torch.Tensor,
    stochastic: bool,
    generator: Optional[torch.Generator] = None,
    rows: Optional[tuple[int, int]] = None,
) -> torch.Tensor:
    """Real-valued codes → int8 codes in [-127, 127], overwriting ``v``: to nearest, or stochastically (``floor(v)``
    plus one with probability ``v - floor(v)``; unbiased, and exact for integer ``v``).

    ``rows = (first, total)``: ``v`` holds rows ``first …`` of a tensor of ``total`` rows (a row shard); the noise is
    drawn for the whole tensor and this part kept, so every shard rounds exactly as the whole tensor would."""
    if stochastic:
        low = torch.floor(v)
        fraction = v.sub_(low)
        first, total = rows if rows is not None else (0, v.shape[0])
        noise = torch.rand((total, *v.shape[1:]), generator=generator, device=v.device, dtype=v.dtype)
        v = low.add_(noise[first:first + v.shape[0]] < fraction)
    else:
        v.round_()
    return v.clamp_(-QMAX, QMAX).to(torch.int8)


def round_codes(
    values: torch.Tensor,
    scale: torch.Tensor,
    group_size: Optional[int],
    stochastic: bool,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """``values / scale`` rounded (to nearest, or stochastically) and clamped to int8 codes."""
    moved = _grouped(values, group_size) / scale.unsqueeze(-1)  # (out, groups, g)
    return round_to_int8(moved, stochastic, generator).reshape(values.shape)


def dequantize_weight(
    codes: torch.Tensor,
    scale: torch.Tensor,
    outlier_index: torch.Tensor,
    outlier_value: torch.Tensor,
    group_size: Optional[int],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The float weight ``(out, in)``: ``scale · codes`` with the outliers put back, computed in float32 whatever
    dtype the scales and outliers were cast to (a model's ``.half()`` casts them; the int8 codes never are)."""
    w = (_grouped(codes.to(torch.float32), group_size) * scale.unsqueeze(-1).to(torch.float32)).reshape(codes.shape)
    if outlier_index.numel():
        w.view(-1)[outlier_index] = outlier_value.to(torch.float32)
    return w.to(dtype)


def quantize_blockwise(values: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened ``values`` → ``(int8 codes (numel,), absmax fp32 (blocks,))``, round-to-nearest per block."""
    flat = values.reshape(-1).to(torch.float32)
    padded = F.pad(flat, (0, (-flat.numel()) % block_size)).view(-1, block_size)  # (blocks, block_size)
    absmax = padded.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = torch.round(padded / safe[:, None] * QMAX).to(torch.int8).reshape(-1)[: flat.numel()]
    return codes, absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, block_size: int, shape: torch.Size) -> torch.Tensor:
    padded = F.pad(codes.to(torch.float32), (0, (-codes.numel()) % block_size)).view(-1, block_size)
    return (padded * (absmax[:, None] / QMAX)).reshape(-1)[: codes.numel()].reshape(shape)


@dataclass
class LionHyper:
    """One Lion step's hyperparameters."""

    lr: float
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.0


def lion_step_(
    codes: torch.Tensor,
    scale: torch.Tensor,
    outlier_index: torch.Tensor,
    outlier_value: torch.Tensor,
    momentum_codes: torch.Tensor,
    momentum_absmax: torch.Tensor,
    grad: torch.Tensor,
    hyper: LionHyper,
    group_size: Optional[int],
    block_size: int,
    stochastic: bool,
    generator: Optional[torch.Generator] = None,
    rows: Optional[tuple[int, int]] = None,
) -> None:
    """One Lion step on the int8 state, in place: weights (codes and outliers) and momentum.

    Besides the gradient, about four float tensors of the layer's size live at the peak of the call (momentum,
    step, rounding temporaries); nothing of any other layer. ``rows = (first, total)``: the state is a row shard
    (rows ``first …`` of ``total``) and stochastic rounding uses the whole weight's draws for those rows (one float
    tensor of the whole weight's size is drawn).
    """
    g = grad.to(torch.float32)
    m = dequantize_blockwise(momentum_codes, momentum_absmax, block_size, g.shape)
    update = (m * hyper.beta1).add_(g, alpha=1 - hyper.beta1).sign_()
    if hyper.weight_decay:
        w = dequantize_weight(codes, scale, outlier_index, outlier_value, group_size)
        update.add_(w.mul_(hyper.weight_decay))
        del w
    update.mul_(-hyper.lr)  # Lion's step, in weight units
    if outlier_index.numel():
        outlier_value.add_(update.view(-1)[outlier_index])
        update.view(-1)[outlier_index] = 0.0  # outlier positions keep code 0
    # the step in code units, added to the codes exactly: a zero step leaves every code as it is
    moved = _grouped(update, group_size).div_(scale.unsqueeze(-1)).add_(_grouped(codes, group_size))
    del update
    codes.copy_(round_to_int8(moved, stochastic, generator, rows).reshape(codes.shape))
    del moved
    m.mul_(hyper.beta2).add_(g, alpha=1 - hyper.beta2)
    new_codes, new_absmax = quantize_blockwise(m, block_size)
    momentum_codes.copy_(new_codes)
    momentum_absmax.copy_(new_absmax)
