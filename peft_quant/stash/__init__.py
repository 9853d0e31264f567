"""StashQuant (DSQ): block-floating-point compression of the activations saved for backward, rising precision."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from .config import StashQuantConfig
from .model import StashQuantModel
from .packer import PACKER_ATTRIBUTE, BitSchedule, StashPacker, attach_packer


def _host(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def enable_stash(model: nn.Module, **settings: Any) -> StashPacker:
    """Compress the activations ``model`` saves for backward; works on any ``PeftModel`` (QOFT, TimestepScale,
    QuantFull, PEFT's LoRA...) or plain module. Settings as :class:`StashQuantConfig`'s: ``bits``,
    ``milestones``, ``unit``, ``plateau_patience``, ``plateau_min_delta``, ``block_size``, ``scale``,
    ``stochastic_rounding``, ``min_numel``. Returns the packer; call ``packer.update(step, total_steps, loss)``
    once per optimizer step in a plain loop, or pass :class:`StashQuantCallback` to ``Trainer``."""
    return attach_packer(_host(model), **settings)


def stash_packer(model: nn.Module) -> Optional[StashPacker]:
    """The packer attached to ``model`` (or its PEFT base model), if any."""
    return getattr(_host(model), PACKER_ATTRIBUTE, None)


def disable_stash(model: nn.Module) -> None:
    """Stop compressing ``model``'s stash."""
    packer = _host(model).__dict__.pop(PACKER_ATTRIBUTE, None)
    if packer is not None:
        packer.detach()


def stash_callback():
    """A ``transformers.TrainerCallback`` that advances the stash bit schedule every step (and reports the
    logged loss, for the plateau trigger)."""
    from transformers import TrainerCallback

    class StashQuantCallback(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            packer = stash_packer(model) if model is not None else None
            if packer is not None:
                packer.update(state.global_step, state.max_steps)

        def on_log(self, args, state, control, model=None, logs=None, **kwargs):
            packer = stash_packer(model) if model is not None else None
            if packer is not None and logs and "loss" in logs:
                packer.update(state.global_step, state.max_steps, loss=logs["loss"])

    return StashQuantCallback()


__all__ = [
    "BitSchedule", "StashPacker", "StashQuantConfig", "StashQuantModel", "disable_stash", "enable_stash",
    "stash_callback", "stash_packer",
]
