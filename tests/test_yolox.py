"""YOLOX: Megvii state-dict layout, published sizes, quantization through the generic path."""
from __future__ import annotations

import pytest
import torch

from qdet import api
from qdet.config import Observer, QuantConfig, default_activation_spec
from qdet.errors import ConfigError, WeightsError
from qdet.models import REGISTRY
from qdet.models.yolo.graph import DecodedToScores
from qdet.models.yolox import YOLOX_SIZES, YoloxAdapter, YOLOXRaw, decode_yolox
from qdet.models.yolox.model import decode_yolox_for_selection

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # 2 threads on a loaded 2-core machine: 10× slower

# parameters as the YOLOX README publishes them (millions, 80 classes)
PUBLISHED_PARAMS_M = {"nano": 0.91, "tiny": 5.06, "s": 9.0, "m": 25.3, "l": 54.2, "x": 99.1}


@pytest.mark.parametrize("size", ["nano", "tiny", "s", "m",
                                  pytest.param("l", marks=pytest.mark.slow), pytest.param("x", marks=pytest.mark.slow)])
def test_parameter_counts_match_the_published_ones(size):
    n = sum(p.numel() for p in YOLOXRaw(YOLOX_SIZES[size]).parameters()) / 1e6
    digits = 2 if PUBLISHED_PARAMS_M[size] < 10 and size != "s" else 1
    assert round(n, digits) == PUBLISHED_PARAMS_M[size]


# keys and shapes of Megvii's yolox_s / yolox_nano `model` dicts, derived by hand from width 0.5 / 0.25
YOLOX_S_KEYS = {
    "backbone.backbone.stem.conv.conv.weight": (32, 12, 3, 3),  # Focus: 4·3 channels in
    "backbone.backbone.stem.conv.bn.running_var": (32,),
    "backbone.backbone.dark2.0.conv.weight": (64, 32, 3, 3),
    "backbone.backbone.dark2.1.m.0.conv2.conv.weight": (32, 32, 3, 3),
    "backbone.backbone.dark3.1.m.2.conv1.conv.weight": (64, 64, 1, 1),  # 3 bottlenecks in dark3
    "backbone.backbone.dark5.1.conv2.conv.weight": (512, 1024, 1, 1),  # SPP: 4 · 256 in
    "backbone.backbone.dark5.2.conv3.conv.weight": (512, 512, 1, 1),
    "backbone.lateral_conv0.conv.weight": (256, 512, 1, 1),
    "backbone.C3_p4.conv1.conv.weight": (128, 512, 1, 1),
    "backbone.reduce_conv1.conv.weight": (128, 256, 1, 1),
    "backbone.bu_conv2.conv.weight": (128, 128, 3, 3),
    "backbone.C3_n4.conv3.conv.weight": (512, 512, 1, 1),
    "head.stems.2.conv.weight": (128, 512, 1, 1),
    "head.cls_convs.0.1.conv.weight": (128, 128, 3, 3),
    "head.reg_convs.1.0.bn.weight": (128,),
    "head.cls_preds.0.weight": (80, 128, 1, 1),
    "head.reg_preds.2.bias": (4,),
    "head.obj_preds.1.weight": (1, 128, 1, 1),
}
YOLOX_NANO_KEYS = {
    "backbone.backbone.dark2.0.dconv.conv.weight": (16, 1, 3, 3),  # depthwise
    "backbone.backbone.dark2.0.pconv.conv.weight": (32, 16, 1, 1),
    "backbone.bu_conv1.dconv.conv.weight": (128, 1, 3, 3),
    "head.cls_convs.2.1.pconv.bn.running_mean": (64,),
    "head.cls_preds.1.weight": (1, 64, 1, 1),  # ByteTrack: one class
}


@pytest.mark.parametrize("size, classes, keys", [("s", 80, YOLOX_S_KEYS), ("nano", 1, YOLOX_NANO_KEYS)])
def test_state_dict_layout(size, classes, keys):
    sd = YOLOXRaw(YOLOX_SIZES[size], classes).state_dict()
    for k, shape in keys.items():
        assert tuple(sd[k].shape) == shape, k
    assert all(k.startswith(("backbone.backbone.", "backbone.", "head.")) for k in sd)


def _checkpoint(tmp_path, size="nano", classes=1, drop=None):
    """A ByteTrack-style checkpoint built here: {"model": state dict, "optimizer": ..., "start_epoch": ...}."""
    torch.manual_seed(0)
    ref = YOLOXRaw(YOLOX_SIZES[size], classes).eval()
    for m in ref.modules():  # non-trivial BN statistics, so that loading them matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    sd = {k: v for k, v in ref.state_dict().items() if k != drop}
    path = tmp_path / "bytetrack_nano_mot17.pth.tar"
    torch.save({"model": sd, "optimizer": {"lr": torch.tensor(0.01)}, "start_epoch": 80}, path)
    return ref, path


def test_bytetrack_checkpoint_loads_key_for_key(tmp_path):
    ref, path = _checkpoint(tmp_path)
    adapter = REGISTRY.get("bytetrack_nano")
    det = adapter.build(str(path))
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        expected = decode_yolox(ref(det.prep(x)), (8, 16, 32))
        out = det(x)
    torch.testing.assert_close(out, expected)
    assert out.shape == (1, 8 * 12 + 4 * 6 + 2 * 3, 6)
    # ByteTrack's input: ImageNet-normalised RGB; Megvii's yolox_*: BGR 0..255
    torch.testing.assert_close(det.prep(x)[:, 0], (x[:, 0] - 0.485) / 0.229)
    torch.testing.assert_close(YoloxAdapter("yolox_nano").build("random").prep(x)[:, 0], 255 * x[:, 2])


def test_checkpoint_missing_a_key_names_it(tmp_path):
    _, path = _checkpoint(tmp_path, drop="head.obj_preds.2.bias")
    with pytest.raises(WeightsError, match=r"head\.obj_preds\.2\.bias"):
        REGISTRY.get("bytetrack_nano").build(str(path))


def test_checkpoint_for_another_size_is_refused(tmp_path):
    _, path = _checkpoint(tmp_path, size="tiny")
    with pytest.raises(WeightsError, match="do not fit bytetrack_nano"):
        REGISTRY.get("bytetrack_nano").build(str(path))


def test_bad_options():
    with pytest.raises(ConfigError, match="no bundled weights"):
        YoloxAdapter("yolox_s").build(None)
    with pytest.raises(ConfigError, match="input_format"):
        YoloxAdapter("yolox_s").build("random", input_format="rgb")


def test_decode_grid_and_strides():
    reg = torch.zeros(1, 4, 2, 3)
    reg[0, 0, 1, 2] = 0.5  # x offset at row 1, column 2
    outs = (reg, torch.zeros(1, 1, 2, 3), torch.zeros(1, 2, 2, 3))
    d = decode_yolox(outs, (8,))
    assert d.shape == (1, 6, 7)
    torch.testing.assert_close(d[0, 5, :4], torch.tensor([(2 + 0.5) * 8, 1 * 8, 8, 8]))  # exp(0) · stride
    torch.testing.assert_close(d[0, 0, 4:], torch.full((3,), 0.5))  # sigmoid(0)


def test_channel_major_decode_equals_the_rows_decode():
    """The whole graph's decode gives the same boxes and objectness × class scores as decoding rows."""
    g = torch.Generator().manual_seed(0)
    outs = tuple(torch.randn(2, c, h, w, generator=g) for h, w in ((8, 6), (4, 3), (2, 2)) for c in (4, 1, 3))
    boxes, scores = decode_yolox_for_selection(outs, (8, 16, 32))
    rows = decode_yolox(outs, (8, 16, 32))

    class Rows(torch.nn.Module):
        def forward(self, x):
            return rows

    ref_boxes, ref_scores = DecodedToScores(Rows())(None)
    assert boxes.shape == (2, 48 + 12 + 4, 4) and scores.shape == (2, 3, 64)
    torch.testing.assert_close(boxes, ref_boxes)
    torch.testing.assert_close(scores, ref_scores)
    det = YoloxAdapter("yolox_nano").build("random", num_classes=3)
    assert hasattr(det, "boxes_and_scores")  # what the whole graph decodes through


def test_quantizes_through_the_generic_path_with_decode_float():
    torch.manual_seed(0)
    adapter = REGISTRY.get("yolox_nano")
    det = adapter.build("random", num_classes=3)
    g = torch.Generator().manual_seed(0)
    calib = [torch.rand(2, 3, 64, 64, generator=g) for _ in range(2)]
    cfg = QuantConfig(activations=default_activation_spec(Observer.MINMAX))  # fast; observers are tested elsewhere
    qm = api.quantize(det, calib, cfg, adapter=adapter, progress=False)
    assert list(qm.regions) == ["body"]
    convs = [n for n, m in det.body.named_modules() if isinstance(m, torch.nn.Conv2d)]
    int8_convs = [r for r in qm.layers if r.kind == "conv"]
    assert len(int8_convs) == len(convs)  # every conv of backbone, neck and head is int8
    x = calib[0]
    with torch.no_grad():
        ref, out = det(x), qm(x)
    assert out.shape == ref.shape == (2, 84, 8)
    # decoded in float from int8 maps: box centres stay near the float ones at 64×64
    assert float((out[..., :2] - ref[..., :2]).abs().median()) < 2.0


def test_docstring_examples():
    import doctest

    from qdet.models.yolox import adapter, model

    assert doctest.testmod(model).failed == 0 and doctest.testmod(adapter).failed == 0
