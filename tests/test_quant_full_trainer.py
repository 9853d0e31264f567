"""QuantFull inside ``transformers.Trainer``, in the documented form
``Trainer(..., optimizers=(QuantFullOptimizer(model, lr=...), None))``: the loss falls; checkpoints are ordinary PEFT
directories holding the int8 state (and ``optimizer.pt`` its int8 momentum); a resumed run equals an uninterrupted
one bit for bit; gradient accumulation; bf16 autocast; the Trainer's LR schedule drives the fused step; a fresh
process reloads identical logits; and ``examples/quant_full_trainer.py`` runs end to end.

Tiny Llama built from a config (nothing is downloaded), real English text (standard-library docstrings) tokenized by
a byte-level BPE trained here with ``examples/offline_text.py``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file, save_file

from examples.offline_text import stdlib_sentences, train_tokenizer
from peft_quant import QuantFullConfig, QuantFullOptimizer
from peft_quant.quant_full import QuantFullLayer
from peft_quant.quant_full.int8_state import quantize_blockwise

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "quant_full_trainer.py"

VOCAB = 384  # byte-level BPE: 256 bytes + 2 specials + 126 merges
LLAMA = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
    max_position_embeddings=128,
    attention_bias=True,  # q/k/v/o biases: float trainables, so optimizer.step()'s float Lion runs too
)
# every Linear: the seven of each block (int8, fused) and the output layer
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
SEQ_LEN = 32
BATCH = 8
NUM_BLOCKS = 24  # 3 steps per epoch
MAX_STEPS = 12
SAVE_STEPS = 5  # checkpoint-5 lies inside the second epoch: resuming must skip that epoch's first 2 batches
WARMUP = 2  # linear warm-up: the first step runs at lr 0
LR = 3e-3


# ---- fixtures --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: two OpenMP threads on a busy 2-core machine spin-wait; the tiny model loses nothing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_tokenizer(stdlib_sentences()[:2000], vocab_size=VOCAB)
    assert len(tok) == VOCAB
    text = stdlib_sentences()[0]
    assert tok.decode(tok(text).input_ids) == text and len(tok(text).input_ids) < 0.8 * len(text)  # real merges
    return tok


@pytest.fixture(scope="module")
def blocks(tokenizer) -> torch.Tensor:
    """``NUM_BLOCKS + 8`` rows of ``SEQ_LEN`` tokens: docstring sentences joined with eos (last 8 rows held out)."""
    count = NUM_BLOCKS + 8
    ids: list[int] = []
    for sentence in stdlib_sentences()[2000:]:
        ids += tokenizer(sentence).input_ids + [tokenizer.eos_token_id]
        if len(ids) >= count * SEQ_LEN:
            break
    return torch.tensor(ids[: count * SEQ_LEN]).view(count, SEQ_LEN)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    """A tiny random Llama saved to disk (fresh copies load from here, in this process and in others)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("quant_full_llama")
    LlamaForCausalLM(LlamaConfig(**LLAMA, vocab_size=VOCAB)).save_pretrained(path)
    return str(path)


def _wrap(llama_dir: str, **config):
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    return get_peft_model(base, QuantFullConfig(target_modules=TARGETS, **config))


def _layers(model) -> dict[str, QuantFullLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantFullLayer)}


def _int8_state(model) -> dict[str, torch.Tensor]:
    """Every QuantFull buffer and float trainable (codes, scales, outliers, biases, anchors), cloned."""
    return {name: t.detach().clone() for name, t in model.state_dict().items() if ".qf_" in name}


def _optimizer_state(optimizer) -> dict:
    return {index: {key: value.clone() if torch.is_tensor(value) else value for key, value in state.items()}
            for index, state in optimizer.state_dict()["state"].items()}


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.rows[index], "labels": self.rows[index].clone()}


def _args(output_dir: str, **overrides):
    from transformers import TrainingArguments

    settings = dict(
        output_dir=output_dir, per_device_train_batch_size=BATCH, max_steps=MAX_STEPS, learning_rate=LR,
        lr_scheduler_type="linear", warmup_steps=WARMUP, logging_steps=1, save_strategy="steps",
        save_steps=SAVE_STEPS, use_cpu=True, report_to=[], seed=0, data_seed=0, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def _scheduled_lr(step: int) -> float:
    """The LR of optimizer step ``step`` (1-based) under transformers' linear schedule with warm-up."""
    done = step - 1
    if done < WARMUP:
        return LR * done / WARMUP
    return LR * max(0.0, (MAX_STEPS - done) / (MAX_STEPS - WARMUP))


@pytest.fixture(scope="module")
def trained(llama_dir, blocks, tokenizer, tmp_path_factory):
    """One uninterrupted Trainer run; before every forward (i.e. after the previous step) it records the int8
    state and the LR that the coming fused step will use."""
    from transformers import Trainer

    output_dir = str(tmp_path_factory.mktemp("quant_full_run"))
    model = _wrap(llama_dir)
    initial = _int8_state(model)
    optimizer = QuantFullOptimizer(model, lr=LR)
    trainer = Trainer(model=model, args=_args(output_dir), train_dataset=_Blocks(blocks[:NUM_BLOCKS]),
                      processing_class=tokenizer, optimizers=(optimizer, None))
    seen = []  # (lr of the coming step, state before it)

    def record(module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            seen.append((optimizer.param_groups[0]["lr"], _int8_state(model)))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    trainer.train()
    handle.remove()
    return SimpleNamespace(
        model=model, optimizer=optimizer, trainer=trainer, output_dir=output_dir, blocks=blocks,
        initial=initial, seen=seen, final=_int8_state(model), final_optimizer=_optimizer_state(optimizer),
        losses={h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h},
    )


# ---- 1. Trainer run: loss, checkpoints ------------------------------------------------------------------------------


def test_trainer_lowers_the_loss_and_trains_every_weight_in_int8(trained):
    assert trained.optimizer.param_groups[0]["name"] == "int8" and trained.optimizer.param_groups[1]["name"] == "float"
    assert sorted(trained.losses) == list(range(1, MAX_STEPS + 1))
    assert all(math.isfinite(v) for v in trained.losses.values())
    # every epoch sees the same 3 batches: first and last epoch differ only by what was learned
    per_epoch = NUM_BLOCKS // BATCH
    first = sum(trained.losses[s] for s in range(1, per_epoch + 1)) / per_epoch
    last = sum(trained.losses[s] for s in range(MAX_STEPS - per_epoch + 1, MAX_STEPS + 1)) / per_epoch
    # a random model starts near uniform (transformers 5.0 divides the summed loss by a token count that includes
    # positions without a next-token label, a few % lower)
    assert first > 0.95 * math.log(VOCAB) - 0.1
    assert last < first - 0.25, (first, last)
    # and on held-out text
    model = trained.model
    held_out = trained.blocks[NUM_BLOCKS:]
    model.eval()
    with torch.no_grad():
        after = model(input_ids=held_out, labels=held_out).loss.item()
    assert after < math.log(VOCAB) - 0.2, after
    # every targeted weight trains (codes moved in every layer), the dtypes stay, no float weight exists
    layers = _layers(model)
    assert len(layers) == 2 * 7 + 1
    for name, layer in layers.items():
        codes = layer.qf_codes["default"]
        assert codes.dtype == torch.int8 and layer.qf_outlier_value["default"].dtype == torch.float32
        assert (codes != trained.initial[f"{name}.qf_codes.default"]).float().mean() > 0.3, name
        assert type(layer.base_layer).__name__ == "ReleasedLinear"
    assert not any(p.numel() >= 64 * 64 for n, p in model.named_parameters() if p.requires_grad)
    assert trained.optimizer.skipped_updates == 0


def test_checkpoints_are_peft_directories_with_int8_state_and_int8_momentum(trained):
    for step in (SAVE_STEPS, 2 * SAVE_STEPS, MAX_STEPS):
        folder = os.path.join(trained.output_dir, f"checkpoint-{step}")
        files = set(os.listdir(folder))
        assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt",
                "trainer_state.json", "tokenizer.json"} <= files, files
        config = json.load(open(os.path.join(folder, "adapter_config.json")))
        assert config["peft_type"] == "QUANT_FULL" and sorted(config["target_modules"]) == sorted(TARGETS)
        saved = load_file(os.path.join(folder, "adapter_model.safetensors"))
        # what was saved at step k is the state after step k (recorded before forward k+1), dtypes kept
        expected = trained.seen[step][1] if step < MAX_STEPS else trained.final
        assert {k.replace(".default", "") for k in expected} == set(saved)
        for key, value in expected.items():
            tensor = saved[key.replace(".default", "")]
            assert tensor.dtype == value.dtype and torch.equal(tensor, value), key
        kinds = {key.rsplit(".", 1)[-1]: saved[key].dtype for key in saved}
        assert kinds == {"qf_codes": torch.int8, "qf_scale": torch.float32, "qf_outlier_index": torch.int32,
                         "qf_outlier_value": torch.float32, "qf_bias": torch.float32, "qf_anchor": torch.float32}
        outliers = sum(v.numel() for k, v in saved.items() if k.endswith("qf_outlier_value"))
        weights = sum(v.numel() for k, v in saved.items() if k.endswith("qf_codes"))
        assert outliers == pytest.approx(0.01 * weights, rel=0.01)  # QFT's ~1% float outliers
        assert not any(k.endswith(".weight") for k in saved)  # no float weight of any layer
    # optimizer.pt: the int8 Lion momentum of every int8 layer (and float Lion state of the biases)
    state = torch.load(os.path.join(trained.output_dir, f"checkpoint-{MAX_STEPS}", "optimizer.pt"), weights_only=True)
    groups = state["param_groups"]
    assert [g["name"] for g in groups] == ["int8", "float"] and len(groups[0]["params"]) == 15
    momentum = [state["state"][i] for i in groups[0]["params"]]
    for entry in momentum:
        assert entry["step"] == MAX_STEPS
        assert entry["momentum_codes"].dtype == torch.int8 and entry["momentum_absmax"].dtype == torch.float32
        assert entry["momentum_codes"].abs().max() == 127 and (entry["momentum_absmax"] > 0).all()
    assert sum(e["momentum_codes"].numel() for e in momentum) == sum(
        v.numel() for k, v in trained.final.items() if k.endswith("qf_codes.default"))
    for i in groups[1]["params"]:
        assert state["state"][i]["exp_avg"].dtype == torch.float32
    for index, entry in trained.final_optimizer.items():
        for key, value in entry.items():
            saved = state["state"][index][key]
            assert torch.equal(saved, value) if torch.is_tensor(value) else saved == value, (index, key)


# ---- 2. resume == uninterrupted --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resumed(trained, llama_dir, tokenizer, tmp_path_factory):
    """A NEW Trainer on a freshly wrapped model, resumed from the mid-run checkpoint of ``trained``."""
    from transformers import Trainer

    model = _wrap(llama_dir)  # a freshly wrapped model: its int8 state is the initial quantization
    fresh = _int8_state(model)
    optimizer = QuantFullOptimizer(model, lr=LR)
    output_dir = str(tmp_path_factory.mktemp("quant_full_resumed"))
    trainer = Trainer(model=model, args=_args(output_dir), train_dataset=_Blocks(trained.blocks[:NUM_BLOCKS]),
                      processing_class=tokenizer, optimizers=(optimizer, None))
    lrs = []
    handle = model.register_forward_pre_hook(lambda m, a, k: lrs.append(optimizer.param_groups[0]["lr"]),
                                             with_kwargs=True)
    trainer.train(resume_from_checkpoint=os.path.join(trained.output_dir, f"checkpoint-{SAVE_STEPS}"))
    handle.remove()
    return SimpleNamespace(model=model, optimizer=optimizer, trainer=trainer, output_dir=output_dir, fresh=fresh,
                           lrs=lrs)


def test_resume_in_a_new_trainer_equals_the_uninterrupted_run_bit_for_bit(trained, resumed):
    # the fresh model started from the initial quantization, not from the checkpoint's state
    assert all(torch.equal(resumed.fresh[k], trained.initial[k]) for k in resumed.fresh)
    assert any(not torch.equal(resumed.fresh[k], trained.seen[SAVE_STEPS][1][k]) for k in resumed.fresh)
    # it trained only the remaining steps, at the scheduled LRs: the checkpoint was really resumed
    assert resumed.lrs == [_scheduled_lr(s) for s in range(SAVE_STEPS + 1, MAX_STEPS + 1)]
    logged = {h["step"]: h["loss"] for h in resumed.trainer.state.log_history if "loss" in h}
    assert sorted(logged) == list(range(1, MAX_STEPS + 1))
    for step in range(SAVE_STEPS + 1, MAX_STEPS + 1):
        assert logged[step] == trained.losses[step], (step, logged[step], trained.losses[step])
    # int8 codes, scales, outliers (and the float biases, anchors): bit for bit, dtypes included
    state = _int8_state(resumed.model)
    assert set(state) == set(trained.final)
    for key, value in trained.final.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    # the momentum (codes + absmax), the step counters and the float Lion state: bit for bit in value (their dtype
    # after resuming is test_resumed_optimizer_keeps_its_momentum_in_int8's business)
    optimizer_state = _optimizer_state(resumed.optimizer)
    assert optimizer_state.keys() == trained.final_optimizer.keys()
    for index, entry in trained.final_optimizer.items():
        assert optimizer_state[index].keys() == entry.keys()
        for key, value in entry.items():
            got = optimizer_state[index][key]
            if torch.is_tensor(value):
                assert got.shape == value.shape and torch.equal(got.to(torch.float64), value.to(torch.float64)), (
                    index, key)
            else:
                assert got == value, (index, key)


def test_resumed_optimizer_keeps_its_momentum_in_int8(resumed):
    dtypes = {state["momentum_codes"].dtype for state in resumed.optimizer.state.values() if "momentum_codes" in state}
    later = torch.load(os.path.join(resumed.output_dir, f"checkpoint-{2 * SAVE_STEPS}", "optimizer.pt"),
                       weights_only=True)["state"]
    saved = {state["momentum_codes"].dtype for state in later.values() if "momentum_codes" in state}
    assert (dtypes, saved) == ({torch.int8}, {torch.int8})


# ---- 3. gradient accumulation ----------------------------------------------------------------------------------------


def _capture_gradients(model) -> dict[str, list[torch.Tensor]]:
    """Record every weight gradient a QuantFull layer hands to the optimizer (then let the optimizer have it)."""
    seen: dict[str, list[torch.Tensor]] = {}
    for name, layer in _layers(model).items():
        original = layer.updater

        def updater(lyr, grad, name=name, original=original):
            seen.setdefault(name, []).append(grad.detach().clone())
            original(lyr, grad)

        layer.updater = updater
    return seen


def _codes(model) -> dict[str, torch.Tensor]:
    return {name: layer.qf_codes["default"].clone() for name, layer in _layers(model).items()}


def test_gradient_accumulation_steps_on_every_second_backward_and_equals_one_concatenated_step(
    llama_dir, blocks, tmp_path
):
    from transformers import Trainer

    micro = 4
    model = _wrap(llama_dir)
    optimizer = QuantFullOptimizer(model, lr=LR, gradient_accumulation_steps=2)
    grads = _capture_gradients(model)
    snapshots, batches, momentum, loss_kwargs = [], [], [], []

    def record(module, args, kwargs):
        snapshots.append(_codes(model))
        batches.append(kwargs["input_ids"].clone())
        loss_kwargs.append({k: v for k, v in kwargs.items() if k == "num_items_in_batch"})
        momentum.append({n: {k: v.clone() for k, v in optimizer.state[layer.qf_anchor["default"]].items()
                             if torch.is_tensor(v)} for n, layer in _layers(model).items()})

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    args = _args(str(tmp_path / "ga"), per_device_train_batch_size=micro, gradient_accumulation_steps=2, max_steps=2,
                 lr_scheduler_type="constant", warmup_steps=0, save_strategy="no")
    Trainer(model=model, args=args, train_dataset=_Blocks(blocks[:16]), optimizers=(optimizer, None)).train()
    handle.remove()
    snapshots.append(_codes(model))

    # four backwards: the int8 weights change only on the 2nd and the 4th
    assert len(batches) == 4 and all(b.shape == (micro, SEQ_LEN) for b in batches)
    for name in snapshots[0]:
        assert torch.equal(snapshots[1][name], snapshots[0][name]), name
        assert not torch.equal(snapshots[2][name], snapshots[1][name]), name
        assert torch.equal(snapshots[3][name], snapshots[2][name]), name
        assert not torch.equal(snapshots[4][name], snapshots[3][name]), name
        assert len(grads[name]) == 4
    for layer in _layers(model).values():
        state = optimizer.state[layer.qf_anchor["default"]]
        assert state["step"] == 2 and "grad_accum" not in state  # two int8 steps; no buffer outlives a step

    # QuantFull sums the micro-batch gradients (each already divided by the Trainer for accumulation): the first
    # step's momentum is exactly (1 - β2) · (g1 + g2), block-quantized
    for name, layer in _layers(model).items():
        g1, g2 = grads[name][:2]
        codes, absmax = quantize_blockwise(g1.clone().add_(g2) * 0.01, optimizer.momentum_block_size)
        assert torch.equal(momentum[2][name]["momentum_codes"], codes), name
        assert torch.equal(momentum[2][name]["momentum_absmax"], absmax), name

    # ... which is one step on the concatenated batch, up to float rounding of the gradient sums
    reference = _wrap(llama_dir)
    reference_optimizer = QuantFullOptimizer(reference, lr=LR)
    reference_grads = _capture_gradients(reference)
    both = torch.cat(batches[:2])
    # the loss normalization the Trainer used: its token count if it passed one (then g1 + g2 is the gradient of
    # the summed loss over that count), else each micro-batch's mean divided by the accumulation steps
    reference(input_ids=both, labels=both, **loss_kwargs[0]).loss.backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)  # what the Trainer does before optimizer.step()
    reference_optimizer.step()
    after_one_step = snapshots[2]
    total = mismatched = 0
    for name, layer in _layers(reference).items():
        g1, g2 = grads[name][:2]
        torch.testing.assert_close(g1 + g2, reference_grads[name][0], rtol=1e-4, atol=1e-6)
        state = reference_optimizer.state[layer.qf_anchor["default"]]
        torch.testing.assert_close(momentum[2][name]["momentum_absmax"], state["momentum_absmax"], rtol=1e-4, atol=0)
        codes = layer.qf_codes["default"]
        mismatched += int((codes != after_one_step[name]).sum())
        total += codes.numel()
    assert mismatched <= 1e-4 * total, (mismatched, total)  # a sign flip of a gradient within rounding of 0


def test_gradient_accumulation_stays_aligned_with_trainer_steps_across_a_short_last_accumulation(
    llama_dir, blocks, tmp_path
):
    from transformers import Trainer

    model = _wrap(llama_dir)
    optimizer = QuantFullOptimizer(model, lr=LR, gradient_accumulation_steps=2)
    args = _args(str(tmp_path / "ga_odd"), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=4,
                 lr_scheduler_type="constant", warmup_steps=0, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=_Blocks(blocks[:20]),  # 5 micro-batches per epoch
                      optimizers=(optimizer, None))
    trainer.train()
    assert trainer.state.global_step == 4
    for name, layer in _layers(model).items():
        state = optimizer.state[layer.qf_anchor["default"]]
        # one int8 step per Trainer step, and no gradient left pending after the optimizer stepped
        assert (state["step"], "grad_accum" in state) == (4, False), (name, state["step"])


# ---- 4. bf16 autocast ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backward_in_autocast", [False, True], ids=["backward-after", "backward-inside"])
def test_bf16_autocast_forward_and_backward_update_the_int8_weights(llama_dir, blocks, backward_in_autocast):
    """Forward under ``torch.autocast("cpu", bfloat16)``; backward after leaving it (PyTorch's advice, and what the
    Trainer does) or inside it."""
    batch = blocks[:4]
    # float32 gradients of the same model, for comparison (no update: the updater only records)
    float_model = _wrap(llama_dir)
    float_grads = {}
    for name, layer in _layers(float_model).items():
        layer.updater = lambda lyr, grad, name=name: float_grads.setdefault(name, grad.clone())
    float_model(input_ids=batch, labels=batch).loss.backward()

    model = _wrap(llama_dir)
    optimizer = QuantFullOptimizer(model, lr=LR)
    before = _int8_state(model)
    grads = _capture_gradients(model)
    out_dtypes = {}

    def record_dtype(module, args, out):
        out_dtypes[module] = out.dtype

    handles = [layer.register_forward_hook(record_dtype) for layer in _layers(model).values()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=batch, labels=batch).loss
        if backward_in_autocast:
            loss.backward()
    if not backward_in_autocast:
        loss.backward()
    optimizer.step()
    for handle in handles:
        handle.remove()
    assert math.isfinite(loss.item())
    assert len(out_dtypes) == 15 and set(out_dtypes.values()) == {torch.bfloat16}  # the int8 layers ran in bf16
    after = _int8_state(model)
    for name in _layers(model):
        grad = grads[name][0]
        assert torch.isfinite(grad).all(), name
        if not backward_in_autocast:
            assert grad.dtype == torch.float32, name  # (inside autocast the dW matmul itself runs in bf16)
        cosine = torch.nn.functional.cosine_similarity(grad.float().flatten(), float_grads[name].flatten(), dim=0)
        assert cosine > 0.95, (name, cosine)  # the bf16 gradient is the float one, roughly
        assert after[f"{name}.qf_codes.default"].dtype == torch.int8
        assert not torch.equal(after[f"{name}.qf_codes.default"], before[f"{name}.qf_codes.default"]), name
        assert not torch.equal(after[f"{name}.qf_outlier_value.default"], before[f"{name}.qf_outlier_value.default"])
    biases = [k for k in before if "qf_bias" in k]
    assert biases and all(not torch.equal(after[k], before[k]) for k in biases)  # float Lion in step()
    assert optimizer.skipped_updates == 0


def test_trainer_bf16_runs_the_int8_layers_in_bf16_and_updates_them(llama_dir, blocks, tmp_path):
    from transformers import Trainer

    model = _wrap(llama_dir)
    optimizer = QuantFullOptimizer(model, lr=LR)
    before = _codes(model)
    grads = _capture_gradients(model)
    out_dtypes = set()
    handle = _layers(model)["base_model.model.lm_head"].register_forward_hook(
        lambda m, a, out: out_dtypes.add(out.dtype))
    args = _args(str(tmp_path / "bf16"), bf16=True, max_steps=2, per_device_train_batch_size=4, warmup_steps=0,
                 lr_scheduler_type="constant", save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=_Blocks(blocks[:8]), optimizers=(optimizer, None))
    trainer.train()
    handle.remove()
    assert out_dtypes == {torch.bfloat16}
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for gs in grads.values() for g in gs)
    assert all(not torch.equal(codes, before[name]) for name, codes in _codes(model).items())
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


# ---- 5. the Trainer's LR schedule drives the fused step --------------------------------------------------------------


def test_trainer_lr_schedule_sets_param_groups_and_the_fused_step_uses_it(trained):
    lrs = [lr for lr, _ in trained.seen]
    assert len(lrs) == MAX_STEPS
    for step, lr in enumerate(lrs, start=1):
        assert lr == pytest.approx(_scheduled_lr(step), rel=1e-6, abs=1e-12), step
    assert lrs[0] == 0.0 and lrs[1] > 0
    states = [state for _, state in trained.seen] + [trained.final]
    codes = [k for k in trained.final if k.endswith("qf_codes.default")]
    outliers = [k for k in trained.final if k.endswith("qf_outlier_value.default")]
    # step 1 runs at lr 0: no outlier (kept exactly in float) moves
    assert all(torch.equal(states[1][k], states[0][k]) for k in outliers)
    # from then on every outlier moves by exactly lr · |sign(c)|: the scheduled lr of that very step
    for step in range(2, MAX_STEPS + 1):
        lr = lrs[step - 1]
        for key in outliers:
            delta = (states[step][key] - states[step - 1][key]).abs()
            torch.testing.assert_close(delta, torch.full_like(delta, lr), rtol=1e-3, atol=1e-7)
        assert all(not torch.equal(states[step][k], states[step - 1][k]) for k in codes)


def test_lr_zero_from_the_scheduler_leaves_the_int8_weights_unchanged(llama_dir, blocks, tmp_path):
    """Round to nearest: a step at lr 0 (the first of a linear warm-up) changes no code and no outlier, while the
    momentum does take in the gradient; the next step (lr > 0) moves the weights."""
    from transformers import Trainer

    model = _wrap(llama_dir, stochastic_rounding=False)
    optimizer = QuantFullOptimizer(model, lr=LR)
    initial = _int8_state(model)
    seen = []
    handle = model.register_forward_pre_hook(
        lambda m, a, k: seen.append((optimizer.param_groups[0]["lr"], _int8_state(model),
                                     [s["momentum_absmax"].clone() for s in optimizer.state.values()
                                      if "momentum_absmax" in s])), with_kwargs=True)
    args = _args(str(tmp_path / "lr0"), max_steps=2, warmup_steps=2, save_strategy="no")
    Trainer(model=model, args=args, train_dataset=_Blocks(blocks[:16]), optimizers=(optimizer, None)).train()
    handle.remove()
    (lr1, _, _), (lr2, after_first, momentum) = seen
    assert (lr1, lr2) == (0.0, LR / 2)
    for key, value in initial.items():
        if "qf_bias" not in key:  # (the float biases: float Lion, also at lr 0 · sign = 0)
            assert torch.equal(after_first[key], value), key
    assert len(momentum) == 15 and all(m.max() > 0 for m in momentum)  # the lr-0 step did run
    final = _int8_state(model)
    assert all(not torch.equal(final[k], initial[k]) for k in initial if "qf_codes" in k)


def test_lr_zero_leaves_the_codes_unchanged_under_stochastic_rounding_too():
    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(256, 256)),
                           QuantFullConfig(target_modules=["0"], outlier_fraction=0.0))
    optimizer = QuantFullOptimizer(model, lr=LR)
    optimizer.param_groups[0]["lr"] = 0.0  # what an LR scheduler does at the start of a warm-up
    layer = next(iter(_layers(model).values()))
    before = layer.qf_codes["default"].clone()
    x = torch.randn(8, 256)
    for _ in range(100):  # 100 fused steps at lr 0 over 65k codes
        model(x).pow(2).mean().backward()
    assert optimizer.state[layer.qf_anchor["default"]]["step"] == 100
    moved = int((layer.qf_codes["default"] != before).sum())
    assert moved == 0, f"{moved} codes moved at lr 0"


# ---- 6. fresh-process reload -----------------------------------------------------------------------------------------

RELOAD = r"""
import sys
import torch
import peft_quant
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

base_dir, adapter_dir, tokens_file, out_file = sys.argv[1:]
tokens = load_file(tokens_file)["tokens"]
plain = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter_dir).eval()
codes = [m.qf_codes["default"] for m in model.modules() if hasattr(m, "qf_codes")]
assert len(codes) == 15 and all(c.dtype == torch.int8 for c in codes), [c.dtype for c in codes]
with torch.no_grad():
    save_file({"logits": model(tokens).logits.contiguous(), "plain": plain(tokens).logits.contiguous()}, out_file)
"""


def test_checkpoint_reloads_in_a_fresh_process_to_identical_logits(trained, llama_dir, tmp_path):
    tokens = trained.blocks[NUM_BLOCKS:NUM_BLOCKS + 2]
    save_file({"tokens": tokens.contiguous()}, str(tmp_path / "tokens.safetensors"))
    checkpoint = os.path.join(trained.output_dir, f"checkpoint-{MAX_STEPS}")
    result = subprocess.run(
        [sys.executable, "-c", RELOAD, llama_dir, checkpoint, str(tmp_path / "tokens.safetensors"),
         str(tmp_path / "logits.safetensors")],
        capture_output=True, text=True, timeout=180, cwd=ROOT, env=_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded = load_file(str(tmp_path / "logits.safetensors"))
    trained.model.eval()
    with torch.no_grad():
        expected = trained.model(tokens).logits
    assert torch.equal(reloaded["logits"], expected)
    assert (reloaded["plain"] - expected).abs().max() > 0.5  # the tuned weights do change the model


# ---- 7. the example --------------------------------------------------------------------------------------------------


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore",
                OMP_NUM_THREADS="1")


def _run_example(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, env=_env(),
                          timeout=timeout, cwd=ROOT)


def test_example_help():
    result = _run_example("--help", timeout=60)
    assert result.returncode == 0, result.stderr
    for flag in ("--model_name_or_path", "--load_in_4bit", "--max_steps", "--learning_rate", "--output_dir",
                 "--stochastic_rounding", "--no-stochastic_rounding", "--gradient_accumulation_steps"):
        assert flag in result.stdout, flag


def test_example_runs_end_to_end_on_a_4bit_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    result = _run_example(
        "--output_dir", str(out), "--load_in_4bit", "--max_steps", "6", "--per_device_train_batch_size", "4",
        "--gradient_accumulation_steps", "2", "--block_size", "32", "--no-stochastic_rounding", "--save_steps", "3",
        "--vocab_size", "320", "--learning_rate", "3e-3",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.rindex("\n{\n") + 1:])
    config = json.load(open(out / "base_model" / "config.json"))
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    per_block = 4 * hidden * hidden + 3 * hidden * inter
    assert vocab == 320 and summary["steps"] == 6 and summary["gradient_accumulation_steps"] == 2
    assert summary["tuned_layers"] == 7 * config["num_hidden_layers"] + 1
    assert summary["tuned_parameters"] == config["num_hidden_layers"] * per_block + vocab * hidden
    # the 4-bit layers were dequantized once into int8 state (the output layer was float)
    assert summary["base_layer_formats"] == {"bitsandbytes nf4": 7 * config["num_hidden_layers"], "torch float32": 1}
    per_param = summary["int8_state_bytes_per_tuned_parameter"]
    assert 1.0 < per_param["weights (codes, scales, outliers)"] < 1.15  # 1 byte code + ~1% outliers (8 B) + scales
    assert per_param["lion_momentum (codes, absmax)"] == pytest.approx(1 + 4 / 256, abs=2e-3)
    assert per_param["total"] == pytest.approx(
        per_param["weights (codes, scales, outliers)"] + per_param["lion_momentum (codes, absmax)"], abs=2e-4)
    loss = summary["loss"]
    assert math.isfinite(loss["first"]) and math.isfinite(loss["last"])
    assert loss["first"] == pytest.approx(math.log(vocab), abs=0.3)  # measured before any update: a random model
    assert summary["held_out_loss"]["after"] < summary["held_out_loss"]["before"]
    assert summary["reloaded_logits_identical"] is True and summary["skipped_updates"] == 0
    # the adapter directory: PEFT files with int8 codes, the tokenizer, a checkpoint with the int8 momentum
    adapter = out / "adapter_model.safetensors"
    assert summary["adapter_bytes_on_disk"] == adapter.stat().st_size
    saved = load_file(str(adapter))
    codes = [v for k, v in saved.items() if k.endswith("qf_codes")]
    assert all(c.dtype == torch.int8 for c in codes) and sum(c.numel() for c in codes) == summary["tuned_parameters"]
    assert json.load(open(out / "adapter_config.json"))["stochastic_rounding"] is False
    assert (out / "tokenizer.json").exists() and (out / "checkpoint-3" / "optimizer.pt").exists()
    momentum = torch.load(out / "checkpoint-3" / "optimizer.pt", weights_only=True)["state"]
    assert all(s["momentum_codes"].dtype == torch.int8 and s["step"] == 3 for s in momentum.values())
