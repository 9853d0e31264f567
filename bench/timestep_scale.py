"""Benchmark: TimestepScale (TuneQDM) against PEQA, LoRA and full fine-tuning, personalizing a 4-bit denoiser on CPU.

Why: TimestepScale trains per-channel input and output scales of each quantized layer, with K timestep experts;
PEQA trains output scales only, with one expert. On the same int4 base both must cost a few thousand parameters
and no float copy of a weight, and the question is how close they get to full-precision fine-tuning and to LoRA.

Task: a tiny diffusers ``UNet2DModel`` (8×8, 1 channel; ε-prediction, ``DDPMScheduler`` with 1000 steps) is
pre-trained here, in float32, on ``sklearn.datasets.load_digits`` scaled to [-1, 1] without one digit class
(``--target``, default 3). It is then personalized DreamBooth-style to that class from a few of its images (12 by
default): the usual denoising loss on those images only. Methods:

* full fine-tuning: every weight of the float32 denoiser (not quantized);
* PEQA: ``TimestepScaleConfig(num_experts=1, train_input_scales=False)``, output scales only, on the int4 base;
* TimestepScale: ``TimestepScaleConfig(num_experts=2)``, input and output scales, two timestep experts, int4 base;
* LoRA: PEFT's ``LoraConfig`` on the same int4 base. PEFT's LoRA refuses peft-quant's ``IntLinear`` and
  ``IntConv2d``; its experimental custom-layer API (``LoraConfig._register_custom_module``) maps ``IntLinear`` to
  PEFT's own ``lora.Linear``, which works on it as is, and ``IntConv2d`` to :class:`LoraIntConv2d` below, a
  copy of ``lora.Conv2d``'s maths (A: conv with the base kernel, stride, padding and dilation; B: 1×1 conv; A
  Kaiming-uniform, B zero; scaling alpha / r), needed because ``lora.Conv2d`` reads ``base_layer.weight`` and
  builds A and B as ``type(base_layer)``, which an integer layer is not. Rank: the one whose trainable parameters
  come closest to TimestepScale's; alpha = 2·rank.

The int4 base is ``peft_quant.quantize_model(unet, bits=4, backend="int")`` (per-output-channel asymmetric RTN) of
every Linear and Conv2d; adapters target every Linear and Conv2d. Reference rows: the pre-trained float32 and int4
denoisers with no tuning.

Fairness: every run starts from the same pre-trained weights and gets the same training batches (images, noise,
timesteps) in the same order, the same seed, the same steps and AdamW with the same learning-rate grid. Each
method's learning rate is picked on a validation criterion that does not use the classifier: the denoising loss on
held-out images of the target class at fixed noise and timesteps (lowest wins). All runs train interleaved, one
step each in rotating order, so that load from other processes falls on all methods alike.

Measurements:

* quality: N samples per method from the same DDPM ancestral sampling (``--sample-steps`` inference steps, the
  same initial and per-step noise for every method), classified by an RBF SVM trained here on all ten classes of
  the real digits (its 5-fold cross-validated accuracy is printed). Reported: the share classified as the target
  digit; diversity as the mean pairwise L2 distance between the samples classified as the target (pixels on the
  data set's 0-16 scale), beside the same statistic on held-out real target digits; memorisation as the mean L2
  distance from those samples to the nearest personalization image, beside the same for held-out real target
  digits. Per learning rate, the target share and diversity of a separate, smaller sample set (another seed) are
  printed as a diagnostic, to show the share/diversity trade-off along the grid; they are not used to pick anything.
* peak tensor memory: the exact peak of the bytes held by tensors during a run's first two training steps
  (forward, backward, AdamW update; the first creates the optimizer state, the second runs with it), counted by a
  ``TorchDispatchMode`` that sees every tensor torch's operators create (activations, gradients, optimizer state,
  temporaries such as a dequantized weight) until it is freed, plus the weights held. Independent of the allocator:
  the number a GPU's ``max_memory_allocated`` would give. Reported for the picked run (it does not depend on lr).
* step memory (RSS): as in ``bench/qoft.py``, the peak resident memory during a run's first training step above
  the resident memory just before it; the peak is read from ``VmHWM`` after resetting it through
  ``/proc/self/clear_refs``. For RSS to follow live memory the script re-executes itself with
  ``MALLOC_MMAP_THRESHOLD_=65536``; pre-training runs in a child process with glibc's default settings (for speed,
  and because a heap grown by pre-training in this process would serve later allocations unseen by RSS;
  ``mallopt`` and ``malloc_trim`` afterwards did not undo that). A dry forward and backward per method runs first.
  Reported: the median over a method's learning rates, and the range, which shows the noise. On a model this
  small most weights, gradients and optimizer moments are below 64 KiB and come from glibc's heap, which reuses
  memory freed earlier (by the dry run, say) without RSS growing: read this column as a lower bound.
* saved for backward: the bytes of the tensors autograd keeps for backward (parameters and buffers excluded),
  counted exactly with ``torch.autograd.graph.saved_tensors_hooks`` in that dry run.
* weights held: the bytes of all parameters and buffers of the trained model as stored (int4 codes, scales and
  zeros, frozen float biases and norms, adapters); grads + AdamW: 12 bytes per trainable parameter (float32
  gradient and two moments).
* adapter on disk: ``save_pretrained`` into a temporary directory; the weights file and all files (config and the
  model card included). Full fine-tuning: the float32 state dict in one safetensors file.
* step time: median wall time of the training steps after the first two (which are measured), pooled over the
  learning-rate grid, with the allocator back to glibc's usual settings after the first round (see
  ``bench/qoft.py``). torch runs on one thread by default (``--threads``): on the shared 2-core machine, two
  threads made steps erratic and many times slower.
"""

from __future__ import annotations

import os
import sys

MMAP_THRESHOLD = 64 * 1024
PRETRAIN_FLAG = "--pretrain-into"  # the pre-training subprocess: glibc's default allocator, no re-execution


def _reexec_with_allocator_settings() -> None:
    """Restart this script with glibc's mmap threshold at 64 KiB: it must be set before the process starts."""
    if PRETRAIN_FLAG in sys.argv:
        return
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != str(MMAP_THRESHOLD):
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), HF_HUB_OFFLINE="1")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


if __name__ == "__main__":
    _reexec_with_allocator_settings()

import argparse  # noqa: E402
import copy  # noqa: E402
import ctypes  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
import weakref  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from peft.tuners.lora.layer import LoraLayer  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

T_TRAIN = 1000
LR_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
QUICK_LR_GRID = (3e-3,)
METHODS = ("full fine-tuning", "PEQA", "TimestepScale", "LoRA")
OURS = "TimestepScale"
UNET_CONFIG = dict(
    sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8, attention_head_dim=8,
)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


# ---- measuring (as in bench/qoft.py) -----------------------------------------------------------------------------


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; return that RSS in KiB."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _status_kib("VmRSS")


def peak_rss() -> int:
    return _status_kib("VmHWM")


def allocator_for_speed() -> None:
    """Serve allocations below 32 MiB from the heap and keep freed memory, as glibc's default settles to."""
    libc = ctypes.CDLL("libc.so.6")
    if not (libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20) and libc.mallopt(M_TRIM_THRESHOLD, 64 * 2**20)):
        raise RuntimeError("glibc's mallopt failed")


def cpu_model() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


class TensorMemoryTracker(TorchDispatchMode):
    """Exact bytes of the tensors created by torch operators while the mode is active, and their peak.

    Every operator output whose storage is not one of the operator's inputs (views and in-place results are not
    new) is counted until its storage is freed (a weak reference's callback). Autograd's backward and the optimizer
    run through the same operators, so activations, gradients, optimizer state and temporaries (such as a
    dequantized weight) are all seen; tensors that existed before (weights) are not.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in inputs and id(storage) not in self.live and storage.nbytes():
                    self._add(storage)
        return out

    def _add(self, storage: torch.UntypedStorage) -> None:
        key, size = id(storage), storage.nbytes()

        def freed(_ref, key=key, size=size) -> None:
            if self.live.pop(key, None) is not None:
                self.current -= size

        self.live[key] = weakref.ref(storage, freed)
        self.current += size
        self.peak = max(self.peak, self.current)


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` as stored (each storage once)."""
    storages = {}
    for t in (*model.parameters(), *model.buffers()):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


# ---- data and classifier -----------------------------------------------------------------------------------------


@dataclass
class Data:
    pretrain: torch.Tensor  # (n, 1, 8, 8) in [-1, 1]: every class but the target
    personal: torch.Tensor  # the few target-class images of personalization
    val: torch.Tensor  # held-out target-class images: learning-rate selection
    reference: torch.Tensor  # held-out target-class images: the real statistics quality is compared with
    reference_share: float  # share of ``reference`` the classifier (out of fold) calls the target
    classifier: object
    classifier_accuracy: float


def to_unit(pixels: np.ndarray) -> torch.Tensor:
    """load_digits' 0..16 pixels → (n, 1, 8, 8) float32 in [-1, 1]."""
    return torch.from_numpy(pixels.astype(np.float32) / 8.0 - 1.0).reshape(-1, 1, 8, 8)


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """(n, 1, 8, 8) in [-1, 1] → (n, 64) on the data set's 0..16 scale, clipped."""
    return ((images.reshape(len(images), -1).clamp(-1, 1) + 1) * 8.0).double().numpy()


def make_data(args, with_classifier: bool = True) -> Data:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.svm import SVC

    digits = load_digits()
    pixels, labels = digits.data, digits.target
    rng = np.random.default_rng(args.seed)
    target = rng.permutation(np.flatnonzero(labels == args.target))
    personal, val = target[:args.images], target[args.images:args.images + args.val_images]
    reference = target[args.images + args.val_images:]

    classifier, predicted = None, labels
    if with_classifier:
        classifier = SVC(gamma=0.001, C=10.0)
        folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=args.seed)
        predicted = cross_val_predict(classifier, pixels, labels, cv=folds)
        classifier.fit(pixels, labels)
    return Data(
        pretrain=to_unit(pixels[labels != args.target]), personal=to_unit(pixels[personal]), val=to_unit(pixels[val]),
        reference=to_unit(pixels[reference]), reference_share=float(np.mean(predicted[reference] == args.target)),
        classifier=classifier, classifier_accuracy=float(np.mean(predicted == labels)),
    )


# ---- denoiser ----------------------------------------------------------------------------------------------------


def new_scheduler(num_inference_steps: int | None = None):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=T_TRAIN)
    if num_inference_steps:
        scheduler.set_timesteps(num_inference_steps)
    return scheduler


def denoising_loss(model: nn.Module, scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ε-prediction MSE; ``model`` is called as a module with ``timestep``, as TimestepScale's router needs."""
    return F.mse_loss(model(scheduler.add_noise(x0, noise, t), t).sample, noise)


def pretrain(data: Data, args):
    """The float32 denoiser, trained on every digit class but the target."""
    from diffusers import UNet2DModel

    torch.manual_seed(args.seed)
    model = UNet2DModel(**UNET_CONFIG)
    scheduler = new_scheduler()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, weight_decay=0.0)
    lr_at = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.pretrain_lr, total_steps=args.pretrain_steps,
                                                pct_start=0.05)
    generator = torch.Generator().manual_seed(args.seed + 1)
    started, losses = time.perf_counter(), []
    for step in range(args.pretrain_steps):
        index = torch.randint(len(data.pretrain), (args.pretrain_batch,), generator=generator)
        noise = torch.randn(args.pretrain_batch, 1, 8, 8, generator=generator)
        t = torch.randint(T_TRAIN, (args.pretrain_batch,), generator=generator)
        loss = denoising_loss(model, scheduler, data.pretrain[index], noise, t)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr_at.step()
        losses.append(loss.item())
        if (step + 1) % 250 == 0 or step + 1 == args.pretrain_steps:
            print(f"  pre-training step {step + 1}/{args.pretrain_steps}: loss {statistics.mean(losses[-100:]):.4f}",
                  flush=True)
    args.pretrain_seconds = time.perf_counter() - started
    return model.eval().requires_grad_(False)


def pretrain_in_subprocess(args):
    """Pre-train in a child process with glibc's default allocator (this one serves every allocation of 64 KiB or
    more from mmap, about 2x slower, and a heap grown here would hide later allocations from RSS); the weights come
    back through a temporary directory."""
    import subprocess

    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "denoiser.safetensors")
        command = [sys.executable, os.path.abspath(__file__), PRETRAIN_FLAG, path, "--seed", str(args.seed),
                   "--target", str(args.target), "--images", str(args.images),
                   "--pretrain-steps", str(args.pretrain_steps), "--threads", str(args.threads)]
        started = time.perf_counter()
        subprocess.run(command, env=env, check=True)
        args.pretrain_seconds = time.perf_counter() - started
        model = UNet2DModel(**UNET_CONFIG)
        model.load_state_dict(load_file(path))
    return model.eval().requires_grad_(False)


def pretrain_child(args) -> None:
    from safetensors.torch import save_file

    model = pretrain(make_data(args, with_classifier=False), args)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.pretrain_into)
    print(f"  pre-training took {args.pretrain_seconds:.0f} s", flush=True)


@torch.no_grad()
def generate(model: nn.Module, n: int, steps: int, seed: int, batch: int = 256) -> torch.Tensor:
    """DDPM ancestral sampling; the same noise for every model at the same seed."""
    was_training = model.training
    model.eval()
    scheduler = new_scheduler(steps)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=generator)
    for t in scheduler.timesteps:
        eps = torch.cat([model(part, t).sample for part in x.split(batch)])
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    model.train(was_training)
    return x


# ---- methods -----------------------------------------------------------------------------------------------------


class LoraIntConv2d(nn.Module, LoraLayer):
    """LoRA for peft-quant's ``IntConv2d`` through PEFT's custom-layer API, with ``lora.Conv2d``'s maths.

    ``y = base(x) + scaling · B(A(x))``, A a conv with the base layer's kernel size, stride, padding and dilation
    and ``r`` output channels, B a 1×1 conv; A Kaiming-uniform, B zero (PEFT's defaults), scaling ``alpha / r``.
    """

    def __init__(self, base_layer, adapter_name, r=0, lora_alpha=1, config=None, **kwargs):
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, config)

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
        base = self.get_base_layer()
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.lora_dropout[adapter_name] = nn.Identity()
        self.lora_A[adapter_name] = nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding,
                                              base.dilation, bias=False)
        self.lora_B[adapter_name] = nn.Conv2d(r, base.out_channels, 1, bias=False)
        self.use_dora[adapter_name], self.lora_bias[adapter_name] = False, False
        self.reset_lora_parameters(adapter_name, True)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def forward(self, x, *args, **kwargs):
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name in self.lora_A:
                result = result + self.lora_B[name](self.lora_A[name](x)) * self.scaling[name]
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def quantized(float_model: nn.Module) -> nn.Module:
    import peft_quant

    return peft_quant.quantize_model(copy.deepcopy(float_model), bits=4, backend="int")


def int_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft_quant.int_quant import IntConv2d, IntLinear

    return [(name, m) for name, m in model.named_modules() if isinstance(m, (IntLinear, IntConv2d))]


def matched_lora_rank(int_model: nn.Module) -> tuple[int, int, int]:
    """``(rank, TimestepScale's params, LoRA params per rank)``: the rank closest to TimestepScale's parameter count.

    TimestepScale has ``K·(in + out)`` per layer (``in`` = input channels); LoRA of rank ``r`` has
    ``r·(in·kh·kw + out)`` on a Conv2d and ``r·(in + out)`` on a Linear.
    """
    from peft_quant.int_quant import IntConv2d

    ts_params = per_rank = 0
    for _, layer in int_layers(int_model):
        if isinstance(layer, IntConv2d):
            n_in, n_out = layer.in_channels, layer.out_channels
            fan_in = n_in * layer.kernel_size[0] * layer.kernel_size[1]
        else:
            n_in, n_out = layer.in_features, layer.out_features
            fan_in = n_in
        ts_params += 2 * (n_in + n_out)
        per_rank += fan_in + n_out
    return max(1, round(ts_params / per_rank)), ts_params, per_rank


def build(method: str, float_model: nn.Module, lora_rank: int, seed: int) -> nn.Module:
    """The trainable model of ``method``, from a fresh copy of the pre-trained denoiser."""
    import peft

    import peft_quant
    from peft_quant.int_quant import IntConv2d, IntLinear

    torch.manual_seed(seed)
    if method == "full fine-tuning":
        return copy.deepcopy(float_model).requires_grad_(True).train()
    base = quantized(float_model)
    if method == "PEQA":
        config = peft_quant.TimestepScaleConfig(num_experts=1, train_input_scales=False)
    elif method == "TimestepScale":
        config = peft_quant.TimestepScaleConfig(num_experts=2)
    else:
        config = peft.LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                 target_modules=[name for name, _ in int_layers(base)])
        config._register_custom_module({IntLinear: peft.tuners.lora.Linear, IntConv2d: LoraIntConv2d})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unsupported layer type")  # PEFT's note on custom layers
        return peft.get_peft_model(base, config).train()


def trainable(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@dataclass
class Run:
    """One method at one learning rate, with what its training steps measured."""

    method: str
    lr: float
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    step_seconds: list[float] = field(default_factory=list)
    first_step_rss_kib: int = 0
    tracker: TensorMemoryTracker = field(default_factory=TensorMemoryTracker)
    val_loss: float = float("nan")
    diagnostic: dict = field(default_factory=dict)

    def step(self, batch) -> None:
        start = time.perf_counter()
        denoising_loss(self.model, self.scheduler, *batch).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_seconds.append(time.perf_counter() - start)

    def first_step(self, batch) -> None:
        rss_before = reset_peak_rss()
        with self.tracker:
            self.step(batch)
        self.first_step_rss_kib = peak_rss() - rss_before

    def second_step(self, batch) -> None:
        with self.tracker:  # now with the optimizer state that the first step created
            self.step(batch)


def new_run(method: str, lr: float, float_model: nn.Module, lora_rank: int, seed: int) -> Run:
    model = build(method, float_model, lora_rank, seed)
    return Run(method, lr, model, torch.optim.AdamW(trainable(model), lr=lr, weight_decay=0.0), new_scheduler())


def training_batches(data: Data, args) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(x0, noise, t)`` per step, drawn once: every run sees the same ones."""
    generator = torch.Generator().manual_seed(args.seed + 2)
    batches = []
    for _ in range(args.steps):
        index = torch.randint(len(data.personal), (args.batch_size,), generator=generator)
        batches.append((data.personal[index], torch.randn(args.batch_size, 1, 8, 8, generator=generator),
                        torch.randint(T_TRAIN, (args.batch_size,), generator=generator)))
    return batches


def validation_batch(data: Data, args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each held-out image at ``val_draws`` timesteps spread evenly over [0, T), with fixed noise."""
    generator = torch.Generator().manual_seed(args.seed + 3)
    x0 = data.val.repeat(args.val_draws, 1, 1, 1)
    t = (torch.arange(len(x0)) * T_TRAIN // len(x0))[torch.randperm(len(x0), generator=generator)]
    return x0, torch.randn(x0.shape, generator=generator), t


@torch.no_grad()
def validation_loss(model: nn.Module, batch) -> float:
    was_training = model.training
    model.eval()
    loss = float(denoising_loss(model, new_scheduler(), *batch))
    model.train(was_training)
    return loss


def saved_for_backward_mib(model: nn.Module, batch) -> float:
    """MiB that autograd keeps for backward in one training forward; runs the backward too, then drops the grads.

    Counted once per storage, however many views of it are saved; the model's parameters and buffers are not
    counted.
    """
    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = denoising_loss(model, new_scheduler(), *batch)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(saved.values()) / 2**20


def train_interleaved(runs: list[Run], batches: list) -> None:
    """One step of every run per round, starting the round at a rotating run; only the first round runs with
    every allocation visible in RSS (see bench/qoft.py)."""
    for i, batch in enumerate(batches):
        if i == 1:
            allocator_for_speed()
        for k in range(len(runs)):
            run = runs[(i + k) % len(runs)]
            (run.first_step, run.second_step)[i](batch) if i < 2 else run.step(batch)
        if (i + 1) % 50 == 0 or i + 1 == len(batches):
            print(f"  step {i + 1}/{len(batches)}", flush=True)


def adapter_kib(model: nn.Module) -> tuple[float, float]:
    """``(weights file, all files)`` in KiB as saved by ``save_pretrained`` (a safetensors state dict for a plain
    model)."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as directory:
        if hasattr(model, "peft_config"):
            model.save_pretrained(directory)
        else:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                      os.path.join(directory, "model.safetensors"))
        files = [path for path in Path(directory).rglob("*") if path.is_file()]
        weights = sum(path.stat().st_size for path in files if path.suffix == ".safetensors")
        return weights / 1024, sum(path.stat().st_size for path in files) / 1024


# ---- quality -----------------------------------------------------------------------------------------------------


def mean_pairwise_l2(points: np.ndarray) -> float:
    if len(points) < 2:
        return float("nan")
    distances = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(-1))
    return float(distances[np.triu_indices(len(points), k=1)].mean())


def mean_nearest_l2(points: np.ndarray, anchors: np.ndarray) -> float:
    if len(points) == 0:
        return float("nan")
    return float(np.sqrt(((points[:, None, :] - anchors[None, :, :]) ** 2).sum(-1)).min(1).mean())


def quality(images: torch.Tensor, data: Data, target: int) -> dict:
    pixels = to_pixels(images)
    predicted = data.classifier.predict(pixels)
    hits = pixels[predicted == target]
    personal = to_pixels(data.personal)
    return {
        "share": float(np.mean(predicted == target)),
        "div_target": mean_pairwise_l2(hits),
        "nn_personal": mean_nearest_l2(hits, personal),
        "div_all": mean_pairwise_l2(pixels),
        "classes": np.bincount(predicted, minlength=10),
    }


# ---- reporting ---------------------------------------------------------------------------------------------------


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable(model))


COST_COLUMNS = (
    ("method", "{method}"),
    ("base", "{base}"),
    ("trainable params", "{params:,}"),
    ("adapter on disk (KiB): weights", "{adapter_kib:.1f}"),
    ("all files", "{adapter_all_kib:.1f}"),
    ("lr", "{lr:g}"),
    ("median step (s)", "{step_s:.4f}"),
    ("peak tensor memory, steps 1-2 (MiB)", "{peak_mib:.2f}"),
    ("saved for backward (MiB)", "{saved_mib:.2f}"),
    ("weights held (MiB)", "{weights_mib:.2f}"),
    ("grads + AdamW (MiB)", "{optim_mib:.2f}"),
    ("peak RSS growth, first step (MiB): median", "{rss_mib:.2f}"),
    ("range over lrs", "{rss_spread}"),
)
QUALITY_COLUMNS = (
    ("method", "{method}"),
    ("val loss (lr pick)", "{val_loss:.4f}"),
    ("target share", "{share:.1%}"),
    ("pairwise L2, target samples", "{div_target:.1f}"),
    ("L2 to nearest personalization image", "{nn_personal:.1f}"),
    ("pairwise L2, all samples", "{div_all:.1f}"),
    ("samples per class 0-9", "{class_counts}"),
)
RATIOS = (
    ("params", "params"), ("adapter weights on disk", "adapter_kib"), ("step time", "step_s"),
    ("peak tensor memory", "peak_mib"), ("saved for backward", "saved_mib"), ("peak RSS growth, first step", "rss_mib"),
    ("target share", "share"), ("pairwise L2, target samples", "div_target"),
)


def number(value: float, spec: str) -> str:
    return format(value, spec) if np.isfinite(value) else "–"


def markdown_row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def print_table(columns, rows: list[dict]) -> None:
    def cell(template: str, row: dict) -> str:
        try:
            text = template.format(**row)
        except KeyError:  # reference rows have no training columns
            return "–"
        return "–" if text == "nan" else text

    print(markdown_row(header for header, _ in columns))
    print(markdown_row(["---"] * 2 + ["---:"] * (len(columns) - 2)))
    for row in rows:
        print(markdown_row(cell(template, row) for _, template in columns))


def print_ratios(ours: dict, others: list[dict]) -> None:
    print("\n" + markdown_row(["ratio", *(name for name, _ in RATIOS)]))
    print(markdown_row(["---"] + ["---:"] * len(RATIOS)))
    for other in others:
        cells = []
        for _, key in RATIOS:
            ratio = ours[key] / other[key] if other.get(key) else float("nan")
            cells.append(f"{ratio:.2f}" if np.isfinite(ratio) else "–")
        print(markdown_row([f"{OURS} / {other['method']}", *cells]))


def print_environment(args, data: Data, lora_rank: int, ts_params: int, per_rank: int) -> None:
    import bitsandbytes
    import diffusers
    import peft
    import sklearn

    import peft_quant

    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, CPU only")
    print(f"versions: torch {torch.__version__}, peft {peft.__version__}, diffusers {diffusers.__version__}, "
          f"scikit-learn {sklearn.__version__}, bitsandbytes {bitsandbytes.__version__}, "
          f"peft-quant {peft_quant.__version__}")
    print(f"command: python {' '.join(sys.argv)}")
    print(f"data: load_digits 8x8; pre-training on {len(data.pretrain)} images of the 9 other classes; target digit "
          f"{args.target}: {len(data.personal)} personalization images, {len(data.val)} validation images "
          f"x {args.val_draws} (noise, t) draws, {len(data.reference)} held-out reference images")
    print(f"classifier: RBF SVM (gamma 0.001, C 10) on all 1797 digits; 5-fold CV accuracy "
          f"{data.classifier_accuracy:.1%}, on the held-out target digits {data.reference_share:.1%}")
    print(f"denoiser: UNet2DModel {UNET_CONFIG['block_out_channels']}, DDPM T={T_TRAIN}; pre-training "
          f"{args.pretrain_steps} steps x {args.pretrain_batch}, AdamW one-cycle max lr {args.pretrain_lr:g}")
    print(f"personalization: {args.steps} steps x {args.batch_size} (images drawn with replacement), AdamW without "
          f"weight decay, lr grid (all methods) {', '.join(f'{lr:g}' for lr in args.lr_grid)}; LoRA rank {lora_rank} "
          f"= round({ts_params} TimestepScale params / {per_rank} per rank), alpha {2 * lora_rank}")
    print(f"sampling: DDPM, {args.sample_steps} inference steps, {args.samples} samples per method (seed "
          f"{args.seed + 100}); per-lr diagnostic {args.diag_samples} samples (seed {args.seed + 200})\n")


# ---- main --------------------------------------------------------------------------------------------------------


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--steps", type=int, help="personalization steps per run (default 200; 4 with --quick)")
    parser.add_argument("--pretrain-steps", type=int, help="pre-training steps (default 1000; 40 with --quick)")
    parser.add_argument("--target", type=int, default=3, help="the digit left out of pre-training (default 3)")
    parser.add_argument("--images", type=int, default=12, help="personalization images (default 12)")
    parser.add_argument("--samples", type=int, help="samples per method for quality (default 512; 32 with --quick)")
    parser.add_argument("--sample-steps", type=int, help="DDPM inference steps (default 50; 10 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data split, training, init, sampling (default 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine, 2 threads made steps 3-50x slower "
                        "and erratic)")
    parser.add_argument(PRETRAIN_FLAG, dest="pretrain_into", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 40 pre-training steps, 4 personalization steps, one learning rate, "
                        "32 samples of 10 steps")
    args = parser.parse_args()
    args.steps = args.steps or (4 if args.quick else 200)
    args.pretrain_steps = args.pretrain_steps or (40 if args.quick else 1000)
    args.samples = args.samples or (32 if args.quick else 512)
    args.sample_steps = args.sample_steps or (10 if args.quick else 50)
    args.diag_samples = 16 if args.quick else 64
    if args.steps < 3:
        parser.error("--steps must be at least 3: the first two steps of each run are measured, not timed")
    if not 0 <= args.target <= 9:
        parser.error("--target must be a digit 0-9")
    args.batch_size, args.pretrain_batch, args.pretrain_lr = 16, 64, 2e-3
    args.val_images, args.val_draws = 40, 8
    args.lr_grid = QUICK_LR_GRID if args.quick else LR_GRID
    return args


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    if args.pretrain_into:
        pretrain_child(args)
        return
    print("pre-training the float32 denoiser (subprocess) ...", flush=True)
    float_model = pretrain_in_subprocess(args)
    data = make_data(args)
    int_model = quantized(float_model)
    lora_rank, ts_params, per_rank = matched_lora_rank(int_model)
    print_environment(args, data, lora_rank, ts_params, per_rank)

    batches = training_batches(data, args)
    val_batch = validation_batch(data, args)
    references = [
        {"method": "float32, no tuning", "base": "float32", "params": 0, "model": float_model},
        {"method": "int4, no tuning", "base": "int4", "params": 0, "model": int_model},
    ]
    for row in references:
        row["val_loss"] = validation_loss(row["model"], val_batch)

    runs = {method: [new_run(method, lr, float_model, lora_rank, args.seed) for lr in args.lr_grid]
            for method in METHODS}
    for method, method_runs in runs.items():  # the model is the identity at init: same loss as its base
        before = validation_loss(method_runs[0].model, val_batch)
        base = references[0 if method == "full fine-tuning" else 1]
        assert abs(before - base["val_loss"]) < 1e-5, (method, before, base["val_loss"])
    saved = {method: saved_for_backward_mib(r[0].model, batches[0]) for method, r in runs.items()}  # + warm-up

    print(f"training {sum(map(len, runs.values()))} runs interleaved ...", flush=True)
    train_started = time.perf_counter()
    train_interleaved([run for method_runs in runs.values() for run in method_runs], batches)
    train_seconds = time.perf_counter() - train_started

    rows = []
    for method, method_runs in runs.items():
        for run in method_runs:
            run.val_loss = validation_loss(run.model, val_batch)
            run.diagnostic = quality(generate(run.model, args.diag_samples, args.sample_steps, args.seed + 200),
                                     data, args.target)
        best = min(method_runs, key=lambda run: run.val_loss)
        first_step_mib = [run.first_step_rss_kib / 1024 for run in method_runs]
        weights_mib = tensor_bytes(best.model) / 2**20
        optim_mib = 12 * trainable_params(best.model) / 2**20
        adapter, adapter_all = adapter_kib(best.model)
        rows.append({
            "method": method, "base": "float32" if method == "full fine-tuning" else "int4", "lr": best.lr,
            "model": best.model, "params": trainable_params(best.model), "adapter_kib": adapter,
            "adapter_all_kib": adapter_all,
            "step_s": statistics.median(s for run in method_runs for s in run.step_seconds[2:]),
            "rss_mib": statistics.median(first_step_mib),
            "rss_spread": f"{min(first_step_mib):.2f}–{max(first_step_mib):.2f}",
            "saved_mib": saved[method], "weights_mib": weights_mib, "optim_mib": optim_mib,
            "peak_mib": weights_mib + best.tracker.peak / 2**20, "val_loss": best.val_loss,
            "per_lr": ", ".join(f"{run.lr:g}: {run.val_loss:.4f} ({run.diagnostic['share']:.0%}, "
                                f"{number(run.diagnostic['div_target'], '.1f')})" for run in method_runs),
        })
    for row in references:
        row["weights_mib"] = tensor_bytes(row["model"]) / 2**20
    print("sampling ...", flush=True)
    for row in (*references, *rows):
        row.update(quality(generate(row["model"], args.samples, args.sample_steps, args.seed + 100), data,
                           args.target))
        row["class_counts"] = " ".join(str(c) for c in row["classes"])
    real = {"method": f"real digit {args.target}s (held out)", "share": data.reference_share,
            "div_target": mean_pairwise_l2(to_pixels(data.reference)),
            "nn_personal": mean_nearest_l2(to_pixels(data.reference), to_pixels(data.personal)),
            "div_all": mean_pairwise_l2(to_pixels(data.reference))}

    print()
    print_table(COST_COLUMNS, [*references, *rows])
    print()
    print_table(QUALITY_COLUMNS, [real, *references, *rows])
    print_ratios(rows[METHODS.index(OURS)], [row for row in rows if row["method"] != OURS])
    print("\nvalidation loss per lr (diagnostic samples: target share, pairwise L2 of target samples): "
          + "; ".join(f"{row['method']}: {row['per_lr']}" for row in rows))
    print(f"pre-training {args.pretrain_seconds:.0f} s (subprocess, with its start-up), personalization "
          f"{train_seconds:.0f} s; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
