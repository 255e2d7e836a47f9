"""One-at-a-time layer sensitivity and a greedy mixed-precision search, on ONE calibrated model.

Nothing is re-quantized: a layer is switched between int8 and float by the `enabled` flag of its
output (activation) quantizer and its weight quantizer, so a sweep over L layers costs L metric
evaluations and no calibration. Modes:

* `SensitivityMode.ONLY` — only layer i is quantized (everything else float): the damage layer i
  does on its own (metric drop from the float model);
* `SensitivityMode.SKIP` — everything is quantized but layer i: what keeping layer i float wins back.

`mixed_precision_search` then keeps the most sensitive layers float, one at a time, until the metric
is within `max_drop` of float, and `to_config` turns the result into a `QuantConfig(skip=...)` that the
real runtimes can run.

    >>> import torch, qdet
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    >>> batches = [torch.randn(4, 3, 12, 12)]
    >>> qm = qdet.quantize(net, batches, progress=False)
    >>> res = layer_sensitivity(qm, None, batches, progress=False)
    >>> sorted(res.ranking()) == sorted(qm.layer_names())
    True
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any, Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from qdet.analysis.capture import flat_tensors
from qdet.analysis.points import QuantPoint, quant_points, select_points, toggled
from qdet.config import QuantConfig, parse_enum
from qdet.errors import ConfigError
from qdet.parallel import Backend, Checkpoint, SerialBackend, Task
from qdet.qmodel import QuantizedModel
from qdet.quant.calibrate import default_transform, quantization_disabled
from qdet.report.table import format_table

__all__ = ["SensitivityMode", "SensitivityRow", "SensitivityResult", "layer_sensitivity", "SearchStep",
           "MixedPrecisionResult", "mixed_precision_search", "to_config", "output_sqnr"]

MetricFn = Callable[[QuantizedModel], float]


class SensitivityMode(Enum):
    ONLY = "only"  # quantize only layer i
    SKIP = "skip"  # quantize every layer but i


@dataclass(frozen=True)
class SensitivityRow:
    """One layer's measurement; `delta` is metric − reference (float model for ONLY, int8 model for SKIP)."""

    rank: int  # 1 = most sensitive
    name: str
    kind: str
    metric: float | None
    delta: float | None
    output_sqnr_db: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SensitivityResult:
    """Layers ranked most sensitive first, with the float and all-int8 references."""

    mode: SensitivityMode
    rows: tuple[SensitivityRow, ...]
    float_metric: float | None
    int8_metric: float | None
    int8_output_sqnr_db: float | None

    def ranking(self) -> list[str]:
        """Layer names, most sensitive first."""
        return [r.name for r in self.rows]

    def as_rows(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self.rows]

    def table(self, top: int | None = None) -> str:
        rows = [{**r, "delta_pts": r["delta"]} for r in (self.as_rows()[:top] if top else self.as_rows())]
        return format_table(rows, ["rank", "name", "kind", "metric", "delta_pts", "output_sqnr_db"])


class _OutputSqnr:
    """Output SQNR against stored float outputs (every float tensor in a nested output, shapes must match)."""

    def __init__(self, qmodel: QuantizedModel, batches: list[Any], transform_fn: Callable[[Any], Any]) -> None:
        self.qmodel, self.batches, self.transform_fn = qmodel, batches, transform_fn
        with quantization_disabled(qmodel):
            self.refs = [flat_tensors(self._run(b)) for b in batches]

    def _run(self, batch: Any) -> Any:
        inputs = self.transform_fn(batch)
        with torch.no_grad():
            return self.qmodel(*inputs) if isinstance(inputs, tuple) else self.qmodel(inputs)

    def __call__(self) -> float | None:
        if not self.batches:
            return None
        sig = noise = 0.0
        for batch, refs in zip(self.batches, self.refs):
            outs = flat_tensors(self._run(batch))
            for r, o in zip(refs, outs):
                if r.shape == o.shape:
                    r64, o64 = r.double(), o.double()
                    sig += float((r64 * r64).sum())
                    noise += float(((r64 - o64) ** 2).sum())
        if noise == 0.0:
            return math.inf
        return 10 * math.log10(max(sig, 1e-30) / noise)


def output_sqnr(qmodel: QuantizedModel, batches: Iterable[Any], transform_fn: Callable[[Any], Any] = default_transform) -> float | None:
    """SQNR (dB) of the model's output in its current quantizer state vs the same graph in float.

    >>> import torch, qdet
    >>> from torch import nn
    >>> qm = qdet.quantize(nn.Sequential(nn.Conv2d(3, 4, 3)).eval(), [torch.randn(2, 3, 8, 8)], progress=False)
    >>> output_sqnr(qm, [torch.randn(2, 3, 8, 8)]) > 20
    True
    """
    return _OutputSqnr(qmodel, list(batches), transform_fn)()


@dataclass
class SweepState:
    """What every sensitivity / mixed-precision task needs: sent to the workers once per job."""

    qmodel: QuantizedModel
    metric_fn: MetricFn | None
    sqnr: _OutputSqnr | None

    def points(self, names: Sequence[str]) -> list[QuantPoint]:
        by_name = {p.name: p for p in quant_points(self.qmodel)}
        return [by_name[n] for n in names]


def _measure(state: SweepState, names: Sequence[str], default: bool, what: str) -> list[float | None]:
    """[metric, output SQNR] with the layers `names` switched to `not default` (everything else `default`);
    `what` = "metric", "sqnr" or "both" says which to measure (the other is None)."""
    with toggled(state.qmodel, state.points(names), default=default):
        m = state.metric_fn(state.qmodel) if state.metric_fn and what != "sqnr" else None
        s = state.sqnr() if state.sqnr and what != "metric" else None
    return [None if m is None else float(m), s]


def layer_sensitivity(
    qmodel: QuantizedModel,
    metric_fn: MetricFn | None,
    batches: Iterable[Any] | None = None,
    *,
    transform_fn: Callable[[Any], Any] = default_transform,
    mode: SensitivityMode | str = SensitivityMode.ONLY,
    layers: Sequence[str] | None = None,
    metric_top: int | None = None,
    progress: bool = True,
    backend: Backend | None = None,
    checkpoint: Checkpoint | None = None,
) -> SensitivityResult:
    """Measure `metric_fn(qmodel)` (higher is better) and/or the output SQNR on `batches` with one
    layer switched at a time; rank layers most sensitive first.

    Ranking uses the metric when given (ties and metric-less runs fall back to output SQNR):
    ONLY ranks by lowest metric, SKIP by highest (what keeping the layer float wins back).
    With `metric_top=K` (and both `metric_fn` and `batches`), every layer is first ranked by output
    SQNR (cheap) and the metric is measured only for the K layers that SQNR ranks most sensitive;
    the others follow, ranked by SQNR, with `metric=None`. All quantizer flags are restored afterwards.

    Each measurement (the float and int8 references, each layer) is one task of `backend` (default:
    serial, in this process): `qdet.parallel.RayBackend` runs them on Ray workers with the same
    results. With `checkpoint`, finished measurements are recorded and not redone by a rerun.
    """
    mode = parse_enum(SensitivityMode, mode, "sensitivity mode")
    if metric_fn is None and batches is None:
        raise ConfigError("layer_sensitivity needs a metric_fn, batches (for output SQNR), or both")
    backend = backend or SerialBackend()
    points = select_points(quant_points(qmodel), layers)
    sqnr = _OutputSqnr(qmodel, list(batches), transform_fn) if batches is not None else None
    state = backend.share(SweepState(qmodel, metric_fn, sqnr))
    skip = mode is SensitivityMode.SKIP
    two_stage = metric_fn is not None and sqnr is not None and metric_top is not None and metric_top < len(points)
    job = f"sensitivity/{mode.value}"
    refs = [Task(f"{job}/float", ([], False, "metric")), Task(f"{job}/int8", ([], True, "both"))]
    first = "sqnr" if two_stage else "both"
    layer_tasks = [Task(f"{job}/{first}/{p.name}", ([p.name], skip, first)) for p in points]
    out = backend.map(_measure, state, refs + layer_tasks, checkpoint=checkpoint, progress=progress,
                      desc=f"sensitivity ({mode.value})" + (", output SQNR" if two_stage else ""))
    (float_metric, _), (int8_metric, int8_sqnr) = out[0], out[1]
    reference = float_metric if mode is SensitivityMode.ONLY else int8_metric
    sign = 1.0 if mode is SensitivityMode.ONLY else -1.0  # ONLY: low first; SKIP: high first
    measured: list[tuple[QuantPoint, float | None, float | None]] = []
    rest: list[tuple[QuantPoint, float | None]] = []
    if two_stage:
        pre = [(p, s) for p, (_, s) in zip(points, out[2:])]
        pre.sort(key=lambda item: sign * item[1] if item[1] is not None else 0.0)
        top, rest = pre[: max(metric_top or 0, 0)], pre[max(metric_top or 0, 0):]
        tasks = [Task(f"{job}/metric/{p.name}", ([p.name], skip, "metric")) for p, _ in top]
        got = backend.map(_measure, state, tasks, checkpoint=checkpoint, progress=progress,
                          desc=f"sensitivity ({mode.value}), metric")
        measured = [(p, m, s) for (p, s), (m, _) in zip(top, got)]
    else:
        measured = [(p, m, s) for p, (m, s) in zip(points, out[2:])]

    def key(item: tuple[QuantPoint, float | None, float | None]) -> tuple[float, float]:
        _, m, s = item
        return (sign * m if m is not None else 0.0, sign * s if s is not None else 0.0)

    ranked = sorted(measured, key=key) + [(p, None, s) for p, s in rest]
    rows = tuple(
        SensitivityRow(i + 1, p.name, p.kind, m, None if m is None or reference is None else m - reference, s)
        for i, (p, m, s) in enumerate(ranked)
    )
    return SensitivityResult(mode, rows, float_metric, int8_metric, int8_sqnr)


# ---------------------------------------------------------------- mixed precision
@dataclass(frozen=True)
class SearchStep:
    n_float: int
    added: str  # the layer kept float at this step ("" for the all-int8 start)
    metric: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MixedPrecisionResult:
    """Layers kept float and the metric reached; `met` says whether the budget was met."""

    kept_float: tuple[str, ...]
    metric: float
    float_metric: float
    int8_metric: float
    max_drop: float
    met: bool
    steps: tuple[SearchStep, ...]
    quantized_layers: int  # candidates in the model (kept_float of them stay float)

    @property
    def target(self) -> float:
        return self.float_metric - self.max_drop

    def summary_rows(self) -> list[dict[str, Any]]:
        return [
            {"model": "float", "metric": self.float_metric, "float_layers": "all"},
            {"model": "int8", "metric": self.int8_metric, "float_layers": 0},
            {"model": "mixed", "metric": self.metric, "float_layers": len(self.kept_float)},
        ]

    def table(self) -> str:
        return format_table([s.as_dict() for s in self.steps], ["n_float", "added", "metric"])


def mixed_precision_search(
    qmodel: QuantizedModel,
    metric_fn: MetricFn,
    float_metric: float,
    max_drop: float,
    ranking: SensitivityResult | Sequence[str],
    *,
    max_float_layers: int | None = None,
    refine: bool = False,
    progress: bool = True,
    backend: Backend | None = None,
    checkpoint: Checkpoint | None = None,
) -> MixedPrecisionResult:
    """Keep layers float in `ranking` order (most sensitive first) until metric ≥ float_metric − max_drop.

    Only layers that `to_config` can express as a skip list are candidates (region inputs and
    ".in" edge quantizers are not named by skip patterns, so they stay int8). With `refine`, each
    kept layer is then tried int8 again (last kept first) and re-quantized when the budget still holds.
    With a `backend` of N workers, the next N candidate steps are measured at once (speculatively: the
    result is the one-at-a-time search's, steps included); `checkpoint` records every measurement.

    >>> import torch, qdet
    >>> from torch import nn
    >>> qm = qdet.quantize(nn.Sequential(nn.Conv2d(3, 4, 3)).eval(), [torch.randn(2, 3, 8, 8)], progress=False)
    >>> res = mixed_precision_search(qm, lambda m: 1.0, 1.0, 0.1, ["0"], progress=False)
    >>> res.kept_float, res.met
    ((), True)
    """
    names = ranking.ranking() if isinstance(ranking, SensitivityResult) else list(ranking)
    points = {p.name: p for p in select_points(quant_points(qmodel), names)}
    order = [points[n].name for n in names if points[n].kind != "input"]
    if max_float_layers is not None:
        order = order[:max_float_layers]
    target = float_metric - max_drop
    backend = backend or SerialBackend()
    state = backend.share(SweepState(qmodel, metric_fn, None))

    def metrics(configs: list[list[str]], desc: str) -> list[float]:
        # one task per configuration (the layers kept float); the key names the configuration, so a
        # checkpointed result is reused wherever the same configuration comes up again
        tasks = [Task("mixed/" + "|".join(c), (c, True, "metric")) for c in configs]
        return [float(m) for m, _ in backend.map(_measure, state, tasks, checkpoint=checkpoint, progress=False,
                                                    desc=desc)]

    int8_metric = metrics([[]], "int8")[0]
    steps = [SearchStep(0, "", int8_metric)]
    n_kept, metric = 0, int8_metric
    wave = max(1, backend.workers)
    bar = tqdm(total=len(order), desc="mixed-precision search", disable=not progress, leave=False)
    # greedy: keep order[:k] float for k = 1, 2, ... until the target is met. Each prefix is independent
    # of the others, so a wave measures the next `workers` prefixes at once and the search stops at the
    # first that meets the target: the same steps as one at a time, at most workers-1 extra measurements
    while metric < target and n_kept < len(order):
        ks = list(range(n_kept + 1, min(n_kept + wave, len(order)) + 1))
        for k, m in zip(ks, metrics([order[:k] for k in ks], "mixed-precision search")):
            n_kept, metric = k, m
            steps.append(SearchStep(k, order[k - 1], m))
            bar.update()
            if m >= target:
                break
    bar.close()
    kept = order[:n_kept]
    if refine and metric >= target:
        # try each kept layer int8 again, last kept first; a wave measures the next candidates against the
        # current set, and everything after the first accepted one is measured again against the new set
        todo = list(reversed(kept))
        while todo:
            batch = todo[:wave]
            trials = [[k for k in kept if k != name] for name in batch]
            results = metrics(trials, "mixed-precision refine")
            accepted = next((i for i, m in enumerate(results) if m >= target), None)
            if accepted is None:
                todo = todo[len(batch):]
                continue
            kept, metric = trials[accepted], results[accepted]
            steps.append(SearchStep(len(kept), f"-{batch[accepted]}", metric))
            todo = todo[accepted + 1:]
    return MixedPrecisionResult(tuple(kept), metric, float(float_metric), int8_metric,
                                float(max_drop), metric >= target, tuple(steps), len(order))


def to_config(result: MixedPrecisionResult | Sequence[str], base_cfg: QuantConfig) -> QuantConfig:
    """`base_cfg` with the kept-float layers added to `skip` (re-quantize with it to run on a runtime).

    >>> cfg = to_config(["layer1.0.conv1", "fc"], QuantConfig(skip=("fc",)))
    >>> cfg.skip
    ('fc', 'layer1.0.conv1')
    """
    names = result.kept_float if isinstance(result, MixedPrecisionResult) else tuple(result)
    skip = list(base_cfg.skip)
    for name in names:
        base = name.split("#", 1)[0]  # duplicate-name suffix added by quant_points
        if base not in skip:
            skip.append(base)
    return dataclasses.replace(base_cfg, skip=tuple(skip))
