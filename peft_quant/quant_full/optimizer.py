"""``QuantFullOptimizer``: Lion for QuantFull's int8 layers (fused into backward) and for float trainables.

The int8 layers' updates happen *inside* backward, as each layer's weight gradient is produced
(:meth:`QuantFullLayer.consume_gradient`); :meth:`step` then updates the remaining float trainables (biases, norms,
``modules_to_save``) with a plain float Lion. Hyperparameters live in ``param_groups`` (group 0: the int8 layers,
represented by their scalar anchors; group 1: float parameters), so LR schedulers and ``transformers.Trainer``
work, and ``state_dict`` carries the int8 momentum, so checkpoints resume exactly.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
from torch import nn

from .int8_state import LionHyper, lion_step_
from .layer import QuantFullLayer

logger = logging.getLogger(__name__)


class QuantFullOptimizer(torch.optim.Optimizer):
    """Lion with int8 momentum for a model wrapped with :class:`~peft_quant.QuantFullConfig`.

    Args:
        model: the ``PeftModel`` (or any module containing QuantFull layers).
        lr, betas, weight_decay: Lion's hyperparameters (QFT: β = (0.9, 0.99)); for every group.
        momentum_block_size: values sharing one absmax in the int8 momentum.
        max_grad_norm: per-layer gradient clipping: each layer's weight gradient (and each float parameter's) is
            scaled to at most this L2 norm before its step. (A global norm would need every gradient alive at
            once, which QuantFull exists to avoid; Lion's sign update makes the rule matter only through momentum.)
        gradient_accumulation_steps: sum this many backward passes' weight gradients in a float32 buffer per layer
            and step on the last one (costs 4 bytes per tuned parameter while accumulating; match the Trainer's
            ``gradient_accumulation_steps``).
        seed: seeds stochastic rounding; each layer's noise depends on (seed, layer, step), so a resumed run
            rounds exactly as an uninterrupted one.

    A weight gradient with NaN or Inf is never applied: that layer's update is skipped, counted in
    ``skipped_updates`` and logged.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        momentum_block_size: int = 256,
        max_grad_norm: Optional[float] = None,
        gradient_accumulation_steps: int = 1,
        seed: int = 0,
    ) -> None:
        layers = [m for m in model.modules() if isinstance(m, QuantFullLayer)]
        if not layers:
            raise ValueError(
                "QuantFullOptimizer found no QuantFull layer in this model. Fix: wrap it first with "
                "peft.get_peft_model(model, peft_quant.QuantFullConfig(target_modules=...))."
            )
        if not lr > 0 or not all(0 <= b < 1 for b in betas) or weight_decay < 0:
            raise ValueError(f"Invalid Lion hyperparameters lr={lr}, betas={betas}, weight_decay={weight_decay}.")
        if gradient_accumulation_steps < 1 or momentum_block_size < 1:
            raise ValueError("gradient_accumulation_steps and momentum_block_size must be positive integers.")
        anchors = [layer.qf_anchor[layer.adapter] for layer in layers]
        anchor_ids = {id(a) for a in anchors}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in anchor_ids]
        groups = [{"params": anchors, "name": "int8"}] + ([{"params": others, "name": "float"}] if others else [])
        super().__init__(groups, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))
        self.momentum_block_size = momentum_block_size
        self.max_grad_norm = max_grad_norm
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.seed = seed
        self.skipped_updates = 0
        self._layers = layers
        self._index = {id(layer): i for i, layer in enumerate(layers)}
        for layer in layers:
            layer.updater = self._fused_step
        self.register_load_state_dict_post_hook(QuantFullOptimizer._restore_int8)

    @staticmethod
    def _restore_int8(optimizer: "QuantFullOptimizer") -> None:
        """torch casts loaded state to the dtype of its parameter (the float32 anchors): put the momentum codes
        back in int8 (exact: they are integers)."""
        for state in optimizer.state.values():
            if "momentum_codes" in state:
                state["momentum_codes"] = state["momentum_codes"].to(torch.int8)
                state["momentum_absmax"] = state["momentum_absmax"].to(torch.float32)

    def _clip(self, grad: torch.Tensor) -> torch.Tensor:
        if self.max_grad_norm is None:
            return grad
        norm = grad.norm()
        return grad * (self.max_grad_norm / norm) if norm > self.max_grad_norm else grad

    def _fused_step(self, layer: QuantFullLayer, grad: torch.Tensor) -> None:
        """Lion on one layer's int8 state, from inside its backward."""
        name = layer.adapter
        anchor = layer.qf_anchor[name]
        state = self.state[anchor]
        if not state:
            numel = grad.numel()
            blocks = -(-numel // self.momentum_block_size)
            state["step"] = 0
            state["momentum_codes"] = torch.zeros(numel, dtype=torch.int8, device=grad.device)
            state["momentum_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=grad.device)
        if self.gradient_accumulation_steps > 1:
            if "grad_accum" in state:
                state["grad_accum"].add_(grad)
            else:
                state["grad_accum"] = grad.to(torch.float32).clone()
            state["micro_steps"] = state.get("micro_steps", 0) + 1
            if state["micro_steps"] < self.gradient_accumulation_steps:
                return
            grad = state.pop("grad_accum")
            state["micro_steps"] = 0
        self._apply(layer, state, grad)

    def _apply(self, layer: QuantFullLayer, state: dict, grad: torch.Tensor) -> None:
        name = layer.adapter
        if not torch.isfinite(grad).all():
            self.skipped_updates += 1
            logger.warning("QuantFull: skipped the update of a layer (%d x %d) whose gradient has NaN or Inf.",
                           layer.out_features, layer.in_features)
            return
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        generator = None
        if layer.stochastic_rounding:
            generator = torch.Generator(device=grad.device)
            generator.manual_seed(hash((self.seed, self._index[id(layer)], state["step"])) & (2**63 - 1))
        with torch.no_grad():
            lion_step_(
                layer.qf_codes[name], layer.qf_scale[name], layer.qf_outlier_index[name], layer.qf_outlier_value[name],
                state["momentum_codes"], state["momentum_absmax"], self._clip(grad),
                LionHyper(group["lr"], beta1, beta2, group["weight_decay"]),
                layer.qf_group_size[name], self.momentum_block_size, layer.stochastic_rounding, generator,
            )
        state["step"] += 1

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Update the float trainables with Lion (the int8 layers were updated during backward)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups[1:]:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad.to(torch.float32)
                if not torch.isfinite(grad).all():
                    self.skipped_updates += 1
                    logger.warning("QuantFull: skipped the update of a float parameter whose gradient has NaN or Inf.")
                    continue
                grad = self._clip(grad)
                state = self.state[param]
                if not state:
                    state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
                direction = torch.sign(state["exp_avg"] * beta1 + grad * (1 - beta1))
                param.mul_(1 - group["lr"] * group["weight_decay"]).add_(direction.to(param.dtype), alpha=-group["lr"])
                state["exp_avg"].mul_(beta2).add_(grad, alpha=1 - beta2)
        self._flush_accumulation()
        return loss

    def _flush_accumulation(self) -> None:
        """Apply gradients still accumulating at an optimizer step: the Trainer ends an epoch with a shorter
        accumulation when the batches do not divide evenly, and int8 steps must stay aligned with its steps."""
        for layer in self._layers:
            state = self.state.get(layer.qf_anchor[layer.adapter])
            if state and "grad_accum" in state:
                state["micro_steps"] = 0
                self._apply(layer, state, state.pop("grad_accum"))
