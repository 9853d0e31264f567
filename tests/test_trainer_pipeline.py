"""QOFT inside the Hugging Face stack: a real ``Trainer`` run on a 4-bit model (loss, checkpoints, resume,
reload), the text-generation ``pipeline`` and ``generate``, ``AutoPeftModelForCausalLM``, and transformers' own
adapter API (``load_adapter`` / ``set_adapter`` / ``disable_adapters``).

Text is real English (sentences from standard-library docstrings) tokenized by a small BPE trained here, offline,
to fit the tiny Llama's 256-token vocabulary.
"""

from __future__ import annotations

import json
import os
from importlib.metadata import version
from types import SimpleNamespace

import pytest
import torch
from packaging.version import Version
from peft import AutoPeftModelForCausalLM, PeftModel, PeftModelForCausalLM, get_peft_model
from safetensors.torch import load_file

from examples.offline_text import stdlib_sentences
from peft_quant import QOFTConfig

from .conftest import TINY_LLAMA, load_llama, randomize_adapter

TARGETS = ["q_proj", "v_proj"]
SEQ_LEN = 32
BATCH = 8
NUM_TRAIN_BLOCKS = 24  # 3 batches per epoch
MAX_STEPS = 48
SAVE_STEPS = 20  # checkpoint-20 falls in the middle of an epoch: resuming must skip that epoch's first 2 batches
PROMPT = "Return a new list containing"


# ---- fixtures: text, tokenizer, a base model that has seen text --------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run this module's tiny models on one thread: two OpenMP threads on a 2-core machine that is also running
    something else spin-wait and slow these tests down many times over; one thread loses nothing here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    sentences = stdlib_sentences()
    assert len(sentences) > 1000
    return sentences


@pytest.fixture(scope="module")
def tokenizer(sentences):
    """A BPE (Metaspace pre-tokenizer, 256 tokens in all) trained on the docstrings, as a PreTrainedTokenizerFast.

    Special tokens get the ids LlamaConfig's defaults expect (bos 1, eos 2), so the model's generation config and
    the tokenizer agree on when to stop.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    special = ["<unk>", "<s>", "</s>", "<pad>"]
    tok.train_from_iterator(
        sentences, trainers.BpeTrainer(vocab_size=TINY_LLAMA["vocab_size"], special_tokens=special, limit_alphabet=100)
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    assert len(fast) <= TINY_LLAMA["vocab_size"]
    assert [fast.unk_token_id, fast.bos_token_id, fast.eos_token_id, fast.pad_token_id] == [0, 1, 2, 3]
    text = sentences[0]
    ids = fast(text).input_ids
    assert fast.decode(ids) == text and fast.unk_token_id not in ids and len(ids) < 0.6 * len(text)  # real merges
    return fast


def _read(*parts: str) -> str:
    with open(os.path.join(*parts)) as f:
        return f.read()


def _blocks(tokenizer, sentences: list[str], count: int) -> torch.Tensor:
    """``count`` rows of ``SEQ_LEN`` tokens: the sentences tokenized, joined with eos, cut into blocks."""
    ids: list[int] = []
    for sentence in sentences:
        ids += tokenizer(sentence).input_ids + [tokenizer.eos_token_id]
        if len(ids) >= count * SEQ_LEN:
            break
    assert len(ids) >= count * SEQ_LEN, "not enough text"
    return torch.tensor(ids[: count * SEQ_LEN]).view(count, SEQ_LEN)


@pytest.fixture(scope="module")
def text_llama_dir(tiny_llama_dir, tokenizer, sentences, tmp_path_factory) -> str:
    """The tiny Llama after 100 steps of full training on other docstring sentences, saved in float32.

    QOFT only rotates the inputs of q_proj/v_proj. At random init the tiny Llama predicts almost uniformly (loss
    ln 256 = 5.55) and rotating its attention inputs barely changes that: in trials, 36 QOFT steps at any learning
    rate lowered its loss by about 0.02 nats, less than the batch-to-batch noise, so no margin could tell a
    working optimizer step from a broken one. After this short pre-training (1 s) QOFT lowers the loss of new
    text by about 0.4 nats in 48 steps.
    """
    model = load_llama(tiny_llama_dir)
    data = _blocks(tokenizer, sentences[1000:], 1024)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(100):
        batch = data[torch.randint(0, len(data), (16,), generator=generator)]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    path = tmp_path_factory.mktemp("text_llama")
    model.save_pretrained(path)
    return str(path)


class _BlockDataset(torch.utils.data.Dataset):
    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index].clone()}


def _training_args(output_dir: str):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=BATCH,
        max_steps=MAX_STEPS,
        learning_rate=0.05,
        lr_scheduler_type="linear",
        warmup_steps=2,
        logging_steps=1,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        use_cpu=True,
        report_to=[],
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def _qoft_nf4(base_dir: str):
    return get_peft_model(load_llama(base_dir, "nf4"), QOFTConfig(target_modules=TARGETS, block_size=16))


def _qoft_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "qoft_" in name}


def _mean_loss(model, blocks: torch.Tensor) -> float:
    """Mean next-token loss over ``blocks``, in train mode (keeps bitsandbytes' CPU weight layout untouched)."""
    model.train()
    with torch.no_grad():
        return model(input_ids=blocks, labels=blocks).loss.item()


def _eval_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits in eval mode under no_grad, after one warm-up forward (on AVX512-BF16 CPUs bitsandbytes repacks
    4-bit weights at the first such forward and uses another kernel from then on)."""
    model.eval()
    with torch.no_grad():
        model(tokens)
        return model(tokens).logits


@pytest.fixture(scope="module")
def trained(text_llama_dir, tokenizer, sentences, tmp_path_factory):
    """One uninterrupted Trainer run of QOFT on the 4-bit model; checkpoints every SAVE_STEPS steps."""
    from transformers import Trainer

    blocks = _blocks(tokenizer, sentences[:1000], NUM_TRAIN_BLOCKS)
    output_dir = str(tmp_path_factory.mktemp("qoft_run"))
    model = _qoft_nf4(text_llama_dir)
    loss_before = _mean_loss(model, blocks)
    trainer = Trainer(model=model, args=_training_args(output_dir), train_dataset=_BlockDataset(blocks))
    first_batch = []  # the inputs of the first training step, as the Trainer passed them

    def record(module, args, kwargs):
        if module.training and not first_batch:
            first_batch.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    trainer.train()
    handle.remove()
    return SimpleNamespace(
        first_batch=first_batch[0],
        model=model,
        trainer=trainer,
        blocks=blocks,
        output_dir=output_dir,
        loss_before=loss_before,
        loss_after=_mean_loss(model, blocks),
        losses={h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h},
        final_state=_qoft_state(model),
    )


# ---- 1. Trainer on the 4-bit model ------------------------------------------------------------------------------


def test_trainer_lowers_the_loss(trained):
    steps_per_epoch = NUM_TRAIN_BLOCKS // BATCH
    assert sorted(trained.losses) == list(range(1, MAX_STEPS + 1))
    assert all(torch.isfinite(torch.tensor(v)) for v in trained.losses.values())
    # Each epoch sees every block once, so first and last epoch differ only by what was learned.
    first = sum(trained.losses[s] for s in range(1, steps_per_epoch + 1)) / steps_per_epoch
    last = sum(trained.losses[s] for s in range(MAX_STEPS - steps_per_epoch + 1, MAX_STEPS + 1)) / steps_per_epoch
    assert last < first - 0.25, (first, last)
    # The loss logged at step 1 is the untrained model's loss on the first batch, recomputed here by hand; and
    # independent forwards over all blocks before and after training agree that the loss fell.
    assert trained.losses[1] == pytest.approx(_mean_loss_of_first_batch(trained), abs=1e-4)
    assert trained.loss_after < trained.loss_before - 0.25, (trained.loss_before, trained.loss_after)
    # only the rotations trained: the quantized base was not touched and nothing else requires grad
    trainable = {n for n, p in trained.model.named_parameters() if p.requires_grad}
    assert trainable == set(trained.final_state) and len(trainable) == 4
    assert all(p.abs().max() > 0 for p in trained.final_state.values())


def _mean_loss_of_first_batch(trained) -> float:
    """The loss the Trainer logged at step 1, recomputed from a fresh untrained adapter on the inputs it passed
    (with them ``num_items_in_batch``, by which some transformers versions normalize the loss)."""
    fresh = _qoft_nf4(trained.model.peft_config["default"].base_model_name_or_path)
    fresh.train()
    with torch.no_grad():
        return fresh(**trained.first_batch).loss.item()


def test_checkpoints_are_ordinary_peft_directories(trained):
    checkpoints = sorted(d for d in os.listdir(trained.output_dir) if d.startswith("checkpoint-"))
    assert checkpoints == [f"checkpoint-{s}" for s in (SAVE_STEPS, 2 * SAVE_STEPS, MAX_STEPS)]
    for name in checkpoints:
        path = os.path.join(trained.output_dir, name)
        files = set(os.listdir(path))
        assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= files, files
        assert {"optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth"} <= files, files
        assert not files & {"model.safetensors", "pytorch_model.bin"}  # no copy of the base model
        config = json.loads(_read(path, "adapter_config.json"))
        assert config["peft_type"] == "QOFT" and config["block_size"] == 16 and config["format_version"] == 1
        assert set(config["target_modules"]) == set(TARGETS)
        assert config["base_model_name_or_path"] == trained.model.get_base_model().name_or_path
        tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
        expected = {f"base_model.model.model.layers.{i}.self_attn.{t}.qoft_Q" for i in range(2) for t in TARGETS}
        assert set(tensors) == expected
        card = _read(path, "README.md")
        assert "library_name: peft" in card and "- peft-quant" in card and "- qoft" in card, card[:500]
        assert "bitsandbytes nf4" in card and "| Adapted layers | 4 |" in card
    # the last checkpoint holds the final weights, and the middle one something in between
    last = load_file(os.path.join(trained.output_dir, f"checkpoint-{MAX_STEPS}", "adapter_model.safetensors"))
    middle = load_file(os.path.join(trained.output_dir, f"checkpoint-{SAVE_STEPS}", "adapter_model.safetensors"))
    for key, value in trained.final_state.items():
        saved_key = key.replace(".default", "")
        assert torch.equal(last[saved_key], value), key
        assert not torch.equal(middle[saved_key], value), key


def test_resume_from_mid_run_checkpoint_matches_uninterrupted_run(trained, text_llama_dir, tmp_path):
    from transformers import Trainer

    model = _qoft_nf4(text_llama_dir)
    assert all(p.abs().max() == 0 for p in _qoft_state(model).values())  # a fresh, identity adapter
    trainer = Trainer(model=model, args=_training_args(str(tmp_path / "resumed")),
                      train_dataset=_BlockDataset(trained.blocks))
    trainer.train(resume_from_checkpoint=os.path.join(trained.output_dir, f"checkpoint-{SAVE_STEPS}"))
    # the log history restored from the checkpoint, then the steps trained here
    logged = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    assert [step for step, _ in logged] == list(range(1, MAX_STEPS + 1))
    # same batches in the same order, from the same weights, optimizer and scheduler state: bit for bit on CPU
    for step, loss in logged[SAVE_STEPS:]:
        assert loss == trained.losses[step], (step, loss, trained.losses[step])
    resumed = _qoft_state(model)
    assert set(resumed) == set(trained.final_state)
    for name, value in trained.final_state.items():
        assert torch.equal(resumed[name], value), (name, (resumed[name] - value).abs().max())


def test_saved_adapter_reloads_to_identical_logits(trained, text_llama_dir, tmp_path):
    path = str(tmp_path / "final")
    trained.model.save_pretrained(path)
    reloaded = PeftModel.from_pretrained(load_llama(text_llama_dir, "nf4"), path)
    assert isinstance(reloaded.peft_config["default"], QOFTConfig)
    tokens = trained.blocks[:2]
    expected = _eval_logits(trained.model, tokens)
    assert torch.equal(_eval_logits(reloaded, tokens), expected)
    with reloaded.disable_adapter():
        base = _eval_logits(reloaded, tokens)
    assert (base - expected).abs().max() > 0.05  # the trained adapter does change the model


# ---- 2. inference: pipeline and generate ----------------------------------------------------------------------


def _generation_model(base_dir: str, task_type=None):
    model = get_peft_model(
        load_llama(base_dir, "nf4"), QOFTConfig(target_modules=TARGETS, block_size=16, task_type=task_type)
    )
    randomize_adapter(model, std=0.1, seed=3)
    model.eval()
    return model


@pytest.fixture(scope="module")
def generation_model(text_llama_dir):
    return _generation_model(text_llama_dir)


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_text_generation_pipeline_runs_with_the_adapter(text_llama_dir, tokenizer, task_type):
    from transformers import pipeline

    model = _generation_model(text_llama_dir, task_type)
    assert type(model).__name__ == ("PeftModelForCausalLM" if task_type else "PeftModel")
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    settings = dict(max_new_tokens=16, do_sample=False)
    text = generator(PROMPT, return_full_text=False, **settings)[0]["generated_text"]
    assert isinstance(text, str) and text.strip()
    assert generator(PROMPT, **settings)[0]["generated_text"] == PROMPT + text
    # what the pipeline generated is greedy decoding of the adapted model, done by hand
    prompt_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    model.eval()
    by_hand = _greedy_by_hand(model, prompt_ids, 16, tokenizer.eos_token_id)
    # (transformers before 5.x cut the prompt's text off the full text, keeping a leading space; compare tokens' text)
    assert text.strip() == tokenizer.decode(by_hand[0, prompt_ids.shape[1]:], skip_special_tokens=True).strip()
    # and the adapter was active: without it the pipeline writes something else
    with model.disable_adapter():
        plain = generator(PROMPT, return_full_text=False, **settings)[0]["generated_text"]
    assert plain != text, text


def _greedy_by_hand(model, prompt_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int) -> torch.Tensor:
    """Greedy decoding as full forwards over the growing sequence: no cache, no generation utilities."""
    sequence = prompt_ids
    for _ in range(max_new_tokens):
        with torch.no_grad():
            next_token = model(sequence).logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, next_token], dim=1)
        if next_token.item() == eos_token_id:
            break
    return sequence


def test_generate_uses_the_adapter_and_matches_a_manual_forward(generation_model, tokenizer):
    model = generation_model
    inputs = tokenizer([PROMPT], return_tensors="pt")
    prompt_len = inputs.input_ids.shape[1]
    _eval_logits(model, inputs.input_ids)  # warm-up: same kernels for generate and the manual forwards
    settings = dict(max_new_tokens=16, do_sample=False, return_dict_in_generate=True, output_logits=True,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        adapted = model.generate(**inputs, **settings)
        with model.disable_adapter():
            plain = model.generate(**inputs, **settings)
    assert torch.equal(adapted.sequences[:, :prompt_len], inputs.input_ids)
    new_adapted = adapted.sequences[0, prompt_len:].tolist()
    new_plain = plain.sequences[0, prompt_len:].tolist()
    assert len(new_adapted) >= 4, new_adapted
    assert new_adapted != new_plain, "the adapter did not change greedy decoding"
    # first generated step == a manual forward over the prompt, with and without the adapter
    manual = _eval_logits(model, inputs.input_ids)[:, -1]
    torch.testing.assert_close(adapted.logits[0], manual, rtol=1e-5, atol=1e-5)
    with model.disable_adapter():
        manual_plain = _eval_logits(model, inputs.input_ids)[:, -1]
    torch.testing.assert_close(plain.logits[0], manual_plain, rtol=1e-5, atol=1e-5)
    assert (manual - manual_plain).abs().max() > 0.05
    # every greedy step is the argmax of the logits generate reports for it
    assert len(adapted.logits) == len(new_adapted)
    for token, logits in zip(new_adapted, adapted.logits):
        assert token == logits.argmax(-1).item()
    # and the whole continuation, with and without the adapter, is what greedy decoding by hand gives
    by_hand = _greedy_by_hand(model, inputs.input_ids, 16, tokenizer.eos_token_id)
    assert by_hand[0].tolist() == adapted.sequences[0].tolist()
    with model.disable_adapter():
        by_hand_plain = _greedy_by_hand(model, inputs.input_ids, 16, tokenizer.eos_token_id)
    assert by_hand_plain[0].tolist() == plain.sequences[0].tolist()


# ---- 3/4. float adapters: AutoPeftModel and transformers' adapter API --------------------------------------------


def _float_adapter(base_dir: str, path: str, seed: int):
    model = get_peft_model(load_llama(base_dir), QOFTConfig(target_modules=TARGETS, block_size=16))
    randomize_adapter(model, std=0.1, seed=seed)
    model.save_pretrained(path)
    return model


def _tokens() -> torch.Tensor:
    return torch.randint(4, TINY_LLAMA["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))


def test_auto_peft_model_loads_from_the_adapter_directory(tiny_llama_dir, tmp_path):
    path = str(tmp_path / "adapter")
    original = _float_adapter(tiny_llama_dir, path, seed=5)
    assert json.loads(_read(path, "adapter_config.json"))["base_model_name_or_path"] == tiny_llama_dir
    tokens = _tokens()

    auto = AutoPeftModelForCausalLM.from_pretrained(path)
    assert isinstance(auto, PeftModelForCausalLM) and isinstance(auto.peft_config["default"], QOFTConfig)
    assert auto.get_base_model().dtype == torch.float32
    manual = PeftModel.from_pretrained(load_llama(tiny_llama_dir), path)
    expected = _eval_logits(manual, tokens)
    torch.testing.assert_close(_eval_logits(auto, tokens), expected, rtol=0, atol=0)
    torch.testing.assert_close(_eval_logits(original, tokens), expected, rtol=0, atol=0)
    base = _eval_logits(load_llama(tiny_llama_dir), tokens)
    assert (base - expected).abs().max() > 0.05


_ADAPTER_API_NEEDS_NEWER_PEFT = (Version(version("transformers")) >= Version("5.24")
                                 and Version(version("peft")) < Version("0.22"))


def test_transformers_load_adapter_set_adapter_disable(tiny_llama_dir, tmp_path):
    path_a, path_b = str(tmp_path / "a"), str(tmp_path / "b")
    _float_adapter(tiny_llama_dir, path_a, seed=6)
    _float_adapter(tiny_llama_dir, path_b, seed=7)
    tokens = _tokens()
    base = _eval_logits(load_llama(tiny_llama_dir), tokens)
    expected_a = _eval_logits(PeftModel.from_pretrained(load_llama(tiny_llama_dir), path_a), tokens)
    expected_b = _eval_logits(PeftModel.from_pretrained(load_llama(tiny_llama_dir), path_b), tokens)
    assert (expected_a - base).abs().max() > 0.05 and (expected_b - expected_a).abs().max() > 0.05

    model = load_llama(tiny_llama_dir)
    model.load_adapter(path_a, adapter_name="a")
    assert isinstance(model.peft_config["a"], QOFTConfig)
    torch.testing.assert_close(_eval_logits(model, tokens), expected_a, rtol=0, atol=0)
    if _ADAPTER_API_NEEDS_NEWER_PEFT:  # transformers >= 5.24 manages adapters only with peft >= 0.22 (unreleased)
        for call in (model.active_adapters, lambda: model.set_adapter("a"), model.disable_adapters,
                     model.enable_adapters):
            with pytest.raises(ValueError, match=r"version >= 0\.22"):
                call()
        return
    assert model.active_adapters() == ["a"]

    model.load_adapter(path_b, adapter_name="b")
    model.set_adapter("b")
    assert model.active_adapters() == ["b"]
    torch.testing.assert_close(_eval_logits(model, tokens), expected_b, rtol=0, atol=0)

    model.disable_adapters()
    torch.testing.assert_close(_eval_logits(model, tokens), base, rtol=0, atol=0)
    model.enable_adapters()
    torch.testing.assert_close(_eval_logits(model, tokens), expected_b, rtol=0, atol=0)
    model.set_adapter("a")
    torch.testing.assert_close(_eval_logits(model, tokens), expected_a, rtol=0, atol=0)
