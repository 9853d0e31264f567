"""The QOFT tuner: finds target layers and wraps them in :class:`QOFTLayer` (merging and loading guards in
:mod:`peft_quant.tuner_base`)."""

from __future__ import annotations

from peft.utils import TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING
from torch import nn

from ..tuner_base import PeftQuantTuner
from .config import QOFTConfig
from .layer import QOFTLayer


class QOFTModel(PeftQuantTuner):
    """Injects QOFT rotations into a (quantized) model; created by ``peft.get_peft_model`` with a
    :class:`~peft_quant.QOFTConfig`."""

    prefix: str = "qoft_"
    tuner_layer_cls = QOFTLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING
    method_name = "QOFT"
    fit_hint = "with the same target_modules and block_size"

    def _create_and_replace(
        self,
        config: QOFTConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        if isinstance(target, QOFTLayer):
            target.update_layer(adapter_name, config, current_key)
            return
        new_module = QOFTLayer(target, adapter_name, config, current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set active
        self._replace_module(parent, target_name, new_module, target)
