"""The conformance matrix's cases and helpers: method × base format × dtype on tiny in-file models.

Used by ``tests/test_conformance.py`` and, as ``python -m tests.conformance_cases MANIFEST``, by its fresh-process
load step (one subprocess loads every saved adapter and writes the outputs to one ``.safetensors`` file).
``python -m tests.conformance_cases --matrix`` prints which cells each operation supports (the README's support
matrix states only what the matrix proves).

Independent references live here too: dequantizing a base layer straight from its stored tensors
(bitsandbytes ``dequantize_4bit`` / ``CB · SCB / 127``, peft-quant ``dequantize()``, QuantFull's int8 state) and
each method's transform in float64.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import sys
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("qoft", "timestep_scale", "quant_full", "stash_quant")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# format name -> quantize_model keyword arguments (None: float, "gptq": layers of the tiny GPTQ Llama)
FORMATS = {
    "float": None,
    "int4": dict(bits=4, backend="int"),
    "int8": dict(bits=8, backend="int"),
    "bnb-nf4": dict(bits=4, backend="bitsandbytes", quant_type="nf4"),
    "bnb-fp4": dict(bits=4, backend="bitsandbytes", quant_type="fp4"),
    "bnb-nf4-dq": dict(bits=4, backend="bitsandbytes", quant_type="nf4", double_quant=True),
    "bnb-int8": dict(bits=8, backend="bitsandbytes"),
    "gptq": "gptq",
    "fp8": dict(backend="fp8"),
    "mxfp4": dict(backend="mxfp4"),
    # other libraries' layers, built by LIBRARY_BUILDERS (below build_base)
    "hqq-int4": "hqq",
    "torchao-int8": "torchao",
    "ct-int4": "compressed-tensors",
    "awq-int4": "awq",
}
LIBRARY_FORMATS = ("hqq-int4", "torchao-int8", "ct-int4", "awq-int4")
LIBRARY_PACKAGES = {"hqq": "hqq", "torchao": "torchao", "compressed-tensors": "compressed_tensors", "awq": "gptqmodel"}
# what the model card and the merge report must call each format (independent of peft_quant.quant_formats)
LABELS = {
    "float": "torch {dtype}",
    "int4": "peft_quant int4",
    "int8": "peft_quant int8",
    "bnb-nf4": "bitsandbytes nf4",
    "bnb-fp4": "bitsandbytes fp4",
    "bnb-nf4-dq": "bitsandbytes nf4 (double-quant)",
    "bnb-int8": "bitsandbytes int8",
    "gptq": "gptq int4 (group size 32)",
    "fp8": "peft_quant fp8 block 128x128",
    "mxfp4": "peft_quant mxfp4 (group size 32)",
    "hqq-int4": "hqq int4 (group size 32)",
    "torchao-int8": "torchao int8",
    "ct-int4": "compressed-tensors int4 (group size 32)",
    "awq-int4": "awq int4 (group size 32)",
}
TARGETS = {"mlp": ("fc1", "fc2"), "conv": ("conv1", "conv2")}
CONV_PADDING = {"conv1": 1, "conv2": 0}
# relative RMS tolerance of one layer's output against a float64 reference computed from the same weight
DTYPE_TOL = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 3e-3}
FORMAT_TOL = {"bnb-int8": 3e-2}  # LLM.int8 also quantizes the layer's input rows to int8
OPERATIONS = ("identity", "train_step", "save_load", "merge", "merge_cycles", "adapters", "model_card", "bad_file")


@dataclass(frozen=True)
class Case:
    """One cell: ``method`` (plus the ``stash`` field of its config when ``stash``) on ``fmt`` layers in ``dtype``."""

    method: str
    fmt: str
    dtype: str
    arch: str = "mlp"
    stash: bool = False

    @property
    def id(self) -> str:
        method = self.method + ("+stash" if self.stash else "")
        return f"{method}-{self.arch}-{self.fmt}-{self.dtype}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def targets(self) -> tuple[str, ...]:
        return TARGETS[self.arch]

    @property
    def label(self) -> str:
        return LABELS[self.fmt].format(dtype=str(self.torch_dtype).removeprefix("torch."))

    @property
    def tol(self) -> float:
        return max(DTYPE_TOL[self.dtype], FORMAT_TOL.get(self.fmt, 0.0))


def _cases() -> list[Case]:
    cases = []
    own = [fmt for fmt in FORMATS if fmt != "gptq" and fmt not in LIBRARY_FORMATS]
    mlp_cells = [(fmt, dt) for fmt in own for dt in ("fp32", "bf16")]
    mlp_cells += [(fmt, "fp16") for fmt in ("float", "int4", "int8")]  # bitsandbytes' CPU kernels: fp32/bf16
    for method in METHODS:
        cases += [Case(method, fmt, dt) for fmt, dt in mlp_cells]
        cases += [Case(method, fmt, dt, "conv") for fmt in ("float", "int4", "int8") for dt in ("fp32", "bf16")]
    cases += [Case(method, "gptq", "fp32") for method in ("qoft", "timestep_scale")]  # slow base: two cells
    cases += [Case("qoft", fmt, dt, stash=True) for fmt in ("fp8", "mxfp4") for dt in ("fp32", "bf16")]
    # other libraries' layers: the input-side methods, QuantFull (from the dequantized base) and a stash composition
    # (only where the library is installed: the lower-bound CI job has none of them)
    installed = [fmt for fmt in LIBRARY_FORMATS if importlib.util.find_spec(LIBRARY_PACKAGES[FORMATS[fmt]])]
    dtypes = {"awq-int4": "bf16"}  # gptqmodel's AWQ kernels compute in float16/bfloat16 only
    cases += [Case(method, fmt, dtypes.get(fmt, "fp32")) for fmt in installed
              for method in ("qoft", "timestep_scale", "quant_full")]
    cases += [Case("qoft", fmt, dtypes.get(fmt, "fp32"), stash=True) for fmt in installed]
    cases += [Case(method, fmt, dt, stash=True) for method in ("qoft", "timestep_scale", "quant_full")
              for fmt in ("float", "int4", "bnb-nf4") for dt in ("fp32", "bf16")]
    return cases


CASES = _cases()


# ---- what each cell supports ---------------------------------------------------------------------------------------


def refusal(case: Case, operation: str) -> Optional[str]:
    """Why ``operation`` must be refused (with an error naming the fix) on this cell, or ``None`` if supported."""
    if case.method == "stash_quant" and case.fmt != "float":
        return "StashQuant alone trains float modules only"
    if case.method == "quant_full" and case.arch == "conv":
        return "QuantFull trains Linear layers only"
    if operation in ("merge", "merge_cycles") and case.fmt == "gptq":
        return "GPTQ layers cannot be re-quantized"
    if operation == "adapters" and case.method == "quant_full":
        return "QuantFull releases the base weights (no disable) and holds one adapter per layer"
    return None


def support_matrix() -> dict[str, dict[str, str]]:
    """``{case id: {operation: "yes" | "refused: why"}}``."""
    return {
        case.id: {op: "yes" if refusal(case, op) is None else f"refused: {refusal(case, op)}" for op in OPERATIONS}
        for case in CASES
    }


# ---- tiny models and bases -----------------------------------------------------------------------------------------


class TinyMLP(nn.Module):
    """A denoiser-shaped MLP: ``forward(sample, timestep)`` (the timestep is read by TimestepScale's router only)."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 64)

    def forward(self, sample: torch.Tensor, timestep: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(sample)))


class TinyConv(nn.Module):
    """Two convolutions, ``forward(sample, timestep)``."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(8, hidden, kernel_size=3, padding=CONV_PADDING["conv1"])
        self.conv2 = nn.Conv2d(hidden, 8, kernel_size=1, padding=CONV_PADDING["conv2"])

    def forward(self, sample: torch.Tensor, timestep: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.conv2(F.gelu(self.conv1(sample)))


@functools.lru_cache(maxsize=None)
def _gptq_layers(gptq_dir: str) -> tuple[nn.Module, nn.Module]:
    """The first decoder layer's up_proj (64 → 128) and down_proj (128 → 64) of the tiny GPTQ Llama, loaded once."""
    from .conftest import load_gptq

    mlp = load_gptq(gptq_dir).model.layers[0].mlp
    return mlp.up_proj, mlp.down_proj


def build_base(case: Case, gptq_dir: Optional[str] = None, wide: bool = False) -> nn.Module:
    """A fresh base model of the cell (same weights every call and in every process), in training mode. ``wide``:
    another model of the same layer names with other hidden widths (an adapter of the cell does not fit it)."""
    torch.manual_seed(0)
    if case.arch == "conv":
        model = TinyConv(24 if wide else 16)
    else:
        model = TinyMLP(192 if wide else 128)
    model = model.to(case.torch_dtype)
    spec = FORMATS[case.fmt]
    if spec == "gptq":
        if gptq_dir is None:
            raise ValueError("GPTQ cells need the tiny_gptq_dir fixture's path")
        up, down = _gptq_layers(gptq_dir)
        model.fc1, model.fc2 = copy.deepcopy(up), copy.deepcopy(down)
        if wide:  # only the tiny Llama's widths exist in GPTQ: swap the layers instead
            model.fc1, model.fc2 = model.fc2, model.fc1
    elif isinstance(spec, str):
        LIBRARY_BUILDERS[spec](model, case.targets)
    elif spec is not None:
        import peft_quant

        extra = dict(compute_dtype=case.torch_dtype) if spec["backend"] == "bitsandbytes" else {}
        peft_quant.quantize_model(model, **spec, **extra)
    return model.train()


# ---- other libraries' layers, built with each library's own API (int4 groups of 32, int8 per row) ------------------


def _hqq_layers(model: nn.Module, names: tuple[str, ...]) -> None:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    for name in names:
        linear = getattr(model, name)
        config = BaseQuantizeConfig(nbits=4, group_size=32, axis=1)
        config["weight_quant_params"]["optimize"] = False  # round-to-nearest: HQQ's solver costs ~0.3 s per merge
        with torch.no_grad():  # HQQLinear clones the bias: without no_grad, a non-leaf tensor tied to the float layer
            layer = HQQLinear(linear, config, compute_dtype=linear.weight.dtype, device="cpu")
        layer.bias = nn.Parameter(layer.bias)  # HQQ keeps a plain tensor; as a parameter, bias="qoft_only" trains it
        setattr(model, name, layer)


def _torchao_layers(model: nn.Module, names: tuple[str, ...]) -> None:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig(set_inductor_config=False), filter_fn=lambda m, fqn: fqn in names)


def ct_calibrate(model: nn.Module, fmt: str, weights, inputs=None, compress: bool = True) -> None:
    """Attach a compressed-tensors scheme (``weights``, and ``inputs`` activation arguments if given) to every Linear,
    set min-max weight qparams (the frozen, fake-quantized state) and, with ``compress``, compress it as a checkpoint
    holds it with compressed-tensors' own compressor; the model's first forward then decompresses it."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    groups = {"group": QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs)}
    apply_quantization_config(model, QuantizationConfig(config_groups=groups, format=fmt), show_progress=False)
    for layer in model.modules():
        if getattr(layer, "quantization_scheme", None) is None:
            continue
        weight = layer.weight.detach()
        width = weights.group_size if weights.group_size else weight.shape[1]
        blocks = weight.float().reshape(-1, width)  # (rows · groups, width)
        scale, zero = calculate_qparams(blocks.amin(-1), blocks.amax(-1), weights)
        layer.weight_scale.data.copy_(scale.reshape(layer.weight_scale.shape))
        layer.weight_zero_point.data.copy_(zero.reshape(layer.weight_zero_point.shape))
        layer.quantization_status = QuantizationStatus.FROZEN
    if compress:
        ModelCompressor.from_pretrained_model(model, quantization_format=fmt).compress_model(model)


def _ct_layers(model: nn.Module, names: tuple[str, ...]) -> None:
    """W4A16 pack-quantized (int4, symmetric, groups of 32), in the decompressed state a loaded model is in after its
    first forward (the compressed state before it is tested in tests/test_library_formats.py)."""
    from compressed_tensors.quantization import QuantizationArgs

    ct_calibrate(model, "pack-quantized", QuantizationArgs(num_bits=4, symmetric=True, strategy="group", group_size=32))
    with torch.no_grad():
        model(torch.zeros(1, model.fc1.in_features, dtype=model.fc1.weight_scale.dtype))


def awq_layer(linear: nn.Linear, bits: int = 4, group: int = 32) -> nn.Module:
    """gptqmodel's CPU AWQ layer (``AwqTorchLinear``) holding ``linear`` packed by its own ``pack``: asymmetric
    min-max round-to-nearest per group (the float16/bfloat16 scales AWQ kernels take)."""
    from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear

    dtype = linear.weight.dtype if linear.weight.dtype in (torch.float16, torch.bfloat16) else torch.float16
    layer = AwqTorchLinear(bits=bits, group_size=group, sym=False, desc_act=False, in_features=linear.in_features,
                           out_features=linear.out_features, bias=linear.bias is not None, dtype=dtype)
    top = 2**bits - 1
    blocks = linear.weight.detach().float().reshape(linear.out_features, -1, group)  # (out, groups, group)
    low, high = blocks.amin(-1).clamp(max=0), blocks.amax(-1).clamp(min=0)
    scales = ((high - low) / top).clamp(min=1e-6).to(dtype)
    with torch.no_grad():  # pack clones the bias: without no_grad, a non-leaf tensor tied to the float layer
        layer.pack(linear, scales, torch.round(-low / scales.float()).clamp(0, top))
    layer.post_init()
    if layer.bias is not None:  # a buffer in gptqmodel; as a parameter, bias="qoft_only" trains it
        bias = layer._buffers.pop("bias")
        layer.bias = nn.Parameter(bias)
    return layer


def _awq_layers(model: nn.Module, names: tuple[str, ...]) -> None:
    for name in names:
        setattr(model, name, awq_layer(getattr(model, name)))


LIBRARY_BUILDERS = {"hqq": _hqq_layers, "torchao": _torchao_layers, "compressed-tensors": _ct_layers,
                    "awq": _awq_layers}


def inputs(case: Case, routing: str = "mixed") -> tuple[torch.Tensor, torch.Tensor]:
    """``(sample, timestep)``: timesteps of both experts (``"mixed"``) or all of expert 0 (``"expert0"``)."""
    g = torch.Generator().manual_seed(1)
    shape = (4, 8, 6, 6) if case.arch == "conv" else (4, 8, 64)
    sample = torch.randn(shape, generator=g).to(case.torch_dtype)
    t = [10.0, 700.0, 250.0, 990.0] if routing == "mixed" else [10.0, 120.0, 250.0, 400.0]
    return sample, torch.tensor(t)


def make_config(case: Case, experts: int = 2, **overrides):
    """The cell's config (TimestepScale with ``experts`` timestep experts)."""
    import peft_quant

    targets = list(case.targets)
    stash = dict(stash={"bits": 4}) if case.stash else {}
    if case.method == "qoft":
        kwargs = dict(target_modules=targets, block_size=4 if case.arch == "conv" else 32)
        return peft_quant.QOFTConfig(**kwargs, **stash, **overrides)
    if case.method == "timestep_scale":
        return peft_quant.TimestepScaleConfig(target_modules=targets, num_experts=experts, **stash, **overrides)
    if case.method == "quant_full":
        return peft_quant.QuantFullConfig(target_modules=targets, **stash, **overrides)
    return peft_quant.StashQuantConfig(target_modules=targets, bits=4, **overrides)


def wrap(case: Case, gptq_dir: Optional[str] = None, experts: int = 2, **overrides):
    from peft import get_peft_model

    return get_peft_model(build_base(case, gptq_dir), make_config(case, experts, **overrides))


def _owned_by(name: str, adapter: str) -> bool:
    return f".{adapter}." in name + "."


def randomize(model: nn.Module, adapter: str = "default", seed: int = 0) -> None:
    """Move adapter ``adapter`` away from its identity init (identity hides most bugs)."""
    g = torch.Generator().manual_seed(seed)

    def noise(t: torch.Tensor, std: float) -> torch.Tensor:
        return (torch.randn(t.shape, generator=g) * std).to(t.dtype)

    tensors = list(model.named_parameters()) + list(model.named_buffers())
    with torch.no_grad():
        for name, t in tensors:
            if not _owned_by(name, adapter):
                continue
            if "qoft_Q." in name:
                t.copy_(noise(t, 0.05))
            elif "ts_scale_" in name:
                t.copy_((torch.rand(t.shape, generator=g) + 0.5).to(t.dtype))
            elif "qf_codes." in name:
                step = torch.randint(-3, 4, t.shape, generator=g)
                t.copy_((t.to(torch.int32) + step).clamp(-127, 127).to(t.dtype))
            elif "qf_outlier_value." in name or "qf_bias." in name:
                t.add_(noise(t, 0.01))
            elif "stash_module." in name and t.is_floating_point():
                t.add_(noise(t, 0.01))


# ---- independent references ----------------------------------------------------------------------------------------


def dequantize_reference(layer: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A base layer's weight in float64, read straight from its stored tensors (not through peft_quant's formats).

    ``dtype``: the precision the layer's forward dequantizes to (peft-quant's int layers dequantize to the input's
    dtype; bitsandbytes 4-bit to its quant state's dtype).
    """
    from peft_quant.int_quant import IntQuantized

    if isinstance(layer, IntQuantized):
        return layer.dequantize(dtype).to(torch.float64)
    library = library_reference(layer, dtype)
    if library is not None:
        return library
    if type(layer) in (nn.Linear, nn.Conv2d):
        return layer.weight.detach().to(torch.float64)
    if type(layer).__module__.startswith("bitsandbytes"):
        import bitsandbytes

        weight = layer.weight
        state = getattr(weight, "quant_state", None)
        if state is not None:
            if getattr(state, "packing_format_for_cpu", False):
                raise AssertionError("bitsandbytes' CPU-packed layout (an eval-mode forward); tests stay in train mode")
            return bitsandbytes.functional.dequantize_4bit(weight.data, state).to(torch.float64)
        scb = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
        return weight.data.to(torch.float64) * scb.to(torch.float64)[:, None] / 127
    if type(layer).__module__.startswith("gptqmodel"):
        return layer.dequantize_weight().T.to(torch.float64)
    if type(layer).__name__ in ("Fp8BlockLinear", "Mxfp4Linear"):  # decoded by the tests' own codec readers
        from .test_block_scaled import reference_dequantize

        return reference_dequantize(layer, dtype)
    raise TypeError(f"no reference dequantization for {type(layer)}")


def _expand_blocks(values: torch.Tensor, block: list[int]) -> torch.Tensor:
    """Per-block values ``(rows / b0, cols / b1)`` repeated over each block's elements."""
    return values.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)


def library_reference(layer: nn.Module, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Other libraries' weights in float64 from their stored codes and scales (``None`` for other layers): torchao
    ``(qdata - zero_point) · scale`` per block; HQQ's codes unpacked by its own bit unpacker, ``(W_q - zero) · scale``
    in the compute dtype as its forward does; compressed-tensors' decompressed weight as stored (its compressed
    state decompressed by its own compressor); AWQ's GEMM codes by gptqmodel's ``dequantize_gemm``."""
    kind = type(layer).__module__.split(".")[0]
    weight = getattr(layer, "weight", None)
    if isinstance(weight, torch.Tensor) and type(weight).__module__.startswith("torchao"):
        block = list(weight.block_size)
        zero = weight.zero_point.to(torch.float64) if getattr(weight, "zero_point", None) is not None else 0.0
        zero = _expand_blocks(zero, block) if isinstance(zero, torch.Tensor) else zero
        return (weight.qdata.to(torch.float64) - zero) * _expand_blocks(weight.scale.to(torch.float64), block)
    if kind == "hqq":
        from hqq.core.quantize import Quantizer

        meta = layer.meta
        codes = Quantizer.unpack[meta["packing"]](layer.W_q, dtype=layer.compute_dtype)
        return ((codes - meta["zero"]) * meta["scale"]).reshape(meta["shape"]).to(torch.float64)
    if getattr(layer, "quantization_scheme", None) is not None and isinstance(layer, nn.Linear):
        status = str(layer.quantization_status.value)
        if status == "decompressed":
            return layer.weight.detach().to(torch.float64)
        if status == "compressed":
            from compressed_tensors.compressors import BaseCompressor
            from compressed_tensors.utils import get_direct_state_dict

            compressor = BaseCompressor.get_value_from_registry(layer.quantization_scheme.format)
            state = compressor.decompress(get_direct_state_dict(layer), layer.quantization_scheme)
            return state["weight"].to(torch.float64)
        raise AssertionError(f"compressed-tensors state {status}: the matrix holds compressed or decompressed layers")
    if kind == "gptqmodel" and hasattr(layer, "qzeros") and not hasattr(layer, "g_idx"):
        from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

        codes = dequantize_gemm(layer.qweight, layer.qzeros, layer.scales, layer.bits, layer.group_size)
        return codes.T.to(torch.float64)
    return None


def quant_full_reference(layer: nn.Module, adapter: str = "default") -> torch.Tensor:
    """QuantFull's tuned weight in float64 from its int8 state: ``scale · codes`` with the float outliers put back."""
    codes = layer.qf_codes[adapter].to(torch.float64)
    scale = layer.qf_scale[adapter].to(torch.float64)  # (out, groups)
    out, width = codes.shape
    groups = scale.shape[1]
    weight = (codes.view(out, groups, width // groups) * scale[..., None]).reshape(out, width)
    index = layer.qf_outlier_index[adapter].long()
    weight.view(-1)[index] = layer.qf_outlier_value[adapter].to(torch.float64)
    return weight


def block_matrix(blocks: torch.Tensor, width: int) -> torch.Tensor:
    """``diag(R_1..R_n)`` ``(width, width)`` from ``(n, b, b)`` blocks (one block: shared across the width)."""
    b = blocks.shape[-1]
    blocks = blocks.expand(width // b, b, b) if blocks.shape[0] == 1 else blocks
    return torch.block_diag(*blocks.to(torch.float64))


def adapted_weight(case: Case, layer: nn.Module, base_weight: Optional[torch.Tensor]):
    """``(W_target, bias)`` in float64: the weight a merge must produce (the adapter folded into ``base_weight``)."""
    conv = case.arch == "conv"
    base = layer.get_base_layer()
    bias = getattr(base, "bias", None)
    if case.method == "qoft":
        m = block_matrix(layer.rotation("default").detach(), base_weight.shape[1])  # x_row → x_row · M
        weight = torch.einsum("oi...,ji->oj...", base_weight, m)  # W Mᵀ along the input channels
    elif case.method == "timestep_scale":
        s_in = layer.ts_scale_in["default"].detach()[0].to(torch.float64)
        s_out = layer.ts_scale_out["default"].detach()[0].to(torch.float64)
        tail = (1, 1) if conv else ()
        weight = s_out.view(-1, 1, *tail) * base_weight * s_in.view(1, -1, *tail)
    elif case.method == "quant_full":
        weight = quant_full_reference(layer)
        bias = layer.qf_bias["default"] if "default" in layer.qf_bias else None
    else:
        trained = layer.stash_module["default"]
        weight, bias = trained.weight.detach().to(torch.float64), trained.bias
    return weight, None if bias is None else bias.detach().to(torch.float64)


def apply_weight(case: Case, name: str, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 s_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A layer's output in float64 from its weight (``s_out`` scales the output before the bias: TimestepScale)."""
    x = x.to(torch.float64)
    if case.arch == "conv":
        out = F.conv2d(x, weight, None, padding=CONV_PADDING[name])
        view = (-1, 1, 1)
    else:
        out = x @ weight.T
        view = (-1,)
    if s_out is not None:
        out = out * s_out.to(torch.float64).view(view)
    return out if bias is None else out + bias.view(view)


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30))


def rel_fro(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---- the fresh-process load step -----------------------------------------------------------------------------------


def load_outputs(manifest_path: str) -> None:
    """Load every adapter listed in the manifest onto a fresh base, run it, write outputs (and errors)."""
    from peft import PeftModel
    from safetensors.torch import save_file

    import peft_quant  # noqa: F401  (registers the methods before loading)

    with open(manifest_path) as handle:
        manifest = json.load(handle)
    outputs, errors = {}, {}
    for entry in manifest["cases"]:
        case = Case(**entry["case"])
        try:
            model = PeftModel.from_pretrained(build_base(case, manifest.get("gptq_dir")), entry["dir"]).train()
            with torch.no_grad():
                outputs[case.id] = model(*inputs(case)).contiguous()
        except Exception as error:  # reported by the case's own test
            errors[case.id] = f"{type(error).__name__}: {error}"
    save_file(outputs, manifest["outputs"])
    with open(manifest["errors"], "w") as handle:
        json.dump(errors, handle)


def manifest_entry(case: Case, directory: str) -> dict:
    return {"case": asdict(case), "dir": directory}


if __name__ == "__main__":
    if sys.argv[1:] == ["--matrix"]:
        for case_id, row in support_matrix().items():
            print(case_id.ljust(44), " ".join(f"{op}={'Y' if v == 'yes' else 'R'}" for op, v in row.items()))
    else:
        load_outputs(sys.argv[1])
