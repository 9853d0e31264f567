"""TimestepScale (TuneQDM): timestep-aware per-channel scale tuning of quantized diffusion denoisers."""

from .config import TimestepScaleConfig
from .layer import TimestepScaleLayer
from .model import TimestepScaleModel
from .routing import RoutingError

__all__ = ["RoutingError", "TimestepScaleConfig", "TimestepScaleLayer", "TimestepScaleModel"]
