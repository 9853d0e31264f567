"""Block-scaled FP8 and MXFP4: codecs against independent decoders and transformers' own code, layers against float64
references (forward and input gradient), what backward keeps alive, dtype-cast safety, the formats, transformers'
FP8Linear wrapped for training, quantize_model, and checkpoint folders (fresh-process round trip, refusals).

The readers here (:func:`reference_dequantize`) decode the stored tensors without peft-quant's codecs: FP8 through
torch's own float8_e4m3fn cast, MXFP4 through the e2m1 value table, in float64; the conformance matrix uses them too.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import peft_quant
from peft_quant.block_scaled import Fp8BlockLinear, Mxfp4Linear, TransformersFp8Format
from peft_quant.kernels import block_scaled as bs
from peft_quant.quant_formats import resolve_format

ROOT = Path(__file__).resolve().parents[1]
# the OCP MX spec's e2m1 table, written out here (codes 0-7 positive, bit 3 the sign)
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
E2M1_SIGNED = E2M1 + [-v for v in E2M1]


# ---- independent readers -------------------------------------------------------------------------------------------


def reference_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float64 ``weight · scale`` block by block with explicit loops over the scale grid (partial edge blocks)."""
    out = weight.to(torch.float64).clone()  # e4m3 → float64 is exact: torch's own cast is the decoder
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            out[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] *= float(scale_inv[i, j])
    return out


def reference_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float64 ``(..., out, in)`` from the value table: byte ``j`` of a group holds elements ``2j`` (low nibble) and
    ``2j + 1`` (high nibble)."""
    table = torch.tensor(E2M1_SIGNED, dtype=torch.float64)
    low, high = table[(blocks % 16).long()], table[(blocks // 16).long()]
    values = torch.stack([low, high], dim=-1).flatten(-2)  # (..., out, G, 32)
    factor = torch.pow(torch.tensor(2.0, dtype=torch.float64), scales.to(torch.float64) - 127)
    return (values * factor[..., None]).flatten(-2)  # (..., out, in)


def reference_dequantize(layer: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A block-scaled layer's weight as its forward computes with it in ``dtype`` (decoded in float32, then cast),
    returned in float64."""
    if isinstance(layer, Mxfp4Linear):
        exact = reference_mxfp4(layer.weight_blocks, layer.weight_scales)
    else:
        exact = reference_fp8(layer.weight, layer.weight_scale_inv, layer.codec.block_size)
    return exact.to(torch.float32).to(dtype).to(torch.float64)  # float32's rounding of the exact product


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


# ---- codecs --------------------------------------------------------------------------------------------------------


def _fp8_transformers(*names: str):
    """transformers' FP8 integration, for comparisons against its own code; skipped (with the reason) on releases
    whose integration lacks ``names`` (the lower-bound job's transformers 5.0 predates them; CI's newest release runs
    every comparison)."""
    import transformers
    from transformers.integrations import finegrained_fp8

    missing = [name for name in names if not hasattr(finegrained_fp8, name.split(".")[0])
               or (("." in name) and not hasattr(getattr(finegrained_fp8, name.split(".")[0]), name.split(".")[1]))]
    if missing:
        pytest.skip(f"transformers {transformers.__version__}'s FP8 integration has no {', '.join(missing)}")
    return finegrained_fp8


@pytest.mark.parametrize("shape", [(256, 384), (3, 128, 256)])
def test_fp8_quantize_is_transformers_bit_for_bit(shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02
    quantizer = SimpleNamespace(quantization_config=SimpleNamespace(weight_block_size=(128, 128), scale_fmt="float"))
    theirs = _fp8_transformers("Fp8Quantize._quantize_one").Fp8Quantize(quantizer)._quantize_one("x.weight", weight)
    codes, scale_inv = bs.fp8_block_quantize(weight)
    assert torch.equal(codes.view(torch.uint8), theirs["x.weight"].view(torch.uint8))
    assert torch.equal(scale_inv, theirs["x.weight_scale_inv"])


@pytest.mark.parametrize("rows,cols", [(200, 300), (64, 128), (129, 1)])
def test_fp8_decode_matches_independent_readers(rows, cols):
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1))
    codes, scale_inv = bs.fp8_block_quantize(weight)
    assert codes.dtype == torch.float8_e4m3fn and scale_inv.dtype == torch.float32
    assert scale_inv.shape == (math.ceil(rows / 128), math.ceil(cols / 128))
    exact = reference_fp8(codes, scale_inv, (128, 128))
    assert torch.equal(bs.fp8_block_dequantize(codes, scale_inv, torch.float64), exact.float().double())
    # e4m3 keeps 3 mantissa bits: relative rounding ≤ 2^-4, subnormals (spacing 2^-9) absolute ≤ 2^-10 · scale
    scale = scale_inv.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols].double()
    bound = torch.maximum(weight.double().abs() * 2**-4, scale * 2**-10) * (1 + 1e-6)
    assert bool(((exact - weight.double()).abs() <= bound).all())


@pytest.mark.parametrize("rows,cols", [(200, 300), (64, 128), (129, 1)])
def test_fp8_decode_matches_transformers(rows, cols):
    fp8 = _fp8_transformers("_dequantize_fp8_weight")
    codes, scale_inv = bs.fp8_block_quantize(torch.randn(rows, cols, generator=torch.Generator().manual_seed(1)))
    theirs = fp8._dequantize_fp8_weight(codes, scale_inv, [128, 128], torch.float32)
    assert torch.equal(bs.fp8_block_dequantize(codes, scale_inv, torch.float32), theirs)


def test_mxfp4_decode_matches_transformers_and_the_value_table():
    from transformers.integrations.mxfp4 import FP4_VALUES, convert_moe_packed_tensors

    assert tuple(FP4_VALUES) == bs.E2M1_VALUES == tuple(E2M1_SIGNED)
    g = torch.Generator().manual_seed(2)
    blocks = torch.randint(0, 256, (3, 40, 4, 16), generator=g, dtype=torch.uint8)  # (E, out, in/32, 16)
    scales = torch.randint(110, 140, (3, 40, 4), generator=g, dtype=torch.uint8)
    ours = bs.mxfp4_dequantize(blocks, scales, torch.float32)  # (E, out, in)
    assert torch.equal(ours.double(), reference_mxfp4(blocks, scales))
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # gpt-oss' (E, in, out)
    assert torch.equal(ours, theirs.transpose(1, 2))


def _half_spacing(magnitude: torch.Tensor) -> torch.Tensor:
    """Half the distance between neighbouring e2m1 values at ``magnitude`` (in units of the group's scale)."""
    return torch.where(magnitude < 2, 0.25, torch.where(magnitude < 4, 0.5, 1.0))


def test_mxfp4_quantize_rounds_to_nearest_and_never_saturates():
    weight = torch.randn(3, 50, 96, generator=torch.Generator().manual_seed(3)).double()
    weight[0, 0, :32] = 0.0  # an all-zero group
    blocks, scales = bs.mxfp4_quantize(weight.float())
    assert blocks.shape == (3, 50, 3, 16) and scales.shape == (3, 50, 3)
    decoded = reference_mxfp4(blocks, scales)
    unit = torch.pow(2.0, scales.double() - 127).repeat_interleave(32, -1)  # (3, 50, 96) each value's scale
    scaled = weight.float().double() / unit
    assert float(scaled.abs().max()) <= 6.0  # the scale leaves room for every value: no clipping
    group_max = scaled.abs().view(3, 50, 3, 32).amax(-1)  # (3, 50, 3)
    assert bool(((group_max > 3.0) | (group_max == 0)).all())  # the smallest such scale (3 < max ≤ 6)
    error = (decoded - weight.float().double()).abs()
    assert bool((error <= _half_spacing(scaled.abs()) * unit * (1 + 1e-9)).all())  # nearest e2m1 value
    assert torch.equal(decoded[0, 0, :32], torch.zeros(32, dtype=torch.float64))
    again = reference_mxfp4(*bs.mxfp4_quantize(decoded.float()))
    assert torch.equal(again, decoded)  # decoded values are fixed points (codes may differ, values do not)
    # statistical figure, this draw (Gaussian weights): relative Frobenius error 0.115
    assert 0.09 < rel(decoded, weight) < 0.14


@pytest.mark.parametrize("bad,fix", [
    (lambda: bs.mxfp4_quantize(torch.randn(4, 48)), "multiple of 32"),
    (lambda: bs.mxfp4_quantize(torch.tensor([[float("nan")] * 32])), "NaN"),
    (lambda: bs.fp8_block_quantize(torch.randn(4, 8).to(torch.float8_e4m3fn)), "float weight"),
    (lambda: bs.mxfp4_dequantize(torch.zeros(4, 2, 16), torch.zeros(4, 2, dtype=torch.uint8)), "uint8"),
    (lambda: bs.fp8_block_dequantize(torch.zeros(4, 8), torch.ones(1, 1)), "float8_e4m3fn"),
    (lambda: bs.fp8_block_dequantize(torch.zeros(300, 8, dtype=torch.float8_e4m3fn), torch.ones(2, 1)), "block"),
])
def test_codec_refusals_name_the_fix(bad, fix):
    with pytest.raises(ValueError, match=fix) as info:
        bad()
    assert "Fix:" in str(info.value)


# ---- layers --------------------------------------------------------------------------------------------------------

LAYERS = {"fp8": (Fp8BlockLinear, 200, 300), "mxfp4": (Mxfp4Linear, 96, 70)}  # (class, in, out): partial blocks
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2}


def _layer(kind: str, dtype: torch.dtype = torch.float32):
    cls, width, out = LAYERS[kind]
    torch.manual_seed(4)
    return cls.from_linear(nn.Linear(width, out).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_layer_forward_and_input_gradient_match_float64(kind, dtype):
    layer = _layer(kind, dtype)
    weight = reference_dequantize(layer, dtype)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, layer.in_features, generator=g).to(dtype).requires_grad_()
    grad_out = torch.randn(2, 7, layer.out_features, generator=g).to(dtype)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (2, 7, layer.out_features)
    expected = x.detach().double() @ weight.T + layer.bias.detach().double()
    assert rel(out, expected) < TOL[dtype]
    out.backward(grad_out)
    expected_grad = grad_out.double() @ weight
    error = rel(x.grad, expected_grad)
    assert x.grad.dtype == dtype and error < TOL[dtype], error
    for tile in (32, 64):  # other tile widths: the same numbers up to float summation order
        assert rel(bs.matmul_weight(grad_out, layer.stored(), layer.codec, tile), expected_grad) < TOL[dtype]


class LiveBytes(TorchDispatchMode):
    """Tracks the bytes of storages that ops allocate while active (an output sharing an input's storage is a view,
    not an allocation; each new storage is released when the tensor that owns it dies), and the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _release(self, key: int, size: int) -> None:
        self.live -= size
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in result if isinstance(result, (tuple, list)) else (result,):
            if (isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() not in self.seen
                    and t.untyped_storage().data_ptr() not in inputs):
                key, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
                self.seen.add(key)
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._release, key, size)
        return result


@pytest.mark.parametrize("kind", list(LAYERS))
def test_backward_keeps_only_stored_tensors_and_one_tile(kind):
    cls = LAYERS[kind][0]
    torch.manual_seed(6)
    layer = cls.from_linear(nn.Linear(4096, 512, bias=False))  # float32 layer: 8 MiB, 32 tiles of 128 columns
    float_bytes = 512 * 4096 * 4
    stored_bytes = sum(t.nbytes for t in layer.stored())
    x = torch.randn(4, 4096, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    assert saved == []  # nothing through saved-tensor hooks: no x, no float weight (the codes are referenced)
    assert all(a is b for a, b in zip(out.grad_fn.stored, layer.stored()))  # the layer's own tensors, not copies
    grad = torch.randn_like(out)
    with LiveBytes() as tracker:
        out.backward(grad)
    tile_bytes = 512 * 128 * 4  # one 128-column tile of W in float32
    print(f"\n{kind}: backward peak {tracker.peak} B live (tile {tile_bytes} B, gradient {x.numel() * 4} B), "
          f"layer in float32 {float_bytes} B, stored {stored_bytes} B")
    assert tracker.peak <= 2 * tile_bytes + x.numel() * 4  # one decoded tile (+ its codes' temporaries), dX
    assert tracker.peak >= tile_bytes  # the tracker sees the tile: it would see a whole-layer copy
    with LiveBytes() as control:
        layer.dequantize(torch.float32)
    assert control.peak >= float_bytes


def test_dtype_casts_keep_stored_tensors():
    layer = _layer("fp8")
    stored = [t.clone() for t in layer.stored()]
    layer.to(torch.bfloat16)
    assert layer.compute_dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert all(torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                           b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)
               for a, b in zip(layer.stored(), stored))
    assert layer.weight_scale_inv.dtype == torch.float32
    layer.float()
    assert layer.compute_dtype == torch.float32


@pytest.mark.parametrize("kind,label", [("fp8", "peft_quant fp8 block 128x128"),
                                        ("mxfp4", "peft_quant mxfp4 (group size 32)")])
def test_format_save_restore_and_requantize(kind, label):
    layer = _layer(kind)
    fmt = resolve_format(layer)
    assert fmt.facts.label == label and fmt.mergeable and fmt.compute_dtype == torch.float32
    assert torch.equal(fmt.dequantize(torch.float64), reference_dequantize(layer))
    state = fmt.save_state()
    target = fmt.dequantize(torch.float64) * 1.1
    fmt.requantize(target)
    assert not torch.equal(fmt.dequantize(), reference_dequantize(layer).float() / 1.1)
    assert rel(fmt.dequantize(), target) < 0.15
    fmt.restore_state(state)
    assert all(torch.equal(getattr(layer, n), state[n]) for n in state)
    assert fmt.fold_output_scale(torch.ones(layer.out_features)) is False  # block scales: no exact per-row fold


# ---- transformers' FP8Linear ---------------------------------------------------------------------------------------


@pytest.fixture
def cpu_fp8_kernel(monkeypatch):
    """transformers' FP8 kernel is CUDA-only: stand in a CPU one that, like old transformers, gives no input gradient,
    and make transformers' own whole-layer backward fail if it is ever used."""
    fp8 = _fp8_transformers("_dequantize_fp8_weight", "fp8_linear", "FP8LinearFunction")

    def kernel(input, weight, scale_inv, block_size, bias=None, activation_scale=None, allow_deepgemm=True):
        w = fp8._dequantize_fp8_weight(weight.detach(), scale_inv.detach(), block_size, input.dtype)
        return F.linear(input.detach(), w, None if bias is None else bias.detach())

    def whole_layer_backward(ctx, grad):
        raise AssertionError("transformers' FP8LinearFunction.backward ran (a whole-layer float copy)")

    monkeypatch.setattr(fp8, "fp8_linear", kernel)
    monkeypatch.setattr(fp8.FP8LinearFunction, "backward", staticmethod(whole_layer_backward))
    return fp8


def _transformers_fp8(fp8, width: int = 256, out: int = 192):
    torch.manual_seed(7)
    source = nn.Linear(width, out)
    layer = fp8.FP8Linear(width, out, block_size=(128, 128), has_bias=True)
    codes, scale_inv = bs.fp8_block_quantize(source.weight)
    layer.weight = nn.Parameter(codes, requires_grad=False)
    layer.weight_scale_inv = nn.Parameter(scale_inv, requires_grad=False)
    layer.bias = nn.Parameter(source.bias.detach().clone(), requires_grad=False)
    return layer


def test_transformers_fp8linear_trains_through_its_input(cpu_fp8_kernel):
    layer = _transformers_fp8(cpu_fp8_kernel)
    fmt = resolve_format(layer)
    assert isinstance(fmt, TransformersFp8Format) and fmt.facts.label == "transformers fp8 block 128x128"
    weight = reference_fp8(layer.weight, layer.weight_scale_inv, (128, 128))
    assert torch.equal(fmt.dequantize(torch.float64), weight.float().double())
    model = nn.Sequential()
    model.add_module("proj", layer)
    peft_model = peft_quant.QOFTConfig(target_modules=["proj"], block_size=32, init_weights=False, bias="qoft_only")
    from peft import get_peft_model

    peft_model = get_peft_model(model, peft_model)
    x = torch.randn(3, 256, requires_grad=True)
    out = peft_model(x)
    out.pow(2).sum().backward()
    qoft = peft_model.base_model.model.proj
    assert qoft.qoft_Q["default"].grad is not None and qoft.qoft_Q["default"].grad.abs().sum() > 0
    assert layer.bias.grad is not None and layer.bias.grad.abs().sum() > 0
    # the same through a float64 reference layer
    x_ref = x.detach().double().requires_grad_()
    rotation = torch.block_diag(*qoft.rotation("default").detach().double())
    ref_out = (x_ref @ rotation) @ weight.T + layer.bias.detach().double()
    ref_out.pow(2).sum().backward()
    assert rel(out, ref_out) < 1e-5 and rel(x.grad, x_ref.grad) < 1e-5


def test_transformers_fp8linear_store_and_restore(cpu_fp8_kernel):
    layer = _transformers_fp8(cpu_fp8_kernel)
    fmt = resolve_format(layer)
    state = fmt.save_state()
    weight_param = layer.weight
    fmt.requantize(fmt.dequantize() * 0.5)
    assert layer.weight is weight_param and layer.weight.dtype == torch.float8_e4m3fn
    assert rel(fmt.dequantize(), reference_fp8(state["weight"], state["weight_scale_inv"], (128, 128)) * 0.5) < 0.05
    fmt.restore_state(state)
    assert torch.equal(layer.weight.view(torch.uint8), state["weight"].view(torch.uint8))
    assert torch.equal(layer.weight_scale_inv, state["weight_scale_inv"])


# ---- quantize_model ------------------------------------------------------------------------------------------------


def test_quantize_model_backends_and_refusals():
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16), nn.Conv2d(3, 3, 1))
    fp8 = peft_quant.quantize_model(nn.Sequential(*[m for m in model]), backend="fp8")
    assert [type(m).__name__ for m in fp8] == ["Fp8BlockLinear", "ReLU", "Fp8BlockLinear", "Conv2d"]
    with pytest.raises(ValueError, match="Fix") as info:
        peft_quant.quantize_model(model, backend="mxfp4")
    assert "2 (48)" in str(info.value)  # names the layer that cannot be held
    assert type(model[0]) is nn.Linear  # nothing swapped before the refusal
    mx = peft_quant.quantize_model(model, backend="mxfp4", exclude_modules=["2"])
    assert type(mx[0]) is Mxfp4Linear and type(mx[2]) is nn.Linear
    with pytest.raises(ValueError, match="Fix: leave bits out"):
        peft_quant.quantize_model(nn.Linear(64, 8), backend="fp8", bits=4)


# ---- checkpoints ---------------------------------------------------------------------------------------------------

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
            vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)


def _tiny_llama(backend: str, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(8)
    model = LlamaForCausalLM._from_config(LlamaConfig(**TINY), dtype=dtype)  # as load_quantized builds it
    return peft_quant.quantize_model(model, backend=backend, exclude_modules=["lm_head", "o_proj"])


_LOAD = """
import sys, torch, peft_quant
from transformers import LlamaForCausalLM
results = {}
for path, dtype in zip(sys.argv[2::2], sys.argv[3::2]):
    model = peft_quant.load_quantized(LlamaForCausalLM, path, dtype=getattr(torch, dtype))
    kinds = sorted({type(m).__name__ for m in model.modules() if 'Linear' in type(m).__name__})
    with torch.no_grad():
        results[path] = {"logits": model(torch.arange(12).view(2, 6)).logits, "kinds": kinds}
torch.save(results, sys.argv[1])
"""


def test_checkpoint_round_trip_in_a_fresh_process(tmp_path):
    from safetensors import safe_open

    expected, argv = {}, []
    for backend, dtype in (("fp8", "bfloat16"), ("mxfp4", "float32")):
        model = _tiny_llama(backend, getattr(torch, dtype))
        path = str(tmp_path / backend)
        with torch.no_grad():
            expected[path] = (model(torch.arange(12).view(2, 6)).logits, type(model.model.layers[0].mlp.up_proj))
        peft_quant.save_quantized(model, path)
        argv += [path, dtype]
        quant = json.loads((Path(path) / "config.json").read_text())["quantization_config"]
        assert quant["quant_method"] == backend
        assert sorted(quant["modules_to_not_convert"]) == ["lm_head", "model.layers.0.self_attn.o_proj"]
        if backend == "fp8":
            assert quant["weight_block_size"] == [128, 128] and quant["activation_scheme"] == "dynamic"
        with safe_open(str(Path(path) / "model.safetensors"), "pt") as handle:
            names = set(handle.keys())
            stored = handle.get_tensor("model.layers.0.mlp.down_proj." + ("weight" if backend == "fp8" else
                                                                             "weight_blocks"))
        assert stored.dtype == (torch.float8_e4m3fn if backend == "fp8" else torch.uint8)
        assert "model.layers.0.self_attn.o_proj.weight" in names
    done = subprocess.run([sys.executable, "-c", _LOAD, str(tmp_path / "out.pt"), *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    results = torch.load(tmp_path / "out.pt")
    for path, (logits, kind) in expected.items():
        assert results[path]["kinds"] == sorted({"Linear", kind.__name__})
        assert torch.equal(results[path]["logits"], logits), path


def test_transformers_reads_our_fp8_checkpoint(tmp_path):
    """transformers without a GPU dequantizes an fp8 checkpoint on load: its weights equal our decoding."""
    from transformers import AutoModelForCausalLM

    _fp8_transformers("_dequantize_fp8_weight")  # the release that dequantizes fp8 checkpoints on CPU
    model = _tiny_llama("fp8")
    peft_quant.save_quantized(model, tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    for name, layer in model.named_modules():
        if isinstance(layer, Fp8BlockLinear):
            assert torch.equal(theirs.get_submodule(name).weight.detach(), layer.dequantize(torch.float32)), name


def _corrupt(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_bad_checkpoints_are_refused_with_the_fix(tmp_path):
    from transformers import LlamaForCausalLM

    key = "model.layers.0.mlp.up_proj.weight"
    for case, edit in {
        "cast": lambda t: t.__setitem__(key, t[key].to(torch.bfloat16)),
        "missing": lambda t: t.pop("model.layers.0.mlp.up_proj.weight_scale_inv"),
        "extra": lambda t: t.__setitem__("model.layers.0.mlp.extra", torch.zeros(1)),
    }.items():
        path = tmp_path / case
        peft_quant.save_quantized(_tiny_llama("fp8"), path)
        _corrupt(path, edit)
        with pytest.raises(ValueError, match="Fix:"):
            peft_quant.load_quantized(LlamaForCausalLM, path)
    path = tmp_path / "skip"
    peft_quant.save_quantized(_tiny_llama("mxfp4"), path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["modules_to_not_convert"].append("down_proj")
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="modules_to_not_convert"):
        peft_quant.load_quantized(LlamaForCausalLM, path)
    config["quantization_config"] = {"quant_method": "bitsandbytes"}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Fix:"):
        peft_quant.load_quantized(LlamaForCausalLM, path)


@pytest.mark.parametrize("backend", ["fp8", "mxfp4"])
def test_model_card_says_how_to_load_the_base(backend, tmp_path):
    """The card's load snippet names load_quantized (and quantize_model with this backend for a float checkpoint),
    not a plain ``from_pretrained`` that would give float layers."""
    from peft import get_peft_model

    model = get_peft_model(_tiny_llama(backend), peft_quant.QOFTConfig(target_modules=["q_proj"], block_size=16))
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert 'base = peft_quant.load_quantized(LlamaForCausalLM, ' in card
    assert f'peft_quant.quantize_model(base, backend="{backend}")' in card
    assert "bits=" not in card
