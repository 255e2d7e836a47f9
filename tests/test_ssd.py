"""SSD: default boxes, NVIDIA's state-dict layout, decode/NMS against torchvision's ops, bad weights,
and SSD300-ResNet50 / torchvision SSDs through the generic quantizer (random weights, synthetic data)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import batched_nms, box_convert, nms

import qdet
from qdet.config import Observer, QuantConfig
from qdet.errors import ConfigError, WeightsError
from qdet.models import REGISTRY
from qdet.models.rcnn.synthetic import SyntheticShapes
from qdet.models.ssd import (
    SSD300_BOXES,
    PostProcess,
    Scope,
    decode,
    default_boxes,
    postprocess,
)
from qdet.models.ssd.data import SSDInputs
from qdet.models.ssd.resnet50 import SSD300ResNet50, feature_sizes

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------ default boxes
def test_default_boxes_are_ssd300s_8732_with_the_published_sizes_and_ratios():
    boxes = default_boxes(SSD300_BOXES)
    assert boxes.shape == (8732, 4)
    assert SSD300_BOXES.boxes_per_cell == (4, 6, 6, 6, 4, 4)
    assert sum(n * f * f for n, f in zip((4, 6, 6, 6, 4, 4), (38, 19, 10, 5, 3, 1))) == 8732
    # first map: 38×38 cells × [s, √(s·s'), s·√2 × s/√2, s/√2 × s·√2] with s = 21/300, s' = 45/300
    s, s2 = 21 / 300, math.sqrt(21 * 45) / 300
    first = boxes[: 4 * 38 * 38].view(4, 38 * 38, 4)
    expected_wh = [(s, s), (s2, s2), (s * math.sqrt(2), s / math.sqrt(2)), (s / math.sqrt(2), s * math.sqrt(2))]
    for k, (w, h) in enumerate(expected_wh):
        assert torch.allclose(first[k, :, 2], torch.full((38 * 38,), w)) and torch.allclose(first[k, :, 3], torch.full((38 * 38,), h))
    assert torch.allclose(first[0, 0, :2], torch.tensor([0.5 / 37.5, 0.5 / 37.5]))  # fk = 300 / 8
    assert torch.allclose(first[0, 1, :2], torch.tensor([1.5 / 37.5, 0.5 / 37.5]))  # row-major: x moves first
    # 19×19 map, ratio 3: s = 45/300 → w = s·√3 (in [0, 1]), h = s/√3
    second = boxes[4 * 38 * 38: 4 * 38 * 38 + 6 * 19 * 19].view(6, 19 * 19, 4)
    assert torch.allclose(second[4, 0, 2:], torch.tensor([0.15 * math.sqrt(3), 0.15 / math.sqrt(3)]))
    last = boxes[-4:]  # 1×1 map: s = 261/300, s' = 315/300; sizes clamped to 1
    assert torch.allclose(last[:, :2], torch.full((4, 2), 0.5))
    assert torch.allclose(last[0, 2:], torch.tensor([0.87, 0.87])) and float(last[1, 2]) == pytest.approx(min(1.0, math.sqrt(261 * 315) / 300))
    assert float(boxes.min()) >= 0 and float(boxes.max()) <= 1


def test_feature_sizes_follow_the_network():
    assert feature_sizes(300) == SSD300_BOXES.feat_sizes
    net = SSD300ResNet50(num_classes=5).eval()
    with torch.no_grad():
        loc, conf = net(torch.zeros(1, 3, 264, 264))
    n = sum(b * f * f for b, f in zip((4, 6, 6, 6, 4, 4), feature_sizes(264)))
    assert loc.shape == (1, 4, n) and conf.shape == (1, 5, n)
    with pytest.raises(ConfigError, match="too small"):
        feature_sizes(200)


# ------------------------------------------------------------------ decode and NMS vs torchvision
def test_decode_matches_torchvision_box_coder():
    g = torch.Generator().manual_seed(0)
    dboxes = default_boxes(SSD300_BOXES)
    loc = torch.randn(2, 4, 8732, generator=g)
    ours = decode(loc, dboxes)
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    ref_boxes = box_convert(dboxes, "cxcywh", "xyxy")
    for b in range(2):
        ref = coder.decode_single(loc[b].t(), ref_boxes)
        torch.testing.assert_close(ours[b], ref, rtol=1e-5, atol=1e-6)


def test_postprocess_matches_per_class_torchvision_nms():
    g = torch.Generator().manual_seed(1)
    n, c = 500, 6
    centres = torch.rand(1, n, 2, generator=g)
    sizes = 0.05 + 0.2 * torch.rand(1, n, 2, generator=g)
    boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], -1)
    conf = 3 * torch.randn(1, c, n, generator=g)
    settings = PostProcess(score_thresh=0.05, iou_thresh=0.5, max_detections=200)
    out = postprocess(boxes, conf, settings)[0]
    probs = conf[0].softmax(0)
    ref_boxes, ref_scores, ref_labels = [], [], []
    for label in range(1, c):  # the naive loop: threshold, NMS, per class
        s = probs[label]
        keep = s > 0.05
        kb, ks = boxes[0][keep], s[keep]
        k = nms(kb, ks, 0.5)
        ref_boxes.append(kb[k])
        ref_scores.append(ks[k])
        ref_labels.append(torch.full((len(k),), label))
    rb, rs, rl = torch.cat(ref_boxes), torch.cat(ref_scores), torch.cat(ref_labels)
    order = rs.argsort(descending=True)[:200]
    assert len(out["scores"]) == 200
    torch.testing.assert_close(out["scores"], rs[order])
    torch.testing.assert_close(out["boxes"], rb[order])
    assert torch.equal(out["labels"], rl[order])
    # and it is torchvision's batched_nms on the (box, class) candidates
    assert len(batched_nms(rb, rs, rl, 0.5)) == len(rb)


# ------------------------------------------------------------------ NVIDIA's layout
def _nvidia_reference(num_classes: int = 81) -> nn.Module:
    """NVIDIA DeepLearningExamples' SSD300 module tree, rebuilt here from its published structure
    (ssd/model.py: ResNet.feature_extractor = resnet50 children[:7]; additional_blocks; loc; conf)."""
    from torchvision.models import resnet50

    class ResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.feature_extractor = nn.Sequential(*list(resnet50(weights=None).children())[:7])

    class SSD300(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.feature_extractor = ResNet()
            out, mid = [1024, 512, 512, 256, 256, 256], [256, 256, 128, 128, 128]
            self.additional_blocks = nn.ModuleList(
                nn.Sequential(nn.Conv2d(i, m, 1, bias=False), nn.BatchNorm2d(m), nn.ReLU(),
                              nn.Conv2d(m, o, 3, padding=1 if k < 3 else 0, stride=2 if k < 3 else 1, bias=False),
                              nn.BatchNorm2d(o), nn.ReLU())
                for k, (i, o, m) in enumerate(zip(out[:-1], out[1:], mid)))
            self.loc = nn.ModuleList(nn.Conv2d(c, n * 4, 3, padding=1) for n, c in zip([4, 6, 6, 6, 4, 4], out))
            self.conf = nn.ModuleList(nn.Conv2d(c, n * num_classes, 3, padding=1) for n, c in zip([4, 6, 6, 6, 4, 4], out))

    return SSD300()


def test_published_key_names():
    keys = SSD300ResNet50().state_dict()
    for name in ("feature_extractor.feature_extractor.0.weight", "feature_extractor.feature_extractor.1.running_var",
                 "feature_extractor.feature_extractor.6.0.downsample.0.weight",
                 "feature_extractor.feature_extractor.6.5.conv3.weight", "additional_blocks.0.0.weight",
                 "additional_blocks.0.1.running_mean", "additional_blocks.4.3.weight", "loc.0.weight", "loc.5.bias",
                 "conf.0.weight", "conf.5.bias"):
        assert name in keys
    assert tuple(keys["conf.0.weight"].shape) == (4 * 81, 1024, 3, 3)
    assert tuple(keys["additional_blocks.4.3.weight"].shape) == (256, 128, 3, 3)


def test_nvidia_layout_state_dict_loads_strictly(tmp_path):
    torch.manual_seed(0)
    ref = _nvidia_reference()
    state = ref.state_dict()
    assert set(state) == set(SSD300ResNet50().state_dict())  # the same keys, none missing, none extra
    path = tmp_path / "nvidia_ssd.pt"
    torch.save({"epoch": 65, "model": {f"module.{k}": v for k, v in state.items()}}, path)  # DDP checkpoint
    det = REGISTRY.get("ssd300_resnet50").build(path)
    det.net.load_state_dict(state, strict=True)  # strict: no key missing or unexpected
    for k, v in det.net.state_dict().items():
        assert torch.equal(v, state[k]), k
    strides = [m.stride for m in det.net.feature_extractor.feature_extractor[6][0].modules() if isinstance(m, nn.Conv2d)]
    assert all(s == (1, 1) for s in strides)  # layer3's first block at stride 1 → 38×38


def test_another_ssds_state_dict_is_one_clear_error(tmp_path):
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    path = tmp_path / "ssdlite.pth"
    torch.save(ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None).state_dict(), path)
    with pytest.raises(WeightsError, match=r"ssdlite\.pth.*torchvision SSD state dict"):
        REGISTRY.get("ssd300_resnet50").build(path)
    with pytest.raises(WeightsError, match=r"ssdlite\.pth.*do not fit ssd300_vgg16"):
        REGISTRY.get("ssd300_vgg16").build(path)
    nv = tmp_path / "nvidia.pt"
    torch.save(SSD300ResNet50().state_dict(), nv)
    with pytest.raises(WeightsError, match=r"nvidia\.pt.*NVIDIA SSD300-ResNet50"):
        REGISTRY.get("ssdlite320_mobilenet_v3_large").build(nv)


def test_wrong_number_of_classes_is_one_clear_error(tmp_path):
    path = tmp_path / "voc.pt"
    torch.save(SSD300ResNet50(num_classes=21).state_dict(), path)
    with pytest.raises(WeightsError, match=r"voc\.pt' have 21 classes \(conf\.0\.weight has 84 = 4 × 21.*num_classes=81"):
        REGISTRY.get("ssd300_resnet50").build(path)
    assert REGISTRY.get("ssd300_resnet50").build(path, num_classes=21).num_classes == 21
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    tv = tmp_path / "tv21.pth"
    torch.save(ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21).state_dict(), tv)
    with pytest.raises(WeightsError, match=r"tv21\.pth' have 21 classes.*num_classes=91"):
        REGISTRY.get("ssdlite320_mobilenet_v3_large").build(tv)


def test_build_options_are_checked():
    with pytest.raises(ConfigError, match="unknown build option"):
        REGISTRY.get("ssd300_resnet50").build("random", min_size=3)
    with pytest.raises(ConfigError, match="unknown build option"):
        REGISTRY.get("ssd300_vgg16").build("random", img_size=3)
    with pytest.raises(ConfigError, match="scope"):
        REGISTRY.get("ssd300_resnet50").with_scope("heads")


# ------------------------------------------------------------------ regions
def test_regions_by_scope():
    ad = REGISTRY.get("ssd300_resnet50")
    det = ad.build("random", img_size=264)
    assert [r.path for r in ad.regions(det)] == ["net"]
    assert [r.path for r in ad.with_scope("backbone").regions(det)] == ["net.feature_extractor"]
    assert ad.with_scope(Scope.BACKBONE).scope is Scope.BACKBONE


@pytest.mark.parametrize("name", ["ssdlite320_mobilenet_v3_large", "ssd300_vgg16"])
def test_torchvision_ssd_regions_quantize_and_keep_the_output_format(name):
    from qdet.models.ssd.views import TraceableScoringHead

    ad = REGISTRY.get(name)
    torch.manual_seed(0)
    size = 96 if name.startswith("ssdlite") else 300
    model = ad.build("random", detections_per_img=20)
    model.transform.fixed_size = (size, size)  # a small input keeps the test fast (the anchors follow it)
    assert isinstance(model.head.classification_head, TraceableScoringHead)
    images = [torch.rand(3, 80, 120)]
    with torch.no_grad():
        ref = model(images)
    qm = qdet.quantize(model, [images], QuantConfig(activations=Observer.MINMAX), adapter=ad, progress=False)
    assert list(qm.regions) == ["backbone", "head"]
    cov = qdet.coverage(qm)
    assert cov.float_layers == 0 and cov.int8_mac_share == 1.0
    with torch.no_grad():
        out = qm(images)
    assert set(out[0]) == {"boxes", "labels", "scores"} and out[0]["boxes"].shape[1] == 4
    assert len(ref[0]["scores"]) > 0 and len(out[0]["scores"]) > 0
    backbone_only = qdet.quantize(model, [images], QuantConfig(activations=Observer.MINMAX),
                                  adapter=ad.with_scope("backbone"), progress=False)
    assert list(backbone_only.regions) == ["backbone"]


def test_mis_normalised_calibration_warns():
    ad = REGISTRY.get("ssd300_resnet50")
    raw = SSDInputs(SyntheticShapes(2, seed=0, size=64), img_size=264, normalize=False)
    x = torch.stack([raw[0][0], raw[1][0]])
    from qdet.api import check_input_range

    assert "is the calibration data preprocessed like inference data" in check_input_range(x, ad.input_range, ad.name)
    good = torch.stack([SSDInputs(SyntheticShapes(2, seed=0, size=64), img_size=264)[i][0] for i in range(2)])
    assert check_input_range(good, ad.input_range, ad.name) is None


# ------------------------------------------------------------------ SSD300-ResNet50 int8 (random weights)
@pytest.fixture(scope="module")
def r50_int8():
    torch.manual_seed(0)
    ad = REGISTRY.get("ssd300_resnet50")
    det = ad.build("random", img_size=264)
    data = SSDInputs(SyntheticShapes(2, seed=0, size=128), img_size=264)  # SYNTHETIC calibration images
    batch = torch.utils.data.default_collate([data[0], data[1]])
    qm = qdet.quantize(det, [batch], QuantConfig(activations=Observer.MINMAX), adapter=ad, progress=False)
    return det, qm, batch


@pytest.mark.slow
def test_ssd300_resnet50_is_all_int8_and_small(r50_int8, tmp_path):
    from safetensors.torch import save_file

    det, qm, _ = r50_int8
    cov = qdet.coverage(qm)
    assert cov.int8_layers == 65 and cov.float_layers == 0 and cov.int8_mac_share == 1.0
    assert cov.folded_batchnorms == 53 and not cov.unfolded_batchnorms
    q = qdet.save(qm, tmp_path / "ssd.qdet")
    save_file({k: v.contiguous() for k, v in det.state_dict().items()}, str(tmp_path / "fp32.safetensors"))
    ratio = q.stat().st_size / (tmp_path / "fp32.safetensors").stat().st_size
    assert ratio <= 0.27, ratio
    loaded = qdet.load(q, REGISTRY.get("ssd300_resnet50").build("random", img_size=264))
    x = r50_int8[2][0][:1]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.net(x), qm.model.net(x))  # the artefact round-trips


@pytest.mark.slow
def test_ssd300_resnet50_lowers_to_openvino(r50_int8):
    pytest.importorskip("openvino")
    _, qm, batch = r50_int8
    x = batch[0][:1]
    ov = qdet.lower(qm, "openvino", threads=1)
    with torch.no_grad():
        loc_q, conf_q = ov.net(x)
        loc_s, _ = qm.model.net(x)
        out = ov(x)
    assert loc_q.shape == loc_s.shape and conf_q.shape[1] == 81
    sqnr = 10 * torch.log10(loc_s.pow(2).sum() / (loc_s - loc_q).pow(2).sum())
    assert sqnr > 15, float(sqnr)  # OpenVINO's int8 kernels agree with qdet's simulation
    assert set(out[0]) == {"boxes", "labels", "scores"} and len(out[0]["scores"]) <= 200


def test_loss_targets_decode_back_to_the_ground_truth():
    from qdet.models.ssd.loss import match, ssd_loss

    dboxes = default_boxes(SSD300_BOXES)
    gt = torch.tensor([[0.1, 0.2, 0.4, 0.6], [0.5, 0.5, 0.9, 0.8]])
    gloc, glabel = match(gt, torch.tensor([1, 3]), dboxes)
    pos = glabel > 0
    assert set(glabel[pos].tolist()) == {1, 3}
    back = decode(gloc[None], dboxes)[0][pos]  # the encoded targets decode to their ground-truth box
    which = torch.where(glabel[pos] == 1, 0, 1)
    torch.testing.assert_close(back, gt[which], rtol=1e-4, atol=1e-5)
    loc, conf = torch.zeros(1, 4, 8732, requires_grad=True), torch.zeros(1, 4, 8732, requires_grad=True)
    loss = ssd_loss(loc, conf, gloc[None], glabel[None])
    loss.backward()
    assert torch.isfinite(loss.detach()) and float(loss.detach()) > 0 and conf.grad.abs().sum() > 0


def test_cli_scope_is_for_ssd_models_only(capsys):
    from qdet.cli import main

    assert main(["quantize", "resnet20", "--scope", "backbone", "--no-progress"]) == 2
    assert "--scope is for SSD models" in capsys.readouterr().err
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in ("ssd300_resnet50", "ssd300_vgg16", "ssdlite320_mobilenet_v3_large"))


class _FirstImages:
    """The first `n` images of a CocoDetection, with the attributes the evaluators read."""

    def __init__(self, coco, n):
        self.coco, self.n = coco, n
        self.annotations_json = coco.annotations_json
        self.image_ids = coco.image_ids[:n]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i >= self.n:
            raise IndexError(i)
        return self.coco[i]

    def meta(self, i):
        return self.coco.meta(i)


@pytest.mark.assets
@pytest.mark.slow
def test_coco_evaluation_path_on_two_val_images():
    from conftest import require_asset

    require_asset("coco/annotations/instances_val2017_subset.json")
    for name in ("ssd300_resnet50", "ssdlite320_mobilenet_v3_large"):
        ad = REGISTRY.get(name)
        torch.manual_seed(0)
        model = ad.build("random")
        data = _FirstImages(ad.eval_dataset(), 2)
        res = ad.evaluate(model, data, progress=False)
        assert 0.0 <= res.map <= 1.0 and res.num_images == 2  # random weights: only the path is checked
