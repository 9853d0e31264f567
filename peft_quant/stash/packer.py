"""Compress what autograd saves for backward during a module's forward, with a bit width that rises over training.

:class:`StashPacker` installs ``torch.autograd.graph.saved_tensors_hooks`` for exactly the duration of the module's
forward (a pre-hook enters, a post-hook that always runs leaves). Floating tensors of at least ``min_numel`` values are
packed to block floating point (:mod:`peft_quant.stash.bfp`); parameters and their views (anything sharing a parameter's
storage), integer and bool tensors, small tensors, and everything at 16 bits pass through untouched, and so are tensors
at least 16 times smaller than the largest saved so far in the forward (softmax log-sum-exps, normalization statistics:
backward exponentiates or divides by them, so their error would be amplified, and they are small). Tensors holding any
outlier of the format (±inf, NaN, or a magnitude of at least half the dtype's largest:
:func:`peft_quant.stash.bfp.find_outliers`) pass through untouched too: that rule catches attention masks (``-inf`` or
``torch.finfo(dtype).min`` where masked) without knowing which tensor is a mask, and masks are not activations worth
compressing (mostly zeros and fill values; no gradient flows into them). A run whose activations already overflowed
keeps them exact, as an uncompressed run would. The check costs one extra pass over the tensor and, on CUDA, one device
synchronization per packed tensor. A tensor saved by several operations (the input shared by q, k and v) is packed once,
and so is memory saved through several views (a hidden state saved as ``(batch, seq, width)`` by one op and as
``(batch·seq, width)`` or transposed by another): dense views are packed as their storage region and restored with their
own shape and strides. Backward runs outside the forward, so segments that gradient checkpointing recomputes are not
packed again (the checkpoint keeps its own saved tensors).

:class:`BitSchedule` gives the bit width as a function of training progress: milestones over steps or fractions of the
run, and optionally a loss-plateau trigger; it never decreases.
"""

from __future__ import annotations

import bisect
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from ..kernels.stash import pack, unpack  # Triton kernels on CUDA, the reference (.bfp) elsewhere
from .bfp import PackedBlocks, check_format

PACKER_ATTRIBUTE = "_peft_quant_stash"


@dataclass
class BitSchedule:
    """Stash bits over training: ``milestones`` are ``(progress, bits)`` pairs, progress in steps (``unit="step"``)
    or in fractions of the run (``unit="fraction"``); before the first milestone, ``initial_bits``. With
    ``plateau_patience``, a loss that has not improved by ``plateau_min_delta`` for that many reports raises the
    bits to the next width in ``plateau_levels``. Bits never decrease."""

    initial_bits: int = 4
    milestones: Sequence[tuple[float, int]] = ()
    unit: str = "fraction"
    plateau_patience: Optional[int] = None
    plateau_min_delta: float = 0.0
    plateau_levels: Sequence[int] = (2, 3, 4, 5, 6, 8, 16)
    bits: int = field(init=False)

    def __post_init__(self) -> None:
        if self.unit not in ("fraction", "step"):
            raise ValueError(
                f"StashQuant schedule unit must be 'fraction' or 'step', got {self.unit!r}. Fix: unit='fraction' "
                "(milestones at fractions of the run) or unit='step'."
            )
        if isinstance(self.milestones, (str, bytes)) or not isinstance(self.milestones, Sequence):
            raise ValueError(
                f"StashQuant milestones must be a list of [progress, bits] pairs, got {self.milestones!r}. Fix: e.g. "
                "milestones=[[0.5, 8]], or [] to keep `bits` for the whole run."
            )
        points = [_milestone(m) for m in self.milestones]
        if self.plateau_patience is not None and not (_is_int(self.plateau_patience) and self.plateau_patience >= 1):
            raise ValueError(
                f"StashQuant plateau_patience must be a positive integer (reports without improvement) or None, got "
                f"{self.plateau_patience!r}. Fix: e.g. plateau_patience=3, or None to turn the plateau trigger off."
            )
        if not (_is_real(self.plateau_min_delta) and self.plateau_min_delta >= 0):
            raise ValueError(
                f"StashQuant plateau_min_delta must be a non-negative number (a loss improvement), got "
                f"{self.plateau_min_delta!r}. Fix: e.g. plateau_min_delta=0.01."
            )
        for _, b in [(0.0, self.initial_bits), *points]:
            check_format(b, 32)
        if [p for p, _ in points] != sorted(p for p, _ in points):
            raise ValueError(f"StashQuant milestones must be sorted by progress, got {points}. Fix: sort them.")
        widths = [self.initial_bits] + [b for _, b in points]
        if any(later < earlier for earlier, later in zip(widths, widths[1:])):
            raise ValueError(
                f"StashQuant bits must rise monotonically over training, got {widths}. Fix: give each milestone at "
                "least the bits of the one before (and `bits` at most the first milestone's)."
            )
        if self.unit == "fraction" and any(not 0 <= p <= 1 for p, _ in points):
            raise ValueError(
                f"StashQuant milestones with unit='fraction' must lie in [0, 1], got {points}. Fix: give fractions of "
                "the run, or unit='step' for step numbers."
            )
        self.milestones = points
        self.bits = self.initial_bits
        self._best: Optional[float] = None
        self._stale = 0

    def update(self, step: int, total_steps: Optional[int] = None, loss: Optional[float] = None) -> int:
        """Advance to ``step`` (of ``total_steps``; needed for ``unit='fraction'``), optionally reporting a loss;
        returns the bits now in force."""
        if self.milestones:
            if self.unit == "fraction":
                if not total_steps:
                    raise ValueError(
                        "A StashQuant schedule in fractions of the run needs total_steps. Fix: call "
                        "update(step, total_steps), or use unit='step'."
                    )
                progress = step / total_steps
            else:
                progress = float(step)
            reached = bisect.bisect_right([p for p, _ in self.milestones], progress)
            if reached:
                self.bits = max(self.bits, self.milestones[reached - 1][1])
        if loss is not None and self.plateau_patience:
            if self._best is None or loss < self._best - self.plateau_min_delta:
                self._best, self._stale = loss, 0
            else:
                self._stale += 1
                if self._stale >= self.plateau_patience:
                    higher = [b for b in self.plateau_levels if b > self.bits]
                    self.bits = higher[0] if higher else self.bits
                    self._stale = 0
        return self.bits


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _milestone(milestone: Any) -> tuple[float, int]:
    """A ``(progress, bits)`` milestone, checked (progress a number, bits an integer; never silently truncated)."""
    if (
        isinstance(milestone, (str, bytes)) or not isinstance(milestone, Sequence) or len(milestone) != 2
        or not _is_real(milestone[0]) or not math.isfinite(milestone[0]) or not _is_int(milestone[1])
    ):
        raise ValueError(
            f"A StashQuant milestone must be a pair [progress, bits] (a finite number, an integer), got {milestone!r}. "
            "Fix: e.g. milestones=[[0.5, 6], [0.8, 8]]."
        )
    return float(milestone[0]), int(milestone[1])


def check_packer_options(min_numel: Any, stochastic_rounding: Any) -> None:
    """Raise a clear error for packer options of the wrong type or range (the format is :func:`check_format`'s)."""
    if not (_is_int(min_numel) and min_numel >= 0):
        raise ValueError(
            f"StashQuant min_numel must be a non-negative integer (saved tensors with fewer values stay unpacked), "
            f"got {min_numel!r}. Fix: e.g. min_numel=1024."
        )
    if not isinstance(stochastic_rounding, bool):
        raise ValueError(
            f"StashQuant stochastic_rounding must be True or False, got {stochastic_rounding!r}. Fix: pass a bool."
        )


@dataclass(frozen=True)
class PackedSave:
    """What the packer keeps for one saved tensor: a packed memory region, shared by every saved view of that memory,
    and how this tensor lies in it (``unpack(region).as_strided(shape, stride)``)."""

    region: PackedBlocks
    shape: torch.Size
    stride: Optional[tuple[int, ...]]  # None: the region unpacks to this tensor itself (contiguous)

    def restore(self) -> torch.Tensor:
        restored = unpack(self.region)
        return restored if self.stride is None else restored.as_strided(self.shape, self.stride)


def _storage_pointers(tensor: torch.Tensor) -> list[int]:
    """Data pointers of the storages behind a parameter: its own, or, for a wrapper tensor subclass (torchao's
    quantized weights, which have no storage of their own), those of its inner tensors."""
    if type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return [ptr for name in names for ptr in _storage_pointers(getattr(tensor, name))]
    return [tensor.untyped_storage().data_ptr()]


def _dense(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s elements fill a storage region exactly, each once (any order of dimensions)."""
    expected = 1
    for size, stride in sorted(((n, s) for n, s in zip(tensor.shape, tensor.stride()) if n != 1), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


class StashPacker:
    """Packs tensors saved for backward during ``module``'s forwards; counts what it holds."""

    def __init__(
        self,
        module: nn.Module,
        schedule: BitSchedule,
        block_size: int = 32,
        min_numel: int = 1024,
        stochastic_rounding: bool = False,
        scale: str = "auto",
    ) -> None:
        check_format(schedule.initial_bits, block_size, scale)
        check_packer_options(min_numel, stochastic_rounding)
        self.schedule = schedule
        self.block_size = block_size
        self.scale = scale
        self.min_numel = min_numel
        self.stochastic_rounding = stochastic_rounding
        self.module = module
        self._contexts: list[Any] = []
        self._param_storages: set[int] = set()
        # this forward's packs by region (None: kept exact)
        self._packed: dict[tuple, tuple[StorageWeakRef, Optional[PackedBlocks]]] = {}
        self._largest = 0
        self.reset_stats()
        self._handles = [
            module.register_forward_pre_hook(self._enter),
            module.register_forward_hook(self._exit, always_call=True),
        ]

    @property
    def bits(self) -> int:
        return self.schedule.bits

    def update(self, step: int, total_steps: Optional[int] = None, loss: Optional[float] = None) -> int:
        """Advance the bit schedule (call once per optimizer step in a plain training loop)."""
        return self.schedule.update(step, total_steps, loss)

    def reset_stats(self) -> None:
        """Zero the counters: ``packed_tensors``, ``original_bytes`` and ``stored_bytes`` of what was packed."""
        self.packed_tensors = 0
        self.original_bytes = 0
        self.stored_bytes = 0

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _enter(self, module: nn.Module, args: tuple) -> None:
        if not torch.is_grad_enabled():
            self._contexts.append(None)
            return
        self._param_storages = {ptr for p in module.parameters() for ptr in _storage_pointers(p)}
        if not any(self._contexts):
            self._packed, self._largest = {}, 0
        context = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        context.__enter__()
        self._contexts.append(context)

    def _exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._contexts:
            context = self._contexts.pop()
            if context is not None:
                context.__exit__(None, None, None)
        if not any(self._contexts):
            self._packed = {}

    def _pack(self, tensor: torch.Tensor) -> Any:
        if (
            self.bits >= 16
            or not tensor.is_floating_point()
            or tensor.numel() < self.min_numel
            or isinstance(tensor, nn.Parameter)
            or type(tensor) is not torch.Tensor  # a tensor subclass (torchao's quantized weights): never packed
            or tensor.untyped_storage().data_ptr() in self._param_storages
        ):
            return tensor
        self._largest = max(self._largest, tensor.numel())
        if tensor.numel() * 16 <= self._largest:
            return tensor
        storage = tensor.untyped_storage()
        if _dense(tensor):  # pack the memory region; every dense view of it shares the packed copy
            region = tensor.as_strided((tensor.numel(),), (1,))  # (numel,) in memory order
            key = (storage.data_ptr(), tensor.storage_offset(), tensor.numel(), tensor.dtype, tensor._version)
            shape, stride = tensor.shape, tensor.stride()
        else:  # overlapping or gapped (expanded, sliced): packed on its own, restored contiguous
            region = tensor
            key = (storage.data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()),
                   tensor.dtype, tensor._version)
            shape, stride = tensor.shape, None
        seen = self._packed.get(key)
        if seen is None or seen[0].expired():  # an expired storage's address may have been reused: pack anew
            packed = pack(region, self.bits, self.block_size, self.stochastic_rounding, scale=self.scale)
            if packed.outliers:  # a mask, or overflowed activations: kept exact (see the module docstring)
                packed = None
            else:
                self.packed_tensors += 1
                self.original_bytes += tensor.numel() * tensor.element_size()
                self.stored_bytes += packed.nbytes
            seen = self._packed[key] = (StorageWeakRef(storage), packed)
        return tensor if seen[1] is None else PackedSave(seen[1], shape, stride)

    @staticmethod
    def _unpack(saved: Any) -> torch.Tensor:
        return saved.restore() if isinstance(saved, PackedSave) else saved


def attach_packer(module: nn.Module, **settings: Any) -> StashPacker:
    """Attach a :class:`StashPacker` to ``module`` (replacing one already there) and return it."""
    old = getattr(module, PACKER_ATTRIBUTE, None)
    if old is not None:
        old.detach()
    schedule = BitSchedule(
        initial_bits=settings.pop("bits", 4),
        milestones=settings.pop("milestones", ()),
        unit=settings.pop("unit", "fraction"),
        plateau_patience=settings.pop("plateau_patience", None),
        plateau_min_delta=settings.pop("plateau_min_delta", 0.0),
    )
    packer = StashPacker(module, schedule, **settings)
    object.__setattr__(module, PACKER_ATTRIBUTE, packer)
    return packer
