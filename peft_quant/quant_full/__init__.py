"""QuantFull (QFT): full-parameter tuning with int8 weights and int8 Lion momentum, updated inside backward."""

from .config import QuantFullConfig
from .layer import QuantFullLayer
from .model import QuantFullModel
from .optimizer import QuantFullOptimizer

__all__ = ["QuantFullConfig", "QuantFullLayer", "QuantFullModel", "QuantFullOptimizer"]
