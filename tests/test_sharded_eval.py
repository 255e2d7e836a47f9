"""Sharded evaluation (`qdet.parallel.evaluation`, `qdet eval|quantize --ray`): every adapter's
`evaluate` = `score(predict(...))`, and image shards predicted apart, concatenated and scored once give
the one-pass result exactly — on the serial backend, and on a local Ray from the CLI (skipped without
the `ray` extra). SYNTHETIC data throughout (noise images with random boxes, random or lively-random
weights), except the KITTI frames and CIFAR images of ../shared/assets in the tests marked `assets`."""
from __future__ import annotations

import json
import pickle
import sys

import pytest
import torch
from synthetic_coco import write_tiny_coco
from torch.utils.data import TensorDataset

import qdet
from qdet.cli import main
from qdet.config import QuantConfig
from qdet.models.random_init import lively_init_
from qdet.models.yolo.adapter import YoloAdapter, YoloDetector
from qdet.models.yolo.model import YOLOv5, yolov5_config
from qdet.parallel import SerialBackend
from qdet.parallel.evaluation import OnRuntime, evaluate_sharded, portable, shard_ranges

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_module_examples_run():
    import doctest

    import qdet.eval.classification
    import qdet.parallel.evaluation

    for module in (qdet.parallel.evaluation, qdet.eval.classification):
        assert doctest.testmod(module).failed == 0, module.__name__


def test_shard_ranges_are_contiguous_runs_of_whole_batches():
    for n in (1, 7, 8, 9, 31, 256, 1000):
        for batch in (1, 8, 256):
            for shards in (1, 2, 3, 8):
                ranges = shard_ranges(n, batch, shards)
                assert [i for a, b in ranges for i in range(a, b)] == list(range(n))
                assert all(a % batch == 0 for a, _ in ranges)  # every image keeps its unsharded batch


def test_classifier_shards_sum_hit_counts():
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(700, 3, 4, 4, generator=g), torch.randint(0, 10, (700,), generator=g))
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 10)).eval()
    adapter = qdet.get_adapter("resnet20")  # only its task (classification) matters here
    one_pass = qdet.evaluate(net, adapter, data, progress=False)
    sharded = evaluate_sharded(net, adapter, data, SerialBackend(), shards=3, progress=False)
    assert sharded == one_pass and sharded.n_images == 700 and 0 < sharded.top1 < 100


@pytest.fixture(scope="module")
def tiny_yolo():
    torch.manual_seed(0)
    yolo = lively_init_(YOLOv5(yolov5_config("n", nc=80, depth_multiple=0.33, width_multiple=0.125)),
                        (2, 3, 64, 64), seed=0).eval()
    with torch.no_grad():  # objectness ~σ(0): detections above conf 0.001 on noise images
        for conv in yolo.detect.m:
            conv.bias.view(yolo.detect.na, -1)[:, 4] = 0.0
    return YoloDetector(yolo).eval()


def test_yolo_shards_merge_into_the_one_pass_coco_evaluation(tiny_yolo, tmp_path):
    adapter = YoloAdapter("yolov5n", img_size=64)
    data = adapter.eval_dataset(write_tiny_coco(tmp_path / "coco", train=1, val=7))
    whole = adapter.predict(tiny_yolo, data, progress=False)
    parts = [adapter.predict(tiny_yolo, data, indices=range(a, b), progress=False) for a, b in ((0, 3), (3, 7))]
    assert len(whole) > 20 and [d for p in parts for d in p] == whole
    one_pass = adapter.evaluate(tiny_yolo, data, progress=False)
    sharded = evaluate_sharded(tiny_yolo, adapter, data, SerialBackend(), shards=3, progress=False)
    assert repr(sharded) == repr(one_pass)


def test_ssd_shards_are_whole_batches_of_eight_and_score_once():
    from test_whole_graph import TinySSDNet

    from qdet.models.rcnn.synthetic import SyntheticShapes
    from qdet.models.ssd.adapter import SSDResNet50Adapter
    from qdet.models.ssd.boxes import PostProcess
    from qdet.models.ssd.resnet50 import SSDDetector

    net = lively_init_(TinySSDNet(), (2, 3, 264, 264), seed=0).eval()
    det = SSDDetector(net, img_size=264, post=PostProcess(score_thresh=0.05, iou_thresh=0.5, max_detections=20)).eval()
    adapter, data = SSDResNet50Adapter(img_size=264), SyntheticShapes(19, seed=3, size=96, max_objects=2)
    one_pass = adapter.evaluate(det, data, progress=False)
    assert adapter.eval_batch_size == 8 and shard_ranges(len(data), 8, 3) == [(0, 8), (8, 16), (16, 19)]
    sharded = evaluate_sharded(det, adapter, data, SerialBackend(), shards=3, progress=False)
    assert repr(sharded) == repr(one_pass)
    assert adapter.predict(det, data, indices=range(8, 16), progress=False)  # a shard has detections to merge


@pytest.mark.assets
def test_faster_rcnn_kitti_frames_evaluate_the_same_in_shards():
    from conftest import require_asset

    from qdet.eval.kitti import KittiResult
    from qdet.paths import assets_dir

    require_asset("kitti/training/label_2/000005.txt")
    adapter = qdet.get_adapter("fasterrcnn_mobilenet_v3_large_fpn")
    torch.manual_seed(0)  # random weights, KITTI's classes (labels 1.. = KITTI_CLASSES), every box kept
    model = adapter.build(weights="random", num_classes=4, min_size=96, max_size=320, box_score_thresh=0.0)
    data = adapter.eval_dataset(assets_dir() / "kitti")
    frames = adapter.predict(model, data, progress=False)
    assert len(frames) == len(data) and sum(map(len, frames)) > 0
    one_pass = adapter.evaluate(model, data, progress=False)
    sharded = evaluate_sharded(model, adapter, data, SerialBackend(), shards=4, progress=False)
    assert isinstance(sharded, KittiResult) and repr(sharded) == repr(one_pass)


@pytest.fixture(scope="module")
def tiny_qm():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    return qdet.quantize(net, [torch.randn(4, 3, 8, 8) for _ in range(2)], QuantConfig(), progress=False)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_a_lowered_model_travels_as_its_graph_and_compiles_with_the_workers_threads(tiny_qm, runtime):
    pytest.importorskip(runtime)
    from qdet.runtimes.base import set_runtime_threads

    lowered = qdet.lower(tiny_qm, runtime, threads=2)
    x = torch.randn(2, 3, 8, 8)
    expected = torch.as_tensor(lowered(x))
    received = pickle.loads(pickle.dumps(lowered))  # what a worker gets: no session / compiled model inside
    region = next(m for m in received.modules() if callable(getattr(m, "set_threads", None)))
    assert getattr(region, "_session", None) is None and not getattr(region, "_requests", {})
    set_runtime_threads(received, 1)
    assert region.threads == 1 and torch.equal(torch.as_tensor(received(x)), expected)
    assert portable(lowered, lambda: tiny_qm, runtime, quantized=True) is lowered


def test_a_lowered_model_that_does_not_pickle_is_lowered_in_the_worker(tiny_qm):
    lowered = qdet.lower(tiny_qm, "torch", threads=1)  # PyTorch's quantized modules do not pickle
    spec = portable(lowered, lambda: tiny_qm, "torch", quantized=True)
    assert isinstance(spec, OnRuntime)
    copy = pickle.loads(pickle.dumps(spec))  # what a worker receives: the QuantizedModel and the runtime's name
    assert copy._lowered is None
    built = copy.get(threads=1)
    assert copy.get(threads=1) is built  # lowered once per process
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(torch.as_tensor(built(x)), torch.as_tensor(lowered(x)))


def test_ray_options_of_eval_and_quantize_fail_before_any_work(monkeypatch, capsys, tmp_path):
    assert main(["quantize", "resnet20", "--ray-workers", "2", "--no-progress"]) == 2
    assert "--ray-workers: only with --ray auto" in capsys.readouterr().err
    model_file = tmp_path / "m.py"
    model_file.write_text("import torch\ndef build():\n    return torch.nn.Linear(4, 2)\n")
    assert main(["quantize", "--model-file", f"{model_file}:build", "--ray", "auto", "--no-progress"]) == 2
    assert "--ray is for named models" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the qdet[ray] extra were not installed
    assert main(["quantize", "resnet20", "--ray", "auto", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--ray needs Ray: pip install 'qdet[ray]'" in err and "Traceback" not in err


@pytest.mark.assets
@pytest.mark.slow
def test_quantize_with_ray_writes_the_rows_of_a_one_thread_serial_run(tmp_path):
    # `qdet quantize --ray auto`: the float, float-on-ORT and int8-on-ORT evaluations as image shards on a
    # local Ray of 2 one-thread workers; the same top-1 as the serial run with --threads 1 (~40 s CPU)
    pytest.importorskip("ray")
    pytest.importorskip("onnxruntime")
    from conftest import require_asset

    require_asset("weights/cifar10_resnet20.pt")
    require_asset("cifar10/test")
    base = ["quantize", "resnet20", "--runtime", "onnxruntime", "--calib-images", "32", "--eval-images", "600",
            "--threads", "1", "--no-bench", "--no-progress"]
    rows = {}
    for name, extra in (("serial", []), ("ray", ["--ray", "auto", "--ray-workers", "2"])):
        out = tmp_path / name
        assert main([*base, "--out", str(out / "m.qdet"), "--json", str(out / "r.json"), *extra]) == 0
        result = json.loads((out / "r.json").read_text())
        rows[name] = result["rows"]
        if name == "ray":
            assert "image shards on Ray (2 workers x 1 thread" in result["meta"]["evaluation"]
    assert rows["ray"] == rows["serial"] and len(rows["serial"]) == 3
    assert all(r["top1"] > 80 for r in rows["serial"])
