"""Plain-text side-by-side tables for the terminal (and Markdown for reports)."""
from __future__ import annotations

from typing import Any, Sequence


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        # fractions (mAP 0.3012, its change -0.0024) need four decimals; percentages, ms, MB two
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
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells])
