"""Every Triton kernel compiles for NVIDIA GPUs (sm_80, sm_90 and sm_120) within their shared memory and without heavy
register spills: tests/compile_kernels.py, run in a subprocess because pytest's process runs the kernels under
Triton's interpreter (conftest sets TRITON_INTERPRET=1 without a GPU), where they cannot be compiled.

The interpreter tests check what the kernels compute; this one checks what only a GPU compiler sees. It needs no GPU:
Triton's wheel carries the compiler and ptxas.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton  # noqa: F401  (a missing Triton fails this test: it is in the dev extra)

SCRIPT = Path(__file__).with_name("compile_kernels.py")


@pytest.mark.slow
def test_every_kernel_compiles_for_nvidia_gpus():
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--jobs", str(os.cpu_count() or 1)], env=env,
                            capture_output=True, text=True, timeout=1800)
    report = result.stdout + result.stderr[-3000:]
    assert result.returncode == 0, report
    assert "0 kernels missed" in result.stdout and " compilations passed" in result.stdout, report
