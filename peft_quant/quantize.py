"""``quantize_model``: swap a model's Linear and Conv2d layers for quantized ones, on CPU or GPU.

diffusers' own bitsandbytes loading refuses to run without a GPU; this swaps layers of an already built model
instead, into peft-quant's integer format (:mod:`peft_quant.int_quant`) or bitsandbytes' 4/8-bit layers.
"""

from __future__ import annotations

import re
from typing import Iterable, Literal, Optional, Union

import torch
from torch import nn

from .int_quant import IntConv2d, IntLinear
from .quant_formats import require

Names = Optional[Union[str, Iterable[str]]]


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
    bits: int = 4,
    backend: Literal["int", "bitsandbytes"] = "int",
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
        bits: 4 or 8.
        backend: ``"int"``: peft-quant's uniform per-output-channel format (asymmetric round-to-nearest, TuneQDM's
            and PEQA's base) for Linear and Conv2d. ``"bitsandbytes"``: ``Linear4bit`` (``quant_type``,
            ``double_quant``) or ``Linear8bitLt`` for Linear layers; bitsandbytes has no Conv2d, so Conv2d layers
            get peft-quant's integer format at the same bits.
        target_modules: layers to quantize (a regex on the full name, or name suffixes); default every Linear and
            Conv2d.
        exclude_modules: layers to leave in float (same matching).
        compute_dtype: bitsandbytes 4-bit compute dtype (default: the weight's dtype).
    """
    if bits not in (4, 8):
        raise ValueError(f"quantize_model supports bits=4 or bits=8, got {bits!r}.")
    if backend not in ("int", "bitsandbytes"):
        raise ValueError(f"quantize_model backend must be 'int' or 'bitsandbytes', got {backend!r}.")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quantize_model quant_type must be 'nf4' or 'fp4', got {quant_type!r}.")
    adapters = _adapter_prefixes(model)
    swaps = []
    for name, module in model.named_modules():
        if type(module) not in (nn.Linear, nn.Conv2d) or _inside(name, adapters):
            continue
        if target_modules is not None and not _matches(name, target_modules):
            continue
        if _matches(name, exclude_modules):
            continue
        swaps.append((name, module))
    if not swaps:
        raise ValueError(
            "quantize_model found no nn.Linear or nn.Conv2d layer to quantize"
            + (f" matching target_modules={target_modules!r}" if target_modules is not None else "")
            + ". Fix: check target_modules / exclude_modules against model.named_modules()."
        )
    for name, module in swaps:
        if isinstance(module, nn.Conv2d):
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
