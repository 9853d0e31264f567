"""The TimestepScale tuner: attaches the timestep router to the denoiser and wraps its layers (merging and loading
guards in :mod:`peft_quant.tuner_base`)."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from ..experts_tuning import ExpertsDispatchMixin
from ..quant_formats import UnsupportedLayerError, describe
from ..tuner_base import PeftQuantTuner
from .config import TimestepScaleConfig, exact_names_pattern
from .experts_layer import TimestepScaleExpertsLayer
from .layer import TimestepScaleLayer
from .routing import TimestepRouter

ROUTER_ATTRIBUTE = "_peft_quant_timestep_router"
# Denoisers whose pipelines pass the timestep as a fraction of the training range (t / 1000), by class-name prefix
# (diffusers 0.42). Others that transform it differently (Lumina2: 1 - t/1000) need an explicit setting.
_FRACTIONAL_TIMESTEPS = ("Flux", "QwenImage", "Chroma", "AuraFlow", "OvisImage", "LongCatImage")


def _default_multiplier(model: nn.Module) -> float:
    return 1000.0 if any(name in type(model).__name__ for name in _FRACTIONAL_TIMESTEPS) else 1.0


class TimestepScaleModel(ExpertsDispatchMixin, PeftQuantTuner):
    """Injects TimestepScale into a denoiser; created by ``peft.get_peft_model`` with a
    :class:`~peft_quant.TimestepScaleConfig`."""

    prefix: str = "ts_"
    tuner_layer_cls = TimestepScaleLayer
    experts_layer_cls = TimestepScaleExpertsLayer  # for targeted mixture-of-experts banks (scales per expert)
    target_module_mapping: dict = {}
    method_name = "TimestepScale"
    fit_hint = "with the same target_modules, num_experts and scale settings"

    def _prepare_adapter_config(self, peft_config: TimestepScaleConfig, model_config: dict) -> TimestepScaleConfig:
        return peft_config  # target_modules=None means every supported layer, resolved in _prepare_model

    def _prepare_model(self, peft_config: TimestepScaleConfig, model: nn.Module) -> None:
        """Resolve or check the default targets, then attach the router (once per denoiser)."""
        _resolve_default_targets(peft_config, model)
        super()._prepare_model(peft_config, model)
        multiplier = peft_config.timestep_multiplier or _default_multiplier(model)
        reading = (peft_config.timestep_argument, multiplier, float(peft_config.num_train_timesteps))
        check_fractions = peft_config.timestep_multiplier is None and multiplier == 1
        router = getattr(model, ROUTER_ATTRIBUTE, None)
        others = [n for n, c in self.peft_config.items() if c is not peft_config and isinstance(c, TimestepScaleConfig)]
        if router is None:
            object.__setattr__(model, ROUTER_ATTRIBUTE, TimestepRouter(model, *reading, check_fractions))
        elif not others:
            router.configure(model, *reading, check_fractions)  # the adapters that set it up are gone
        elif router.reading != reading:
            raise ValueError(
                "All TimestepScale adapters on one denoiser must read the timestep the same way (timestep_argument, "
                f"timestep_multiplier, num_train_timesteps): this adapter reads {reading}, adapter(s) {others} read "
                f"{router.reading}. Fix: give the new adapter the same settings, or delete the others first."
            )
        else:
            router.check_fractions = router.check_fractions and check_fractions  # an explicit multiplier settles it

    def _layer_kwargs(self) -> dict:
        return {"router": getattr(self.model, ROUTER_ATTRIBUTE)}

    def _after_unload(self, model: nn.Module) -> None:
        router = model.__dict__.pop(ROUTER_ATTRIBUTE, None)
        if router is not None:
            router.detach()


def _resolve_default_targets(config: TimestepScaleConfig, model: nn.Module) -> None:
    """``target_modules=None``: record every layer TimestepScale can target in ``config.resolved_targets`` and target
    exactly those. A config that already records them (a saved adapter being loaded) must find the same layers.

    Exact full names, not PEFT's suffix matching: a suffix such as ``"2"`` (``ff.net.2``) matches other layers, or
    whole blocks, in a model with more layers per block. And a model with fewer or more targetable layers is another
    architecture: loading there would silently leave layers unscaled or scales unused.
    """
    if config.target_modules is not None and config.resolved_targets is None:
        return  # the user's own targets
    present = _default_targets(model)
    if config.resolved_targets is None:
        if not present:
            raise ValueError(
                f"{type(model).__name__} has no Linear or Conv2d layer TimestepScale can target. Fix: pass "
                "target_modules explicitly."
            )
        config.resolved_targets = sorted(present)
    else:
        missing = sorted(set(config.resolved_targets) - present)
        extra = sorted(present - set(config.resolved_targets))
        if missing or extra:
            raise ValueError(
                f"This TimestepScale adapter targets every Linear and Conv2d of the model it was created on "
                f"(base_model_name_or_path={config.base_model_name_or_path!r}), and this {type(model).__name__} has "
                f"other ones: {_listing('missing here', missing)}{'; ' if missing and extra else ''}"
                f"{_listing('not in the adapter', extra)}. Fix: load it onto the model it was trained on (same "
                "architecture and config, e.g. layers_per_block), train an adapter for this model, or, for a config "
                "reused from another model, pass a fresh TimestepScaleConfig()."
            )
    config.target_modules = exact_names_pattern(config.resolved_targets)


def _listing(what: str, names: list[str], shown: int = 5) -> str:
    if not names:
        return ""
    return f"{len(names)} {what} ({', '.join(names[:shown])}{', ...' if len(names) > shown else ''})"


def _default_targets(model: nn.Module) -> set[str]:
    """Full names of every layer TimestepScale can wrap: already wrapped ones (by this or another adapter, or by a
    modules_to_save copy) count under their own name, what lies inside a wrapper does not."""
    targets: set[str] = set()
    wrapped: list[str] = []
    for name, module in model.named_modules():
        if not name or name.startswith(tuple(wrapped)):
            continue
        if isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
            wrapped.append(name + ".")
        elif isinstance(module, AuxiliaryTrainingWrapper):
            module = module.original_module
            wrapped.append(name + ".")
        try:
            describe(module)
        except UnsupportedLayerError:
            continue
        targets.add(name)
    return targets
