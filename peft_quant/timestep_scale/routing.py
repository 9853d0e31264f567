"""Which timestep expert each sample uses, captured from the denoiser's own forward arguments.

A :class:`TimestepRouter` is attached to the denoiser (the module whose ``forward`` takes ``timestep``): a forward
pre-hook reads the timestep argument (positional or keyword), turns it into one value per sample, and makes it
current until the forward returns (or raises). Every TimestepScale layer inside asks the router for its samples'
expert indices; a layer called outside a denoiser forward gets a clear error.

Gradient checkpointing replays parts of the forward during backward, after the pre-hook's forward has ended (PEFT
issue 2826: hook-captured state is then gone or stale, silently zeroing gradients). The router therefore wraps
every ``_gradient_checkpointing_func`` of the denoiser's submodules (diffusers' and transformers' mechanism) so
that the checkpointed function carries the timesteps current when it was first called, and restores them when it
is replayed. Checkpointing the whole denoiser call works as is: the replay runs the pre-hook again.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Optional

import torch
from torch import nn


class RoutingError(RuntimeError):
    """A TimestepScale layer ran without a timestep to pick its expert from."""


class TimestepRouter:
    """Holds the per-sample timesteps of the denoiser forward in progress (a stack, for replays inside it)."""

    def __init__(self, denoiser: nn.Module, argument: str, multiplier: float, num_train_timesteps: float) -> None:
        self.configure(denoiser, argument, multiplier, num_train_timesteps)
        self._stack: list[torch.Tensor] = []
        self._index_cache: dict[tuple[int, tuple[float, ...]], tuple[torch.Tensor, Optional[int]]] = {}
        self.last_experts: dict[tuple[float, ...], torch.Tensor] = {}  # boundaries → experts of the last forward
        self._checkpoint_owners = [
            m for m in denoiser.modules()
            if hasattr(m, "gradient_checkpointing") or hasattr(m, "_gradient_checkpointing_func")
        ]
        self._handles = [
            denoiser.register_forward_pre_hook(self._enter, with_kwargs=True),
            denoiser.register_forward_hook(self._exit, always_call=True),
        ]

    def configure(self, denoiser: nn.Module, argument: str, multiplier: float, num_train_timesteps: float) -> None:
        """Set how the timestep is read: the forward argument's name, its factor to ``[0, T]``, and ``T``."""
        self.position = _argument_position(denoiser, argument)
        self.argument = argument
        self.multiplier = multiplier
        self.num_train_timesteps = num_train_timesteps

    @property
    def reading(self) -> tuple[str, float, float]:
        return self.argument, self.multiplier, self.num_train_timesteps

    def detach(self) -> None:
        """Remove the hooks (on unload)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ---- capture ------------------------------------------------------------------------------------------------

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.argument in kwargs:
            value = kwargs[self.argument]
        elif self.position is not None and self.position < len(args):
            value = args[self.position]
        else:
            raise RoutingError(
                f"{type(module).__name__} was called without its `{self.argument}` argument, so TimestepScale cannot "
                "pick a timestep expert. Fix: pass the timestep, or set TimestepScaleConfig(timestep_argument=...) "
                "to the name of the denoiser's timestep argument."
            )
        self._push(self._per_sample(value, _batch_size(args, kwargs)))
        self._wrap_checkpointing()

    def _exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._stack:
            self._stack.pop()
        self._index_cache.clear()

    def _push(self, timesteps: torch.Tensor) -> None:
        self._stack.append(timesteps)
        self._index_cache.clear()

    def _per_sample(self, value: Any, batch: Optional[int]) -> torch.Tensor:
        t = torch.as_tensor(value).detach()
        if t.dim() > 1 or (t.dim() == 1 and batch is not None and t.numel() not in (1, batch)):
            raise RoutingError(
                f"The denoiser's `{self.argument}` has shape {tuple(t.shape)}; expected a scalar or one value per "
                f"sample (batch {batch})."
            )
        t = t.to(torch.float64).reshape(-1) * self.multiplier
        if batch is not None and t.numel() == 1:
            t = t.expand(batch).contiguous()
        low, high = float(t.min()), float(t.max())
        if low < 0 or high > self.num_train_timesteps:
            raise RoutingError(
                f"Timesteps {low:g}..{high:g} (after multiplying by timestep_multiplier={self.multiplier:g}) lie outside "
                f"[0, {self.num_train_timesteps:g}]. Fix: set TimestepScaleConfig(num_train_timesteps=...) to the "
                "scheduler's range, or timestep_multiplier for denoisers that take fractions of it."
            )
        return t

    def _wrap_checkpointing(self) -> None:
        for owner in self._checkpoint_owners:
            func = getattr(owner, "_gradient_checkpointing_func", None)
            if func is not None and getattr(func, "_peft_quant_router", None) is not self:
                owner._gradient_checkpointing_func = self._replaying(func)

    def _replaying(self, checkpoint_func: Callable) -> Callable:
        """Wrap a checkpointing function so the checkpointed call sees the same timesteps when replayed."""
        router = self

        @functools.wraps(checkpoint_func)
        def checkpoint(function: Callable, *args: Any, **kwargs: Any) -> Any:
            timesteps = router._stack[-1] if router._stack else None

            def with_timesteps(*inner_args: Any, **inner_kwargs: Any) -> Any:
                if timesteps is None:
                    return function(*inner_args, **inner_kwargs)
                router._push(timesteps)
                try:
                    return function(*inner_args, **inner_kwargs)
                finally:
                    router._stack.pop()
                    router._index_cache.clear()

            return checkpoint_func(with_timesteps, *args, **kwargs)

        checkpoint._peft_quant_router = router
        return checkpoint

    # ---- lookup -------------------------------------------------------------------------------------------------

    def experts(self, boundaries: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, Optional[int]]:
        """``(per-sample expert indices, the single expert if all samples share one else None)``."""
        if not self._stack:
            raise RoutingError(
                "A TimestepScale layer was called outside a forward of the denoiser it was attached to, so there is "
                "no timestep to pick its expert from. Fix: call the denoiser (or the PeftModel wrapping it) with its "
                "timestep, not its layers or blocks directly."
            )
        key = (id(self._stack[-1]), boundaries)
        cached = self._index_cache.get(key)
        if cached is None or cached[0].device != device:
            t = self._stack[-1]
            edges = torch.tensor(boundaries, dtype=torch.float64)
            index = torch.bucketize(t, edges, right=True)  # number of boundaries ≤ t
            single = int(index[0]) if bool((index == index[0]).all()) else None
            self.last_experts[boundaries] = index
            cached = (index.to(device), single)
            self._index_cache[key] = cached
        return cached


def default_boundaries(num_experts: int, num_train_timesteps: float) -> tuple[float, ...]:
    """``k = floor(t·K/T)`` as boundaries: expert ``k`` covers ``[k·T/K, (k+1)·T/K)`` (the last one includes ``T``)."""
    return tuple(num_train_timesteps * k / num_experts for k in range(1, num_experts))


def _argument_position(denoiser: nn.Module, argument: str) -> Optional[int]:
    """Position of ``argument`` among ``forward``'s positional parameters (``self`` excluded), or ``None``."""
    try:
        parameters = list(inspect.signature(denoiser.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if argument in positional:
        return positional.index(argument)
    if not any(p.name == argument for p in parameters) and not any(p.kind == p.VAR_KEYWORD for p in parameters):
        raise ValueError(
            f"{type(denoiser).__name__}.forward has no argument {argument!r}, so TimestepScale cannot read the "
            "timestep from it. Fix: wrap the denoiser itself (UNet2DConditionModel, SD3Transformer2DModel, "
            "FluxTransformer2DModel, ...), or set TimestepScaleConfig(timestep_argument=...)."
        )
    return None


def _batch_size(args: tuple, kwargs: dict) -> Optional[int]:
    """The batch size: the leading dimension of the denoiser's input (``sample`` / ``hidden_states``)."""
    first = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
    for value in (first, *args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return int(value.shape[0])
    return None
