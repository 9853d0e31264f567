"""The StashQuant tuner: trains its target modules fully, with a compressed stash for the whole model."""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .config import StashQuantConfig
from .packer import PACKER_ATTRIBUTE, attach_packer


class StashQuantLayer(nn.Module, BaseTunerLayer):
    """A trainable full copy of the target module per adapter (as PEFT's ``modules_to_save``), saved with it."""

    adapter_layer_names: tuple[str, ...] = ("stash_module",)

    def __init__(self, base_layer: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.stash_module = nn.ModuleDict()
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name)

    def update_layer(self, adapter_name: str) -> None:
        trained = copy.deepcopy(self.base_layer)
        if not any(p.is_floating_point() for p in trained.parameters()):
            raise ValueError(
                f"StashQuant trains its target modules fully, but {type(self.base_layer).__name__} holds no float "
                "parameters (a quantized layer?). Fix: target float modules, or use "
                "peft_quant.enable_stash(...) with QOFT, TimestepScale or QuantFull on quantized layers."
            )
        self.stash_module[adapter_name] = trained
        self.set_adapter(self.active_adapters)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        active = [a for a in self.active_adapters if a in self.stash_module]
        if self.disable_adapters or self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        return self.stash_module[active[-1]](x, *args, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Copy the trained module's state into the base module."""
        for name in check_adapters_to_merge(self, adapter_names)[-1:]:
            self.base_layer.load_state_dict(self.stash_module[name].state_dict())
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        raise RuntimeError("StashQuant merges by overwriting the base module with the trained one; it cannot unmerge.")


class StashQuantModel(BaseTuner):
    """Created by ``peft.get_peft_model`` with a :class:`~peft_quant.StashQuantConfig`."""

    prefix: str = "stash_"
    tuner_layer_cls = StashQuantLayer
    target_module_mapping: dict = {}

    def _prepare_model(self, peft_config: StashQuantConfig, model: nn.Module) -> None:
        attach_packer(model, **peft_config.packer_settings())

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs) -> None:
        if isinstance(target, StashQuantLayer):
            target.update_layer(adapter_name)
            return
        new_module = StashQuantLayer(target, adapter_name)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any):
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        packer = model.__dict__.pop(PACKER_ATTRIBUTE, None)
        if packer is not None:
            packer.detach()
        return model
