"""The example scripts run end to end, as a user runs them: in a subprocess, on tiny models built offline."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import write_clip_tokenizer

pytest.importorskip("diffusers", reason="needs the [diffusers] extra")
pytestmark = pytest.mark.diffusers

ROOT = Path(__file__).resolve().parents[1]
DREAMBOOTH = ROOT / "examples" / "dreambooth_timestep_scale.py"
RESOLUTION = 32  # images; the tiny VAE halves it once, the tiny UNet sees 16×16 latents


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """A tiny random Stable Diffusion pipeline (UNet, VAE, CLIP text encoder and tokenizer, DDPM) on disk."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    work = tmp_path_factory.mktemp("tiny_sd")
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(work / "clip_tokenizer"), model_max_length=16)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=RESOLUTION,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1,
        clip_sample=False,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    path = work / "pipeline"
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory) -> Path:
    """Four handwritten digits (scikit-learn's 8×8 set), upscaled to RGB PNGs a little larger than RESOLUTION."""
    datasets = pytest.importorskip("sklearn.datasets")
    from PIL import Image

    folder = tmp_path_factory.mktemp("instance")
    digits = datasets.load_digits()
    for i in range(4):
        pixels = (digits.images[i] * (255 / 16)).astype("uint8")
        Image.fromarray(pixels).resize((40, 36), Image.NEAREST).convert("RGB").save(folder / f"digit_{i}.png")
    (folder / "notes.txt").write_text("not an image: the script skips it")
    return folder


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(DREAMBOOTH), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def _summary(stdout: str) -> dict:
    """The JSON summary the script prints last (it starts on a line of its own)."""
    start = stdout.rfind("\n{\n") + 1 if not stdout.startswith("{\n") else 0
    return json.loads(stdout[start:])


def test_dreambooth_help():
    result = _run("--help", timeout=60)
    assert result.returncode == 0, result.stderr
    for option in ("--pretrained_model_name_or_path", "--instance_data_dir", "--instance_prompt", "--bits",
                   "--quant_backend", "--num_experts", "--gradient_checkpointing", "--validation_prompt"):
        assert option in result.stdout
    assert "TimestepScale" in result.stdout


def test_dreambooth_trains_saves_and_generates(tiny_sd_dir, instance_dir, tmp_path):
    from diffusers import UNet2DConditionModel
    from peft import PeftModel
    from safetensors.torch import load_file

    import peft_quant
    from peft_quant.timestep_scale import TimestepScaleLayer

    out = tmp_path / "adapter"
    result = _run(
        "--pretrained_model_name_or_path", str(tiny_sd_dir), "--instance_data_dir", str(instance_dir),
        "--instance_prompt", "a photo of sks dog", "--output_dir", str(out), "--resolution", str(RESOLUTION),
        "--train_batch_size", "4", "--max_train_steps", "3", "--learning_rate", "1e-2", "--bits", "4",
        "--quant_backend", "int", "--num_experts", "2", "--seed", "0", "--gradient_checkpointing",
        "--validation_prompt", "a sks dog", "--validation_inference_steps", "2", "--device", "cpu",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Steps" in result.stderr  # the tqdm progress bar
    summary = _summary(result.stdout)

    # The adapter, with its model card, as PEFT saves it.
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        assert (out / name).is_file(), name
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "TIMESTEP_SCALE" and config["num_experts"] == 2
    assert config["base_model_name_or_path"] == str(tiny_sd_dir)  # diffusers' name, recorded by the tuner
    card = (out / "README.md").read_text()
    assert "TimestepScale" in card
    assert "peft_quant int4" in card  # the base layer format the scales sit on
    assert "UNet2DConditionModel" in card
    assert f'UNet2DConditionModel.from_pretrained("{tiny_sd_dir}", subfolder="unet")' in card  # the loading snippet
    assert 'peft_quant.quantize_model(base, bits=4, backend="int")' in card

    # The summary tells the truth about the saved adapter.
    state = load_file(out / "adapter_model.safetensors")
    assert summary["adapter_bytes"] == (out / "adapter_model.safetensors").stat().st_size
    assert summary["trainable_parameters"] == sum(t.numel() for t in state.values())
    assert summary["steps"] == 3 and math.isfinite(summary["final_loss"]) and summary["final_loss"] > 0
    assert summary["base"] == "UNet2DConditionModel, peft_quant int4"

    # PEFT's own loader puts it back onto a freshly quantized UNet. Training moved the scales away from one, in
    # both experts: 12 timesteps drawn per sample fall on both sides of t = 500 (all on one side: p = 2^-11), and
    # each sample trains its own expert.
    unet = peft_quant.quantize_model(UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet"), bits=4)
    model = PeftModel.from_pretrained(unet, str(out))
    layers = {name: m for name, m in model.named_modules() if isinstance(m, TimestepScaleLayer)}
    assert len(layers) == len(state) // 2 > 20  # every Linear and Conv2d, input and output scales each
    loaded = {n: p.detach() for n, p in model.named_parameters() if ".ts_scale_" in n}
    assert len(loaded) == len(state)
    for key, tensor in state.items():  # saved as "<layer>.ts_scale_in", loaded as "<layer>.ts_scale_in.default"
        assert torch.equal(loaded[f"{key}.default"], tensor), key
    for name, layer in layers.items():
        scales = torch.cat([layer.ts_scale_in["default"], layer.ts_scale_out["default"]], dim=1)  # (experts, in+out)
        assert scales.shape[0] == 2
        for expert, row in enumerate(scales):
            assert not torch.equal(row, torch.ones_like(row)), f"{name}: training left expert {expert} at one"

    # Validation: a PNG generated by the stock pipeline with the adapter loaded into it.
    assert summary["validation_images"] == [str(out / "validation_0.png")]
    from PIL import Image

    with Image.open(out / "validation_0.png") as image:
        assert image.format == "PNG" and image.size == (RESOLUTION, RESOLUTION)
