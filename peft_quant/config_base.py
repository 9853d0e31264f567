"""What every peft-quant config shares: a format version, strict fields, and a model card on save.

* ``format_version`` is written to ``adapter_config.json``. Each method bumps its ``FORMAT_VERSION`` whenever the
  meaning of saved tensors changes (e.g. QOFT's Neumann form), so an old adapter is refused with a clear error
  instead of silently loading into different numbers.
* Unknown fields raise a ``ValueError`` naming the closest valid field. (PEFT itself drops unknown fields with a
  warning when loading, which would silently change a trained adapter's meaning.)
* Every field is checked against its annotation (``Optional``, ``Union``, ``list``, ``dict``, ``Literal``; a bool is
  not an int; an int is a float). A wrong type raises a ``ValueError`` naming the field, the expected type, the
  value and the fix, instead of a raw error from deep inside or a silently accepted value. ``registration.py`` runs
  the same check on ``adapter_config.json`` as it is read, so the error names the file.
* ``adapter_tensors`` is the manifest of the saved tensors (dtype and shape per key), written by the save next to
  ``adapter_model.safetensors`` and checked when loading (:mod:`peft_quant.adapter_checks`).
* ``save_pretrained`` also renders the method's model card from ``model_cards/`` next to the config.
"""

from __future__ import annotations

import difflib
import functools
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal, Optional, Union

from peft import PeftConfig


class AdapterFormatError(ValueError):
    """The adapter was saved in a format version this peft-quant does not read."""


def _unknown_fields_error(cls: type, unknown: list[str], source: Optional[str]) -> ValueError:
    names = sorted(f.name for f in fields(cls))
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, names, n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ValueError(
        f"{cls.__name__} got unknown field(s) {', '.join(hints)}{f' in {source}' if source else ''}. Valid fields: "
        f"{', '.join(names)}. If this comes from an adapter_config.json saved by a newer peft-quant, upgrade: "
        "pip install -U peft-quant."
    )


def strict_fields(cls: type) -> type:
    """Class decorator (apply above ``@dataclass``): unknown keyword arguments raise a clear ``ValueError``."""
    init = cls.__init__
    names = {f.name for f in fields(cls)}

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise _unknown_fields_error(cls, unknown, None)
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The annotation of each init field of the config class ``cls`` (all are type-checked)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls) if f.init}


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the type ``hint`` (the annotation forms peft-quant's and PEFT's configs use)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(_matches(value, arm) for arm in args)
    if origin is Literal:
        return any(value == choice and type(value) is type(choice) for choice in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is list or origin is list:  # configs turn lists into sets (target_modules) or tuples; JSON gives lists
        return isinstance(value, (list, tuple, set, frozenset)) and all(_matches(v, args[0]) for v in value if args)
    if hint is dict or origin is dict:
        return isinstance(value, dict) and (
            not args or all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
        )
    if isinstance(hint, type):
        return isinstance(value, hint)
    raise NotImplementedError(f"peft-quant's config type check does not know the annotation {hint!r}.")


_WORDS = {bool: ("true or false", "bools"), int: ("an integer", "integers"), float: ("a number", "numbers"),
          str: ("a string", "strings"), list: ("a list", "lists"), dict: ("a dict", "dicts")}


def describe_type(hint: Any, plural: bool = False) -> str:
    """``hint`` in words, for error messages (``plural``: as the elements of a list, e.g. "strings")."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        # sorted: typing caches equal Unions, so the order of `args` depends on which module built one first
        arms = sorted(describe_type(arm, plural) for arm in args if arm is not type(None))
        return " or ".join(arms + (["None"] if type(None) in args else []))
    if origin is Literal:
        return "one of " + ", ".join(repr(choice) for choice in args)
    if args and origin is list:
        return f"{'lists' if plural else 'a list'} of {describe_type(args[0], plural=True)}"
    if args and origin is dict:
        return f"{'dicts' if plural else 'a dict'} of {describe_type(args[0], True)} to {describe_type(args[1], True)}"
    if hint in _WORDS:
        return _WORDS[hint][plural]
    return getattr(hint, "__name__", repr(hint))


def check_field_types(cls: type, values: Mapping[str, Any], source: Optional[str] = None) -> None:
    """Raise a ``ValueError`` naming the field, expected type, value and fix for the first value in ``values`` that
    does not have its field's type in config class ``cls``; with ``source`` (a file), also unknown fields."""
    types_ = field_types(cls)
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if source is not None and unknown:
        raise _unknown_fields_error(cls, unknown, source)
    for name, hint in types_.items():
        if name not in values or _matches(values[name], hint):
            continue
        value = values[name]
        fix = f"give {name} as {describe_type(hint)}"
        if isinstance(value, str):
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = value
            if parsed is not value and _matches(parsed, hint):
                fix = f"write {name}: {json.dumps(parsed)} (without quotes)" if source else f"pass {name}={parsed!r}"
        raise ValueError(
            f"{cls.__name__}.{name} must be {describe_type(hint)}, got {value!r} ({type(value).__name__})"
            f"{f' in {source}' if source else ''}. Fix: {fix}."
        )


@dataclass
class PeftQuantConfig(PeftConfig):
    """Base of peft-quant's configs (not used directly)."""

    FORMAT_VERSION: ClassVar[int] = 1
    CARD_TEMPLATE: ClassVar[str] = "adapter.md"
    METHOD_SUMMARY: ClassVar[str] = ""
    CARD_SETTINGS: ClassVar[tuple[str, ...]] = ()  # fields the model card lists

    stash: Optional[dict] = field(
        default=None,
        metadata={
            "help": "Also compress the activations saved for backward (StashQuant): settings as for "
            "peft_quant.enable_stash, e.g. {'bits': 4, 'milestones': [[0.5, 8]]}. None: off."
        },
    )
    format_version: Optional[int] = field(
        default=None,
        metadata={"help": "peft-quant's format version of this adapter; filled in automatically, checked on load."},
    )
    adapter_tensors: Optional[dict[str, list]] = field(
        default=None,
        metadata={
            "help": "Manifest of the tensors in adapter_model.safetensors, {key: [dtype, shape]}: written by the save "
            "beside the file it describes, checked on load (it catches a file cast or edited after saving). Never "
            "set it by hand; to_dict leaves it out, so it never travels to another save."
        },
    )

    def __post_init__(self) -> None:
        check_field_types(type(self), {name: getattr(self, name) for name in field_types(type(self))})
        super().__post_init__()
        if self.format_version is None:
            self.format_version = self.FORMAT_VERSION
        if self.format_version != self.FORMAT_VERSION:
            raise AdapterFormatError(
                f"This {type(self).__name__} adapter has format_version={self.format_version}, but this peft-quant "
                f"reads format_version={self.FORMAT_VERSION}. "
                + (
                    "It was saved by a newer peft-quant: pip install -U peft-quant."
                    if self.format_version > self.FORMAT_VERSION
                    else "It was saved by an older peft-quant whose tensors mean something else: load it with that "
                    "version, or retrain."
                )
            )

    def to_dict(self) -> dict[str, Any]:
        """The fields as saved, without ``adapter_tensors``: a manifest describes one saved file, and the save that
        writes the file writes its manifest (:func:`peft_quant.adapter_checks.write_manifest`)."""
        values = super().to_dict()
        values.pop("adapter_tensors", None)
        return values

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write ``adapter_config.json`` and, when saved from a model, the model card ``README.md``."""
        super().save_pretrained(save_directory, **kwargs)
        facts = getattr(self, "_card_facts", None)
        if facts is not None:
            from .model_card import write_model_card

            write_model_card(save_directory, self, facts)
