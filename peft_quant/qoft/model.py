"""The QOFT tuner: finds target layers, wraps them in :class:`QOFTLayer`, and guards merging and loading."""

from __future__ import annotations

import logging
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING
from torch import nn

from ..model_card import collect_card_facts
from .config import QOFTConfig
from .layer import QOFTLayer

logger = logging.getLogger(__name__)


class QOFTModel(BaseTuner):
    """Injects QOFT rotations into a (quantized) model; created by ``peft.get_peft_model`` with a
    :class:`~peft_quant.QOFTConfig`."""

    prefix: str = "qoft_"
    tuner_layer_cls = QOFTLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING

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

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """On unload, put the original base layer back as is. (PEFT's version re-assigns its ``weight``, which
        gptqmodel's layers forbid: their ``weight`` is a read-only property.)"""
        if isinstance(child, QOFTLayer) and new_module is child.get_base_layer():
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def _qoft_layers(self) -> dict[str, QOFTLayer]:
        return {name: module for name, module in self.model.named_modules() if isinstance(module, QOFTLayer)}

    def _check_merge_allowed(self) -> None:
        super()._check_merge_allowed()
        frozen = [f"{name} ({layer.base_format.label})" for name, layer in self._qoft_layers().items()
                  if not layer.base_format.mergeable]
        if frozen:
            raise ValueError(
                "QOFT cannot merge into these layers, whose kernels offer no way to re-quantize a changed weight: "
                f"{', '.join(frozen[:5])}{' ...' if len(frozen) > 5 else ''}. Keep the adapter unmerged (QOFT runs "
                "on the quantized layer as is), or `unload()` to get the base model back."
            )

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
    ):
        """Merge (recording each layer's re-quantization error), then unload.

        The returned base model carries ``peft_quant_merge_report``: ``{module name: {"base": label,
        "relative_error": float}}``, the relative Frobenius error re-quantization added to each merged weight.
        """
        report = {}
        if merge:
            self._check_merge_allowed()
            for name, layer in self._qoft_layers().items():
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
                errors = [layer.requantization_error[a] for a in layer.merged_adapters if a in layer.requantization_error]
                report[name] = {"base": layer.base_format.label, "relative_error": max(errors, default=0.0)}
        model = super()._unload_and_optionally_merge(
            merge=False, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        if report:
            worst = max(report.items(), key=lambda item: item[1]["relative_error"])
            logger.info(
                "QOFT merged %d layers; largest relative re-quantization error %.3g in %s (%s).",
                len(report), worst[1]["relative_error"], worst[0], worst[1]["base"],
            )
            model.peft_quant_merge_report = report
        return model

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        config._card_facts = collect_card_facts(model, QOFTLayer, to_return)
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Refuse, with a clear message, an adapter whose tensors do not fit this model's layers."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        params = dict(model.named_parameters())
        suffix = f".qoft_Q.{adapter_name}"
        expected = {key for key in params if key.endswith(suffix)}

        def lookup(key: str) -> Optional[torch.Tensor]:
            return params.get(key, params.get(key.removeprefix("base_model.model.")))

        problems = []
        for key, tensor in remapped.items():
            if not key.endswith(suffix):
                continue
            target = lookup(key)
            if target is None:
                problems.append(f"{key}: no such QOFT layer in this model")
            elif target.shape != tensor.shape:
                problems.append(f"{key}: adapter {tuple(tensor.shape)} vs model {tuple(target.shape)}")
            expected.discard(key)
            expected.discard(key.removeprefix("base_model.model."))
        problems += [f"{key}: missing from the adapter file" for key in sorted(expected)]
        if problems:
            raise ValueError(
                "This QOFT adapter does not fit the model it is loaded onto (was it trained on another base model, "
                f"base_model_name_or_path={config.base_model_name_or_path!r}?): "
                + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else "")
                + ". Fix: load it onto the base model it was trained on, with the same target_modules and block_size."
            )
        return remapped
