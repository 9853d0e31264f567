"""DreamBooth on a quantized Stable Diffusion UNet with TimestepScale (TuneQDM): train only per-channel scales.

A simplified take on diffusers' ``examples/dreambooth/train_dreambooth.py`` (no prior preservation, no text encoder
training, no accelerate): the UNet's Linear and Conv2d layers are quantized in place with
``peft_quant.quantize_model`` (4 or 8 bits, peft-quant's integer format or bitsandbytes), then wrapped with
``TimestepScaleConfig`` so each layer computes ``y = s_out[k] ⊙ W_q(s_in[k] ⊙ x) + b`` with ``K`` timestep experts.
The VAE and the text encoder stay frozen in float. Training uses the standard noise-prediction loss with a random
timestep per sample; a batch may mix timesteps of several experts (TimestepScale routes each sample to its own).

The adapter (``adapter_config.json``, ``adapter_model.safetensors`` and a ``README.md`` model card) is saved to
``--output_dir``. With ``--validation_prompt`` the stock ``StableDiffusionPipeline`` is then loaded afresh, its UNet
quantized the same way, the saved adapter loaded with ``peft_quant.load_into_pipeline``, and images are written as
PNG files into ``--output_dir``. A JSON summary goes to stdout at the end. Runs on CPU; uses CUDA when available.

Data parallel: ``torchrun --nproc_per_node 2 examples/dreambooth_timestep_scale.py ...`` (or ``accelerate launch``)
runs one process per GPU (gloo over CPU processes without one). ``--train_batch_size`` is per process: every rank draws
the whole global batch (images, noise, timesteps) from the same seeded generators and trains on its own share,
DistributedDataParallel averages the gradients, so the ranks train what one process trains on the whole batch, each
sample routed to its own timestep expert on its rank. Only the first process saves, validates and prints.

Example::

    python examples/dreambooth_timestep_scale.py \\
        --pretrained_model_name_or_path ./stable-diffusion-v1-5 --instance_data_dir ./dog \\
        --instance_prompt "a photo of sks dog" --output_dir out/dreambooth-ts --resolution 512 \\
        --train_batch_size 1 --max_train_steps 400 --bits 4 --gradient_checkpointing \\
        --validation_prompt "a photo of sks dog in a bucket"
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from tqdm.auto import tqdm

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="The UNet is quantized on the fly from the float checkpoint (it works without a GPU); load the adapter "
        "later onto a UNet quantized with the same --bits and --quant_backend.",
    )
    model = parser.add_argument_group("model and data")
    model.add_argument("--pretrained_model_name_or_path", required=True,
                       help="local Stable Diffusion pipeline directory (unet, vae, text_encoder, tokenizer and "
                       "scheduler subfolders), or a Hub id already in the local cache")
    model.add_argument("--revision", default=None, help="revision of the pretrained model")
    model.add_argument("--instance_data_dir", required=True, help="folder with the images of the subject")
    model.add_argument("--instance_prompt", required=True,
                       help='prompt naming the subject with its identifier, e.g. "a photo of sks dog"')
    model.add_argument("--output_dir", default="out/dreambooth-timestep-scale",
                       help="where the adapter, its model card and validation images are written "
                       "(default: %(default)s)")
    model.add_argument("--resolution", type=int, default=512,
                       help="training (and validation) image size, a multiple of 8; images are resized and "
                       "cropped to it (default: %(default)s)")
    model.add_argument("--center_crop", action="store_true", help="crop images at the center instead of at random")
    model.add_argument("--random_flip", action="store_true", help="flip training images horizontally at random")

    quant = parser.add_argument_group("quantization and adapter")
    quant.add_argument("--bits", type=int, choices=(4, 8), default=4,
                       help="weight bits of the UNet's layers (default: %(default)s)")
    quant.add_argument("--quant_backend", choices=("int", "bitsandbytes"), default="int",
                       help="int: peft-quant's per-output-channel integer format (TuneQDM's base); bitsandbytes: "
                       "Linear4bit (nf4) / Linear8bitLt for Linear layers, Conv2d layers in the int format "
                       "(default: %(default)s)")
    quant.add_argument("--num_experts", type=int, default=2,
                       help="timestep experts K, each a set of scales for 1/K of the timesteps "
                       "(default: %(default)s, the paper's best)")

    train = parser.add_argument_group("training")
    train.add_argument("--train_batch_size", type=int, default=1,
                       help="images per micro-batch and process (default: %(default)s)")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1,
                       help="micro-batches whose gradients are averaged into each optimizer step "
                       "(default: %(default)s)")
    train.add_argument("--max_train_steps", type=int, default=400, help="optimizer steps (default: %(default)s)")
    train.add_argument("--learning_rate", type=float, default=1e-4,
                       help="AdamW learning rate of the scales, no weight decay (default: %(default)s)")
    train.add_argument("--gradient_checkpointing", action="store_true",
                       help="recompute UNet activations in backward to save memory (slower)")
    train.add_argument("--seed", type=int, default=0,
                       help="seed of data order, noise, timesteps and validation (default: %(default)s)")
    train.add_argument("--device", default=None,
                       help="torch device, e.g. cpu or cuda:1 (default: cuda if available, else cpu)")

    val = parser.add_argument_group("validation")
    val.add_argument("--validation_prompt", default=None,
                     help="if given, generate images with the saved adapter after training")
    val.add_argument("--num_validation_images", type=int, default=1,
                     help="images generated for the prompt (default: %(default)s)")
    val.add_argument("--validation_inference_steps", type=int, default=25,
                     help="denoising steps per image (default: %(default)s)")
    val.add_argument("--validation_guidance_scale", type=float, default=7.5,
                     help="classifier-free guidance scale (default: %(default)s)")

    args = parser.parse_args(argv)
    if args.resolution <= 0 or args.resolution % 8:
        parser.error(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "num_experts",
                 "num_validation_images", "validation_inference_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not os.path.isdir(args.instance_data_dir):
        parser.error(f"--instance_data_dir {args.instance_data_dir!r} is not a directory")
    return args


class DreamBoothDataset(Dataset):
    """The instance images, resized, cropped and scaled to ``[-1, 1]``, each with the tokenized instance prompt."""

    def __init__(self, data_dir: str, resolution: int, center_crop: bool, random_flip: bool) -> None:
        self.paths = sorted(p for p in Path(data_dir).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.paths:
            raise ValueError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found in {data_dir!r}.")
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = ImageOps.exif_transpose(Image.open(self.paths[index])).convert("RGB")
        size = self.resolution
        scale = size / min(image.size)  # shorter side to `size`
        image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                             Image.BILINEAR)
        if self.center_crop:
            left, top = (image.width - size) // 2, (image.height - size) // 2
        else:
            left, top = random.randint(0, image.width - size), random.randint(0, image.height - size)
        image = image.crop((left, top, left + size, top + size))
        if self.random_flip and random.random() < 0.5:
            image = ImageOps.mirror(image)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)  # (size, size, 3)
        return pixels.permute(2, 0, 1)  # (3, size, size)


def batches(dataset: Dataset, batch_size: int, generator: torch.Generator):
    """Endless batches of exactly ``batch_size`` images: a fresh permutation each pass over the dataset."""
    order: list[int] = []
    while True:
        while len(order) < batch_size:
            order += torch.randperm(len(dataset), generator=generator).tolist()
        chosen, order = order[:batch_size], order[batch_size:]
        yield torch.stack([dataset[i] for i in chosen])


def encode_latents(vae, pixels: torch.Tensor, rows: slice, generator: torch.Generator) -> torch.Tensor:
    """A sample of the VAE's latent distribution for ``pixels[rows]``: what ``latent_dist.sample(generator)`` gives
    for the whole of ``pixels``, restricted to ``rows`` (the noise is drawn for all rows, only ``rows`` are encoded)."""
    from diffusers.utils.torch_utils import randn_tensor

    posterior = vae.encode(pixels[rows]).latent_dist
    shape = (pixels.shape[0], *posterior.mean.shape[1:])
    draw = randn_tensor(shape, generator=generator, device=posterior.parameters.device,
                        dtype=posterior.parameters.dtype)
    return posterior.mean + posterior.std * draw[rows]


def load_components(args: argparse.Namespace):
    """Tokenizer, text encoder, VAE, UNet and noise scheduler of the pipeline, in float32."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path, revision = args.pretrained_model_name_or_path, args.revision
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=revision)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", revision=revision)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=revision)
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)
    return tokenizer, text_encoder, vae, unet, scheduler


@torch.no_grad()
def encode_prompt(tokenizer, text_encoder, prompt: str, device: torch.device) -> torch.Tensor:
    """The text encoder's last hidden state for ``prompt``: ``(1, tokens, dim)``, what the UNet cross-attends to."""
    ids = tokenizer(prompt, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(device))[0]


def quantize_unet(unet, args: argparse.Namespace):
    import peft_quant

    return peft_quant.quantize_model(unet, bits=args.bits, backend=args.quant_backend)


def generate_validation_images(args: argparse.Namespace, device: torch.device) -> list[str]:
    """A fresh stock pipeline, its UNet quantized as in training, the saved adapter loaded into it; PNGs saved."""
    from diffusers import StableDiffusionPipeline

    import peft_quant

    pipe = StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path, revision=args.revision, safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.unet = quantize_unet(pipe.unet.to(device), args)  # on the device first: bitsandbytes quantizes there
    peft_quant.load_into_pipeline(pipe, args.output_dir)
    pipe.to(device)
    pipe.set_progress_bar_config(desc="Validation")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    with torch.no_grad():
        images = pipe(
            args.validation_prompt, height=args.resolution, width=args.resolution,
            num_inference_steps=args.validation_inference_steps, guidance_scale=args.validation_guidance_scale,
            num_images_per_prompt=args.num_validation_images, generator=generator,
        ).images
    paths = []
    for i, image in enumerate(images):
        path = os.path.join(args.output_dir, f"validation_{i}.png")
        image.save(path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    from diffusers.utils import logging as diffusers_logging
    from peft import get_peft_model, get_peft_model_state_dict
    from torch.nn.parallel import DistributedDataParallel
    from transformers.utils import logging as transformers_logging

    import data_parallel
    import peft_quant
    from peft_quant.timestep_scale import TimestepScaleLayer

    # bitsandbytes' int8 matmul casts float32 inputs to float16, and warns about it at every call.
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt: inputs will be cast.*")
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    device = data_parallel.local_device(args.device)
    created_group = data_parallel.join_process_group(device)
    world, main_process = data_parallel.world_size(), data_parallel.rank() == 0
    global_batch = args.train_batch_size * world
    rows = data_parallel.local_rows(global_batch)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)

    tokenizer, text_encoder, vae, unet, noise_scheduler = load_components(args)
    for frozen in (text_encoder, vae, unet):
        frozen.requires_grad_(False)
    text_encoder.to(device).eval()
    vae.to(device).eval()

    # The prompt never changes: encode it once and drop the text encoder.
    prompt_embeds = encode_prompt(tokenizer, text_encoder, args.instance_prompt, device)
    del text_encoder

    # Quantize on the device (bitsandbytes quantizes when a weight is moved to its device), then wrap.
    unet = quantize_unet(unet.to(device), args)
    if args.gradient_checkpointing:
        # TimestepScale's router wraps diffusers' checkpointing functions, so blocks replayed in backward still
        # route each sample to its own timestep expert.
        unet.enable_gradient_checkpointing()
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    config = peft_quant.TimestepScaleConfig(num_experts=args.num_experts, num_train_timesteps=num_train_timesteps)
    model = get_peft_model(unet, config)
    denoiser_class = type(unet).__name__
    base_formats = sorted({m.base_format.label for m in model.modules() if isinstance(m, TimestepScaleLayer)})
    trainable = [p for p in model.parameters() if p.requires_grad]
    num_trainable = sum(p.numel() for p in trainable)
    # No weight decay: the scales start at one, and decay would pull them towards zero.
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=0.0)

    dataset = DreamBoothDataset(args.instance_data_dir, args.resolution, args.center_crop, args.random_flip)
    stream = batches(dataset, global_batch, torch.Generator().manual_seed(args.seed))
    noise_generator = torch.Generator(device=device).manual_seed(args.seed)
    scaling_factor = vae.config.scaling_factor
    shift_factor = getattr(vae.config, "shift_factor", None) or 0.0
    prediction_type = noise_scheduler.config.prediction_type

    model.train()
    trained = DistributedDataParallel(model) if world > 1 else model  # averages the gradients over the ranks
    losses: list[float] = []
    start = time.perf_counter()
    progress = tqdm(range(args.max_train_steps), desc="Steps", unit="step", disable=not main_process)
    for _ in progress:
        step_loss = torch.zeros((), dtype=torch.float64, device=device)
        for micro_step in range(args.gradient_accumulation_steps):
            pixels = next(stream).to(device)  # the global batch: each rank encodes and trains its own rows
            with torch.no_grad():
                latents = encode_latents(vae, pixels, rows, noise_generator)
                latents = (latents - shift_factor) * scaling_factor
            noise = torch.randn((global_batch, *latents.shape[1:]), generator=noise_generator, device=device)[rows]
            bsz = latents.shape[0]
            # One timestep per sample: the batch may span several experts, each sample uses its own scales.
            timesteps = torch.randint(0, num_train_timesteps, (global_batch,), generator=noise_generator,
                                      device=device)[rows]
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            if prediction_type == "epsilon":
                target = noise
            elif prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                raise ValueError(f"Unsupported prediction_type {prediction_type!r} in the scheduler config.")
            last_micro_step = micro_step == args.gradient_accumulation_steps - 1
            # DDP averages the gradients once per optimizer step, in the backward of its last micro-batch
            with trained.no_sync() if world > 1 and not last_micro_step else contextlib.nullcontext():
                model_pred = trained(noisy_latents, timesteps,
                                     encoder_hidden_states=prompt_embeds.expand(bsz, -1, -1)).sample
                loss = F.mse_loss(model_pred.float(), target.float()) / args.gradient_accumulation_steps
                loss.backward()
            step_loss += loss.detach().double()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_loss = data_parallel.mean_over_ranks(step_loss).item()  # the global batch's loss, on every rank
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"The loss became {step_loss} at step {len(losses) + 1}; lower --learning_rate.")
        losses.append(step_loss)
        progress.set_postfix(loss=f"{step_loss:.4f}")
    progress.close()
    train_seconds = time.perf_counter() - start

    ranks = data_parallel.ranks_report(get_peft_model_state_dict(model, save_embedding_layers=False))
    if created_group:
        torch.distributed.destroy_process_group()
    if not main_process:
        return ranks
    # adapter_config.json, adapter_model.safetensors and the README.md card (no embedding layer is ever adapted)
    model.save_pretrained(args.output_dir, save_embedding_layers=False)
    adapter_file = os.path.join(args.output_dir, "adapter_model.safetensors")
    del trained, model, unet, optimizer, vae
    if device.type == "cuda":
        torch.cuda.empty_cache()

    validation = generate_validation_images(args, device) if args.validation_prompt else []
    tail = losses[-10:]
    summary = {
        "base": f"{denoiser_class}, {', '.join(base_formats)}",
        "device": str(device),
        "num_experts": args.num_experts,
        "trainable_parameters": num_trainable,
        "adapter_bytes": os.path.getsize(adapter_file),
        "steps": args.max_train_steps,
        "images_per_step": global_batch * args.gradient_accumulation_steps,
        "final_loss": round(losses[-1], 6),
        "mean_loss_last_10_steps": round(sum(tail) / len(tail), 6),
        "train_seconds": round(train_seconds, 2),
        "total_seconds": round(time.perf_counter() - started, 2),
        "output_dir": args.output_dir,
        "validation_images": validation,
        **ranks,
    }
    print(json.dumps(summary, indent=2), flush=True)
    return summary


if __name__ == "__main__":
    main()
