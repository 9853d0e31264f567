"""bench/triton_kernels.py --smoke: every timing case (each op's kernel, reference and anchor, and the whole training
steps) runs once at tiny shapes and returns results of matching shapes and dtypes, so the benchmark code is tested
before a GPU session spends its minutes on it. In a subprocess: the script sets TRITON_INTERPRET itself when there is
no GPU. (The script is not named kernels.py: run as a script, bench/ comes first on sys.path and a kernels.py there
would shadow Hugging Face's `kernels` package, which transformers imports.)"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from packaging.version import Version

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "triton_kernels.py"
_BNB = Version(version("bitsandbytes"))


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available() and _BNB < Version("0.50"),
                    reason=f"bitsandbytes {_BNB} runs Lion8bit (the QuantFull anchor) on GPUs only; 0.50 also on CPU")
def test_every_benchmark_case_runs_at_smoke_size():
    env = {name: value for name, value in os.environ.items() if name not in ("TRITON_INTERPRET", "PEFT_QUANT_KERNELS")}
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], env=env, capture_output=True, text=True,
                            timeout=900)
    report = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, report
    ran = [line for line in result.stdout.splitlines() if line.startswith("ok ")]
    assert any("training step" in line for line in ran), report
    assert {"qoft", "timestep_scale", "int8_matmul", "lion_from_activations", "stash"} <= {
        line.split()[1] for line in ran}, report
    assert f"{len(ran)} cases ran on" in result.stdout, report
