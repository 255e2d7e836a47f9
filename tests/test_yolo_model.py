"""YOLOv5 model: shapes, fx-traceability of the quantizable body, activation switch, weights I/O, post-processing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qdet.errors import ConfigError, WeightsError
from qdet.models.yolo import Activation, YOLOv5, load_weights, load_yolov5, yolov5_config
from qdet.models.yolo.postprocess import letterbox, non_max_suppression, preprocess, rect_shape, scale_boxes
from qdet.paths import assets_dir

YOLOV5N = assets_dir() / "weights" / "yolov5n_v6.1_state_dict_fp16.pt"


def tiny(nc: int = 80, activation: str | Activation = Activation.SILU, width: float = 0.125) -> YOLOv5:
    torch.manual_seed(0)
    return YOLOv5(yolov5_config("n", nc=nc, depth_multiple=0.33, width_multiple=width), activation=activation).eval()


def test_output_shapes_and_forward_is_decode_of_raw() -> None:
    net = tiny()
    x = torch.rand(2, 3, 64, 64)
    raw = net.forward_raw(x)
    assert [tuple(r.shape) for r in raw] == [(2, 255, 8, 8), (2, 255, 4, 4), (2, 255, 2, 2)]  # (B, na*no, H, W)
    out = net(x)
    assert out.shape == (2, 3 * (64 + 16 + 4), 85)  # (B, N, 5+nc)
    torch.testing.assert_close(out, net.decode(raw))
    assert net.stride == (8.0, 16.0, 32.0)


def test_non_square_input_and_class_count() -> None:
    net = tiny(nc=3)
    raw = net.forward_raw(torch.rand(1, 3, 64, 96))
    assert [tuple(r.shape) for r in raw] == [(1, 24, 8, 12), (1, 24, 4, 6), (1, 24, 2, 3)]
    assert net(torch.rand(1, 3, 64, 96)).shape == (1, 3 * (96 + 24 + 6), 8)


def test_decode_grid_and_anchors() -> None:
    # Zero logits → sigmoid 0.5 → centre = cell centre, size = anchor (in pixels).
    net = tiny()
    raw = [torch.zeros(1, 255, 8, 8), torch.zeros(1, 255, 4, 4), torch.zeros(1, 255, 2, 2)]
    out = net.decode(raw)[0]  # (N, 85)
    first = out[: 3 * 64].view(3, 8, 8, 85)  # level P3: (na, H, W, no)
    assert first[0, 2, 5, :2].tolist() == [(5 + 0.5) * 8, (2 + 0.5) * 8]  # x from column, y from row
    assert first[:, 0, 0, 2:4].tolist() == [[10.0, 13.0], [16.0, 30.0], [33.0, 23.0]]
    assert torch.all(out[:, 4:] == 0.5)


def test_forward_raw_is_fx_traceable() -> None:
    net = tiny()

    class Body(nn.Module):  # what a quantizer would trace: the raw path only
        def __init__(self, yolo: YOLOv5) -> None:
            super().__init__()
            self.yolo = yolo

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            return self.yolo.forward_raw(x)

    x = torch.rand(1, 3, 64, 64)
    for mod in (Body(net), net.raw_module()):
        gm = torch.fx.symbolic_trace(mod)
        for a, b in zip(gm(x), net.forward_raw(x)):
            torch.testing.assert_close(a, b)
    # raw_module shares the layers and keeps the ultralytics keys
    assert set(net.raw_module().state_dict()) == set(net.state_dict())
    # no in-place ops anywhere (observers must see each tensor as produced)
    assert not any(getattr(m, "inplace", False) for m in net.modules())


def test_activation_switch() -> None:
    silu, relu = tiny(), tiny(activation="relu")
    assert any(isinstance(m, nn.SiLU) for m in silu.modules()) and not any(isinstance(m, nn.ReLU) for m in silu.modules())
    assert any(isinstance(m, nn.ReLU) for m in relu.modules()) and not any(isinstance(m, nn.SiLU) for m in relu.modules())
    relu.load_state_dict(silu.state_dict())  # same parameters, different non-linearity
    x = torch.rand(1, 3, 64, 64)
    assert not torch.allclose(relu(x), silu(x))
    with pytest.raises(ConfigError, match="gelu"):
        tiny(activation="gelu")


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="size"):
        yolov5_config("q")
    cfg = yolov5_config("n", width_multiple=0.125)
    cfg["head"][0][2] = "Focus"
    with pytest.raises(ConfigError, match="Focus"):
        YOLOv5(cfg)
    assert yolov5_config("l")["width_multiple"] == 1.0 and yolov5_config("m")["depth_multiple"] == 0.67


def test_state_dict_keys_and_fp16_round_trip(tmp_path) -> None:
    net = tiny()
    keys = list(net.state_dict())
    assert keys[0] == "model.0.conv.weight" and "model.24.anchors" in keys and keys[-1] == "model.24.m.2.bias"
    assert "model.2.m.0.cv1.bn.running_var" in keys and "model.9.cv2.conv.weight" in keys
    # Save like the real checkpoint (fp16 state dict + meta with the yaml), reload as float32.
    sd16 = {k: (v.half() if v.is_floating_point() else v) for k, v in net.state_dict().items()}
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": sd16, "meta": {"yaml": net.yaml, "names": [f"c{i}" for i in range(80)], "stride": [8.0, 16.0, 32.0]}}, path)
    back = load_yolov5(path)
    assert back.names[1] == "c1" and not back.training
    for k, v in back.state_dict().items():
        assert v.dtype == (torch.float32 if v.is_floating_point() else sd16[k].dtype)
        torch.testing.assert_close(v, sd16[k].to(v.dtype))
    # bare state-dict file into a model built from the config
    torch.save(sd16, tmp_path / "bare.pt")
    load_weights(tiny(), tmp_path / "bare.pt")


def test_wrong_weights_raise_weights_error_naming_the_file(tmp_path) -> None:
    small = tmp_path / "width0125.pt"
    torch.save(tiny(width=0.125).state_dict(), small)
    with pytest.raises(WeightsError, match="width0125.pt.*shape"):
        load_weights(tiny(width=0.25), small)
    with pytest.raises(WeightsError, match="missing.pt"):
        load_weights(tiny(), tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pt"):
        load_yolov5(junk)
    torch.save(tiny(nc=3).state_dict(), tmp_path / "nc3.pt")
    with pytest.raises(WeightsError, match="nc3.pt"):
        load_weights(tiny(), tmp_path / "nc3.pt")


# --- post-processing --------------------------------------------------------------------------------


def test_letterbox_and_scale_back() -> None:
    img = np.full((300, 400, 3), 7, np.uint8)
    out, info = preprocess(img, 640)  # long side 400 → 640 (×1.6), short 300 → 480, pad 80 top and bottom
    assert out.shape == (640, 640, 3) and info.ratio == (1.6, 1.6) and info.pad == (0.0, 80.0)
    assert (out[:80] == 114).all() and (out[80:560] == 7).all() and (out[560:] == 114).all()
    boxes = torch.tensor([[0.0, 80.0, 640.0, 560.0], [-5.0, 0.0, 700.0, 300.0]])
    back = scale_boxes(boxes, info)
    torch.testing.assert_close(back[0], torch.tensor([0.0, 0.0, 400.0, 300.0]))
    assert back[1].tolist() == [0.0, 0.0, 400.0, 137.5]  # clipped to the image
    odd, _, pad = letterbox(np.zeros((639, 640, 3), np.uint8), 640)
    assert odd.shape == (640, 640, 3) and pad == (0.0, 0.5)
    assert rect_shape((480, 640)) == (512, 672) and rect_shape((640, 427)) == (672, 448)


def test_resize_area_shrinks_by_averaging() -> None:
    img = np.zeros((1280, 960, 3), np.uint8)
    img[:, 1::2] = 200  # vertical stripes average to 100 when halving
    out, info = preprocess(img, 640)
    assert info.ratio == (0.5, 0.5) and info.pad == (80.0, 0.0)
    assert (out[:, 80:560] == 100).all()


def test_nms_multi_label_and_classes() -> None:
    pred = torch.zeros(1, 3, 5 + 3)  # (B, N, 5+nc)
    pred[0, :, :4] = torch.tensor([[50.0, 50, 20, 20], [51, 50, 20, 20], [150, 150, 20, 20]])
    pred[0, :, 4] = torch.tensor([0.9, 0.8, 0.0005])  # the third box fails the objectness threshold
    pred[0, :, 5:] = torch.tensor([[0.9, 0.5, 0.0], [0.95, 0.0, 0.0], [1.0, 0.0, 0.0]])
    det = non_max_suppression(pred, 0.001, 0.6)[0]  # (n, 6)
    assert det[:, 5].tolist() == [0.0, 1.0]  # class 0 keeps the best box, box 0 also yields class 1
    torch.testing.assert_close(det[:, 4], torch.tensor([0.81, 0.45]))
    torch.testing.assert_close(det[0, :4], torch.tensor([40.0, 40.0, 60.0, 60.0]))
    single = non_max_suppression(pred, 0.001, 0.6, multi_label=False)[0]
    assert single[:, 5].tolist() == [0.0]
    assert non_max_suppression(torch.zeros(2, 4, 8))[1].shape == (0, 6)


# --- real weights --------------------------------------------------------------------------------


@pytest.mark.assets
def test_real_yolov5n_checkpoint_layout() -> None:
    if not YOLOV5N.is_file():
        pytest.skip(f"asset missing: {YOLOV5N}")
    ckpt = torch.load(YOLOV5N, map_location="cpu", weights_only=True)
    net = load_yolov5(YOLOV5N)
    assert list(net.state_dict()) == list(ckpt["state_dict"])  # exact ultralytics keys, same order
    assert sum(p.numel() for p in net.parameters()) == 1_872_157  # 1.87 M, as published
    assert net.stride == (8.0, 16.0, 32.0) and net.names[0] == "person" and len(net.names) == 80
    assert all(p.dtype == torch.float32 for p in net.parameters())
    anchors_px = net.detect.anchors * torch.tensor(net.stride).view(-1, 1, 1)
    torch.testing.assert_close(anchors_px, torch.tensor(ckpt["meta"]["anchors_px"]))
    with pytest.raises(WeightsError, match=YOLOV5N.name):
        load_weights(YOLOv5(yolov5_config("s")), YOLOV5N)


# ---- model yaml schema (issue 14) ----
from qdet.models.yolo.schema import check_model_yaml  # noqa: E402


def _edited(fn):
    cfg = yolov5_config("n")
    fn(cfg)
    return cfg


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("backbone"), r"missing field 'backbone'"),
    (lambda c: c.pop("head"), r"missing field 'head'"),
    (lambda c: c.update(nc=-5), r"'nc' must be an integer in 1\.\.100000, got -5"),
    (lambda c: c.update(width_multiple=1e6), r"'width_multiple' must be a number in \(0, 4\]"),
    (lambda c: c.update(depth_multiple="deep"), r"'depth_multiple' must be a number"),
    (lambda c: c["backbone"][2].__setitem__(1, "three"), r"backbone\[2\] \(layer 2\) 'number' must be an integer >= 1, got 'three'"),
    (lambda c: c["head"][2].__setitem__(0, [-1, 99]), r"head\[2\] \(layer 12\) 'from' index 99 does not name an earlier layer"),
    (lambda c: c["backbone"][1].__setitem__(2, "Transformer"), r"backbone\[1\] \(layer 1\) unknown module 'Transformer'"),
    (lambda c: c["backbone"][1].__setitem__(3, [64, 3, 0]), r"backbone\[1\] \(layer 1\) Conv stride must be an integer in 1\.\.4"),
    (lambda c: c.update(anchors=[[10, 13, 16]]), r"'anchors\[0\]' must be an even-length list"),
    (lambda c: c["head"].pop(), r"the last layer must be Detect|Detect"),
])
def test_bad_model_yaml_names_the_field(edit, message):
    from qdet.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^YOLOv5 model yaml: .*" + message):
        check_model_yaml(_edited(edit))


def test_standard_yamls_pass_the_schema():
    for size in ("n", "s", "m", "l", "x"):
        assert check_model_yaml(yolov5_config(size))


def test_bad_yaml_in_a_checkpoint_is_a_weights_error_naming_file_and_field(tmp_path):
    from qdet.errors import WeightsError

    net = YOLOv5(yolov5_config("n", width_multiple=0.125))
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": net.state_dict(), "meta": {"yaml": _edited(lambda c: c.update(width_multiple=1e6))}}, path)
    with pytest.raises(WeightsError, match=r"weights file '.*ckpt\.pt': meta\['yaml'\] is invalid: 'width_multiple'"):
        load_yolov5(path)


def test_channel_major_decode_equals_the_island_decode():
    """The whole graph's decode (scores kept (class, box)) gives the island path's numbers, box for box."""
    from qdet.models.yolo.model import decode_maps, decode_maps_for_selection
    from qdet.models.yolo.postprocess import xywh2xyxy

    torch.manual_seed(0)
    na, nc, stride = 3, 7, (8.0, 16.0)
    anchors = torch.rand(2, na, 2) * 4 + 0.5
    raw = [torch.randn(2, na * (nc + 5), 64 // int(s), 48 // int(s)) * 3 for s in stride]
    pred = decode_maps(raw, anchors, stride, na, nc + 5)
    boxes, scores = decode_maps_for_selection(raw, anchors, stride, na, nc + 5)
    torch.testing.assert_close(boxes, xywh2xyxy(pred[..., :4]), rtol=0, atol=1e-4)
    torch.testing.assert_close(scores, (pred[..., 5:] * pred[..., 4:5]).transpose(1, 2), rtol=0, atol=1e-6)
