"""What every per-expert adapter layer and its tuner share: holding an expert bank, the routed forward with the
adapter's hooks around each expert's matmuls, merge bookkeeping through the bank's format, and the tuner dispatch.

A method's expert layer subclasses its Linear layer (so PEFT and peft-quant's tuner treat it as the method's layer:
``isinstance`` checks, trainable-parameter marking, saving, merging, the model card) with :class:`ExpertsLayerMixin`
first in its bases, and supplies the hooks ``before``/``after`` of :class:`~peft_quant.experts.ExpertHooks`. The
method's tuner puts :class:`ExpertsDispatchMixin` first in its bases and names its expert layer class.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
from torch import nn

from .experts import ExpertsFormat, resolve_experts_format, run_experts
from .quant_formats import UnsupportedLayerError


class ExpertsLayerMixin:
    """The bank-side half of a per-expert adapter layer (mixed into a :class:`~peft_quant.tuner_base.PeftQuantLayer`
    subclass, before it)."""

    base_layer: nn.Module
    _weight_format: ExpertsFormat

    def _resolve(self, base_layer: nn.Module) -> ExpertsFormat:
        """The bank's :class:`~peft_quant.experts.ExpertsFormat` (``in_features`` and ``out_features`` are the bank's
        ``H``; per-projection widths come from :meth:`widths`)."""
        fmt = resolve_experts_format(base_layer)
        if fmt is None:
            raise UnsupportedLayerError(
                f"{type(base_layer).__module__}.{type(base_layer).__qualname__} is not an expert bank this layer can "
                "wrap (transformers' GptOssExperts, or peft_quant.experts.Mxfp4Experts). Fix: target the bank module "
                "itself (e.g. target_modules=[\"experts\"]), or one of those bank types."
            )
        return fmt

    @property
    def num_experts(self) -> int:
        return self.weight_format.num_experts

    def widths(self, proj: str) -> tuple[int, int]:
        """``(out, in)`` of one expert's projection ``proj``."""
        return self.weight_format.widths(proj)

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device, torch.dtype]:
        """Device and float dtype of the bank, for PEFT's placement of new adapter tensors (a bank has no
        ``weight``)."""
        fmt = resolve_experts_format(base_layer)
        return fmt.bias("down_proj").device, fmt.compute_dtype

    def forward(self, hidden_states: torch.Tensor, router_indices: Optional[torch.Tensor] = None,
                routing_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The bank's forward with the active adapters' hooks around each expert's matmuls (the bank's own forward
        when adapters are disabled or merged)."""
        inactive = self._inactive_forward(hidden_states, router_indices, routing_weights)
        if inactive is not None:
            return inactive
        return run_experts(self.weight_format, hidden_states, router_indices, routing_weights, hooks=self)

    def _active_names(self, table: nn.ParameterDict) -> list[str]:
        return [name for name in self.active_adapters if name in table]

    def _merged_weight(self, weight: torch.Tensor, names: list[str]) -> torch.Tensor:
        """The bank's flat weight with adapters ``names`` applied, each projection by :meth:`_merged_projection`."""
        fmt = self.weight_format
        return fmt.join({proj: self._merged_projection(proj, part, names) for proj, part in fmt.split(weight).items()})

    def _merged_projection(self, proj: str, weight: torch.Tensor, names: list[str]) -> torch.Tensor:
        """Projection ``proj``'s weights ``(E, out, in)`` (float64) with adapters ``names`` applied."""
        raise NotImplementedError

    def _fold_exactly(self, names: list[str]) -> bool:
        return False  # expert banks have no per-channel scales to fold into: merges re-quantize

    def extra_repr(self) -> str:
        return f"base={self.weight_format.facts.label!r}, num_experts={self.num_experts}"


class ExpertsDispatchMixin:
    """Tuner side: targeted expert banks get :attr:`experts_layer_cls`, every other layer the method's own layer."""

    experts_layer_cls: ClassVar[type]

    def _create_and_replace(self, config, adapter_name: str, target: nn.Module, target_name: str, parent: nn.Module,
                            current_key: str, **optional_kwargs: Any) -> None:
        try:
            is_bank = resolve_experts_format(target) is not None
        except UnsupportedLayerError as error:
            raise UnsupportedLayerError(f"{current_key}: {error}") from None
        if not is_bank:  # a Linear/Conv2d layer, or an already wrapped one (an expert layer adds the adapter itself)
            return super()._create_and_replace(config, adapter_name, target, target_name, parent, current_key,
                                               **optional_kwargs)
        new_module = self.experts_layer_cls(target, adapter_name, config, current_key, **self._layer_kwargs())
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set active
        self._replace_module(parent, target_name, new_module, target)
