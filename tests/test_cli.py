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
