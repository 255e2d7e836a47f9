"""Observers: estimate the float range [lo, hi] of a tensor from the data that flows through it.

Every observer sees batches through `update(x)` and answers `range()`; `qparams()` turns the range
into scale/zero point with the spec's integer range. Observers are built from a `QuantSpec` by
`make_observer`, so the config, not the call site, decides which algorithm runs.

Histogram-based observers (HISTOGRAM, PERCENTILE, ENTROPY) keep one histogram whose range grows
with the data; MSE keeps a bounded random sample. Memory stays bounded whatever the data size.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from qdet.config import Observer, QuantSpec
from qdet.errors import CalibrationError
from qdet.quant.qparams import compute_qparams, fake_quantize


class RangeObserver(ABC):
    """Base class: validates inputs, counts batches, converts a range into qparams."""

    def __init__(self, spec: QuantSpec, name: str = "") -> None:
        self.spec = spec
        self.name = name  # the layer it observes, for error messages
        self.num_batches = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if x.numel() == 0:
            return
        lo, hi = torch.aminmax(x)  # NaN propagates through min/max: cheaper than isfinite(x).all()
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            bad = "NaN" if torch.isnan(lo) or torch.isnan(hi) else "inf"
            raise CalibrationError(f"calibration batch produced {bad} at {self._where()}; check the input data")
        self.num_batches += 1
        self._update(x)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.num_batches == 0:
            raise CalibrationError(f"no calibration data reached {self._where()}; is the calibration set empty?")
        lo, hi = self._range()
        if bool((lo == 0).all()) and bool((hi == 0).all()):
            raise CalibrationError(
                f"all calibration values at {self._where()} are zero; the calibration set does not exercise it"
            )
        return lo, hi

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.range()
        return compute_qparams(lo, hi, self.spec.qmin, self.spec.qmax, symmetric=self.spec.symmetric)

    def _where(self) -> str:
        return f"layer {self.name!r}" if self.name else "an unnamed quantizer"

    @abstractmethod
    def _update(self, x: torch.Tensor) -> None: ...

    @abstractmethod
    def _range(self) -> tuple[torch.Tensor, torch.Tensor]: ...


def _reduce_minmax(x: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if axis is None:
        return x.min(), x.max()
    flat = x.transpose(0, axis).reshape(x.shape[axis], -1)  # (C, rest)
    return flat.min(dim=1).values, flat.max(dim=1).values


class MinMaxObserver(RangeObserver):
    """Running min and max (per tensor or per channel)."""

    def __init__(self, spec: QuantSpec, name: str = "") -> None:
        super().__init__(spec, name)
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def _update(self, x: torch.Tensor) -> None:
        lo, hi = _reduce_minmax(x, self.spec.axis)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.lo is not None and self.hi is not None
        return self.lo, self.hi


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of per-batch min/max (seed 002's QAT activation observer)."""

    def _update(self, x: torch.Tensor) -> None:
        lo, hi = _reduce_minmax(x, self.spec.axis)
        if self.lo is None or self.hi is None:
            self.lo, self.hi = lo, hi
            return
        c = self.spec.averaging_constant
        self.lo = self.lo + c * (lo - self.lo)
        self.hi = self.hi + c * (hi - self.hi)


class MeanMinMaxObserver(RangeObserver):
    """Mean over calibration samples of each sample's own min and max (NNCF's default activation range).

    Per sample, not per batch, so the range does not depend on how the calibration set is batched;
    a rare outlier image moves the range by 1/N of its excess instead of setting it.
    """

    def __init__(self, spec: QuantSpec, name: str = "") -> None:
        super().__init__(spec, name)
        self.lo_sum: torch.Tensor | None = None
        self.hi_sum: torch.Tensor | None = None
        self.samples = 0

    def _update(self, x: torch.Tensor) -> None:
        samples = x.unsqueeze(0) if x.dim() < 2 else x  # a tensor without a batch dimension is one sample
        lo, hi = zip(*(_reduce_minmax(s, self._sample_axis()) for s in samples))
        lo_sum, hi_sum = torch.stack(lo).sum(0), torch.stack(hi).sum(0)
        self.lo_sum = lo_sum if self.lo_sum is None else self.lo_sum + lo_sum
        self.hi_sum = hi_sum if self.hi_sum is None else self.hi_sum + hi_sum
        self.samples += len(samples)

    def _sample_axis(self) -> int | None:
        axis = self.spec.axis  # the channel axis of the whole tensor; one sample has lost dim 0
        return None if axis is None else axis - 1

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.lo_sum is not None and self.hi_sum is not None
        return self.lo_sum / self.samples, self.hi_sum / self.samples


class _HistogramBase(RangeObserver):
    """A per-tensor histogram whose range grows to cover all data seen (old counts are re-binned)."""

    def __init__(self, spec: QuantSpec, name: str = "") -> None:
        super().__init__(spec, name)
        if spec.axis is not None:
            # Histograms are per tensor; per-channel activations would need one per channel.
            raise CalibrationError(f"{type(self).__name__} supports per-tensor ranges only ({self._where()})")
        self.bins = spec.bins
        self.hist = torch.zeros(self.bins, dtype=torch.float64)
        self.lo = math.inf
        self.hi = -math.inf

    def _update(self, x: torch.Tensor) -> None:
        lo, hi = float(x.min()), float(x.max())
        new_lo, new_hi = min(lo, self.lo, 0.0), max(hi, self.hi, 0.0)
        if new_hi - new_lo < 1e-12:
            new_hi = new_lo + 1e-12
        if (new_lo, new_hi) != (self.lo, self.hi):
            self._rebin(new_lo, new_hi)
        self.hist += torch.histc(x, bins=self.bins, min=self.lo, max=self.hi).double()

    def _rebin(self, lo: float, hi: float) -> None:
        if self.hist.sum() > 0:
            old_edges = torch.linspace(self.lo, self.hi, self.bins + 1, dtype=torch.float64)
            centers = (old_edges[:-1] + old_edges[1:]) / 2
            idx = ((centers - lo) / (hi - lo) * self.bins).long().clamp(0, self.bins - 1)
            new = torch.zeros(self.bins, dtype=torch.float64)
            new.index_add_(0, idx, self.hist)
            self.hist = new
        self.lo, self.hi = lo, hi

    def _edges(self) -> torch.Tensor:
        return torch.linspace(self.lo, self.hi, self.bins + 1, dtype=torch.float64)

    def _centers(self) -> torch.Tensor:
        e = self._edges()
        return (e[:-1] + e[1:]) / 2

    def _check_not_all_zero(self) -> None:
        if self.hist.sum() == 0 or (self.hi - self.lo) <= 1e-12:
            raise CalibrationError(
                f"all calibration values at {self._where()} are zero; the calibration set does not exercise it"
            )


class HistogramObserver(_HistogramBase):
    """Search all clip ranges [a, b] ∋ 0 on the histogram grid for the least expected squared error.

    Expected error of range [a, b] with L levels: values inside contribute Δ²/12 each (uniform
    rounding noise, Δ = (b − a)/L); values outside contribute their squared distance to the clip
    bound. Cumulative sums make each candidate O(1), so the exhaustive search over a 256-point grid
    of lower × upper bounds is a few vectorised tensor ops.
    """

    search_points = 256

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_not_all_zero()
        c = self._centers()
        n = self.hist
        cum_n = torch.cumsum(n, 0)
        cum_c = torch.cumsum(n * c, 0)
        cum_c2 = torch.cumsum(n * c * c, 0)
        grid = torch.linspace(self.lo, self.hi, self.search_points, dtype=torch.float64)
        lows = grid[grid <= 0]
        highs = grid[grid >= 0]
        if self.spec.symmetric:
            amax = torch.maximum(-lows.min(), highs.max())
            ts = torch.linspace(amax.item() / self.search_points, amax.item(), self.search_points, dtype=torch.float64)
            a_vals, b_vals = -ts, ts
        else:
            a_vals = lows[:, None].expand(-1, highs.numel()).reshape(-1)
            b_vals = highs[None, :].expand(lows.numel(), -1).reshape(-1)

        def below(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            # sums of n, n·c, n·c² over bins whose centre < v
            k = torch.searchsorted(c, v.contiguous())  # number of centres < v
            pad = lambda t: torch.cat([t.new_zeros(1), t])  # noqa: E731 - index 0 means "none"
            return pad(cum_n)[k], pad(cum_c)[k], pad(cum_c2)[k]

        n_a, c_a, c2_a = below(a_vals)
        n_b, c_b, c2_b = below(b_vals)
        total_n, total_c, total_c2 = cum_n[-1], cum_c[-1], cum_c2[-1]
        # below a: Σ n (a − c)²;  above b: Σ n (c − b)²
        err_lo = n_a * a_vals**2 - 2 * a_vals * c_a + c2_a
        n_hi, c_hi, c2_hi = total_n - n_b, total_c - c_b, total_c2 - c2_b
        err_hi = c2_hi - 2 * b_vals * c_hi + n_hi * b_vals**2
        levels = self.spec.qmax - self.spec.qmin
        delta = (b_vals - a_vals).clamp(min=1e-12) / levels
        err_in = (n_b - n_a) * delta**2 / 12
        best = torch.argmin(err_lo + err_hi + err_in)
        return torch.tensor(float(a_vals[best])), torch.tensor(float(b_vals[best]))


class PercentileObserver(_HistogramBase):
    """Clip at the lower/upper `percentile` of the observed distribution."""

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_not_all_zero()
        cdf = torch.cumsum(self.hist, 0) / self.hist.sum()
        edges = self._edges()
        p = self.spec.percentile / 100.0
        hi_idx = int(torch.searchsorted(cdf, torch.tensor(p, dtype=torch.float64)).clamp(max=self.bins - 1))
        lo_idx = int(torch.searchsorted(cdf, torch.tensor(1 - p, dtype=torch.float64)).clamp(max=self.bins - 1))
        lo = min(float(edges[lo_idx]), 0.0) if self.lo < 0 else self.lo
        hi = float(edges[hi_idx + 1])
        return torch.tensor(lo), torch.tensor(hi)


class EntropyObserver(_HistogramBase):
    """TensorRT-style KL calibration on |x|: choose the threshold T whose quantized histogram
    diverges least from the clipped float histogram.

    Exact zeros (most of a ReLU output) are left out of the KL: they are represented exactly at any
    threshold, and their spike in the first bin otherwise makes every merge of bins look costly,
    which drives the threshold far too low (ResNet56: 62 % top-1 with them, see README).
    """

    def __init__(self, spec: QuantSpec, name: str = "") -> None:
        super().__init__(spec, name)
        self.zeros = 0.0

    def _update(self, x: torch.Tensor) -> None:
        super()._update(x)
        self.zeros += float((x == 0).sum())

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_not_all_zero()
        # histogram of |x| over [0, amax] on `bins` bins
        amax = max(abs(self.lo), abs(self.hi))
        c = self._centers()
        idx = (c.abs() / amax * self.bins).long().clamp(0, self.bins - 1)
        h = torch.zeros(self.bins, dtype=torch.float64).index_add_(0, idx, self.hist)
        h[0] = max(float(h[0]) - self.zeros, 0.0)
        one_sided = self.lo >= 0 or self.hi <= 0
        levels = (self.spec.qmax - self.spec.qmin + 1) // (1 if one_sided else 2)
        if h.sum() < 4 * self.bins:
            # KL on a spiky histogram is noise: with too few samples keep the full range
            return torch.tensor(self.lo), torch.tensor(self.hi)
        best_t, best_kl = self.bins, math.inf
        for t in range(max(levels, 8), self.bins + 1, max(1, self.bins // 256)):
            p = h[:t].clone()
            p[t - 1] += h[t:].sum()  # outliers folded into the last bin
            if p.sum() == 0:
                continue
            q = self._quantize_hist(h[:t], levels)
            kl = _kl(p, q)
            if kl < best_kl:
                best_kl, best_t = kl, t
        thr = best_t / self.bins * amax
        return torch.tensor(max(self.lo, -thr)), torch.tensor(min(self.hi, thr))

    @staticmethod
    def _quantize_hist(h: torch.Tensor, levels: int) -> torch.Tensor:
        """Merge h into `levels` groups, spread each group's mass evenly over its non-empty bins."""
        t = h.numel()
        group = (torch.arange(t, dtype=torch.float64) * levels / t).long().clamp(max=levels - 1)
        mass = torch.zeros(levels, dtype=torch.float64).index_add_(0, group, h)
        nonzero = torch.zeros(levels, dtype=torch.float64).index_add_(0, group, (h > 0).double())
        per_bin = mass / nonzero.clamp(min=1)
        return torch.where(h > 0, per_bin[group], torch.zeros_like(h))


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    p = p / p.sum()
    q = q / q.sum().clamp(min=1e-30)
    mask = p > 0
    q_m = q[mask].clamp(min=1e-12)
    return float((p[mask] * torch.log(p[mask] / q_m)).sum())


class MSEObserver(RangeObserver):
    """Keep a bounded random sample; choose the clip ratio of [min, max] with the least fake-quant MSE."""

    sample_size = 1 << 18
    ratios = torch.linspace(0.3, 1.0, 71)

    def __init__(self, spec: QuantSpec, name: str = "") -> None:
        super().__init__(spec, name)
        if spec.axis is not None:
            raise CalibrationError(f"MSEObserver supports per-tensor ranges only ({self._where()})")
        self.sample = torch.empty(0)
        self.lo, self.hi = math.inf, -math.inf
        self._gen = torch.Generator().manual_seed(0)  # reproducible subsampling

    def _update(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1)
        self.lo, self.hi = min(self.lo, float(flat.min())), max(self.hi, float(flat.max()))
        per_batch = max(1, self.sample_size // 16)
        if flat.numel() > per_batch:
            flat = flat[torch.randint(flat.numel(), (per_batch,), generator=self._gen)]
        self.sample = torch.cat([self.sample, flat])
        if self.sample.numel() > self.sample_size:
            keep = torch.randperm(self.sample.numel(), generator=self._gen)[: self.sample_size]
            self.sample = self.sample[keep]

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if max(abs(self.lo), abs(self.hi)) == 0:
            raise CalibrationError(f"all calibration values at {self._where()} are zero")
        best, best_err = (self.lo, self.hi), math.inf
        for r in self.ratios.tolist():
            lo, hi = torch.tensor(self.lo * r), torch.tensor(self.hi * r)
            s, z = compute_qparams(lo, hi, self.spec.qmin, self.spec.qmax, symmetric=self.spec.symmetric)
            err = float(((fake_quantize(self.sample, s, z, self.spec.qmin, self.spec.qmax) - self.sample) ** 2).mean())
            if err < best_err:
                best, best_err = (float(lo), float(hi)), err
        return torch.tensor(best[0]), torch.tensor(best[1])


_OBSERVERS: dict[Observer, type[RangeObserver]] = {
    Observer.MINMAX: MinMaxObserver,
    Observer.MOVING_AVERAGE: MovingAverageMinMaxObserver,
    Observer.HISTOGRAM: HistogramObserver,
    Observer.PERCENTILE: PercentileObserver,
    Observer.ENTROPY: EntropyObserver,
    Observer.MEAN_MINMAX: MeanMinMaxObserver,
    Observer.MSE: MSEObserver,
}


def make_observer(spec: QuantSpec, name: str = "") -> RangeObserver:
    """Build the observer a spec asks for.

    >>> from qdet.config import default_activation_spec
    >>> obs = make_observer(default_activation_spec(Observer.MINMAX), "conv1")
    >>> obs.update(torch.tensor([-1.0, 2.0])); [float(v) for v in obs.range()]
    [-1.0, 2.0]
    """
    return _OBSERVERS[spec.observer](spec, name)


def observer_names() -> list[str]:
    return [o.value for o in _OBSERVERS]
