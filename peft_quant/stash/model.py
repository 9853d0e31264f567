"""The StashQuant tuner: trains its target modules fully, with a compressed stash for the whole model."""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..quant_formats import BaseFormat, UnsupportedLayerError, resolve_format
from ..tuner_base import PeftQuantTuner
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


def _quantized_parts(module: nn.Module) -> list[str]:
    """The layers inside ``module`` held in a quantized format (they cannot be trained as a float copy)."""
    parts = []
    for name, sub in module.named_modules():
        try:
            facts = resolve_format(sub).facts
        except UnsupportedLayerError:
            continue
        if facts.backend != "torch":
            parts.append(f"{name or type(module).__name__} ({facts.label})")
    return parts


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
        self.requantization_error: dict[str, float] = {}  # per merged adapter: the cast into the base's dtype
        self._unmerged_state: Optional[dict[str, torch.Tensor]] = None  # the base state while merged
        self._active_adapter = adapter_name
        for name in ("in_features", "out_features"):  # what PEFT and users read off a tuner layer
            if hasattr(base_layer, name):
                setattr(self, name, getattr(base_layer, name))
        self.update_layer(adapter_name)

    def update_layer(self, adapter_name: str) -> None:
        """Add ``adapter_name``'s trainable copy of the base module."""
        quantized = _quantized_parts(self.base_layer)
        if quantized or not any(p.is_floating_point() for p in self.base_layer.parameters()):
            held = f"holds quantized layers: {', '.join(quantized[:3])}" if quantized else "holds no float parameters"
            raise ValueError(
                f"StashQuant trains its target modules fully as float copies, but {type(self.base_layer).__name__} "
                f"{held}. Fix: target float modules, or compress the stash of a method that trains quantized layers: "
                "QOFTConfig/TimestepScaleConfig/QuantFullConfig(..., stash={'bits': 4}) or peft_quant.enable_stash."
            )
        self.stash_module[adapter_name] = _copy_module(self.base_layer, on_meta=_creating_on_meta())
        self.set_adapter(self.active_adapters)

    @property
    def base_format(self) -> BaseFormat:
        """The base module's facts for the model card and the merge report: its format where it is a Linear or
        Conv2d, else its type and float dtype."""
        try:
            return resolve_format(self.base_layer).facts
        except UnsupportedLayerError:
            param = next(p for p in self.base_layer.parameters() if p.is_floating_point())
            dtype = str(param.dtype).removeprefix("torch.")
            kind = type(self.base_layer).__name__.lower()
            return BaseFormat("torch", dtype, param.element_size() * 8, kind, getattr(self, "in_features", 0),
                              getattr(self, "out_features", 0), True)

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
        merged, floats = self.base_layer.state_dict(), [k for k, t in trained.items() if t.is_floating_point()]
        error = sum(float((merged[k].double() - trained[k].double()).pow(2).sum()) for k in floats)
        total = sum(float(trained[k].double().pow(2).sum()) for k in floats)
        self.requantization_error[name] = (error / max(total, 1e-60)) ** 0.5  # the cast to the base's dtype
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Restore the base module's state from before the merge, bit for bit."""
        if not self.merged:
            return
        self.base_layer.load_state_dict(self._unmerged_state)
        self._unmerged_state = None
        self.merged_adapters = []


class StashQuantModel(PeftQuantTuner):
    """Created by ``peft.get_peft_model`` with a :class:`~peft_quant.StashQuantConfig`."""

    prefix: str = "stash_"
    tuner_layer_cls = StashQuantLayer
    target_module_mapping: dict = {}
    method_name: str = "StashQuant"
    fit_hint: str = "with the same target_modules"

    def _prepare_model(self, peft_config: StashQuantConfig, model: nn.Module) -> None:
        super()._prepare_model(peft_config, model)
        attach_packer(model, **peft_config.packer_settings())

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs) -> None:
        if isinstance(target, StashQuantLayer):
            target.update_layer(adapter_name)
            return
        new_module = StashQuantLayer(target, adapter_name)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _after_unload(self, model: nn.Module) -> None:
        packer = model.__dict__.pop(PACKER_ATTRIBUTE, None)
        if packer is not None:
            packer.detach()
