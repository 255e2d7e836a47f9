"""Calibration samples whose activations dwarf the others' — they set the per-tensor grids.

A per-tensor uint8 grid spans the calibrated range; when a few calibration images drive a layer
100× beyond what the rest reach, every observer (MinMax, and Histogram/MSE too, since those few
images carry most of the squared error) stretches the grid for them, and the other images'
values fall into a handful of levels. Seen on an SSD300-ResNet50 trained briefly on synthetic
shapes: 15 of 64 calibration images drove its class logits up to ~1,000× the median image's,
and whole-detector int8 mAP fell from 0.17 (float) to 0.00; calibrated on the other 49: 0.193.

`SamplePeaks` records, during calibration, each sample's peak |x| at every activation quantizer
and `warn` names the layers and the samples (in calibration order) that stand out;
`qdet.quantize` also keeps them in `qm.metrics["calibration_outliers"]`.

    >>> import warnings
    >>> from torch import nn
    >>> from qdet.quant.quantizer import Quantizer
    >>> from qdet.config import default_activation_spec
    >>> net = nn.Sequential(nn.Identity(), Quantizer(default_activation_spec(), "out"))
    >>> x = torch.ones(8, 4); x[5] *= 500.0
    >>> with SamplePeaks(net, [("out", net[1])]) as peaks:
    ...     _ = net(x)
    >>> [(f.layer, f.samples) for f in peaks.findings()]
    [('out', [5])]
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

if TYPE_CHECKING:
    from qdet.quant.quantizer import Quantizer

RATIO = 10.0  # a sample stands out when its peak exceeds this multiple of the median sample's
_MIN_SAMPLES = 4  # fewer samples give no meaningful median


@dataclass
class Outlier:
    """One layer whose per-sample peaks have outliers."""

    layer: str
    median_peak: float
    max_peak: float
    samples: list[int]  # indices in calibration order


def _batch_size(args: tuple[Any, ...]) -> int | None:
    first = args[0] if args else None
    if isinstance(first, torch.Tensor) and first.dim() >= 1:
        return int(first.shape[0])
    if isinstance(first, (list, tuple)) and first and all(isinstance(t, torch.Tensor) for t in first):
        return len(first)  # torchvision detectors take a list of images
    return None


class SamplePeaks:
    """Context manager over one calibration pass of `model`, watching its activation `quantizers`
    ((module path, quantizer) pairs, as `qdet.quant.calibrate.activation_quantizers` yields them)."""

    def __init__(self, model: nn.Module, quantizers: Iterable[tuple[str, Quantizer]]) -> None:
        self.model = model
        self.quantizers = [(q.layer_name or name, q) for name, q in quantizers]
        self.peaks: dict[str, list[float]] = defaultdict(list)
        self._batch: int | None = None
        self._current: dict[str, torch.Tensor] = {}
        self._hooks: list[Any] = []

    def __enter__(self) -> SamplePeaks:
        self._hooks.append(self.model.register_forward_pre_hook(self._start))
        self._hooks.append(self.model.register_forward_hook(self._end))
        for name, q in self.quantizers:
            self._hooks.append(q.register_forward_pre_hook(lambda _m, args, name=name: self._seen(name, args)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _start(self, _m: nn.Module, args: tuple[Any, ...]) -> None:
        self._batch, self._current = _batch_size(args), {}

    def _seen(self, name: str, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        # only tensors with one row per sample (not RoIs, not flattened detections)
        if not isinstance(x, torch.Tensor) or self._batch is None or x.dim() < 2 or x.shape[0] != self._batch:
            return
        peak = x.detach().reshape(self._batch, -1).abs().amax(1).float()
        prev = self._current.get(name)
        self._current[name] = peak if prev is None else torch.maximum(prev, peak)  # a quantizer called twice

    def _end(self, *_: Any) -> None:
        for name, peak in self._current.items():
            self.peaks[name].extend(peak.tolist())
        self._current = {}

    def findings(self) -> list[Outlier]:
        """Layers where some sample's peak exceeds RATIO × the median sample's, worst first."""
        found = []
        for name, values in self.peaks.items():
            if len(values) < _MIN_SAMPLES:
                continue
            t = torch.tensor(values)
            median = float(t.median())
            if median <= 0:
                continue
            idx = [int(i) for i in torch.nonzero(t > RATIO * median).flatten()]
            if idx:
                found.append(Outlier(name, median, float(t.max()), idx))
        return sorted(found, key=lambda o: -o.max_peak / o.median_peak)

    def warn(self, found: list[Outlier]) -> None:
        """One warning for these `findings()`: how many samples, the worst layers, which samples."""
        samples = sorted({i for o in found for i in o.samples})
        total = max(len(v) for v in self.peaks.values())
        worst = "; ".join(f"{o.layer} median {o.median_peak:.3g}, max {o.max_peak:.3g}" for o in found[:3])
        shown = ", ".join(map(str, samples[:12])) + (", ..." if len(samples) > 12 else "")
        warnings.warn(f"calibration: {len(samples)} of {total} samples peak above {RATIO:g}× the median sample at "
                      f"{len(found)} quantized layer(s) ({worst}); they stretch those layers' per-tensor grids for "
                      f"everyone else. Samples (calibration order, from 0): {shown} — check them, or calibrate "
                      "without them", stacklevel=3)


def summary(found: list[Outlier]) -> dict[str, Any]:
    """{"samples": flagged sample indices, "layers": the ten worst `Outlier`s as dicts}."""
    return {"samples": sorted({i for o in found for i in o.samples}), "layers": [asdict(o) for o in found[:10]]}
