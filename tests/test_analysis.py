"""qdet.analysis on toy conv models: paired capture, error formulas, plots, HTML report, sensitivity,
mixed precision and calibration studies. Fast (no real assets)."""
from __future__ import annotations

import base64
import io
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from qdet.analysis import (
    SensitivityMode,
    analyze,
    calibration_curve,
    capture_pairs,
    compare,
    layer_errors,
    layer_sensitivity,
    mixed_precision_search,
    observer_sweep,
    relative_error,
    to_config,
)
from qdet.analysis.capture import channel_max_map
from qdet.analysis.sensitivity import SearchStep
from qdet.analysis.plots import (
    pick_layers,
    plot_activation_maps,
    plot_error_hexbins,
    plot_sqnr_bars,
)
from qdet.analysis.points import all_switches, quant_points, toggled
from qdet.config import Format, LayerOverride, Observer, PerChannel, PerTensor, QuantConfig, QuantSpec
from qdet.errors import ConfigError
from qdet.qmodel import quantize
from qdet.report.html import write_report


class Toy(nn.Module):
    """conv-relu, conv-relu, conv + residual add (+relu), pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu1(self.conv1(x))
        b = self.relu2(self.conv2(a))
        c = self.relu3(self.conv3(b) + a)
        return self.fc(torch.flatten(self.pool(c), 1))


def _toy() -> nn.Module:
    torch.manual_seed(0)
    return Toy().eval()


def _batches(n: int = 2, size: int = 16, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, size, size, generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def qm():
    return quantize(_toy(), _batches(4, seed=5), QuantConfig(), progress=False)


def assert_sane_png(path, min_w: int = 300, min_h: int = 200) -> None:
    """A real PNG of reasonable size that is not one flat colour."""
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert w >= min_w and h >= min_h, (w, h)
        px = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert px.std() > 5.0
    assert len(np.unique(px.reshape(-1, 3), axis=0)) > 20


# ---------------------------------------------------------------- capture
def test_capture_keys_equal_quantized_layer_names(qm):
    cap = capture_pairs(qm, _batches())
    assert cap.names() == qm.layer_names() == ["x", "conv1", "conv2", "conv3", "add", "pool", "fc"]
    assert cap.batches == 2
    for c in cap.layers.values():
        assert c.error is not None and c.float_values.shape == c.quant_values.shape
    assert cap.output_sqnr_db is not None and cap.output_sqnr_db > 10


def test_capture_subset_and_unknown_layer(qm):
    cap = capture_pairs(qm, _batches(1), layers=["conv2", "conv1"])
    assert cap.names() == ["conv1", "conv2"]  # graph order
    with pytest.raises(ConfigError, match=r"'conv_2'.*did you mean.*'conv2'"):
        capture_pairs(qm, _batches(1), layers=["conv_2"])


def test_capture_statistics_match_layer_errors(qm):
    batches = _batches(3)
    cap = capture_pairs(qm, batches, max_elements_per_layer=50)
    ref = {e.name: e for e in layer_errors(qm, batches)}
    for e in cap.errors():
        r = ref[e.name]
        assert e.numel == r.numel
        assert e.mse == pytest.approx(r.mse, rel=1e-4)
        assert e.sqnr_db == pytest.approx(r.sqnr_db, abs=1e-3)
        assert e.cosine == pytest.approx(r.cosine, abs=1e-6)


def test_reservoir_is_bounded_seeded_and_paired(qm):
    batches = _batches(3)
    a = capture_pairs(qm, batches, max_elements_per_layer=300, seed=0)
    b = capture_pairs(qm, batches, max_elements_per_layer=300, seed=0)
    c = capture_pairs(qm, batches, max_elements_per_layer=300, seed=1)
    conv = a.layers["conv1"]
    assert conv.float_values.numel() == 300 and conv.seen == 3 * 4 * 8 * 16 * 16
    assert torch.equal(conv.float_values, b.layers["conv1"].float_values)
    assert not torch.equal(conv.float_values, c.layers["conv1"].float_values)
    # the model input is identical in both runs: its int8 value is the fake-quant of the float value
    x = a.layers["x"]
    q = next(p for p in quant_points(qm) if p.name == "x").activation
    assert torch.allclose(x.quant_values, q(x.float_values), atol=1e-6)
    assert (x.quant_values - x.float_values).abs().max() <= float(q.scale) / 2 + 1e-6


def test_activation_maps_are_channel_max_and_bounded():
    x = torch.rand(2, 5, 100, 50)
    m = channel_max_map(x, 64)
    assert m.shape == (2, 64, 32)
    assert torch.equal(channel_max_map(x[:, :, :8, :8], 64), x[:, :, :8, :8].amax(1))
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).eval()
    qm = quantize(net, [torch.randn(2, 3, 96, 96)], progress=False)
    cap = capture_pairs(qm, [torch.randn(3, 3, 96, 96), torch.randn(3, 3, 96, 96)], max_images=4)
    c = cap.layers["0"]
    assert c.float_maps.shape == c.quant_maps.shape == c.error_maps.shape == (4, 64, 64)
    assert cap.inputs is not None and cap.inputs.shape == (4, 3, 96, 96)


# ---------------------------------------------------------------- error formulas
def test_error_formulas_on_known_tensors():
    f, q = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 4.0])
    e = compare(f, q)
    assert e.l1 == pytest.approx(1 / 3)
    assert e.mse == pytest.approx(1 / 3)
    assert e.sqnr_db == pytest.approx(10 * math.log10(14 / 1))
    assert e.cosine == pytest.approx(17 / (math.sqrt(14) * math.sqrt(21)), abs=1e-12)
    assert e.max_abs == 1.0 and e.numel == 3
    assert compare(f, f).sqnr_db == math.inf


def test_relative_error_uses_float_denominator():
    f, q = torch.tensor([2.0, 0.5, 0.0]), torch.tensor([1.0, 1.0, 0.01])
    rel = relative_error(f, q, eps=0.1)
    assert rel.tolist() == pytest.approx([0.5, 1.0, 0.1])  # |q−f| / max(|f|, eps), not / |q|


def test_hexbins_plot_error_against_float_values(qm, tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    calls = []
    original = Axes.hexbin

    def spy(self, x, y, *args, **kwargs):
        calls.append((np.asarray(x), np.asarray(y), kwargs))
        return original(self, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "hexbin", spy)
    cap = capture_pairs(qm, _batches(1), layers=["conv2"], max_elements_per_layer=400)
    path = plot_error_hexbins(cap, tmp_path / "h.png", eps=1e-3)
    f, q = cap.layers["conv2"].float_values.numpy(), cap.layers["conv2"].quant_values.numpy()
    (x_abs, y_abs, kw_abs), (x_rel, y_rel, kw_rel) = calls
    assert np.array_equal(x_abs, f) and np.array_equal(x_rel, f)
    assert np.allclose(y_abs, np.abs(q - f))
    expected = np.abs(q - f) / np.maximum(np.abs(f), 1e-3)
    nz = expected > 0
    assert np.allclose(y_rel[nz], expected[nz], rtol=1e-5)
    assert kw_abs["bins"] == "log" and kw_rel["bins"] == "log"
    assert_sane_png(path)


# ---------------------------------------------------------------- plots
def test_plots_are_written_and_sane(qm, tmp_path):
    cap = capture_pairs(qm, _batches(2, size=24), max_images=2)
    maps = plot_activation_maps(cap, tmp_path / "maps.png", layers=["conv1", "add"], image_index=1)
    over = plot_activation_maps(cap, tmp_path / "over.png", overlay=True)
    sep = plot_error_hexbins(cap, tmp_path / "sep.png", layers=["conv1", "fc"], separate=True)
    bars = plot_sqnr_bars(cap.errors(), tmp_path / "sqnr.png", kinds={p.name: p.kind for p in qm.layers})
    for p in (maps, over, sep, bars):
        assert p.parent == tmp_path
        assert_sane_png(p)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("tmp*"))
    with pytest.raises(ConfigError, match="image_index"):
        plot_activation_maps(cap, tmp_path / "bad.png", image_index=7)
    with pytest.raises(ConfigError, match="not captured"):
        plot_error_hexbins(cap, tmp_path / "bad.png", layers=["nope"])


def test_pick_layers_spreads_over_depth():
    assert pick_layers(list("abcdefg"), 3) == ["a", "d", "g"]
    assert pick_layers(list("ab"), 5) == ["a", "b"]


def test_import_does_not_load_matplotlib():
    code = "import sys, qdet.analysis, qdet.report.html; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- report
def test_analyze_writes_tables_plots_and_self_contained_html(qm, tmp_path):
    rows = [{"model": "float", "top1": 91.0}, {"model": "int8", "top1": 90.5}]
    rep = analyze(qm, _batches(2), out_dir=tmp_path, metric_rows=rows, worst=2, progress=False)
    assert rep.html.is_file() and rep.layer_csv.is_file() and rep.layer_json.is_file()
    sqnrs = [e.sqnr_db for e in rep.errors]
    assert sqnrs == sorted(sqnrs) and len(rep.errors) == len(qm.layer_names())
    assert rep.layer_csv.read_text().splitlines()[0].startswith("rank,name,kind,sqnr_db")
    assert set(rep.plots) == {"sqnr", "hexbin_all", "hexbin_worst", "activation_maps", "activation_maps_worst"}
    for p in rep.plots.values():
        assert_sane_png(p)
    html = rep.html.read_text()
    assert html.count("<table>") >= 3 and "90.5" in html and "conv2" in html
    assert "http://" not in html and "https://" not in html  # self-contained
    blobs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(blobs) == len(rep.plots)
    for blob in blobs:
        with Image.open(io.BytesIO(base64.b64decode(blob))) as im:
            assert im.format == "PNG" and im.size[0] > 300
    assert '"observer": "histogram"' in html  # the config, as pretty JSON
    assert "torch" in html and "onnxruntime" in html  # environment
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_write_report_embeds_given_images_and_rejects_missing(tmp_path):
    png = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(png)
    out = write_report(tmp_path / "r.html", title="t <&>", summary_rows=[{"k": 1}], tables={"extra": [{"a": 2.5}]},
                       images=[png], config={"x": [1, 2]}, environment={"python": "3.x"})
    text = out.read_text()
    assert "t &lt;&amp;&gt;" in text and "data:image/png;base64," in text and "extra" in text
    with pytest.raises(FileNotFoundError, match="nope.png"):
        write_report(tmp_path / "r2.html", title="t", summary_rows=[], tables={}, images=[tmp_path / "nope.png"],
                     config={})
    assert not (tmp_path / "r2.html").exists()


# ---------------------------------------------------------------- sensitivity / mixed precision
BAD = LayerOverride("conv2", weights=QuantSpec(bits=2, signed=True, symmetric=True, granularity=PerChannel(0),
                                               observer=Observer.MINMAX, narrow_range=True))


@pytest.fixture(scope="module")
def bad_setup():
    model = _toy()
    cfg = QuantConfig(overrides=(BAD,))
    qm = quantize(model, _batches(4, seed=5), cfg, progress=False)
    x = torch.cat(_batches(2, seed=9))
    with torch.no_grad():
        ref = model(x)

    def metric(m: nn.Module) -> float:  # higher is better: −MSE of the logits vs the float model
        with torch.no_grad():
            return -float((m(x) - ref).pow(2).mean())

    return model, cfg, qm, metric


@pytest.mark.parametrize("mode", [SensitivityMode.ONLY, "skip"])
def test_deliberately_bad_layer_ranks_first(bad_setup, mode):
    _, _, qm, metric = bad_setup
    before = [m.enabled for m in all_switches(qm)]
    res = layer_sensitivity(qm, metric, _batches(1, seed=9), mode=mode, progress=False)
    assert res.ranking()[0] == "conv2"
    assert sorted(res.ranking()) == sorted(p.name for p in quant_points(qm))
    assert [m.enabled for m in all_switches(qm)] == before  # flags restored
    assert res.float_metric == pytest.approx(0.0, abs=1e-8)
    row = res.rows[0]
    assert row.output_sqnr_db is not None and row.delta is not None
    assert "conv2" in res.table(3)


def test_sensitivity_by_output_sqnr_only(bad_setup):
    _, _, qm, _ = bad_setup
    res = layer_sensitivity(qm, None, _batches(1, seed=9), progress=False)
    assert res.ranking()[0] == "conv2" and res.rows[0].metric is None


def test_mixed_precision_keeps_bad_layer_float_and_meets_budget(bad_setup):
    model, cfg, qm, metric = bad_setup
    ranking = layer_sensitivity(qm, metric, mode="skip", progress=False)
    pts = {p.name: p for p in quant_points(qm)}
    with toggled(qm, [pts["conv2"]], default=True):
        without_bad = metric(qm)
    with toggled(qm, [], default=True):
        all_int8 = metric(qm)
    assert all_int8 < without_bad
    max_drop = (-without_bad + -all_int8) / 2  # met once conv2 is float, not before
    res = mixed_precision_search(qm, metric, 0.0, max_drop, ranking, progress=False)
    assert res.met and res.kept_float[0] == "conv2" and res.metric >= res.target
    assert res.steps[0].metric == pytest.approx(all_int8)
    new_cfg = to_config(res, cfg)
    assert "conv2" in new_cfg.skip and new_cfg.overrides == cfg.overrides
    requant = quantize(model, _batches(4, seed=5), new_cfg, progress=False)
    assert {r.name: r.format for r in requant.layers}["conv2"] is Format.FLOAT
    assert metric(requant) > all_int8


def test_mixed_precision_reports_unmet_budget(bad_setup):
    _, _, qm, metric = bad_setup
    res = mixed_precision_search(qm, metric, 0.0, 0.0, ["conv2", "conv1"], max_float_layers=1, progress=False)
    assert not res.met and res.kept_float == ("conv2",)


def test_runtime_metric_runs_the_toggled_model_on_the_runtime():
    # A layer a sweep switched float must be float in the exported graph too: toggling the last layer
    # equals re-quantizing with it skipped; toggling a middle one matches the fake-quant model so toggled.
    pytest.importorskip("onnxruntime")
    from qdet.analysis.task_metric import TaskMetric, runtime_metric
    from qdet.runtimes.base import get_runtime

    model, batches = _toy(), _batches(4, seed=5)
    x = torch.cat(_batches(2, seed=9))
    with torch.no_grad():
        ref = model(x)

    class NegMSE(TaskMetric):
        name = "-MSE"

        def __call__(self, m):
            with torch.no_grad():
                return -float((torch.as_tensor(m(x)) - ref).pow(2).mean())

    metric = runtime_metric(NegMSE(), "onnxruntime", threads=1)
    assert metric.name == "-MSE, onnxruntime"
    qm = quantize(model, batches, QuantConfig(), progress=False)
    pts = {p.name: p for p in quant_points(qm)}
    results = {}
    for name, points, default in [("int8", [], True), ("fc", [pts["fc"]], True), ("conv2", [pts["conv2"]], True),
                                  ("float", [], False)]:
        with toggled(qm, points, default=default):
            results[name] = (metric(qm), NegMSE()(qm))
    skipped = get_runtime("onnxruntime", threads=1).lower(quantize(model, batches, QuantConfig(skip=("fc",)),
                                                                   progress=False))
    assert results["fc"][0] == pytest.approx(NegMSE()(skipped), rel=1e-6)
    for name, (on_runtime, fake_quant) in results.items():
        assert on_runtime == pytest.approx(fake_quant, rel=1e-3, abs=1e-12), name
    assert len({round(r[0], 12) for r in results.values()}) == 4  # four different graphs ran
    assert results["float"][0] == pytest.approx(0.0, abs=1e-10) and results["int8"][0] < -1e-8
    assert metric(model) == pytest.approx(0.0, abs=1e-12)  # a plain module is evaluated as given
    assert all(m.enabled for m in all_switches(qm))


def test_task_metric_on_calibration_images_needs_a_labeled_calibration_set():
    from qdet import api
    from qdet.analysis.task_metric import task_metric

    with pytest.raises(ConfigError, match="resnet20.*labeled calibration"):
        task_metric(api.get_adapter("resnet20"), on="calibration")
    with pytest.raises(ConfigError, match="on='val'"):
        task_metric(api.get_adapter("resnet20"), on="val")


# ---------------------------------------------------------------- calibration studies
def test_calibration_curve_and_observer_sweep(tmp_path):
    model = _toy()
    data = torch.cat(_batches(4, seed=3))  # 16 images
    x = torch.cat(_batches(1, seed=9))
    with torch.no_grad():
        ref = model(x)

    def quantize_fn(n: int, seed: int, cfg: QuantConfig):
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
        return quantize(model, [data[idx]], cfg, progress=False)

    def metric(m: nn.Module) -> float:
        with torch.no_grad():
            return -float((m(x) - ref).pow(2).mean())

    curve = calibration_curve(quantize_fn, metric, n_images=(1, 4, 16), seeds=(0, 1), float_metric=0.0,
                              progress=False)
    assert [p.n_images for p in curve.points] == [1, 4, 16]
    for p in curve.points:
        assert len(p.values) == 2 and p.min <= p.mean <= p.max
    assert "calib_images" in curve.table()
    assert_sane_png(curve.plot(tmp_path / "curve.png"))

    sweep = observer_sweep(quantize_fn, metric, observers=(Observer.MINMAX, Observer.PERCENTILE),
                           granularities=(PerTensor(), PerChannel()), n_images=8, seeds=(0, 1), progress=False)
    assert [(r.observer, r.granularity) for r in sweep.rows] == [
        (Observer.MINMAX, "per-tensor"), (Observer.MINMAX, "per-channel"),
        (Observer.PERCENTILE, "per-tensor"), (Observer.PERCENTILE, "per-channel")]
    assert sweep.best() in sweep.rows and "observer" in sweep.table()
    assert_sane_png(sweep.plot(tmp_path / "sweep.png"))


def test_two_stage_sensitivity_measures_metric_for_top_sqnr_layers_only(bad_setup):
    _, _, qm, metric = bad_setup
    calls = []

    def counted(m: nn.Module) -> float:
        calls.append(1)
        return metric(m)

    res = layer_sensitivity(qm, counted, _batches(1, seed=9), mode="skip", metric_top=2, progress=False)
    assert len(calls) == 2 + 2  # float + int8 references, then the two SQNR-ranked candidates
    assert res.ranking()[0] == "conv2"
    assert [r.metric is not None for r in res.rows[:2]] == [True, True]
    assert all(r.metric is None and r.output_sqnr_db is not None for r in res.rows[2:])
    assert sorted(res.ranking()) == sorted(p.name for p in quant_points(qm))


def test_layer_costs_count_macs_and_weight_bytes():
    from qdet.analysis.costs import kept_float_rows, layer_costs

    model = _toy()
    costs = layer_costs(model, torch.zeros(1, 3, 16, 16))
    assert costs["conv2"].macs == 16 * 16 * 8 * (8 * 3 * 3)  # output elements × (Cin·k·k)
    assert costs["fc"].macs == 4 * 8
    assert costs["conv2"].params == 8 * 8 * 3 * 3
    assert costs["conv2"].extra_mb == pytest.approx(3 * 576 / 1e6)  # float32 instead of int8
    assert sum(c.mac_share for c in costs.values()) == pytest.approx(1.0)

    class Res:  # the fields of a MixedPrecisionResult that kept_float_rows reads
        kept_float = ("conv2",)
        int8_metric = 1.0
        steps = (SearchStep(0, "", 1.0), SearchStep(1, "conv2", 3.0), SearchStep(2, "conv1", 3.5),
                 SearchStep(1, "-conv1", 3.0))

    rows = kept_float_rows(Res(), costs)
    assert [(r["layer"], r["gain"]) for r in rows] == [("conv2", 2.0)]
    assert rows[0]["mac_share_pct"] == pytest.approx(100 * costs["conv2"].mac_share)


def test_classification_metric_is_top1_in_percent():
    from qdet.analysis.task_metric import classification_metric

    x = torch.eye(4).reshape(4, 4, 1, 1).repeat(2, 1, 1, 1)  # 8 one-hot "images"
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 0])  # the last label is wrong for an identity classifier
    metric = classification_metric([(x[:5], y[:5]), (x[5:], y[5:])])
    assert metric(nn.Flatten()) == pytest.approx(100 * 7 / 8)


def test_classification_metric_breaks_ties_like_evaluate_topk():
    # Quantized logits tie often; the cached metric must count them as `qdet eval` does.
    from qdet.analysis.task_metric import classification_metric
    from qdet.eval.classification import evaluate_topk

    gen = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (200, 10), generator=gen).float()  # many rows with tied maxima
    labels = torch.randint(0, 10, (200,), generator=gen)
    batches = [(logits[:120], labels[:120]), (logits[120:], labels[120:])]
    expected = evaluate_topk(nn.Identity(), batches, topk=(1,), progress=False).top1
    assert classification_metric(batches)(nn.Identity()) == pytest.approx(expected)


# ---------------------------------------------------------------- detection frames, GIF, MP4
def _frame_setup():
    from qdet.analysis.frames import detection_frames

    model = _toy()
    qm = quantize(model, _batches(4, size=32, seed=5), QuantConfig(), progress=False)
    images = [torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    def boxes(out: torch.Tensor) -> list[torch.Tensor]:  # one box whose score is the first logit
        return [torch.tensor([[4.0, 4.0, 30.0, 20.0, float(o[0].sigmoid()), 1.0]]) for o in out]

    return qm, images, detection_frames(qm, images, "conv2", boxes)


def test_detection_frames_pair_float_and_int8_maps():
    qm, images, frames = _frame_setup()
    assert len(frames) == 3
    for img, f in zip(images, frames):
        assert f.float_map.shape == f.int8_map.shape == (32, 48)  # channel max of conv2's (8, 32, 48) output
        assert torch.equal(f.image, img)
        assert 10 < f.sqnr_db < 80  # int8 is close to, but not equal to, float
        assert not torch.equal(f.float_map, f.int8_map)
        assert f.float_boxes.shape == f.int8_boxes.shape == (1, 6)
    from qdet.analysis.frames import detection_frames

    with pytest.raises(ConfigError, match="conv9"):
        detection_frames(qm, images, "conv9", lambda out: [])


def test_frame_png_gif_and_mp4_have_the_frames(tmp_path):
    from qdet.analysis.frames import plot_detection_frame, write_gif, write_mp4

    _, _, frames = _frame_setup()
    pngs = [plot_detection_frame(f, tmp_path / f"f{i}.png", names=["a", "b"], title=f"frame {i}")
            for i, f in enumerate(frames)]
    for p in pngs:
        assert_sane_png(p, min_w=800, min_h=300)
    first = np.asarray(Image.open(pngs[0]).convert("RGB"), dtype=np.int16)
    with Image.open(write_gif(pngs, tmp_path / "frames.gif", fps=4)) as gif:
        assert gif.format == "GIF" and gif.n_frames == 3 and gif.size == Image.open(pngs[0]).size
        gif.seek(0)
        g0 = np.asarray(gif.convert("RGB"), dtype=np.int16)
        gif.seek(2)
        g2 = np.asarray(gif.convert("RGB"), dtype=np.int16)
    assert np.abs(g0 - first).mean() < 12  # palette quantization only
    assert np.abs(g0 - g2).mean() > 0.5  # the frames differ (different images and maps)
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    mp4 = write_mp4(pngs, tmp_path / "frames.mp4", fps=4)
    reader = imageio_ffmpeg.read_frames(str(mp4))
    meta = next(reader)
    w, h = Image.open(pngs[0]).size
    assert tuple(meta["size"]) == (w - w % 2, h - h % 2)
    assert sum(1 for _ in reader) == 3
