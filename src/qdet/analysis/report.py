"""`analyze`: paired capture → per-layer table (CSV + JSON) → plots → one HTML report.

    >>> import torch, qdet, tempfile
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    >>> batches = [torch.randn(4, 3, 16, 16)]
    >>> qm = qdet.quantize(net, batches, progress=False)
    >>> rep = analyze(qm, batches, out_dir=tempfile.mkdtemp(), progress=False)
    >>> rep.html.suffix, [e.name for e in rep.worst(1)] == [rep.errors[0].name]
    ('.html', True)
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from qdet.analysis.capture import CaptureResult, capture_pairs
from qdet.analysis.errors import LayerError
from qdet.analysis.plots import (
    pick_layers,
    plot_activation_maps,
    plot_error_hexbins,
    plot_sqnr_bars,
)
from qdet.analysis.points import quant_points
from qdet.fileio import write_atomically
from qdet.qmodel import QuantizedModel
from qdet.quant.calibrate import default_transform
from qdet.report.table import format_table

__all__ = ["AnalysisReport", "analyze", "layer_rows", "LAYER_COLUMNS"]

LAYER_COLUMNS = ["rank", "name", "kind", "sqnr_db", "cosine", "l1", "mse", "max_abs", "act_scale", "numel"]


@dataclass(frozen=True)
class AnalysisReport:
    """Where everything was written, and the per-layer errors sorted worst (lowest SQNR) first."""

    out_dir: Path
    html: Path
    layer_csv: Path
    layer_json: Path
    plots: dict[str, Path]
    errors: tuple[LayerError, ...]  # worst first
    rows: tuple[dict[str, Any], ...]  # the layer table (LAYER_COLUMNS), worst first
    output_sqnr_db: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def worst(self, n: int = 5) -> list[LayerError]:
        return list(self.errors[:n])

    def table(self, n: int | None = None) -> str:
        """The layer table for a terminal (cosine with 6 decimals: it sits close to 1)."""
        rows = [{**r, "cosine": f"{r['cosine']:.6f}"} for r in (self.rows[:n] if n else self.rows)]
        return format_table(rows, LAYER_COLUMNS)


def _sort_key(e: LayerError) -> tuple[float, str]:
    return (e.sqnr_db if not math.isnan(e.sqnr_db) else -math.inf, e.name)


def layer_rows(qmodel: QuantizedModel, errors: Sequence[LayerError]) -> list[dict[str, Any]]:
    """The per-layer table, worst SQNR first: rank, name, kind, sqnr_db, cosine, l1, mse, max_abs,
    act_scale (per-tensor activation scale, when there is one), numel."""
    points = {p.name: p for p in quant_points(qmodel)}
    rows = []
    for i, e in enumerate(sorted(errors, key=_sort_key)):
        p = points.get(e.name)
        scale = getattr(p.activation, "scale", None) if p is not None else None
        rows.append({
            "rank": i + 1, "name": e.name, "kind": p.kind if p else "", "sqnr_db": e.sqnr_db, "cosine": e.cosine,
            "l1": e.l1, "mse": e.mse, "max_abs": e.max_abs,
            "act_scale": float(scale) if scale is not None and scale.numel() == 1 else None, "numel": e.numel,
        })
    return rows


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def _atomic_text(path: Path, write: Callable[[Any], None]) -> Path:
    def to_file(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            write(fh)

    return write_atomically(path, to_file)


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    def write(fh: Any) -> None:
        w = csv.DictWriter(fh, fieldnames=LAYER_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in LAYER_COLUMNS})

    return _atomic_text(path, write)


def _write_json(path: Path, payload: Any) -> Path:
    return _atomic_text(path, lambda fh: json.dump(_json_safe(payload), fh, indent=1, allow_nan=False))


def analyze(
    qmodel: QuantizedModel,
    batches: Iterable[Any],
    transform_fn: Callable[[Any], Any] = default_transform,
    out_dir: str | Path = "analysis",
    *,
    metric_rows: Sequence[Mapping[str, Any]] | None = None,
    images: Sequence[str | Path] | None = None,
    tables: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    title: str | None = None,
    map_layers: Sequence[str] | None = None,
    worst: int = 4,
    overlay: bool = False,
    max_elements_per_layer: int = 200_000,
    seed: int = 0,
    progress: bool = True,
) -> AnalysisReport:
    """Per-layer error analysis of `qmodel` on `batches`, written to `out_dir`.

    Writes layer_errors.csv/.json (worst SQNR first), sqnr.png, hexbin_all.png (every layer pooled),
    hexbin_worst.png and activation_maps_worst.png (the `worst` layers), activation_maps.png
    (`map_layers`, default six layers spread over depth) and report.html embedding all of them.
    `metric_rows` (e.g. float vs int8 accuracy rows) lead the report's summary; `images` and
    `tables` are extra plots/tables (e.g. a calibration study) added to it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cap: CaptureResult = capture_pairs(qmodel, batches, transform_fn, max_elements_per_layer=max_elements_per_layer,
                                       seed=seed, progress=progress)
    errors = tuple(sorted(cap.errors(), key=_sort_key))
    rows = layer_rows(qmodel, errors)
    csv_path = _write_csv(out / "layer_errors.csv", rows)
    overview = _overview(qmodel, cap, errors)
    json_path = _write_json(out / "layer_errors.json", {"summary": overview, "layers": rows})

    kinds = {p.name: p.kind for p in quant_points(qmodel)}
    sqnr = {e.name: e.sqnr_db for e in errors}
    worst_names = [e.name for e in errors[:worst]]
    plots: dict[str, Path] = {}
    graph_order = cap.errors()
    if graph_order:
        plots["sqnr"] = plot_sqnr_bars(graph_order, out / "sqnr.png", kinds=kinds, worst=max(worst, 5))
        plots["hexbin_all"] = plot_error_hexbins(cap, out / "hexbin_all.png", seed=seed,
                                                 title=f"error vs float activation, all {len(graph_order)} layers pooled")
        plots["hexbin_worst"] = plot_error_hexbins(cap, out / "hexbin_worst.png", layers=worst_names, separate=True,
                                                   title=f"error vs float activation, {len(worst_names)} lowest-SQNR layers")
    with_maps = [n for n, c in cap.layers.items() if c.float_maps is not None]
    if with_maps:
        spread = list(map_layers) if map_layers is not None else pick_layers(with_maps, 6)
        plots["activation_maps"] = plot_activation_maps(cap, out / "activation_maps.png", layers=spread, sqnr=sqnr,
                                                        overlay=overlay)
        worst_maps = [n for n in (e.name for e in errors) if n in set(with_maps)][:worst]
        plots["activation_maps_worst"] = plot_activation_maps(cap, out / "activation_maps_worst.png",
                                                              layers=worst_maps, sqnr=sqnr, overlay=overlay)
    summary = list(metric_rows) if metric_rows else [{"key": k, "value": v} for k, v in overview.items()]
    all_tables: dict[str, Sequence[Mapping[str, Any]]] = {}
    if metric_rows:
        all_tables["capture overview"] = [{"key": k, "value": v} for k, v in overview.items()]
    all_tables[f"per-layer error (worst SQNR first, {len(rows)} layers)"] = rows
    all_tables.update(tables or {})
    config = {"quantization": qmodel.config.to_dict(), "analysis": {
        "batches": cap.batches, "max_elements_per_layer": max_elements_per_layer, "seed": seed, "worst": worst,
        "overlay": overlay, "map_layers": list(map_layers) if map_layers is not None else "auto"}}
    from qdet.report.html import write_report

    html = write_report(out / "report.html", title=title or f"{qmodel.model_name or 'model'}: int8 layer analysis",
                        summary_rows=summary, tables=all_tables, images=[*plots.values(), *(images or [])],
                        config=config, notes=cap.notes)
    return AnalysisReport(out, html, csv_path, json_path, plots, errors, tuple(rows), cap.output_sqnr_db,
                          tuple(cap.notes))


def _overview(qmodel: QuantizedModel, cap: CaptureResult, errors: Sequence[LayerError]) -> dict[str, Any]:
    finite = [e.sqnr_db for e in errors if math.isfinite(e.sqnr_db)]
    return {
        "model": qmodel.model_name or type(qmodel.model).__name__,
        "layers analysed": len(errors),
        "batches": cap.batches,
        "calibration batches": qmodel.calibration_batches,
        "output SQNR (dB)": cap.output_sqnr_db,
        "median layer SQNR (dB)": statistics.median(finite) if finite else None,
        "worst layer": f"{errors[0].name} ({errors[0].sqnr_db:.2f} dB)" if errors else None,
        "sampled pairs per layer (max)": cap.max_elements_per_layer,
    }
