"""The base-layer formats peft-quant's methods sit on: what a layer is, and how to read and rewrite its weight.

One place answers, for any targeted layer: which backend and how many bits (for errors, repr and the model card),
how wide its input is, whether its weight can be merged into, how to dequantize it, and how to write a float
weight back in the *same* format while measuring what re-quantization lost.

Reading and writing quantized weights goes through PEFT's own backend objects
(``peft.utils.resolve_quantization_backend``), which keep bitsandbytes' quant type, block size and double
quantization when they re-quantize. Optional packages are never imported here unless a layer of theirs is already
in memory, so ``import peft_quant`` pulls in no backend.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

SUPPORTED_LAYERS = (
    "torch.nn.Linear, torch.nn.Conv2d, peft-quant's IntLinear/IntConv2d (peft_quant.quantize_model), bitsandbytes Linear4bit (nf4/fp4, with or without double quantization), "
    "bitsandbytes Linear8bitLt, and gptqmodel's GPTQ linear layers (GPTQ checkpoints loaded by transformers)"
)

_EXTRAS = {"bitsandbytes": "bnb", "gptqmodel": "gptq", "diffusers": "diffusers"}


class UnsupportedLayerError(TypeError):
    """A targeted layer has a type no peft-quant method knows how to wrap."""


def require(package: str) -> object:
    """Import an optional backend package, or raise an ``ImportError`` that names the extra to install."""
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        extra = _EXTRAS.get(package)
        fix = f"pip install 'peft-quant[{extra}]'" if extra else f"pip install {package}"
        raise ImportError(f"This needs the optional package {package!r}, which is not installed. Fix: {fix}.") from exc


@dataclass(frozen=True)
class BaseFormat:
    """What a base layer is. ``label`` reads like ``"bitsandbytes nf4 (double-quant)"``."""

    backend: str  # "torch", "peft_quant", "bitsandbytes" or "gptq"
    scheme: str  # dtype name for float layers, else "nf4", "fp4", "int8", "int4"...
    bits: int
    layer_type: str  # "linear" or "conv2d"
    in_features: int
    out_features: int
    mergeable: bool
    double_quant: bool = False
    group_size: Optional[int] = None

    @property
    def label(self) -> str:
        text = f"{self.backend} {self.scheme}"
        if self.double_quant:
            text += " (double-quant)"
        if self.group_size:
            text += f" (group size {self.group_size})"
        return text


def _bnb_format(layer: nn.Module) -> Optional[BaseFormat]:
    if "bitsandbytes" not in sys.modules:
        return None
    bnb = sys.modules["bitsandbytes"]
    if isinstance(layer, bnb.nn.Linear4bit):
        state = layer.weight.quant_state
        scheme = getattr(state, "quant_type", None) or getattr(layer.weight, "quant_type", "nf4")
        double = bool(getattr(state, "nested", False) or getattr(layer.weight, "compress_statistics", False))
        return BaseFormat("bitsandbytes", scheme, 4, "linear", layer.in_features, layer.out_features, True, double)
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return BaseFormat("bitsandbytes", "int8", 8, "linear", layer.in_features, layer.out_features, True)
    return None


def _gptq_format(layer: nn.Module) -> Optional[BaseFormat]:
    if not type(layer).__module__.startswith("gptqmodel"):
        return None
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    if not isinstance(layer, BaseQuantLinear):
        return None
    bits = int(getattr(layer, "bits", 4))
    group = getattr(layer, "group_size", None)
    group = int(group) if group not in (None, -1) else None
    return BaseFormat("gptq", f"int{bits}", bits, "linear", layer.in_features, layer.out_features, False, False, group)


def _int_format(layer: nn.Module) -> Optional[BaseFormat]:
    from .int_quant import IntConv2d, IntLinear

    if isinstance(layer, IntLinear):
        return BaseFormat("peft_quant", f"int{layer.bits}", layer.bits, "linear", layer.in_features,
                          layer.out_features, True)
    if isinstance(layer, IntConv2d):
        return BaseFormat("peft_quant", f"int{layer.bits}", layer.bits, "conv2d", layer.in_channels,
                          layer.out_channels, True)
    return None


def _float_format(layer: nn.Module) -> Optional[BaseFormat]:
    weight = getattr(layer, "weight", None)
    if type(weight) not in (nn.Parameter, torch.Tensor) or not weight.is_floating_point():
        return None  # e.g. a tensor-subclass (torchao) weight: not a plain float layer
    dtype = str(weight.dtype).removeprefix("torch.")
    bits = weight.element_size() * 8
    if isinstance(layer, nn.Linear):
        return BaseFormat("torch", dtype, bits, "linear", layer.in_features, layer.out_features, True)
    if isinstance(layer, nn.Conv2d):
        return BaseFormat("torch", dtype, bits, "conv2d", layer.in_channels, layer.out_channels, True)
    return None


def describe(layer: nn.Module) -> BaseFormat:
    """Describe a base layer, or raise :class:`UnsupportedLayerError` listing what is supported."""
    for probe in (_int_format, _bnb_format, _gptq_format, _float_format):
        found = probe(layer)
        if found is not None:
            return found
    raise UnsupportedLayerError(
        f"Cannot target a layer of type {type(layer).__module__}.{type(layer).__qualname__}. "
        f"Supported base layers: {SUPPORTED_LAYERS}. Fix: narrow `target_modules` to such layers."
    )


def quantization_backend(layer: nn.Module):
    """PEFT's backend object for a quantized layer (``None`` for float layers and peft-quant's own format)."""
    from peft.utils import resolve_quantization_backend

    from .int_quant import IntQuantized

    if isinstance(layer, IntQuantized):
        return None

    return resolve_quantization_backend(layer)


def _unpack_bnb_cpu_layout(layer: nn.Module) -> None:
    """Undo bitsandbytes' in-place CPU repacking of a 4-bit weight, so it can be dequantized.

    On CPUs with AVX512-BF16, bitsandbytes repacks a ``Linear4bit`` weight in place at its first eval-mode
    forward; dequantizing the repacked weight gives wrong numbers (0.1 absolute error seen on a 64x64 layer), so
    a merge would silently corrupt the layer. bitsandbytes undoes the packing itself before saving; so do we
    before reading or writing the weight.
    """
    state = getattr(getattr(layer, "weight", None), "quant_state", None)
    if not getattr(state, "packing_format_for_cpu", False):
        return
    inverse = getattr(sys.modules["bitsandbytes"].functional, "_convert_weight_packed_for_cpu_inverse", None)
    if inverse is None:
        raise RuntimeError(
            "This bitsandbytes Linear4bit weight is in bitsandbytes' CPU-packed layout and this bitsandbytes "
            "version offers no way to undo it, so it cannot be merged correctly. Fix: merge before running the "
            "model in eval mode on CPU, or upgrade bitsandbytes."
        )
    layer.weight.data, layer.weight.quant_state = inverse(layer.weight.data, state)


def dequantized_weight(peft_layer) -> torch.Tensor:
    """The base layer's weight as a float tensor (a copy for quantized layers)."""
    _unpack_bnb_cpu_layout(peft_layer.get_base_layer())
    fmt = describe(peft_layer.get_base_layer())
    if not fmt.mergeable:
        raise TypeError(
            f"{fmt.label} layers cannot be dequantized for merging. Keep the adapter unmerged (it runs on the "
            "quantized layer as is), or call `unload()` to get the untouched base model back."
        )
    from .int_quant import IntQuantized

    base = peft_layer.get_base_layer()
    if isinstance(base, IntQuantized):
        return base.dequantize()
    return peft_layer.get_base_weight()


def store_weight(peft_layer, weight: torch.Tensor) -> float:
    """Write a float weight into the base layer in its own format; return the relative re-quantization error.

    The error is ``||stored - weight||_F / ||weight||_F`` measured after the round trip: zero for float layers
    up to the cast to their dtype, bitsandbytes' rounding for quantized ones.
    """
    from .int_quant import IntQuantized

    base = peft_layer.get_base_layer()
    _unpack_bnb_cpu_layout(base)
    if isinstance(base, IntQuantized):
        base.requantize_(weight)
    else:
        target_dtype = base.weight.dtype if describe(base).backend == "torch" else torch.float32
        peft_layer.set_base_weight(weight.to(target_dtype))
    stored = dequantized_weight(peft_layer).to(torch.float64)
    reference = weight.to(torch.float64)
    return float((stored - reference).norm() / reference.norm().clamp_min(1e-30))


def fold_output_scale(base: nn.Module, factor: torch.Tensor) -> bool:
    """Multiply each output channel ``o`` of ``base``'s weight by ``factor[o]`` through the format's own scales.

    Exact up to float rounding, and nothing is re-quantized, for: float layers; peft-quant's integer format (the
    per-channel scale); bitsandbytes ``Linear8bitLt`` (its per-row ``SCB``); bitsandbytes ``Linear4bit`` without
    double quantization whose quantization blocks each lie inside one row (``in_features`` a multiple of the block
    size). Returns ``False``, changing nothing, for any other format (the caller re-quantizes instead).
    """
    from .int_quant import IntQuantized

    fmt = describe(base)
    factor = factor.detach()
    if isinstance(base, IntQuantized):
        base.scale_output_channels_(factor)
        return True
    if fmt.backend == "torch":
        with torch.no_grad():
            shape = (-1,) + (1,) * (base.weight.dim() - 1)
            base.weight.mul_(factor.to(base.weight).view(shape))
        return True
    if fmt.backend != "bitsandbytes":
        return False
    _unpack_bnb_cpu_layout(base)
    if fmt.scheme == "int8":
        # row-wise absmax, W = CB · SCB / 127; bitsandbytes moves it to the layer's state at the first forward
        scb = base.weight.SCB if getattr(base.weight, "SCB", None) is not None else base.state.SCB
        scb.mul_(factor.to(scb))
        return True
    state = base.weight.quant_state
    if state.nested or base.in_features % state.blocksize:
        return False
    absmax = state.absmax.view(base.out_features, -1)  # (out, blocks per row)
    absmax.mul_(factor.to(absmax)[:, None])
    return True


def read_weight(layer: nn.Module) -> torch.Tensor:
    """A copy of any supported base layer's weight in float32, ``(out, in[, kh, kw])`` (GPTQ included: reading is
    possible even where writing back is not)."""
    from .int_quant import IntQuantized

    fmt = describe(layer)
    if isinstance(layer, IntQuantized):
        return layer.dequantize(torch.float32)
    if fmt.backend == "torch":
        return layer.weight.detach().to(torch.float32).clone()
    if fmt.backend == "gptq":
        return layer.dequantize_weight().T.to(torch.float32).contiguous()  # gptqmodel gives (in, out)
    from peft.utils.integrations import dequantize_bnb_weight

    _unpack_bnb_cpu_layout(layer)
    return dequantize_bnb_weight(layer.weight, state=getattr(layer, "state", None)).to(torch.float32)
