"""The CLI end to end: help, list, the main job on real assets, errors as one line."""
import json
import subprocess
import sys

import pytest

from conftest import require_asset
from qdet.cli import main


def test_help_lists_verbs(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for verb in ("quantize", "eval", "bench", "list"):
        assert verb in out


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "resnet56" in out and "histogram" in out and "onnxruntime" in out


def test_unknown_observer_is_one_clear_line(capsys):
    require_asset("weights/cifar10_resnet20.pt")
    assert main(["quantize", "resnet20", "--observer", "kl-magic", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "unknown observer 'kl-magic'" in err and "Traceback" not in err


def test_unknown_model(capsys):
    assert main(["quantize", "resnet9000"]) == 2
    assert "unknown model 'resnet9000'" in capsys.readouterr().err


@pytest.mark.assets
def test_quantize_eval_resnet20_on_cifar(tmp_path):
    require_asset("weights/cifar10_resnet20.pt")
    require_asset("cifar10/test")
    out, js = tmp_path / "r20.qdet", tmp_path / "r20.json"
    cmd = [sys.executable, "-m", "qdet.cli", "quantize", "resnet20", "--calib-images", "128",
           "--eval-images", "1000", "--no-bench", "--no-progress", "--out", str(out), "--json", str(js)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(js.read_text())
    rt = result["meta"]["runtime"]  # --runtime auto: the fastest installed int8 runtime
    assert rt in ("openvino", "onnxruntime")
    assert f"int8 ({rt})" in proc.stdout
    rows = {r["model"]: r for r in result["rows"]}
    float_top1 = rows["float (PyTorch eager)"]["top1"]
    assert 85 < float_top1 < 97  # a 1000-image subset of a 91.7 % model
    assert abs(rows[f"int8 ({rt})"]["top1"] - float_top1) < 1.5
    assert rows[f"int8 ({rt})"]["size_mb"] < 0.35 * rows[f"float ({rt})"]["size_mb"]
    cov = result["meta"]["coverage"]  # what the runtime itself says it executes in int8
    executed = cov["runtime"][rt]
    assert executed["float_convs"] == executed["float_matmuls"] == 0, executed
    assert executed["int8_convs"] + executed["int8_matmuls"] == cov["int8_layers"] > 0
    assert f"{rt} executes {executed['int8_convs']} of {executed['int8_convs']} convolutions" in proc.stdout
    assert out.is_file()
    proc = subprocess.run([sys.executable, "-m", "qdet.cli", "eval", "resnet20", "--qmodel", str(out),
                           "--eval-images", "500", "--no-progress", "--with-reference"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "int8 (reference simulation)" in proc.stdout


@pytest.mark.parametrize("runtime, silu, fused", [
    ("openvino", "auto", True), ("onnxruntime", "auto", False), ("onnxruntime", "fused", True),
    ("openvino", "decomposed", False), ("reference", "auto", True),
])
def test_silu_handling_follows_the_runtime(runtime, silu, fused):
    from qdet.cli import build_parser, config_from_args

    args = build_parser().parse_args(["quantize", "yolov5n", "--runtime", runtime, "--silu", silu])
    assert config_from_args(args).fuse_silu is fused


def test_auto_runtime_is_the_fastest_installed():
    from qdet.runtimes.base import get_runtime, resolve_runtime

    chosen = resolve_runtime("auto")
    assert get_runtime(chosen).is_available()
    expected = "openvino" if get_runtime("openvino").is_available() else "onnxruntime"
    assert chosen == expected and resolve_runtime("torch") == "torch"


def _subparsers():
    import argparse

    from qdet.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, action.choices


def test_every_verb_shares_the_option_names():
    """One meaning per word: --json on every verb, --batch-size (never --batch / --calib-batch alone),
    the same --weights / --seed / --no-progress wherever a model is built, and --version."""
    parser, verbs = _subparsers()
    assert "--version" in parser._option_string_actions
    for name, sub in verbs.items():
        opts = sub._option_string_actions
        assert "--json" in opts, name
        if name == "list":
            continue
        for shared in ("--weights", "--seed", "--no-progress"):
            assert shared in opts, (name, shared)
        if name != "eval":  # eval loads a calibrated .qdet
            assert "--calib-images" in opts and "--calib-batch-size" in opts, name
        if "--batch" in opts:
            assert opts["--batch"].dest == "batch_size" and opts["--batch"].help == "==SUPPRESS==", name
        if "--out" in opts:
            assert opts["--out"].dest == "out", name


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and "qdet" in capsys.readouterr().out


@pytest.mark.parametrize("argv, option", [
    (["quantize", "resnet20", "--threads", "0"], "--threads"),
    (["quantize", "resnet20", "--repeats", "0"], "--repeats"),
    (["quantize", "resnet20", "--seed", str(2**32)], "--seed"),
    (["quantize", "resnet20", "--calib-images", "0"], "--calib-images"),
    (["quantize", "resnet20", "--num-classes", "0"], "--num-classes"),
    (["bench", "resnet20", "--batch-size", "0"], "--batch-size"),
    (["qat", "resnet20", "--lr", "inf"], "--lr"),
    (["qat", "yolov5n", "--img-size", "7"], "--img-size"),
])
def test_bad_option_values_fail_before_any_work(argv, option, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and f"argument {option}" in capsys.readouterr().err


def test_missing_weights_is_one_line_exit_2(capsys):
    assert main(["quantize", "resnet50", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "'resnet50' has no bundled weights" in err and "--weights PATH" in err and "--weights random" in err


def test_eval_images_on_a_detector_fails_first(capsys):
    require_asset("weights/yolov5n_v6.1_state_dict_fp16.pt")
    assert main(["quantize", "yolov5n", "--eval-images", "5"]) == 2
    assert "--eval-images" in capsys.readouterr().err


def test_list_marks_bundled_weights_and_writes_json(tmp_path, capsys):
    js = tmp_path / "list.json"
    assert main(["list", "--json", str(js)]) == 0
    assert "bundled weights" in capsys.readouterr().out
    data = json.loads(js.read_text())
    assert {m["model"]: m["bundled_weights"] for m in data["models"]}["resnet50"] is False


def test_out_is_always_the_file_the_verb_writes():
    """--out: the .qdet of quantize/qat, the JSON of export-int; analyze writes a folder: --report-dir
    (its old spelling --out still works, hidden)."""
    import argparse

    _, verbs = _subparsers()
    for name, ext in (("quantize", ".qdet"), ("qat", ".qdet"), ("export-int", ".json")):
        assert verbs[name]._option_string_actions["--out"].metavar == f"FILE{ext}", name
    a = verbs["analyze"]._option_string_actions
    assert a["--report-dir"].dest == a["--out"].dest == "out" and a["--out"].help == argparse.SUPPRESS
    assert "folder" in a["--report-dir"].help
    for name in ("eval", "bench", "list"):
        assert "--out" not in verbs[name]._option_string_actions, name


def test_tables_state_units_and_print_them_with_two_decimals():
    from qdet.report.table import format_table

    rows = [{"model": "float", "size_mb": 1.0132, "latency_ms": 0.51234, "map50_95_pts": 30.1234,
             "d_map50_95_pts": -0.2134, "speedup_vs_eager": 0.3755, "fraction": 0.30121}]
    line = format_table(rows).splitlines()[2]
    assert line.split() == ["float", "1.01", "0.51", "30.12", "-0.21", "0.38", "0.3012"]


def test_detection_metrics_are_in_points():
    from types import SimpleNamespace

    from qdet.jobs import headline_metrics

    assert headline_metrics(SimpleNamespace(map=0.3012, map50=0.475)) == pytest.approx(
        {"map50_95_pts": 30.12, "map50_pts": 47.5})
    kitti = SimpleNamespace(moderate_map=lambda: 0.5, seed_accuracy=0.25)
    assert headline_metrics(kitti) == pytest.approx({"ap_r40_moderate_pts": 50.0, "seed_accuracy_pct": 25.0})


def test_eval_progress_bar_names_what_runs(capsys):
    import torch
    from torch.utils.data import TensorDataset

    from qdet import api
    from qdet.models.base import Task

    adapter = type("A", (), {"task": Task.CLASSIFICATION, "name": "toy"})()
    data = TensorDataset(torch.randn(8, 4), torch.zeros(8, dtype=torch.long))
    api.evaluate(torch.nn.Linear(4, 3), adapter, data, desc="int8 (openvino)")
    assert "int8 (openvino): top-1, 8 images" in capsys.readouterr().err


def test_eval_times_only_when_asked():
    from qdet.cli import build_parser

    assert build_parser().parse_args(["eval", "resnet20", "--qmodel", "m.qdet"]).bench is False
    assert build_parser().parse_args(["eval", "resnet20", "--qmodel", "m.qdet", "--bench"]).bench is True


def test_calibration_batch_default_is_the_models_recipe():
    from qdet import api
    from qdet.cli import build_parser, check_args

    for model, batch in (("yolov5n", 32), ("resnet20", 32)):
        args = build_parser().parse_args(["quantize", model, "--weights", "random"])
        assert args.calib_batch is None
        check_args(api.get_adapter(model), args)
        assert args.calib_batch == batch, model
    args = build_parser().parse_args(["quantize", "yolov5n", "--calib-batch-size", "4", "--weights", "random"])
    check_args(api.get_adapter("yolov5n"), args)
    assert args.calib_batch == 4
