"""TimestepScale kernels against their references: per-sample expert scaling (forward, backward, every layout), the
int4/int8 dequantize-matmul with fused scaling against float64, the dispatch, and the layer end to end."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

from peft_quant import TimestepScaleConfig
from peft_quant.int_quant import IntLinear
from peft_quant.kernels import timestep_scale as ops
from peft_quant.kernels import timestep_scale_triton as tt
from peft_quant.kernels.backend import interpreting

from .kernel_utils import DEVICE, POISON, kernels, relative_rms
from .test_timestep_scale import _base, _randomize, _Single


@pytest.fixture
def poison_empty(monkeypatch):
    """Every ``torch.empty``/``empty_like`` buffer starts as NaN, so an output element a kernel misses shows."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(POISON) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))


def _experts(batch: int, num_experts: int, single: bool) -> tuple[torch.Tensor, int | None]:
    """Mixed experts per sample (every expert but the last used), or one for the whole batch, as the router gives."""
    if single:
        return torch.full((batch,), num_experts - 1, device=DEVICE), num_experts - 1
    return torch.arange(batch, device=DEVICE) % (num_experts - 1), None


def _grad_out(out: torch.Tensor) -> torch.Tensor:
    """A fixed random output gradient (drawn in float32, whatever ``out``'s dtype)."""
    generator = torch.Generator().manual_seed(5)
    return torch.randn(out.shape, generator=generator).to(device=out.device, dtype=out.dtype)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def _run(fn, inputs: list[torch.Tensor], *args):
    """``fn(*inputs, *args)`` and the gradients of every input under a fixed random output gradient."""
    inputs = [_leaf(t) for t in inputs]
    out = fn(*inputs, *args)
    out.backward(_grad_out(out))
    return out, [t.grad for t in inputs]


# ---- per-sample scaling ------------------------------------------------------------------------------------------

LAYOUTS = {  # name: (shape, channel dim, memory format)
    "linear-3d": ((3, 5, 37), -1, torch.contiguous_format),
    "linear-2d": ((4, 19), -1, torch.contiguous_format),
    "conv": ((3, 7, 4, 5), 1, torch.contiguous_format),
    "conv-channels-last": ((3, 7, 4, 5), 1, torch.channels_last),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("single", [False, True], ids=["mixed", "single"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_scale_forward_backward_match_reference(layout, single, with_bias, poison_empty):
    shape, channel_dim, memory_format = LAYOUTS[layout]
    torch.manual_seed(0)
    channels = shape[channel_dim]
    x = torch.randn(shape, device=DEVICE).to(memory_format=memory_format)
    table = torch.rand(4, channels, device=DEVICE) + 0.5
    bias = torch.randn(channels, device=DEVICE) if with_bias else None
    experts = _experts(shape[0], 4, single)
    ref, ref_grads = _run(ops.scale_channels_reference, [x, table], experts, channel_dim, bias)
    with kernels("triton"):
        out, grads = _run(ops.scale_channels, [x, table], experts, channel_dim, bias)
    assert out.shape == ref.shape and relative_rms(out, ref) < 1e-6
    assert relative_rms(grads[0], ref_grads[0]) < 1e-6
    assert relative_rms(grads[1], ref_grads[1]) < 1e-6
    assert torch.all(grads[1][0 if single else 3] == 0)  # an expert no sample uses gets no gradient


# Triton's interpreter truncates float32 → bfloat16 casts (a GPU rounds to nearest): a looser bound there.
BF16_BOUND = 3e-2 if interpreting() else 8e-3


@pytest.mark.parametrize("dtype,bound", [(torch.float16, 1e-3), (torch.bfloat16, BF16_BOUND)])
def test_scale_half_precision(dtype, bound):
    torch.manual_seed(1)
    x = torch.randn(2, 6, 33, device=DEVICE, dtype=dtype)
    table, bias = torch.rand(3, 33, device=DEVICE) + 0.5, torch.randn(33, device=DEVICE, dtype=dtype)
    experts = _experts(2, 3, False)
    ref, ref_grads = _run(ops.scale_channels_reference, [x, table], experts, -1, bias)
    with kernels("triton"):
        out, grads = _run(ops.scale_channels, [x, table], experts, -1, bias)
    assert out.dtype == dtype and grads[0].dtype == dtype and grads[1].dtype == table.dtype
    assert relative_rms(out, ref) < bound
    assert relative_rms(grads[0], ref_grads[0]) < bound
    assert relative_rms(grads[1], ref_grads[1]) < bound  # the kernel sums in float32, the reference in dtype


@pytest.mark.parametrize("layout", ["linear-3d", "conv"])
def test_scale_small_tiles_and_chunks(layout, poison_empty):
    """Tiles smaller than the tensor and several position chunks per sample: masking and the partial reduction."""
    shape, channel_dim, _ = LAYOUTS[layout]
    torch.manual_seed(2)
    x = torch.randn(shape, device=DEVICE)
    table, bias = torch.rand(4, shape[channel_dim], device=DEVICE) + 0.5, torch.randn(shape[channel_dim], device=DEVICE)
    experts = _experts(shape[0], 4, False)
    ref, ref_grads = _run(ops.scale_channels_reference, [x, table], experts, channel_dim, bias)
    out = tt.scale_forward(x, table, experts, channel_dim, bias, blocks=(2, 4))
    dx, dtable = tt.scale_backward(x, _grad_out(ref), table, experts, channel_dim, bias, True, True, chunks=2,
                                   blocks=(2, 4))
    assert relative_rms(out, ref) < 1e-6
    assert relative_rms(dx, ref_grads[0]) < 1e-6 and relative_rms(dtable, ref_grads[1]) < 1e-6


# ---- dequantize-matmul with fused scaling --------------------------------------------------------------------------


def _int_layer(in_features: int, out_features: int, bits: int) -> IntLinear:
    torch.manual_seed(3)
    return IntLinear(nn.Linear(in_features, out_features), bits).to(DEVICE)


def _float64(x, layer, bias, table_in, table_out, experts):
    """``s_out[k] ⊙ (W (s_in[k] ⊙ x)) + b`` in float64 from the dequantized weight."""
    x, weight = x.double(), layer.dequantize(torch.float64)
    index = experts[0] if experts is not None else None

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t.double()[index].view(index.shape[0], *([1] * (x.dim() - 2)), -1)

    if table_in is not None:
        x = x * rows(table_in)
    out = x @ weight.T
    if table_out is not None:
        out = out * rows(table_out)
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("in_features,out_features", [(37, 29), (16, 33)])
@pytest.mark.parametrize("scales", ["both", "out-only", "none"])
def test_int_linear_matches_float64(bits, in_features, out_features, scales, poison_empty):
    layer = _int_layer(in_features, out_features, bits)
    torch.manual_seed(4)
    x = torch.randn(3, 7, in_features, device=DEVICE)
    table_in = torch.rand(4, in_features, device=DEVICE) + 0.5 if scales == "both" else None
    table_out = torch.rand(4, out_features, device=DEVICE) + 0.5 if scales != "none" else None
    experts = _experts(3, 4, False) if scales != "none" else None
    bias = layer.bias if scales != "none" else None
    names = [name for name, t in (("x", x), ("in", table_in), ("out", table_out)) if t is not None]
    inputs = [t for t in (x, table_in, table_out) if t is not None]

    def call(fn):
        def run(*leaves):
            given = dict(zip(names, leaves))
            return fn(given["x"], layer, bias, given.get("in"), given.get("out"), experts)
        return run

    expected, expected_grads = _run(call(_float64), inputs)
    with kernels("triton"):
        out, grads = _run(call(ops.int_linear), inputs)
    assert out.dtype == x.dtype and relative_rms(out, expected) < 1e-5
    for grad, expected_grad in zip(grads, expected_grads):
        assert relative_rms(grad, expected_grad) < 1e-5


@pytest.mark.parametrize("bits", [4, 8])
def test_int_linear_single_expert_and_fp16(bits):
    layer = _int_layer(21, 18, bits)
    torch.manual_seed(6)
    x = torch.randn(2, 5, 21, device=DEVICE)
    table_in, table_out = torch.rand(3, 21, device=DEVICE) + 0.5, torch.rand(3, 18, device=DEVICE) + 0.5
    experts = _experts(2, 3, True)
    expected = _float64(x, layer, layer.bias, table_in, table_out, experts)
    with kernels("triton"):
        out = ops.int_linear(x, layer, layer.bias, table_in, table_out, experts)
        half = ops.int_linear(x.half(), layer, layer.bias, table_in, table_out, experts)
    assert relative_rms(out, expected) < 1e-5
    assert half.dtype == torch.float16 and relative_rms(half, expected) < 2e-3


@pytest.mark.parametrize("bits", [4, 8])
def test_int_linear_layer_forward_uses_the_kernel(bits, monkeypatch):
    """IntLinear's own forward (no scales) through the fused kernel: same output and input gradient."""
    layer = _int_layer(37, 29, bits)
    x = torch.randn(5, 37, device=DEVICE)
    ref, (ref_grad,) = _run(layer, [x])
    calls = []
    monkeypatch.setattr(tt, "_int_linear_kernel", _Spy(tt._int_linear_kernel, calls))
    with kernels("triton"):
        out, (grad,) = _run(layer, [x])
    assert calls and relative_rms(out, ref) < 1e-6 and relative_rms(grad, ref_grad) < 1e-6


class _Spy:
    """Stands in for a Triton kernel (``kernel[grid](...)``) and records its launches."""

    def __init__(self, kernel, calls: list) -> None:
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        self.calls.append(grid)
        return self.kernel[grid]


# ---- dispatch and the layer end to end ------------------------------------------------------------------------------


def test_auto_on_cpu_runs_the_reference_and_forced_runs_the_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(tt, "_scale_kernel", _Spy(tt._scale_kernel, calls))
    monkeypatch.setattr(tt, "_int_linear_kernel", _Spy(tt._int_linear_kernel, calls))
    x, table, experts = torch.randn(2, 3, 8), torch.rand(2, 8), (torch.tensor([0, 1]), None)
    layer = IntLinear(nn.Linear(8, 4), 4)
    with kernels("auto"):
        scaled = ops.scale_channels(x, table, experts, -1)
        linear = ops.int_linear(x, layer, layer.bias, table, None, experts)
    assert not calls
    assert torch.equal(scaled, ops.scale_channels_reference(x, table, experts, -1))
    assert torch.equal(linear, ops.int_linear_reference(x, layer, layer.bias, table, None, experts))
    with kernels("triton"):
        ops.scale_channels(x.to(DEVICE), table.to(DEVICE), (experts[0].to(DEVICE), None), -1)
        ops.int_linear(x.to(DEVICE), layer.to(DEVICE))
    assert len(calls) == 2


def _layer_run(kind: str, seed: int, two_adapters: bool = False, device: str = DEVICE):
    """Output and gradients (input and every scale) of a TimestepScale-wrapped ``kind`` base with mixed experts."""
    base, x = _base(kind)
    model = get_peft_model(_Single(base), TimestepScaleConfig(num_experts=3))
    if two_adapters:
        model.add_adapter("other", TimestepScaleConfig(num_experts=1, train_input_scales=False))
        model.base_model.set_adapter(["default", "other"])
    _randomize(model, seed)
    model.to(device)
    x = x.to(device).requires_grad_()
    out = model(x, torch.tensor([10, 999, 499, 500]))  # experts 0, 2, 1, 1
    out.backward(_grad_out(out))
    scales = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out, x.grad, scales


@pytest.mark.parametrize("kind", ["linear", "conv", "linear-int4", "linear-int8", "conv-int4", "linear-two-adapters"])
def test_layer_end_to_end_triton_equals_reference(kind, monkeypatch):
    two = kind.endswith("two-adapters")
    kind = kind.removesuffix("-two-adapters")
    with kernels("torch"):
        expected = _layer_run(kind, 0, two)
    calls = []
    monkeypatch.setattr(tt, "_int_linear_kernel", _Spy(tt._int_linear_kernel, calls))
    with kernels("triton"):
        out, grad_x, scales = _layer_run(kind, 0, two)
    assert bool(calls) == (kind.startswith("linear-int"))  # one adapter on an IntLinear: the fused kernel
    assert relative_rms(out, expected[0]) < 1e-6 and relative_rms(grad_x, expected[1]) < 1e-6
    assert scales.keys() == expected[2].keys() and len(scales) == (3 if two else 2)
    for name, grad in scales.items():
        assert relative_rms(grad, expected[2][name]) < 1e-5, name


@pytest.mark.parametrize("kind", ["linear-int4", "conv"])
def test_layer_auto_on_cpu_is_bit_identical_to_the_reference(kind):
    with kernels("torch"):
        expected = _layer_run(kind, 1, device="cpu")
    with kernels("auto"):
        out, grad_x, scales = _layer_run(kind, 1, device="cpu")
    assert torch.equal(out, expected[0]) and torch.equal(grad_x, expected[1])
    assert all(torch.equal(g, expected[2][n]) for n, g in scales.items())
