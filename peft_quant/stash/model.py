"""The StashQuant tuner: trains its target modules fully, with a compressed stash for the whole model."""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..adapter_checks import check_adapter_fits
from .config import StashQuantConfig
from .packer import PACKER_ATTRIBUTE, attach_packer


def _creating_on_meta() -> bool:
    """Whether new parameters are being created on the meta device: PEFT's ``low_cpu_mem_usage`` wraps layer creation
    in ``init_empty_weights``, which moves every parameter a module registers to ``meta``. Asked of a probe, so the
    layer follows PEFT's own switch whichever way it is set."""
    probe = nn.Module()
    probe.register_parameter("probe", nn.Parameter(torch.empty(0)))
    return probe.probe.is_meta


def _copy_module(module: nn.Module, on_meta: bool) -> nn.Module:
    """A deep copy of ``module``; with ``on_meta``, its parameters are created on the meta device (nothing allocated;
    loading the adapter with ``low_cpu_mem_usage=True`` assigns them)."""
    memo: dict[int, Any] = {}
    if on_meta:
        for param in module.parameters():
            memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
    return copy.deepcopy(module, memo)


def _cast_floating(value: Any, dtype: torch.dtype) -> Any:
    """``value`` cast to ``dtype`` when it is a floating tensor of another dtype; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
        return value.to(dtype)
    return value


class StashQuantLayer(nn.Module, BaseTunerLayer):
    """A trainable full copy of the target module per adapter (as PEFT's ``modules_to_save``), saved with it.

    Dtype policy: the copy starts as a deep copy of the base module, in its dtype. With PEFT's default
    ``autocast_adapter_dtype=True`` PEFT upcasts float16/bfloat16 adapter weights, this copy included, to float32, so
    training updates float32 weights; the forward then casts a floating input to the copy's dtype and the output back
    to the input's dtype, so a bfloat16 model runs unchanged around it. With ``autocast_adapter_dtype=False`` the copy
    stays in the base dtype. Merging copies the trained state into the base module in the base module's own dtype.

    Merging keeps a copy of the base module's state, so ``unmerge()`` restores it bit for bit and a disabled adapter
    gives the base output (a forward with adapters disabled unmerges first, as PEFT's LoRA does). The copies of two
    adapters replace each other rather than add up: one adapter at a time can be active or merged on a module.
    """

    adapter_layer_names: tuple[str, ...] = ("stash_module",)
    other_param_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.stash_module = nn.ModuleDict()
        self.merged_adapters: list[str] = []
        self._unmerged_state: Optional[dict[str, torch.Tensor]] = None  # the base state while merged
        self._active_adapter = adapter_name
        for name in ("in_features", "out_features"):  # what PEFT and users read off a tuner layer
            if hasattr(base_layer, name):
                setattr(self, name, getattr(base_layer, name))
        self.update_layer(adapter_name)

    def update_layer(self, adapter_name: str) -> None:
        """Add ``adapter_name``'s trainable copy of the base module."""
        if not any(p.is_floating_point() for p in self.base_layer.parameters()):
            raise ValueError(
                f"StashQuant trains its target modules fully, but {type(self.base_layer).__name__} holds no float "
                "parameters (a quantized layer?). Fix: target float modules, or use "
                "peft_quant.enable_stash(...) with QOFT, TimestepScale or QuantFull on quantized layers."
            )
        self.stash_module[adapter_name] = _copy_module(self.base_layer, on_meta=_creating_on_meta())
        self.set_adapter(self.active_adapters)

    def _single(self, adapter_names: list[str], action: str) -> Optional[str]:
        """The one adapter of ``adapter_names`` this layer holds, ``None`` if none; an error if several."""
        held = [name for name in adapter_names if name in self.stash_module]
        if len(held) > 1:
            raise ValueError(
                f"StashQuant cannot {action} adapters {held} at once on one module: each is a full copy of the module, "
                "and copies replace each other rather than add up. Fix: activate or merge one of them, e.g. "
                f"model.set_adapter({held[0]!r})."
            )
        return held[0] if held else None

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if self.disable_adapters and self.merged:
            self.unmerge()
        active = None if self.disable_adapters or self.merged else self._single(self.active_adapters, "apply")
        if active is None:
            return self.base_layer(x, *args, **kwargs)
        trained = self.stash_module[active]
        dtype = next((p.dtype for p in trained.parameters() if p.is_floating_point()), None)
        output = trained(_cast_floating(x, dtype), *args, **kwargs)
        return _cast_floating(output, x.dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else output

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Copy the trained module's state into the base module (in the base module's dtype), keeping the base state
        for :meth:`unmerge`. Layers without the adapter are left as they are. With ``safe_merge``, a trained state
        holding non-finite values is refused."""
        name = self._single(check_adapters_to_merge(self, adapter_names), "merge")
        if name is None:
            return
        if self.merged:
            raise ValueError(
                f"StashQuant cannot merge adapter {name!r} on top of merged {self.merged_adapters}: copies replace "
                "each other. Fix: model.unmerge_adapter() first."
            )
        trained = self.stash_module[name].state_dict()
        if safe_merge and not all(torch.isfinite(t).all() for t in trained.values() if t.is_floating_point()):
            raise ValueError(
                f"StashQuant adapter {name!r} holds non-finite weights; merging would break the model. Fix: check the "
                "training run (learning rate, loss scaling) and retrain, or keep the adapter unmerged."
            )
        self._unmerged_state = {key: t.detach().clone() for key, t in self.base_layer.state_dict().items()}
        self.base_layer.load_state_dict(trained)
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Restore the base module's state from before the merge, bit for bit."""
        if not self.merged:
            return
        self.base_layer.load_state_dict(self._unmerged_state)
        self._unmerged_state = None
        self.merged_adapters = []


class StashQuantModel(BaseTuner):
    """Created by ``peft.get_peft_model`` with a :class:`~peft_quant.StashQuantConfig`."""

    prefix: str = "stash_"
    tuner_layer_cls = StashQuantLayer
    target_module_mapping: dict = {}
    method_name: str = "StashQuant"
    fit_hint: str = "with the same target_modules"

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

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Refuse, with a clear message, an adapter whose tensors do not fit this model's target modules."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_adapter_fits(cls, model, config, adapter_name, remapped)
        return remapped
