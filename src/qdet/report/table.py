"""Plain-text side-by-side tables for the terminal (and Markdown for reports)."""
from __future__ import annotations

from typing import Any, Sequence


# Columns whose unit is in the name (or top-1/top-5 in percent, speed-up ratios): two decimals always,
# so 0.91 MB prints beside 1.01 MB, not 0.9113.
_TWO_DECIMAL_SUFFIXES = ("_mb", "_ms", "_pts", "_pct", "_db", "top1", "top5")


def _two_decimals(column: str | None) -> bool:
    return column is not None and (column.endswith(_TWO_DECIMAL_SUFFIXES) or column.startswith("speedup"))


def _fmt(v: Any, column: str | None = None) -> str:
    if isinstance(v, float):
        if _two_decimals(column):
            return f"{v:,.2f}"
        # other floats: fractions (0.3012, -0.0024) need four decimals
        return f"{v:.4f}" if abs(v) < 1 else f"{v:,.2f}"
    return "" if v is None else str(v)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, *, markdown: bool = False) -> str:
    """Render rows (dicts) as an aligned table; `columns` picks and orders keys.

    >>> print(format_table([{"model": "float", "top1": 93.39}, {"model": "int8", "top1": 93.2}]))
    model  top1
    -----  -----
    float  93.39
    int8   93.20
    """
    if not rows:
        return "(no rows)"
    cols = list(columns) if columns else list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(r.get(c), c) for c in cols] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells])
