"""TimestepScale's ops: per-sample expert scaling of channels, and an int4/int8 linear layer with that scaling fused.

* :func:`scale_channels` — ``x ⊙ table[k(sample)]`` broadcast along the channel dimension (Linear: last; Conv2d: 1),
  or ``x ⊙ table[k] + b ⊙ (1 − table[k])`` on the output side, where the frozen bias must stay unscaled (this equals
  ``(x − b) ⊙ table[k] + b`` and, unlike it, gives back ``x`` bit for bit when the scales are one).
* :func:`int_linear` — ``s_out[k] ⊙ (W (s_in[k] ⊙ x)) + b`` for peft-quant's :class:`~peft_quant.int_quant.IntLinear`
  (``W = scale ⊙ (q − zero)``), each scale table optional: one kernel dequantizes the codes in registers, so no float
  copy of ``W`` and no scaled copy of ``x`` is made in the forward.

``experts`` is ``(index, single)`` as :meth:`~peft_quant.timestep_scale.routing.TimestepRouter.experts` returns it:
per-sample expert indices ``(batch,)``, and the expert all samples share (``None`` when they differ; with a single
expert the batch may be any size, since the router's index then holds that expert everywhere).

Each entry point runs the Triton kernel (:mod:`.timestep_scale_triton`) when :func:`.backend.use_triton` says so, and
the PyTorch reference below otherwise: the references are what ``TimestepScaleLayer`` and ``IntLinear`` computed
before the kernels existed, operation for operation, so the CPU results are bit-identical to them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from .backend import use_triton

if TYPE_CHECKING:
    from ..int_quant import IntLinear

Experts = tuple[torch.Tensor, Optional[int]]
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _routed(table: torch.Tensor, experts: Experts, channel_dim: int, dim: int) -> torch.Tensor:
    """The scales each sample uses, shaped to broadcast along ``channel_dim`` of a ``dim``-D tensor."""
    index, single = experts
    if single is not None:
        scales = table[single]  # (channels,)
        return scales.view(-1, 1, 1) if channel_dim == 1 else scales
    scales = table[index]  # (batch, channels)
    if channel_dim == 1:
        return scales.view(*scales.shape, *([1] * (dim - 2)))
    return scales.view(scales.shape[0], *([1] * (dim - 2)), scales.shape[1])


def scale_channels_reference(x: torch.Tensor, table: torch.Tensor, experts: Experts, channel_dim: int,
                             bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference of :func:`scale_channels`: index-gather, broadcast view, multiply (in ``x``'s dtype)."""
    scales = _routed(table, experts, channel_dim, x.dim()).to(x.dtype)
    if bias is None:
        return x * scales
    bias = (bias.view(-1, 1, 1) if channel_dim == 1 else bias).to(x.dtype)
    return x * scales + bias * (1 - scales)


def scale_channels(x: torch.Tensor, table: torch.Tensor, experts: Experts, channel_dim: int,
                   bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x ⊙ table[k]`` (or ``x ⊙ table[k] + bias ⊙ (1 − table[k])``) with ``k`` each sample's expert.

    ``table`` is ``(experts, C)``; ``channel_dim`` is ``-1`` (Linear: ``x`` ``(batch, ..., C)``) or ``1`` (Conv2d:
    ``x`` ``(batch, C, H, W)``, either memory format). Differentiable in ``x`` and ``table``; the Triton path gives
    the bias no gradient, so a bias that requires one takes the reference.
    """
    kernel = (
        use_triton(x, table)
        and x.dtype in KERNEL_DTYPES
        and (channel_dim == -1 or x.dim() == 4)
        and not (bias is not None and bias.requires_grad and torch.is_grad_enabled())
    )
    if not kernel:
        return scale_channels_reference(x, table, experts, channel_dim, bias)
    from . import timestep_scale_triton

    index, single = experts
    return timestep_scale_triton.ScaleChannels.apply(x, table, index, single, channel_dim, bias)


def int_linear_reference(x: torch.Tensor, layer: IntLinear, bias: Optional[torch.Tensor] = None,
                         table_in: Optional[torch.Tensor] = None, table_out: Optional[torch.Tensor] = None,
                         experts: Optional[Experts] = None) -> torch.Tensor:
    """Reference of :func:`int_linear`: scale the input, dequantize then ``F.linear``, scale the output, add the
    bias."""
    if table_in is not None:
        x = scale_channels_reference(x, table_in, experts, -1)
    out = F.linear(x, layer.dequantize(x.dtype))
    if table_out is not None:
        out = scale_channels_reference(out, table_out, experts, -1)
    return out if bias is None else out + bias.to(out.dtype)


def int_linear(x: torch.Tensor, layer: IntLinear, bias: Optional[torch.Tensor] = None,
               table_in: Optional[torch.Tensor] = None, table_out: Optional[torch.Tensor] = None,
               experts: Optional[Experts] = None) -> torch.Tensor:
    """``s_out[k] ⊙ (W (s_in[k] ⊙ x)) + bias`` for an :class:`~peft_quant.int_quant.IntLinear` ``layer``.

    ``x`` ``(batch, ..., in)`` → ``(batch, ..., out)`` in ``x``'s dtype. ``table_in`` ``(experts, in)``,
    ``table_out`` ``(experts, out)`` and ``bias`` ``(out,)`` are each optional (``experts`` is needed with a table).
    Differentiable in ``x`` and both tables; the Triton path's backward dequantizes the weight once and runs one
    matmul (the reference's decomposition), and gives the bias no gradient, so a bias that requires one takes the
    reference.
    """
    kernel = (
        use_triton(x, layer.qweight)
        and x.dtype in KERNEL_DTYPES
        and not (bias is not None and bias.requires_grad and torch.is_grad_enabled())
    )
    if not kernel:
        return int_linear_reference(x, layer, bias, table_in, table_out, experts)
    from . import timestep_scale_triton

    index, single = experts if experts is not None else (None, None)
    return timestep_scale_triton.IntLinearScaled.apply(x, table_in, table_out, index, single, layer, bias)
