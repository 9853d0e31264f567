"""bench/formats.py --quick at tiny widths, in a subprocess as it is run: one table row per method for every format
whose package is installed (a "not installed" row otherwise), and QOFT's input gradient agrees with the float64
dequantized reference (float32 formats to 1e-5, bfloat16 ones to 1e-2)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "formats.py"
# label in the table -> package the format needs (None: peft-quant's own)
FORMATS = {
    "peft-quant int4": None, "peft-quant int8": None, "bitsandbytes nf4": "bitsandbytes",
    "bitsandbytes int8": "bitsandbytes", "FP8 block-scaled": None, "MXFP4": None, "HQQ int4": "hqq",
    "torchao int8 weight-only": "torchao", "compressed-tensors int4": "compressed_tensors", "AWQ int4": "gptqmodel",
}
METHODS = {"QOFT", "workaround", "PEFT LoRA", "PEFT OFT"}
TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2}


@pytest.mark.slow  # ~30 s on 2 CPU cores
def test_every_format_gets_a_row_and_qoft_input_gradient_matches_the_reference():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--tokens", "16", "--steps", "1"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    report = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, report
    out = result.stdout.splitlines()
    start = next(i for i, line in enumerate(out) if line.startswith("| format | method |"))
    lines = out[start:start + next(i for i, line in enumerate(out[start:] + [""]) if not line.startswith("|"))]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]
    for label, package in FORMATS.items():
        mine = [row for row in rows if row["format"] == label]
        if package is not None and importlib.util.find_spec(package) is None:
            assert [row["outcome"] for row in mine] == [f"not installed ({package})"], report
            continue
        assert {row["method"] for row in mine} == METHODS, (label, report)
        qoft = next(row for row in mine if row["method"] == "QOFT")
        assert qoft["outcome"] == "ok", (label, report)
        assert float(qoft["dL/dx rel. error"]) < TOLERANCE[qoft["compute dtype"]], (label, qoft, report)
