"""Configuration of QOFT: orthogonal fine-tuning of quantized layers by rotating their inputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional, Union

from peft.utils import PeftType

from ..config_base import PeftQuantConfig, strict_fields


@strict_fields
@dataclass
class QOFTConfig(PeftQuantConfig):
    """Configuration of QOFT (OFTv2 / QOFT): ``y = base_layer(Rᵀ x)`` with a block-diagonal orthogonal ``R``.

    ``R``'s blocks come from skew-symmetric parameters through the Cayley transform with a truncated Neumann
    series, so the quantized base layer is called unchanged and never dequantized in training. Give exactly one
    of ``block_size`` and ``num_blocks``.
    """

    FORMAT_VERSION: ClassVar[int] = 1
    CARD_SETTINGS: ClassVar[tuple[str, ...]] = (
        "target_modules", "block_size", "num_blocks", "num_neumann_terms", "block_share", "module_dropout", "bias",
        "modules_to_save",
    )
    METHOD_SUMMARY: ClassVar[str] = (
        "QOFT (OFTv2, Qiu et al. 2025): a block-diagonal orthogonal rotation of each targeted layer's input, "
        "`y = base_layer(Rᵀx)`, with `R` from the Cayley transform truncated to a Neumann series. The quantized "
        "base weights are never changed or dequantized during training."
    )

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names (suffix match) or a regex of the layers to rotate, or 'all-linear'. Supported "
            "layers: nn.Linear, nn.Conv2d, bitsandbytes Linear4bit/Linear8bitLt, GPTQ linear layers."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of layers never to target."}
    )
    block_size: Optional[int] = field(
        default=None,
        metadata={"help": "Width b of each rotation block; must divide every targeted layer's input width."},
    )
    num_blocks: Optional[int] = field(
        default=None,
        metadata={"help": "Number of blocks per layer (block size = input width / num_blocks); instead of block_size."},
    )
    num_neumann_terms: int = field(
        default=5,
        metadata={
            "help": "Terms k of R's Neumann polynomial: R = I + 2Q + ... + 2Q^(k-2) + Q^(k-1) (k >= 2). 5 as in the "
            "paper; 4-6 are within noise."
        },
    )
    block_share: bool = field(
        default=False, metadata={"help": "Share one rotation block across all blocks of a layer."}
    )
    module_dropout: float = field(
        default=0.0,
        metadata={
            "help": "In training, each rotation block is replaced by the identity with this probability on every "
            "forward (OFT's multiplicative dropout). Ignored in eval mode."
        },
    )
    bias: Literal["none", "all", "qoft_only"] = field(
        default="none",
        metadata={"help": "Which biases train and save with the adapter: none, all, or those of targeted layers."},
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules (e.g. a classifier head) to train fully and save."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt these layer indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list used with layers_to_transform, e.g. 'layers'."}
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: rotations start at the identity (model unchanged). False: small random rotations, "
                  "for tests only."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.QOFT
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if (self.block_size is None) == (self.num_blocks is None):
            raise ValueError(
                f"QOFTConfig needs exactly one of block_size and num_blocks (got block_size={self.block_size}, "
                f"num_blocks={self.num_blocks}). Fix: pass block_size=32 (the paper's default) or num_blocks=..."
            )
        for name in ("block_size", "num_blocks"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"QOFTConfig.{name} must be a positive integer, got {value!r}.")
        if self.block_size == 1:
            raise ValueError("QOFTConfig.block_size=1 has no rotation parameters; use block_size >= 2.")
        if not isinstance(self.num_neumann_terms, int) or self.num_neumann_terms < 2:
            raise ValueError(f"QOFTConfig.num_neumann_terms must be an integer >= 2, got {self.num_neumann_terms!r}.")
        if not 0.0 <= self.module_dropout <= 1.0:
            raise ValueError(f"QOFTConfig.module_dropout must be in [0, 1], got {self.module_dropout!r}.")
        if self.bias not in ("none", "all", "qoft_only"):
            raise ValueError(f"QOFTConfig.bias must be 'none', 'all' or 'qoft_only', got {self.bias!r}.")
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("QOFTConfig.layers_pattern only applies together with layers_to_transform.")
