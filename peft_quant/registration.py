"""Make peft-quant's methods first-class PEFT methods, without editing peft.

PEFT keys every method by a member of its closed ``PeftType`` enum, and ``register_peft_method`` refuses names
that are not already members. Since peft 0.21 everything else is delegated to the tuner class (selecting and
remapping the adapter's state dict on save and load), so a real enum member is all that is missing. This module
adds one member per method to ``PeftType`` the way ``enum`` itself builds members, then calls PEFT's public
``register_peft_method``. A real member (rather than a plain string) matters: transformers' ``load_adapter``
and several PEFT code paths call ``peft_type.value``.

It also routes ``PeftModel.push_to_hub`` for peft-quant adapters through :func:`peft_quant.model_card.push_to_hub`,
because transformers' push replaces the README of a new repository with a generic card *after* saving.

Everything that depends on peft's internals lives here; :func:`check_peft` fails at import, naming the supported
range, when those internals are not what this module expects.
"""

from __future__ import annotations

import enum
import functools
from importlib.metadata import version

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
    for hook in ("_get_adapter_state_dict", "_remap_adapter_state_dict_for_load"):
        if not hasattr(BaseTuner, hook):
            _fail(f"has no BaseTuner.{hook} (the per-method save/load hooks peft-quant overrides)")
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


def is_peft_quant_type(peft_type: object) -> bool:
    """True for the PEFT types registered by peft-quant."""
    return getattr(peft_type, "value", peft_type) in _OUR_TYPES


def install_push_to_hub() -> None:
    """Route ``PeftModel.push_to_hub`` through peft-quant's card-preserving push for peft-quant adapters only."""
    from peft import PeftModel

    original = PeftModel.push_to_hub
    if getattr(original, "_peft_quant", False):
        return

    @functools.wraps(original)
    def push_to_hub(self, repo_id: str, *args, **kwargs):
        if not any(is_peft_quant_type(c.peft_type) for c in self.peft_config.values()):
            return original(self, repo_id, *args, **kwargs)
        from .model_card import push_to_hub as push_with_card

        return push_with_card(self, repo_id, *args, **kwargs)

    push_to_hub._peft_quant = True
    PeftModel.push_to_hub = push_to_hub
