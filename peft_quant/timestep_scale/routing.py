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

A timestep that cannot pick an expert unambiguously is refused with a :class:`RoutingError` naming the fix, never
clamped into some expert: anything but real numbers, non-finite values, values outside ``[0, T]`` after the
multiplier, a count that is neither one nor the batch size, and fractions of ``T`` (flow matching's ``t / 1000``)
reaching a denoiser read without a multiplier, which would silently send every sample to expert 0 (see
:meth:`TimestepRouter.experts`). ``t = T`` itself is valid: flow-matching schedulers start at ``sigma = 1``, i.e.
``t = T``, and it belongs to the last expert.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Optional

import torch
from torch import nn


class RoutingError(RuntimeError):
    """A TimestepScale layer ran without a valid timestep to pick its expert from."""


class TimestepRouter:
    """Holds the per-sample timesteps of the denoiser forward in progress (a stack, for replays inside it)."""

    def __init__(
        self, denoiser: nn.Module, argument: str, multiplier: float, num_train_timesteps: float, check_fractions: bool
    ) -> None:
        self.configure(denoiser, argument, multiplier, num_train_timesteps, check_fractions)
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

    def configure(
        self, denoiser: nn.Module, argument: str, multiplier: float, num_train_timesteps: float, check_fractions: bool
    ) -> None:
        """Set how the timestep is read: the forward argument's name, its factor to ``[0, T]``, ``T``, and whether
        to refuse timesteps that look like fractions of ``T`` (on when the multiplier of 1 was a default, not the
        user's statement that the timesteps span ``[0, T]``)."""
        self.position = _argument_position(denoiser, argument)
        self.argument = argument
        self.multiplier = multiplier
        self.num_train_timesteps = num_train_timesteps
        self.check_fractions = check_fractions
        # A forward whose timesteps exceeded 1 shows they span [0, T]: a sampling loop's last steps may then lie in
        # (0, 1) legitimately, so the fractions check (see `experts`) only applies until such a forward was seen.
        self._seen_above_one = False

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
        """The timestep argument as one float64 value per sample on the CPU (where ``experts`` bucketizes it),
        multiplied into ``[0, T]``; a RoutingError naming the fix for anything that cannot pick an expert."""
        t = _real_tensor(value, self.argument)
        if t.dim() > 1 or t.numel() == 0 or (t.dim() == 1 and batch is not None and t.numel() not in (1, batch)):
            raise RoutingError(
                f"The denoiser's `{self.argument}` has shape {tuple(t.shape)}; expected a scalar or one value per "
                f"sample (batch {batch}). Fix: pass one timestep per sample, shape ({batch},), or a single one for "
                "the whole batch."
            )
        t = t.to("cpu", torch.float64).reshape(-1) * self.multiplier
        if not bool(torch.isfinite(t).all()):
            raise RoutingError(
                f"The denoiser's `{self.argument}` contains non-finite values ({_preview(t)} after multiplying by "
                f"timestep_multiplier={self.multiplier:g}), which belong to no timestep expert. Fix: pass finite "
                "timesteps; NaN or inf usually comes from the noise schedule or the timestep sampling upstream."
            )
        if batch is not None and t.numel() == 1:
            t = t.expand(batch).contiguous()
        low, high = float(t.min()), float(t.max())
        if low < 0 or high > self.num_train_timesteps:
            raise RoutingError(
                f"Timesteps {low:g}..{high:g} (after multiplying by timestep_multiplier={self.multiplier:g}) lie "
                f"outside [0, {self.num_train_timesteps:g}]. Fix: set TimestepScaleConfig(num_train_timesteps=...) to "
                "the scheduler's range, or timestep_multiplier for denoisers that take fractions of it."
            )
        self._seen_above_one = self._seen_above_one or high > 1
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
        """``(per-sample expert indices, the single expert if all samples share one else None)``.

        Refuses timesteps that all lie in ``[0, 1]``, some strictly between, when the first boundary is above 1 and
        the multiplier of 1 is a default: they are fractions of ``T`` (a flow-matching pipeline driving a UNet, say)
        and would all land in expert 0. Integer timesteps 0 and 1, a user-set multiplier, single-expert adapters
        and a router that has already seen timesteps above 1 (the tail of a ``[0, T]`` sampling loop) pass.
        """
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
            if boundaries and boundaries[0] > 1 and self.check_fractions and not self._seen_above_one:
                self._refuse_fractions(t, boundaries)
            edges = torch.tensor(boundaries, dtype=torch.float64)
            index = torch.bucketize(t, edges, right=True)  # number of boundaries ≤ t
            single = int(index[0]) if bool((index == index[0]).all()) else None
            self.last_experts[boundaries] = index
            cached = (index.to(device), single)
            self._index_cache[key] = cached
        return cached

    def _refuse_fractions(self, t: torch.Tensor, boundaries: tuple[float, ...]) -> None:
        """Raise if ``t`` (all within ``[0, 1]``, some strictly between) looks like fractions of ``T``."""
        if float(t.max()) <= 1 and bool(((t > 0) & (t < 1)).any()):
            total = self.num_train_timesteps
            raise RoutingError(
                f"The denoiser's `{self.argument}` values ({_preview(t)}) all lie in [0, 1], while the timestep "
                f"experts split [0, {total:g}] at {list(boundaries)}: every sample would silently use expert 0. They "
                f"look like fractions of the training range (flow matching's t / {total:g}). Fix: set "
                f"TimestepScaleConfig(timestep_multiplier={total:g}) so they map onto [0, {total:g}]; if they really "
                "are timesteps of that range, set timestep_multiplier=1 explicitly."
            )


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


def _real_tensor(value: Any, argument: str) -> torch.Tensor:
    """``value`` as a detached tensor of real numbers, or a RoutingError saying what was received."""
    fix = (
        f"Fix: pass the scheduler's timestep as `{argument}` (a number, or a tensor with one value per sample, e.g. "
        "scheduler.timesteps[i]), or set TimestepScaleConfig(timestep_argument=...) if the denoiser reads its "
        "timestep from another argument."
    )
    if value is None or isinstance(value, (str, bytes)):
        raise RoutingError(f"The denoiser's `{argument}` is {value!r}, not a number. {fix}")
    try:
        t = torch.as_tensor(value).detach()
    except (TypeError, ValueError, RuntimeError) as error:
        raise RoutingError(
            f"The denoiser's `{argument}` ({type(value).__name__}) cannot be read as numbers: {error}. {fix}"
        ) from None
    if t.dtype == torch.bool or t.is_complex():
        raise RoutingError(f"The denoiser's `{argument}` is a {t.dtype} tensor, not real numbers. {fix}")
    return t


def _preview(t: torch.Tensor, count: int = 4) -> str:
    """The first ``count`` values of ``t`` for an error message."""
    values = ", ".join(f"{float(v):g}" for v in t.reshape(-1)[:count])
    return values + (", ..." if t.numel() > count else "")


def _batch_size(args: tuple, kwargs: dict) -> Optional[int]:
    """The batch size: the leading dimension of the denoiser's input (``sample`` / ``hidden_states``)."""
    first = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
    for value in (first, *args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return int(value.shape[0])
    return None
