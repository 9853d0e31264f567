"""Small data-parallel trainings over two CPU processes (gloo), for ``tests/test_distributed.py``.

``python -m tests.distributed_worker ENGINE OUT_DIR`` (``ENGINE``: ``ddp`` or ``fsdp``) spawns two ranks that train
each case of that engine for a few steps, each rank on its half of every batch, and save what they end with to
``OUT_DIR/{case}.rank{r}.pt``; then, in this parent process with no process group, the same case trains on the
whole batch and is saved as ``OUT_DIR/{case}.single.pt``. A case that must be refused saves the error instead.
One launch runs every case of an engine: starting the processes (importing torch, PEFT, transformers) costs more
than the tiny trainings.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from tests.conformance_cases import Case, build_base, make_config

WORLD = 2
STEPS = 4
BATCH = 8  # whole batch of one micro-step; each rank gets BATCH // WORLD samples of it
TIMEOUT = datetime.timedelta(seconds=60)  # a collective that waits longer fails instead of hanging the test


def _data(micro_steps: int) -> dict[str, torch.Tensor]:
    """Inputs, targets and per-sample timesteps for ``STEPS`` optimizer steps of ``micro_steps`` micro-batches."""
    g = torch.Generator().manual_seed(3)
    shape = (STEPS, micro_steps, BATCH)
    return dict(x=torch.randn(*shape, 64, generator=g), y=torch.randn(*shape, 64, generator=g),
                t=torch.rand(shape, generator=g) * 1000, eval_x=torch.randn(BATCH, 64, generator=g),
                eval_t=torch.linspace(0, 999, BATCH))


# The stash keeps saved tensors under min_numel values exact; a rank's half batch saves 4 x 64 = 256 values at fc1's
# input, so the default (1024) would pack nothing on the ranks. 256 packs every activation of both layers.
STASH_MIN_NUMEL = 256
# case name -> (conformance cell, optimizer kind, micro-steps per optimizer step, config overrides)
CASES = {
    "quant_full": (Case("quant_full", "float", "fp32"), "quant_full", 1, {}),
    "quant_full_accum": (Case("quant_full", "float", "fp32"), "quant_full", 2, {}),
    # a NaN target in rank 1's half at step 1 (NAN_AT): a NaN in only some rows of fc2's weight gradient
    "quant_full_nan": (Case("quant_full", "float", "fp32"), "quant_full", 1, {}),
    "qoft": (Case("qoft", "int4", "fp32"), "adamw", 1, {}),
    "timestep_scale": (Case("timestep_scale", "int8", "fp32"), "adamw", 1, {}),
    # StashQuant alone (fc1, fc2 trained fully, 4-bit stash) and QOFT with stash={"bits": 4}
    "stash_quant": (Case("stash_quant", "float", "fp32"), "adamw", 1, dict(min_numel=STASH_MIN_NUMEL)),
    "qoft_stash": (Case("qoft", "int4", "fp32"), "adamw", 1, dict(stash=dict(bits=4, min_numel=STASH_MIN_NUMEL))),
    # bitsandbytes nf4 bases (64 -> 128 -> 64: in_features multiples of 64); FSDP2 ignores the Params4bit weights
    "qoft_nf4": (Case("qoft", "bnb-nf4", "fp32"), "adamw", 1, {}),
    "timestep_scale_nf4": (Case("timestep_scale", "bnb-nf4", "fp32"), "adamw", 1, {}),
}
NF4_CASES = ("qoft_nf4", "timestep_scale_nf4")
NAN_AT = (1, 0, BATCH - 1, 0)  # (step, micro-step, sample, output) of quant_full_nan's NaN target
STASH_CASES = ("stash_quant", "qoft_stash")
ENGINE_CASES = {
    "ddp": ["quant_full", "quant_full_accum", "qoft", "timestep_scale", *STASH_CASES, "qoft_nf4"],
    # the refusals come last: they leave that model's FSDP state half-way through a step
    "fsdp": ["quant_full", "quant_full_accum", "quant_full_nan", "qoft", "timestep_scale", *STASH_CASES, *NF4_CASES,
             "quant_full_ragged_rows", "quant_full_without_shard", "quant_full_mixed_precision",
             "quant_full_anchors_sharded", "quant_full_anchors_sharded_optimizer_first", "quant_full_optimizer_first",
             "quant_full_sharded_under_ddp",
             "nf4_without_ignored_params"],
}
# QuantFull under FSDP2 set up wrongly: case -> (exception type, a piece of the fix its message must name)
QUANT_FULL_REFUSALS = {
    "quant_full_ragged_rows": ("ValueError", "use a number of ranks dividing every targeted layer's output width"),
    "quant_full_without_shard": ("ValueError", "peft_quant.distributed.shard_quant_full(model) on every rank"),
    "quant_full_mixed_precision": ("ValueError", "mp_policy=MixedPrecisionPolicy()"),
    "quant_full_anchors_sharded": ("ValueError", "ignored_params=peft_quant.distributed.fsdp_ignored_params(model)"),
    "quant_full_anchors_sharded_optimizer_first": (
        "RuntimeError", "ignored_params=peft_quant.distributed.fsdp_ignored_params(model)"),
    "quant_full_optimizer_first": ("RuntimeError", "create QuantFullOptimizer(model, ...) after fully_shard"),
    "quant_full_sharded_under_ddp": ("ValueError", "for DDP, call unshard_quant_full(model, optimizer)"),
}


def _optimizer(model: nn.Module, kind: str, micro_steps: int) -> torch.optim.Optimizer:
    if kind == "quant_full":
        import peft_quant

        # lr of about one int8 step of these weights, so stochastic rounding decides many codes
        return peft_quant.QuantFullOptimizer(model, lr=1e-3, weight_decay=0.1, gradient_accumulation_steps=micro_steps)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain CPU copy of ``t`` (an FSDP2 DTensor gathered whole)."""
    t = t.full_tensor() if hasattr(t, "full_tensor") else t
    return t.detach().clone()


def quant_full_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of QuantFull's int8 weight state (codes, scales, outliers) and int8 momentum this process holds."""
    from peft_quant.quant_full.layer import QuantFullLayer

    total = 0
    for module in model.modules():
        if isinstance(module, QuantFullLayer):
            momentum = optimizer.state[module.qf_anchor[module.adapter]]
            tensors = (*module.int8_weight()[:4], momentum["momentum_codes"], momentum["momentum_absmax"])
            total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every trained tensor: float trainables, and for QuantFull each layer's int8 state and int8 momentum (whole:
    row-sharded layers are gathered back first, on every rank)."""
    from peft_quant.distributed import unshard_quant_full
    from peft_quant.quant_full.layer import QuantFullLayer

    unshard_quant_full(model, optimizer)

    state = {name: _full(p) for name, p in model.named_parameters() if p.requires_grad and "qf_anchor" not in name}
    for name, module in model.named_modules():
        if isinstance(module, QuantFullLayer):
            codes, scale, index, value, _ = module.int8_weight()
            state.update({f"{name}.codes": codes.clone(), f"{name}.outlier_value": value.clone()})
            momentum = optimizer.state[module.qf_anchor[module.adapter]]
            state.update({f"{name}.momentum_codes": momentum["momentum_codes"].clone(),
                          f"{name}.momentum_absmax": momentum["momentum_absmax"].clone(),
                          f"{name}.step": torch.tensor(momentum["step"])})
    return state


def train(name: str, rank: int, world: int, wrap: Callable[[nn.Module], nn.Module], halves: bool = False
          ) -> dict[str, Any]:
    """Train case ``name`` as rank ``rank`` of ``world`` (world 1: the whole batch), wrapped by ``wrap`` (DDP,
    FSDP2 or nothing); returns the final eval output, trained state and how many tensors the stash packed.
    ``halves`` (world 1 only): each micro-step runs the ranks' ``WORLD`` parts of its batch one after the other,
    accumulating their gradients, instead of the whole batch at once."""
    from peft import get_peft_model
    from torch.distributed.fsdp import FSDPModule

    from peft_quant import stash_packer

    case, kind, micro_steps, overrides = CASES[name]
    torch.manual_seed(0)
    model = get_peft_model(build_base(case), make_config(case, **overrides))
    # DDP: QuantFull's optimizer before wrapping (it may come first); FSDP2: after (it replaces the parameters)
    optimizer = _optimizer(model, kind, micro_steps) if name.startswith("quant_full") and wrap is _ddp else None
    engine = wrap(model)
    optimizer = optimizer or _optimizer(model, kind, micro_steps)  # FSDP2: after sharding, over its DTensors
    data = _data(micro_steps)
    if name == "quant_full_nan":
        data["y"][NAN_AT] = float("nan")
    shares = [slice(r * BATCH // WORLD, (r + 1) * BATCH // WORLD) for r in range(WORLD)]
    parts = shares if halves else [slice(rank * BATCH // world, (rank + 1) * BATCH // world)]
    for step in range(STEPS):
        for micro in range(micro_steps):
            last = micro == micro_steps - 1
            # DDP: gradients of every micro-step but the last stay local (what Trainer and accelerate do)
            # FSDP2: the float trainables' reduce-scatter waits for the last (QuantFull's own runs at each one)
            ddp = isinstance(engine, nn.parallel.DistributedDataParallel)
            sync = engine.no_sync() if ddp and not last else nullcontext()
            if isinstance(engine, FSDPModule):
                engine.set_requires_gradient_sync(last)
            with sync:
                for part in parts:
                    out = engine(data["x"][step, micro, part], timestep=data["t"][step, micro, part])
                    loss = F.mse_loss(out, data["y"][step, micro, part]) / (micro_steps * len(parts))
                    loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        logits = engine(data["eval_x"], timestep=data["eval_t"])
    packer = stash_packer(model)
    result = dict(logits=_full(logits), packed=packer.packed_tensors if packer is not None else 0)
    if kind == "quant_full":
        result.update(state_bytes=quant_full_state_bytes(model, optimizer), skipped=optimizer.skipped_updates,
                      save_error=_error(model.state_dict) if world > 1 else None)
    result["state"] = _state(model, optimizer)  # row-sharded layers gathered back: saving works again
    if kind == "quant_full":
        result["save_error_after_gather"] = _error(model.state_dict)
    return result


def _error(call: Callable[[], Any]) -> Optional[str]:
    """The exception ``call`` raised, as ``"Type: message"``; None when it returned."""
    try:
        call()
    except Exception as error:  # noqa: BLE001  (recorded for the test to judge, whatever it is)
        return f"{type(error).__name__}: {error}"
    return None


def _ddp(model: nn.Module) -> nn.Module:
    # forward_sync_buffers=False: QuantFull's int8 codes are buffers; rank 0's copy broadcast at every forward would
    # mask ranks that drift apart (and costs one byte per weight per forward)
    return nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False)


def _fsdp(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    from peft_quant.distributed import fsdp_ignored_params, shard_quant_full
    from peft_quant.quant_full.layer import QuantFullLayer

    # the recipe: QuantFull's int8 state sharded by rows first; its anchors and bitsandbytes 4-bit weights left out
    if any(isinstance(module, QuantFullLayer) for module in model.modules()):
        shard_quant_full(model)
    return fully_shard(model, ignored_params=fsdp_ignored_params(model) or None)


def _quant_full_refusal(name: str) -> dict[str, Any]:
    """QuantFull under FSDP2 set up as case ``name`` of ``QUANT_FULL_REFUSALS`` says, then one step: the error."""
    from peft import get_peft_model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from peft_quant import QuantFullConfig
    from peft_quant.distributed import fsdp_ignored_params, shard_quant_full

    case = CASES["quant_full"][0]
    torch.manual_seed(0)
    model = get_peft_model(build_base(case), make_config(case))
    data = _data(1)
    try:
        if name == "quant_full_ragged_rows":  # 7 output rows over 2 ranks
            shard_quant_full(get_peft_model(nn.Sequential(nn.Linear(16, 7)), QuantFullConfig(target_modules=["0"])))
        optimizer = _optimizer(model, "quant_full", 1) if name.endswith("optimizer_first") else None
        if name != "quant_full_without_shard":
            shard_quant_full(model)
        sharded_anchors = name.startswith("quant_full_anchors_sharded")
        options = {} if sharded_anchors else dict(ignored_params=fsdp_ignored_params(model))
        if name == "quant_full_mixed_precision":
            options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
        if name == "quant_full_sharded_under_ddp":  # DDP's start-up broadcast would overwrite rank 1's rows
            engine = torch.nn.parallel.DistributedDataParallel(model)
        else:
            engine = fully_shard(model, **options)
        optimizer = optimizer or _optimizer(model, "quant_full", 1)
        out = engine(data["x"][0, 0, :4], timestep=data["t"][0, 0, :4])
        F.mse_loss(out, data["y"][0, 0, :4]).backward()
        optimizer.step()
    except Exception as error:  # noqa: BLE001  (recorded for the test to judge, whatever it is)
        return dict(error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
    return dict(error=None)


def _nf4_refusal() -> dict[str, Any]:
    """QOFT on nf4 layers under a plain ``fully_shard`` (the 4-bit weights sharded too): the error the QOFT layer
    raises (``check_4bit_base`` at the start of its forward)."""
    from bitsandbytes.nn import Linear4bit
    from peft import get_peft_model
    from torch.distributed.fsdp import fully_shard

    case = CASES["qoft_nf4"][0]
    torch.manual_seed(0)
    model = get_peft_model(build_base(case), make_config(case))
    layers = [module for module in model.modules() if isinstance(module, Linear4bit)]
    data = _data(1)
    engine = fully_shard(model)
    sharded = [type(layer.weight).__name__ for layer in layers]  # what fully_shard left in place of the Params4bit
    try:
        engine(data["x"][0, 0, :4], timestep=data["t"][0, 0, :4])
    except Exception as error:  # noqa: BLE001  (recorded for the test to judge, whatever it is)
        return dict(error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc(), sharded=sharded)
    return dict(error=None, sharded=sharded)


def _rank(rank: int, engine: str, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=TIMEOUT)
    try:
        for name in ENGINE_CASES[engine]:
            if name in QUANT_FULL_REFUSALS:
                result = _quant_full_refusal(name)
            elif name == "nf4_without_ignored_params":
                result = _nf4_refusal()
            else:
                result = train(name, rank, WORLD, _ddp if engine == "ddp" else _fsdp)
            torch.save(result, Path(out_dir) / f"{name}.rank{rank}.pt")
        dist.barrier()  # gloo's worker thread drops the last collectives' tensors first (see examples/data_parallel.py)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(engine: str, out_dir: str) -> None:
    mp.spawn(_rank, args=(engine, _free_port(), out_dir), nprocs=WORLD, join=True)
    torch.set_num_threads(1)
    for name in ENGINE_CASES[engine]:
        if name in CASES:
            torch.save(train(name, 0, 1, lambda model: model), Path(out_dir) / f"{name}.single.pt")
        if name in STASH_CASES:
            torch.save(train(name, 0, 1, lambda model: model, halves=True), Path(out_dir) / f"{name}.halves.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
