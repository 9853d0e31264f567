"""Adapter files, whole: what a save writes, and what a load accepts. Every failure is an error naming the fix.

* Saves are atomic (:func:`save_atomically`): PEFT writes the adapters into a folder beside the target, then their
  files replace the old adapter files by renames. A save that fails half-way (a full disk) leaves the previous
  adapter intact, and a save never mixes with files of an older adapter (a stale ``adapter_model.bin``, an old
  card's tags). Files that are not adapter files (a Trainer checkpoint's optimizer state) are never touched.
* Each save records a manifest of the tensors it wrote, dtype and shape per key, in ``adapter_config.json``
  (:func:`write_manifest`). A load (:func:`check_adapter_fits`) compares the file against that manifest (a cast or
  edited file would load without error and give other outputs) and against the model: every tensor the method
  holds, parameters and buffers alike, is present with its shape; no tensor names a module the model lacks;
  integer tensors keep their exact dtype.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Optional

import torch

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_config.json", "README.md")
SAFETENSORS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."
_SAFETENSORS_DTYPES = {  # safetensors' dtype codes -> torch dtype names
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2": "float8_e5m2", "F8_E5M2FNUZ": "float8_e5m2fnuz", "C64": "complex64",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16",
    "U8": "uint8", "BOOL": "bool",
}

# (file named in errors, its manifest: None where the loader could not read it) of the adapter file being loaded;
# None outside a file load (a state dict set directly, e.g. one taken from a model in memory)
_loading: ContextVar[Optional[tuple[str, Optional[dict]]]] = ContextVar("peft_quant_loading", default=None)


@contextmanager
def loading_from(source: str, manifest: Optional[dict]) -> Iterator[None]:
    """Within, :func:`check_adapter_fits` names ``source`` (the adapter file being loaded) in its errors and checks
    the file against ``manifest`` (read from the file's own ``adapter_config.json``; ``{}``: it has none; ``None``:
    unknown, then the manifest of the adapter's config is used)."""
    token = _loading.set((source, manifest))
    try:
        yield
    finally:
        _loading.reset(token)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_manifest(path: str) -> dict[str, list]:
    """``{key: [dtype, shape]}`` of every tensor in the safetensors file ``path``, from its header only."""
    from safetensors import safe_open

    manifest = {}
    with safe_open(path, framework="pt") as file:
        for key in file.keys():
            info = file.get_slice(key)
            code = info.get_dtype()
            manifest[key] = [_SAFETENSORS_DTYPES.get(code, code.lower()), list(info.get_shape())]
    return manifest


def header_tensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path`` as meta tensors (dtype and shape, no data): enough to check it."""
    return {key: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
            for key, (dtype, shape) in read_manifest(path).items()}


def write_manifest(folder: str) -> None:
    """Add the manifest of ``folder``'s freshly written adapter file to its ``adapter_config.json``."""
    config_path = os.path.join(folder, CONFIG_NAME)
    with open(config_path) as file:
        config = json.load(file)
    config["adapter_tensors"] = read_manifest(os.path.join(folder, SAFETENSORS_NAME))
    with open(config_path, "w") as file:
        file.write(json.dumps(config, indent=2, sort_keys=True))


def save_atomically(save_directory: str, adapter_names: list[str], write: Callable[[str], None],
                    finish: Callable[[str, str], None]) -> None:
    """Save adapters into ``save_directory`` so that a failure leaves the previous ones intact.

    ``write(folder)`` writes the adapters ``adapter_names`` into an empty folder beside ``save_directory`` (PEFT's
    layout: the ``default`` adapter at the top, the others in subfolders named after them); ``finish(folder, name)``
    then completes each adapter's folder. Only then does each new file replace the adapter files of that folder
    (:data:`ADAPTER_FILES`), by renames: adapter files the new save did not write are removed, other files kept.
    """
    target = os.path.realpath(save_directory)  # the real folder: its parent is on the same file system
    if os.path.isfile(target):
        raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.saving-", dir=parent)
    try:
        new, old = os.path.join(staging, "new"), os.path.join(staging, "old")
        write(new)
        subfolders = {name: "" if name == "default" else name for name in adapter_names}
        for name, sub in subfolders.items():
            finish(os.path.join(new, sub), name)
        _swap_in(new, old, target, sorted(set(subfolders.values())))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_in(new: str, old: str, target: str, subfolders: list[str]) -> None:
    """Move each subfolder's new files into ``target``, first moving its old adapter files to ``old``; undo all on
    failure. Renames within one file system write no data, so they do not fail on a full disk."""
    undo: list[tuple[str, Optional[str]]] = []  # (where a file is now, where it goes back; None: remove it)
    try:
        for sub in subfolders:
            destination, backup = os.path.join(target, sub), os.path.join(old, sub)
            os.makedirs(destination, exist_ok=True)
            os.makedirs(backup, exist_ok=True)
            for name in ADAPTER_FILES:
                if os.path.isfile(os.path.join(destination, name)):
                    os.replace(os.path.join(destination, name), os.path.join(backup, name))
                    undo.append((os.path.join(backup, name), os.path.join(destination, name)))
            for name in sorted(os.listdir(os.path.join(new, sub))):
                source = os.path.join(new, sub, name)
                if os.path.isfile(source):
                    os.replace(source, os.path.join(destination, name))
                    undo.append((os.path.join(destination, name), None))
    except BaseException:
        for now, back in reversed(undo):
            if back is None:
                os.remove(now)
            else:
                os.replace(now, back)
        raise


def _file_keys(tuner_cls: type, model: torch.nn.Module, adapter_name: str, adapter_keys: list[str]) -> dict[str, str]:
    """Model state key -> key in the adapter file: the inverse of PEFT's renaming on load (adapter name removed from
    the method's tensors; ``modules_to_save`` and trainable-token wrappers' own load maps)."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    keys = {key: tuner_cls._remove_adapter_name_from_key(key, adapter_name) for key in adapter_keys}
    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            for file_key, model_key in module.adapter_state_dict_load_map(adapter_name).items():
                keys[f"{name}.{model_key}"] = f"{name}.{file_key}"
    return keys


def _missing_module(modules: set[str], key: str) -> str:
    """The first part of ``key`` (a dotted path) that names no module of the model."""
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[: end + 1])
    return parts[0]


def check_adapter_fits(tuner_cls: type, model: torch.nn.Module, config: Any, adapter_name: str,
                       state_dict: dict[str, torch.Tensor]) -> None:
    """Raise a ``ValueError`` naming the file, the keys and the fix when ``state_dict`` (an adapter file's tensors,
    already remapped by PEFT to the model's keys) is not the file that was saved, or does not fit ``model``.

    Checked: when loading a file (see :func:`loading_from`), each tensor against the manifest saved with it (dtype
    and shape, exactly); each tensor against the model (present, same shape; integer tensors the same dtype; a float
    tensor may load into another float dtype, the precision the model was loaded in); and every tensor of the
    method's layers for ``adapter_name`` (parameters and buffers) present in the file.
    """
    from peft.tuners.tuners_utils import _filter_state_dict_by_key_prefixes, _get_tuner_state_dict_key_prefixes

    model_state = model.state_dict()
    prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
    expected = set(_filter_state_dict_by_key_prefixes(model_state, prefixes))
    file_keys = _file_keys(tuner_cls, model, adapter_name, sorted(expected))
    source, file_manifest = _loading.get() or (None, {})  # a state dict from memory has no manifest to match
    manifest = dict((file_manifest if file_manifest is not None else getattr(config, "adapter_tensors", None)) or {})
    prefixed = any(key.startswith(_PEFT_PREFIX) for key in model_state)  # a PeftModel, not an injected model
    modules = {name for name, _ in model.named_modules()}
    edited: list[str] = []  # the file is not what was saved
    misfit: list[str] = []  # the file is for another model
    for key, tensor in state_dict.items():
        model_key = key if prefixed else key.removeprefix(_PEFT_PREFIX)  # as PEFT loads it
        file_key = file_keys.get(model_key, key)
        shown = f"{file_key}: {_dtype_name(tensor.dtype)} {tuple(tensor.shape)}"
        if manifest:
            saved = manifest.pop(file_key, None) or manifest.pop(_PEFT_PREFIX + file_key, None)
            if saved is None:
                edited.append(f"{shown} is not in the manifest saved with the adapter")
            elif saved != [_dtype_name(tensor.dtype), list(tensor.shape)]:
                edited.append(f"{shown} was saved as {saved[0]} {tuple(saved[1])}")
        target = model_state.get(model_key)
        if not isinstance(target, torch.Tensor):
            misfit.append(f"{file_key}: this model has no {_missing_module(modules, model_key)!r}")
            continue
        expected.discard(model_key)
        if target.shape != tensor.shape:
            misfit.append(f"{file_key}: adapter {tuple(tensor.shape)} vs model {tuple(target.shape)}")
        elif target.dtype != tensor.dtype and not (target.is_floating_point() and tensor.is_floating_point()):
            edited.append(f"{shown}, but the method holds it as {_dtype_name(target.dtype)}")
    edited += [f"{key}: in the manifest but missing from the file" for key in sorted(manifest)]
    misfit += [f"{file_keys.get(key, key)}: missing from the adapter file" for key in sorted(expected)]
    method = getattr(tuner_cls, "method_name", "") or tuner_cls.__name__
    where = f" ({source})" if source else ""

    def listed(problems: list[str]) -> str:
        return "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" if len(problems) > 5 else "")

    if edited:
        raise ValueError(
            f"This {method} adapter file{where} is not the file that was saved: {listed(edited)}. A tensor cast to "
            "another dtype (or edited) after saving loads into different numbers, e.g. integer indices cast to "
            "float16 round above 2048. Fix: use the file exactly as saved (save it again from the trained model, or "
            "download it again); to run in another precision, load it as saved, then cast the model."
        )
    if misfit:
        raise ValueError(
            f"This {method} adapter{where} does not fit the model it is loaded onto (was it trained on another base "
            f"model, base_model_name_or_path={config.base_model_name_or_path!r}?): {listed(misfit)}. Fix: load it "
            f"onto the base model it was trained on, {getattr(tuner_cls, 'fit_hint', 'with the same config')}."
        )
