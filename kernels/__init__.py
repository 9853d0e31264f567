"""peft-quant's GPU kernels (installed as ``peft_quant.kernels``): Triton kernels, each with a PyTorch reference.

Every op has one entry point that runs the Triton kernel on CUDA tensors and the pure-PyTorch reference elsewhere
(:mod:`.backend` decides, with the ``PEFT_QUANT_KERNELS`` override). The Triton modules (``*_triton.py``) are imported
only when a kernel is about to run, so ``import peft_quant`` never imports Triton or initialises CUDA.
"""

from .backend import KernelUnavailableError, kernel_mode, use_triton

__all__ = ["KernelUnavailableError", "kernel_mode", "use_triton"]
