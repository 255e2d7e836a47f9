"""Quantization-aware training: STE gradients, BN folding, freeze schedule, conversion to the PTQ
model structure, and converted models on every runtime. Tiny models, a few seconds in all."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from torch import nn

import qdet
from qdet.config import QATConfig, QuantConfig, default_weight_spec
from qdet.errors import CalibrationError, ConfigError
from qdet.quant.calibrate import quantization_disabled
from qdet.quant.qat import QATConvBn2d
from qdet.quant.qparams import fake_quantize
from qdet.quant.quantizer import QuantConv2d
from qdet.train import classification_loss, train_qat

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bn(c: int) -> nn.BatchNorm2d:
    """A BN with non-trivial statistics, as a trained one has."""
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.3, 0.3)
    return bn


class TinyResNet(nn.Module):
    """conv-bn-relu, one residual block (add + relu), pool, linear: the ops QAT must handle."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), _bn(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), _bn(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 3, padding=1, bias=False), _bn(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn3(self.conv3(torch.relu(self.bn2(self.conv2(x)))))
        x = torch.relu(x + y)
        return self.fc(torch.flatten(self.pool(x), 1))


def _data(n: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 12, 12, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return TinyResNet().eval()


def _qat(cfg: QuantConfig | None = None, **schedule: int | None) -> qdet.QuantizedModel:
    qat = QATConfig(calibration_batches=4, **schedule)  # type: ignore[arg-type]
    return qdet.prepare_qat(_model(), _data(), cfg, qat=qat, progress=False)


def test_fake_quant_gradient_is_straight_through_inside_the_range_and_zero_outside():
    x = torch.tensor([-1.0, 0.04, 0.5, 2.0, 30.0], requires_grad=True)
    fake_quantize(x, torch.tensor(0.1), torch.tensor(0), 0, 255).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_gradients_reach_conv_weights_bn_affine_and_linear_through_fake_quant():
    qm = _qat()
    x, y = _data(1)[0]
    classification_loss(qm(x), (x, y)).backward()
    conv = qm.model.conv2
    assert isinstance(conv, QATConvBn2d) and conv.weight_quant.dynamic
    for name, p in [("conv2.weight", conv.weight), ("bn2.weight", conv.bn.weight), ("bn2.bias", conv.bn.bias),
                    ("fc.weight", qm.model.fc.weight)]:
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_bn_folding_keeps_float_outputs_within_1e_4_before_quantization():
    torch.manual_seed(1)
    conv, bn = nn.Conv2d(3, 8, 3, padding=1), _bn(8)
    x = torch.randn(16, 3, 10, 10)
    folded = QATConvBn2d.from_conv_bn(conv, bn)
    bn_ref = _bn(8)
    bn_ref.load_state_dict(bn.state_dict())
    # training, BN not frozen: normalised with batch statistics, running statistics updated alike
    folded.train(), bn_ref.train()
    assert float((folded(x) - bn_ref(conv(x))).detach().abs().max()) < 1e-4
    assert torch.allclose(folded.bn.running_mean, bn_ref.running_mean, atol=1e-6)
    # eval (and after freezing): the running statistics folded into weight and bias
    folded.eval(), bn_ref.eval()
    assert float((folded(x) - bn_ref(conv(x))).detach().abs().max()) < 1e-4
    # the whole prepared model with quantizers disabled is the float model
    net, qm = _model(), _qat()
    qm.eval()
    with quantization_disabled(qm), torch.no_grad():
        assert float((qm(x[:, :, :12, :12]) - net(x[:, :, :12, :12])).abs().max()) < 1e-4


def test_freeze_schedule_stops_bn_statistics_then_activation_ranges():
    qm = _qat(freeze_bn_after=2, freeze_observers_after=3)
    log = train_qat(qm, _data(), classification_loss, steps=5, lr=1e-3, progress=False)
    assert log.events == [(2, "bn"), (3, "observers")] and len(log.losses) == 5
    bn = qm.model.conv1.bn
    mean = bn.running_mean.clone()
    act = qm.model.get_submodule(qm.layers[1].quantizer)
    scale = act.scale.clone()
    qm.train()
    with torch.no_grad():
        qm(_data(1, seed=5)[0][0] * 3)  # a very different batch moves nothing once frozen
    assert torch.equal(bn.running_mean, mean) and torch.equal(act.scale, scale)


def test_activation_ranges_follow_an_ema_while_training():
    qm = _qat(freeze_bn_after=None, freeze_observers_after=None)
    act = qm.model.get_submodule(qm.layers[0].quantizer)  # the input quantizer
    before = float(act.scale)
    qm.train()
    with torch.no_grad():
        qm(_data(1)[0][0] * 10)
    after = float(act.scale)
    assert before < after < 10 * before  # moved towards the wider range, by the EMA factor only
    qm.eval()
    with torch.no_grad():
        qm(_data(1)[0][0] * 100)
    assert float(act.scale) == after  # evaluation does not move ranges


def test_converted_model_has_the_ptq_structure_and_matches_the_trained_model():
    qm = _qat(freeze_bn_after=2, freeze_observers_after=3)
    train_qat(qm, _data(), classification_loss, steps=4, lr=1e-3, progress=False)
    converted = qdet.convert(qm)
    assert isinstance(qm.model.conv1, QATConvBn2d)  # the QAT model is untouched
    assert type(converted.model.conv1) is QuantConv2d and not converted.model.conv1.weight_quant.dynamic
    ptq = qdet.quantize(_model(), _data(), QuantConfig(), progress=False)
    assert converted.model.state_dict().keys() == ptq.model.state_dict().keys()
    x = _data(1, seed=3)[0][0]
    qm.eval()
    with torch.no_grad():
        step = float(converted.model.get_submodule(converted.layers[-1].quantizer).scale)
        assert float((converted(x) - qm(x)).abs().max()) <= step  # same grids, at most a rounding tie


def test_low_bit_qat_weights_take_at_most_2_to_the_bits_minus_1_levels():
    cfg = QuantConfig(weights=default_weight_spec(bits=4))
    qm = _qat(cfg, freeze_bn_after=2, freeze_observers_after=3)
    train_qat(qm, _data(), classification_loss, steps=3, lr=1e-3, progress=False)
    conv = qdet.convert(qm).model.conv2
    w = conv.weight_quant(conv.weight)
    codes = torch.round(w / conv.weight_quant.scale.reshape(-1, 1, 1, 1))
    assert int(codes.abs().max()) <= 7
    assert all(len(torch.unique(codes[c])) <= 15 for c in range(codes.shape[0]))


def test_converted_model_saves_loads_and_runs_on_every_runtime(tmp_path):
    qm = _qat(freeze_bn_after=2, freeze_observers_after=3)
    train_qat(qm, _data(), classification_loss, steps=4, lr=1e-3, progress=False)
    converted = qdet.convert(qm)
    x = _data(1, seed=7)[0][0]
    loaded = qdet.load(qdet.save(converted, tmp_path / "qat.qdet"), TinyResNet())
    with torch.no_grad():
        ref = converted(x)
        assert torch.equal(loaded(x), ref)
    step = float(converted.model.get_submodule(converted.layers[-1].quantizer).scale)
    needs = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
    ran = []
    for name in ("reference", "torch", "onnxruntime", "openvino"):
        if name in needs and importlib.util.find_spec(needs[name]) is None:
            continue
        with torch.no_grad():
            out = torch.as_tensor(qdet.lower(loaded, name, threads=1)(x))
        assert out.shape == ref.shape
        # integer kernels requantize slightly differently from the simulation: a few output steps
        assert float((out - ref).abs().max()) <= 4 * step, name
        ran.append(name)
    assert {"reference", "torch"} <= set(ran)


def test_bad_qat_inputs_give_clear_errors():
    with pytest.raises(CalibrationError, match="empty"):
        qdet.prepare_qat(_model(), [], progress=False)
    with pytest.raises(ConfigError, match="freeze_bn_after"):
        QATConfig(freeze_bn_after=0)
    with pytest.raises(ConfigError, match="steps"):
        train_qat(_qat(), _data(), classification_loss, steps=0, progress=False)


@pytest.mark.assets
def test_qat_cli_on_cifar_resnet20_int8_runs_on_an_int8_runtime(tmp_path):
    """The `qdet qat` job end to end (a few steps: checks the plumbing and the split, not accuracy)."""
    import json

    from conftest import require_asset
    from qdet.cli import main

    require_asset("weights/cifar10_resnet20.pt")
    require_asset("cifar10/test")
    out, js = tmp_path / "r20-qat.qdet", tmp_path / "r20-qat.json"
    code = main(["qat", "resnet20", "--steps", "4", "--freeze-bn", "2", "--freeze-observers", "3",
                 "--calib-images", "64", "--eval-images", "300", "--threads", "1", "--runtime", "onnxruntime",
                 "--no-progress", "--out", str(out), "--json", str(js)])
    assert code == 0
    result = json.loads(js.read_text())
    meta, rows = result["meta"], {r["model"]: r for r in result["rows"]}
    assert meta["train_images"] == 5000 and meta["eval_images"] == 300 and meta["runtime"] == "onnxruntime"
    assert meta["events"] == [[2, "bn"], [3, "observers"]]
    assert 85 < rows["float"]["top1"] < 97
    # 4 steps at lr 1e-4 barely move an 8-bit model: QAT stays within a point of PTQ
    assert abs(rows["QAT 4 steps (onnxruntime)"]["top1"] - rows["PTQ (onnxruntime)"]["top1"]) < 1.5
    loaded = qdet.load(out, qdet.get_adapter("resnet20").build())
    assert loaded.metrics["steps"] == 4


def test_yolo_loss_ciou_assignment_and_gradients():
    from qdet.models.yolo.loss import YoloV5Loss, bbox_ciou

    box = torch.tensor([[10.0, 10.0, 4.0, 2.0]])
    assert float(bbox_ciou(box, box)) == pytest.approx(1.0, abs=1e-6)
    shifted = torch.tensor([[11.0, 10.0, 4.0, 2.0]])
    iou = (3 * 2) / (4 * 2 * 2 - 3 * 2)
    # CIoU = IoU − ρ²/c² (same aspect ratio: no v term); enclosing box 5 × 2
    assert float(bbox_ciou(shifted, box)) == pytest.approx(iou - 1.0 / (25 + 4), abs=1e-5)
    anchors = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [4.0, 4.0]]])  # one level, stride 8
    loss = YoloV5Loss(anchors, (8.0,), nc=3, img_size=64)
    # centre (2.25, 3.75) in cells: closer to the left and bottom borders → own cell + left + below;
    # size 1.5 cells matches all three anchors (largest ratio 4 / 1.5 = 2.67 < anchor_t 4)
    targets = torch.tensor([[0, 1, 18.0, 30.0, 12.0, 12.0]])
    img, a, gj, gi, tbox, cls = loss._assign(targets, 0, 8, 8)
    assert len(img) == 9 and set(zip(gj.tolist(), gi.tolist())) == {(3, 2), (3, 1), (4, 2)}
    assert (cls == 1).all() and torch.allclose(tbox[:, 2:], torch.tensor([1.5, 1.5]).expand(9, 2))
    raw = [torch.zeros(2, 3 * 8, 8, 8, requires_grad=True)]
    total, parts = loss(raw, targets)
    total.backward()
    assert total > 0 and (parts > 0).all() and float(raw[0].grad.abs().sum()) > 0


def test_yolo_qat_trains_the_quantized_body_with_the_detection_loss():
    """A random YOLOv5n through prepare_qat on 64-pixel inputs: the body's raw maps feed the loss."""
    from qdet.models.yolo.loss import YoloV5Loss
    from qdet.models.yolo.train_data import yolo_loss_fn

    adapter = qdet.get_adapter("yolov5n")
    torch.manual_seed(0)
    model = adapter.build("random")
    images = [torch.rand(2, 3, 64, 64) for _ in range(2)]
    targets = torch.tensor([[0, 1, 20.0, 30.0, 16.0, 12.0], [1, 5, 40.0, 40.0, 30.0, 20.0]])
    qm = qdet.prepare_qat(model, [(x, None) for x in images], QuantConfig(), adapter=adapter,
                          qat=QATConfig(freeze_bn_after=1, freeze_observers_after=2, calibration_batches=2), progress=False)
    loss = YoloV5Loss(model.anchors, model.stride, nc=80, img_size=64)
    log = train_qat(qm.model.body, [(images[0], targets)], yolo_loss_fn(loss), steps=2, lr=1e-4, qat=qm.qat_config,
                    progress=False)
    assert len(log.losses) == 2 and all(math.isfinite(v) for v in log.losses)
    converted = qdet.convert(qm)
    with torch.no_grad():
        assert converted(images[1]).shape == model(images[1]).shape
