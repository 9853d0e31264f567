"""Block-scaled Hub formats on any device: FP8 with 128×128 block scales (DeepSeek-V3/R1, Qwen3-FP8) and MXFP4
(gpt-oss), as layers that train through their input, their formats (:class:`~peft_quant.quant_formats.WeightFormat`
subclasses), and checkpoint folders in those formats.

* :class:`Fp8BlockLinear` holds ``weight`` (float8_e4m3fn ``(out, in)``), ``weight_scale_inv`` (float32
  ``(ceil(out/b0), ceil(in/b1))``) and ``bias``: exactly transformers' ``FP8Linear`` tensors, names, dtypes and
  shapes, so a checkpoint's state dict loads into either.
* :class:`Mxfp4Linear` holds ``weight_blocks`` (uint8 ``(out, in/32, 16)``), ``weight_scales`` (uint8
  ``(out, in/32)``) and ``bias``: gpt-oss names a packed parameter ``p`` as ``p_blocks``/``p_scales``
  (``gate_up_proj_blocks``), so a Linear's ``weight`` is stored as ``weight_blocks``/``weight_scales``; the same
  codec (:func:`~peft_quant.kernels.block_scaled.mxfp4_quantize`) reads gpt-oss' expert banks.

Both compute through :func:`peft_quant.kernels.block_scaled.linear`: tile by tile, weights decoded to the input's
dtype, an input gradient computed from the stored tensors (no float copy of the layer is kept for backward). The
stored tensors are buffers that dtype casts never touch (``model.to(torch.bfloat16)`` sets the compute dtype and casts
the bias only).

transformers' own ``FP8Linear`` (CUDA only) is described by :class:`TransformersFp8Format`, whose
:meth:`~TransformersFp8Format.forward` runs the layer's own kernel forward and the tile-wise input gradient backward
(older transformers' ``FP8Linear`` gives no input gradient at all; newer ones decode the whole layer in backward).

:func:`save_quantized` and :func:`load_quantized` write and read transformers checkpoint folders (``config.json`` with
the ``fp8``/``mxfp4`` ``quantization_config``, safetensors) on CPU.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Union

import torch
from torch import nn

from .kernels.block_scaled import (
    FP8_DTYPE,
    MX_GROUP,
    BlockScaledError,
    Codec,
    Fp8BlockCodec,
    Mxfp4Codec,
    Stored,
    linear,
    matmul_weight,
)
from .quant_formats import BaseFormat, WeightFormat

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _cast_target(fn: Callable[[torch.Tensor], torch.Tensor]) -> Optional[torch.dtype]:
    """The float dtype a ``Module._apply`` function casts float tensors to, or ``None`` for a device move."""
    for dtype in (torch.float16, torch.float32):
        result = fn(torch.empty(0, dtype=dtype))
        if result.dtype != dtype and result.dtype in _FLOAT_DTYPES:
            return result.dtype
    return None


class BlockScaledLinear(nn.Module):
    """A frozen Linear stored in a block-scaled codec (subclasses fix the codec and allocate its tensors)."""

    codec: Codec
    #: scheme name in the format's label
    scheme: ClassVar[str]
    bits: ClassVar[int]

    def __init__(self, in_features: int, out_features: int, bias: bool, stored: Stored,
                 compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        for name, tensor in zip(self.codec.tensor_names, stored):
            self.register_buffer(name, tensor)
        self.compute_dtype = compute_dtype  # what PEFT places adapters in; dtype casts of the module set it
        device = stored[0].device
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear_layer: nn.Linear, **kwargs: Any) -> "BlockScaledLinear":
        """Quantize a float ``nn.Linear`` (its weight's dtype becomes the compute dtype)."""
        weight = linear_layer.weight.detach()
        layer = cls(linear_layer.in_features, linear_layer.out_features, linear_layer.bias is not None,
                    dtype=weight.dtype, device=weight.device, **kwargs)
        layer.requantize_(weight)
        if linear_layer.bias is not None:
            layer.bias.data.copy_(linear_layer.bias.detach())
        return layer

    def stored(self) -> Stored:
        """The codec's tensors, in :attr:`Codec.tensor_names` order."""
        return tuple(getattr(self, name) for name in self.codec.tensor_names)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``(out, in)`` the forward computes with (decoded in float32, cast to ``dtype``)."""
        return self.codec.dequantize(self.stored(), dtype)

    def requantize_(self, weight: torch.Tensor) -> None:
        """Store a float weight ``(out, in)`` in this layer's codec (new tensors: saved copies stay valid)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"A weight of shape {tuple(weight.shape)} does not fit a {self.scheme} layer of shape "
                             f"{(self.out_features, self.in_features)}. Fix: pass the layer's (out, in) weight.")
        for name, tensor in zip(self.codec.tensor_names, self.codec.quantize(weight)):
            setattr(self, name, tensor.to(getattr(self, name).device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.stored(), self.codec, self.bias)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "BlockScaledLinear":
        """Device moves reach the stored tensors; dtype casts (``.to(torch.bfloat16)``, ``.half()``) would corrupt
        codes and scales, so they cast the bias and set :attr:`compute_dtype` only."""
        kept = {name: self._buffers[name] for name in self.codec.tensor_names}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            if self._buffers[name].dtype != old.dtype:
                self._buffers[name] = old.to(self._buffers[name].device)
        target = _cast_target(fn)
        if target is not None:
            self.compute_dtype = target
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Refuse stored tensors of another dtype or shape (``copy_`` would silently cast codes into numbers)."""
        for name in self.codec.tensor_names:
            tensor = state_dict.get(prefix + name)
            mine = getattr(self, name)
            if tensor is not None and (tensor.dtype != mine.dtype or tensor.shape != mine.shape):
                raise BlockScaledError(
                    f"{prefix + name}: the file holds {tensor.dtype} {tuple(tensor.shape)}, a {self.scheme} layer "
                    f"stores {mine.dtype} {tuple(mine.shape)}. Fix: save the checkpoint with its stored tensors as "
                    "they are (no dtype cast), or load it into a model of the checkpoint's own configuration."
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.scheme}, compute_dtype={self.compute_dtype}")


class Fp8BlockLinear(BlockScaledLinear):
    """``weight`` float8_e4m3fn ``(out, in)``, ``weight_scale_inv`` float32 ``(ceil(out/b0), ceil(in/b1))``,
    ``bias``: transformers' ``FP8Linear`` state dict. Any width works (edge blocks partially filled)."""

    bits: ClassVar[int] = 8

    def __init__(self, in_features: int, out_features: int, bias: bool = True, block_size: tuple[int, int] = (128, 128),
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None) -> None:
        self.codec = Fp8BlockCodec(tuple(int(b) for b in block_size))
        b0, b1 = self.codec.block_size
        stored = (torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device),
                  torch.ones(math.ceil(out_features / b0), math.ceil(in_features / b1), device=device))
        super().__init__(in_features, out_features, bias, stored, dtype)

    @property
    def scheme(self) -> str:
        b0, b1 = self.codec.block_size
        return f"fp8 block {b0}x{b1}"


class Mxfp4Linear(BlockScaledLinear):
    """``weight_blocks`` uint8 ``(out, in/32, 16)``, ``weight_scales`` uint8 ``(out, in/32)``, ``bias``; ``in`` must be
    a multiple of 32."""

    codec = Mxfp4Codec()
    scheme: ClassVar[str] = "mxfp4"
    bits: ClassVar[int] = 4

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None) -> None:
        if in_features % MX_GROUP:
            raise BlockScaledError(
                f"MXFP4 stores one scale per {MX_GROUP} input values; a Linear of input width {in_features} is not a "
                f"multiple of {MX_GROUP}. Fix: keep this layer in float (exclude_modules=[...] in quantize_model), or "
                "use backend='fp8', whose blocks may be partially filled."
            )
        groups = in_features // MX_GROUP
        stored = (torch.zeros(out_features, groups, MX_GROUP // 2, dtype=torch.uint8, device=device),
                  torch.full((out_features, groups), 127, dtype=torch.uint8, device=device))
        super().__init__(in_features, out_features, bias, stored, dtype)


# ---- formats -------------------------------------------------------------------------------------------------------


def _clone(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone()


class _StoredTensorsFormat(WeightFormat):
    """A layer whose weight is a codec's tensors (attributes of the layer named :attr:`Codec.tensor_names`): reading,
    exact save/restore and re-quantization are the codec's; subclasses say which codec and the facts."""

    @property
    def codec(self) -> Codec:
        raise NotImplementedError

    def stored(self) -> Stored:
        return tuple(getattr(self.layer, name) for name in self.codec.tensor_names)

    def _put(self, name: str, tensor: torch.Tensor) -> None:
        current = getattr(self.layer, name)
        tensor = tensor.reshape(current.shape).to(current.device)
        if isinstance(current, nn.Parameter):
            current.data = tensor
        else:
            setattr(self.layer, name, tensor)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.codec.dequantize(self.stored(), dtype)

    def save_state(self) -> dict[str, Any]:
        return {name: _clone(getattr(self.layer, name)) for name in self.codec.tensor_names}

    def restore_state(self, state: dict[str, Any]) -> None:
        for name in self.codec.tensor_names:
            self._put(name, state[name].clone())

    def _store(self, weight: torch.Tensor) -> None:
        for name, tensor in zip(self.codec.tensor_names, self.codec.quantize(weight.to(torch.float32))):
            self._put(name, tensor)


class BlockScaledFormat(_StoredTensorsFormat):
    """peft-quant's :class:`Fp8BlockLinear` and :class:`Mxfp4Linear`: merges re-quantize into the same codec (the
    error is reported); block scales cover many output rows or are powers of two, so no per-channel fold is exact."""

    @classmethod
    def matches(cls, layer: nn.Module) -> bool:
        return isinstance(layer, BlockScaledLinear)

    @property
    def codec(self) -> Codec:
        return self.layer.codec

    def _facts(self) -> BaseFormat:
        layer = self.layer
        group = MX_GROUP if isinstance(layer, Mxfp4Linear) else None
        return BaseFormat("peft_quant", layer.scheme, layer.bits, "linear", layer.in_features, layer.out_features,
                          True, group_size=group)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.layer.compute_dtype


def _is_transformers_fp8_linear(layer: nn.Module) -> bool:
    kind = type(layer)
    weight = getattr(layer, "weight", None)
    return (kind.__name__ == "FP8Linear" and kind.__module__.startswith("transformers.")
            and isinstance(weight, torch.Tensor) and weight.dtype == FP8_DTYPE)


class TransformersFp8Format(_StoredTensorsFormat):
    """transformers' ``FP8Linear`` (a CUDA kernel; ``weight`` e4m3 and ``weight_scale_inv`` per block, or one scale
    per tensor when ``block_size`` is ``None``). Recognised by class name and module, so transformers' FP8 module is
    never imported here. Mergeable with float32 scales (re-quantized into the same blocks, error reported); e8m0
    (``ue8m0``) scales are refused for merging."""

    @classmethod
    def matches(cls, layer: nn.Module) -> bool:
        return _is_transformers_fp8_linear(layer)

    @property
    def codec(self) -> Codec:
        block = self.layer.block_size
        return Fp8BlockCodec(tuple(block) if block is not None else (self.layer.out_features, self.layer.in_features))

    def stored(self) -> Stored:
        weight, scale = self.layer.weight, self.layer.weight_scale_inv
        return weight.detach(), scale.detach().reshape(-1, scale.shape[-1]) if scale.dim() else scale.reshape(1, 1)

    def _facts(self) -> BaseFormat:
        layer = self.layer
        block = layer.block_size
        scheme = f"fp8 block {block[0]}x{block[1]}" if block is not None else "fp8 per-tensor"
        mergeable = layer.weight_scale_inv.dtype == torch.float32
        return BaseFormat("transformers", scheme, 8, "linear", layer.in_features, layer.out_features, mergeable)

    def check_mergeable(self) -> None:
        if not self.mergeable:
            raise TypeError(
                f"This FP8Linear stores its scales as {self.layer.weight_scale_inv.dtype} (powers of two), which a "
                "re-quantized weight cannot be written back into exactly. Fix: keep the adapter unmerged, or load the "
                "checkpoint with float32 scales."
            )

    @property
    def compute_dtype(self) -> torch.dtype:
        bias = self.layer.bias
        return bias.dtype if bias is not None else torch.bfloat16

    frozen_forward = True  # the layer's own kernel forward; the input gradient decoded from the stored bytes

    def input_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """``dY · dequant(W)`` tile by tile from the stored tensors (never a float copy of the whole layer)."""
        return matmul_weight(grad, self.stored(), self.codec)


#: probed by :func:`peft_quant.quant_formats.all_formats`
FORMATS: tuple[type[WeightFormat], ...] = (BlockScaledFormat, TransformersFp8Format)


# ---- checkpoints ---------------------------------------------------------------------------------------------------

METHODS = {"fp8": Fp8BlockLinear, "mxfp4": Mxfp4Linear}
_MARKER = {"fp8": "weight_scale_inv", "mxfp4": "weight_blocks"}  # a stored tensor only quantized layers have


def _quant_method(config: dict, path: Path) -> str:
    quant = config.get("quantization_config")
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method not in METHODS:
        raise BlockScaledError(
            f"{path / 'config.json'} has quantization_config {quant!r}; load_quantized reads quant_method 'fp8' or "
            "'mxfp4'. Fix: load other checkpoints with transformers' from_pretrained (or quantize a float model with "
            "peft_quant.quantize_model(model, backend='fp8'))."
        )
    if method == "fp8":
        block = quant.get("weight_block_size")
        if not (isinstance(block, (list, tuple)) and len(block) == 2):
            raise BlockScaledError(
                f"{path}: an fp8 quantization_config without weight_block_size (one scale per tensor) is not read on "
                "CPU. Fix: load it with transformers on a GPU, or re-quantize with weight_block_size [128, 128]."
            )
        if quant.get("activation_scheme", "dynamic") != "dynamic":
            raise BlockScaledError(
                f"{path}: activation_scheme {quant['activation_scheme']!r}; peft-quant's CPU layers are weight-only "
                "(dynamic). Fix: load this checkpoint with transformers on a GPU."
            )
    return method


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No *.safetensors file in {path}. Fix: pass a checkpoint folder saved with "
                                "save_quantized or transformers' save_pretrained (safe_serialization=True).")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(str(file)))
    return tensors


def _build(model_or_class: Union[nn.Module, type], path: Path, dtype: Optional[torch.dtype]) -> nn.Module:
    if isinstance(model_or_class, nn.Module):
        return model_or_class
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    quant = config.quantization_config
    del config.quantization_config  # built in float, then our layers swapped in (transformers would quantize)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = model_or_class._from_config(config, **kwargs) if hasattr(model_or_class, "_from_config") \
        else model_or_class(config)
    model.config.quantization_config = quant
    return model


def _swap(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)


def load_quantized(model_or_class: Union[nn.Module, type], path: Union[str, Path],
                   dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Load a transformers checkpoint folder whose ``config.json`` carries an ``fp8`` (block-scaled) or ``mxfp4``
    ``quantization_config``, on CPU, with :class:`Fp8BlockLinear`/:class:`Mxfp4Linear` where the checkpoint has
    quantized weights.

    ``model_or_class``: a transformers model class (built from the folder's config, in ``dtype`` if given), or an
    already built model whose ``nn.Linear`` layers are swapped. Layers named in ``modules_to_not_convert`` stay
    float; a checkpoint whose tensors do not fit the model (missing or extra tensors, other shapes or dtypes of
    quantized tensors, a quantized tensor for a layer the config keeps in float) is refused, naming the fix.
    """
    from transformers.quantizers.quantizers_utils import should_convert_module

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    method = _quant_method(config, path)
    quant = config["quantization_config"]
    tensors = _read_tensors(path)
    model = _build(model_or_class, path, dtype)
    skip = quant.get("modules_to_not_convert") or None
    marker = "." + _MARKER[method]
    for name in sorted(key.removesuffix(marker) for key in tensors if key.endswith(marker)):
        if not should_convert_module(name, skip):
            raise BlockScaledError(
                f"{path}: the checkpoint holds {method} tensors for {name!r}, which its quantization_config's "
                "modules_to_not_convert keeps in float. Fix: correct modules_to_not_convert in config.json."
            )
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if type(module) is not nn.Linear:
            raise BlockScaledError(
                f"{path}: the checkpoint holds {method} tensors for {name!r}, which in this model is "
                f"{type(module).__name__ if module is not None else 'missing'}, not an nn.Linear. Fix: load it into "
                "the model class the checkpoint was saved from (config.json's architectures)."
            )
        extra = {"block_size": tuple(quant["weight_block_size"])} if method == "fp8" else {}
        weight = module.weight
        _swap(model, name, METHODS[method](module.in_features, module.out_features, module.bias is not None,
                                           dtype=weight.dtype, device=weight.device, **extra))
    _load_checked(model, tensors, path)
    return model


def _load_checked(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``load_state_dict`` that refuses extra tensors and missing ones (tied weights, e.g. a tied ``lm_head``, may be
    absent: they are the same parameter as one that is loaded). Codes for a float tensor (a quantized layer whose
    scales are missing) are refused too: ``load_state_dict`` would cast them into numbers silently."""
    state = model.state_dict(keep_vars=True)
    for key, tensor in tensors.items():
        mine = state.get(key)
        if mine is not None and mine.dtype in _FLOAT_DTYPES and tensor.dtype not in _FLOAT_DTYPES:
            raise BlockScaledError(
                f"{path}: {key} holds {tensor.dtype} codes, but the checkpoint has no scales for that layer, so this "
                "model keeps it in float. Fix: save the checkpoint with every quantized layer's scales "
                "(weight_scale_inv, or weight_blocks with weight_scales), e.g. with peft_quant.save_quantized."
            )
    result = model.load_state_dict(tensors, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    loaded = {id(t) for name, t in model.state_dict(keep_vars=True).items() if name in tensors}
    state = model.state_dict(keep_vars=True)
    missing = [name for name in result.missing_keys if id(state[name]) not in loaded]
    if missing or result.unexpected_keys:
        raise BlockScaledError(
            f"{path} does not fit this model: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
            f"{result.unexpected_keys[:5]}{' ...' if len(result.unexpected_keys) > 5 else ''}. Fix: load it into the "
            "model class and config it was saved from (config.json), with the same modules_to_not_convert."
        )


def save_quantized(model: nn.Module, path: Union[str, Path]) -> None:
    """Write ``model`` (quantized by ``quantize_model(..., backend="fp8" | "mxfp4")`` or loaded by
    :func:`load_quantized`) as a transformers checkpoint folder: ``config.json`` with the Hub's
    ``quantization_config`` (every float ``nn.Linear`` listed in ``modules_to_not_convert``) and
    ``model.safetensors`` with the stored tensors as they are."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import save_model

    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise BlockScaledError("save_quantized writes a base model, and this one holds PEFT adapter layers. Fix: "
                               "merge_and_unload() (or unload()) first, or save the adapter with save_pretrained.")
    layers = [m for m in model.modules() if isinstance(m, BlockScaledLinear)]
    kinds = {(type(m), getattr(m.codec, "block_size", None)) for m in layers}
    if len(kinds) != 1:
        raise BlockScaledError(
            f"save_quantized needs every quantized layer in one format; found {len(kinds)} ("
            f"{sorted(k[0].__name__ for k in kinds)}). Fix: quantize the model with one quantize_model backend "
            "('fp8' or 'mxfp4') first."
        )
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise BlockScaledError("save_quantized writes a transformers checkpoint folder, so the model needs a "
                               "transformers config (model.config). Fix: save a transformers model.")
    kind, block = kinds.pop()
    float_linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    quant: dict[str, Any] = {"quant_method": "mxfp4" if kind is Mxfp4Linear else "fp8"}
    if kind is Fp8BlockLinear:
        quant.update(activation_scheme="dynamic", weight_block_size=list(block))
    quant["modules_to_not_convert"] = float_linears
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(config)
    config.quantization_config = quant
    config.save_pretrained(str(path))
    save_model(model, str(path / "model.safetensors"), metadata={"format": "pt"})
