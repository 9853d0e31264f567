"""The QOFT tuner: finds target layers and wraps them in :class:`QOFTLayer` (merging and loading guards in
:mod:`peft_quant.tuner_base`)."""

from __future__ import annotations

from peft.utils import TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING

from ..experts_tuning import ExpertsDispatchMixin
from ..tuner_base import PeftQuantTuner
from .experts_layer import QOFTExpertsLayer
from .layer import QOFTLayer


class QOFTModel(ExpertsDispatchMixin, PeftQuantTuner):
    """Injects QOFT rotations into a (quantized) model; created by ``peft.get_peft_model`` with a
    :class:`~peft_quant.QOFTConfig`."""

    prefix: str = "qoft_"
    tuner_layer_cls = QOFTLayer
    experts_layer_cls = QOFTExpertsLayer  # for targeted mixture-of-experts banks (a rotation per expert)
    target_module_mapping = TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING
    method_name = "QOFT"
    fit_hint = "with the same target_modules and block_size"
