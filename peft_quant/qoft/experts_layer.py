"""QOFT on mixture-of-experts expert banks: one block-diagonal rotation per MoE expert and projection.

Each expert ``e`` of a bank gets its own rotations: ``R_e`` of the gate/up projection's input (width ``H``) and
``R'_e`` of the down projection's input (width ``I``); the tokens routed to ``e`` are rotated by ``e``'s blocks right
before ``e``'s matmuls, ``gate_up = W_e (R_eᵀ x) + b_e``, so an expert's parameters act only on its own tokens. The
bank (float, or MXFP4 through :class:`~peft_quant.experts.Mxfp4Experts`) is never changed or dequantized whole in
training; merging writes ``W_e R_eᵀ`` per expert (re-quantized into MXFP4, with the error reported).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..experts_tuning import ExpertsLayerMixin
from ..kernels import qoft as qoft_kernels
from .config import QOFTConfig
from .layer import QOFTLayer, block_width
from .rotation import num_packed, rotate


class QOFTExpertsLayer(ExpertsLayerMixin, QOFTLayer):
    """Wraps an expert bank. Per adapter: ``qoft_experts_gate_up[name]`` ``(E, H/b, b(b-1)/2)`` and
    ``qoft_experts_down[name]`` ``(E, I/b, b(b-1)/2)`` packed skew parameters (one block per expert when shared), the
    same packing as :class:`~peft_quant.qoft.layer.QOFTLayer`'s."""

    adapter_layer_names: tuple[str, ...] = ("qoft_experts_gate_up", "qoft_experts_down")
    other_param_names: tuple[str, ...] = ("qoft_experts_block", "qoft_num_terms", "qoft_dropout")
    #: projection → the table of its parameters
    TABLES: dict[str, str] = {"gate_up_proj": "qoft_experts_gate_up", "down_proj": "qoft_experts_down"}

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: QOFTConfig, layer_name: str = "") -> None:
        nn.Module.__init__(self)
        self._init_base(base_layer, adapter_name)
        self.qoft_experts_gate_up = nn.ParameterDict()
        self.qoft_experts_down = nn.ParameterDict()
        self.qoft_experts_block: dict[str, dict[str, int]] = {}  # adapter → {projection: block width}
        self.qoft_num_terms: dict[str, int] = {}
        self.qoft_dropout: dict[str, float] = {}
        self.update_layer(adapter_name, config, layer_name)

    def _block_size(self, config: QOFTConfig, proj: str, where: str) -> int:
        """The block width for projection ``proj``'s input, or an error naming the fix."""
        fix = (f"choose a block_size dividing both expert input widths (hidden {self.widths('gate_up_proj')[1]} and "
               f"intermediate {self.widths('down_proj')[1]}), use num_blocks, or exclude this module")
        return block_width(config, self.widths(proj)[1], f"{proj} of {where} ({self.base_format.label})", fix)

    def update_layer(self, adapter_name: str, config: QOFTConfig, layer_name: str = "") -> None:
        """Create adapter ``adapter_name``'s per-expert rotation parameters (identity unless ``init_weights=False``)."""
        where = f"layer {layer_name!r}" if layer_name else "this expert bank"
        blocks = {proj: self._block_size(config, proj, where) for proj in self.TABLES}
        for proj, table in self.TABLES.items():
            block = blocks[proj]
            count = 1 if config.block_share else self.widths(proj)[1] // block
            packed = torch.zeros(self.num_experts, count, num_packed(block), dtype=torch.float32)
            if not config.init_weights:
                packed.normal_(0.0, 0.1 / block**0.5)
            getattr(self, table)[adapter_name] = nn.Parameter(packed)
        self.qoft_experts_block[adapter_name] = blocks
        self.qoft_num_terms[adapter_name] = config.num_neumann_terms
        self.qoft_dropout[adapter_name] = config.module_dropout
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _keep(self, name: str, proj: str) -> Optional[torch.Tensor]:
        """Module dropout: which blocks of one expert's rotation stay this call (``None`` outside training)."""
        p = self.qoft_dropout[name]
        if not (self.training and p > 0):
            return None
        count = self.widths(proj)[1] // self.qoft_experts_block[name][proj]
        return torch.rand(count, 1, 1, device=getattr(self, self.TABLES[proj])[name].device) >= p

    # ---- hooks of the routed loop --------------------------------------------------------------------------------

    def before(self, proj: str, expert: int, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Rotate expert ``expert``'s tokens by that expert's blocks of each active adapter (``x`` ``(tokens, in)``)."""
        table = getattr(self, self.TABLES[proj])
        for name in self._active_names(table):
            x = qoft_kernels.rotate_input(x, table[name][expert], self.qoft_experts_block[name][proj],
                                          self.qoft_num_terms[name], self._keep(name, proj))
        return x

    def after(self, proj: str, expert: int, y: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return y

    # ---- merging -------------------------------------------------------------------------------------------------

    def _expert_blocks(self, name: str, proj: str) -> torch.Tensor:
        """Adapter ``name``'s rotation blocks of projection ``proj``, ``(E, in/b, b, b)`` in float64 (built in the
        parameters' dtype, as the forward builds them)."""
        packed = getattr(self, self.TABLES[proj])[name].detach()  # (E, count, p)
        block = self.qoft_experts_block[name][proj]
        blocks = qoft_kernels.cayley_neumann(packed.reshape(-1, packed.shape[-1]), block, self.qoft_num_terms[name])
        blocks = blocks.to(torch.float64).view(self.num_experts, -1, block, block)  # (E, count, b, b)
        return blocks.expand(-1, self.widths(proj)[1] // block, -1, -1)

    def _merged_projection(self, proj: str, weight: torch.Tensor, names: list[str]) -> torch.Tensor:
        """``W_e R_eᵀ`` per expert for each adapter, last active first (as :class:`QOFTLayer` merges)."""
        table = getattr(self, self.TABLES[proj])
        for name in reversed(names):
            if name not in table:
                continue
            blocks = self._expert_blocks(name, proj).transpose(-1, -2)
            weight = torch.stack([rotate(weight[e], blocks[e], dim=1) for e in range(self.num_experts)])
        return weight

    def get_delta_weight(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Per projection, the block-diagonal ``R_eᵀ`` of every expert, ``(E, in, in)``: what merging multiplies each
        expert's weight by."""
        return {proj: torch.stack([torch.block_diag(*blocks) for blocks in
                                   self._expert_blocks(adapter_name, proj).transpose(-1, -2)])
                for proj in self.TABLES}
