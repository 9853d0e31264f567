"""``QuantFullOptimizer``: Lion for QuantFull's int8 layers (fused into backward) and for float trainables.

The int8 layers' updates happen *inside* backward, as each layer's weight gradient is produced
(:meth:`QuantFullLayer.consume_gradient`); :meth:`step` then updates the remaining float trainables (biases, norms,
``modules_to_save``) with a plain float Lion. Hyperparameters live in ``param_groups`` (group 0: the int8 layers,
represented by their one-element anchors; group 1: float parameters), so LR schedulers and ``transformers.Trainer``
work, and ``state_dict`` carries the int8 momentum, so checkpoints resume exactly.

Under data parallelism (DDP) the in-backward update runs before DDP averages gradients, so each layer averages its
own weight gradient over the data-parallel group right before applying it (:mod:`peft_quant.distributed`). Under
FSDP2 the layers are row-sharded (:func:`peft_quant.distributed.shard_quant_full`): each reduce-scatters its weight
gradient and steps its own rows (:mod:`peft_quant.quant_full.sharding`).
"""

from __future__ import annotations

import logging
import math
import weakref
from typing import Callable, Optional

import torch
from torch import nn

from ..distributed import (
    FSDP2_RECIPE,
    SUPPORTED_ENGINES,
    average_gradient_,
    check_engines,
    data_parallel_group,
    whole_value,
)
from ..kernels.quant_full import fused_step_supported, lion_step_from_activations_
from .int8_state import LionHyper, lion_step_
from .layer import QuantFullLayer
from .sharding import all_ranks_sum, reduce_scatter_rows

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
            rounds exactly as an uninterrupted one, and every rank of a data-parallel run rounds alike.
        process_group: the data-parallel group whose ranks average each weight gradient before the update (as DDP
            averages the float gradients); None: the default group. Only used while ``torch.distributed`` is
            initialized with more than one process in the group.

    Data parallelism: under DDP each rank averages a layer's weight gradient with the other ranks (one all-reduce
    of the layer's float32 gradient) right before its update, so every rank applies the same step and the ranks stay
    identical, equal to one process training on the whole batch; the fused kernel that never materialises the
    gradient is then not used. With ``gradient_accumulation_steps`` only the summed gradient of the applying
    micro-step is averaged, so DDP's ``no_sync()`` on the other micro-steps costs no collective here either. Every
    rank must run the same layers on the same number of micro-batches (a rank that skips a layer's backward leaves
    the others waiting). Under FSDP2 the int8 layers must be row-sharded first
    (:func:`peft_quant.distributed.shard_quant_full`, before ``fully_shard``, with the anchors left out of it): each
    layer then reduce-scatters its weight gradient by rows at every micro-step (averaged; the accumulation buffer
    holds this rank's rows only) and steps its own rows, drawing stochastic rounding's noise as one process would;
    the decision to skip a non-finite gradient and the clipping norm are taken over the whole layer (one small
    all-reduce), so the ranks never disagree. FSDP1, DTensor parameters outside FSDP2 and FSDP2 without the row
    sharding are refused with an error naming the fix, here or at the first backward when the model was wrapped
    after this optimizer was created.

    A weight gradient with NaN or Inf is never applied: that layer's update is skipped, counted in
    ``skipped_updates`` and logged. Non-finite or out-of-range hyperparameters raise a ``ValueError``, at
    construction and at every step (each layer's fused step and :meth:`step`), so an LR scheduler that writes one
    fails loudly before the state changes.

    Where the Triton kernels run (CUDA tensors, or ``PEFT_QUANT_KERNELS=triton``) and the update is immediate (no
    gradient accumulation, no clipping: both need the whole weight gradient), a layer's update is fused into the
    kernel that computes its weight gradient, which then never exists in memory; the momentum block size must be a
    power of two up to 1024 dividing the layer's input width, otherwise that layer takes the reference path. The
    fused path cannot inspect the gradient before applying it, so it skips (and counts) the update when the layer's
    output gradient or input holds a NaN or Inf, the inputs that make the weight gradient non-finite.
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
        process_group: Optional[object] = None,
    ) -> None:
        check_engines(model, "QuantFullOptimizer")
        layers = [m for m in model.modules() if isinstance(m, QuantFullLayer)]
        if not layers:
            raise ValueError(
                "QuantFullOptimizer found no QuantFull layer in this model. Fix: wrap it first with "
                "peft.get_peft_model(model, peft_quant.QuantFullConfig(target_modules=...))."
            )
        if not (_finite(lr) and lr > 0):
            raise ValueError(f"QuantFullOptimizer needs a finite lr > 0, got lr={lr!r}. Fix: pass e.g. lr=1e-4.")
        if gradient_accumulation_steps < 1 or momentum_block_size < 1:
            raise ValueError(
                f"gradient_accumulation_steps={gradient_accumulation_steps!r} and momentum_block_size="
                f"{momentum_block_size!r} must be positive integers. Fix: pass values >= 1."
            )
        anchors = [layer.qf_anchor[layer.adapter] for layer in layers]
        anchor_ids = {id(a) for a in anchors}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in anchor_ids]
        groups = [{"params": anchors, "name": "int8"}] + ([{"params": others, "name": "float"}] if others else [])
        super().__init__(groups, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))
        self.momentum_block_size = momentum_block_size
        self.max_grad_norm = max_grad_norm
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.seed = seed
        self.process_group = process_group
        self.skipped_updates = 0
        self._layers = layers
        self._anchors = anchors  # the parameters the state is keyed by: a wrapper replacing them is refused
        self._model = weakref.ref(model)  # to refuse a later fully_shard (see _check_wrapping)
        self._fsdp_at_start = _has_fsdp2(model)
        self._index = {id(layer): i for i, layer in enumerate(layers)}
        for layer in layers:
            layer.updater = _Int8Updater(self)
        self.register_load_state_dict_post_hook(QuantFullOptimizer._restore_int8)
        self._check_hyperparameters()

    def _check_hyperparameters(self) -> None:
        """Refuse hyperparameters that would make the state non-finite or wrong, in every group (an LR scheduler or a
        user may have rewritten them since the last step) and ``max_grad_norm``; called before any state changes."""
        for i, group in enumerate(self.param_groups):
            lr, betas, weight_decay = group["lr"], tuple(group["betas"]), group["weight_decay"]
            problems = []
            if not (_finite(lr) and lr >= 0):
                problems.append(f"lr={lr!r} (needs a finite number >= 0)")
            if len(betas) != 2 or not all(_finite(b) and 0 <= b < 1 for b in betas):
                problems.append(f"betas={betas!r} (needs two numbers in [0, 1))")
            if not (_finite(weight_decay) and weight_decay >= 0):
                problems.append(f"weight_decay={weight_decay!r} (needs a finite number >= 0)")
            if problems:
                raise ValueError(
                    f"QuantFullOptimizer param_groups[{i}] ({group['name']!r}) holds {', '.join(problems)}: a step "
                    "with it would make the trained values non-finite or wrong. Fix: pass finite values, and make the "
                    "LR scheduler (or the code that sets param_groups) write finite ones."
                )
        if self.max_grad_norm is not None and not (_finite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(
                f"QuantFullOptimizer max_grad_norm={self.max_grad_norm!r} must be a finite number > 0. Fix: pass e.g. "
                "max_grad_norm=1.0, or None for no clipping."
            )

    @staticmethod
    def _restore_int8(optimizer: "QuantFullOptimizer") -> None:
        """torch casts loaded state to the dtype of its parameter (the float32 anchors): put the momentum codes
        back in int8 (exact: they are integers)."""
        for state in optimizer.state.values():
            if "momentum_codes" in state:
                state["momentum_codes"] = state["momentum_codes"].to(torch.int8)
                state["momentum_absmax"] = state["momentum_absmax"].to(torch.float32)

    def _clip(self, grad: torch.Tensor, norm: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``grad`` scaled to at most ``max_grad_norm``; ``norm``: its norm when it is only a part of the gradient
        (a row shard), else computed here."""
        if self.max_grad_norm is None:
            return grad
        norm = float(whole_value(grad.norm() if norm is None else norm))  # an FSDP2 shard's norm: over all shards
        return grad * (self.max_grad_norm / norm) if norm > self.max_grad_norm else grad

    def _layer_state(self, layer: QuantFullLayer) -> dict:
        """The layer's optimizer state: step count and int8 momentum (zero at the first step)."""
        anchor = layer.qf_anchor[layer.adapter]
        if anchor is not self._anchors[self._index[id(layer)]]:
            raise RuntimeError(
                f"The parameters of QuantFull layer {layer.layer_name!r} were replaced after QuantFullOptimizer was "
                "created (FSDP's fully_shard does this, as does to_empty() or load_state_dict(assign=True)), so its "
                f"optimizer state would be lost or split between objects. {SUPPORTED_ENGINES}. Fix: under FSDP2, "
                f"{FSDP2_RECIPE}; otherwise use DistributedDataParallel, or create the optimizer after the model's "
                "parameters are final."
            )
        state = self.state[anchor]
        codes = layer.qf_codes[layer.adapter]
        if state and state["momentum_codes"].numel() != codes.numel():
            raise RuntimeError(
                f"QuantFull layer {layer.layer_name!r} holds {codes.numel()} int8 weights but its momentum has "
                f"{state['momentum_codes'].numel()} values: the layer was sharded or unsharded (shard_quant_full, "
                "unshard_quant_full) after training started without the optimizer, or a checkpoint of another "
                "rank or world size was loaded. Fix: pass the optimizer to unshard_quant_full(model, optimizer), "
                "shard before the first step, and load each rank's own optimizer checkpoint."
            )
        if not state:
            self._check_wrapping()  # at each layer's first step, before any state changes
            blocks = -(-codes.numel() // self.momentum_block_size)
            state["step"] = 0
            state["momentum_codes"] = torch.zeros(codes.numel(), dtype=torch.int8, device=codes.device)
            state["momentum_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=codes.device)
        return state

    def _hyper(self) -> LionHyper:
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        return LionHyper(group["lr"], beta1, beta2, group["weight_decay"])

    def _seed(self, layer: QuantFullLayer, state: dict) -> int:
        """Stochastic rounding's seed for this layer and step."""
        return hash((self.seed, self._index[id(layer)], state["step"])) & (2**63 - 1)

    def _skip(self, layer: QuantFullLayer) -> None:
        self.skipped_updates += 1
        logger.warning("QuantFull: skipped the update of a layer (%d x %d) whose gradient has NaN or Inf.",
                       layer.out_features, layer.in_features)

    def _step_from_activations(self, layer: QuantFullLayer, grad_output: torch.Tensor, x: torch.Tensor) -> bool:
        """The fused update from ``grad_output (tokens, out)`` and ``x (tokens, in)``, when it applies (see the class
        doc); False leaves the layer to the reference path (:meth:`_fused_step` with the weight gradient)."""
        self._check_hyperparameters()
        codes, scale, index, value, group_size = layer.int8_weight()
        if self.gradient_accumulation_steps > 1 or self.max_grad_norm is not None:
            return False
        if layer.qf_shard is not None or data_parallel_group(self.process_group) is not None:
            return False  # the gradient must be averaged (or reduce-scattered) before the step
        if not fused_step_supported(grad_output, x, codes, self.momentum_block_size):
            return False
        state = self._layer_state(layer)
        if not (torch.isfinite(grad_output).all() and torch.isfinite(x).all()):
            self._skip(layer)
            return True
        lion_step_from_activations_(
            grad_output, x, codes, scale, index, value, state["momentum_codes"], state["momentum_absmax"],
            self._hyper(), group_size, self.momentum_block_size, layer.stochastic_rounding, self._seed(layer, state),
        )
        state["step"] += 1
        return True

    def _fused_step(self, layer: QuantFullLayer, grad: torch.Tensor) -> None:
        """Lion on one layer's int8 state, from inside its backward (a row-sharded layer first reduce-scatters the
        gradient: its rows of the ranks' mean)."""
        self._check_hyperparameters()
        state = self._layer_state(layer)
        if layer.qf_shard is not None:
            grad = reduce_scatter_rows(grad.to(torch.float32), layer.qf_shard)
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
        """Lion on the layer's int8 state with ``grad`` (owned: averaged over the data-parallel ranks in place; a
        row-sharded layer's rows, already averaged: its ranks agree on the whole gradient's finiteness and norm)."""
        shard, norm = layer.qf_shard, None
        if shard is None:
            grad = average_gradient_(grad.to(torch.float32), data_parallel_group(self.process_group))
            finite = bool(torch.isfinite(grad).all())
        else:
            square = torch.linalg.vector_norm(grad, dtype=torch.float64).square().reshape(1)
            norm = all_ranks_sum(square, shard).sqrt()[0]  # the whole layer's gradient norm
            finite = bool(torch.isfinite(norm))  # a NaN or Inf in any rank's rows makes the sum non-finite
        if not finite:
            self._skip(layer)
            return
        generator = None
        if layer.stochastic_rounding:
            generator = torch.Generator(device=grad.device)
            generator.manual_seed(self._seed(layer, state))
        codes, scale, index, value, group_size = layer.int8_weight()
        with torch.no_grad():
            lion_step_(
                codes, scale, index, value, state["momentum_codes"], state["momentum_absmax"], self._clip(grad, norm),
                self._hyper(), group_size, self.momentum_block_size, layer.stochastic_rounding, generator,
                None if shard is None else (shard.first_row, shard.total_rows),
            )
        state["step"] += 1

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Update the float trainables with Lion (the int8 layers were updated during backward)."""
        self._check_hyperparameters()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_wrapping()
        for group in self.param_groups[1:]:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad.to(torch.float32)
                if not whole_value(torch.isfinite(grad).all()):  # FSDP2: every rank decides for the whole param
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

    def _check_wrapping(self) -> None:
        """Raise when ``fully_shard`` wrapped the model after this optimizer was created: it put new parameters in
        place of the float ones this optimizer holds (stepping those would silently train nothing), and the checks
        of :func:`~peft_quant.distributed.check_engines` never saw the wrapping."""
        model = self._model()
        if self._fsdp_at_start or model is None or not _has_fsdp2(model):
            return
        raise RuntimeError(
            "fully_shard wrapped the model after this QuantFullOptimizer was created: its float parameters were "
            "replaced by FSDP2's, which get the gradients, so this step would update nothing. Fix: create "
            f"QuantFullOptimizer(model, ...) after fully_shard (under FSDP2: {FSDP2_RECIPE})."
        )

    def _flush_accumulation(self) -> None:
        """Apply gradients still accumulating at an optimizer step: the Trainer ends an epoch with a shorter
        accumulation when the batches do not divide evenly, and int8 steps must stay aligned with its steps."""
        for layer in self._layers:
            state = self.state.get(layer.qf_anchor[layer.adapter])
            if state and "grad_accum" in state:
                state["micro_steps"] = 0
                self._apply(layer, state, state.pop("grad_accum"))


def _has_fsdp2(model: nn.Module) -> bool:
    """Whether ``fully_shard`` wrapped ``model`` or one of its submodules."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def _finite(value: object) -> bool:
    """Whether ``value`` is a real number (or one-element tensor) that is neither NaN nor infinite."""
    return isinstance(value, (int, float, torch.Tensor)) and not isinstance(value, bool) and math.isfinite(value)


class _Int8Updater:
    """The optimizer's hook on each QuantFull layer: called with a weight gradient (the reference path), or asked to
    update straight from the layer's output gradient and input, fused (:meth:`QuantFullLayer.update_from_activations`).
    An updater a user installs in its place (a plain callable) always gets the weight gradient."""

    def __init__(self, optimizer: QuantFullOptimizer) -> None:
        self.optimizer = optimizer

    def __call__(self, layer: QuantFullLayer, grad: torch.Tensor) -> None:
        self.optimizer._fused_step(layer, grad)

    def update_from_activations(self, layer: QuantFullLayer, grad_output: torch.Tensor, x: torch.Tensor) -> bool:
        return self.optimizer._step_from_activations(layer, grad_output, x)
