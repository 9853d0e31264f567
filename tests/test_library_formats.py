"""Other libraries' base formats (``peft_quant.library_formats``) checked against each library's own primitives.

Per format and dtype (one entry of ``SPECS``, built from a float ``nn.Linear`` by the library's own API):

* the facts and model-card label;
* ``dequantize()`` against the library's forward: ``layer(x)`` ≈ ``x @ W.T + b`` in float64 (relative RMS);
* QOFT and TimestepScale on the layer: outputs and the gradient w.r.t. the input equal those of the same adapter
  on a float twin holding the dequantized weight (so the library's forward passes the input gradient);
* ``save_state``/``restore_state`` restore every stored tensor bit for bit after a re-quantization;
* ``requantize(W)`` stores exactly what the library itself makes of ``W`` with the layer's settings (a layer built
  from ``W`` by the same library call), keeping the facts;
* exact output-scale folds where the format offers them.

Then what is refused or only described: torchao int4 (no CPU kernels) and activation-quantized weights,
compressed-tensors schemes that quantize activations, AWQ kernels that repack their codes; and that
``import peft_quant`` imports none of these libraries. Each library's tests skip where it is not installed.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
from torch import nn

from .conformance_cases import awq_layer, ct_calibrate, randomize, rel_fro, rel_rms

DTYPE_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
T = torch.tensor([10.0, 700.0, 250.0, 990.0])  # timesteps of both TimestepScale experts


class Net(nn.Module):
    """One base layer in a denoiser-shaped module (TimestepScale reads ``timestep`` from its forward)."""

    def __init__(self, fc: nn.Module) -> None:
        super().__init__()
        self.fc = fc

    def forward(self, sample: torch.Tensor, timestep: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.fc(sample)


@dataclass(frozen=True)
class Spec:
    """A library layer: ``build`` makes it from a float Linear (in a :class:`Net`), with the library's own API."""

    id: str
    package: str
    dtype: torch.dtype
    build: Callable[[nn.Linear], Net]
    label: str
    format_name: str
    quant_error: float  # bound on the re-quantization error of a 5% perturbation (relative Frobenius)
    tol: Optional[float] = None  # forward vs dequantized reference; the dtype's tolerance by default

    @property
    def forward_tol(self) -> float:
        return self.tol if self.tol is not None else DTYPE_TOL[self.dtype]


def _hqq(linear: nn.Linear) -> Net:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    with torch.no_grad():  # HQQLinear clones the bias
        layer = HQQLinear(linear, BaseQuantizeConfig(nbits=4, group_size=32, axis=1),
                          compute_dtype=linear.weight.dtype, device="cpu")
    return Net(layer)


def _torchao(config: Callable[[], object]) -> Callable[[nn.Linear], Net]:
    def build(linear: nn.Linear) -> Net:
        from torchao.quantization import quantize_

        quantize_(linear, config())
        return Net(linear)

    return build


def _int8_config():
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig(set_inductor_config=False)


def _intx4_config():
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))


def _float8_config():
    from torchao.quantization import Float8WeightOnlyConfig

    return Float8WeightOnlyConfig(set_inductor_config=False)


def _ct_args(bits: int, strategy: str, symmetric: bool = True, kind: str = "int"):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=bits, type=kind, symmetric=symmetric, strategy=strategy,
                            group_size=32 if strategy == "group" else None)


def _ct(fmt: str, state: str, bits: int, strategy: str, symmetric: bool = True,
        kind: str = "int") -> Callable[[nn.Linear], Net]:
    """A compressed-tensors layer in ``state``: "compressed" (as loaded), "decompressed" (after the model's first
    forward) or "frozen" (fake-quantized on every forward)."""

    def build(linear: nn.Linear) -> Net:
        net = Net(linear)
        ct_calibrate(net, fmt, _ct_args(bits, strategy, symmetric, kind), compress=state != "frozen")
        if state == "decompressed":
            with torch.no_grad():
                net(torch.zeros(1, linear.in_features, dtype=linear.weight_scale.dtype))
        return net

    return build


def _awq(linear: nn.Linear) -> Net:
    return Net(awq_layer(linear))


SPECS = [
    Spec("hqq-int4-fp32", "hqq", torch.float32, _hqq, "hqq int4 (group size 32)", "HqqFormat", 0.12),
    Spec("hqq-int4-bf16", "hqq", torch.bfloat16, _hqq, "hqq int4 (group size 32)", "HqqFormat", 0.12),
    Spec("torchao-int8-fp32", "torchao", torch.float32, _torchao(_int8_config), "torchao int8", "TorchaoFormat", 0.01),
    Spec("torchao-int8-bf16", "torchao", torch.bfloat16, _torchao(_int8_config), "torchao int8", "TorchaoFormat",
         0.01),
    Spec("torchao-intx4-fp32", "torchao", torch.float32, _torchao(_intx4_config), "torchao int4 (group size 32)",
         "TorchaoFormat", 0.12),
    Spec("torchao-float8-bf16", "torchao", torch.bfloat16, _torchao(_float8_config), "torchao float8_e4m3fn",
         "TorchaoFormat", 0.05),
    Spec("ct-w4-packed-compressed-fp32", "compressed_tensors", torch.float32, _ct("pack-quantized", "compressed", 4,
         "group"), "compressed-tensors int4 (group size 32)", "CompressedTensorsFormat", 0.12),
    Spec("ct-w4-asym-decompressed-bf16", "compressed_tensors", torch.bfloat16, _ct("pack-quantized", "decompressed",
         4, "group", symmetric=False), "compressed-tensors int4 (group size 32)", "CompressedTensorsFormat", 0.12),
    Spec("ct-w8-naive-compressed-fp32", "compressed_tensors", torch.float32, _ct("int-quantized", "compressed", 8,
         "channel"), "compressed-tensors int8", "CompressedTensorsFormat", 0.01),
    Spec("ct-fp8-frozen-fp32", "compressed_tensors", torch.float32, _ct("float-quantized", "frozen", 8, "channel",
         kind="float"), "compressed-tensors fp8", "CompressedTensorsFormat", 0.05),
    Spec("awq-int4-bf16", "gptqmodel", torch.bfloat16, _awq, "awq int4 (group size 32)", "AwqFormat", 0.12),
    Spec("awq-int4-fp32", "gptqmodel", torch.float32, _awq, "awq int4 (group size 32)", "AwqFormat", 0.12,
         tol=2e-3),  # gptqmodel's AWQ kernel computes float32 inputs in float16
]
spec_params = pytest.mark.parametrize("spec", SPECS, ids=[s.id for s in SPECS])


def float_linear(dtype: torch.dtype, weight: Optional[torch.Tensor] = None, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(64, 128).to(dtype)
    if weight is not None:
        linear.weight = nn.Parameter(weight.to(dtype))
    return linear


def build(spec: Spec, weight: Optional[torch.Tensor] = None) -> Net:
    pytest.importorskip(spec.package)
    return spec.build(float_linear(spec.dtype, weight))


def fmt_of(net: Net):
    from peft_quant.quant_formats import resolve_format

    return resolve_format(net.fc)


def run(net: Net, x: torch.Tensor) -> torch.Tensor:
    """The layer's output as the model computes it (a compressed-tensors model decompresses at its first forward)."""
    with torch.no_grad():
        return net(x)


def sample(dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(4, 8, 64, generator=torch.Generator().manual_seed(seed)).to(dtype)


def stored(layer: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the layer stores (torchao weights flattened into their inner tensors), copied."""
    tensors = {}
    for name, value in layer.state_dict().items():
        if not isinstance(value, torch.Tensor):
            continue
        if type(value).__module__.startswith("torchao"):
            inner, meta = value.__tensor_flatten__()
            tensors.update({f"{name}.{n}": getattr(value, n).detach().clone() for n in inner})
            tensors[f"{name}.block_size"] = torch.tensor(list(meta["block_size"]))
        else:
            tensors[name] = value.detach().clone()
    return tensors


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    if set(a) != set(b):
        return sorted(set(a) ^ set(b))
    return [n for n in a if a[n].dtype != b[n].dtype or a[n].shape != b[n].shape or not torch.equal(a[n], b[n])]


def perturbed(weight: torch.Tensor, dtype: torch.dtype, seed: int = 2) -> torch.Tensor:
    """``weight`` plus 5% noise, rounded to ``dtype`` (what a layer of that dtype could be built from)."""
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed))
    return (weight + 0.05 * weight.std() * noise).to(dtype).to(torch.float32)


# ---- per format ----------------------------------------------------------------------------------------------------


@spec_params
def test_facts(spec):
    fmt = fmt_of(build(spec))
    assert type(fmt).__name__ == spec.format_name
    assert fmt.facts.label == spec.label
    assert (fmt.facts.in_features, fmt.facts.out_features, fmt.facts.layer_type) == (64, 128, "linear")
    assert fmt.mergeable
    assert fmt.compute_dtype == (torch.float16 if spec.id == "awq-int4-fp32" else spec.dtype)


@spec_params
def test_dequantize_matches_library_forward(spec):
    net = build(spec)
    fmt = fmt_of(net)
    weight = fmt.dequantize(torch.float64)  # before any forward (compressed-tensors: read in the compressed state)
    x = sample(spec.dtype)
    out = run(net, x)
    assert out.dtype == spec.dtype
    bias = net.fc.bias.detach().double()
    error = rel_rms(out, x.double() @ weight.T + bias)
    assert error < spec.forward_tol, f"layer(x) is {error:.3g} (relative RMS) from x @ dequantize().T + b"
    assert torch.equal(fmt_of(net).dequantize(torch.float64), weight), "the first forward changed the weight read"


@spec_params
@pytest.mark.parametrize("method", ["qoft", "timestep_scale"])
def test_input_gradient_through_library_forward(spec, method):
    """The adapter's output and the gradient w.r.t. the input equal those on a float twin of the dequantized weight."""
    from peft import get_peft_model

    import peft_quant

    def config():
        if method == "qoft":
            return peft_quant.QOFTConfig(target_modules=["fc"], block_size=32)
        return peft_quant.TimestepScaleConfig(target_modules=["fc"], num_experts=2)

    net = build(spec)
    fmt = fmt_of(net)
    twin_layer = float_linear(spec.dtype, fmt.dequantize(torch.float32))
    twin_layer.bias = nn.Parameter(net.fc.bias.detach().to(spec.dtype).clone())
    model, twin = get_peft_model(net, config()), get_peft_model(Net(twin_layer), config())
    randomize(model)
    adapter = {k: v for k, v in model.state_dict().items() if "qoft_" in k or "ts_scale_" in k}
    assert adapter and not twin.load_state_dict(adapter, strict=False).unexpected_keys
    results = []
    for peft_model in (model, twin):
        x = sample(spec.dtype).requires_grad_()
        out = peft_model(x, T)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.dtype))
        assert x.grad is not None, "no gradient reached the input"
        results.append((out.detach(), x.grad))
    (out, grad), (twin_out, twin_grad) = results
    assert rel_rms(out, twin_out) < spec.forward_tol
    error = rel_rms(grad, twin_grad)
    assert error < spec.forward_tol, f"input gradient is {error:.3g} (relative RMS) from the float twin's"


@spec_params
def test_qoft_saves_only_its_input_for_backward(spec):
    """What autograd keeps for a QOFT layer on the library's layer is the layer input alone (as for a float base):
    not the rotated input again nor a float copy of the weight, which some libraries' own forwards save; their
    formats run the frozen base without autograd and compute the input gradient from the stored weights."""
    from peft import get_peft_model

    import peft_quant

    net = build(spec)
    model = get_peft_model(net, peft_quant.QOFTConfig(target_modules=["fc"], block_size=32))
    randomize(model)
    x = sample(spec.dtype).requires_grad_()
    run(net, x)  # a compressed-tensors model decompresses at its first forward
    owned = {t.untyped_storage().data_ptr() for t in stored(net.fc).values()}
    owned |= {p.untyped_storage().data_ptr() for p in model.parameters() if type(p) is nn.Parameter}
    saved = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if type(tensor) in (torch.Tensor, nn.Parameter) and tensor.untyped_storage().data_ptr() not in owned:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(x, T)
    assert set(saved) == {x.untyped_storage().data_ptr()}, f"saved {sorted(saved.values())} bytes, x is {x.nbytes}"
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@spec_params
def test_state_round_trip_is_exact(spec):
    net = build(spec)
    x = sample(spec.dtype)
    fmt = fmt_of(net)
    if spec.id.startswith("ct-") and "compressed" in spec.id:
        expected_out = None  # this layer decompresses at the model's first forward, inside the cycle below
    else:
        expected_out = run(net, x)
    before, saved = stored(net.fc), fmt.save_state()
    weight = fmt.dequantize(torch.float32)
    fmt.requantize(perturbed(weight, spec.dtype))
    assert differing(stored(net.fc), before), "re-quantizing a changed weight stored nothing new"
    run(net, x)  # (compressed-tensors: the model's hook decompresses every layer here)
    fmt_of(net).restore_state(saved)
    if expected_out is None:  # saved compressed, now decompressed: the library's own decompression of the original
        reference = build(spec)
        run(reference, x)
        before = stored(reference.fc)
        expected_out = run(reference, x)
    assert not differing(stored(net.fc), before), f"not restored bit for bit: {differing(stored(net.fc), before)}"
    assert torch.equal(run(net, x), expected_out)


@spec_params
def test_requantize_equals_the_library_quantizing_the_weight(spec):
    """``requantize(W)`` stores what the library makes of ``W`` itself (a layer built from ``W`` with the same call):
    the layer's own settings are kept, and the error is a quantization error."""
    net = build(spec)
    fmt = fmt_of(net)
    facts = fmt.facts
    target = perturbed(fmt.dequantize(torch.float32), spec.dtype)
    fmt.requantize(target)
    reference = spec.build(float_linear(spec.dtype, target))
    reference.fc.bias = net.fc.bias  # (AWQ, HQQ keep their own copy; the bias is not re-quantized)
    problems = differing(stored(net.fc), stored(reference.fc))
    assert not problems, f"re-quantized tensors differ from the library's own quantization: {problems}"
    assert fmt_of(net).facts == facts
    error = rel_fro(fmt_of(net).dequantize(torch.float64), target)
    assert 0 < error < spec.quant_error, f"re-quantization error {error:.3g}"


@spec_params
def test_fold_output_scale(spec):
    net = build(spec)
    fmt = fmt_of(net)
    before = fmt.dequantize(torch.float64)
    factor = torch.rand(128, generator=torch.Generator().manual_seed(4)) + 0.5
    if not fmt.fold_output_scale(factor):
        assert torch.equal(fmt.dequantize(torch.float64), before), "a refused fold changed the weight"
        return
    error = rel_rms(fmt.dequantize(torch.float64), before * factor.double()[:, None])
    assert error < DTYPE_TOL[spec.dtype], f"the fold is {error:.3g} from the scaled weight"


# ---- merged through PEFT, end to end -------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [s for s in SPECS if s.id in ("hqq-int4-fp32", "torchao-int8-fp32",
                                                                 "ct-w4-packed-compressed-fp32")],
                         ids=lambda s: s.id)
def test_merge_and_unload_keeps_the_library_layer(spec):
    from peft import get_peft_model

    import peft_quant

    net = build(spec)
    layer_type = type(net.fc)
    model = get_peft_model(net, peft_quant.QOFTConfig(target_modules=["fc"], block_size=32))
    randomize(model)
    x = sample(spec.dtype)
    unmerged = run(model, x)
    merged = model.merge_and_unload()
    assert type(merged.fc) is layer_type and fmt_of(merged).facts.label == spec.label
    error = merged.peft_quant_merge_report["fc"]["relative_error"]
    assert 0 < error < spec.quant_error
    assert rel_rms(run(merged, x), unmerged) < 3 * error


# ---- refused or described only -------------------------------------------------------------------------------------


def test_torchao_int4_is_described_but_not_merged():
    """torchao's Int4WeightOnlyConfig tensors have CUDA-only kernels: the layer is recognised (not swallowed by the
    float format), and reading or merging it raises an error naming the fix."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int4Tensor

    weight = Int4Tensor(qdata=torch.zeros(128, 32, dtype=torch.uint8), scale=torch.ones(2, 128, dtype=torch.bfloat16),
                        zero_point=torch.zeros(2, 128, dtype=torch.bfloat16), block_size=[1, 32],
                        shape=torch.Size([128, 64]))
    linear = float_linear(torch.bfloat16)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    fmt = fmt_of(Net(linear))
    assert type(fmt).__name__ == "TorchaoFormat" and fmt.facts.label == "torchao int4 (group size 32)"
    assert not fmt.mergeable
    for action in (lambda: fmt.requantize(torch.zeros(128, 64)), fmt.dequantize):
        with pytest.raises((TypeError, NotImplementedError), match="Fix"):
            action()


def test_torchao_activation_quantized_weight_is_refused():
    pytest.importorskip("torchao")
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    from peft_quant.quant_formats import UnsupportedLayerError

    linear = float_linear(torch.float32)
    quantize_(linear, Int8DynamicActivationInt8WeightConfig())
    with pytest.raises(UnsupportedLayerError, match="torchao tensor subclass .*quantize activations.*Fix"):
        fmt_of(Net(linear))


def test_compressed_tensors_activation_scheme_reads_but_refuses_merge():
    """A W8A8 scheme quantizes the input too: the layer's weight is read (QuantFull can start from it), its forward
    runs under the adapters, and merging raises naming the fix instead of writing a weight its forward would not
    reproduce."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from peft import get_peft_model

    import peft_quant

    net = Net(float_linear(torch.float32))
    inputs = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    ct_calibrate(net, "int-quantized", _ct_args(8, "channel"), inputs=inputs)
    fmt = fmt_of(net)
    assert fmt.facts.label == "compressed-tensors w8a8" and not fmt.mergeable
    model = get_peft_model(net, peft_quant.QOFTConfig(target_modules=["fc"], block_size=32))
    randomize(model)
    run(model, sample(torch.float32))
    with pytest.raises((TypeError, ValueError), match="compressed-tensors w8a8.*Fix"):
        model.merge_and_unload()


def test_awq_layers_get_their_own_format_not_gptq():
    """AWQ layers subclass gptqmodel's BaseQuantLinear, which the GPTQ format matches: it leaves them to the AWQ
    format; kernels that repack the codes are described, and reading them raises naming the fix."""
    pytest.importorskip("gptqmodel")
    from gptqmodel.nn_modules.qlinear.torch_fused_awq import TorchFusedAwqLinear

    from peft_quant.quant_formats import GptqFormat

    net = _awq(float_linear(torch.bfloat16))
    assert not GptqFormat.matches(net.fc) and type(fmt_of(net)).__name__ == "AwqFormat"
    fused = TorchFusedAwqLinear(bits=4, group_size=32, sym=False, desc_act=False, in_features=64, out_features=128,
                                bias=False, register_buffers=True)
    fmt = fmt_of(Net(fused))
    assert fmt.facts.label == "awq int4 (group size 32)" and not fmt.mergeable
    with pytest.raises(TypeError, match='Fix: .*backend="awq_torch"'):
        fmt.dequantize()


def test_resolving_a_layer_imports_no_library():
    """Resolving a float layer (the first resolve imports the library formats) imports none of these libraries
    beyond what ``import peft`` itself imports (peft pulls in hqq and torchao when installed)."""
    code = ("import sys, torch, peft; before = {m.split('.')[0] for m in sys.modules}; "
            "from peft_quant.quant_formats import resolve_format; resolve_format(torch.nn.Linear(2, 2)); "
            "new = {m.split('.')[0] for m in sys.modules} - before; "
            "print(sorted(new & {'hqq', 'torchao', 'compressed_tensors', 'gptqmodel'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("bias", ["qoft_only", "all"])
def test_bias_training_on_a_base_whose_bias_is_not_a_parameter_is_refused(bias):
    """HQQ keeps its bias as a plain tensor: no optimizer would see it, so a bias setting that trains it is refused
    (it would silently stay as it is); as a parameter it trains."""
    pytest.importorskip("hqq")
    from peft import get_peft_model

    import peft_quant

    config = dict(target_modules=["fc"], block_size=16, bias=bias)
    with pytest.raises(ValueError, match="plain tensor, not a parameter.*Fix: bias='none'"):
        get_peft_model(_hqq(float_linear(torch.float32)), peft_quant.QOFTConfig(**config))
    net = _hqq(float_linear(torch.float32))
    net.fc.bias = nn.Parameter(net.fc.bias)
    model = get_peft_model(net, peft_quant.QOFTConfig(**config))
    assert model.base_model.model.fc.get_base_layer().bias.requires_grad
