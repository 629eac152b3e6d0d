"""A markdown table from benchmark results, shared by every benchmark of this package.

`markdown_table({"random": {"accuracy": 0.9, "f1": 0.88}, ...})` gives one row per key and one column per
metric. Floats are printed with `digits` decimals (`scale` multiplies them first, e.g. 100 for 0..1
metrics shown as percentages), None as "-", anything else with `str`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _cell(value: Any, digits: int, scale: float) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value * scale:.{digits}f}"
    return str(value).replace("|", "\\|")


def markdown_table(
    rows: Mapping[str, Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    first_header: str = "",
    digits: int = 2,
    scale: float = 1.0,
) -> str:
    """Rows `{name: {column: value}}` as a markdown table; `columns` picks and orders the columns (default:
    every column in order of first appearance). A row without a column shows "-". Ends without a newline."""
    if columns is None:
        columns = list(dict.fromkeys(c for row in rows.values() for c in row))
    if not columns:
        raise ValueError("markdown_table: no columns")
    lines = [
        "| " + " | ".join([first_header, *columns]) + " |",
        "|" + "---|" + "---:|" * len(columns),
    ]
    for name, row in rows.items():
        cells = [_cell(row.get(c), digits, scale) for c in columns]
        lines.append("| " + " | ".join([_cell(name, digits, 1.0), *cells]) + " |")
    return "\n".join(lines)
