"""Which implementation an op runs: the Triton kernel or its PyTorch reference. One module decides for all ops.

``PEFT_QUANT_KERNELS`` (read at every call, so tests and users can switch it at run time):

* ``auto`` (default): Triton for CUDA tensors when Triton is installed, the reference otherwise.
* ``triton``: Triton wherever a kernel covers the case (each op's module says which cases its kernels cover, e.g.
  QOFT's builder blocks up to 32 wide; the rest take the reference); raises :class:`KernelUnavailableError` when
  Triton cannot run (Triton missing, or CPU tensors without ``TRITON_INTERPRET=1``). Under ``TRITON_INTERPRET=1`` the
  kernels run on CPU tensors in Triton's interpreter: that is how CI tests them without a GPU. (torch's own
  ``has_triton()`` says no under the interpreter, so it is not used here.)
* ``torch``: always the reference.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

MODES = ("auto", "triton", "torch")
ENV = "PEFT_QUANT_KERNELS"


class KernelUnavailableError(RuntimeError):
    """A Triton kernel was asked for (``PEFT_QUANT_KERNELS=triton``) where it cannot run."""


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def kernel_mode() -> str:
    """The ``PEFT_QUANT_KERNELS`` setting, validated."""
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r} is not one of {MODES}. Fix: unset it, or set it to one of those.")
    return mode


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the op on ``tensors`` should run its Triton kernel (see the module docstring)."""
    mode = kernel_mode()
    if mode == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if mode == "auto":
        return on_cuda and triton_installed() and not interpreting()
    if not triton_installed():
        raise KernelUnavailableError(
            f"{ENV}=triton, but Triton is not installed. Fix: pip install triton (it ships with torch's CUDA builds), "
            f"or set {ENV}=auto."
        )
    if not (on_cuda or interpreting()):
        raise KernelUnavailableError(
            f"{ENV}=triton on {tensors[0].device.type} tensors: Triton kernels run on CUDA tensors, or on CPU "
            f"tensors only under TRITON_INTERPRET=1 (slow; for tests). Fix: move the model to a GPU, set "
            f"TRITON_INTERPRET=1, or set {ENV}=auto."
        )
    return True
