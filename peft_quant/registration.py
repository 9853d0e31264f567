"""Make peft-quant's methods first-class PEFT methods, without editing peft.

PEFT keys every method by a member of its closed ``PeftType`` enum, and ``register_peft_method`` refuses names
that are not already members. Since peft 0.21 everything else is delegated to the tuner class (selecting and
remapping the adapter's state dict on save and load), so a real enum member is all that is missing. This module
adds one member per method to ``PeftType`` the way ``enum`` itself builds members, then calls PEFT's public
``register_peft_method``. A real member (rather than a plain string) matters: transformers' ``load_adapter``
and several PEFT code paths call ``peft_type.value``.

It also routes, for peft-quant adapters only:

* ``PeftModel.push_to_hub`` through :func:`peft_quant.model_card.push_to_hub`, because transformers' push replaces
  the README of a new repository with a generic card *after* saving;
* ``PeftModel.save_pretrained`` through an atomic save (:func:`peft_quant.adapter_checks.save_atomically`) that also
  records the manifest of the saved tensors and never writes pickle files;
* ``PeftModel.load_adapter`` (which ``from_pretrained`` calls), so that the load-time checks name the file and read
  its manifest, and pickle adapter files are refused; transformers' ``load_adapter``, which skips PEFT's load hooks,
  so that the same checks run on a local adapter file;
* ``PeftConfig.from_json_file`` so that a wrong-typed or unknown field of a peft-quant ``adapter_config.json`` is an
  error naming the file.

Everything that depends on peft's internals lives here; :func:`check_peft` fails at import, naming the supported
range, when those internals are not what this module expects.
"""

from __future__ import annotations

import enum
import functools
import inspect
import json
import os
from importlib.metadata import version
from typing import Any, Callable

from packaging.version import Version

SUPPORTED_PEFT = ">=0.21.0"
_MIN_PEFT = Version("0.21.0")


class PeftVersionError(ImportError):
    """Raised at ``import peft_quant`` when the installed peft cannot host peft-quant's methods."""


def _fail(reason: str) -> None:
    raise PeftVersionError(
        f"peft-quant needs peft {SUPPORTED_PEFT} (tested on 0.21.x); the installed peft {version('peft')} "
        f"{reason}. Fix: pip install -U 'peft{SUPPORTED_PEFT}'."
    )


def check_peft() -> None:
    """Verify the peft internals this module relies on; raise :class:`PeftVersionError` naming the fix."""
    if Version(version("peft")) < _MIN_PEFT:
        _fail("is too old (before 0.21 peft refuses to save adapters of a method it does not know)")
    from peft import mapping
    from peft.tuners.tuners_utils import BaseTuner
    from peft.utils import peft_types

    for name in ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING"):
        if not isinstance(getattr(mapping, name, None), dict):
            _fail(f"has no dict peft.mapping.{name}")
    if not callable(getattr(peft_types, "register_peft_method", None)):
        _fail("has no peft.utils.peft_types.register_peft_method")
    for hook in ("_get_adapter_state_dict", "_remap_adapter_state_dict_for_load", "_remove_adapter_name_from_key"):
        if not hasattr(BaseTuner, hook):
            _fail(f"has no BaseTuner.{hook} (the per-method save/load hooks peft-quant overrides)")
    from peft import PeftModel, tuners
    from peft.config import PeftConfigMixin
    from peft.utils import other

    for owner, name in ((tuners.tuners_utils, "_get_tuner_state_dict_key_prefixes"),
                        (tuners.tuners_utils, "_filter_state_dict_by_key_prefixes"),
                        (PeftModel, "save_pretrained"), (PeftModel, "load_adapter"),
                        (getattr(other, "AuxiliaryTrainingWrapper", None), "adapter_state_dict_load_map")):
        if not callable(getattr(owner, name, None)):
            _fail(f"has no {getattr(owner, '__name__', owner)}.{name} (used to save and check adapter files)")
    if not isinstance(PeftConfigMixin.__dict__.get("from_json_file"), classmethod):
        _fail("has no classmethod PeftConfigMixin.from_json_file (peft-quant checks adapter_config.json as read)")
    if {"save_directory", "safe_serialization", "selected_adapters", "is_main_process"} - set(
        inspect.signature(PeftModel.save_pretrained).parameters
    ):
        _fail("has a PeftModel.save_pretrained without save_directory, safe_serialization, selected_adapters or "
              "is_main_process")
    enum_cls = peft_types.PeftType
    if not (issubclass(enum_cls, str) and issubclass(enum_cls, enum.Enum)):
        _fail("defines PeftType differently (expected a str Enum)")
    for attr in ("_member_map_", "_value2member_map_", "_member_names_"):
        if not hasattr(enum_cls, attr):
            _fail(f"runs on a Python whose Enum lacks {attr}")


def _add_enum_member(enum_cls: type[enum.Enum], name: str) -> enum.Enum:
    """Add ``name`` (value == name) to a ``str`` Enum, as ``enum`` builds members; idempotent."""
    if name in enum_cls.__members__:
        return enum_cls[name]
    member = str.__new__(enum_cls, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    add_member = getattr(enum_cls, "_add_member_", None)  # Python >= 3.13 keeps members in descriptors
    if add_member is not None:
        add_member(name, member)
    else:
        type.__setattr__(enum_cls, name, member)
        enum_cls._member_map_[name] = member
    if name not in enum_cls._member_names_:
        enum_cls._member_names_.append(name)
    enum_cls._value2member_map_[name] = member
    return member


_OUR_TYPES: set[str] = set()


def register(name: str, config_cls: type, model_cls: type) -> None:
    """Register one peft-quant method (``name`` in lower case, e.g. ``"qoft"``) with PEFT."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils.peft_types import PeftType, register_peft_method

    member = _add_enum_member(PeftType, name.upper())
    known = PEFT_TYPE_TO_CONFIG_MAPPING.get(member)
    if known is config_cls:
        return  # already registered (e.g. module reloaded)
    if known is not None:
        _fail(f"already defines a method {name.upper()!r} ({known.__module__}.{known.__name__})")
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)
    _OUR_TYPES.add(member.value)
    _install_file_routes()


def is_peft_quant_type(peft_type: object) -> bool:
    """True for the PEFT types registered by peft-quant."""
    return getattr(peft_type, "value", peft_type) in _OUR_TYPES


def _route(owner: type, name: str, make: Callable[[Callable], Callable]) -> None:
    """Replace ``owner.name`` (a method or classmethod) by ``make(original)`` once (re-imports keep one wrapper)."""
    raw = owner.__dict__.get(name)
    is_classmethod = isinstance(raw, classmethod)
    original = raw.__func__ if is_classmethod else getattr(owner, name)
    if getattr(original, "_peft_quant", False):
        return
    routed = functools.wraps(original)(make(original))
    routed._peft_quant = True
    setattr(owner, name, classmethod(routed) if is_classmethod else routed)


def install_push_to_hub() -> None:
    """Route ``PeftModel.push_to_hub`` through peft-quant's card-preserving push for peft-quant adapters only."""
    from peft import PeftModel

    def make(original: Callable) -> Callable:
        def push_to_hub(self, repo_id: str, *args, **kwargs):
            if not any(is_peft_quant_type(c.peft_type) for c in self.peft_config.values()):
                return original(self, repo_id, *args, **kwargs)
            from .model_card import push_to_hub as push_with_card

            return push_with_card(self, repo_id, *args, **kwargs)

        return push_to_hub

    _route(PeftModel, "push_to_hub", make)


def _save_route(original: Callable) -> Callable:
    """``PeftModel.save_pretrained``, atomic and with a tensor manifest where a peft-quant adapter is saved."""

    def save_pretrained(self, *args: Any, **kwargs: Any) -> None:
        bound = inspect.signature(original).bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        names = arguments["selected_adapters"] or list(self.peft_config)
        ours = [name for name in names if is_peft_quant_type(getattr(self.peft_config.get(name), "peft_type", None))]
        if not ours or not arguments["is_main_process"]:
            return original(*bound.args, **bound.kwargs)
        if not arguments["safe_serialization"]:
            raise ValueError(
                f"peft-quant adapters ({', '.join(ours)}) are saved as safetensors only: a pickle file "
                "(adapter_model.bin) can run code when loaded. Fix: drop safe_serialization=False."
            )
        from .adapter_checks import save_atomically, write_manifest
        from .model_card import write_model_card

        save_directory = os.fspath(arguments["save_directory"])

        def write(folder: str) -> None:
            arguments["save_directory"] = folder
            original(*bound.args, **bound.kwargs)

        def finish(folder: str, name: str) -> None:
            if name not in ours:
                return
            write_manifest(folder)
            config = self.peft_config[name]
            facts = getattr(config, "_card_facts", None)
            if facts is not None:  # the card's loading snippet names where the adapter ends up, not the staging folder
                final = save_directory if name == "default" else os.path.join(save_directory, name)
                write_model_card(folder, config, facts, adapter_id=final)

        save_atomically(save_directory, names, write, finish)

    return save_pretrained


def _adapter_file(model_id: str, subfolder: Any) -> tuple[str, Any]:
    """(the adapter's safetensors file as named in errors, its manifest: ``{}`` when it has none, ``None`` when not
    readable here), for a local folder or a Hub repository id."""
    folder = os.path.join(os.fspath(model_id), subfolder or "")
    if not os.path.isdir(folder):
        return f"{'/'.join(filter(None, [os.fspath(model_id), subfolder]))}/adapter_model.safetensors on the Hub", None
    config_path = os.path.join(folder, "adapter_config.json")
    config = {}
    if os.path.isfile(config_path):
        with open(config_path) as file:
            config = json.load(file)
    ours = is_peft_quant_type(config.get("peft_type"))
    file = os.path.join(folder, "adapter_model.safetensors")
    if ours and not os.path.isfile(file) and os.path.isfile(os.path.join(folder, "adapter_model.bin")):
        raise ValueError(
            f"{folder} holds a pickle adapter file (adapter_model.bin) of a peft-quant adapter; peft-quant loads "
            "safetensors only, since unpickling can run code. Fix: convert it where you trust it "
            "(safetensors.torch.save_file(torch.load(path, weights_only=True), 'adapter_model.safetensors')), or "
            "save the adapter again."
        )
    return file, (config.get("adapter_tensors") or {}) if ours else None


def _load_route(original: Callable) -> Callable:
    """``PeftModel.load_adapter``: the load-time checks (run inside PEFT's remap hook) name the adapter file and read
    its manifest."""

    def load_adapter(self, model_id: str, *args: Any, **kwargs: Any):
        from .adapter_checks import loading_from

        with loading_from(*_adapter_file(model_id, kwargs.get("subfolder"))):
            return original(self, model_id, *args, **kwargs)

    return load_adapter


def _transformers_load_route(original: Callable) -> Callable:
    """transformers' ``load_adapter`` loads the tensors itself, never calling PEFT's remap hook where the checks run
    (a 2-layer adapter loads onto a 1-layer model with an "UNEXPECTED" key table only). For a peft-quant adapter in a
    local folder, check the file afterwards from its header, through the same hook, and remove the adapter again when
    it is refused."""
    signature = inspect.signature(original)

    def load_adapter(self, *args: Any, **kwargs: Any):
        arguments = signature.bind_partial(self, *args, **kwargs).arguments
        result = original(self, *args, **kwargs)
        name = arguments.get("adapter_name") or "default"
        config = getattr(self, "peft_config", {}).get(name)
        model_id = arguments.get("peft_model_id")
        if model_id is None or config is None or not is_peft_quant_type(config.peft_type):
            return result
        source, manifest = _adapter_file(model_id, (arguments.get("adapter_kwargs") or {}).get("subfolder"))
        if not os.path.isfile(source):  # a Hub repository: transformers' own key table is all there is
            return result
        from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

        from .adapter_checks import header_tensors, loading_from

        try:
            with loading_from(source, manifest):
                PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type]._remap_adapter_state_dict_for_load(
                    self, config, name, header_tensors(source)
                )
        except ValueError as refused:
            try:
                self.delete_adapter(name)
            except ValueError:  # transformers >= 5.24 deletes adapters only with peft >= 0.22
                raise ValueError(f"{refused} (The model still holds the refused adapter {name!r}, which this "
                                 "transformers cannot delete with this peft: load the base model again.)") from None
            raise refused
        return result

    return load_adapter


def _config_file_route(original: Callable) -> Callable:
    """``PeftConfig.from_json_file``: check a peft-quant config's fields (names and types) as read, naming the file."""

    def from_json_file(cls, path_json_file: str, **kwargs: Any) -> dict:
        values = original(cls, path_json_file, **kwargs)
        if is_peft_quant_type(values.get("peft_type")):
            from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

            from .config_base import check_field_types

            check_field_types(PEFT_TYPE_TO_CONFIG_MAPPING[values["peft_type"]], values, source=path_json_file)
        return values

    return from_json_file


def _install_file_routes() -> None:
    """Route PEFT's adapter saving and loading for peft-quant adapters (see the module docstring)."""
    from peft import PeftModel
    from peft.config import PeftConfigMixin
    from transformers.integrations.peft import PeftAdapterMixin

    _route(PeftModel, "save_pretrained", _save_route)
    _route(PeftModel, "load_adapter", _load_route)
    _route(PeftAdapterMixin, "load_adapter", _transformers_load_route)
    _route(PeftConfigMixin, "from_json_file", _config_file_route)
