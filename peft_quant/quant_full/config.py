"""Configuration of QuantFull (QFT): full-parameter tuning with int8 weights and int8 Lion momentum."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

from peft.utils import PeftType

from ..config_base import PeftQuantConfig, strict_fields


@strict_fields
@dataclass
class QuantFullConfig(PeftQuantConfig):
    """Configuration of QuantFull (QFT, Li et al. 2023).

    Each targeted Linear layer's weight becomes trainable int8 state: int8 codes with a float scale per output
    channel (or per group of ``group_size`` inputs), plus the largest ``outlier_fraction`` of weights kept exactly
    in float (sparse). No float master copy exists: the weight gradient is consumed inside backward by a fused
    Lion step of :class:`~peft_quant.QuantFullOptimizer`, which writes the result back to int8 (stochastically
    rounded by default) and keeps Lion's momentum in int8 too. The base layer's own weight is released.
    """

    FORMAT_VERSION: ClassVar[int] = 2  # 2: qf_anchor is 1-D, shape (1,) (FSDP refuses 0-d parameters)
    CARD_SETTINGS: ClassVar[tuple[str, ...]] = (
        "target_modules", "group_size", "outlier_fraction", "stochastic_rounding", "train_bias", "modules_to_save",
    )
    METHOD_SUMMARY: ClassVar[str] = (
        "QuantFull (QFT, Li et al. 2023): every weight of the targeted layers trains, held as int8 codes with "
        "per-channel scales and ~1% float outliers, updated by Lion with int8 momentum inside backward. The "
        "adapter holds the tuned int8 weights themselves."
    )

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names (suffix match) or a regex of the Linear layers to train fully, or "
                  "'all-linear'. Supported bases: nn.Linear, bitsandbytes 4/8-bit, GPTQ (dequantized once)."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of layers never to target."}
    )
    group_size: Optional[int] = field(
        default=None,
        metadata={"help": "Inputs sharing one int8 scale; None: one scale per output channel."},
    )
    outlier_fraction: float = field(
        default=0.01,
        metadata={"help": "Share of each layer's weights (largest magnitudes) kept exactly in float, sparse; 0 turns "
                  "the hybrid quantizer off."},
    )
    stochastic_rounding: bool = field(
        default=True,
        metadata={"help": "Round updated weights to int8 stochastically (unbiased). False: round to nearest, under "
                  "which steps below half an int8 step vanish."},
    )
    train_bias: bool = field(
        default=True,
        metadata={"help": "Train the biases of targeted layers (in float, saved with the adapter). False keeps them "
                  "frozen per adapter, also after set_adapter and when loaded with is_trainable=True."},
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules (e.g. norms, a head) trained in float and saved."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.QUANT_FULL
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.target_modules is None:
            raise ValueError("QuantFullConfig needs target_modules (names, a regex, or 'all-linear').")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"QuantFullConfig.group_size must be a positive integer or None, got {self.group_size!r}.")
        if not 0.0 <= self.outlier_fraction < 0.5:
            raise ValueError(
                f"QuantFullConfig.outlier_fraction must be in [0, 0.5), got {self.outlier_fraction!r} (the paper "
                "keeps ~1%)."
            )
