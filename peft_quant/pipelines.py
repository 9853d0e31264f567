"""Load peft-quant adapters into diffusers pipelines."""

from __future__ import annotations

from typing import Any

from torch import nn

DENOISER_ATTRIBUTES = ("unet", "transformer")


def load_into_pipeline(pipe: Any, adapter_dir: str, adapter_name: str = "default", **kwargs: Any) -> nn.Module:
    """Wrap the pipeline's denoiser (``pipe.unet`` or ``pipe.transformer``) with the adapter in ``adapter_dir``.

    Equivalent to ``pipe.unet = PeftModel.from_pretrained(pipe.unet, adapter_dir)``; the pipeline's ``__call__``
    then runs the adapted denoiser (for TimestepScale, with each step's timestep expert). Extra keyword arguments
    go to ``PeftModel.from_pretrained`` (or ``load_adapter``). Returns the ``PeftModel``.

    If the denoiser is already a ``PeftModel``, the adapter is added to it under ``adapter_name`` and made the
    active one; an adapter already loaded under that name is replaced, config included (PEFT's ``load_adapter``
    alone would keep the old adapter's config, e.g. its timestep expert boundaries, and only overwrite its
    tensors). If loading fails, the adapter that was there is put back.

    Save the adapter with ``pipe.unet.save_pretrained(dir)`` (or ``pipe.transformer``): ``pipe.save_pretrained``
    cannot save a ``PeftModel`` component; diffusers then writes the denoiser as ``null`` in ``model_index.json``.
    """
    from peft import PeftModel

    for attribute in DENOISER_ATTRIBUTES:
        denoiser = getattr(pipe, attribute, None)
        if isinstance(denoiser, nn.Module):
            break
    else:
        raise ValueError(
            f"{type(pipe).__name__} has no denoiser in {' or '.join(DENOISER_ATTRIBUTES)}. Fix: wrap the denoiser "
            "yourself with peft.PeftModel.from_pretrained(denoiser, adapter_dir)."
        )
    if isinstance(denoiser, PeftModel):
        if adapter_name in denoiser.peft_config:
            _replace_adapter(denoiser, adapter_dir, adapter_name, **kwargs)
        else:
            denoiser.load_adapter(adapter_dir, adapter_name=adapter_name, **kwargs)
        # PeftModel.set_adapter makes the adapter trainable by default; keep from_pretrained's default (frozen)
        denoiser.set_adapter(adapter_name, inference_mode=not kwargs.get("is_trainable", False))
        return denoiser
    model = PeftModel.from_pretrained(denoiser, adapter_dir, adapter_name=adapter_name, **kwargs)
    setattr(pipe, attribute, model)
    return model


def _replace_adapter(model: Any, adapter_dir: str, adapter_name: str, **kwargs: Any) -> None:
    """Delete ``adapter_name`` and load ``adapter_dir`` under that name; on failure restore the old adapter."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    old_config = model.peft_config[adapter_name]
    old_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()}
    old_active = list(model.active_adapters)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    model.delete_adapter(adapter_name)
    try:
        model.load_adapter(adapter_dir, adapter_name=adapter_name, **kwargs)
    except BaseException:
        if adapter_name in model.peft_config:  # loading failed after the adapter was created
            model.delete_adapter(adapter_name)
        model.add_adapter(adapter_name, old_config)
        set_peft_model_state_dict(model, old_state, adapter_name=adapter_name)
        model.base_model.set_adapter(old_active)
        for name, param in model.named_parameters():
            param.requires_grad_(name in trainable)
        raise
