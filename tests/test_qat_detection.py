"""QAT of detectors: FrozenBatchNorm2d folding, Faster R-CNN through the Python API, and `qdet qat`
for YOLO end to end on a tiny COCO folder. Random weights and tiny images: the plumbing, not accuracy."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from synthetic_coco import write_tiny_coco
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import qdet
from qdet.cli import build_parser, main
from qdet.config import QATConfig, QuantConfig
from qdet.quant.calibrate import quantization_disabled
from qdet.quant.qat import QATConvBn2d
from qdet.train import train_qat

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _frozen_bn(c: int) -> FrozenBatchNorm2d:
    """A FrozenBatchNorm2d with non-trivial statistics, as a pretrained backbone has."""
    bn = FrozenBatchNorm2d(c)
    bn.running_mean.uniform_(-0.3, 0.3)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.uniform_(0.5, 1.5)
    bn.bias.uniform_(-0.2, 0.2)
    return bn


def _replace_bn_with_frozen(model: nn.Module) -> nn.Module:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, name, _frozen_bn(child.num_features))
    return model


def _images(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 10, 10, generator=g) for _ in range(n)]


def test_frozen_batchnorm_folds_in_ptq_and_qat_and_keeps_float_outputs_within_1e_4():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _frozen_bn(8), nn.ReLU(),
                        nn.Conv2d(8, 4, 3, padding=1, bias=False), _frozen_bn(4)).eval()
    data = _images(3, seed=0)
    ptq = qdet.quantize(net, data, QuantConfig(), progress=False)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in ptq.modules())
    assert sorted(next(iter(ptq.regions.values())).folded_bn) == ["0", "3"]
    qm = qdet.prepare_qat(net, data, QuantConfig(), qat=QATConfig(freeze_bn_after=None, calibration_batches=3),
                          progress=False)
    convs = [m for m in qm.modules() if isinstance(m, QATConvBn2d)]
    assert len(convs) == 2 and all(c.bn_frozen for c in convs)  # frozen by definition: no batch statistics
    x = _images(1, seed=4)[0]
    for mode in ("train", "eval"):  # the frozen fold is the float model in either mode
        qm.train(mode == "train")
        with quantization_disabled(qm), torch.no_grad():
            assert float((qm(x) - net(x)).abs().max()) < 1e-4, mode
    mean = convs[0].bn.running_mean.clone()
    log = train_qat(qm, [(b, None) for b in data], lambda out, _: out.square().mean(), steps=2, lr=1e-2,
                    progress=False)
    assert len(log.losses) == 2 and torch.equal(convs[0].bn.running_mean, mean)
    assert convs[0].bn.weight.grad is None and convs[0].weight.grad is not None  # affine fixed, conv trains


def test_faster_rcnn_qat_with_frozen_bn_trains_converts_and_runs_on_every_runtime(tmp_path):
    """A tiny random Faster R-CNN with FrozenBatchNorm2d (as torchvision's pretrained detectors have):
    prepare_qat → a few steps on torchvision's own losses → convert → every runtime, save/load."""
    from qdet.models.faster_rcnn import FasterRCNNAdapter
    from qdet.models.rcnn import make_quantizable
    from qdet.models.rcnn.synthetic import SyntheticShapes, tiny_faster_rcnn

    def build() -> nn.Module:
        torch.manual_seed(0)
        return make_quantizable(_replace_bn_with_frozen(tiny_faster_rcnn(image_size=64).eval()))

    adapter = FasterRCNNAdapter("tiny_faster_rcnn", num_classes=4)
    ds = SyntheticShapes(8, seed=2, size=64, max_objects=2)
    images, targets = [ds[i][0] for i in range(8)], [ds[i][1] for i in range(8)]
    qm = qdet.prepare_qat(build(), [images[0:2], images[2:4]], QuantConfig(), adapter=adapter,
                          qat=QATConfig(freeze_bn_after=None, freeze_observers_after=2, calibration_batches=2),
                          progress=False)
    convs = [m for m in qm.modules() if isinstance(m, QATConvBn2d)]
    assert len(convs) >= 8 and all(c.bn_frozen for c in convs)
    stats = {n: b.clone() for n, b in qm.named_buffers() if n.endswith(("running_mean", "running_var"))}
    before = {n: p.detach().clone() for n, p in qm.named_parameters() if p.requires_grad}
    batches = [(images[i:i + 2], targets[i:i + 2]) for i in range(0, 8, 2)]
    log = train_qat(qm, batches, lambda losses, _: sum(losses.values()), steps=3, lr=1e-3,
                    transform_fn=lambda b: (b[0], b[1]), progress=False)  # train mode: model(images, targets)
    assert len(log.losses) == 3 and all(math.isfinite(v) for v in log.losses) and log.events == [(2, "observers")]
    assert all(torch.equal(b, stats[n]) for n, b in qm.named_buffers() if n in stats)  # frozen BN stays frozen
    moved = [n for n, p in qm.named_parameters() if n in before and not torch.equal(p.detach(), before[n])]
    assert "model.backbone.body.stem.0.weight" in moved and any(".rpn.head." in n for n in moved)
    assert not any(n.endswith(("bn.weight", "bn.bias")) for n, p in qm.named_parameters() if p.requires_grad)

    converted = qdet.convert(qm)
    loaded = qdet.load(qdet.save(converted, tmp_path / "frcnn-qat.qdet"), build())
    img = [images[5]]
    with torch.no_grad():
        ref = converted(img)[0]
        assert torch.equal(loaded(img)[0]["labels"], ref["labels"])
    ran = []
    for name in ("reference", "torch", "onnxruntime", "openvino"):
        if name in ("onnxruntime", "openvino") and importlib.util.find_spec(name) is None:
            continue
        with torch.no_grad():
            out = qdet.lower(loaded, name, threads=1)(img)[0]
        assert set(out) == {"boxes", "labels", "scores"} and out["boxes"].shape == (len(out["scores"]), 4), name
        assert bool(torch.isfinite(out["boxes"]).all()), name
        ran.append(name)
    assert {"reference", "torch"} <= set(ran)


def test_qat_cli_on_a_tiny_random_yolo_end_to_end(tmp_path):
    """`qdet qat yolov5n`: train2017 calibrates and fine-tunes, val2017 evaluates, one table, a model that reloads."""
    data, out, js = write_tiny_coco(tmp_path / "coco"), tmp_path / "y-qat.qdet", tmp_path / "y-qat.json"
    runtime = "onnxruntime" if importlib.util.find_spec("onnxruntime") else "torch"
    code = main(["qat", "yolov5n", "--weights", "random", "--data", str(data), "--img-size", "64", "--steps", "2",
                 "--batch-size", "2", "--calib-images", "4", "--calib-batch", "2", "--freeze-observers", "2",
                 "--runtime", runtime, "--threads", "1", "--no-progress", "--out", str(out), "--json", str(js)])
    assert code == 0
    result = json.loads(js.read_text())
    meta, rows = result["meta"], result["rows"]
    assert [r["model"] for r in rows] == ["float", f"PTQ ({runtime})", f"QAT 2 steps ({runtime})"]
    assert all(math.isfinite(r["map50_95_pts"]) and math.isfinite(r["map50_pts"]) for r in rows)
    assert meta["train_images"] == 4 and meta["calibration_images"] == 4 and meta["eval_images"] == 3
    assert meta["img_size"] == 64 and meta["events"] == [[1, "bn"], [2, "observers"]] and meta["lr"] == 1e-5
    adapter = qdet.get_adapter("yolov5n")
    loaded = qdet.load(out, adapter.build("random"))
    assert loaded.metrics["steps"] == 2
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert loaded(x).shape == adapter.build("random")(x).shape
        assert torch.as_tensor(qdet.lower(loaded, runtime, threads=1)(x)).shape == loaded(x).shape


def test_qat_cli_detector_without_a_recipe_is_one_clear_line(capsys):
    assert main(["qat", "fasterrcnn_mobilenet_v3_large_fpn", "--weights", "random", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no fine-tuning recipe" in err and "qdet.prepare_qat" in err and "Traceback" not in err


def test_qat_cli_help_states_the_split_and_the_defaults_agree_with_qatconfig(capsys):
    with pytest.raises(SystemExit):
        main(["qat", "--help"])
    out = capsys.readouterr().out
    assert "train2017" in out and "val2017" in out and "--img-size" in out
    args = build_parser().parse_args(["qat", "yolov5n"])
    assert args.freeze_bn == QATConfig().freeze_bn_after == 1


def test_faster_rcnn_built_from_weights_marks_backbone_bn_frozen_like_torchvision(tmp_path):
    """torchvision makes the v1/MobileNet backbone BN FrozenBatchNorm2d for trained weights; the adapter
    marks them so that QAT does not retrain statistics the weights were trained without."""
    from qdet.models import REGISTRY
    from qdet.quant.fusion import is_frozen_batchnorm

    adapter = REGISTRY.get("fasterrcnn_mobilenet_v3_large_fpn")
    random = adapter.build(weights="random", min_size=64, max_size=64)
    assert not any(is_frozen_batchnorm(m) for m in random.modules())
    path = tmp_path / "w.pth"
    torch.save(random.state_dict(), path)
    loaded = adapter.build(weights=path, min_size=64, max_size=64)
    bns = [m for m in loaded.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(is_frozen_batchnorm(m) and not m.weight.requires_grad for m in bns)
