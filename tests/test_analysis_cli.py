"""`qdet analyze` end to end on a real CIFAR ResNet20: task-metric sensitivity, the mixed-precision
budget, and the report's metrics agreeing with the float vs int8 evaluation of the same run."""
import json
import subprocess
import sys

import pytest

from conftest import require_asset


@pytest.mark.assets
def test_analyze_task_metric_sensitivity_and_mixed_precision(tmp_path):
    require_asset("weights/cifar10_resnet20.pt")
    require_asset("cifar10/test")
    js, out = tmp_path / "a.json", tmp_path / "report"
    cmd = [sys.executable, "-m", "qdet.cli", "analyze", "resnet20", "--runtime", "reference", "--calib-images", "32",
           "--eval-images", "200", "--batches", "1", "--batch-size", "8", "--sensitivity", "skip", "--metric-top", "3",
           "--max-drop", "0.0", "--max-float-layers", "2", "--threads", "1", "--no-progress", "--out", str(out),
           "--json", str(js)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(js.read_text())
    sens, mp = result["sensitivity"], result["mixed_precision"]
    rows = {r["model"]: r for r in result["metrics"]}
    # the cached task metric is the evaluation `qdet eval` runs: same images, same numbers
    assert sens["float"] == pytest.approx(rows["float (PyTorch eager)"]["top1"])
    assert sens["int8"] == pytest.approx(rows["int8 (reference)"]["top1"])
    measured = [r for r in sens["rows"] if r["metric"] is not None]
    assert len(measured) == 3 and all(r["output_sqnr_db"] is not None for r in sens["rows"])
    assert [r["metric"] for r in measured] == sorted((r["metric"] for r in measured), reverse=True)
    summary = {r["model"]: r for r in mp["summary"]}
    assert summary["mixed"]["float_layers"] == len(mp["kept"]) <= 2
    for k in mp["kept"]:  # every kept layer reports its cost
        assert k["params"] > 0 and k["extra_mb"] == pytest.approx(3 * k["params"] / 1e6)
        assert 0 < k["mac_share_pct"] < 100
    assert set(mp["skip"]) == {k["layer"] for k in mp["kept"]}
    html = (out / "report.html").read_text()
    assert "Sensitivity (skip)" in html and "Mixed precision" in html
    assert "report:" in proc.stdout and "--skip" in proc.stdout


@pytest.mark.assets
def test_analyze_search_on_a_runtime_agrees_with_its_evaluation(tmp_path):
    # --search-runtime measures every sensitivity step on the runtime: its float and int8 references
    # must be the runtime's own float and int8 rows of the same run's evaluation.
    pytest.importorskip("onnxruntime")
    require_asset("weights/cifar10_resnet20.pt")
    require_asset("cifar10/test")
    js = tmp_path / "a.json"
    cmd = [sys.executable, "-m", "qdet.cli", "analyze", "resnet20", "--runtime", "onnxruntime", "--search-runtime",
           "onnxruntime", "--calib-images", "32", "--eval-images", "200", "--batches", "1", "--batch-size", "8",
           "--sensitivity", "skip", "--metric-top", "2", "--threads", "1", "--no-progress", "--out",
           str(tmp_path / "report"), "--json", str(js)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(js.read_text())
    sens = result["sensitivity"]
    rows = {r["model"]: r for r in result["metrics"]}
    assert sens["measured_on"] == "onnxruntime, eval images" and sens["metric"].endswith(", onnxruntime")
    assert sens["float"] == pytest.approx(rows["float (onnxruntime)"]["top1"])
    assert sens["int8"] == pytest.approx(rows["int8 (onnxruntime)"]["top1"])
    assert len([r for r in sens["rows"] if r["metric"] is not None]) == 2


@pytest.mark.parametrize("option, message", [(["--search-on", "calibration"], "'resnet20': no labeled calibration set"),
                                             (["--search-runtime", "tensorrt"], "unknown runtime 'tensorrt'")])
def test_analyze_refuses_bad_search_options_before_any_work(tmp_path, option, message):
    # no weights, data or calibration are touched: the option is rejected first, in one line
    cmd = [sys.executable, "-m", "qdet.cli", "analyze", "resnet20", "--data", str(tmp_path / "missing"),
           "--sensitivity", "skip", "--no-progress", "--out", str(tmp_path), *option]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir())
