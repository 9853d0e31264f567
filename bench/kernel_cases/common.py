"""What a kernel timing case is, how one is timed (CUDA only), and the sizes the cases come in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

# Where the cases put their tensors: the GPU when there is one; the CPU only for ``bench/triton_kernels.py --smoke``,
# which runs every case once at the "smoke" size under Triton's interpreter to check the benchmark code itself.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Case:
    """One op at one shape: ours (the Triton kernel), its PyTorch reference, and the anchor it replaces.

    ``bytes_moved`` is the minimum memory traffic of the op (each input read once, each output written once), for
    the achieved-bandwidth column; leave it None for compute-bound ops (matmuls), where bandwidth says little.
    """

    op: str
    shape: str
    ours: Callable[[], object]
    reference: Callable[[], object]
    anchor: Optional[Callable[[], object]] = None
    anchor_name: str = ""
    bytes_moved: Optional[int] = None
    notes: str = ""
    extra: dict = field(default_factory=dict)


def time_ms(fn: Callable[[], object]) -> tuple[float, float, float]:
    """Median, 20% and 80% quantiles of ``fn``'s time in ms (``triton.testing.do_bench``)."""
    import triton.testing

    median, low, high = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
    return median, low, high


def copy_bandwidth_gbps(numel: int = 1 << 28) -> float:
    """The device's measured copy bandwidth (GB/s): a float32 ``copy_`` of ``numel`` values, read + write."""
    src = torch.empty(numel, device="cuda")
    dst = torch.empty_like(src)
    median, _, _ = time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (median * 1e-3) / 1e9


def with_grads(forward: Callable[[], torch.Tensor], inputs: tuple[torch.Tensor, ...],
               grad_out: torch.Tensor) -> Callable[[], object]:
    """A closure running ``forward()`` and backward to every tensor of ``inputs`` (no ``.grad`` accumulation)."""
    return lambda: torch.autograd.grad(forward(), inputs, grad_out)


def no_grad(forward: Callable[[], object]) -> Callable[[], object]:
    """A closure running ``forward()`` without autograd."""
    def run():
        with torch.no_grad():
            return forward()

    return run
