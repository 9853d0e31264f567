"""The TimestepScale tuner layer: per-sample, per-expert channel scales around an untouched (quantized) layer.

``forward(x) = s_out[k] ⊙ (base(s_in[k] ⊙ x) - b) + b`` with ``k`` each sample's timestep expert (computed as
``out ⊙ s_out + b ⊙ (1 − s_out)``, which gives the base layer's output bit for bit at init), so the base layer's own
kernel runs on the scaled input and no float copy of its weight is ever made. One class serves every base (float,
peft-quant int, bitsandbytes, GPTQ; Linear or Conv2d): only merging touches the weight, through
:mod:`peft_quant.quant_formats`.

Both scalings go through :mod:`peft_quant.kernels.timestep_scale` (a Triton kernel on CUDA, the plain PyTorch
gather-and-multiply elsewhere); with the kernels on, one adapter on peft-quant's own ``IntLinear`` runs as a single
dequantize-matmul kernel with both scalings and the bias fused.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from ..distributed import check_4bit_base
from ..int_quant import IntLinear
from ..kernels.backend import use_triton
from ..kernels.timestep_scale import int_linear, scale_channels
from ..tuner_base import PeftQuantLayer
from .config import TimestepScaleConfig
from .routing import RoutingError, TimestepRouter


class TimestepScaleLayer(nn.Module, PeftQuantLayer):
    """Wraps a base layer. Per adapter: ``ts_scale_in[name]`` ``(K, in)`` and/or ``ts_scale_out[name]`` ``(K, out)``."""

    adapter_layer_names: tuple[str, ...] = ("ts_scale_in", "ts_scale_out")
    other_param_names: tuple[str, ...] = ("ts_boundaries",)

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: TimestepScaleConfig,
        layer_name: str = "",
        *,
        router: TimestepRouter,
    ) -> None:
        super().__init__()
        self._init_base(base_layer, adapter_name)
        self.router = router
        self.ts_scale_in = nn.ParameterDict()
        self.ts_scale_out = nn.ParameterDict()
        self.ts_boundaries: dict[str, tuple[float, ...]] = {}
        self.update_layer(adapter_name, config, layer_name)

    def update_layer(self, adapter_name: str, config: TimestepScaleConfig, layer_name: str = "") -> None:
        """Create adapter ``adapter_name``'s scales: ones (identity) unless ``init_weights=False``."""
        for store, width, enabled in (
            (self.ts_scale_in, self.in_features, config.train_input_scales),
            (self.ts_scale_out, self.out_features, config.train_output_scales),
        ):
            if not enabled:
                continue
            scales = torch.ones(config.num_experts, width)
            if not config.init_weights:
                scales.uniform_(0.5, 1.5)
            store[adapter_name] = nn.Parameter(scales)
        self.ts_boundaries[adapter_name] = config.boundaries
        # PEFT's dtype policy: the base's device and float (compute) dtype; PEFT upcasts to float32 afterwards unless
        # autocast_adapter_dtype=False
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    @property
    def _channel_dim(self) -> int:
        return 1 if self.base_format.layer_type == "conv2d" else -1

    def _experts(self, table: torch.Tensor, name: str, x: torch.Tensor) -> tuple[torch.Tensor, Optional[int]]:
        """``(per-sample expert indices, the single expert or None)`` of adapter ``name`` for the batch ``x``, on
        ``table``'s device."""
        index, single = self.router.experts(self.ts_boundaries[name], table.device)
        if single is None and x.shape[0] != index.shape[0]:
            raise RoutingError(
                f"A TimestepScale layer ({self.base_format.label}) got a batch of {x.shape[0]} while the denoiser's "
                f"timesteps are for {index.shape[0]} samples, with different experts. Layers that fold samples into "
                "other dimensions cannot be routed per sample: exclude them from target_modules."
            )
        return index, single

    def _fused(self, active: list[str], x: torch.Tensor, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        """One adapter on an :class:`IntLinear` with the Triton kernels on: the whole forward in one dequantize-matmul
        kernel (``None`` otherwise)."""
        base = self.base_layer
        if len(active) != 1 or args or kwargs or not isinstance(base, IntLinear) or not use_triton(x, base.qweight):
            return None
        table_in, table_out = self.ts_scale_in.get(active[0]), self.ts_scale_out.get(active[0])
        experts = self._experts(table_in if table_in is not None else table_out, active[0], x)
        return int_linear(x, base, base.bias, table_in, table_out, experts)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        check_4bit_base(self.get_base_layer(), "TimestepScale")
        inactive = self._inactive_forward(x, *args, **kwargs)
        if inactive is not None:
            return inactive
        active = [name for name in self.active_adapters if name in self.ts_boundaries]
        fused = self._fused(active, x, args, kwargs)
        if fused is not None:
            return fused
        for name in active:
            if name in self.ts_scale_in:
                table = self.ts_scale_in[name]
                x = scale_channels(x, table, self._experts(table, name, x), self._channel_dim)
        out = self.weight_format.forward(x, *args, **kwargs)
        self.weight_format.check_input_grad(x, out)
        bias = getattr(self.get_base_layer(), "bias", None)
        for name in active:  # out ⊙ s + b ⊙ (1 − s) = (out − b) ⊙ s + b: the frozen bias stays unscaled
            if name in self.ts_scale_out:
                table = self.ts_scale_out[name]
                out = scale_channels(out, table, self._experts(table, name, out), self._channel_dim, bias)
        return out

    # ---- merging -------------------------------------------------------------------------------------------------

    def _single_expert(self, name: str, table: torch.ParameterDict) -> Optional[torch.Tensor]:
        if name not in table:
            return None
        if table[name].shape[0] != 1:
            raise ValueError(
                f"Adapter {name!r} has {table[name].shape[0]} timestep experts, and one merged weight cannot hold "
                "several: merging would silently pick one expert for every timestep. Fix: keep the adapter unmerged "
                "(it runs on the quantized layers as they are, swapping scales per step), or train with num_experts=1."
            )
        return table[name].detach()[0]

    def _scales(self, names: list[str]) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The products over adapters ``names`` of their single-expert ``(s_in, s_out)``, in float64 (``None`` where
        no adapter has that side)."""

        def product(table: nn.ParameterDict) -> Optional[torch.Tensor]:
            scales = [s.to(torch.float64) for s in (self._single_expert(n, table) for n in names) if s is not None]
            return math.prod(scales) if scales else None

        return product(self.ts_scale_in), product(self.ts_scale_out)

    def _merged_weight(self, weight: torch.Tensor, names: list[str]) -> torch.Tensor:
        """``diag(s_out) W diag(s_in)``: the frozen bias is unscaled in the forward, so it stays as it is. Only
        single-expert adapters merge: several experts raise (naming the fix) here, before the base is touched. Output
        scales alone fold exactly (:meth:`_fold_exactly`); input scales are re-quantized (exact for float layers)."""
        s_in, s_out = self._scales(names)
        if s_in is not None:
            weight = weight * s_in.view((1, -1) + (1,) * (weight.dim() - 2))
        if s_out is not None:
            weight = weight * s_out.view((-1,) + (1,) * (weight.dim() - 1))
        return weight

    def _fold_exactly(self, names: list[str]) -> bool:
        """Output scales alone fold into the format's per-channel (or per-row block) scales without re-quantizing;
        input scales never do (except the identity)."""
        s_in, s_out = self._scales(names)
        if s_in is not None and not torch.equal(s_in, torch.ones_like(s_in)):
            return False
        return s_out is None or self.weight_format.fold_output_scale(s_out)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``(s_out, s_in)`` of a single-expert adapter as the outer product the weight is multiplied by."""
        s_in = self._single_expert(adapter_name, self.ts_scale_in)
        s_out = self._single_expert(adapter_name, self.ts_scale_out)
        s_in = torch.ones(self.in_features) if s_in is None else s_in
        s_out = torch.ones(self.out_features) if s_out is None else s_out
        return torch.outer(s_out, s_in)

    def __repr__(self) -> str:
        return "timestep_scale." + super().__repr__()

    def extra_repr(self) -> str:
        return f"base={self.base_format.label!r}"
