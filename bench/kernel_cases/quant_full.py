"""QuantFull's kernels at Llama-7B layer shapes (4096 tokens; 4096×4096 and 11008×4096 weights, bf16 activations,
one scale per output channel, 1% float outliers, momentum blocks of 256, stochastic rounding: the config defaults).

* ``int8_matmul``: the forward ``x Wᵀ`` from int8 state. Reference: dequantize the whole weight, then ``F.linear``.
  Anchor: bitsandbytes' int8 weight (``int8_vectorwise_quant``), dequantized by ``int8_vectorwise_dequant``, then
  ``F.linear``.
* ``lion_from_activations``: the weight update of one layer's backward. Ours: the fused kernel (weight gradient tile
  by tile in registers + Lion on the int8 state). Reference: ``G = gradᵀ x`` in float32, then ``lion_step_``. Anchor:
  a bf16 weight with bitsandbytes ``Lion8bit``: the bf16 gradient matmul into ``.grad`` + ``optimizer.step()``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import DEVICE, Case

TOKENS = {"full": 4096, "quick": 4096, "smoke": 40}
SHAPES = {"full": [(4096, 4096), (11008, 4096)], "quick": [(4096, 4096)], "smoke": [(48, 512)]}  # (out, in)
BLOCK_SIZE = 256


def _state(out: int, width: int):
    from peft_quant.quant_full.int8_state import quantize_blockwise, quantize_weight

    weight = torch.randn(out, width, device=DEVICE) * 0.02
    codes, scale, index, value = quantize_weight(weight, None, 0.01)
    momentum = quantize_blockwise(torch.randn(out * width, device=DEVICE) * 1e-3, BLOCK_SIZE)
    return weight, [codes, scale, index, value], list(momentum)


def _matmul_case(tokens: int, out: int, width: int) -> Case:
    import bitsandbytes.functional as bnbf

    from peft_quant.kernels import quant_full_triton
    from peft_quant.quant_full.int8_state import dequantize_weight

    weight, (codes, scale, index, value), _ = _state(out, width)
    x = torch.randn(tokens, width, device=DEVICE, dtype=torch.bfloat16)
    bnb_codes, bnb_stats, _ = bnbf.int8_vectorwise_quant(weight.to(torch.float16))
    return Case(
        op="int8_matmul",
        shape=f"tokens={tokens} W={out}x{width} bf16",
        ours=lambda: quant_full_triton.int8_matmul(x, codes, scale, index, value, None, True),
        reference=lambda: F.linear(x, dequantize_weight(codes, scale, index, value, None, torch.bfloat16)),
        anchor=lambda: F.linear(x, bnbf.int8_vectorwise_dequant(bnb_codes, bnb_stats).to(torch.bfloat16)),
        anchor_name="bitsandbytes int8_vectorwise_dequant + F.linear",
        notes="1% outliers (added from a float32 sparse product in the epilogue); one scale per output channel",
    )


def _lion_case(tokens: int, out: int, width: int) -> Case:
    import bitsandbytes as bnb

    from peft_quant.kernels import quant_full_triton
    from peft_quant.quant_full.int8_state import LionHyper, lion_step_

    weight, int8_weight, momentum = _state(out, width)
    grad_output = torch.randn(tokens, out, device=DEVICE, dtype=torch.bfloat16)
    x = torch.randn(tokens, width, device=DEVICE, dtype=torch.bfloat16)
    hyper = LionHyper(lr=1e-5, weight_decay=0.0)
    generator = torch.Generator(device=DEVICE).manual_seed(0)

    def ours() -> None:
        quant_full_triton.lion_step_from_activations_(grad_output, x, *int8_weight, *momentum, hyper, None,
                                                      BLOCK_SIZE, True, 0)

    def reference() -> None:
        grad_weight = grad_output.T.float() @ x.float()
        lion_step_(*int8_weight, *momentum, grad_weight, hyper, None, BLOCK_SIZE, True, generator)

    param = torch.nn.Parameter(weight.to(torch.bfloat16))
    param.grad = torch.empty_like(param)
    optimizer = bnb.optim.Lion8bit([param], lr=hyper.lr, betas=(hyper.beta1, hyper.beta2))

    def anchor() -> None:
        torch.matmul(grad_output.T, x, out=param.grad)
        optimizer.step()

    return Case(
        op="lion_from_activations",
        shape=f"tokens={tokens} W={out}x{width} bf16",
        ours=ours,
        reference=reference,
        anchor=anchor,
        anchor_name="bf16 grad matmul + bitsandbytes Lion8bit.step()",
        notes="stochastic rounding, momentum blocks of 256, 1% outliers; ours never writes the weight gradient",
    )


def cases(size: str) -> list[Case]:
    """The forward matmul and the fused update at each of :data:`SHAPES` of ``size``."""
    return [make(TOKENS[size], out, width) for out, width in SHAPES[size] for make in (_matmul_case, _lion_case)]
