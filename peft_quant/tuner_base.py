"""What every peft-quant tuner shares on top of PEFT's ``BaseTuner``: safe unload, guarded merge, card facts, and
load-time shape checks. Each method's tuner sets ``tuner_layer_cls`` and ``method_name``."""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .adapter_checks import check_adapter_fits
from .model_card import collect_card_facts
from .quant_formats import BaseFormat, UnsupportedLayerError, WeightFormat, resolve_format

logger = logging.getLogger(__name__)


class PeftQuantLayer(BaseTunerLayer):
    """Base of peft-quant's tuner layers: the base layer's format, merges that never lose the base, and what a forward
    does when no adapter applies.

    Merging goes through the base's :class:`~peft_quant.quant_formats.WeightFormat`: the first merge keeps an exact
    copy of the base's stored tensors (``save_state``: the quantized codes and scales, a few bytes per weight, held
    only while merged), and unmerging puts them back bit for bit, so any number of merge/unmerge cycles is exact. A
    method supplies :meth:`_merged_weight` (the unmerged layer's effective weight, in float64) and may supply
    :meth:`_fold_exactly` (a merge without re-quantization).
    """

    def _resolve(self, base_layer: nn.Module) -> WeightFormat:
        """The format of ``base_layer`` (:func:`~peft_quant.quant_formats.resolve_format`; expert-bank layers resolve
        banks instead); raises :class:`UnsupportedLayerError` for layers it does not know."""
        return resolve_format(base_layer)

    def _init_base(self, base_layer: nn.Module, adapter_name: str) -> None:
        """Hold ``base_layer`` and resolve its format (raises UnsupportedLayerError for unsupported types)."""
        self.base_layer = base_layer
        self._weight_format = self._resolve(base_layer)
        self.in_features = self._weight_format.facts.in_features
        self.out_features = self._weight_format.facts.out_features
        self.merged_adapters: list[str] = []
        self.requantization_error: dict[str, float] = {}  # per merged adapter, for peft_quant_merge_report
        self._unmerged_base: Optional[tuple[nn.Module, dict[str, Any]]] = None  # (base layer, its saved state)
        self._active_adapter = adapter_name

    @property
    def weight_format(self) -> WeightFormat:
        """The base layer's format, re-resolved when the base layer was replaced (e.g. by ``quantize_model``)."""
        base = self.get_base_layer()
        if self._weight_format.layer is not base:
            self._weight_format = self._resolve(base)
        return self._weight_format

    @property
    def base_format(self) -> BaseFormat:
        """The facts of the base layer's format (for errors, repr and the model card)."""
        return self.weight_format.facts

    def get_base_weight(self) -> torch.Tensor:
        """The base layer's float weight as its forward uses it (dequantized for quantized bases), as PEFT's layers
        with a quantization backend return it."""
        fmt = self.weight_format
        return fmt.dequantize(fmt.compute_dtype)

    def _inactive_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Optional[torch.Tensor]:
        """The base layer's output when adapters are disabled (unmerging first) or merged; ``None`` otherwise."""
        if self.disable_adapters and self.merged:
            self.unmerge()
        if self.disable_adapters or self.merged:
            return self.base_layer(x, *args, **kwargs)
        return None

    # ---- merging -------------------------------------------------------------------------------------------------

    def _has_adapter(self, name: str) -> bool:
        return any(name in getattr(self, table) for table in self.adapter_layer_names)

    def _merged_weight(self, weight: torch.Tensor, names: list[str]) -> torch.Tensor:
        """The weight of this layer with adapters ``names`` applied to ``weight`` (float64): what the unmerged
        forward computes with."""
        raise NotImplementedError

    def _fold_exactly(self, names: list[str]) -> bool:
        """Fold adapters ``names`` into the base without re-quantizing, where the format allows; ``False`` (changing
        nothing) otherwise."""
        return False

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Merge adapters into the base layer, in the base's own format.

        The relative error of the merged weight (as the merged layer's forward uses it, in its compute dtype) against
        the unmerged layer's effective weight (float64) is kept in ``self.requantization_error[adapter]``: zero up to
        float rounding for float bases and exact folds, the re-quantization error otherwise.
        """
        names = [n for n in check_adapters_to_merge(self, adapter_names) if self._has_adapter(n)]
        if not names:
            return
        fmt = self.weight_format
        fmt.check_mergeable()
        current = fmt.dequantize(torch.float64)
        target = self._merged_weight(current, names)
        if safe_merge and not torch.isfinite(target).all():
            raise ValueError(
                f"NaNs or Infs in the merged weight of adapter(s) {names}; the adapter seems broken. Fix: check the "
                "training run (learning rate, loss scaling) and retrain, or keep the adapter unmerged."
            )
        if not self.merged:
            self._unmerged_base = (fmt.layer, fmt.save_state())
        if not self._fold_exactly(names):
            fmt.requantize(target)
        stored = fmt.dequantize(fmt.compute_dtype).to(torch.float64)
        error = float((stored - target).norm() / target.norm().clamp_min(1e-30))
        for name in names:
            self.requantization_error[name] = error
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Put the base layer's stored tensors back exactly as they were before the first merge."""
        if not self.merged:
            logger.warning("Already unmerged. Nothing to do.")
            return
        layer, state = self._unmerged_base
        self.base_layer = layer
        self._resolve(layer).restore_state(state)
        self._unmerged_base = None
        self.merged_adapters.clear()


class PeftQuantTuner(BaseTuner):
    """Base of peft-quant's tuners (not used directly)."""

    method_name: str = ""
    fit_hint: str = "with the same config"  # how to load an adapter onto the right model, for error messages

    def _layer_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for the method's layer constructor (none by default)."""
        return {}

    def _create_and_replace(
        self,
        config,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, config, current_key)
            return
        try:
            new_module = self.tuner_layer_cls(target, adapter_name, config, current_key, **self._layer_kwargs())
        except UnsupportedLayerError as error:
            raise UnsupportedLayerError(f"{current_key}: {error}") from None
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set active
        self._replace_module(parent, target_name, new_module, target)

    def _prepare_model(self, peft_config, model: nn.Module) -> None:
        """Attach the stash packer if the config asks for one; record the base model's name for diffusers models too
        (PEFT reads only transformers' ``name_or_path``)."""
        super()._prepare_model(peft_config, model)
        if peft_config.stash:
            from .stash import attach_packer

            attach_packer(model, **dict(peft_config.stash))
        if peft_config.base_model_name_or_path is None:
            name = getattr(getattr(model, "config", None), "_name_or_path", None)
            peft_config.base_model_name_or_path = name or None

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """On unload, put the original base layer back as is. (PEFT's version re-assigns its ``weight``, which
        gptqmodel's layers forbid: their ``weight`` is a read-only property.)"""
        if isinstance(child, self.tuner_layer_cls) and new_module is child.get_base_layer():
            setattr(parent, child_name, new_module)
            return
        stored = next(child.buffers(), None)
        if not hasattr(child, "weight") and next(child.parameters(), None) is None and stored is not None:
            # a base holding only buffers (MXFP4 codes and scales, no bias): PEFT's version looks for a parameter to
            # learn the device from and finds none
            setattr(parent, child_name, new_module)
            for name, module in new_module.named_modules():
                if self.prefix in name and not any(p.device.type == "meta" for p in module.parameters()):
                    module.to(stored.device)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        """PEFT's, after refusing ``bias`` settings that could not take effect: a targeted base whose bias is a plain
        tensor or buffer (HQQ, gptqmodel's AWQ/GPTQ layers) is in no optimizer's parameters, so it would silently
        stay as it is."""
        biased = [self.peft_config[a].bias for a in self.active_adapters
                  if getattr(self.peft_config[a], "bias", "none") != "none"]
        frozen = [name for name, layer in self._tuner_layers().items()
                  if isinstance(getattr(layer.get_base_layer(), "bias", None), torch.Tensor)
                  and not isinstance(layer.get_base_layer().bias, nn.Parameter)] if biased else []
        if frozen:
            raise ValueError(
                f"bias={biased[0]!r} cannot train the biases of {', '.join(frozen[:3])}"
                f"{' ...' if len(frozen) > 3 else ''}: their base layers hold the bias as a plain tensor, not a "
                "parameter, so no optimizer would ever update it. Fix: bias='none', or make those biases "
                "parameters (layer.bias = nn.Parameter(layer.bias)) before get_peft_model."
            )
        super()._mark_only_adapters_as_trainable(model)

    def _tuner_layers(self) -> dict[str, nn.Module]:
        return {name: module for name, module in self.model.named_modules() if isinstance(module, self.tuner_layer_cls)}

    def _check_merge_allowed(self) -> None:
        super()._check_merge_allowed()
        frozen = [f"{name} ({layer.base_format.label})" for name, layer in self._tuner_layers().items()
                  if not layer.base_format.mergeable]
        if frozen:
            raise ValueError(
                f"{self.method_name} cannot merge into these layers, whose kernels offer no way to re-quantize a "
                f"changed weight: {', '.join(frozen[:5])}{' ...' if len(frozen) > 5 else ''}. Fix: keep the "
                f"adapter unmerged ({self.method_name} runs on the quantized layer as is), or `unload()` to get the "
                "base model back."
            )

    def _after_unload(self, model: nn.Module) -> None:
        """Remove whatever the tuner attached to the base model besides its layers (nothing by default)."""

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
            for name, layer in self._tuner_layers().items():
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
                errors = [layer.requantization_error[a] for a in layer.merged_adapters
                          if a in layer.requantization_error]
                report[name] = {"base": layer.base_format.label, "relative_error": max(errors, default=0.0)}
        model = super()._unload_and_optionally_merge(
            merge=False, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        self._after_unload(model)
        if report:
            worst = max(report.items(), key=lambda item: item[1]["relative_error"])
            logger.info(
                "%s merged %d layers; largest relative re-quantization error %.3g in %s (%s).",
                self.method_name, len(report), worst[1]["relative_error"], worst[0], worst[1]["base"],
            )
            model.peft_quant_merge_report = report
        return model

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        config._card_facts = collect_card_facts(model, cls.tuner_layer_cls, to_return)
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Refuse, with a clear message, an adapter whose tensors do not fit this model's layers."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_adapter_fits(cls, model, config, adapter_name, remapped)
        return remapped
