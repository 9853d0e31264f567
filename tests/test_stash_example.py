"""``examples/stash_trainer.py`` (LoRA under ``transformers.Trainer`` with a compressed, rising-precision stash) and
``bench/stash.py --quick`` run end to end, as a user runs them: in a subprocess, offline, with tiny settings."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "stash_trainer.py"
BENCH = ROOT / "bench" / "stash.py"


def _run(script: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def test_example_help():
    result = _run(EXAMPLE, "--help", timeout=30)
    assert result.returncode == 0, result.stderr
    assert "--stash_milestones" in result.stdout and "--stash_bits" in result.stdout


def test_example_trains_lora_with_a_rising_compressed_stash(tmp_path):
    result = _run(EXAMPLE, "--max_steps", "6", "--per_device_train_batch_size", "4", "--block_size", "32",
                  "--stash_bits", "4", "--stash_milestones", "0.5:6,0.8:8", "--threads", "1",
                  "--logging_steps", "3", "--output_dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.rindex("\n{") + 1:])
    stash = summary["stash"]
    # update(step, 6) after each step: progress 3/6 = 0.5 reaches 6 bits for step 4, 5/6 ≥ 0.8 reaches 8 for step 6
    assert (stash["bits_start"], stash["bits_end"]) == (4, 8)
    assert stash["bits_from_step"] == {"1": 4, "4": 6, "6": 8}
    held = summary["held_for_backward_per_step"]
    first, last = held["first_step"], held["last_step"]
    assert first["packed_tensors"] > 10 and first["original_bytes"] > first["stored_bytes"] > 0
    assert first["ratio"] > 7 and 3 < last["ratio"] < 4  # 4.25 bits/value at 4 bits, 8.25 at 8 (vs 32)
    assert last["stored_bytes"] > first["stored_bytes"]  # more bits, more bytes; the same tensors
    assert last["original_bytes"] == first["original_bytes"]
    assert held["ratio_over_run"] > 3
    assert all(math.isfinite(summary["loss"][k]) for k in ("first", "last"))
    assert math.isfinite(summary["held_out_loss"]["after"])
    assert summary["steps"] == 6 and summary["lora_trainable_parameters"] > 0
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_bench_quick_runs():
    result = _run(BENCH, "--quick", timeout=150)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "| 4-bit |" in out and "| checkpointing |" in out and "| rising 4→6→8 |" in out
    assert "16-bit (stored unchanged) trains bit for bit like no compression: True" in out
