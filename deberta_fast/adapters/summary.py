"""``adapter_summary``: AdapterHub's table of adapters (name, architecture, #param, %param, active, train).

%param is relative to the base model's parameters without the adapters; heads are not counted; the last row is
the full model with Train = not frozen. Booleans print as 1/0, like AdapterHub's table.
"""

from __future__ import annotations

__all__ = ["format_summary"]

_WIDTH = 80
_HEADER = ["name", "architecture", "#param", "%param", "active", "train"]


def format_summary(rows: list[dict]) -> str:
    """The 80-column table for ``rows`` (dicts with the keys of _HEADER; the full-model row last)."""
    header_format = "{:<25}{:<15}{:>12}{:>12}{:>8}{:>8}"
    row_format = "{:<25}{:<15}{:>12,}{:>12.3f}{:>8}{:>8}"
    lines = ["=" * _WIDTH, header_format.format(*(h.title() for h in _HEADER)), "-" * _WIDTH]
    for row in rows:
        values = [row.get(h, "") for h in _HEADER]
        values = [int(v) if isinstance(v, bool) else v for v in values]
        lines.append(row_format.format(*values))
    lines.insert(len(lines) - 1, "-" * _WIDTH)
    lines.append("=" * _WIDTH)
    return "\n".join(lines)
