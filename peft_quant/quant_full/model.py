"""The QuantFull tuner: turns targeted Linear layers into int8-state layers that train all their weights."""

from __future__ import annotations

from typing import Optional

from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from ..tuner_base import PeftQuantTuner
from .layer import QuantFullLayer


class QuantFullModel(PeftQuantTuner):
    """Injects QuantFull into a model; created by ``peft.get_peft_model`` with a :class:`~peft_quant.QuantFullConfig`.
    Train it with :class:`~peft_quant.QuantFullOptimizer`."""

    prefix: str = "qf_"
    tuner_layer_cls = QuantFullLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    method_name = "QuantFull"
    fit_hint = "with the same target_modules, group_size and outlier_fraction"

    def _check_merge_allowed(self) -> None:
        BaseTuner._check_merge_allowed(self)  # merging writes new float layers, whatever the base format was

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
    ):
        if not merge:
            raise ValueError(
                "QuantFull released the targeted layers' original weights when it took them over as int8 state, so "
                "unload() cannot return them. Fix: merge_and_unload() gives float Linear layers with the tuned "
                "weights; or reload the base model."
            )
        names = set(adapter_names if adapter_names is not None else self.active_adapters)
        left = [f"{name} ({layer.adapter!r})" for name, layer in self._tuner_layers().items()
                if not layer.merged and layer.adapter not in names]
        if left:
            raise ValueError(
                f"QuantFull cannot unload layers whose adapter is not merged, since their original weights were "
                f"released: {', '.join(left[:5])}{' ...' if len(left) > 5 else ''}. Fix: merge every QuantFull adapter "
                f"at once, merge_and_unload(adapter_names={sorted(self.peft_config)!r})."
            )
        return super()._unload_and_optionally_merge(
            merge=True, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
