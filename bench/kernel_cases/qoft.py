"""Timing cases for QOFT's kernels: building R, rotating activations, both together, and a whole training step of a
small 4-bit Llama against PEFT's OFT and LoRA.

Anchor: PEFT's own OFT (``peft.tuners.oft.layer.OFTRotationModule``), with the same block size and Neumann terms.
Activations are bfloat16 (a training run's compute dtype), rotation parameters float32, as both methods keep them.
"""

from __future__ import annotations

import tempfile

import torch

from .common import DEVICE, Case, no_grad, with_grads

NEUMANN_TERMS = 5
TOKENS = {"full": 8192, "quick": 8192, "smoke": 48}
SHAPES = {  # (width, block size)
    "full": [(4096, 32), (11008, 32), (4096, 64)],
    "quick": [(4096, 32)],
    "smoke": [(96, 32), (128, 64)],
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# (hidden size, layers, batch, sequence) of the training step's Llama
STEP = {"full": (1024, 4, 8, 512), "quick": (1024, 2, 2, 256), "smoke": (64, 1, 1, 16)}


def _peft_rotation_module(packed: torch.Tensor, width: int, b: int):
    """PEFT's OFT rotation module holding ``packed`` as its parameters (one block per ``b`` input channels)."""
    from peft.tuners.oft.layer import OFTRotationModule

    module = OFTRotationModule(r=width // b, n_elements=packed.shape[1], block_size=b, in_features=width,
                               use_cayley_neumann=True, num_cayley_neumann_terms=NEUMANN_TERMS).to(DEVICE)
    with torch.no_grad():
        module.weight.copy_(packed)
    return module


def _peft_einsum(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """PEFT's OFT rotation of ``x`` given its blocks, op for op as ``OFTRotationModule.forward`` does it."""
    rotated = torch.einsum("...rk,rkc->...rc", x.to(blocks.dtype).reshape(*x.shape[:-1], *blocks.shape[:2]), blocks)
    return rotated.reshape(x.shape).to(x.dtype)


def _shape_cases(tokens: int, width: int, b: int) -> list[Case]:
    from peft_quant.kernels import qoft as ops
    from peft_quant.qoft import rotation

    shape = f"{tokens}x{width} b={b}"
    blocks_n = width // b
    g = torch.Generator(device=DEVICE).manual_seed(0)
    packed = (torch.randn(blocks_n, rotation.num_packed(b), device=DEVICE, generator=g) * 0.1 / b**0.5).requires_grad_()
    x = torch.randn(tokens, width, device=DEVICE, generator=g).to(torch.bfloat16).requires_grad_()
    grad_out = torch.randn_like(x)
    blocks = rotation.cayley_neumann(packed, b, NEUMANN_TERMS).detach().requires_grad_()
    grad_blocks = torch.randn_like(blocks)
    peft_module = _peft_rotation_module(packed.detach(), width, b)
    activation_bytes = 2 * x.numel() * x.element_size()  # read x, write the output
    backward_bytes = 3 * x.numel() * x.element_size()  # read x and grad_out, write grad_x

    def ours_build():  # the layer's entry point: the Triton builder up to b = 32, torch's batched matmuls above
        return ops.cayley_neumann(packed, b, NEUMANN_TERMS)

    def reference_build():
        return rotation.cayley_neumann(packed, b, NEUMANN_TERMS)

    def anchor_build():
        return peft_module._cayley_batch(peft_module.weight, b, True, NEUMANN_TERMS)

    def ours_rotate():
        return ops.rotate(x, blocks)

    def reference_rotate():
        return rotation.rotate(x.to(blocks.dtype), blocks).to(x.dtype)

    def ours_adapter():  # the layer's entry point: blocks built in forward, rebuilt in backward (saves x only)
        return ops.rotate_input(x, packed, b, NEUMANN_TERMS)

    def reference_adapter():
        return rotation.rotate(x.to(packed.dtype), reference_build()).to(x.dtype)

    anchor = "peft OFT"
    return [
        Case("qoft build R", shape, no_grad(ours_build), no_grad(reference_build), no_grad(anchor_build),
             f"{anchor} _cayley_batch"),
        Case("qoft build R fwd+bwd", shape, with_grads(ours_build, (packed,), grad_blocks),
             with_grads(reference_build, (packed,), grad_blocks),
             with_grads(anchor_build, (peft_module.weight,), grad_blocks), f"{anchor} _cayley_batch"),
        Case("qoft rotate", shape, no_grad(ours_rotate), no_grad(reference_rotate),
             no_grad(lambda: _peft_einsum(x, blocks)), f"{anchor} einsum", bytes_moved=activation_bytes),
        Case("qoft rotate fwd+bwd", shape, with_grads(ours_rotate, (x, blocks), grad_out),
             with_grads(reference_rotate, (x, blocks), grad_out),
             with_grads(lambda: _peft_einsum(x, blocks), (x, blocks), grad_out), f"{anchor} einsum",
             bytes_moved=activation_bytes + backward_bytes),
        Case("qoft adapter (build + rotate) fwd+bwd", shape, with_grads(ours_adapter, (x, packed), grad_out),
             with_grads(reference_adapter, (x, packed), grad_out),
             with_grads(lambda: peft_module(x), (x, peft_module.weight), grad_out), f"{anchor} OFTRotationModule",
             bytes_moved=activation_bytes + backward_bytes),
    ]


def cases(size: str) -> list[Case]:
    """Builder, rotation and both together at :data:`TOKENS` tokens, for each of :data:`SHAPES` of ``size``."""
    return [case for width, b in SHAPES[size] for case in _shape_cases(TOKENS[size], width, b)]


# ---- a whole training step -------------------------------------------------------------------------------------


def _tiny_llama_dir(hidden: int, layers: int) -> str:
    """A random Llama (``hidden`` wide, heads of 64) saved to a temporary folder, to be loaded 4-bit like a real
    checkpoint.

    Vocabulary 8192: with Llama's 32000 at this width the LM head alone would outweigh the four layers' adapted
    projections, unlike in real models, and hide the adapters' cost."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads = max(1, hidden // 64)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=8192,
                         max_position_embeddings=1024)
    path = tempfile.mkdtemp(prefix="qoft_bench_llama_")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _training_step(path: str, adapter_config, batch: int, seq: int):
    """A closure running one forward + backward + AdamW step of a fresh NF4 load of ``path`` with the adapter."""
    from peft import get_peft_model
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    model = LlamaForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=torch.bfloat16,
                                             device_map={"": DEVICE})
    model = get_peft_model(model, adapter_config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=DEVICE,
                        generator=torch.Generator(device=DEVICE).manual_seed(0))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def training_step_cases(size: str) -> list[Case]:
    """One training step of a 4-bit (bitsandbytes NF4) Llama, q/k/v/o adapted: QOFT (``ours``), PEFT's OFT
    (``anchor``) and PEFT's LoRA r=16 (``reference``), each on its own fresh load of the same checkpoint."""
    import peft

    import peft_quant

    hidden, layers, batch, seq = STEP[size]
    path = _tiny_llama_dir(hidden, layers)
    qoft = peft_quant.QOFTConfig(target_modules=TARGETS, block_size=32, num_neumann_terms=NEUMANN_TERMS)
    oft = peft.OFTConfig(target_modules=TARGETS, oft_block_size=32, r=0, use_cayley_neumann=True,
                         num_cayley_neumann_terms=NEUMANN_TERMS)
    lora = peft.LoraConfig(target_modules=TARGETS, r=16, lora_alpha=32, lora_dropout=0.0)
    return [
        Case(
            "training step (fwd+bwd+AdamW)", f"nf4 llama h{hidden} L{layers} {batch}x{seq}",
            ours=_training_step(path, qoft, batch, seq), reference=_training_step(path, lora, batch, seq),
            anchor=_training_step(path, oft, batch, seq), anchor_name="peft OFT b=32 (Cayley-Neumann, 5 terms)",
            notes="ours = QOFT b=32 (Triton kernels); reference column = PEFT LoRA r=16, not a PyTorch QOFT. Goal: "
                  "QOFT >= 1.3x faster than PEFT OFT and no slower than LoRA.",
        )
    ]
