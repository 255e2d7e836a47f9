"""How much calibration is enough, and which observer/granularity: seeded sweeps over re-quantizations.

Both studies are generic over `quantize_fn(n_images, seed, cfg) -> QuantizedModel` (how the model is
calibrated on a seeded subset of `n_images`) and `metric_fn(model) -> float` (higher is better);
`adapter_quantize_fn` builds the former for any registered adapter.

    >>> import torch, qdet
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    >>> data = torch.randn(64, 3, 8, 8)
    >>> def qfn(n, seed, cfg):
    ...     idx = torch.randperm(64, generator=torch.Generator().manual_seed(seed))[:n]
    ...     return qdet.quantize(net, [data[idx]], cfg, progress=False)
    >>> curve = calibration_curve(qfn, lambda m: -float(m(data).detach().var()), n_images=(1, 8), seeds=(0, 1), progress=False)
    >>> [p.n_images for p in curve.points], len(curve.points[0].values)
    ([1, 8], 2)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from qdet.config import Granularity, Observer, PerChannel, PerTensor, QuantConfig, QuantSpec
from qdet.parallel import Backend, Checkpoint, SerialBackend, Task
from qdet.qmodel import QuantizedModel
from qdet.report.table import format_table

__all__ = ["QuantizeFn", "CurvePoint", "CalibrationCurve", "calibration_curve", "SweepRow", "ObserverSweep",
           "observer_sweep", "adapter_quantize_fn", "granularity_name"]

QuantizeFn = Callable[[int, int, QuantConfig], QuantizedModel]
MetricFn = Callable[[Any], float]


def granularity_name(g: Granularity) -> str:
    return f"per-channel(axis={g.axis})" if isinstance(g, PerChannel) and g.axis != 0 else (
        "per-channel" if isinstance(g, PerChannel) else "per-tensor")


@dataclass(frozen=True)
class CurvePoint:
    n_images: int
    mean: float
    min: float
    max: float
    values: tuple[float, ...]  # one per seed, in seed order

    @property
    def std(self) -> float:
        return statistics.pstdev(self.values) if len(self.values) > 1 else 0.0


@dataclass(frozen=True)
class CalibrationCurve:
    """Metric vs number of calibration images, mean/min/max over seeded runs."""

    points: tuple[CurvePoint, ...]
    seeds: tuple[int, ...]
    float_metric: float | None = None
    metric_name: str = "metric"

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for p in self.points:
            row: dict[str, Any] = {"calib_images": p.n_images, "mean": p.mean, "min": p.min, "max": p.max,
                                   "std": p.std, "runs": len(p.values)}
            if self.float_metric is not None:
                row["mean_drop"] = self.float_metric - p.mean
            out.append(row)
        return out

    def table(self) -> str:
        return format_table(self.rows())

    def plot(self, path: str | Path, *, title: str | None = None) -> Path:
        from qdet.analysis.plots import plot_metric_curve

        return plot_metric_curve(
            [p.n_images for p in self.points], [p.mean for p in self.points], [p.min for p in self.points],
            [p.max for p in self.points], path, xlabel="calibration images", ylabel=self.metric_name,
            title=title or f"{self.metric_name} vs calibration set size ({len(self.seeds)} seeds)",
            reference=self.float_metric,
        )


def _point(n: int, values: list[float]) -> CurvePoint:
    return CurvePoint(n, statistics.fmean(values), min(values), max(values), tuple(values))


def calibration_curve(
    quantize_fn: QuantizeFn,
    metric_fn: MetricFn,
    *,
    n_images: Sequence[int] = (1, 8, 32, 64, 128, 512),
    seeds: Sequence[int] = (0, 1, 2),
    cfg: QuantConfig | None = None,
    float_metric: float | None = None,
    metric_name: str = "metric",
    progress: bool = True,
    backend: Backend | None = None,
    checkpoint: Checkpoint | None = None,
) -> CalibrationCurve:
    """Quantize with each (n, seed) and measure; `len(n_images) × len(seeds)` calibrations, each one
    task of `backend` (default: serial; Ray gives the same values), recorded in `checkpoint` if given."""
    cfg = cfg or QuantConfig()
    tasks = [Task(f"calibration/{_cfg_key(cfg)}/n={n}/seed={s}", (n, s, cfg)) for n in n_images for s in seeds]
    got = iter((backend or SerialBackend()).map(_quantize_and_measure, (quantize_fn, metric_fn), tasks,
                                                desc="calibration study", progress=progress, checkpoint=checkpoint))
    values = {n: [next(got) for _ in seeds] for n in n_images}
    return CalibrationCurve(tuple(_point(n, values[n]) for n in n_images), tuple(seeds), float_metric, metric_name)


@dataclass(frozen=True)
class SweepRow:
    observer: Observer
    granularity: str  # of the weights
    mean: float
    min: float
    max: float
    values: tuple[float, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"observer": self.observer.value, "weights": self.granularity, "mean": self.mean, "min": self.min,
                "max": self.max, "runs": len(self.values)}


@dataclass(frozen=True)
class ObserverSweep:
    """Activation observer × weight granularity, at one calibration size."""

    rows: tuple[SweepRow, ...]
    n_images: int
    seeds: tuple[int, ...]
    float_metric: float | None = None
    metric_name: str = "metric"

    def as_rows(self) -> list[dict[str, Any]]:
        out = [r.as_dict() for r in self.rows]
        if self.float_metric is not None:
            for r in out:
                r["drop"] = self.float_metric - r["mean"]
        return out

    def best(self) -> SweepRow:
        return max(self.rows, key=lambda r: r.mean)

    def table(self) -> str:
        return format_table(self.as_rows())

    def plot(self, path: str | Path, *, title: str | None = None) -> Path:
        from qdet.analysis.plots import plot_grouped_bars

        groups = list(dict.fromkeys(r.observer.value for r in self.rows))
        series: dict[str, list[float]] = {}
        whiskers: dict[str, tuple[list[float], list[float]]] = {}
        for g in dict.fromkeys(r.granularity for r in self.rows):
            by_obs = {r.observer.value: r for r in self.rows if r.granularity == g}
            nan = float("nan")
            series[f"weights {g}"] = [by_obs[o].mean if o in by_obs else nan for o in groups]
            whiskers[f"weights {g}"] = ([by_obs[o].min if o in by_obs else nan for o in groups],
                                        [by_obs[o].max if o in by_obs else nan for o in groups])
        return plot_grouped_bars(
            groups, series, path, ylabel=self.metric_name, reference=self.float_metric,
            errors=whiskers if len(self.seeds) > 1 else None,
            title=title or f"activation observer × weight granularity ({self.n_images} calibration images)",
        )


def observer_sweep(
    quantize_fn: QuantizeFn,
    metric_fn: MetricFn,
    *,
    observers: Sequence[Observer] = tuple(Observer),
    granularities: Sequence[Granularity] = (PerTensor(), PerChannel(0)),
    n_images: int = 512,
    seeds: Sequence[int] = (0,),
    base_cfg: QuantConfig | None = None,
    float_metric: float | None = None,
    metric_name: str = "metric",
    progress: bool = True,
    backend: Backend | None = None,
    checkpoint: Checkpoint | None = None,
) -> ObserverSweep:
    """Every activation observer × weight granularity, each quantized with `seeds` at `n_images`; each
    (config, seed) is one task of `backend` (default: serial), recorded in `checkpoint` if given.

    >>> cfgs = [c for _, _, c in _sweep_configs(QuantConfig(), [Observer.MINMAX], [PerTensor()])]
    >>> cfgs[0].activations.observer, cfgs[0].weights.granularity
    (<Observer.MINMAX: 'minmax'>, PerTensor())
    """
    base = base_cfg or QuantConfig()
    rows = []
    combos = _sweep_configs(base, observers, granularities)
    tasks = [Task(f"observers/{_cfg_key(cfg)}/n={n_images}/seed={s}", (n_images, s, cfg)) for _, _, cfg in combos
             for s in seeds]
    got = iter((backend or SerialBackend()).map(_quantize_and_measure, (quantize_fn, metric_fn), tasks,
                                                desc="observer sweep", progress=progress, checkpoint=checkpoint))
    for obs, gran, cfg in combos:
        vals = [next(got) for _ in seeds]
        rows.append(SweepRow(obs, granularity_name(gran), statistics.fmean(vals), min(vals), max(vals), tuple(vals)))
    return ObserverSweep(tuple(rows), n_images, tuple(seeds), float_metric, metric_name)


def _quantize_and_measure(fns: tuple[QuantizeFn, MetricFn], n: int, seed: int, cfg: QuantConfig) -> float:
    quantize_fn, metric_fn = fns
    return float(metric_fn(quantize_fn(n, seed, cfg)))


def _cfg_key(cfg: QuantConfig) -> str:
    """A short stable name of a config for task keys (the same config → the same key in every process)."""
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]


def _sweep_configs(base: QuantConfig, observers: Sequence[Observer],
                   granularities: Sequence[Granularity]) -> list[tuple[Observer, Granularity, QuantConfig]]:
    act, wts = base.activations, base.weights
    assert isinstance(act, QuantSpec) and isinstance(wts, QuantSpec)
    return [
        (o, g, dataclasses.replace(base, activations=dataclasses.replace(act, observer=o),
                                   weights=dataclasses.replace(wts, granularity=g)))
        for o in observers for g in granularities
    ]


def adapter_quantize_fn(adapter: Any, model: Any, *, data: str | None = None, batch_size: int = 32,
                        progress: bool = False) -> QuantizeFn:
    """A `quantize_fn` that calibrates `model` on a seeded subset of the adapter's dataset.

    >>> qfn = adapter_quantize_fn(qdet.get_adapter("resnet20"), model)  # doctest: +SKIP
    >>> qm = qfn(128, 0, qdet.QuantConfig())  # 128 images, subset seed 0  # doctest: +SKIP
    """
    from qdet import api
    from qdet.data.folders import make_loader, seeded_subset

    dataset = adapter.eval_dataset(data) if data is not None else adapter.eval_dataset()

    def quantize_fn(n_images: int, seed: int, cfg: QuantConfig) -> QuantizedModel:
        subset = seeded_subset(dataset, min(n_images, len(dataset)), seed=seed)
        return api.quantize(model, make_loader(subset, batch_size), cfg, adapter=adapter, progress=progress)

    return quantize_fn
