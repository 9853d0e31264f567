"""Base formats of other quantization libraries: HQQ, torchao weight-only tensor subclasses, compressed-tensors and
AWQ (gptqmodel). Each is one :class:`~peft_quant.quant_formats.WeightFormat`, probed through :data:`FORMATS` before
peft-quant's bitsandbytes, GPTQ and float formats (the first match wins).

No library is imported here: ``matches`` looks at ``sys.modules`` first, so only a library whose layers can already
be in memory is ever touched, and ``import peft_quant`` pulls in none of them.

What each format can do, and why:

* **HQQ** (``hqq.core.quantize.HQQLinear``): read and written through PEFT's own HQQ backend, which re-quantizes with
  the layer's ``quant_config`` (bits, group size, axis, zero/scale settings); the new codes and metadata are moved
  into the existing layer so the model keeps its module. Output scales fold exactly into HQQ's per-group scales
  (``axis=1``, groups inside one row).
* **torchao** (an ``nn.Linear`` whose weight is a torchao tensor subclass): weight-only ``Int8Tensor``
  (``Int8WeightOnlyConfig``), ``IntxUnpackedToInt8Tensor`` (``IntxWeightOnlyConfig``, torchao's int1-int8 path that
  runs on CPU) and ``Float8Tensor`` (``Float8WeightOnlyConfig``). A merge re-quantizes through PEFT's torchao
  backend with the config rebuilt from what the weight carries (dtype, block size, mapping). torchao's int4 tensors
  (``Int4WeightOnlyConfig``) have no CPU kernels: they are recognised and described, read with their own
  ``dequantize()``, and not merged into.
* **compressed-tensors**: transformers loads these checkpoints as plain ``nn.Linear`` layers carrying a
  ``quantization_scheme``: compressed (``weight_packed``/``weight_scale``... until the model's first forward, whose
  hook decompresses every layer), decompressed (a float weight on the quantization grid) or frozen (fake-quantized
  on every forward). Weight-only schemes are read and re-quantized with compressed-tensors' own compressors and
  fake-quantizer; schemes that also quantize activations are readable but not merged into.
* **AWQ** (gptqmodel's ``AWQuantLinear`` layers): ``AwqTorchLinear`` (gptqmodel's CPU kernel) is read with
  gptqmodel's ``dequantize_gemm`` and re-quantized by round-to-nearest per group into the same bits and group size
  through the layer's own ``pack``; other AWQ kernels repack the codes for their hardware and are described only.
"""

from __future__ import annotations

import copy
import math
import sys
from typing import Any, Callable, Optional

import torch
from torch import nn

from .quant_formats import BaseFormat, BufferStateFormat, WeightFormat, _clone, _Owner


def _loaded(module: str):
    """The module if something already imported it (so one of its layers can exist), else ``None``."""
    return sys.modules.get(module)


def _rows_scaled(scale: torch.Tensor, factor: torch.Tensor) -> None:
    """Multiply row ``o`` of a ``(out, groups)`` scale tensor by ``factor[o]`` in place (in float64, then back)."""
    scale.copy_((scale.to(torch.float64) * factor.detach().to(torch.float64).view(-1, 1)).to(scale.dtype))


# ---- HQQ -----------------------------------------------------------------------------------------------------------


class HqqFormat(WeightFormat):
    """``hqq.core.quantize.HQQLinear``: packed codes ``W_q`` and a ``meta`` dict (scale, zero, shape, bits...)."""

    frozen_forward = True  # its own forward saves its input or a float weight for backward

    input_grad_fix = (
        "HQQ's ATEN/forward-only backends compute no input gradient; select a backprop backend before training: "
        "HQQLinear.set_backend(HQQBackend.PYTORCH) (or ATEN_BACKPROP)"
    )

    @classmethod
    def matches(cls, layer: nn.Module) -> bool:
        hqq = _loaded("hqq.core.quantize")
        return hqq is not None and isinstance(layer, hqq.HQQLinear)

    def _params(self) -> dict[str, Any]:
        return self.layer.quant_config["weight_quant_params"]

    def _facts(self) -> BaseFormat:
        layer, params = self.layer, self._params()
        nbits = self.layer.meta.get("nbits", params["nbits"])
        bits = math.ceil(nbits)
        scheme = f"int{bits}" if nbits == bits else f"{nbits}-bit"
        quantized_meta = bool(self.layer.meta.get("quant_scale") or self.layer.meta.get("quant_zero"))
        return BaseFormat("hqq", scheme, bits, "linear", layer.in_features, layer.out_features, True, quantized_meta,
                          params.get("group_size"))

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.layer.compute_dtype

    def _peft_backend(self):
        from peft.utils.quantization_utils import HqqBackend

        return HqqBackend()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._peft_backend().get_base_weight(self.layer).to(dtype, copy=True)

    def save_state(self) -> dict[str, Any]:
        # W_q is an nn.Parameter: keep the object (the model's parameter) and a copy of its codes
        return {"W_q": self.layer.W_q, "codes": _clone(self.layer.W_q), "meta": copy.deepcopy(self.layer.meta)}

    def restore_state(self, state: dict[str, Any]) -> None:
        w_q = state["W_q"]
        w_q.data = state["codes"].clone()
        self.layer.W_q = w_q
        self.layer.meta = copy.deepcopy(state["meta"])

    def _store(self, weight: torch.Tensor) -> None:
        """PEFT's HQQ backend re-quantizes into a new ``HQQLinear`` with this layer's ``quant_config``; its codes and
        metadata then move into this layer (PEFT would replace the module, which the model and the saved state
        still reference)."""
        owner = _Owner(self.layer)
        self._peft_backend().set_base_weight(owner, weight.to(torch.float32))
        fresh = owner.base_layer
        with torch.no_grad():
            self.layer.W_q = nn.Parameter(fresh.W_q.data.to(self.layer.W_q.dtype), requires_grad=False)
        self.layer.meta = fresh.meta

    def fold_output_scale(self, factor: torch.Tensor) -> bool:
        """Exact where each scale group lies inside one output row (``axis=1``) and the scales are not quantized."""
        meta, params = self.layer.meta, self._params()
        group = params.get("group_size") or self.layer.in_features
        if meta.get("axis", params.get("axis")) != 1 or "scale" not in meta or self.layer.in_features % group:
            return False
        _rows_scaled(meta["scale"].view(self.layer.out_features, -1), factor)  # (out, groups per row)
        return True


# ---- torchao -------------------------------------------------------------------------------------------------------


def _granularity(weight: torch.Tensor, per_row: Callable[[], Any]) -> Optional[Any]:
    """The torchao granularity of a weight's ``block_size`` (``per_row`` builds the per-output-channel one), or
    ``None`` for a block shape no weight-only config produces."""
    from torchao.quantization.granularity import PerGroup, PerTensor

    rows, cols = weight.shape[-2:]
    block_rows, block_cols = list(weight.block_size)[-2:]
    if block_rows == 1:
        return per_row() if block_cols == cols else PerGroup(block_cols)
    return PerTensor() if (block_rows, block_cols) == (rows, cols) else None


def _symmetric(weight: torch.Tensor) -> bool:
    zero = getattr(weight, "zero_point", None)
    return zero is None or not bool(zero.any())


def _int8_config(weight: torch.Tensor) -> Optional[Any]:
    from torchao.quantization import Int8WeightOnlyConfig
    from torchao.quantization.granularity import PerRow

    granularity = _granularity(weight, PerRow)
    if granularity is None or weight.reduce_range or not _symmetric(weight):
        return None  # not something Int8WeightOnlyConfig makes: no config reproduces it
    return Int8WeightOnlyConfig(granularity=granularity, set_inductor_config=False)


def _float8_config(weight: torch.Tensor) -> Optional[Any]:
    from torchao.quantization import Float8WeightOnlyConfig
    from torchao.quantization.granularity import PerRow

    granularity = _granularity(weight, PerRow)
    if granularity is None:
        return None
    return Float8WeightOnlyConfig(weight_dtype=weight.qdata.dtype, granularity=granularity, set_inductor_config=False)


def _intx_config(weight: torch.Tensor) -> Optional[Any]:
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis
    from torchao.quantization.quant_primitives import MappingType

    granularity = _granularity(weight, lambda: PerAxis(0))
    if granularity is None or type(granularity).__name__ == "PerTensor":
        return None
    mapping = MappingType.SYMMETRIC if _symmetric(weight) else MappingType.ASYMMETRIC
    return IntxWeightOnlyConfig(weight_dtype=weight.target_dtype, granularity=granularity, mapping_type=mapping,
                                scale_dtype=weight.scale.dtype)


def _int8_weight_only(weight: torch.Tensor) -> bool:
    return weight.act_quant_kwargs is None and weight.act_pre_scale is None


#: torchao weight classes read here: name -> (bits, scheme, is weight-only, config to re-quantize with or None)
_TORCHAO_KINDS: dict[str, tuple[Callable, Callable, Callable, Optional[Callable]]] = {
    "Int8Tensor": (lambda w: 8, lambda w: "int8", _int8_weight_only, _int8_config),
    "IntxUnpackedToInt8Tensor": (lambda w: int(str(w.target_dtype).removeprefix("torch.int")),
                                 lambda w: str(w.target_dtype).removeprefix("torch."),
                                 lambda w: w.activation_quantization is None, _intx_config),
    "Float8Tensor": (lambda w: 8, lambda w: str(w.qdata.dtype).removeprefix("torch."),
                     lambda w: w.act_quant_kwargs is None, _float8_config),
    # Int4WeightOnlyConfig's tensors: CUDA/XPU kernels only (no CPU forward), so described and read, never merged
    "Int4Tensor": (lambda w: 4, lambda w: "int4", lambda w: True, None),
    "Int4TilePackedTo4dTensor": (lambda w: 4, lambda w: "int4", lambda w: True, None),
    "Int4PlainInt32Tensor": (lambda w: 4, lambda w: "int4", lambda w: True, None),
}


class TorchaoFormat(WeightFormat):
    """An ``nn.Linear`` whose weight is one of torchao's weight-only tensor subclasses (see :data:`_TORCHAO_KINDS`).

    The layer's forward is torchao's ``F.linear`` override (differentiable w.r.t. the input); merging re-quantizes
    with the config the weight's own attributes describe, so the merged layer keeps torchao's format.
    """

    frozen_forward = True  # its own forward saves its input or a float weight for backward

    input_grad_fix = ("quantize with a torchao weight-only config (Int8WeightOnlyConfig, IntxWeightOnlyConfig, "
                      "Float8WeightOnlyConfig)")

    @staticmethod
    def kind(weight: Any) -> Optional[tuple]:
        """The :data:`_TORCHAO_KINDS` entry of a weight-only torchao weight, else ``None``."""
        if not isinstance(weight, torch.Tensor) or not type(weight).__module__.startswith("torchao"):
            return None
        entry = _TORCHAO_KINDS.get(type(weight).__name__)
        return entry if entry is not None and entry[2](weight) else None

    @classmethod
    def matches(cls, layer: nn.Module) -> bool:
        return (_loaded("torchao") is not None and isinstance(layer, nn.Linear)
                and cls.kind(getattr(layer, "weight", None)) is not None)

    def _config(self) -> Optional[Any]:
        make = self.kind(self.layer.weight)[3]
        return None if make is None else make(self.layer.weight)

    def _facts(self) -> BaseFormat:
        weight, layer = self.layer.weight, self.layer
        bits, scheme = self.kind(weight)[0](weight), self.kind(weight)[1](weight)
        cols = weight.shape[-1]
        group = list(weight.block_size)[-1] if list(weight.block_size)[-2] == 1 else None
        return BaseFormat("torchao", scheme, bits, "linear", layer.in_features, layer.out_features,
                          self._config() is not None, False, group if group and group < cols else None)

    def check_mergeable(self) -> None:
        if not self.mergeable:
            raise TypeError(
                f"{self.facts.label} layers ({type(self.layer.weight).__name__}) cannot be merged into: no torchao "
                "weight-only config that runs here reproduces this weight (int4 tensors need CUDA kernels; other "
                "block shapes or options have no config). Fix: keep the adapter unmerged, or call `unload()` to get "
                "the untouched base model back."
            )

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.layer.weight.dtype

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        try:
            return self.layer.weight.dequantize().to(dtype, copy=True)
        except NotImplementedError as exc:
            raise NotImplementedError(
                f"torchao's {type(self.layer.weight).__name__} cannot dequantize on {self.layer.weight.device}. Fix: "
                "move the model to the device its kernels need (CUDA for int4), or keep the adapter unmerged."
            ) from exc

    def save_state(self) -> dict[str, Any]:
        weight = self.layer.weight
        names, _ = weight.__tensor_flatten__()
        return {"weight": weight, "inner": {name: _clone(getattr(weight, name)) for name in names}}

    def restore_state(self, state: dict[str, Any]) -> None:
        weight = state["weight"]  # the original parameter (a merge replaces it), its inner tensors put back
        for name, tensor in state["inner"].items():
            setattr(weight, name, tensor.clone())
        self.layer.weight = weight

    def _store(self, weight: torch.Tensor) -> None:
        from peft.utils.quantization_utils import TorchaoBackend

        config = self._config()
        TorchaoBackend(lambda: config).set_base_weight(_Owner(self.layer), weight.to(self.layer.weight.dtype))

    def fold_output_scale(self, factor: torch.Tensor) -> bool:
        """Exact where the weight's scales are per output row (``(out, groups)``)."""
        weight = self.layer.weight
        scale = getattr(weight, "scale", None)
        if not self.mergeable or list(weight.block_size)[-2] != 1 or scale is None or scale.dim() != 2 \
                or scale.shape[0] != self.layer.out_features:
            return False
        _rows_scaled(scale, factor)
        return True


# ---- compressed-tensors --------------------------------------------------------------------------------------------


class CompressedTensorsFormat(WeightFormat):
    """An ``nn.Linear`` carrying a compressed-tensors ``quantization_scheme`` (how transformers loads such models).

    Its state follows compressed-tensors' lifecycle: ``compressed`` (the stored tensors of the scheme's compressor,
    e.g. ``weight_packed``/``weight_scale``/``weight_shape``; the model's first forward decompresses every layer),
    ``decompressed`` (a float weight on the quantization grid, used as is) or ``frozen``/``initialized`` (a float
    weight fake-quantized with ``weight_scale``/``weight_zero_point`` on every forward). Each method below reads the
    current state, so a layer decompressed by the library between two calls is still described right.
    """

    frozen_forward = True  # in the frozen (fake-quantized) state its forward saves a float copy of the weight

    input_grad_fix = "report this compressed-tensors scheme to peft-quant"
    _GRID_STRATEGIES = ("group", "channel", "tensor")

    @classmethod
    def matches(cls, layer: nn.Module) -> bool:
        ct = _loaded("compressed_tensors")
        return (ct is not None and isinstance(layer, nn.Linear)
                and getattr(layer, "quantization_scheme", None) is not None
                and getattr(layer, "quantization_status", None) is not None)

    @property
    def _scheme(self):
        return self.layer.quantization_scheme

    def _status(self) -> str:
        return str(getattr(self.layer.quantization_status, "value", self.layer.quantization_status))

    def _weight_only(self) -> bool:
        scheme = self._scheme
        return scheme.weights is not None and scheme.input_activations is None and scheme.output_activations is None

    def _facts(self) -> BaseFormat:
        args = self._scheme.weights
        layer = self.layer
        if args is None:
            scheme, bits, group = "activations-only", 0, None
        else:
            kind = "fp" if str(getattr(args.type, "value", args.type)) == "float" else "int"
            scheme, bits = f"{kind}{args.num_bits}", int(args.num_bits)
            if not self._weight_only():
                scheme = f"w{args.num_bits}a{(self._scheme.input_activations or args).num_bits}"
            group = args.group_size if str(getattr(args.strategy, "value", args.strategy)) == "group" else None
        strategy = str(getattr(getattr(args, "strategy", None), "value", getattr(args, "strategy", None)))
        mergeable = self._weight_only() and strategy in self._GRID_STRATEGIES and not getattr(args, "dynamic", False)
        return BaseFormat("compressed-tensors", scheme, bits, "linear", layer.in_features, layer.out_features,
                          mergeable, False, group)

    def check_mergeable(self) -> None:
        if not self.mergeable:
            raise TypeError(
                f"{self.facts.label} layers cannot be merged into: the scheme quantizes activations too (or uses a "
                "block/dynamic weight strategy), so no float weight written into it reproduces its forward. Fix: keep "
                "the adapter unmerged, or load the model with CompressedTensorsConfig(dequantize=True) to train on "
                "float weights."
            )

    @property
    def compute_dtype(self) -> torch.dtype:
        scale = getattr(self.layer, "weight_scale", None)
        weight = getattr(self.layer, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.element_size() > 1:
            return weight.dtype
        return scale.dtype if isinstance(scale, torch.Tensor) else torch.float32

    def _compressor(self):
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.compressors.format import infer_module_format
        from compressed_tensors.config import CompressionFormat

        scheme = self._scheme
        fmt = CompressionFormat(scheme.format or infer_module_format(type(self.layer), scheme))
        return BaseCompressor.get_value_from_registry(fmt.value)

    def _state(self) -> dict[str, torch.Tensor]:
        from compressed_tensors.utils import get_direct_state_dict

        return get_direct_state_dict(self.layer)

    def _fake_quantizes(self) -> bool:
        """Whether the forward fake-quantizes the weight (compressed-tensors skips it where a layer's
        ``quantization_enabled`` is false)."""
        return bool(getattr(self.layer, "quantization_enabled", True))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        status = self._status()
        if status == "compressed":
            weight = self._compressor().decompress(self._state(), self._scheme)["weight"]
        elif status == "decompressed" or self._scheme.weights is None or not self._fake_quantizes():
            weight = self.layer.weight
        else:  # frozen / initialized / calibration: the forward fake-quantizes the float weight each call
            from compressed_tensors.quantization.lifecycle.forward import forward_quantize

            weight = forward_quantize(self.layer, self.layer.weight.detach(), "weight", self._scheme.weights)
        return weight.detach().to(dtype, copy=True)

    def save_state(self) -> dict[str, Any]:
        return {"status": self.layer.quantization_status,
                "tensors": {name: _clone(t) for name, t in self._state().items()}}

    def _replace(self, tensors: dict[str, torch.Tensor]) -> None:
        from compressed_tensors.utils import replace_direct_state_dict

        replace_direct_state_dict(self.layer, tensors)

    def restore_state(self, state: dict[str, Any]) -> None:
        """Put the saved tensors back; a layer saved compressed and decompressed since (the model's first forward
        decompresses every layer once, and removes its hook) is decompressed again by compressed-tensors itself."""
        now = self._status()
        self._replace({name: t.clone() for name, t in state["tensors"].items()})
        self.layer.quantization_status = state["status"]
        if self._status() == "compressed" and now == "decompressed":
            self._compressor().decompress_module(self.layer)

    def _qparams(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Min-max scale and zero point of ``weight`` for the layer's weight arguments, in the layer's shapes."""
        from compressed_tensors.quantization.utils import calculate_qparams

        args = self._scheme.weights
        strategy = str(getattr(args.strategy, "value", args.strategy))
        rows, cols = weight.shape
        width = {"group": args.group_size, "channel": cols, "tensor": rows * cols}[strategy]
        grouped = weight.reshape(-1, width) if strategy != "tensor" else weight.reshape(1, -1)  # (blocks, width)
        scale, zero = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
        shape = (1,) if strategy == "tensor" else (rows, -1)
        return scale.reshape(shape), zero.reshape(shape)

    def _store(self, weight: torch.Tensor) -> None:
        """Quantize ``weight`` with compressed-tensors' own compressor of the layer's format (min-max qparams for
        the layer's bits, strategy and group size), then hold it in the layer's current state: compressed as is,
        decompressed through the compressor (as compressed-tensors' ``decompress_module`` does), or, where the
        forward fake-quantizes, as the float weight with the new qparams."""
        state = self._state()
        status = self._status()
        scale_shape, scale_dtype = state["weight_scale"].shape, state["weight_scale"].dtype
        target = weight.to(scale_dtype if status == "compressed" else self.layer.weight.dtype)
        scale, zero = self._qparams(target.to(torch.float32))
        dense = {k: v for k, v in state.items() if k not in ("weight", "weight_packed", "weight_shape",
                                                              "weight_zero_point", "weight_scale")}
        dense.update(weight=target, weight_scale=scale.to(scale_dtype).reshape(scale_shape),
                     weight_zero_point=zero.reshape(scale_shape))  # the compressor drops it where symmetric
        if status not in ("compressed", "decompressed"):  # a calibrated layer: its float weight, fake-quantized by
            kept = {**state, "weight": target, "weight_scale": dense["weight_scale"]}  # each forward
            if "weight_zero_point" in state:
                kept["weight_zero_point"] = dense["weight_zero_point"].to(state["weight_zero_point"].dtype)
            self._replace(kept)
            return
        compressor = self._compressor()
        compressed = compressor.compress(dense, self._scheme)
        self._replace(compressed if status == "compressed" else compressor.decompress(compressed, self._scheme))


# ---- AWQ (gptqmodel) -----------------------------------------------------------------------------------------------


class AwqFormat(BufferStateFormat):
    """gptqmodel's AWQ layers (``AWQuantLinear``; they also subclass gptqmodel's ``BaseQuantLinear``, which the GPTQ
    format matches except for these). ``AwqTorchLinear`` keeps the AWQ GEMM layout it was loaded with: read with
    gptqmodel's ``dequantize_gemm``, written back with the layer's own ``pack`` (asymmetric round-to-nearest per
    group, the layer's bits and group size). Other AWQ kernels repack the codes at load time and are described only.
    """

    @property
    def frozen_forward(self) -> bool:  # its own forward saves its input; kernels that repack cannot be read back
        return self._readable()

    input_grad_fix = ('load the AWQ model with gptqmodel\'s torch kernel (backend="awq_torch"), whose forward is plain '
                      "torch")

    @staticmethod
    def _qlinear():
        if _loaded("gptqmodel") is None:
            return None
        import gptqmodel.nn_modules.qlinear as qlinear

        return qlinear

    @classmethod
    def matches(cls, layer: nn.Module) -> bool:
        qlinear = cls._qlinear()
        return qlinear is not None and isinstance(layer, qlinear.AWQuantLinear)

    def _readable(self) -> bool:
        from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear

        return isinstance(self.layer, AwqTorchLinear)

    def _group(self) -> int:
        group = int(self.layer.group_size)
        return group if group > 0 else self.layer.in_features

    def _facts(self) -> BaseFormat:
        layer = self.layer
        group = int(layer.group_size)
        return BaseFormat("awq", f"int{layer.bits}", int(layer.bits), "linear", layer.in_features, layer.out_features,
                          self._readable(), False, group if group > 0 else None)

    def check_mergeable(self) -> None:
        if not self.mergeable:
            raise TypeError(
                f"{self.facts.label} layers of {type(self.layer).__name__} cannot be read or merged into: this kernel "
                "repacks the AWQ codes for its hardware. Fix: keep the adapter unmerged, or load the model with "
                'gptqmodel\'s torch AWQ kernel (backend="awq_torch") to merge or use QuantFull.'
            )

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.layer.scales.dtype  # AWQ kernels compute in fp16/bf16 (float32 inputs run in float16)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if not self._readable():
            self.check_mergeable()
        from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

        layer = self.layer
        weight = dequantize_gemm(layer.qweight, layer.qzeros, layer.scales, layer.bits, self._group())  # (in, out)
        return weight.T.to(dtype).contiguous()

    _BUFFERS = ("qweight", "qzeros", "scales")

    def _store(self, weight: torch.Tensor) -> None:
        """Asymmetric min-max round-to-nearest per group (AWQ's own scale search needs calibration data; its
        scaling is already folded into the weight), packed by the layer's ``pack`` into the same layout."""
        layer, group = self.layer, self._group()
        top = 2 ** layer.bits - 1
        weight = weight.to(torch.float32)
        grouped = weight.reshape(layer.out_features, -1, group)  # (out, groups, group)
        low = grouped.amin(-1).clamp(max=0.0)
        high = grouped.amax(-1).clamp(min=0.0)
        # the scales as stored (fp16/bf16): pack rounds (w + zero·scale) / scale with them, as the forward uses them
        scales = ((high - low) / top).clamp(min=1e-6).to(layer.scales.dtype)  # (out, groups)
        zeros = torch.round(-low / scales.to(torch.float32)).clamp(0, top)
        source = nn.Linear(layer.in_features, layer.out_features, bias=False)
        source.weight = nn.Parameter(weight, requires_grad=False)
        dtype, bias = layer.scales.dtype, layer.bias
        layer.pack(source, scales, zeros)  # re-registers qweight, qzeros, scales (and bias: None, put back below)
        layer.bias = bias
        layer.scales = layer.scales.to(dtype)


#: probed in this order (before peft-quant's bitsandbytes, GPTQ and float formats)
FORMATS: tuple[type[WeightFormat], ...] = (HqqFormat, TorchaoFormat, CompressedTensorsFormat, AwqFormat)
