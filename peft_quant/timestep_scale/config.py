"""Configuration of TimestepScale (TuneQDM): per-channel scales of quantized layers, one set per timestep range."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

from peft.utils import PeftType

from ..config_base import PeftQuantConfig, strict_fields
from .routing import default_boundaries


@strict_fields
@dataclass
class TimestepScaleConfig(PeftQuantConfig):
    """Configuration of TimestepScale (TuneQDM, Ryu et al. 2024) for diffusion denoisers.

    Each targeted layer computes ``y = s_out[k] ⊙ W_q(s_in[k] ⊙ x) + b`` where ``k`` is the timestep expert of the
    sample: ``K = num_experts`` sets of input and output channel scales, all ones at init, expert ``k`` covering
    timesteps ``[k·T/K, (k+1)·T/K)`` unless ``expert_boundaries`` says otherwise. The quantized weight is never
    changed or copied; the expert is read per sample from the denoiser's own ``timestep`` argument.
    """

    FORMAT_VERSION: ClassVar[int] = 1
    CARD_SETTINGS: ClassVar[tuple[str, ...]] = (
        "num_experts", "expert_boundaries", "num_train_timesteps", "train_input_scales", "train_output_scales",
        "timestep_argument", "timestep_multiplier", "modules_to_save",
    )
    METHOD_SUMMARY: ClassVar[str] = (
        "TimestepScale (TuneQDM, Ryu et al. 2024): per-channel input and output scales of each quantized layer, "
        "`y = s_out[k] ⊙ W_q(s_in[k] ⊙ x) + b`, with one set of scales (expert `k`) per timestep range, picked per "
        "sample from the denoiser's timestep. The quantized weights are never changed."
    )

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names (suffix match) or a regex of the layers to scale. Default: every Linear and Conv2d "
            "of the denoiser (float, peft-quant int4/int8, bitsandbytes or GPTQ layers), resolved when the adapter "
            "is created into `resolved_targets` and a regex matching exactly those full names."
        },
    )
    resolved_targets: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Filled in automatically when target_modules is None: the full names of every layer TimestepScale "
            "could target in the model the adapter was created on. Loading checks the model has exactly these, so a "
            "default-targeted adapter never loads onto another architecture."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of layers never to target."}
    )
    num_experts: int = field(
        default=2, metadata={"help": "Number K of timestep experts (2 is the paper's best; 4 overfits)."}
    )
    num_train_timesteps: float = field(
        default=1000, metadata={"help": "T: timesteps lie in [0, T] (the scheduler's num_train_timesteps)."}
    )
    expert_boundaries: Optional[list[float]] = field(
        default=None,
        metadata={
            "help": "Explicit increasing boundaries between experts (K - 1 values in (0, T)); expert k takes "
            "timesteps in [boundary[k-1], boundary[k]). Default: K equal ranges."
        },
    )
    train_input_scales: bool = field(default=True, metadata={"help": "Train per-input-channel scales s_in."})
    train_output_scales: bool = field(default=True, metadata={"help": "Train per-output-channel scales s_out."})
    timestep_argument: str = field(
        default="timestep", metadata={"help": "Name of the denoiser forward's timestep argument."}
    )
    timestep_multiplier: Optional[float] = field(
        default=None,
        metadata={
            "help": "Factor turning the denoiser's timestep argument into [0, T]. Default: 1000 for Flux "
            "transformers (which take t / 1000), else 1."
        },
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules to train fully and save with the adapter."}
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: all scales start at one (model unchanged). False: random scales, for tests only."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.TIMESTEP_SCALE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if self.resolved_targets is not None:
            self.resolved_targets = sorted(set(self.resolved_targets))
            if self.target_modules not in (None, exact_names_pattern(self.resolved_targets)):
                raise ValueError(
                    "TimestepScaleConfig.target_modules and resolved_targets disagree: resolved_targets records the "
                    "default targets (target_modules=None), and target_modules must then be the regex of exactly "
                    "those names. Fix: set resolved_targets=None to target your own target_modules, or "
                    "target_modules=None to keep the recorded defaults."
                )
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"TimestepScaleConfig.num_experts must be a positive integer, got {self.num_experts!r}.")
        if not self.num_train_timesteps > 0:
            raise ValueError(f"TimestepScaleConfig.num_train_timesteps must be > 0, got {self.num_train_timesteps!r}.")
        if self.expert_boundaries is not None:
            edges = [float(b) for b in self.expert_boundaries]
            if len(edges) != self.num_experts - 1:
                raise ValueError(
                    f"TimestepScaleConfig.expert_boundaries has {len(edges)} values; num_experts={self.num_experts} "
                    f"needs {self.num_experts - 1}. Fix: give K - 1 boundaries, or leave it None for equal ranges."
                )
            if any(not 0 < b < self.num_train_timesteps for b in edges) or edges != sorted(set(edges)):
                raise ValueError(
                    f"TimestepScaleConfig.expert_boundaries={edges} must increase strictly inside "
                    f"(0, {self.num_train_timesteps})."
                )
            self.expert_boundaries = edges
        if not (self.train_input_scales or self.train_output_scales):
            raise ValueError(
                "TimestepScaleConfig trains nothing with train_input_scales=False and train_output_scales=False. "
                "Fix: enable at least one (output scales only, with num_experts=1, is PEQA)."
            )
        if self.timestep_multiplier is not None and not self.timestep_multiplier > 0:
            raise ValueError(f"TimestepScaleConfig.timestep_multiplier must be > 0, got {self.timestep_multiplier!r}.")

    @property
    def boundaries(self) -> tuple[float, ...]:
        """The ``K - 1`` timestep boundaries between experts."""
        if self.expert_boundaries is not None:
            return tuple(self.expert_boundaries)
        return default_boundaries(self.num_experts, float(self.num_train_timesteps))


def exact_names_pattern(names: list[str] | set[str]) -> str:
    """A regex that PEFT's ``target_modules`` fullmatches against exactly ``names``.

    A list of names would be matched as suffixes (and PEFT shortens long lists to the shortest distinguishing
    suffixes, such as ``"2"`` for ``ff.net.2``), which on another model matches other layers or whole blocks.
    """
    return "|".join(re.escape(name) for name in sorted(names))
