"""Configuration of StashQuant (DSQ): block-floating-point compression of activations saved for backward."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from peft.utils import PeftType

from ..config_base import PeftQuantConfig, strict_fields
from .bfp import check_format
from .packer import BitSchedule, check_packer_options


@strict_fields
@dataclass
class StashQuantConfig(PeftQuantConfig):
    """Configuration of StashQuant (DSQ, Yang et al. 2023).

    On its own, ``get_peft_model(model, StashQuantConfig(target_modules=[...]))`` trains the target modules fully
    (as PEFT's ``modules_to_save`` does: a trainable copy saved with the adapter) while every activation saved for
    backward during the model's forward is stored in block floating point at ``bits`` bits, rising over training
    along ``milestones``. To compress the stash of any other PEFT model (QOFT, TimestepScale, QuantFull, LoRA...),
    use ``peft_quant.enable_stash(peft_model, bits=..., milestones=...)`` or the ``stash`` field of peft-quant's
    configs, which takes the same settings as a dict.
    """

    FORMAT_VERSION: ClassVar[int] = 1
    CARD_SETTINGS: ClassVar[tuple[str, ...]] = (
        "target_modules", "bits", "milestones", "unit", "block_size", "scale", "stochastic_rounding", "min_numel",
    )
    METHOD_SUMMARY: ClassVar[str] = (
        "StashQuant (DSQ, Yang et al. 2023): the target modules train fully while the activations saved for "
        "backward are stored in block floating point, with precision rising over training. The adapter holds "
        "the trained modules."
    )

    target_modules: Optional[list[str]] = field(
        default=None, metadata={"help": "Names (suffix match) of modules to train fully, saved with the adapter."}
    )
    bits: int = field(default=4, metadata={"help": "Mantissa bits of the stash at the start (2-8, or 16: unchanged)."})
    milestones: list[list[float]] = field(
        default_factory=list,
        metadata={"help": "[[progress, bits], ...]: bits from that progress on (monotone non-decreasing)."},
    )
    unit: str = field(default="fraction", metadata={"help": "Milestone progress in 'fraction' of the run or 'step'."})
    plateau_patience: Optional[int] = field(
        default=None, metadata={"help": "Raise the bits when the loss has not improved for this many reports."}
    )
    plateau_min_delta: float = field(default=0.0, metadata={"help": "Improvement that resets the plateau count."})
    block_size: int = field(default=32, metadata={"help": "Values sharing one scale: 16, 32 or 64."})
    scale: str = field(
        default="auto",
        metadata={"help": "Per-block scale: 'bf16' (absmax scale, 16 bits per block), 'e8m0' (power-of-two exponent, "
                          "8 bits per block, as OCP Microscaling's MXINT formats) or 'auto' (e8m0 at 8 bits: MXINT8; "
                          "bf16 below)."},
    )
    stochastic_rounding: bool = field(default=False, metadata={"help": "Round mantissas stochastically (unbiased)."})
    min_numel: int = field(default=1024, metadata={"help": "Smaller saved tensors are kept unchanged."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Further modules to train fully and save."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.STASH_QUANT
        if self.stash:
            raise ValueError("StashQuantConfig configures the stash with its own fields; leave `stash` unset.")
        if not self.target_modules or isinstance(self.target_modules, str):
            raise ValueError(
                "StashQuantConfig needs target_modules as a list of module names to train fully (e.g. "
                "['q_proj', 'v_proj']). To compress the stash of another method instead, use "
                "peft_quant.enable_stash(peft_model, ...)."
            )
        self.target_modules = sorted(set(self.target_modules))
        check_format(self.bits, self.block_size, self.scale)
        check_packer_options(self.min_numel, self.stochastic_rounding)
        self.packer_settings()  # validates the schedule

    def packer_settings(self) -> dict[str, Any]:
        """Keyword arguments of :func:`peft_quant.enable_stash` equal to this config."""
        settings = dict(bits=self.bits, milestones=self.milestones, unit=self.unit,
                        plateau_patience=self.plateau_patience, plateau_min_delta=self.plateau_min_delta,
                        block_size=self.block_size, scale=self.scale, stochastic_rounding=self.stochastic_rounding,
                        min_numel=self.min_numel)
        BitSchedule(initial_bits=self.bits, milestones=settings["milestones"], unit=self.unit,
                    plateau_patience=self.plateau_patience, plateau_min_delta=self.plateau_min_delta)
        return settings
