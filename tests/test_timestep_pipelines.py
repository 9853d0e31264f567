"""TimestepScale inside real diffusers pipelines: Stable Diffusion (UNet, DDIM, classifier-free guidance), Stable
Diffusion 3 (MMDiT, flow matching, float timesteps) and a Flux transformer (fractional timesteps), all tiny, built
from configs, quantized to 4 bits on CPU, nothing downloaded.

Every denoising step must run with the expert of its own timestep, ``k = floor(t·K/T)``: the experts each denoiser
call used are recorded from the router, and the pipeline's output is compared with a hand-run denoising loop and
with a float reference in which each expert's scales are multiplied into the dequantized weights
(``W = diag(s_out[k]) · W_q · diag(s_in[k])``) and the loop picks that float model per step.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from peft_quant import TimestepScaleConfig, load_into_pipeline, quantize_model
from peft_quant.timestep_scale import TimestepScaleLayer
from peft_quant.timestep_scale.model import ROUTER_ATTRIBUTE

from .conftest import write_clip_tokenizer

pytest.importorskip("diffusers", reason="needs the [diffusers] extra")
pytestmark = pytest.mark.diffusers

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a cat and a dog"
STEPS = 4
GUIDANCE = 7.5  # > 1: classifier-free guidance on, the denoiser sees the doubled batch
T = 1000.0
MAX_TOKENS = 16

UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
)
SD3_CONFIG = dict(
    sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
    num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64,
)
FLUX_CONFIG = dict(
    patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: the tiny models gain nothing from two, and results stay bit-identical across processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- tiny components, deterministic from seeds (the fresh-process test rebuilds them) ------------------------------


def clip_tokenizer(folder: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_TOKENS)


def _clip_config(tokenizer, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **extra,
    )


def float_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIG)


def quantized_unet(seed: int = 0):
    """The tiny UNet with every Linear and Conv2d in peft-quant's int4 format (round-to-nearest: deterministic)."""
    return quantize_model(float_unet(seed), bits=4, backend="int")


def sd_pipeline(tokenizer_dir: str, unet: nn.Module | None = None):
    """A stock StableDiffusionPipeline around the tiny quantized UNet (DDIM, no safety checker)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    tokenizer = clip_tokenizer(tokenizer_dir)
    unet = quantized_unet() if unet is None else unet
    torch.manual_seed(1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=16,
        sample_size=16,
    )
    text_encoder = CLIPTextModel(_clip_config(tokenizer))
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_noise() -> torch.Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def run_sd(pipe, noise: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """The pipeline's final latents for PROMPT, from fixed initial noise."""
    noise = sd_noise() if noise is None else noise
    return pipe(
        PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=noise, output_type="latent",
        generator=torch.Generator().manual_seed(0), **kwargs,
    ).images


def _adapter(model: nn.Module, seed: int, **config) -> PeftModel:
    torch.manual_seed(seed)  # init_weights=False: scales uniform in [0.5, 1.5)
    return get_peft_model(model, TimestepScaleConfig(init_weights=False, **config))


# ---- what each denoiser call did --------------------------------------------------------------------------------


def expected_experts(t: torch.Tensor, k: int = 2) -> torch.Tensor:
    """``floor(t·K/T)``, the last expert also taking ``t = T``."""
    return torch.clamp(torch.floor(t.to(torch.float64) * k / T), max=k - 1).long()


class ExpertLog:
    """Records, for every forward of the denoiser under ``peft_model``: its timestep argument, its batch size and the
    experts the router handed its layers (``router.last_experts``, cleared before each call)."""

    def __init__(self, peft_model: PeftModel, adapter: str = "default", argument: str = "timestep") -> None:
        base = peft_model.get_base_model()
        self.router = getattr(base, ROUTER_ATTRIBUTE)
        self.boundaries = peft_model.peft_config[adapter].boundaries
        self.argument = argument
        self.calls: list[dict] = []
        self.handles = [
            base.register_forward_pre_hook(self._before, with_kwargs=True),
            base.register_forward_hook(self._after, with_kwargs=True),
        ]

    def _before(self, module, args, kwargs) -> None:
        self.router.last_experts.clear()
        t = kwargs[self.argument] if self.argument in kwargs else args[1]
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        self.calls.append({"t": torch.as_tensor(t).detach().clone().reshape(-1), "batch": x.shape[0]})

    def _after(self, module, args, kwargs, output) -> None:
        experts = self.router.last_experts.get(self.boundaries)
        self.calls[-1]["experts"] = None if experts is None else experts.clone()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def check(self, timesteps, batch: int, k: int = 2, multiplier: float = 1.0, boundaries=None) -> list[int]:
        """Assert one call per timestep, in order, each on ``batch`` samples routed to the timestep's expert:
        ``floor(t·K/T)``, or with explicit ``boundaries`` the number of boundaries ``≤ t``."""
        assert len(self.calls) == len(timesteps), (len(self.calls), timesteps)
        used = []
        for call, t in zip(self.calls, timesteps):
            assert call["batch"] == batch
            seen = call["t"].double() * multiplier  # what the router reads (exact unless the pipeline divided t)
            assert torch.allclose(seen, t.double(), rtol=1e-6, atol=0) if multiplier != 1 else torch.equal(
                seen, t.double().expand_as(seen)), (call["t"], t)
            if boundaries is None:
                want = expected_experts(t.reshape(1) * torch.ones(batch), k)
            else:
                want = (t.double() >= torch.tensor(boundaries, dtype=torch.float64)).sum().expand(batch)
            assert call["experts"] is not None and torch.equal(call["experts"], want), (t, call["experts"], want)
            used.append(int(want[0]))
        return used


# ---- the float reference ----------------------------------------------------------------------------------------


def float_expert(peft_model: PeftModel, build: Callable[[], nn.Module], k: int, adapter: str = "default") -> nn.Module:
    """A float model computing what expert ``k`` of ``peft_model`` computes, built another way: every adapted layer
    becomes a float layer with weight ``diag(s_out[k]) · dequantize(W_q) · diag(s_in[k])`` and the same bias; every
    other tensor is copied. ``build()`` makes a float model of the same architecture (loaded strictly)."""
    base = peft_model.get_base_model()
    layers = {name: m for name, m in base.named_modules() if isinstance(m, TimestepScaleLayer)}
    assert layers
    source = base.state_dict()
    reference = build()
    state = {}
    for key in reference.state_dict():
        owner, _, leaf = key.rpartition(".")
        if owner not in layers:
            state[key] = source[key]
            continue
        layer = layers[owner]
        quantized = layer.get_base_layer()
        if leaf == "bias":
            state[key] = quantized.bias.detach()
            continue
        weight = quantized.dequantize(torch.float64)
        ones = (1,) * (weight.dim() - 2)
        if adapter in layer.ts_scale_in:
            weight = weight * layer.ts_scale_in[adapter][k].detach().double().view(1, -1, *ones)
        if adapter in layer.ts_scale_out:
            weight = weight * layer.ts_scale_out[adapter][k].detach().double().view(-1, 1, *ones)
        state[key] = weight.float()
    reference.load_state_dict(state, strict=True)
    return reference.eval()


# ---- hand-run denoising loops (what the pipelines' __call__ does, written out) -------------------------------------


@torch.no_grad()
def sd_loop(pipe, noise: torch.Tensor, denoiser_for: Callable[[torch.Tensor], nn.Module]) -> torch.Tensor:
    """DDIM with classifier-free guidance; ``denoiser_for(t)`` is the UNet to call at step ``t``."""
    cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    embeds = torch.cat([uncond, cond])
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        eps = denoiser_for(t)(x, t, encoder_hidden_states=embeds, return_dict=False)[0]
        uncond_eps, cond_eps = eps.chunk(2)
        latents = scheduler.step(uncond_eps + GUIDANCE * (cond_eps - uncond_eps), t, latents, eta=0.0,
                                 return_dict=False)[0]
    return latents


@torch.no_grad()
def sd3_loop(pipe, noise: torch.Tensor, denoiser_for: Callable[[torch.Tensor], nn.Module]) -> torch.Tensor:
    """Flow-matching Euler with classifier-free guidance, as StableDiffusion3Pipeline runs it."""
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPT, None, None, device="cpu")
    embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    latents = noise
    for t in scheduler.timesteps:
        x = torch.cat([latents] * 2)
        velocity = denoiser_for(t)(hidden_states=x, timestep=t.expand(2), encoder_hidden_states=embeds,
                                   pooled_projections=pooled, return_dict=False)[0]
        uncond_v, cond_v = velocity.chunk(2)
        latents = scheduler.step(uncond_v + GUIDANCE * (cond_v - uncond_v), t, latents, return_dict=False)[0]
    return latents


# ---- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    folder = write_clip_tokenizer(tmp_path_factory.mktemp("clip_tokenizer"))
    tokenizer = clip_tokenizer(folder)
    ids = tokenizer(PROMPT).input_ids
    # real BPE merges (cat, and, dog are single tokens), CLIP's special tokens around them
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<|startoftext|>", "a</w>", "cat</w>", "and</w>", "a</w>", "dog</w>", "<|endoftext|>"
    ]
    return folder


@pytest.fixture(scope="module")
def sd(tokenizer_dir, tmp_path_factory):
    """The saved random-scale adapter (K=2) of the quantized UNet, its in-memory original, float references for
    both experts, and the base pipeline's latents."""
    adapted = _adapter(quantized_unet(), seed=10)
    adapter_dir = str(tmp_path_factory.mktemp("sd_adapter"))
    adapted.save_pretrained(adapter_dir)
    experts = [float_expert(adapted, float_unet, k) for k in range(2)]
    base_latents = run_sd(sd_pipeline(tokenizer_dir))
    return dict(adapter=adapted, dir=adapter_dir, experts=experts, base=base_latents)


# ---- 1. Stable Diffusion ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["PeftModel.from_pretrained", "load_into_pipeline"])
def test_sd_pipeline_runs_each_step_with_its_timestep_expert(sd, tokenizer_dir, how):
    pipe = sd_pipeline(tokenizer_dir)
    if how == "load_into_pipeline":
        model = load_into_pipeline(pipe, sd["dir"])
        assert pipe.unet is model
    else:
        pipe.unet = PeftModel.from_pretrained(pipe.unet, sd["dir"])
    assert isinstance(pipe.unet, PeftModel)
    log = ExpertLog(pipe.unet)

    latents = run_sd(pipe)

    # each UNet call: the CFG-doubled batch, the scheduler's timestep, that timestep's expert; both experts used
    timesteps = pipe.scheduler.timesteps
    assert timesteps.tolist() == [751, 501, 251, 1]
    assert log.check(timesteps, batch=2) == [1, 1, 0, 0]
    # the adapter changes the output; a hand-run loop over the same PeftModel gives it bit for bit
    assert (latents - sd["base"]).abs().max() > 0.1
    assert torch.equal(latents, sd_loop(pipe, sd_noise(), lambda t: pipe.unet))
    # the float reference: expert floor(t·K/T) folded into a float UNet, chosen per step
    reference = sd_loop(pipe, sd_noise(), lambda t: sd["experts"][int(expected_experts(t))])
    torch.testing.assert_close(latents, reference, rtol=1e-4, atol=1e-4)
    # ... and the check can fail: the wrong expert per step, or one expert throughout, is far off
    for pick in (lambda t: 1 - int(expected_experts(t)), lambda t: 0, lambda t: 1):
        wrong = sd_loop(pipe, sd_noise(), lambda t: sd["experts"][pick(t)])
        assert (wrong - latents).abs().max() > 1e-2


def test_sd_pipeline_decodes_images_and_disabled_adapter_gives_the_base_output(sd, tokenizer_dir):
    pipe = sd_pipeline(tokenizer_dir)
    load_into_pipeline(pipe, sd["dir"])
    latents = run_sd(pipe)
    images = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=sd_noise(),
                  output_type="np").images
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    expected = pipe.image_processor.postprocess(decoded, output_type="pt").permute(0, 2, 3, 1)
    assert images.shape == (1, 16, 16, 3) and torch.equal(torch.from_numpy(images), expected)
    log = ExpertLog(pipe.unet)
    with pipe.unet.disable_adapter():
        assert torch.equal(run_sd(pipe), sd["base"])
    assert [call["experts"] for call in log.calls] == [None] * STEPS  # no layer asked for an expert
    assert torch.equal(run_sd(pipe), latents)  # enabled again on leaving the context


# ---- 2. Stable Diffusion 3 --------------------------------------------------------------------------------------


def float_sd3(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(**SD3_CONFIG)


def sd3_pipeline(tokenizer_dir: str):
    """StableDiffusion3Pipeline: tiny quantized MMDiT, two tiny CLIP text encoders, no T5 (the pipeline then uses
    zeros for its part of the prompt embedding), a 1-block VAE (latents at the image's resolution)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    tokenizer = clip_tokenizer(tokenizer_dir)
    transformer = quantize_model(float_sd3(), bits=4)
    torch.manual_seed(2)
    encoders = [CLIPTextModelWithProjection(_clip_config(tokenizer, projection_dim=32, hidden_act="gelu"))
                for _ in range(2)]
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1, latent_channels=4,
        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
        scaling_factor=1.5035, sample_size=8,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sd3_pipeline_routes_float_flow_matching_timesteps(tokenizer_dir, tmp_path):
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    def run(pipe):
        return pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=8, width=8, latents=noise,
                    output_type="latent").images

    pipe = sd3_pipeline(tokenizer_dir)
    base = run(pipe)
    adapted = _adapter(quantize_model(float_sd3(), bits=4), seed=11)
    adapted.save_pretrained(tmp_path)
    experts = [float_expert(adapted, float_sd3, k) for k in range(2)]
    load_into_pipeline(pipe, str(tmp_path))
    assert isinstance(pipe.transformer, PeftModel) and pipe.config.transformer == ("diffusers", "SD3Transformer2DModel")
    log = ExpertLog(pipe.transformer)

    latents = run(pipe)

    timesteps = pipe.scheduler.timesteps
    assert timesteps.dtype == torch.float32 and all(t % 1 != 0 for t in timesteps[1:])  # SD3's shifted sigmas · 1000
    assert log.check(timesteps, batch=2) == [1, 1, 1, 0]
    assert (latents - base).abs().max() > 0.1
    assert torch.equal(latents, sd3_loop(pipe, noise, lambda t: pipe.transformer))
    reference = sd3_loop(pipe, noise, lambda t: experts[int(expected_experts(t))])
    torch.testing.assert_close(latents, reference, rtol=1e-4, atol=1e-4)
    wrong = sd3_loop(pipe, noise, lambda t: experts[1 - int(expected_experts(t))])
    assert (wrong - latents).abs().max() > 1e-2


# ---- 3. Flux: the transformer takes t / 1000 --------------------------------------------------------------------


def float_flux(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**FLUX_CONFIG)


def test_flux_transformer_routes_fractional_timesteps_to_the_expert_of_t():
    model = _adapter(quantize_model(float_flux(), bits=4), seed=12)
    assert getattr(model.get_base_model(), ROUTER_ATTRIBUTE).multiplier == 1000.0  # the Flux default
    experts = [float_expert(model, float_flux, k) for k in range(2)]
    log = ExpertLog(model)
    g = torch.Generator().manual_seed(4)
    inputs = dict(
        hidden_states=torch.randn(2, 16, 4, generator=g), encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
        pooled_projections=torch.randn(2, 32, generator=g), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3),
        return_dict=False,
    )
    with torch.no_grad():
        # FluxPipeline passes timestep = t.expand(batch).to(latents.dtype) / 1000
        for t in (0.0, 250.0, 499.0, 500.0, 750.0, 1000.0):
            out = model(timestep=torch.full((2,), t) / 1000, **inputs)[0]
            k = int(expected_experts(torch.tensor(t)))
            torch.testing.assert_close(out, experts[k](timestep=torch.full((2,), t) / 1000, **inputs)[0],
                                       rtol=1e-4, atol=1e-5)
            assert (out - experts[1 - k](timestep=torch.full((2,), t) / 1000, **inputs)[0]).abs().max() > 1e-2
        # one batch, two timesteps: each sample with its own expert
        mixed = torch.tensor([300.0, 800.0]) / 1000
        out = model(timestep=mixed, **inputs)[0]
        for i, k in enumerate((0, 1)):
            torch.testing.assert_close(out[i], experts[k](timestep=mixed, **inputs)[0][i], rtol=1e-4, atol=1e-5)
    mixed_call = log.calls.pop()
    assert torch.equal(mixed_call["experts"], torch.tensor([0, 1]))
    assert log.check([torch.tensor(t) for t in (0.0, 250.0, 499.0, 500.0, 750.0, 1000.0)], batch=2,
                     multiplier=1000.0) == [0, 0, 0, 1, 1, 1]


# ---- 4. a fresh process -----------------------------------------------------------------------------------------


def test_fresh_process_reload_gives_bit_identical_pipeline_output(sd, tokenizer_dir, tmp_path):
    """Another Python process rebuilds the quantized UNet and the pipeline from the same seeds, loads the adapter
    with ``import peft_quant; PeftModel.from_pretrained``, and must reproduce the base and adapted latents exactly."""
    pipe = sd_pipeline(tokenizer_dir)
    pipe.unet = PeftModel.from_pretrained(pipe.unet, sd["dir"])
    expected = run_sd(pipe)
    unet_inputs = dict(sample=torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)),
                       timestep=torch.tensor([100, 900]), encoder_hidden_states=torch.randn(2, MAX_TOKENS, 32))
    with torch.no_grad():
        expected_unet = pipe.unet(**unet_inputs, return_dict=False)[0]  # two timesteps, two experts in one batch
    save_file(unet_inputs, str(tmp_path / "in.safetensors"))
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        torch.set_num_threads(1)
        import peft_quant
        from peft import PeftModel
        from safetensors.torch import load_file, save_file
        from tests.test_timestep_pipelines import run_sd, sd_pipeline
        pipe = sd_pipeline({tokenizer_dir!r})
        base = run_sd(pipe)
        pipe.unet = PeftModel.from_pretrained(pipe.unet, {sd["dir"]!r})
        inputs = load_file({str(tmp_path / "in.safetensors")!r})
        with torch.no_grad():
            unet = pipe.unet(**inputs, return_dict=False)[0]
        save_file({{"base": base, "adapted": run_sd(pipe), "unet": unet}}, {str(tmp_path / "out.safetensors")!r})
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = load_file(str(tmp_path / "out.safetensors"))
    assert torch.equal(out["base"], sd["base"])  # the same quantized UNet and pipeline
    assert torch.equal(out["adapted"], expected)
    assert torch.equal(out["unet"], expected_unet)


# ---- 5. the wrapped denoiser as a pipeline component -------------------------------------------------------------


def test_pipeline_bookkeeping_device_dtype_and_derived_pipelines(sd, tokenizer_dir):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    pipe = sd_pipeline(tokenizer_dir)
    model = load_into_pipeline(pipe, sd["dir"])
    # DiffusionPipeline.__setattr__ registered the wrapped module under its real class; config reads go through
    assert pipe.config.unet == ("diffusers", "UNet2DConditionModel")
    assert pipe.components["unet"] is model and pipe.unet.config.in_channels == 4
    assert pipe.to("cpu") is pipe and pipe.unet is model and pipe.device.type == "cpu"
    latents = run_sd(pipe)

    # a pipeline made from this one shares the wrapped UNet and routes its own (shorter) schedule
    same = StableDiffusionPipeline.from_pipe(pipe)
    assert same.unet is model
    assert torch.equal(run_sd(same), latents)
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    assert img2img.unet is model and img2img.config.unet == ("diffusers", "UNet2DConditionModel")
    log = ExpertLog(model)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    img2img(PROMPT, image=image, strength=0.75, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
            output_type="latent", generator=torch.Generator().manual_seed(0))
    assert img2img.scheduler.timesteps[-3:].tolist() == [501, 251, 1]
    assert log.check(img2img.scheduler.timesteps[-3:], batch=2) == [1, 0, 0]
    log.remove()

    # pipe.to(dtype) reaches the scales inside the PeftModel; the float64 run agrees with the float32 one
    pipe.to(torch.float64)
    scales = [p for n, p in model.named_parameters() if "ts_scale" in n]
    assert scales and all(p.dtype == torch.float64 for p in scales)
    latents64 = run_sd(pipe, noise=sd_noise().double())
    assert latents64.dtype == torch.float64
    torch.testing.assert_close(latents64.float(), latents, rtol=1e-4, atol=1e-4)


def test_loading_again_under_the_same_name_replaces_the_adapter(sd, tokenizer_dir, tmp_path):
    """A second ``load_into_pipeline`` with the same adapter name must give what that adapter gives alone: its
    scales *and* its config (here other expert boundaries). PEFT's ``load_adapter`` alone would keep the old
    config and overwrite only the tensors."""
    other = str(tmp_path / "boundary600")
    _adapter(quantized_unet(), seed=20, expert_boundaries=[600.0]).save_pretrained(other)
    alone = sd_pipeline(tokenizer_dir)
    load_into_pipeline(alone, other)
    expected = run_sd(alone)

    pipe = sd_pipeline(tokenizer_dir)
    first = load_into_pipeline(pipe, sd["dir"])
    model = load_into_pipeline(pipe, other)
    assert model is first and list(model.peft_config) == ["default"]
    assert model.peft_config["default"].boundaries == (600.0,)
    log = ExpertLog(model)
    assert torch.equal(run_sd(pipe), expected)
    assert log.check(pipe.scheduler.timesteps, batch=2, boundaries=[600.0]) == [1, 0, 0, 0]  # 501 < 600: expert 0
    log.remove()

    assert not any(p.requires_grad for p in model.parameters())  # frozen, as PeftModel.from_pretrained leaves it

    # a failed load leaves the adapter that was there in place: no adapter at that path, or one that does not fit
    truncated = tmp_path / "truncated"
    shutil.copytree(other, truncated)
    tensors = load_file(str(truncated / "adapter_model.safetensors"))
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(truncated / "adapter_model.safetensors"))
    cases = ((tmp_path / "missing", "adapter_config.json"), (truncated, "conv_in.ts_scale_in.*missing from the"))
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            load_into_pipeline(pipe, str(bad))
        assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
        assert model.peft_config["default"].boundaries == (600.0,)
        assert not any(p.requires_grad for p in model.parameters())
        assert torch.equal(run_sd(pipe), expected)

    # a second name adds an adapter next to the first and activates it
    load_into_pipeline(pipe, sd["dir"], adapter_name="second")
    assert model.active_adapters == ["second"]
    reference = sd_pipeline(tokenizer_dir)
    load_into_pipeline(reference, sd["dir"])
    assert torch.equal(run_sd(pipe), run_sd(reference))


def test_load_into_pipeline_without_a_denoiser_names_the_fix(sd):
    class NoDenoiser:
        unet = None
        text_encoder = nn.Linear(2, 2)

    with pytest.raises(ValueError, match="has no denoiser in unet or transformer.*PeftModel.from_pretrained"):
        load_into_pipeline(NoDenoiser(), sd["dir"])
