"""Observers on known distributions."""
import pytest
import torch

from qdet.config import Observer, PerChannel, QuantSpec, default_activation_spec
from qdet.errors import CalibrationError
from qdet.quant.observers import make_observer
from qdet.quant.qparams import fake_quantize


def _observe(obs, x, chunks=8):
    o = make_observer(default_activation_spec(obs), "layer")
    for c in x.chunk(chunks):
        o.update(c)
    return o


def _mse(o, x):
    s, z = o.qparams()
    return float(((fake_quantize(x, s, z, 0, 255) - x) ** 2).mean())


@pytest.fixture
def heavy_tail():
    torch.manual_seed(0)
    x = torch.randn(200_000).abs()
    x[:20] = 40.0  # a few outliers, as in seed 003's long-tailed SSD activations
    return x[torch.randperm(x.numel())]


def test_minmax_is_exact(heavy_tail):
    lo, hi = _observe(Observer.MINMAX, heavy_tail).range()
    assert float(lo) == float(heavy_tail.min()) and float(hi) == 40.0


def test_moving_average_follows_ema():
    spec = QuantSpec(observer=Observer.MOVING_AVERAGE, averaging_constant=0.5)
    o = make_observer(spec)
    o.update(torch.tensor([0.0, 2.0]))
    o.update(torch.tensor([0.0, 4.0]))
    assert float(o.range()[1]) == pytest.approx(3.0)


def test_mean_minmax_averages_per_sample_ranges_whatever_the_batching():
    torch.manual_seed(0)
    x = torch.randn(12, 3, 5, 5)
    x[3] *= 10  # one outlier image moves the range by 1/12 of its excess, not all of it
    want_lo = x.flatten(1).min(1).values.mean()
    want_hi = x.flatten(1).max(1).values.mean()
    for batch in (1, 5, 12):
        o = make_observer(default_activation_spec(Observer.MEAN_MINMAX))
        for chunk in x.split(batch):
            o.update(chunk)
        lo, hi = o.range()
        assert float(lo) == pytest.approx(float(want_lo), rel=1e-6)
        assert float(hi) == pytest.approx(float(want_hi), rel=1e-6)
    assert float(hi) < float(x.max()) / 2


def test_per_channel_mean_minmax():
    o = make_observer(QuantSpec(observer=Observer.MEAN_MINMAX, granularity=PerChannel(1)))
    o.update(torch.tensor([[[1.0, 3.0], [-2.0, 0.0]], [[5.0, 7.0], [-4.0, 2.0]]]))  # (sample, channel, value)
    lo, hi = o.range()
    assert lo.tolist() == [3.0, -3.0] and hi.tolist() == [5.0, 1.0]


def test_histogram_beats_minmax_on_heavy_tail(heavy_tail):
    mse_hist = _mse(_observe(Observer.HISTOGRAM, heavy_tail), heavy_tail)
    mse_minmax = _mse(_observe(Observer.MINMAX, heavy_tail), heavy_tail)
    assert mse_hist <= mse_minmax


def test_histogram_range_is_near_the_brute_force_optimum(heavy_tail):
    """The histogram search must find (almost) the clip range with the least fake-quant MSE."""
    best = min(
        float(((fake_quantize(heavy_tail, *_qp(hi), 0, 255) - heavy_tail) ** 2).mean())
        for hi in torch.linspace(1.0, 40.0, 400).tolist()
    )
    assert _mse(_observe(Observer.HISTOGRAM, heavy_tail), heavy_tail) <= best * 1.05


def _qp(hi):
    from qdet.quant.qparams import compute_qparams

    return compute_qparams(torch.tensor(0.0), torch.tensor(hi), 0, 255)


def test_mse_observer_not_worse_than_minmax(heavy_tail):
    assert _mse(_observe(Observer.MSE, heavy_tail), heavy_tail) <= _mse(_observe(Observer.MINMAX, heavy_tail), heavy_tail) * 1.001


def test_percentile_clips_at_percentile():
    x = torch.linspace(0, 1, 100_001)
    o = make_observer(QuantSpec(observer=Observer.PERCENTILE, percentile=99.0))
    o.update(x)
    assert float(o.range()[1]) == pytest.approx(0.99, abs=2e-3)


def test_entropy_on_gaussian_clips_tails():
    torch.manual_seed(0)
    x = torch.randn(200_000)
    lo, hi = _observe(Observer.ENTROPY, x).range()
    assert 2.0 < float(hi) < float(x.max())
    assert float(lo) == pytest.approx(-float(hi), rel=1e-6) or float(lo) == float(x.min())


def test_per_channel_minmax():
    spec = QuantSpec(observer=Observer.MINMAX, granularity=PerChannel(1))
    o = make_observer(spec)
    o.update(torch.tensor([[1.0, -3.0], [2.0, 5.0]]))
    lo, hi = o.range()
    assert lo.tolist() == [1.0, -3.0] and hi.tolist() == [2.0, 5.0]


@pytest.mark.parametrize("obs", list(Observer))
def test_nan_names_the_layer(obs):
    o = make_observer(default_activation_spec(obs), "backbone.conv3")
    with pytest.raises(CalibrationError, match="NaN at layer 'backbone.conv3'"):
        o.update(torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize("obs", list(Observer))
def test_empty_and_all_zero_are_errors(obs):
    o = make_observer(default_activation_spec(obs), "fc")
    with pytest.raises(CalibrationError, match="no calibration data reached layer 'fc'"):
        o.range()
    o.update(torch.zeros(100))
    with pytest.raises(CalibrationError, match="zero"):
        o.range()
