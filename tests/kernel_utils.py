"""Helpers shared by the kernel tests: forcing the Triton path, poisoned outputs, error measures."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import triton  # noqa: F401  (a missing Triton fails the kernel tests: it is in the dev extra)

# Kernels run on CUDA when there is one; otherwise in Triton's interpreter on CPU (conftest sets TRITON_INTERPRET=1).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
POISON = float("nan")


@contextlib.contextmanager
def kernels(mode: str) -> Iterator[None]:
    """Run the block with ``PEFT_QUANT_KERNELS=mode`` (``triton`` forces the kernels, ``torch`` the references)."""
    old = os.environ.get("PEFT_QUANT_KERNELS")
    os.environ["PEFT_QUANT_KERNELS"] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PEFT_QUANT_KERNELS")
        else:
            os.environ["PEFT_QUANT_KERNELS"] = old


def poisoned(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, device: str = DEVICE) -> torch.Tensor:
    """An output buffer full of NaN (integers: a sentinel), so an element the kernel forgets to write shows."""
    if dtype.is_floating_point:
        return torch.full(shape, POISON, dtype=dtype, device=device)
    return torch.full(shape, torch.iinfo(dtype).min, dtype=dtype, device=device)


def relative_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``‖actual − expected‖ / ‖expected‖`` in float64 (NaN when anything is NaN, so it fails every bound)."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).norm() / e.norm().clamp_min(1e-300))
