"""Exception types whose base classes match AdapterHub's, so that callers catching AdapterHub's exception (or the
ValueError deberta_fast raised before) both work."""

from __future__ import annotations

__all__ = ["MissingLayerEntryError", "UnknownConfigKeyError", "UnknownHeadTypeError"]


class UnknownConfigKeyError(TypeError, ValueError):
    """A config (string, dict or ``replace``) names a key its class does not have (AdapterHub: TypeError from the
    dataclass constructor)."""


class MissingLayerEntryError(KeyError, ValueError):
    """A per-layer mapping (e.g. ``reduction_factor``) has neither the layer nor ``"default"`` (AdapterHub:
    KeyError)."""

    def __str__(self) -> str:
        # KeyError's str() shows the repr of its argument (quotes, escapes); keep the message readable
        return str(self.args[0]) if self.args else ""


class UnknownHeadTypeError(AttributeError, ValueError):
    """``add_custom_head`` of a head type that was not registered (AdapterHub: AttributeError)."""
