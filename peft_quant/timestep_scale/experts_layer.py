"""TimestepScale on mixture-of-experts expert banks: per-channel scales per timestep expert *and* per MoE expert.

For the tokens routed to MoE expert ``e`` from a sample of timestep expert ``k``, each projection computes
``s_out[k, e] ⊙ W_e (s_in[k, e] ⊙ x) + b_e``: input scales ``(K, E, in)`` and output scales ``(K, E, out)`` per
projection (gate/up: ``in = H``, ``out = 2I``; down: ``in = I``, ``out = H``), all ones at init, the bias unscaled.

Routing per sample: the MoE block flattens its input ``(batch, seq, H)`` to ``(batch·seq, H)`` row-major before the
bank sees it (``GptOssMLP`` and every transformers/diffusers MoE block do), so token row ``r`` belongs to sample
``r // seq``; the bank's row count must therefore be a multiple of the denoiser's batch, or the layer raises
:class:`~peft_quant.timestep_scale.routing.RoutingError` (a bank fed another layout cannot be routed per sample).
When all samples share one timestep expert, no mapping is needed.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..experts_tuning import ExpertsLayerMixin
from ..kernels.timestep_scale import Experts, scale_channels
from .config import TimestepScaleConfig
from .layer import TimestepScaleLayer
from .routing import RoutingError, TimestepRouter


class TimestepScaleExpertsLayer(ExpertsLayerMixin, TimestepScaleLayer):
    """Wraps an expert bank. Per adapter and projection: ``ts_experts_{proj}_in[name]`` ``(K, E, in)`` and/or
    ``ts_experts_{proj}_out[name]`` ``(K, E, out)``."""

    adapter_layer_names: tuple[str, ...] = (
        "ts_experts_gate_up_in", "ts_experts_gate_up_out", "ts_experts_down_in", "ts_experts_down_out",
    )
    other_param_names: tuple[str, ...] = ("ts_boundaries",)
    #: (projection, side) → the table of its scales
    TABLES: dict[tuple[str, str], str] = {
        ("gate_up_proj", "in"): "ts_experts_gate_up_in", ("gate_up_proj", "out"): "ts_experts_gate_up_out",
        ("down_proj", "in"): "ts_experts_down_in", ("down_proj", "out"): "ts_experts_down_out",
    }

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: TimestepScaleConfig, layer_name: str = "",
                 *, router: TimestepRouter) -> None:
        nn.Module.__init__(self)
        self._init_base(base_layer, adapter_name)
        self.router = router
        for table in self.TABLES.values():
            setattr(self, table, nn.ParameterDict())
        self.ts_boundaries: dict[str, tuple[float, ...]] = {}
        self._bank_rows = 0  # rows of the bank's input in the forward in progress (for per-sample routing)
        self.update_layer(adapter_name, config, layer_name)

    def update_layer(self, adapter_name: str, config: TimestepScaleConfig, layer_name: str = "") -> None:
        """Create adapter ``adapter_name``'s scales: ones (identity) unless ``init_weights=False``."""
        for (proj, side), table in self.TABLES.items():
            if not (config.train_input_scales if side == "in" else config.train_output_scales):
                continue
            out_features, in_features = self.widths(proj)
            scales = torch.ones(config.num_experts, self.num_experts, in_features if side == "in" else out_features)
            if not config.init_weights:
                scales.uniform_(0.5, 1.5)
            getattr(self, table)[adapter_name] = nn.Parameter(scales)
        self.ts_boundaries[adapter_name] = config.boundaries
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def forward(self, hidden_states: torch.Tensor, router_indices: Optional[torch.Tensor] = None,
                routing_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._bank_rows = hidden_states.shape[0]
        return super().forward(hidden_states, router_indices, routing_weights)

    def _token_experts(self, name: str, table: torch.Tensor, tokens: torch.Tensor) -> Experts:
        """``(timestep expert per token row, the single expert or None)`` for the bank rows ``tokens``."""
        index, single = self.router.experts(self.ts_boundaries[name], table.device)
        if single is not None:
            return index, single
        batch = index.shape[0]
        if self._bank_rows % batch:
            raise RoutingError(
                f"A TimestepScale expert bank ({self.base_format.label}) got {self._bank_rows} token rows for a batch "
                f"of {batch} samples with different timestep experts, so its rows cannot be mapped to samples (they "
                "must be the samples' tokens, flattened batch-major). Fix: batch samples of one timestep expert "
                "together, train with num_experts=1, or exclude this bank from target_modules."
            )
        return index[tokens // (self._bank_rows // batch)], None  # (rows,): sample r // seq's expert

    def _scale(self, proj: str, side: str, expert: int, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        table = getattr(self, self.TABLES[(proj, side)])
        for name in self._active_names(table):
            scales = table[name][:, expert]  # (K, width): this MoE expert's scales of every timestep expert
            x = scale_channels(x, scales, self._token_experts(name, scales, tokens), -1)
        return x

    # ---- hooks of the routed loop --------------------------------------------------------------------------------

    def before(self, proj: str, expert: int, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self._scale(proj, "in", expert, x, tokens)

    def after(self, proj: str, expert: int, y: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self._scale(proj, "out", expert, y, tokens)  # before the bias is added: the bias stays unscaled

    # ---- merging -------------------------------------------------------------------------------------------------

    def _side_scales(self, proj: str, side: str, names: list[str]) -> Optional[torch.Tensor]:
        """The product over adapters ``names`` of their single-timestep-expert scales ``(E, width)`` (float64), or
        ``None``; several timestep experts raise with the fix."""
        table = getattr(self, self.TABLES[(proj, side)])
        scales = [s.to(torch.float64) for s in (self._single_expert(n, table) for n in names) if s is not None]
        return torch.stack(scales).prod(0) if scales else None

    def _merged_projection(self, proj: str, weight: torch.Tensor, names: list[str]) -> torch.Tensor:
        """``diag(s_out[e]) W_e diag(s_in[e])`` per MoE expert (the bias is unscaled in the forward, so it stays)."""
        s_in, s_out = self._side_scales(proj, "in", names), self._side_scales(proj, "out", names)
        if s_in is not None:
            weight = weight * s_in[:, None, :]  # (E, 1, in)
        if s_out is not None:
            weight = weight * s_out[:, :, None]  # (E, out, 1)
        return weight

    def get_delta_weight(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Per projection, ``s_out[e] s_in[e]ᵀ`` ``(E, out, in)``: what merging multiplies each expert's weight by."""
        return {proj: self._merged_projection(
                    proj, torch.ones(self.num_experts, *self.widths(proj), dtype=torch.float64), [adapter_name])
                for proj in ("gate_up_proj", "down_proj")}
