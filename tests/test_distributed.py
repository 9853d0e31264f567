"""Data parallelism over two CPU processes (gloo): every rank trains the same model, equal to one process.

Each engine is one launch of ``tests/distributed_worker.py`` (two spawned ranks running every case of the engine,
then the single-process references); the tests compare what they saved. The reference is computed another way:
one process, no process group, the whole batch per step. Cases (``distributed_worker.CASES``): QuantFull on the
conformance MLP (float base, biases trained by float Lion) without and with gradient accumulation (DDP's
``no_sync`` on the first micro-step), QOFT on int4 layers, TimestepScale on int8 layers with mixed timesteps,
StashQuant alone (float layers trained fully, 4-bit stash), QOFT on int4 layers with ``stash={"bits": 4}``, and
QOFT (DDP and FSDP2) and TimestepScale (FSDP2) on bitsandbytes nf4 layers, FSDP2 with the 4-bit weights left out of
the sharding (``ignored_params=fsdp_ignored_params(model)``); a plain ``fully_shard`` of them is refused. Under FSDP2
QuantFull runs with its int8 state sharded by rows (``shard_quant_full`` before ``fully_shard``), and each way of
setting that up wrongly is refused (``distributed_worker.QUANT_FULL_REFUSALS``).
The stash cases also train one process on the two ranks' half-batches in turn, accumulating: that reference packs
exactly the blocks each rank packs, and the ranks must equal it bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from torch import nn

from peft_quant import QuantFullConfig, QuantFullOptimizer

from .conformance_cases import Case, build_base
from .distributed_trainer_worker import CPU_DDP_RESUME, MAX_STEPS, SAVE_STEPS
from .distributed_worker import CASES, ENGINE_CASES, NF4_CASES, QUANT_FULL_REFUSALS, STASH_CASES, STEPS

ROOT = Path(__file__).resolve().parent.parent
LAUNCH_TIMEOUT = 240  # seconds: a rank stuck in a collective fails the test (each collective also times out at 60 s)
# Logits of the data-parallel run against one process: the averaged gradient differs from the whole-batch one only
# in float32 summation order (~1e-7 relative). Float trainables (AdamW, float Lion) inherit that (measured 1e-7 to
# 3e-7); QuantFull's int8 codes move by sign(c) and identically seeded rounding, so they move identically unless some
# |c| lies within that noise of zero (measured: no code differs, logits equal exactly). 1e-5 is 30x the noise, and
# 1e-4 below what ranks stepping on their own gradients give (0.08). The 4-bit stash turns that noise into whole
# 4-bit steps where an activation sits on a rounding boundary of its block (measured: StashQuant 1.1e-6, QOFT with
# the stash 2.6e-7), still 9x below 1e-5; against the half-batch reference the stash cases must be exact.
LOGIT_RTOL = 1e-5
MAX_CODE_MISMATCH = 1e-3  # fraction of int8 codes allowed to differ from one process (a sign flip of such a tiny c)


def _launch(engine: str, tmp_path_factory) -> tuple[str, Path]:
    """Run one engine's cases over two processes; ``(engine, directory of the saved results)``."""
    out = tmp_path_factory.mktemp(engine)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "tests.distributed_worker", engine, str(out)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert result.returncode == 0, f"{engine} workers failed:\n{result.stderr[-6000:]}"
    return engine, out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_trainer_under_accelerate_launch_ddp_ranks_identical_and_resume_exact(tmp_path):
    """``accelerate launch --config_file examples/accelerate_ddp.yaml`` (2 CPU processes; accelerate starts them
    through torch.distributed.run) of a Trainer with ``optimizers=(QuantFullOptimizer(...), None)``: the Trainer
    wraps the model in DDP, both ranks end with the same int8 state and optimizer state, and a new Trainer resumed
    from the mid-run checkpoint ends bit for bit where the uninterrupted run did (transformers >= 5.18: see
    ``CPU_DDP_RESUME``; the lower-bound job checks the rest)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "examples/accelerate_ddp.yaml",
               "--main_process_port", str(_free_port()), "-m", "tests.distributed_trainer_worker", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert result.returncode == 0, f"accelerate launch failed:\n{result.stderr[-6000:]}"
    rank0, rank1 = (torch.load(tmp_path / f"trainer.rank{rank}.pt") for rank in (0, 1))
    full, resumed = rank0["full"], rank0["resumed"]
    assert full["ddp"] == "DistributedDataParallel" and full["forwards"] == MAX_STEPS
    codes = [key for key in full["state"] if key.endswith(".qf_codes.default")]
    assert len(codes) == 4 * 2  # q, v, up, down of both decoder layers
    assert all(not torch.equal(full["state"][key], full["initial"][key]) for key in codes), "int8 codes never moved"
    for key, value in full["state"].items():
        assert torch.equal(value, rank1["full"]["state"][key]), f"ranks hold different {key}"
    assert sorted(full["losses"]) == list(range(1, MAX_STEPS + 1))
    assert (resumed is not None) == CPU_DDP_RESUME
    if CPU_DDP_RESUME:
        assert resumed["forwards"] == MAX_STEPS - SAVE_STEPS  # really resumed
        for key, value in full["state"].items():
            assert torch.equal(resumed["state"][key], value), f"the resumed run ends with another {key}"
        assert resumed["losses"] == full["losses"]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[str, Path]:
    return _launch("ddp", tmp_path_factory)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> tuple[str, Path]:
    return _launch("fsdp", tmp_path_factory)


@pytest.fixture(params=["ddp", "fsdp"])
def engine_run(request) -> tuple[str, Path]:
    return request.getfixturevalue(f"{request.param}_run")


def _load(out: Path, name: str, who: str) -> dict:
    return torch.load(out / f"{name}.{who}.pt")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _trained_cases(engine: str) -> list[str]:
    return [name for name in ENGINE_CASES[engine] if name in CASES]  # not the refusals


def test_ranks_are_identical_and_equal_one_process(engine_run):
    engine, out = engine_run
    for name in _trained_cases(engine):
        rank0, rank1, single = (_load(out, name, who) for who in ("rank0", "rank1", "single"))
        assert torch.equal(rank0["logits"], rank1["logits"]), f"{engine} {name}: ranks compute different outputs"
        assert rank0["state"].keys() == rank1["state"].keys() == single["state"].keys()
        for key, value in rank0["state"].items():
            assert torch.equal(value, rank1["state"][key]), f"{engine} {name}: ranks hold different {key}"
        error = _relative(rank0["logits"], single["logits"])
        assert error < LOGIT_RTOL, f"{engine} {name}: logits differ from one process by {error:.2e} (relative)"


def test_stash_cases_equal_one_process_on_the_same_half_batches(engine_run):
    """Packing is blockwise along memory, and each half batch's rows fill whole blocks: one process that runs the two
    half batches in turn packs exactly the blocks the ranks pack. Its gradient, summed over the halves with each
    loss halved, is bit for bit DDP's (sum of the two, halved: exact), so every trained tensor must be equal."""
    engine, out = engine_run
    for name in STASH_CASES:
        rank0, rank1, halves = (_load(out, name, who) for who in ("rank0", "rank1", "halves"))
        # every step packed fc1's input, the GELU's input and fc2's input on each rank (not kept exact by min_numel)
        assert rank0["packed"] == rank1["packed"] == 3 * STEPS and halves["packed"] == 2 * 3 * STEPS, name
        assert torch.equal(rank0["logits"], halves["logits"]), f"{engine} {name}: logits differ from one process"
        for key, value in halves["state"].items():
            assert torch.equal(rank0["state"][key], value), f"{engine} {name}: {key} differs from one process"


def _assert_quant_full_state_matches(state: dict, single: dict, name: str, steps: int = STEPS) -> None:
    """Every QuantFull layer's int8 codes and momentum against one process's, after ``steps`` int8 steps."""
    layers = [key[: -len(".codes")] for key in state if key.endswith(".codes")]
    assert len(layers) == 2
    for layer in layers:
        assert state[f"{layer}.step"].item() == single[f"{layer}.step"].item() == steps, f"{name} {layer}"
        assert state[f"{layer}.momentum_absmax"].min() > 0  # gradients reached every momentum block
        codes, reference = state[f"{layer}.codes"], single[f"{layer}.codes"]
        mismatch = (codes != reference).float().mean().item()
        assert mismatch <= MAX_CODE_MISMATCH, f"{name} {layer}: {mismatch:.2%} of the int8 codes differ"
        assert (codes.int() - reference.int()).abs().max() <= 2  # one Lion step is at most ~1-2 codes here
        moved = (state[f"{layer}.momentum_codes"] != single[f"{layer}.momentum_codes"]).float().mean().item()
        assert moved <= MAX_CODE_MISMATCH, f"{name} {layer}: {moved:.2%} of the momentum codes differ"
        error = _relative(state[f"{layer}.momentum_absmax"], single[f"{layer}.momentum_absmax"])
        assert error < LOGIT_RTOL, f"{name} {layer}: momentum scales differ by {error:.2e}"
        assert torch.equal(state[f"{layer}.outlier_value"], single[f"{layer}.outlier_value"]), f"{name} {layer}"


def test_quant_full_state_matches_one_process(engine_run):
    """The int8 codes, outliers and momentum of every layer (FSDP2: gathered from the ranks' row shards), against
    one process; and the steps were really taken (accumulation over 2 micro-steps still takes one per step)."""
    _, out = engine_run
    for name in ("quant_full", "quant_full_accum"):
        _assert_quant_full_state_matches(_load(out, name, "rank0")["state"], _load(out, name, "single")["state"], name)


def test_quant_full_fsdp_equals_ddp(ddp_run, fsdp_run):
    """The row-sharded FSDP2 run and the replicated DDP run of the same cases end with the same model."""
    for name in ("quant_full", "quant_full_accum"):
        ddp, fsdp = _load(ddp_run[1], name, "rank0"), _load(fsdp_run[1], name, "rank0")
        error = _relative(fsdp["logits"], ddp["logits"])
        assert error < LOGIT_RTOL, f"{name}: FSDP2 and DDP logits differ by {error:.2e} (relative)"
        for key, value in ddp["state"].items():
            if not key.endswith(("momentum_absmax", "momentum_codes")):  # float32 summation order may differ
                assert torch.equal(fsdp["state"][key], value), f"{name}: FSDP2 and DDP end with different {key}"


def test_quant_full_fsdp_non_finite_gradient_is_skipped_on_every_rank(fsdp_run):
    """A NaN target in rank 1's half makes only some rows of fc2's weight gradient NaN, and so only one rank's row
    shard and one rank's shard of fc2's bias: every rank still skips the whole update of both layers and of both
    biases at that step, as one process does (2 int8 layers + 2 biases), and ends where one process ends."""
    _, out = fsdp_run
    rank0, rank1, single = (_load(out, "quant_full_nan", who) for who in ("rank0", "rank1", "single"))
    assert rank0["skipped"] == rank1["skipped"] == single["skipped"] == 4
    _assert_quant_full_state_matches(rank0["state"], single["state"], "quant_full_nan", steps=STEPS - 1)
    for key in ("base_model.model.fc1.qf_bias.default", "base_model.model.fc2.qf_bias.default"):
        assert torch.equal(rank0["state"][key], single["state"][key]), key


def test_adapters_trained_away_from_identity(engine_run):
    """Guards the comparisons above against a run that trained nothing (identical because untouched)."""
    engine, out = engine_run
    for name in ("qoft", "timestep_scale", "qoft_stash", *[n for n in NF4_CASES if n in ENGINE_CASES[engine]]):
        state = _load(out, name, "rank0")["state"]
        # QOFT's Q starts at 0 (R = I), TimestepScale's scales at 1
        start = 1.0 if name.startswith("timestep_scale") else 0.0
        assert state and all((value != start).any() for value in state.values()), f"{engine} {name} did not train"
    # StashQuant trains copies of fc1 and fc2 that start as the base layers
    base = dict(build_base(Case("stash_quant", "float", "fp32")).named_parameters())
    state = _load(out, "stash_quant", "rank0")["state"]
    assert len(state) == len(base) == 4
    for key, value in state.items():
        layer, _, _, field = key.removeprefix("base_model.model.").split(".")  # fc1.stash_module.default.weight
        assert not torch.allclose(value, base[f"{layer}.{field}"]), f"{engine} StashQuant did not train {key}"


def test_quant_full_fsdp_state_per_rank_is_half(ddp_run, fsdp_run):
    """Bytes of the int8 weight state (codes, scales, outliers) and int8 momentum each rank holds: DDP keeps the
    whole on each rank; FSDP2 with shard_quant_full splits it, the two ranks' parts adding up to one process's."""
    for name in ("quant_full", "quant_full_accum"):
        single = _load(ddp_run[1], name, "single")["state_bytes"]
        assert all(_load(ddp_run[1], name, rank)["state_bytes"] == single for rank in ("rank0", "rank1"))
        parts = [_load(fsdp_run[1], name, rank)["state_bytes"] for rank in ("rank0", "rank1")]
        assert sum(parts) == single, (parts, single)  # nothing kept twice, nothing lost
        assert max(parts) <= 0.52 * single, (parts, single)  # only the outliers split unevenly


def test_quant_full_fsdp_shard_is_never_saved_as_the_whole(fsdp_run):
    """A sharded layer's state_dict would be a part of the weight under the whole weight's keys: refused, naming
    the gather; the states compared above were gathered back by unshard_quant_full, after which saving works."""
    _, out = fsdp_run
    for rank in ("rank0", "rank1"):
        result = _load(out, "quant_full", rank)
        error = result["save_error"]
        assert error is not None and error.startswith("RuntimeError"), error
        assert "unshard_quant_full(model, optimizer)" in error and "Fix:" in error, error
        assert result["save_error_after_gather"] is None, result["save_error_after_gather"]


def test_quant_full_fsdp_misuse_is_refused(fsdp_run):
    """Ragged rows, fully_shard without shard_quant_full, a mixed precision policy, sharded anchors (optimizer
    created after or before fully_shard), an optimizer created before fully_shard, and row-sharded layers under DDP:
    each raises naming its fix."""
    _, out = fsdp_run
    for name, (error_type, fix) in QUANT_FULL_REFUSALS.items():
        for rank in ("rank0", "rank1"):
            error = _load(out, name, rank)["error"]
            assert error is not None, f"{name}: QuantFull trained under FSDP2 set up wrongly"
            assert error.startswith(error_type) and "Fix:" in error and fix in error, f"{name}: {error}"


def test_nf4_cases_ran_where_expected():
    assert set(NF4_CASES) <= set(ENGINE_CASES["fsdp"]) and "qoft_nf4" in ENGINE_CASES["ddp"]


def test_nf4_sharded_by_plain_fully_shard_is_refused(fsdp_run):
    """Without ``ignored_params`` fully_shard replaces each ``Params4bit`` (dropping its quant_state); the check names
    the recipe instead of bitsandbytes failing inside its matmul ("quant_state is required")."""
    _, out = fsdp_run
    for rank in ("rank0", "rank1"):
        result = _load(out, "nf4_without_ignored_params", rank)
        assert result["sharded"] and all(kind != "Params4bit" for kind in result["sharded"]), result["sharded"]
        error = result["error"]
        assert error is not None and error.startswith("ValueError: QOFT cannot run"), error
        assert "ignored_params=peft_quant.distributed.fsdp_ignored_params(model)" in error and "Fix:" in error, error
        assert "DistributedDataParallel" in error and "quant_state is required" not in error, error


def test_check_4bit_base_passes_intact_layers_and_refuses_a_replaced_weight():
    """In one process: a quantized nf4 layer passes; its weight swapped for a plain Parameter (what fully_shard
    leaves) is refused; bitsandbytes' module-level quant_state (its own recovery path) passes again."""
    from peft_quant import quantize_model
    from peft_quant.distributed import check_4bit_base, fsdp_ignored_params

    torch.manual_seed(0)
    model = quantize_model(nn.Sequential(nn.Linear(64, 32)), bits=4, backend="bitsandbytes")
    layer = model[0]
    assert fsdp_ignored_params(model) == {layer.weight}
    check_4bit_base(layer, "QOFT")
    state = layer.weight.quant_state
    layer.weight = nn.Parameter(layer.weight.data, requires_grad=False)
    with pytest.raises(ValueError, match=r"QOFT cannot run.*Fix: leave the 4-bit weights out of the sharding"):
        check_4bit_base(layer, "QOFT")
    layer.quant_state = state
    check_4bit_base(layer, "QOFT")
    check_4bit_base(nn.Linear(4, 4), "QOFT")  # not a bitsandbytes layer: nothing to check


def test_replaced_anchor_is_refused_at_backward():
    """A wrapper that swaps a layer's parameters after the optimizer exists (what fully_shard does) is refused with
    the fix, in one process, before the state is touched."""
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(16, 8)), QuantFullConfig(target_modules=["0"]))
    QuantFullOptimizer(model, lr=1e-3)
    layer = model.base_model.model[0]
    codes = layer.qf_codes["default"].clone()
    layer.qf_anchor["default"] = nn.Parameter(torch.zeros(1))
    with pytest.raises(RuntimeError, match=r"replaced after QuantFullOptimizer was created.*Fix: under FSDP2, .*"
                       r"shard_quant_full.*otherwise use DistributedDataParallel"):
        model(torch.randn(4, 16)).sum().backward()
    assert torch.equal(layer.qf_codes["default"], codes)


def test_row_shards_step_exactly_as_the_whole_weight():
    """Lion on each row shard (its rows of the gradient, outliers counted from its first row, ``rows=(first,
    total)``) ends bit for bit where Lion on the whole weight does, stochastic rounding included: the shards draw
    the whole weight's noise from the same seed and keep their rows'."""
    from peft_quant.quant_full.int8_state import LionHyper, lion_step_, quantize_weight

    torch.manual_seed(0)
    weight, grad = torch.randn(8, 32), torch.randn(8, 32)
    hyper, block = LionHyper(lr=3e-3, weight_decay=0.1), 64  # one block per two rows: shards fill whole blocks

    def step(codes, scale, index, value, g, rows=None):
        momentum = [torch.zeros(codes.numel(), dtype=torch.int8), torch.zeros(codes.numel() // block)]
        for _ in range(3):
            lion_step_(codes, scale, index, value, *momentum, g, hyper, 16, block, True,
                       torch.Generator().manual_seed(7), rows)
        return codes, value, *momentum

    codes, scale, index, value = quantize_weight(weight, 16, 0.05)
    whole = step(codes.clone(), scale, index, value.clone(), grad)
    parts = []
    for first in (0, 4):
        mine = (index >= first * 32) & (index < (first + 4) * 32)
        parts.append(step(codes[first:first + 4].clone(), scale[first:first + 4], index[mine] - first * 32,
                          value[mine].clone(), grad[first:first + 4], rows=(first, 8)))
    for got, expected in zip(zip(*parts), whole):
        assert torch.equal(torch.cat(got), expected)
    assert not torch.equal(whole[0], codes)  # the steps moved the codes


def test_shard_quant_full_needs_a_process_group():
    from peft_quant.distributed import shard_quant_full

    model = get_peft_model(nn.Sequential(nn.Linear(16, 8)), QuantFullConfig(target_modules=["0"]))
    with pytest.raises(ValueError, match=r"needs torch.distributed initialized.*Fix: launch with torchrun"):
        shard_quant_full(model)
