"""One self-contained HTML report per run: summary, tables, embedded plots, config, environment.

The file has no external references (images are base64 data URIs, styles inline), so it can be
mailed or attached to a CI run as is. It is written atomically (temp file + `os.replace`).

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "report.html"
    >>> p = write_report(out, title="resnet56 int8", summary_rows=[{"model": "float", "top1": 93.39}],
    ...                  tables={"layers": [{"name": "conv1", "sqnr_db": 31.2}]}, images=[],
    ...                  config={"observer": "histogram"}, environment={"python": "3.11"})
    >>> '<td class="s">conv1</td>' in p.read_text()
    True
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from qdet.fileio import write_text_atomically

__all__ = ["write_report", "environment_info", "html_table"]

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml",
         ".gif": "image/gif", ".webp": "image/webp"}

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
.meta{color:#666;font-size:.9em}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#f3f3f3;position:sticky;top:0} td:first-child,th:first-child{text-align:left}
td.s{text-align:left} tr:nth-child(even) td{background:#fafafa}
.scroll{display:inline-block;border:1px solid #eee}
@media print{.scroll,pre{overflow:visible;max-height:none}table{page-break-inside:auto}tr{page-break-inside:avoid}}
figure{margin:1em 0} figure img{max-width:100%;border:1px solid #eee} figcaption{color:#555;font-size:.88em}
pre{background:#f6f8fa;padding:.8em;overflow:auto;font-size:.85em;border:1px solid #eee}
nav a{margin-right:1em}
"""


def _fmt(v: Any, column: str | None = None) -> str:
    from qdet.report.table import _two_decimals

    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        if _two_decimals(column):  # unit in the name (size_mb, latency_ms, *_pts, top1): as the terminal prints it
            return f"{v:,.2f}"
        return f"{v:,.1f}" if abs(v) >= 1e5 else f"{v:.5g}"  # 5 significant digits: 0.99717, 22.478, 0.00073943
    return str(v)


def html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows (dicts) → an HTML table; numbers right-aligned, text left-aligned, everything escaped.

    >>> html_table([{"a": 1.5, "b": "<x>"}])
    '<table><thead><tr><th>a</th><th>b</th></tr></thead><tbody><tr><td>1.5</td><td class="s">&lt;x&gt;</td></tr></tbody></table>'
    """
    if not rows:
        return "<p><em>(no rows)</em></p>"
    cols = list(columns) if columns else list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cls = "" if isinstance(v, (int, float)) and not isinstance(v, bool) else ' class="s"'
            cells.append(f"<td{cls}>{html.escape(_fmt(v, str(c)))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def environment_info() -> dict[str, Any]:
    """Versions and machine facts that numbers depend on (imports nothing heavy that is not loaded).

    >>> sorted(environment_info())[:3]
    ['cpu', 'cpu_count', 'machine']
    """
    from importlib import metadata

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "qdet": version("qdet"),
        "torch": version("torch"),
        "torchvision": version("torchvision"),
        "onnxruntime": version("onnxruntime"),
        "openvino": version("openvino"),
        "numpy": version("numpy"),
    }
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info["torch_threads"] = torch.get_num_threads()
        info["torch_interop_threads"] = torch.get_num_interop_threads()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var):
            info[var] = os.environ[var]
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _image_html(path: Path) -> str:
    mime = _MIME.get(path.suffix.lower())
    if mime is None:
        raise ValueError(f"cannot embed {path}: unsupported image type {path.suffix!r}")
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    alt = html.escape(path.stem.replace("_", " "))
    return (f'<figure id="img-{html.escape(path.stem)}"><img alt="{alt}" src="data:{mime};base64,{data}">'
            f"<figcaption>{html.escape(path.name)}</figcaption></figure>")


def _anchor(name: str) -> str:
    return "t-" + "".join(c if c.isalnum() else "-" for c in name.lower())


def write_report(
    path: str | Path,
    *,
    title: str,
    summary_rows: Sequence[Mapping[str, Any]],
    tables: Mapping[str, Sequence[Mapping[str, Any]]],
    images: Sequence[str | Path],
    config: Mapping[str, Any],
    environment: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> Path:
    """Write ONE self-contained HTML file and return its path.

    summary_rows: the headline table (e.g. float vs int8); tables: section title → rows;
    images: PNG/JPEG/SVG files embedded as base64; config: shown as pretty JSON; environment:
    default `environment_info()`. Missing image files raise FileNotFoundError naming the file.
    """
    path = Path(path)
    env = dict(environment) if environment is not None else environment_info()
    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"report images not found: {', '.join(missing)}")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    nav = ['<a href="#summary">summary</a>'] + [f'<a href="#{_anchor(t)}">{html.escape(t)}</a>' for t in tables]
    if images:
        nav.append('<a href="#plots">plots</a>')
    nav += ['<a href="#config">config</a>', '<a href="#environment">environment</a>']
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p class=\"meta\">generated {stamp} by qdet</p>",
        f"<nav>{''.join(nav)}</nav>",
        '<h2 id="summary">summary</h2>', html_table(summary_rows),
    ]
    if notes:
        parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    for name, rows in tables.items():
        parts.append(f'<h2 id="{_anchor(name)}">{html.escape(name)}</h2>')
        parts.append(f'<div class="scroll">{html_table(rows)}</div>')
    if images:
        parts.append('<h2 id="plots">plots</h2>')
        parts += [_image_html(Path(p)) for p in images]
    parts.append('<h2 id="config">config</h2>')
    parts.append(f"<pre>{html.escape(json.dumps(config, indent=2, sort_keys=True, default=str), quote=False)}</pre>")
    parts.append('<h2 id="environment">environment</h2>')
    parts.append(html_table([{"key": k, "value": str(v)} for k, v in env.items()]))
    parts.append("</body></html>\n")
    return write_text_atomically(path, "\n".join(parts))
