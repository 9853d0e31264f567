"""The QuantFull tuner layer: a Linear whose whole weight trains as int8 state, updated inside backward.

Forward dequantizes and multiplies. Backward computes the input gradient as usual and hands the weight gradient
straight to the layer's updater (set by :class:`~peft_quant.QuantFullOptimizer`), which applies a fused Lion step
to the int8 state and drops the gradient: no weight gradient outlives its layer's backward. With the Triton kernels
(:mod:`peft_quant.kernels.quant_full`) the weight is dequantized tile by tile inside the matmuls, and where the
updater allows it the weight gradient is never written at all: one kernel computes it tile by tile and applies Lion.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ..kernels.quant_full import int8_matmul
from ..quant_formats import BaseFormat, WeightFormat, describe, read_weight
from ..tuner_base import PeftQuantLayer
from .config import QuantFullConfig
from .int8_state import dequantize_weight, quantize_weight
from .sharding import Int8Weight, RowShard, gather_int8_weight

Updater = Callable[["QuantFullLayer", torch.Tensor], None]


class ReleasedLinear(nn.Module):
    """Stands in for the base Linear after QuantFull took over its weight: shape only, no storage."""

    def __init__(self, in_features: int, out_features: int, label: str) -> None:
        super().__init__()
        self.in_features, self.out_features, self.label = in_features, out_features, label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            f"This layer's original weights ({self.label}) were released when QuantFull took them over as int8 "
            "state; disabling or unloading the adapter cannot bring them back. Fix: use merge_and_unload() for a "
            "float model of the tuned weights, or reload the base model."
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, released={self.label!r}"


class _Int8Linear(torch.autograd.Function):
    """``x Wᵀ`` with ``W`` dequantized from int8 state; backward updates the weight through the layer's updater:
    fused from ``(grad, x)`` where it can (:meth:`QuantFullLayer.update_from_activations`), else by handing it
    ``dL/dW``. Both products run the int8 dequantize-matmul (:func:`~peft_quant.kernels.quant_full.int8_matmul`)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, anchor: torch.Tensor, layer: "QuantFullLayer") -> torch.Tensor:
        ctx.layer = layer
        ctx.save_for_backward(x)
        return int8_matmul(x, *layer.whole_int8_weight())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        layer = ctx.layer
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = int8_matmul(grad, *layer.whole_int8_weight(), transpose_weight=False)
        with torch.autocast(grad.device.type, enabled=False):  # the weight gradient in float32, even under autocast
            grad_2d, x_2d = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])  # (tokens, out), (tokens, in)
            if not layer.update_from_activations(grad_2d, x_2d):
                layer.consume_gradient(grad_2d.T.float() @ x_2d.float())
        return grad_x, None, None


class QuantFullLayer(nn.Module, PeftQuantLayer):
    """Holds one adapter's int8 weight state: ``qf_codes`` (int8), ``qf_scale``, ``qf_outlier_index``,
    ``qf_outlier_value`` (buffers), ``qf_bias`` (float parameter), ``qf_anchor`` (a one-element parameter that makes
    autograd reach this layer's backward even when its input needs no gradient; 1-D because FSDP refuses 0-d ones).

    A layer holds at most one QuantFull adapter, and the base layer's weights are released, so the layer computes
    only while that adapter is active or merged (see :meth:`forward`). ``model_dtype``, an empty buffer, starts in
    the base layer's dtype and follows later casts of the model, so a merge writes a Linear of the model's dtype.

    Under FSDP2 (:func:`peft_quant.distributed.shard_quant_full`) the buffers hold this rank's rows only and
    ``qf_shard`` says which; the matmuls gather the whole int8 weight (:meth:`whole_int8_weight`), and reading or
    saving the whole weight is refused until :func:`peft_quant.distributed.unshard_quant_full` gathers it back."""

    adapter_layer_names: tuple[str, ...] = ("qf_bias", "qf_anchor")
    other_param_names: tuple[str, ...] = ("qf_codes", "qf_scale", "qf_outlier_index", "qf_outlier_value",
                                          "qf_group_size", "qf_train_bias")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: QuantFullConfig, layer_name: str = "") -> None:
        super().__init__()
        self.taken_over = describe(base_layer)
        self._init_base(base_layer, adapter_name)
        if self.base_format.layer_type != "linear":
            raise ValueError(
                f"QuantFull trains Linear layers only; {layer_name or 'this layer'} is {self.base_format.label} "
                f"{self.base_format.layer_type}. Fix: exclude it from target_modules."
            )
        self.layer_name = layer_name
        self.qf_codes, self.qf_scale = BufferDict(persistent=True), BufferDict(persistent=True)
        self.qf_outlier_index, self.qf_outlier_value = BufferDict(persistent=True), BufferDict(persistent=True)
        self.qf_bias, self.qf_anchor = nn.ParameterDict(), nn.ParameterDict()
        self.qf_group_size: dict[str, Optional[int]] = {}
        self.qf_train_bias: dict[str, bool] = {}
        self.updater: Optional[Updater] = None
        self.qf_shard: Optional[RowShard] = None  # set by peft_quant.distributed.shard_quant_full
        self.register_buffer("model_dtype", torch.empty(0, dtype=self._base_dtype(base_layer)), persistent=False)
        self.update_layer(adapter_name, config, layer_name)

    def _base_dtype(self, base: nn.Module) -> torch.dtype:
        """The float dtype ``base`` computes in: its weight's, or a quantized layer's compute dtype (PEFT's probe),
        else its bias's; float32 when none is known."""
        _, dtype = self._get_base_layer_device_and_dtype(base)
        if dtype is not None and dtype.is_floating_point:
            return dtype
        bias = getattr(base, "bias", None)
        return bias.dtype if isinstance(bias, torch.Tensor) and bias.is_floating_point() else torch.float32

    def update_layer(self, adapter_name: str, config: QuantFullConfig, layer_name: str = "") -> None:
        """Quantize the base weight into this adapter's int8 state and release the base layer's storage."""
        where = f"layer {layer_name!r}" if layer_name else "this layer"
        if self.qf_codes:
            raise ValueError(
                f"QuantFull already holds {where}'s weights for adapter {next(iter(self.qf_codes))!r}; a second "
                "QuantFull adapter on the same layers would train a second full copy. Fix: delete the first adapter "
                "or wrap another model."
            )
        if config.group_size is not None and self.in_features % config.group_size:
            raise ValueError(
                f"QuantFull group_size={config.group_size} does not divide the input width {self.in_features} of "
                f"{where}. Fix: choose a group_size dividing it, or None for one scale per output channel."
            )
        base = self.get_base_layer()
        weight = read_weight(base)
        codes, scale, index, value = quantize_weight(weight, config.group_size, config.outlier_fraction)
        self.qf_codes[adapter_name], self.qf_scale[adapter_name] = codes, scale
        self.qf_outlier_index[adapter_name], self.qf_outlier_value[adapter_name] = index, value
        self.qf_group_size[adapter_name] = config.group_size
        self.qf_train_bias[adapter_name] = config.train_bias
        self.stochastic_rounding = config.stochastic_rounding
        self.qf_anchor[adapter_name] = nn.Parameter(torch.zeros(1, device=weight.device))
        bias = getattr(base, "bias", None)
        if bias is not None:
            self.qf_bias[adapter_name] = nn.Parameter(bias.detach().to(torch.float32).clone())
        self.base_layer = self._released()
        self._weight_format = None  # it referenced the base layer: dropping it frees the base weights
        self.set_adapter(self.active_adapters)

    def _released(self) -> ReleasedLinear:
        """The storage-free stand-in that sits in ``base_layer`` whenever the int8 state drives the layer."""
        return ReleasedLinear(self.in_features, self.out_features, self.base_format.label)

    @property
    def base_format(self) -> BaseFormat:
        """The facts of the base layer QuantFull took over (``base_layer`` now holds a stand-in or the merged
        Linear)."""
        return self.taken_over

    @property
    def weight_format(self) -> WeightFormat:
        """Refused: the base layer's format object would be the base weights, which QuantFull released."""
        raise RuntimeError(
            f"QuantFull released the weights of layer {self.layer_name!r} ({self.base_format.label}) when it took "
            "them over as int8 state; there is no base weight to read or write. Fix: use weight_of() for the tuned "
            "weight, or merge_and_unload() for float Linear layers."
        )

    # ---- trainability: PEFT turns every adapter tensor on; biases of train_bias=False adapters stay frozen ----------

    def set_adapter(self, adapter_names: Union[str, list[str]], inference_mode: bool = False) -> None:
        """PEFT's ``set_adapter``, then the biases of ``train_bias=False`` adapters frozen again."""
        super().set_adapter(adapter_names, inference_mode)
        self._freeze_untrained_biases()

    def set_requires_grad(self, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
        """PEFT's ``set_requires_grad``, then the biases of ``train_bias=False`` adapters frozen again."""
        super().set_requires_grad(adapter_names, requires_grad)
        self._freeze_untrained_biases()

    def _freeze_untrained_biases(self) -> None:
        for name, bias in self.qf_bias.items():
            if not self.qf_train_bias[name]:
                bias.requires_grad_(False)

    @property
    def adapter(self) -> str:
        """The one QuantFull adapter this layer holds."""
        if not self.qf_codes:
            raise RuntimeError(
                f"This layer's QuantFull adapter was deleted, and with it the int8 weights that replaced the released "
                f"base ({self.base_format.label}): the layer has no weights left to run. Fix: load the adapter again "
                "(PeftModel.from_pretrained / load_adapter), or reload the base model."
            )
        return next(iter(self.qf_codes))

    def weight_of(self, dtype: torch.dtype = torch.float32, adapter_name: Optional[str] = None) -> torch.Tensor:
        """The current float weight ``(out, in)``, dequantized from the int8 state (refused on a row shard)."""
        self.refuse_row_shard("reading its whole weight (weight_of, merge, get_delta_weight)")
        return dequantize_weight(*self.int8_weight(adapter_name), dtype)

    def int8_weight(self, adapter_name: Optional[str] = None) -> Int8Weight:
        """The int8 state ``(codes, scale, outlier_index, outlier_value, group_size)`` this process holds, as the
        kernels take it: the whole weight, or this rank's rows of a row-sharded layer (``qf_shard``)."""
        name = adapter_name or self.adapter
        return (self.qf_codes[name], self.qf_scale[name], self.qf_outlier_index[name], self.qf_outlier_value[name],
                self.qf_group_size[name])

    def whole_int8_weight(self) -> Int8Weight:
        """The whole int8 weight the matmuls use: :meth:`int8_weight`, gathered from every rank's rows when the layer
        is row-sharded (a collective that every rank of its group runs at the same point of forward and backward)."""
        return self.int8_weight() if self.qf_shard is None else gather_int8_weight(self)

    def refuse_row_shard(self, action: str) -> None:
        """Raise when this layer holds only a row shard of its weight: ``action`` would see a part as the whole."""
        if self.qf_shard is not None:
            raise RuntimeError(
                f"QuantFull layer {self.layer_name!r} holds rows {self.qf_shard.first_row} to "
                f"{self.qf_shard.first_row + self.qf_shard.rows} of its {self.qf_shard.total_rows} (rank "
                f"{self.qf_shard.rank} of {self.qf_shard.world}, shard_quant_full), so {action} would use a part of "
                "the weight as if it were all of it. Fix: call peft_quant.distributed.unshard_quant_full(model, "
                "optimizer) on every rank first (it gathers the whole int8 weight and momentum back)."
            )

    def update_from_activations(self, grad_output: torch.Tensor, x: torch.Tensor) -> bool:
        """Offer the updater this backward's ``grad_output (tokens, out)`` and ``x (tokens, in)`` for a fused update
        that never materialises the weight gradient. True: it updated (or skipped) the weights; False: it cannot fuse
        (an updater without ``update_from_activations``, or one that declines), so the caller computes ``dL/dW`` and
        calls :meth:`consume_gradient`."""
        fused = getattr(self.updater, "update_from_activations", None)
        return fused is not None and fused(self, grad_output, x)

    def consume_gradient(self, grad_weight: torch.Tensor) -> None:
        """Hand the weight gradient to the optimizer's fused step (called from backward)."""
        if self.updater is None:
            raise RuntimeError(
                "A QuantFull layer got a weight gradient, but no QuantFullOptimizer is attached to the model: its "
                "int8 weights can only be updated inside backward. Fix: create peft_quant.QuantFullOptimizer(model, "
                "lr=...) before the first backward (or run without gradients)."
            )
        self.updater(self, grad_weight)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x Wᵀ + b`` from the int8 state, in ``x``'s dtype (the state may have been cast; the codes never are).

        Merged: the tuned float Linear. Disabled: the released stand-in raises, since the base weights are gone (a
        merged layer is unmerged first, so a disabled model never silently runs the tuned weights). An adapter that
        is not active raises too, for the same reason: there is no base output to fall back on."""
        result = self._inactive_forward(x)
        if result is not None:
            return result
        name = self.adapter
        if name not in self.active_adapters:
            raise RuntimeError(
                f"QuantFull layer {self.layer_name!r} holds adapter {name!r}, which is not active (active: "
                f"{self.active_adapters}); its base weights were released, so without that adapter it has nothing to "
                f"compute. Fix: keep every QuantFull adapter active, e.g. model.base_model.set_adapter([{name!r}, "
                f"...]) for adapters on different layers, or merge_and_unload() them all first."
            )
        anchor = self.qf_anchor[name]
        if anchor.is_meta and not x.is_meta:
            raise RuntimeError(
                f"QuantFull adapter {name!r} of layer {self.layer_name!r} has its parameters on the meta device: it "
                "was created with low_cpu_mem_usage=True and its weights were never loaded (the base layer's bias, "
                "copied into the adapter, is not there). Fix: create it with low_cpu_mem_usage=False (QuantFull "
                "quantizes the base weights at wrap time either way), or load a saved adapter into it."
            )
        out = _Int8Linear.apply(x, anchor, self)
        if name in self.qf_bias:
            out = out + self.qf_bias[name].to(out.dtype)
        return out

    # ---- merging -------------------------------------------------------------------------------------------------

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Put a float ``nn.Linear`` with the tuned weights and bias, in the model's dtype, in place of the released
        base. The int8 state is kept: :meth:`unmerge` hands the layer back to it. ``requantization_error[adapter]``
        gets the relative error of the merged weight against the int8 state's (the model dtype's rounding)."""
        names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.qf_codes]
        if not names:
            return
        (name,) = names  # a layer holds one QuantFull adapter (update_layer refuses a second)
        linear = nn.Linear(self.in_features, self.out_features, bias=name in self.qf_bias,
                           device=self.qf_codes[name].device, dtype=self.model_dtype.dtype)
        tuned = self.weight_of(torch.float64, name)
        with torch.no_grad():
            linear.weight.copy_(tuned)
            if name in self.qf_bias:
                linear.bias.copy_(self.qf_bias[name])
            error = (linear.weight.double() - tuned).norm() / tuned.norm().clamp_min(1e-30)
        if safe_merge and not all(torch.isfinite(p).all() for p in linear.parameters()):
            raise ValueError(
                f"NaNs or Infs in the merged weights of adapter {name!r} (layer {self.layer_name!r}, "
                f"{self.model_dtype.dtype}). Fix: merge in a wider dtype (model.float() first) if the values overflow, "
                "or retrain from a checkpoint before the NaNs appeared."
            )
        self.requantization_error[name] = float(error)
        linear.requires_grad_(False)
        self.base_layer = linear
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Put the released stand-in back: the int8 state drives the layer again, exactly as before the merge."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        self.base_layer = self._released()
        self.merged_adapters = []

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The tuned weight itself (QuantFull holds the whole weight, not a delta)."""
        return self.weight_of(torch.float32, adapter_name)

    def __repr__(self) -> str:
        return "quant_full." + super().__repr__()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, was={self.base_format.label!r}"
