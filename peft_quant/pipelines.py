"""Load peft-quant adapters into diffusers pipelines."""

from __future__ import annotations

from typing import Any

from torch import nn

DENOISER_ATTRIBUTES = ("unet", "transformer")


def load_into_pipeline(pipe: Any, adapter_dir: str, adapter_name: str = "default", **kwargs: Any) -> nn.Module:
    """Wrap the pipeline's denoiser (``pipe.unet`` or ``pipe.transformer``) with the adapter in ``adapter_dir``.

    Equivalent to ``pipe.unet = PeftModel.from_pretrained(pipe.unet, adapter_dir)``; the pipeline's ``__call__``
    then runs the adapted denoiser (for TimestepScale, with each step's timestep expert). Extra keyword arguments
    go to ``PeftModel.from_pretrained``. Returns the ``PeftModel``.
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
        denoiser.load_adapter(adapter_dir, adapter_name=adapter_name, **kwargs)
        denoiser.set_adapter(adapter_name)
        return denoiser
    model = PeftModel.from_pretrained(denoiser, adapter_dir, adapter_name=adapter_name, **kwargs)
    setattr(pipe, attribute, model)
    return model
