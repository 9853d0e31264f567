"""``quantize_model``: swap a model's Linear and Conv2d layers for quantized ones, on CPU or GPU.

diffusers' own bitsandbytes loading refuses to run without a GPU; this swaps layers of an already built model
instead, into peft-quant's integer format (:mod:`peft_quant.int_quant`), bitsandbytes' 4/8-bit layers, or the Hub's
block-scaled FP8 and MXFP4 formats (:mod:`peft_quant.block_scaled`).
"""

from __future__ import annotations

import re
from typing import Iterable, Literal, Optional, Union

import torch
from torch import nn

from .block_scaled import Fp8BlockLinear, Mxfp4Linear
from .experts import Mxfp4Experts
from .int_quant import IntConv2d, IntLinear
from .kernels.block_scaled import MX_GROUP
from .quant_formats import require

Names = Optional[Union[str, Iterable[str]]]
_BLOCK_SCALED = {"fp8": Fp8BlockLinear, "mxfp4": Mxfp4Linear}


def _matches(name: str, pattern: Names) -> bool:
    """PEFT's convention: a string is a regex matched against the full name, a list holds name suffixes."""
    if pattern is None:
        return False
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def _bnb_linear(linear: nn.Linear, bits: int, quant_type: str, double_quant: bool, compute_dtype) -> nn.Module:
    bnb = require("bitsandbytes")
    weight = linear.weight.detach().clone()
    if bits == 4 and weight.device.type == "cpu" and linear.in_features % 64:
        raise ValueError(
            f"A Linear layer of input width {linear.in_features} cannot be quantized to bitsandbytes 4-bit on CPU: "
            "bitsandbytes' CPU inference kernel fails for widths that are not a multiple of 64. Fix: "
            "backend='int', exclude such layers with exclude_modules=[...], or quantize on a GPU."
        )
    if bits == 4:
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            compute_dtype=compute_dtype or weight.dtype, quant_type=quant_type, compress_statistics=double_quant,
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, quant_type=quant_type, compress_statistics=double_quant
        )
    else:
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=linear.bias is not None, has_fp16_weights=False,
            threshold=0.0, device="meta",
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to(weight.device)  # bitsandbytes quantizes when the weight is moved to its device


def quantize_model(
    model: nn.Module,
    bits: Optional[int] = None,
    backend: Literal["int", "bitsandbytes", "fp8", "mxfp4"] = "int",
    target_modules: Names = None,
    exclude_modules: Names = None,
    quant_type: Literal["nf4", "fp4"] = "nf4",
    double_quant: bool = False,
    compute_dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """Quantize ``model``'s ``nn.Linear`` and ``nn.Conv2d`` layers in place and return ``model`` (or, when ``model``
    is itself a Linear or Conv2d, the quantized layer that replaces it: use the return value).

    Applied to a PEFT model, it quantizes the base layers under the adapters (each adapter layer re-resolves its base
    format) and never the adapters' own trained modules.

    Args:
        bits: 4 or 8 (default 4) for ``"int"`` and ``"bitsandbytes"``; implied by ``"fp8"`` (8) and ``"mxfp4"`` (4).
        backend: ``"int"``: peft-quant's uniform per-output-channel format (asymmetric round-to-nearest, TuneQDM's
            and PEQA's base) for Linear and Conv2d. ``"bitsandbytes"``: ``Linear4bit`` (``quant_type``,
            ``double_quant``) or ``Linear8bitLt`` for Linear layers; bitsandbytes has no Conv2d, so Conv2d layers
            get peft-quant's integer format at the same bits.
            ``"fp8"``: :class:`~peft_quant.block_scaled.Fp8BlockLinear`,
            float8_e4m3fn weights with one float32 scale per 128×128 block (DeepSeek-V3/Qwen3-FP8 checkpoints' layout;
            any width, edge blocks partially filled). ``"mxfp4"``: :class:`~peft_quant.block_scaled.Mxfp4Linear`, e2m1
            values with one power-of-two scale per 32 inputs (gpt-oss' layout; input widths must be multiples of 32).
            Both hold Linear layers only (as the Hub's checkpoints do): Conv2d layers stay float. ``"mxfp4"`` also
            turns gpt-oss' float expert banks into :class:`~peft_quant.experts.Mxfp4Experts` (as gpt-oss ships
            them). Save and load Linear layers with :func:`~peft_quant.block_scaled.save_quantized` /
            :func:`~peft_quant.block_scaled.load_quantized`.
        target_modules: layers to quantize (a regex on the full name, or name suffixes); default every Linear and
            Conv2d.
        exclude_modules: layers to leave in float (same matching).
        compute_dtype: bitsandbytes 4-bit compute dtype (default: the weight's dtype).
    """
    if backend not in ("int", "bitsandbytes", *_BLOCK_SCALED):
        raise ValueError(f"quantize_model backend must be 'int', 'bitsandbytes', 'fp8' or 'mxfp4', got {backend!r}. "
                         "Fix: pass one of those.")
    implied = _BLOCK_SCALED[backend].bits if backend in _BLOCK_SCALED else None
    if bits is not None and implied is not None and bits != implied:
        raise ValueError(f"quantize_model backend={backend!r} stores {implied}-bit weights; got bits={bits!r}. "
                         "Fix: leave bits out.")
    bits = bits if bits is not None else implied or 4
    if bits not in (4, 8):
        raise ValueError(f"quantize_model supports bits=4 or bits=8, got {bits!r}. Fix: pass bits=4 or bits=8.")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quantize_model quant_type must be 'nf4' or 'fp4', got {quant_type!r}.")
    adapters = _adapter_prefixes(model)
    swaps = []
    kinds = (nn.Linear,) if backend in _BLOCK_SCALED else (nn.Linear, nn.Conv2d)
    banks = _float_expert_banks() if backend == "mxfp4" else ()
    for name, module in model.named_modules():
        if (type(module) not in kinds and type(module) not in banks) or _inside(name, adapters):
            continue
        if target_modules is not None and not _matches(name, target_modules):
            continue
        if _matches(name, exclude_modules):
            continue
        swaps.append((name, module))
    if not swaps:
        raise ValueError(
            f"quantize_model found no {'nn.Linear' if backend in _BLOCK_SCALED else 'nn.Linear or nn.Conv2d'} layer "
            "to quantize"
            + (f" matching target_modules={target_modules!r}" if target_modules is not None else "")
            + ". Fix: check target_modules / exclude_modules against model.named_modules()."
        )
    if backend == "mxfp4":  # refuse before swapping anything, naming every layer that cannot be held
        narrow = [f"{name} ({width})" for name, module in swaps for width in _input_widths(module) if width % MX_GROUP]
        if narrow:
            raise ValueError(
                f"MXFP4 stores one scale per {MX_GROUP} input values; these layers' input widths are not multiples of "
                f"{MX_GROUP}: {', '.join(narrow[:5])}{' ...' if len(narrow) > 5 else ''}. Fix: exclude_modules=[...] "
                "them, or use backend='fp8'."
            )
    for name, module in swaps:
        if type(module) in banks:
            new = Mxfp4Experts.from_float(module)
        elif backend in _BLOCK_SCALED:
            new = _BLOCK_SCALED[backend].from_linear(module)
        elif isinstance(module, nn.Conv2d):
            new = IntConv2d(module, bits)
        elif backend == "bitsandbytes":
            new = _bnb_linear(module, bits, quant_type, double_quant, compute_dtype)
        else:
            new = IntLinear(module, bits)
        if not name:
            return new  # the model is itself the layer: it cannot be swapped in place
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


def _float_expert_banks() -> tuple[type, ...]:
    """The float mixture-of-experts bank classes MXFP4 also holds (gpt-oss' ``GptOssExperts``, where loaded)."""
    from .experts import gpt_oss_experts_class

    bank = gpt_oss_experts_class()
    return (bank,) if bank is not None else ()


def _input_widths(module: nn.Module) -> tuple[int, ...]:
    """The input widths a layer's weights are blocked along (a bank's two projections: hidden and intermediate)."""
    if isinstance(module, nn.Linear):
        return (module.in_features,)
    return (module.hidden_size, module.intermediate_size)


def _adapter_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Names of the modules that belong to PEFT adapters (a tuner layer's children other than its ``base_layer``,
    e.g. StashQuant's trained copies; the copies of ``modules_to_save``): those train in float and are never
    quantized."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper  # ModulesToSaveWrapper's base

    kept = ("base_layer", "original_module")
    return tuple(
        f"{name}.{child}" if name else child
        for name, module in model.named_modules() if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper))
        for child, _ in module.named_children() if child not in kept
    )


def _inside(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)
