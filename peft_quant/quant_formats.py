"""The base-layer formats peft-quant's methods sit on: one object per format, one interface for every method.

:func:`resolve_format` turns a base layer into a :class:`WeightFormat`, which answers everything a method may ask of
its base, so no method reads or writes a quantized layer's ``.weight`` itself:

* ``facts``: what the layer is (backend, scheme, bits, widths), for errors, repr and the model card;
* :meth:`~WeightFormat.dequantize`: the float weight the layer's forward computes with (a float reference);
* :meth:`~WeightFormat.check_input_grad`: whether the base's forward gave a gradient w.r.t. its input;
* :meth:`~WeightFormat.save_state` / :meth:`~WeightFormat.restore_state`: an exact copy of the layer's stored tensors
  and their bit-for-bit restoration (merges keep it, so unmerging never loses the base);
* :meth:`~WeightFormat.requantize`: store a float weight back in the *same* format;
* :meth:`~WeightFormat.fold_output_scale`: exact folds of per-output-channel factors into the format's own scales;
* ``mergeable``: whether a changed weight can be written back at all.

Writing bitsandbytes weights goes through PEFT's own backend objects (``peft.utils.quantization_utils``), which keep
the quant type, block size and double quantization when they re-quantize. Optional packages are never imported here
unless a layer of theirs is already in memory, so ``import peft_quant`` pulls in no backend.

Adding a base format is one new :class:`WeightFormat` subclass in :data:`FORMATS` (or in the ``FORMATS`` of a module
listed in :data:`FORMAT_MODULES`) plus its row in the conformance tests.
"""

from __future__ import annotations

import copy
import functools
import importlib
import sys
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import nn

SUPPORTED_LAYERS = (
    "torch.nn.Linear, torch.nn.Conv2d (plain float weights), peft-quant's IntLinear/IntConv2d "
    "(peft_quant.quantize_model), bitsandbytes Linear4bit (nf4/fp4, with or without double quantization), "
    "bitsandbytes Linear8bitLt, gptqmodel's GPTQ and AWQ linear layers, hqq's HQQLinear, nn.Linear with a torchao "
    "weight-only weight or a compressed-tensors scheme, FP8 block-scaled layers (transformers' FP8Linear, "
    "peft-quant's Fp8BlockLinear) and MXFP4 layers (peft-quant's Mxfp4Linear; gpt-oss expert banks through "
    "peft_quant.experts)"
)

_EXTRAS = {"bitsandbytes": "bnb", "gptqmodel": "gptq", "diffusers": "diffusers", "hqq": "hqq", "torchao": "torchao",
           "compressed_tensors": "compressed-tensors"}


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
    """What a base layer is (the facts of a :class:`WeightFormat`). ``label`` reads like
    ``"bitsandbytes nf4 (double-quant)"``."""

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


class _Owner:
    """Stands in for a PEFT layer where PEFT's backend objects expect one (they call ``get_base_layer()``)."""

    def __init__(self, layer: nn.Module) -> None:
        self.base_layer = layer

    def get_base_layer(self) -> nn.Module:
        return self.base_layer


class WeightFormat:
    """One base format bound to one layer. Subclasses implement :meth:`matches`, :meth:`_facts`, :meth:`dequantize`,
    :meth:`save_state`/:meth:`restore_state` and, where ``mergeable``, :meth:`_store`."""

    #: fix shown when the base forward drops the input gradient
    input_grad_fix: ClassVar[str] = "report this base layer type to peft-quant"

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.facts = self._facts()

    @classmethod
    def matches(cls, layer: nn.Module) -> bool:
        raise NotImplementedError

    def _facts(self) -> BaseFormat:
        raise NotImplementedError

    @property
    def mergeable(self) -> bool:
        return self.facts.mergeable

    @property
    def compute_dtype(self) -> torch.dtype:
        """The float dtype the layer's forward computes in (what a merge error is measured in)."""
        return torch.float32

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A copy of the float weight ``(out, in[, kh, kw])`` the layer's forward computes with."""
        raise NotImplementedError

    def save_state(self) -> dict[str, Any]:
        """An exact copy of everything the format stores (tensors cloned), for :meth:`restore_state`."""
        raise NotImplementedError

    def restore_state(self, state: dict[str, Any]) -> None:
        """Put back, bit for bit, what :meth:`save_state` copied."""
        raise NotImplementedError

    def _store(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def check_mergeable(self) -> None:
        """Raise an error naming the fix where the format cannot take a changed weight."""
        if not self.mergeable:
            raise TypeError(
                f"{self.facts.label} layers cannot be merged into: their kernels offer no way to re-quantize a changed "
                "weight. Fix: keep the adapter unmerged (it runs on the quantized layer as is), or call `unload()` to "
                "get the untouched base model back."
            )

    def requantize(self, weight: torch.Tensor) -> None:
        """Store a float weight of the layer's shape in the layer's own format (re-quantizing it)."""
        self.check_mergeable()
        shape = tuple(self.dequantize().shape)
        if tuple(weight.shape) != shape:
            raise ValueError(f"A weight of shape {tuple(weight.shape)} does not fit {self.facts.label} layer {shape}.")
        self._store(weight)

    def fold_output_scale(self, factor: torch.Tensor) -> bool:
        """Multiply each output channel ``o`` by ``factor[o]`` through the format's own scales, exactly and without
        re-quantizing; ``False`` (changing nothing) where the format has no such scales."""
        return False

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer's output for ``x``, with a gradient w.r.t. ``x``: what input-side methods call.

        The layer's own forward, with autograd as the layer does it; or, for formats marked ``frozen_forward`` (whose
        own forward gives no input gradient, or saves its input or a float weight for backward), the layer's forward
        run without autograd, saving nothing, with :meth:`input_grad` computing the input gradient in backward. A
        trained bias (e.g. QOFT's ``bias="qoft_only"``) gets its gradient through an added ``bias − bias.detach()``
        (exactly zero); any other trained tensor of the base keeps the layer's own autograd.
        """
        layer = self.layer
        if not self.frozen_forward or args or kwargs or not (torch.is_grad_enabled() and x.requires_grad):
            return layer(x, *args, **kwargs)
        trained = [name for name, p in layer.named_parameters() if p.requires_grad]
        if trained not in ([], ["bias"]):
            return layer(x, *args, **kwargs)
        out = _FrozenBaseForward.apply(x, self)
        return out + (layer.bias - layer.bias.detach()).to(out.dtype) if trained else out

    #: see :meth:`forward`
    frozen_forward: ClassVar[bool] = False

    def input_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """``dL/dx = dL/dy · W`` of a Linear base for :meth:`forward`'s backward: the weight dequantized once, in the
        gradient's dtype, and dropped right after (formats that can decode tile by tile override this)."""
        return grad @ self.dequantize(grad.dtype)

    def check_input_grad(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """Raise if the base forward dropped the gradient w.r.t. an input that needs one (an input-side adapter
        would silently get no gradient)."""
        if x.requires_grad and not out.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                f"The base layer ({self.facts.label}, {type(self.layer).__name__}) returned an output without gradient "
                "for an input that needs one, so the adapter would silently get no gradient. "
                f"Fix: {self.input_grad_fix}."
            )


class _FrozenBaseForward(torch.autograd.Function):
    """A frozen base layer's own forward under no_grad (so it saves nothing for backward), and the input gradient
    from its format's :meth:`WeightFormat.input_grad`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
        ctx.fmt, ctx.x_dtype = fmt, x.dtype  # the format holds the layer (its stored tensors), nothing of x
        return fmt.layer(x)  # autograd is off inside forward: the layer saves nothing

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        return ctx.fmt.input_grad(grad).to(ctx.x_dtype), None


def _clone(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone()


class FloatFormat(WeightFormat):
    """A plain ``nn.Linear``/``nn.Conv2d`` with a float weight (not a tensor subclass)."""

    @classmethod
    def matches(cls, layer: nn.Module) -> bool:
        weight = getattr(layer, "weight", None)
        return (isinstance(layer, (nn.Linear, nn.Conv2d)) and type(weight) in (nn.Parameter, torch.Tensor)
                and weight.is_floating_point())

    def _facts(self) -> BaseFormat:
        layer, weight = self.layer, self.layer.weight
        dtype = str(weight.dtype).removeprefix("torch.")
        if isinstance(layer, nn.Linear):
            return BaseFormat("torch", dtype, weight.element_size() * 8, "linear", layer.in_features,
                              layer.out_features, True)
        return BaseFormat("torch", dtype, weight.element_size() * 8, "conv2d", layer.in_channels,
                          layer.out_channels, True)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.layer.weight.dtype

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.layer.weight.detach().to(dtype, copy=True)

    def save_state(self) -> dict[str, Any]:
        return {"weight": _clone(self.layer.weight)}

    def restore_state(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.layer.weight.copy_(state["weight"])

    def _store(self, weight: torch.Tensor) -> None:
        with torch.no_grad():
            self.layer.weight.copy_(weight.to(self.layer.weight.dtype))

    def fold_output_scale(self, factor: torch.Tensor) -> bool:
        weight = self.layer.weight
        with torch.no_grad():
            shape = (-1,) + (1,) * (weight.dim() - 1)
            weight.copy_((weight.to(torch.float64) * factor.detach().to(torch.float64).view(shape)).to(weight.dtype))
        return True


class BufferStateFormat(WeightFormat):
    """A format whose stored state is a fixed set of the layer's buffers (``_BUFFERS``): copied and put back whole."""

    _BUFFERS: ClassVar[tuple[str, ...]] = ()

    def save_state(self) -> dict[str, Any]:
        return {name: _clone(getattr(self.layer, name)) for name in self._BUFFERS}

    def restore_state(self, state: dict[str, Any]) -> None:
        for name in self._BUFFERS:
            setattr(self.layer, name, state[name].clone())


class IntFormat(BufferStateFormat):
    """peft-quant's own uniform per-output-channel format (:mod:`peft_quant.int_quant`)."""

    _BUFFERS = ("qweight", "scale", "zero")

    @classmethod
    def matches(cls, layer: nn.Module) -> bool:
        from .int_quant import IntQuantized

        return isinstance(layer, IntQuantized)

    def _facts(self) -> BaseFormat:
        from .int_quant import IntLinear

        layer = self.layer
        if isinstance(layer, IntLinear):
            widths, kind = (layer.in_features, layer.out_features), "linear"
        else:
            widths, kind = (layer.in_channels, layer.out_channels), "conv2d"
        return BaseFormat("peft_quant", f"int{layer.bits}", layer.bits, kind, *widths, True)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.layer.compute_dtype

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.layer.dequantize(dtype)

    def _store(self, weight: torch.Tensor) -> None:
        self.layer.requantize_(weight)

    def fold_output_scale(self, factor: torch.Tensor) -> bool:
        self.layer.scale_output_channels_(factor.detach())
        return True


class _BnbFormat(WeightFormat):
    """Common part of the bitsandbytes formats: the CPU layout guard and PEFT's backend for writing."""

    @staticmethod
    def _bnb():
        return sys.modules.get("bitsandbytes")

    @property
    def compute_dtype(self) -> torch.dtype:
        dtype = getattr(self.layer, "compute_dtype", None)
        return dtype if isinstance(dtype, torch.dtype) else torch.float32

    def _unpack_cpu_layout(self) -> None:
        """Undo bitsandbytes' in-place CPU repacking of a 4-bit weight, so it can be dequantized.

        On CPUs with AVX512-BF16, bitsandbytes repacks a ``Linear4bit`` weight in place at its first eval-mode
        forward; dequantizing the repacked weight gives wrong numbers (0.1 absolute error seen on a 64x64 layer), so
        a merge would silently corrupt the layer. bitsandbytes undoes the packing itself before saving; so do we
        before reading or writing the weight.
        """
        state = getattr(self.layer.weight, "quant_state", None)
        if not getattr(state, "packing_format_for_cpu", False):
            return
        inverse = getattr(self._bnb().functional, "_convert_weight_packed_for_cpu_inverse", None)
        if inverse is None:
            raise RuntimeError(
                "This bitsandbytes Linear4bit weight is in bitsandbytes' CPU-packed layout and this bitsandbytes "
                "version offers no way to undo it, so it cannot be merged correctly. Fix: merge before running the "
                "model in eval mode on CPU, or upgrade bitsandbytes."
            )
        self.layer.weight.data, self.layer.weight.quant_state = inverse(self.layer.weight.data, state)

    def _peft_backend(self):
        from peft.utils import resolve_quantization_backend

        return resolve_quantization_backend(self.layer)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        self._unpack_cpu_layout()
        return self._peft_backend().get_base_weight(self.layer).to(dtype, copy=True)

    def _store(self, weight: torch.Tensor) -> None:
        self._unpack_cpu_layout()
        self._peft_backend().set_base_weight(_Owner(self.layer), weight.to(torch.float32))


class Bnb4bitFormat(_BnbFormat):
    """bitsandbytes ``Linear4bit``: nf4 or fp4 codes, an absmax per block (double-quantized or not)."""

    @classmethod
    def matches(cls, layer: nn.Module) -> bool:
        bnb = cls._bnb()
        return bnb is not None and isinstance(layer, bnb.nn.Linear4bit)

    def _facts(self) -> BaseFormat:
        weight = self.layer.weight
        state = weight.quant_state
        scheme = getattr(state, "quant_type", None) or getattr(weight, "quant_type", "nf4")
        double = bool(getattr(state, "nested", False) or getattr(weight, "compress_statistics", False))
        return BaseFormat("bitsandbytes", scheme, 4, "linear", self.layer.in_features, self.layer.out_features, True,
                          double)

    def save_state(self) -> dict[str, Any]:
        weight = self.layer.weight
        return {"weight": weight, "data": _clone(weight.data), "quant_state": copy.deepcopy(weight.quant_state)}

    def restore_state(self, state: dict[str, Any]) -> None:
        weight = state["weight"]  # the original parameter object (a merge replaces it), its codes and state put back
        weight.data = state["data"].clone()
        weight.quant_state = copy.deepcopy(state["quant_state"])
        self.layer.weight = weight

    def fold_output_scale(self, factor: torch.Tensor) -> bool:
        """Exact when the statistics are not double-quantized and each block lies inside one row."""
        self._unpack_cpu_layout()
        state = self.layer.weight.quant_state
        if state.nested or self.layer.in_features % state.blocksize:
            return False
        absmax = state.absmax.view(self.layer.out_features, -1)  # (out, blocks per row)
        absmax.copy_((absmax.to(torch.float64) * factor.detach().to(torch.float64)[:, None]).to(absmax.dtype))
        return True


class Bnb8bitFormat(_BnbFormat):
    """bitsandbytes ``Linear8bitLt``: int8 codes with a float absmax per row (``SCB``)."""

    @classmethod
    def matches(cls, layer: nn.Module) -> bool:
        bnb = cls._bnb()
        return bnb is not None and isinstance(layer, bnb.nn.Linear8bitLt)

    def _facts(self) -> BaseFormat:
        return BaseFormat("bitsandbytes", "int8", 8, "linear", self.layer.in_features, self.layer.out_features, True)

    def _scb(self) -> torch.Tensor:
        # row-wise absmax, W = CB · SCB / 127; bitsandbytes moves it to the layer's state at the first forward
        weight = self.layer.weight
        return weight.SCB if getattr(weight, "SCB", None) is not None else self.layer.state.SCB

    def save_state(self) -> dict[str, Any]:
        return {"weight": self.layer.weight, "data": _clone(self.layer.weight.data), "SCB": _clone(self._scb())}

    def restore_state(self, state: dict[str, Any]) -> None:
        weight = state["weight"]  # the original parameter object: its codes and scales put back
        weight.data = state["data"].clone()
        weight.CB, weight.SCB = weight.data, state["SCB"].clone()  # moved to the layer's state at the next forward
        self.layer.weight = weight
        self.layer.state.reset_grads()

    def fold_output_scale(self, factor: torch.Tensor) -> bool:
        scb = self._scb()
        scb.copy_((scb.to(torch.float64) * factor.detach().to(torch.float64)).to(scb.dtype))
        return True


class GptqFormat(WeightFormat):
    """gptqmodel's GPTQ linear layers: readable (dequantized), but no kernel re-quantizes a changed weight."""

    @property
    def frozen_forward(self) -> bool:
        """gptqmodel's torch kernel (``TorchLinear``) saves a dequantized float copy of the whole weight for backward:
        run it without autograd instead; other kernels repack the codes and keep their own autograd."""
        from gptqmodel.nn_modules.qlinear.torch import TorchLinear

        return type(self.layer) is TorchLinear

    input_grad_fix = (
        "gptqmodel's default CPU kernel (TorchAtenLinear) switches to a no-grad kernel for good when its first forward "
        'runs in eval mode without gradients; load the GPTQ model with GPTQConfig(bits=..., backend="gptq_torch"), or '
        "run the first forward in training mode"
    )

    @classmethod
    def matches(cls, layer: nn.Module) -> bool:
        if not type(layer).__module__.startswith("gptqmodel"):
            return False
        from gptqmodel.nn_modules import qlinear

        awq = getattr(qlinear, "AWQuantLinear", ())  # AWQ layers share the base class; library_formats reads them
        return isinstance(layer, qlinear.BaseQuantLinear) and not isinstance(layer, awq)

    def _facts(self) -> BaseFormat:
        layer = self.layer
        bits = int(getattr(layer, "bits", 4))
        group = getattr(layer, "group_size", None)
        group = int(group) if group not in (None, -1) else None
        return BaseFormat("gptq", f"int{bits}", bits, "linear", layer.in_features, layer.out_features, False, False,
                          group)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.layer.dequantize_weight().T.to(dtype).contiguous()  # gptqmodel gives (in, out)

    def save_state(self) -> dict[str, Any]:
        return {}  # never written to, so nothing to restore

    def restore_state(self, state: dict[str, Any]) -> None:
        pass


#: the formats defined in this module, probed in order after those of :data:`FORMAT_MODULES`
FORMATS: tuple[type[WeightFormat], ...] = (IntFormat, Bnb4bitFormat, Bnb8bitFormat, GptqFormat, FloatFormat)
#: sibling modules that each define a ``FORMATS`` tuple of more formats (imported on the first resolve; they import
#: their optional packages only when a layer of theirs is probed)
FORMAT_MODULES: tuple[str, ...] = ("block_scaled", "library_formats")


@functools.cache
def all_formats() -> tuple[type[WeightFormat], ...]:
    """Every known format, probed in order; the first whose ``matches`` is true describes the layer. peft-quant's own
    int format first, the float one last (other formats' layers may subclass ``nn.Linear``)."""
    extra = tuple(cls for name in FORMAT_MODULES for cls in importlib.import_module(f".{name}", __package__).FORMATS)
    return FORMATS[:1] + extra + FORMATS[1:]


def _unsupported_reason(layer: nn.Module) -> str:
    weight = getattr(layer, "weight", None)
    if isinstance(layer, (nn.Linear, nn.Conv2d)) and isinstance(weight, torch.Tensor):
        if type(weight) not in (nn.Parameter, torch.Tensor):
            kind = f"{type(weight).__module__}.{type(weight).__qualname__}"
            if type(weight).__module__.startswith("torchao"):
                return (f"its weight is a torchao tensor subclass ({kind}) that peft-quant does not read: it reads "
                        "torchao's weight-only weights (Int8Tensor, IntxUnpackedToInt8Tensor, Float8Tensor, Int4 "
                        "tensors), not ones that also quantize activations (they change the layer's math)")
            return f"its weight is a tensor subclass ({kind}), a format peft-quant does not read"
        return f"its weight has dtype {weight.dtype}, not a float dtype"
    return f"{type(layer).__module__}.{type(layer).__qualname__} is not a supported layer type"


def resolve_format(layer: nn.Module) -> WeightFormat:
    """The :class:`WeightFormat` of a base layer, or :class:`UnsupportedLayerError` naming what is supported."""
    for fmt in all_formats():
        if fmt.matches(layer):
            return fmt(layer)
    raise UnsupportedLayerError(
        f"Cannot target a layer of type {type(layer).__module__}.{type(layer).__qualname__}: "
        f"{_unsupported_reason(layer)}. Supported base layers: {SUPPORTED_LAYERS}. Fix: narrow `target_modules` to "
        "such layers (or dequantize this one first)."
    )


def describe(layer: nn.Module) -> BaseFormat:
    """The facts of a base layer's format (raises :class:`UnsupportedLayerError` for unsupported layers)."""
    return resolve_format(layer).facts


def read_weight(layer: nn.Module) -> torch.Tensor:
    """A float32 copy of any supported base layer's weight, ``(out, in[, kh, kw])`` (GPTQ included: reading is
    possible even where writing back is not)."""
    return resolve_format(layer).dequantize(torch.float32)


def fold_output_scale(layer: nn.Module, factor: torch.Tensor) -> bool:
    """:meth:`WeightFormat.fold_output_scale` of ``layer``'s format."""
    return resolve_format(layer).fold_output_scale(factor)
