"""What every peft-quant config shares: a format version, strict fields, and a model card on save.

* ``format_version`` is written to ``adapter_config.json``. Each method bumps its ``FORMAT_VERSION`` whenever the
  meaning of saved tensors changes (e.g. QOFT's Neumann form), so an old adapter is refused with a clear error
  instead of silently loading into different numbers.
* Unknown fields raise a ``ValueError`` naming the closest valid field. (PEFT itself drops unknown fields with a
  warning when loading, which would silently change a trained adapter's meaning.)
* ``save_pretrained`` also renders the method's model card from ``model_cards/`` next to the config.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Optional

from peft import PeftConfig


class AdapterFormatError(ValueError):
    """The adapter was saved in a format version this peft-quant does not read."""


def strict_fields(cls: type) -> type:
    """Class decorator (apply above ``@dataclass``): unknown keyword arguments raise a clear ``ValueError``."""
    init = cls.__init__
    names = {f.name for f in fields(cls)}

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - names)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, sorted(names), n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(
                f"{cls.__name__} got unknown field(s) {', '.join(hints)}. Valid fields: {', '.join(sorted(names))}. "
                "If this comes from an adapter_config.json saved by a newer peft-quant, upgrade: "
                "pip install -U peft-quant."
            )
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


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

    def __post_init__(self) -> None:
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

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write ``adapter_config.json`` and, when saved from a model, the model card ``README.md``."""
        super().save_pretrained(save_directory, **kwargs)
        facts = getattr(self, "_card_facts", None)
        if facts is not None:
            from .model_card import write_model_card

            write_model_card(save_directory, self, facts)
