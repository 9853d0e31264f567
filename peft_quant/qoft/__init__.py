"""QOFT: orthogonal fine-tuning of quantized layers by rotating their inputs (OFTv2 / QOFT, 2025)."""

from .config import QOFTConfig
from .layer import QOFTLayer
from .model import QOFTModel

__all__ = ["QOFTConfig", "QOFTLayer", "QOFTModel"]
