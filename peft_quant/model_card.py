"""Model cards for peft-quant adapters, and a Hub push that keeps them.

The card is rendered from a template in ``model_cards/`` (installed as ``peft_quant.model_cards``) when a config
is saved from a model: :meth:`PeftQuantConfig.save_pretrained` calls :func:`write_model_card` with the facts
the tuner gathered while selecting the adapter's tensors (:func:`collect_card_facts`). Metadata PEFT already
wrote (tags, pipeline tag) is kept and ``library_name: peft`` is set.

transformers' ``push_to_hub`` saves and then overwrites ``README.md`` with a generic transformers card when the
Hub repository has none; :func:`push_to_hub` (installed on ``PeftModel`` for peft-quant adapters) uploads the
card ``save_pretrained`` wrote instead.
"""

from __future__ import annotations

import os
import string
import tempfile
from importlib import resources
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Optional

import torch
from huggingface_hub import ModelCard, ModelCardData

_BNB_SNIPPET = {
    "nf4": 'BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"{dq})',
    "fp4": 'BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4"{dq})',
    "int8": "BitsAndBytesConfig(load_in_8bit=True)",
}


def _version(package: str) -> Optional[str]:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def collect_card_facts(model: torch.nn.Module, layer_cls: type, adapter_state: dict[str, torch.Tensor]) -> dict:
    """What the card states about an adapter: its tensors, the layers it sits on, and the base model's class."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = [m for m in base.modules() if isinstance(m, layer_cls)]
    formats = {m.base_format for m in layers}
    tensors = [t for t in adapter_state.values() if isinstance(t, torch.Tensor)]
    return {
        "num_params": sum(t.numel() for t in tensors),
        "adapter_bytes": sum(t.numel() * t.element_size() for t in tensors),
        "adapter_dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors}),
        "num_layers": len(layers),
        "bases": sorted({f.label for f in formats}),
        "formats": sorted(formats, key=lambda f: f.label),
        "model_class": type(base).__name__,
        "model_module": type(base).__module__,
    }


def _human_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _quantize_line(facts: dict) -> Optional[str]:
    """The ``quantize_model`` call that rebuilds the base layers, when they were quantized by peft-quant."""
    formats = [f for f in facts["formats"] if f.backend in ("peft_quant", "peft_quant.experts", "bitsandbytes")]
    if not formats:
        return None
    bnb = [f for f in formats if f.backend == "bitsandbytes"]
    if bnb:
        extra = f', quant_type="{bnb[0].scheme}"' if bnb[0].bits == 4 else ""
        extra += ", double_quant=True" if bnb[0].double_quant else ""
        return f'peft_quant.quantize_model(base, bits={bnb[0].bits}, backend="bitsandbytes"{extra})'
    block_scaled = _block_scaled_backend(formats)
    if block_scaled:
        return f'peft_quant.quantize_model(base, backend="{block_scaled}")'
    return f'peft_quant.quantize_model(base, bits={formats[0].bits}, backend="int")'


def _block_scaled_backend(formats: list) -> Optional[str]:
    """``"fp8"``/``"mxfp4"`` when peft-quant's block-scaled layers (or MXFP4 expert banks) hold the base."""
    for fmt in formats:
        if fmt.backend.startswith("peft_quant") and fmt.scheme.split()[0] in ("fp8", "mxfp4"):
            return fmt.scheme.split()[0]
    return None


def _load_base_snippet(facts: dict, base_model: str) -> str:
    cls = facts["model_class"]
    module = facts["model_module"]
    if module.startswith("diffusers"):
        subfolder = "unet" if "UNet" in cls else "transformer"
        lines = [f"from diffusers import {cls}",
                 f'base = {cls}.from_pretrained("{base_model}", subfolder="{subfolder}")']
        quantize = _quantize_line(facts)
        return "\n".join(lines + ([quantize + "  # the same quantization as for training"] if quantize else []))
    if not module.startswith("transformers"):
        return f"base = ...  # load the base {cls} '{base_model}' as it was quantized for training"
    if any(f.backend == "peft_quant.experts" for f in facts["formats"]):  # gpt-oss: MXFP4 expert banks
        return (f"from transformers import {cls}, Mxfp4Config\nimport peft_quant\n"
                f"base = {cls}.from_pretrained(\"{base_model}\", quantization_config=Mxfp4Config(dequantize=True))\n"
                'peft_quant.quantize_model(base, backend="mxfp4", target_modules=r".*experts")'
                "  # the checkpoint's MXFP4 values again, bit for bit")
    if _block_scaled_backend(facts["formats"]):
        return (f"from transformers import {cls}\nimport peft_quant\n"
                f"base = peft_quant.load_quantized({cls}, \"{base_model}\")  # an FP8/MXFP4 checkpoint, on any device\n"
                f"# a float checkpoint instead: base = {cls}.from_pretrained(...); {_quantize_line(facts)}")
    if any(f.backend == "peft_quant" for f in facts["formats"]):
        return (f"from transformers import {cls}\nbase = {cls}.from_pretrained(\"{base_model}\")\n"
                f"{_quantize_line(facts)}  # the same quantization as for training")
    quant = ""
    imports = [cls]
    bnb = [f for f in facts["formats"] if f.backend == "bitsandbytes"]
    if bnb:
        dq = ", bnb_4bit_use_double_quant=True" if bnb[0].double_quant else ""
        quant = f", quantization_config={_BNB_SNIPPET[bnb[0].scheme].format(dq=dq)}"
        imports.append("BitsAndBytesConfig")
    return f"from transformers import {', '.join(imports)}\nbase = {cls}.from_pretrained(\"{base_model}\"{quant})"


def render_model_card(config: Any, facts: dict, adapter_id: str, existing: Optional[ModelCard] = None) -> ModelCard:
    """The card of one adapter, from the method's template, merged with metadata already present."""
    method = type(config).__name__.removesuffix("Config")
    base_model = config.base_model_name_or_path or "unknown base model"
    tags = set(existing.data.tags or []) if existing is not None else set()
    tags |= {"peft", "peft-quant", method.lower()}
    tags |= {f.backend for f in facts["formats"] if f.backend != "torch"}
    if config.base_model_name_or_path:
        tags.add(f"base_model:adapter:{config.base_model_name_or_path}")
    data = ModelCardData(
        library_name="peft",
        base_model=config.base_model_name_or_path,
        tags=sorted(tags),
        pipeline_tag=existing.data.pipeline_tag if existing is not None else None,
    )
    settings = {k: v for k, v in config.to_dict().items() if k in config.CARD_SETTINGS}
    versions = {
        "peft-quant": _version("peft-quant"),
        "PEFT": _version("peft"),
        "transformers": _version("transformers"),
        "diffusers": _version("diffusers") if facts["model_module"].startswith("diffusers") else None,
        "torch": torch.__version__,
    }
    template = string.Template(resources.files("peft_quant.model_cards").joinpath(config.CARD_TEMPLATE).read_text())
    body = template.substitute(
        title=f"{method} adapter for {base_model}",
        method=method,
        summary=config.METHOD_SUMMARY,
        peft_type=config.peft_type.value,
        format_version=config.format_version,
        base_model=base_model,
        model_class=facts["model_class"],
        bases=", ".join(facts["bases"]) or "none",
        num_layers=facts["num_layers"],
        num_params=f"{facts['num_params']:,}",
        adapter_bytes=_human_bytes(facts["adapter_bytes"]),
        adapter_dtypes=", ".join(facts["adapter_dtypes"]),
        settings=", ".join(f"`{k}={sorted(v) if isinstance(v, set) else v!r}`" for k, v in sorted(settings.items())),
        load_base=_load_base_snippet(facts, base_model),
        adapter_id=adapter_id,
        versions="\n".join(f"- {name} {v}" for name, v in versions.items() if v),
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def write_model_card(directory: str, config: Any, facts: dict, adapter_id: Optional[str] = None) -> None:
    """Write ``README.md`` into ``directory``, keeping metadata of a card already there."""
    path = os.path.join(directory, "README.md")
    existing = ModelCard.load(path) if os.path.exists(path) else None
    render_model_card(config, facts, adapter_id or directory, existing).save(path)


def push_to_hub(
    model: Any,
    repo_id: str,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    tags: Optional[list[str]] = None,
    **save_kwargs: Any,
):
    """Save ``model``'s adapters and upload them with peft-quant's model card (same arguments as
    transformers' ``push_to_hub``). The card names ``repo_id`` in its loading snippet."""
    from huggingface_hub import HfApi

    save_kwargs.pop("max_shard_size", None)  # adapters are never sharded
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as work_dir:
        model.save_pretrained(work_dir, **save_kwargs)
        for name, config in model.peft_config.items():
            facts = getattr(config, "_card_facts", None)
            if facts is None:
                continue
            folder = work_dir if name == "default" else os.path.join(work_dir, name)
            write_model_card(folder, config, facts, repo_id)
            if tags:
                card = ModelCard.load(os.path.join(folder, "README.md"))
                card.data.tags = sorted(set(card.data.tags or []) | set(tags))
                card.save(os.path.join(folder, "README.md"))
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=work_dir,
            commit_message=commit_message or "Upload peft-quant adapter",
            commit_description=commit_description,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )
