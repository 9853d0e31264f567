"""The QOFT tuner layer: rotates a base layer's input by a block-diagonal orthogonal matrix.

One class serves every supported base (float or quantized Linear, Conv2d): the rotation acts on the input, so
the base layer's own forward runs unchanged, and only merging needs to touch the weight (through
:mod:`peft_quant.quant_formats`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..distributed import check_4bit_base
from ..kernels import qoft as qoft_kernels
from ..tuner_base import PeftQuantLayer
from .config import QOFTConfig
from .rotation import num_packed, rotate


def block_width(config: QOFTConfig, width: int, where: str, block_size_fix: Optional[str] = None) -> int:
    """The rotation block width ``config`` gives an input of ``width`` (``block_size``, or ``width / num_blocks``), or
    a ValueError naming ``where`` and the fix (``block_size_fix`` replaces the default one for ``block_size``)."""
    if config.block_size is not None:
        if width % config.block_size:
            fix = block_size_fix or (f"choose a block_size that divides {width}, use num_blocks, or exclude this layer "
                                     "from target_modules")
            raise ValueError(
                f"QOFT block_size={config.block_size} does not divide the input width {width} of {where}. Fix: {fix}."
            )
        return config.block_size
    if width % config.num_blocks or width // config.num_blocks < 2:
        raise ValueError(
            f"QOFT num_blocks={config.num_blocks} does not divide the input width {width} of {where} into blocks of "
            f"width >= 2. Fix: choose num_blocks dividing {width} (at most {width // 2}), or set block_size."
        )
    return width // config.num_blocks


class QOFTLayer(nn.Module, PeftQuantLayer):
    """Wraps a base layer; ``forward(x) = base_layer(x R)`` for each active adapter's rotation ``R``.

    Per adapter it holds ``qoft_Q[name]``: ``(blocks, b(b-1)/2)`` packed skew parameters (one block when shared).
    """

    adapter_layer_names: tuple[str, ...] = ("qoft_Q",)
    other_param_names: tuple[str, ...] = ("qoft_block_size", "qoft_num_terms", "qoft_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: QOFTConfig, layer_name: str = "") -> None:
        super().__init__()
        self._init_base(base_layer, adapter_name)
        self.qoft_Q = nn.ParameterDict()
        self.qoft_block_size: dict[str, int] = {}
        self.qoft_num_terms: dict[str, int] = {}
        self.qoft_dropout: dict[str, float] = {}
        self.update_layer(adapter_name, config, layer_name)

    def update_layer(self, adapter_name: str, config: QOFTConfig, layer_name: str = "") -> None:
        """Create adapter ``adapter_name``'s rotation parameters (identity unless ``init_weights=False``)."""
        width = self.in_features
        where = f"layer {layer_name!r}" if layer_name else "this layer"
        block = block_width(config, width, f"{where} ({self.base_format.label})")
        blocks = 1 if config.block_share else width // block
        packed = torch.zeros(blocks, num_packed(block), dtype=torch.float32)
        if not config.init_weights:
            packed.normal_(0.0, 0.1 / block**0.5)
        self.qoft_Q[adapter_name] = nn.Parameter(packed)
        self.qoft_block_size[adapter_name] = block
        self.qoft_num_terms[adapter_name] = config.num_neumann_terms
        self.qoft_dropout[adapter_name] = config.module_dropout
        # PEFT's dtype policy: the base's device and float (compute) dtype; PEFT upcasts to float32 afterwards unless
        # autocast_adapter_dtype=False
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def rotation(self, adapter_name: str) -> torch.Tensor:
        """The adapter's rotation blocks ``(blocks, b, b)`` (one block when shared); one Triton launch on GPUs."""
        return qoft_kernels.cayley_neumann(
            self.qoft_Q[adapter_name], self.qoft_block_size[adapter_name], self.qoft_num_terms[adapter_name]
        )

    def _dropout_keep(self, adapter_name: str) -> Optional[torch.Tensor]:
        """In training with ``module_dropout = p > 0``: which blocks stay (``(blocks, 1, 1)`` bools, each dropped to
        the identity with probability ``p``); ``None`` otherwise."""
        p = self.qoft_dropout[adapter_name]
        if not (self.training and p > 0):
            return None
        count = self.in_features // self.qoft_block_size[adapter_name]
        return torch.rand(count, 1, 1, device=self.qoft_Q[adapter_name].device) >= p

    @property
    def _channel_dim(self) -> int:
        return -3 if self.base_format.layer_type == "conv2d" else -1

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        check_4bit_base(self.get_base_layer(), "QOFT")
        inactive = self._inactive_forward(x, *args, **kwargs)
        if inactive is not None:
            return inactive
        for name in self.active_adapters:
            if name in self.qoft_Q:  # keeps only x and the packed parameters for backward (blocks rebuilt there)
                x = qoft_kernels.rotate_input(x, self.qoft_Q[name], self.qoft_block_size[name],
                                              self.qoft_num_terms[name], self._dropout_keep(name), self._channel_dim)
        out = self.weight_format.forward(x, *args, **kwargs)
        self.weight_format.check_input_grad(x, out)
        return out

    # ---- merging -------------------------------------------------------------------------------------------------

    def _full_blocks(self, adapter_name: str) -> torch.Tensor:
        blocks = self.rotation(adapter_name).detach().to(torch.float64)
        return blocks.expand(self.in_features // blocks.shape[-1], -1, -1)

    def _merged_weight(self, weight: torch.Tensor, names: list[str]) -> torch.Tensor:
        """``W Rᵀ`` for each adapter, last active first, so the merged layer equals the unmerged forward (which
        rotates the input by each active adapter in turn); every input-channel block ``w_j`` becomes ``w_j R_jᵀ``."""
        base = self.get_base_layer()
        if self.base_format.layer_type == "conv2d" and base.groups != 1:
            raise ValueError(
                f"Merging QOFT into a grouped Conv2d (groups={base.groups}) is not supported: a rotation mixes "
                "channels of different groups. Fix: keep the adapter unmerged (its forward is exact)."
            )
        for name in reversed(names):
            weight = rotate(weight, self._full_blocks(name).transpose(-1, -2), dim=1)
        return weight

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The full block-diagonal ``Rᵀ`` (``in × in``) this adapter multiplies the weight by on merge."""
        return torch.block_diag(*self._full_blocks(adapter_name).transpose(-1, -2))

    def __repr__(self) -> str:
        return "qoft." + super().__repr__()

    def extra_repr(self) -> str:
        return f"base={self.base_format.label!r}"
