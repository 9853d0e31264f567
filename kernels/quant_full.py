"""QuantFull's ops: the int8 dequantize-matmul and the fused weight-gradient + Lion step, each with its reference.

* :func:`int8_matmul`: ``a Wᵀ`` (forward) or ``a W`` (input gradient) for ``W`` held as int8 state. Reference:
  ``F.linear`` / ``@`` with the dequantized weight (what :class:`~peft_quant.quant_full.layer.QuantFullLayer` always
  did). Kernel: ``W`` dequantized tile by tile in registers, never materialised.
* :func:`lion_step_from_activations_`: one Lion step on the int8 state from the layer's output gradient and input.
  Reference: ``G = gradᵀ x`` in float32, then :func:`~peft_quant.quant_full.int8_state.lion_step_`. Kernel: each
  program computes one tile of ``G`` and applies the step to it, so ``G`` is never written to memory. Stochastic
  rounding draws from Triton's Philox keyed by ``seed`` and each element's flat index, not from torch's generator:
  the same in distribution and deterministic given the seed, not the same draws.
  :func:`fused_step_supported` says whether the kernel runs (momentum blocks must lie inside one row).

This module imports no Triton; :mod:`.quant_full_triton` is imported only when a kernel runs.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..quant_full.int8_state import LionHyper, dequantize_weight, lion_step_
from .backend import use_triton


def int8_matmul(
    a: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    outlier_index: torch.Tensor,
    outlier_value: torch.Tensor,
    group_size: Optional[int],
    *,
    transpose_weight: bool = True,
) -> torch.Tensor:
    """``a Wᵀ`` (``transpose_weight``, a Linear's forward) or ``a W`` (its input gradient), with
    ``W = dequantize_weight(...)`` of shape ``(out, in)``; ``a`` is ``(..., in)`` or ``(..., out)``; the result has
    ``a``'s dtype (under autocast: the autocast dtype, as ``F.linear`` gives)."""
    if use_triton(a, codes):
        from . import quant_full_triton

        if torch.is_autocast_enabled(a.device.type):
            a = a.to(torch.get_autocast_dtype(a.device.type))
        return quant_full_triton.int8_matmul(a, codes, scale, outlier_index, outlier_value, group_size,
                                             transpose_weight)
    weight = dequantize_weight(codes, scale, outlier_index, outlier_value, group_size, a.dtype)
    return F.linear(a, weight) if transpose_weight else a @ weight


def fused_step_supported(grad_output: torch.Tensor, x: torch.Tensor, codes: torch.Tensor, block_size: int) -> bool:
    """Whether :func:`lion_step_from_activations_` runs the fused kernel for these tensors (Triton selected, and
    ``block_size`` a power of two up to 1024 dividing ``in_features``); otherwise it runs the reference."""
    if not use_triton(grad_output, x, codes):
        return False
    from . import quant_full_triton

    return quant_full_triton.fits(codes.shape[1], block_size)


def lion_step_from_activations_(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    outlier_index: torch.Tensor,
    outlier_value: torch.Tensor,
    momentum_codes: torch.Tensor,
    momentum_absmax: torch.Tensor,
    hyper: LionHyper,
    group_size: Optional[int],
    block_size: int,
    stochastic: bool,
    seed: int = 0,
) -> None:
    """One Lion step on the int8 state (in place) for the weight gradient ``G = grad_outputᵀ x`` of a Linear.

    ``grad_output`` is ``(tokens, out)``, ``x`` is ``(tokens, in)``; the momentum holds ``out · in`` values in blocks
    of ``block_size``. ``seed`` seeds stochastic rounding. The caller checks that the inputs are finite: a non-finite
    ``G`` would be applied.
    """
    with torch.no_grad():
        if fused_step_supported(grad_output, x, codes, block_size):
            from . import quant_full_triton

            quant_full_triton.lion_step_from_activations_(
                grad_output, x, codes, scale, outlier_index, outlier_value, momentum_codes, momentum_absmax, hyper,
                group_size, block_size, stochastic, seed,
            )
            return
        grad_weight = grad_output.T.float() @ x.float()  # (out, in)
        generator = None
        if stochastic:
            generator = torch.Generator(device=grad_weight.device)
            generator.manual_seed(seed)
        lion_step_(codes, scale, outlier_index, outlier_value, momentum_codes, momentum_absmax, grad_weight, hyper,
                   group_size, block_size, stochastic, generator)
