"""The wheel carries what a checkout has: the kernels as ``peft_quant.kernels`` (never a top-level ``kernels``, the
name of a Hugging Face package that transformers probes) and the model card templates."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_kernels_under_peft_quant(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("peft_quant-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    kernels = {path.name for path in (ROOT / "kernels").glob("*.py")}
    assert kernels and {f"peft_quant/kernels/{name}" for name in kernels} <= names
    assert "peft_quant/model_cards/adapter.md" in names
    assert not any(name.startswith("kernels/") for name in names)
