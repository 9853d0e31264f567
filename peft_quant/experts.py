"""Mixture-of-experts expert banks: a trainable-through MXFP4 bank on CPU, and the format object adapters use.

gpt-oss stores its experts as banks, one tensor per projection for all experts: ``gate_up_proj`` ``(E, H, 2I)`` and
``down_proj`` ``(E, I, H)`` in transformers' float ``GptOssExperts``, or MXFP4 codes in the Hub's layout,
``gate_up_proj_blocks`` ``(E, 2I, H/32, 16)`` uint8 (two 4-bit codes a byte) with ``gate_up_proj_scales``
``(E, 2I, H/32)`` uint8 (e8m0 exponents, one per 32 inputs), likewise for ``down_proj``. transformers' own MXFP4 bank
(``Mxfp4GptOssExperts``) runs only through GPU Triton kernels that give no input gradient, so no input-side adapter
can train through it. This module provides:

* :class:`Mxfp4Experts`: the MXFP4 bank with the Hub's tensor names, dtypes and shapes and ``GptOssExperts``'s forward
  (per-expert loop, swiglu gate with ``alpha``/``limit``), computing each expert's products from the stored codes a
  tile at a time (128 weight rows in forward, 128 input columns in backward; :func:`mxfp4_matmul`): no float copy of
  the bank, or of a whole projection of one expert wider than a tile, is ever alive. The bank is frozen: backward
  gives the input's gradient only.
* :class:`ExpertsFormat` (:class:`FloatExpertsFormat`, :class:`Mxfp4ExpertsFormat`): what an adapter may ask of a
  bank, in the interface of :class:`~peft_quant.quant_formats.WeightFormat` so that the shared merge machinery of
  :class:`~peft_quant.tuner_base.PeftQuantLayer` (exact save/restore, re-quantization, the error report) applies
  unchanged. Its "weight" is the whole bank as one flat vector (each projection's ``(E, out, in)`` weight, row-major,
  in :data:`PROJECTIONS` order); :meth:`ExpertsFormat.split` and :meth:`ExpertsFormat.join` convert. Expert banks are
  not Linear layers, so they have their own resolver, :func:`resolve_experts_format` (``None`` for anything else).
* :func:`run_experts`: the routed per-expert loop both banks and the per-expert adapters share, with hooks around
  each expert's matmuls.
* :func:`quantize_experts`: swap every float ``GptOssExperts`` of a model for an :class:`Mxfp4Experts`.

The MXFP4 codec itself is :mod:`peft_quant.kernels.block_scaled` (``mxfp4_quantize``/``mxfp4_dequantize``).
"""

from __future__ import annotations

import sys
from typing import Any, ClassVar, Optional, Protocol

import torch
from torch import nn

from .kernels.block_scaled import MX_GROUP, MXFP4, linear, mxfp4_dequantize, mxfp4_quantize
from .quant_formats import BaseFormat, UnsupportedLayerError, WeightFormat

#: the bank's projections, in the order of the flat weight (:meth:`ExpertsFormat.split`)
PROJECTIONS: tuple[str, ...] = ("gate_up_proj", "down_proj")

_GPT_OSS_MODULE = "transformers.models.gpt_oss.modeling_gpt_oss"
_MXFP4_MODULE = "transformers.integrations.mxfp4"


def gpt_oss_experts_class() -> Optional[type]:
    """transformers' ``GptOssExperts`` if its module is loaded (never imports transformers)."""
    module = sys.modules.get(_GPT_OSS_MODULE)
    return getattr(module, "GptOssExperts", None)


def _transformers_mxfp4_class() -> Optional[type]:
    module = sys.modules.get(_MXFP4_MODULE)
    return getattr(module, "Mxfp4GptOssExperts", None)


def _check_widths(hidden: int, intermediate: int, what: str) -> None:
    for name, width in (("hidden_size", hidden), ("intermediate_size", intermediate)):
        if width % MX_GROUP:
            raise ValueError(
                f"{what}: MXFP4 shares one scale per {MX_GROUP} inputs, and {name}={width} is not a multiple of "
                f"{MX_GROUP}. Fix: keep this bank in float (exclude it from quantize_experts), or use a model "
                f"whose widths are multiples of {MX_GROUP}."
            )


def mxfp4_matmul(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x Wᵀ`` (no bias) for one expert's MXFP4 weight ``W`` ``(out, in)`` (``blocks`` ``(out, in/32, 16)``,
    ``scales`` ``(out, in/32)``), ``x`` ``(tokens, in)`` → ``(tokens, out)`` in ``x``'s dtype, differentiable in ``x``.

    :func:`peft_quant.kernels.block_scaled.linear`: decoded tile by tile in forward and backward, keeping only
    references to the codes (the bank's own tensors, no copy) for backward; the bank is frozen, so no weight gradient
    exists."""
    return linear(x, (blocks, scales), MXFP4)


# ---- the routed loop ------------------------------------------------------------------------------------------------


class ExpertHooks(Protocol):
    """What a per-expert adapter does around one expert's matmul ``x Wᵀ`` (before its bias is added).

    ``tokens`` are the rows of the bank's input the expert's rows came from (for per-sample routing)."""

    def before(self, proj: str, expert: int, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor: ...

    def after(self, proj: str, expert: int, y: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor: ...


def run_experts(fmt: ExpertsFormat, hidden_states: torch.Tensor, router_indices: torch.Tensor,
                routing_weights: torch.Tensor, hooks: Optional[ExpertHooks] = None) -> torch.Tensor:
    """``GptOssExperts``'s eager forward (operation for operation, so a float bank without hooks gives its output bit
    for bit), with each expert's products taken from ``fmt`` and ``hooks`` around them.

    ``hidden_states`` ``(tokens, H)``; ``router_indices`` ``(tokens, top_k)`` expert ids; ``routing_weights``
    ``(tokens, top_k)``. Returns ``(tokens, H)``.
    """
    num_experts = fmt.num_experts
    next_states = torch.zeros_like(hidden_states, dtype=hidden_states.dtype, device=hidden_states.device)
    with torch.no_grad():
        expert_mask = torch.nn.functional.one_hot(router_indices, num_classes=num_experts)  # (tokens, top_k, E)
        expert_mask = expert_mask.permute(2, 1, 0)  # (E, top_k, tokens)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for hit in expert_hit:
        expert = int(hit[0])
        top_k_pos, token_idx = torch.where(expert_mask[expert])
        gate_up = _project(fmt, "gate_up_proj", expert, hidden_states[token_idx], token_idx, hooks)
        gated_output = fmt.apply_gate(gate_up)
        out = _project(fmt, "down_proj", expert, gated_output, token_idx, hooks)
        weighted_output = out * routing_weights[token_idx, top_k_pos, None]
        next_states.index_add_(0, token_idx, weighted_output.to(hidden_states.dtype))
    return next_states


def _project(fmt: ExpertsFormat, proj: str, expert: int, x: torch.Tensor, tokens: torch.Tensor,
             hooks: Optional[ExpertHooks]) -> torch.Tensor:
    """One expert's ``x Wᵀ + b`` for projection ``proj``, with the hooks around the product."""
    if hooks is not None:
        x = hooks.before(proj, expert, x, tokens)
    y = fmt.project(proj, expert, x)
    if hooks is not None:
        y = hooks.after(proj, expert, y, tokens)
    bias = fmt.bias(proj)[expert]
    return y + bias.to(y.dtype)


# ---- the MXFP4 bank -------------------------------------------------------------------------------------------------


class Mxfp4Experts(nn.Module):
    """gpt-oss's expert bank in MXFP4, on any device, with an input gradient: a frozen base for per-expert adapters.

    Holds the Hub checkpoint's tensors under their names (``{proj}_blocks`` uint8 ``(E, out, in/32, 16)``,
    ``{proj}_scales`` uint8 ``(E, out, in/32)``, ``{proj}_bias`` ``(E, out)``), so its state dict is the checkpoint's.
    ``forward(hidden_states, router_indices, routing_weights)`` is ``GptOssExperts``'s, each product computed from the
    codes tile by tile (:func:`mxfp4_matmul`) in the input's dtype.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, alpha: float = 1.702,
                 limit: float = 7.0, bias_dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        _check_widths(hidden_size, intermediate_size, "Mxfp4Experts")
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.alpha, self.limit = alpha, limit
        for proj, (out_features, in_features) in self.shapes().items():
            groups = in_features // MX_GROUP
            self.register_buffer(f"{proj}_blocks", torch.zeros(num_experts, out_features, groups, MX_GROUP // 2,
                                                               dtype=torch.uint8, device=device))
            self.register_buffer(f"{proj}_scales", torch.zeros(num_experts, out_features, groups, dtype=torch.uint8,
                                                               device=device))
            setattr(self, f"{proj}_bias", nn.Parameter(
                torch.zeros(num_experts, out_features, dtype=bias_dtype, device=device), requires_grad=False))

    def shapes(self) -> dict[str, tuple[int, int]]:
        """``{projection: (out, in)}`` of one expert's weight."""
        hidden, inter = self.hidden_size, self.intermediate_size
        return {"gate_up_proj": (2 * inter, hidden), "down_proj": (hidden, inter)}

    # the swiglu gate of GptOssExperts, the same function (interleaved gate/up columns, clamped at `limit`)
    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gpt_oss = gpt_oss_experts_class()
        if gpt_oss is None:
            import transformers.models.gpt_oss.modeling_gpt_oss as module

            gpt_oss = module.GptOssExperts
        return gpt_oss._apply_gate(self, gate_up)

    def forward(self, hidden_states: torch.Tensor, router_indices: Optional[torch.Tensor] = None,
                routing_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        return run_experts(Mxfp4ExpertsFormat(self), hidden_states, router_indices, routing_weights)

    @classmethod
    def from_float(cls, bank: nn.Module) -> Mxfp4Experts:
        """Quantize a float ``GptOssExperts`` (weights ``(E, in, out)``) to MXFP4 (its biases kept as they are)."""
        gate_up, down = bank.gate_up_proj, bank.down_proj
        num_experts, hidden, two_inter = gate_up.shape
        new = cls(num_experts, hidden, two_inter // 2, bank.alpha, bank.limit, bank.gate_up_proj_bias.dtype,
                  gate_up.device)
        with torch.no_grad():
            for proj, weight in (("gate_up_proj", gate_up), ("down_proj", down)):
                blocks, scales = mxfp4_quantize(weight.detach().transpose(1, 2))  # (E, out, in) → codes
                getattr(new, f"{proj}_blocks").copy_(blocks)
                getattr(new, f"{proj}_scales").copy_(scales)
                getattr(new, f"{proj}_bias").copy_(getattr(bank, f"{proj}_bias").detach())
        return new.train(bank.training)

    @classmethod
    def from_transformers(cls, bank: nn.Module) -> Mxfp4Experts:
        """Adopt an MXFP4 bank of transformers that holds the Hub's tensors as plain tensors (``{proj}_blocks``,
        ``{proj}_scales``, ``{proj}_bias``), without copying them; anything else raises with the fix."""
        names = [f"{proj}_{part}" for proj in PROJECTIONS for part in ("blocks", "scales", "bias")]
        tensors = {name: getattr(bank, name, None) for name in names}
        if not all(type(t) in (torch.Tensor, nn.Parameter) for t in tensors.values()):
            raise UnsupportedLayerError(_TRANSFORMERS_MXFP4_FIX)
        blocks = tensors["gate_up_proj_blocks"]
        num_experts, two_inter, groups, _ = blocks.shape
        new = cls(num_experts, groups * MX_GROUP, two_inter // 2, getattr(bank, "alpha", 1.702),
                  getattr(bank, "limit", 7.0), tensors["gate_up_proj_bias"].dtype, device=torch.device("meta"))
        for name, tensor in tensors.items():
            if tuple(tensor.shape) != tuple(getattr(new, name).shape):
                raise ValueError(f"{type(bank).__name__}.{name} has shape {tuple(tensor.shape)}, expected "
                                 f"{tuple(getattr(new, name).shape)} from gate_up_proj_blocks. Fix: load the bank's "
                                 "tensors from one checkpoint (they are not gpt-oss' MXFP4 layout as they stand).")
            if name.endswith("_bias"):
                setattr(new, name, nn.Parameter(tensor.detach(), requires_grad=False))
            else:
                new._buffers[name] = tensor.detach()
        return new.train(bank.training)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, mxfp4")


_TRANSFORMERS_MXFP4_FIX = (
    "transformers' Mxfp4GptOssExperts holds its MXFP4 weights swizzled for its GPU Triton kernels, which run forward "
    "only (no input gradient), so no adapter can train through it and peft-quant cannot read it on CPU. Fix: load the "
    "model with `quantization_config=Mxfp4Config(dequantize=True)` (float GptOssExperts; transformers does this on "
    "CPU by itself), then call `peft_quant.experts.quantize_experts(model)` to get peft-quant's trainable MXFP4 bank "
    "(Mxfp4Experts) back: re-quantizing a dequantized MXFP4 weight gives the same values."
)


def quantize_experts(model: nn.Module) -> dict[str, str]:
    """Replace every float ``GptOssExperts`` of ``model`` (in place) by an :class:`Mxfp4Experts`, and adopt
    transformers' MXFP4 banks that hold plain tensors; returns ``{module name: what was done}``.

    Widths that are not multiples of 32 raise with the fix; so do transformers' GPU-only ``Mxfp4GptOssExperts``.
    """
    float_cls, mxfp4_cls = gpt_oss_experts_class(), _transformers_mxfp4_class()
    done: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        if float_cls is not None and isinstance(module, float_cls):
            new, what = Mxfp4Experts.from_float(module), "quantized to MXFP4"
        elif mxfp4_cls is not None and isinstance(module, mxfp4_cls):
            new, what = Mxfp4Experts.from_transformers(module), "adopted"
        else:
            continue
        model.set_submodule(name, new)
        done[name] = what
    return done


# ---- formats --------------------------------------------------------------------------------------------------------


class ExpertsFormat(WeightFormat):
    """An expert bank in :class:`~peft_quant.quant_formats.WeightFormat`'s interface, for the shared merge machinery.

    The "weight" of :meth:`dequantize`/:meth:`requantize` is the bank's flat vector (:meth:`join` of each projection's
    ``(E, out, in)`` weight); :meth:`dequantize_projection` gives one projection, :meth:`project` one expert's product
    as the bank's forward computes it. ``in_features``/``out_features`` of the facts are the bank's (``H``, ``H``).
    """

    input_grad_fix: ClassVar[str] = "use peft_quant.experts.Mxfp4Experts (quantize_experts) or a float bank"

    @property
    def num_experts(self) -> int:
        raise NotImplementedError

    def shapes(self) -> dict[str, tuple[int, int]]:
        """``{projection: (out, in)}`` of one expert's weight."""
        raise NotImplementedError

    def widths(self, proj: str) -> tuple[int, int]:
        return self.shapes()[proj]

    def dequantize_projection(self, proj: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A float copy of projection ``proj``'s weights, ``(E, out, in)``."""
        raise NotImplementedError

    def project(self, proj: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        """``x Wᵀ`` of expert ``expert``'s projection ``proj`` (no bias), as the bank's forward computes it."""
        raise NotImplementedError

    def bias(self, proj: str) -> torch.Tensor:
        """Projection ``proj``'s biases ``(E, out)``."""
        return getattr(self.layer, f"{proj}_bias")

    def apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.layer._apply_gate(gate_up)

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The flat weight → ``{projection: (E, out, in)}`` (views)."""
        parts, start = {}, 0
        for proj, (out_features, in_features) in self.shapes().items():
            size = self.num_experts * out_features * in_features
            parts[proj] = flat[start:start + size].view(self.num_experts, out_features, in_features)
            start += size
        return parts

    @staticmethod
    def join(parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """``{projection: (E, out, in)}`` → the flat weight."""
        return torch.cat([parts[proj].reshape(-1) for proj in PROJECTIONS])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.join({proj: self.dequantize_projection(proj, dtype) for proj in PROJECTIONS})

    def requantize(self, weight: torch.Tensor) -> None:
        """Store a flat bank weight (:meth:`join`), projection by projection; the size is checked without
        dequantizing the bank (the base class would, to read the shape)."""
        self.check_mergeable()
        size = sum(self.num_experts * rows * cols for rows, cols in self.shapes().values())
        if tuple(weight.shape) != (size,):
            raise ValueError(f"A bank weight of shape {tuple(weight.shape)} does not fit {self.facts.label} bank of "
                             f"{size} weights ({self.shapes()} per expert, {self.num_experts} experts).")
        self._store(weight)

    def _store(self, weight: torch.Tensor) -> None:
        for proj, part in self.split(weight).items():
            self._store_projection(proj, part)

    def _store_projection(self, proj: str, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def _facts_for(self, backend: str, scheme: str, bits: int) -> BaseFormat:
        hidden = self.shapes()["down_proj"][0]
        return BaseFormat(backend, scheme, bits, "experts", hidden, hidden, True)


class FloatExpertsFormat(ExpertsFormat):
    """transformers' float ``GptOssExperts``: ``gate_up_proj`` ``(E, H, 2I)`` and ``down_proj`` ``(E, I, H)``, each
    stored ``(in, out)`` per expert (the forward computes ``x @ W[e]``)."""

    @classmethod
    def matches(cls, layer: nn.Module) -> bool:
        gpt_oss = gpt_oss_experts_class()
        return gpt_oss is not None and isinstance(layer, gpt_oss) and layer.gate_up_proj.is_floating_point()

    def _facts(self) -> BaseFormat:
        dtype = self.layer.gate_up_proj.dtype
        return self._facts_for("torch", f"{str(dtype).removeprefix('torch.')} experts", dtype.itemsize * 8)

    @property
    def num_experts(self) -> int:
        return self.layer.gate_up_proj.shape[0]

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {proj: tuple(getattr(self.layer, proj).shape[:0:-1]) for proj in PROJECTIONS}

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.layer.gate_up_proj.dtype

    def dequantize_projection(self, proj: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return getattr(self.layer, proj).detach().transpose(1, 2).to(dtype, copy=True)  # (E, in, out) → (E, out, in)

    def project(self, proj: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        return x @ getattr(self.layer, proj)[expert]

    def save_state(self) -> dict[str, Any]:
        return {proj: getattr(self.layer, proj).detach().clone() for proj in PROJECTIONS}

    def restore_state(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for proj in PROJECTIONS:
                getattr(self.layer, proj).copy_(state[proj])

    def _store_projection(self, proj: str, weight: torch.Tensor) -> None:
        param = getattr(self.layer, proj)
        with torch.no_grad():
            param.copy_(weight.transpose(1, 2).to(param.dtype))


class Mxfp4ExpertsFormat(ExpertsFormat):
    """peft-quant's :class:`Mxfp4Experts`: merging re-quantizes each projection to MXFP4 (the error is reported)."""

    _PARTS: ClassVar[tuple[str, ...]] = ("blocks", "scales")

    @classmethod
    def matches(cls, layer: nn.Module) -> bool:
        return isinstance(layer, Mxfp4Experts)

    def _facts(self) -> BaseFormat:
        # not "peft_quant": the model card would then print a `quantize_model(...)` line, which does not rebuild banks
        return self._facts_for("peft_quant.experts", "mxfp4", 4)

    @property
    def num_experts(self) -> int:
        return self.layer.num_experts

    def shapes(self) -> dict[str, tuple[int, int]]:
        return self.layer.shapes()

    @property
    def compute_dtype(self) -> torch.dtype:
        bias_dtype = self.layer.gate_up_proj_bias.dtype
        return bias_dtype if bias_dtype.is_floating_point else torch.float32

    def _codes(self, proj: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self.layer, f"{proj}_blocks"), getattr(self.layer, f"{proj}_scales")

    def dequantize_projection(self, proj: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return mxfp4_dequantize(*self._codes(proj), dtype)

    def project(self, proj: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        blocks, scales = self._codes(proj)
        return mxfp4_matmul(x, blocks[expert], scales[expert])

    def save_state(self) -> dict[str, Any]:
        return {f"{proj}_{part}": getattr(self.layer, f"{proj}_{part}").clone()
                for proj in PROJECTIONS for part in self._PARTS}

    def restore_state(self, state: dict[str, Any]) -> None:
        for name, tensor in state.items():
            getattr(self.layer, name).copy_(tensor)

    def _store_projection(self, proj: str, weight: torch.Tensor) -> None:
        blocks, scales = mxfp4_quantize(weight.to(torch.float32))
        for part, tensor in zip(self._PARTS, (blocks, scales)):
            getattr(self.layer, f"{proj}_{part}").copy_(tensor)


#: the expert-bank formats, probed in order by :func:`resolve_experts_format`
FORMATS: tuple[type[ExpertsFormat], ...] = (Mxfp4ExpertsFormat, FloatExpertsFormat)


def resolve_experts_format(layer: nn.Module) -> Optional[ExpertsFormat]:
    """The :class:`ExpertsFormat` of an expert bank; ``None`` for a module that is not one (a Linear layer, ...).

    transformers' GPU-only ``Mxfp4GptOssExperts`` raises :class:`~peft_quant.quant_formats.UnsupportedLayerError`
    with the fix."""
    for fmt in FORMATS:
        if fmt.matches(layer):
            return fmt(layer)
    mxfp4_cls = _transformers_mxfp4_class()
    if mxfp4_cls is not None and isinstance(layer, mxfp4_cls):
        raise UnsupportedLayerError(_TRANSFORMERS_MXFP4_FIX)
    return None
