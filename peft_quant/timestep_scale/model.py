"""The TimestepScale tuner: attaches the timestep router to the denoiser and wraps its layers (merging and loading
guards in :mod:`peft_quant.tuner_base`)."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..quant_formats import UnsupportedLayerError, describe
from ..tuner_base import PeftQuantTuner
from .config import TimestepScaleConfig
from .layer import TimestepScaleLayer
from .routing import TimestepRouter

ROUTER_ATTRIBUTE = "_peft_quant_timestep_router"
# Denoisers whose pipelines pass the timestep as a fraction of the training range (t / 1000), by class-name prefix
# (diffusers 0.42). Others that transform it differently (Lumina2: 1 - t/1000) need an explicit setting.
_FRACTIONAL_TIMESTEPS = ("Flux", "QwenImage", "Chroma", "AuraFlow", "OvisImage", "LongCatImage")


def _default_multiplier(model: nn.Module) -> float:
    return 1000.0 if any(name in type(model).__name__ for name in _FRACTIONAL_TIMESTEPS) else 1.0


class TimestepScaleModel(PeftQuantTuner):
    """Injects TimestepScale into a denoiser; created by ``peft.get_peft_model`` with a
    :class:`~peft_quant.TimestepScaleConfig`."""

    prefix: str = "ts_"
    tuner_layer_cls = TimestepScaleLayer
    target_module_mapping: dict = {}
    method_name = "TimestepScale"
    fit_hint = "with the same target_modules, num_experts and scale settings"

    def _prepare_adapter_config(self, peft_config: TimestepScaleConfig, model_config: dict) -> TimestepScaleConfig:
        return peft_config  # target_modules=None means every supported layer, resolved in _prepare_model

    def _prepare_model(self, peft_config: TimestepScaleConfig, model: nn.Module) -> None:
        """Attach the router (once per denoiser) and resolve the default targets."""
        super()._prepare_model(peft_config, model)
        multiplier = peft_config.timestep_multiplier or _default_multiplier(model)
        reading = (peft_config.timestep_argument, multiplier, float(peft_config.num_train_timesteps))
        router = getattr(model, ROUTER_ATTRIBUTE, None)
        if router is None:
            object.__setattr__(model, ROUTER_ATTRIBUTE, TimestepRouter(model, *reading))
        elif router.reading != reading:
            others = [n for n, c in self.peft_config.items() if c is not peft_config and isinstance(c, TimestepScaleConfig)]
            if others:
                raise ValueError(
                    "All TimestepScale adapters on one denoiser must read the timestep the same way (timestep_argument, "
                    f"timestep_multiplier, num_train_timesteps): this adapter reads {reading}, adapter(s) {others} read "
                    f"{router.reading}. Fix: give the new adapter the same settings, or delete the others first."
                )
            router.configure(model, *reading)  # the adapters that set it up are gone
        if peft_config.target_modules is None:
            peft_config.target_modules = _default_targets(model)
            if not peft_config.target_modules:
                raise ValueError(
                    f"{type(model).__name__} has no Linear or Conv2d layer TimestepScale can target. Fix: pass "
                    "target_modules explicitly."
                )

    def _layer_kwargs(self) -> dict:
        return {"router": getattr(self.model, ROUTER_ATTRIBUTE)}

    def _after_unload(self, model: nn.Module) -> None:
        router = model.__dict__.pop(ROUTER_ATTRIBUTE, None)
        if router is not None:
            router.detach()


def _default_targets(model: nn.Module) -> set[str]:
    """Names of every layer TimestepScale can wrap (already wrapped ones included, their insides not)."""
    targets: set[str] = set()
    wrapped: list[str] = []
    for name, module in model.named_modules():
        if not name or name.startswith(tuple(wrapped)):
            continue
        if isinstance(module, BaseTunerLayer):
            targets.add(name)
            wrapped.append(name + ".")
            continue
        try:
            describe(module)
        except UnsupportedLayerError:
            continue
        targets.add(name)
    return targets
