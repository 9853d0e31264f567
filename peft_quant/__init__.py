"""peft-quant: memory-lean fine-tuning of quantized models, as PEFT methods.

``import peft_quant`` registers the methods with PEFT, so ``peft.get_peft_model``, ``PeftModel.from_pretrained``,
``AutoPeftModel*`` and transformers' ``load_adapter`` accept their configs and adapters.
"""

from .registration import check_peft, install_push_to_hub, register

check_peft()

from .block_scaled import load_quantized, save_quantized  # noqa: E402
from .config_base import AdapterFormatError  # noqa: E402
from .experts import Mxfp4Experts, quantize_experts  # noqa: E402,F401
from .pipelines import load_into_pipeline  # noqa: E402
from .qoft import QOFTConfig, QOFTModel  # noqa: E402
from .quant_formats import UnsupportedLayerError  # noqa: E402
from .quant_full import QuantFullConfig, QuantFullModel, QuantFullOptimizer  # noqa: E402
from .quantize import quantize_model  # noqa: E402
from .stash import StashQuantConfig, StashQuantModel, disable_stash, enable_stash, stash_callback, stash_packer  # noqa: E402,E501
from .timestep_scale import RoutingError, TimestepScaleConfig, TimestepScaleModel  # noqa: E402

register("qoft", QOFTConfig, QOFTModel)
register("timestep_scale", TimestepScaleConfig, TimestepScaleModel)
register("quant_full", QuantFullConfig, QuantFullModel)
register("stash_quant", StashQuantConfig, StashQuantModel)
install_push_to_hub()

__version__ = "0.1.0"

__all__ = [
    "AdapterFormatError",
    "QOFTConfig",
    "QOFTModel",
    "QuantFullConfig",
    "QuantFullModel",
    "QuantFullOptimizer",
    "RoutingError",
    "StashQuantConfig",
    "StashQuantModel",
    "TimestepScaleConfig",
    "TimestepScaleModel",
    "UnsupportedLayerError",
    "__version__",
    "disable_stash",
    "enable_stash",
    "load_into_pipeline",
    "load_quantized",
    "quantize_model",
    "save_quantized",
    "stash_callback",
    "stash_packer",
]
