"""Darknet YOLOv3/v4: cfg parser, model semantics, .weights reader/writer, adapter, int8 via the generic path.

No real Darknet .weights are bundled: the tests write their own files in Darknet's format.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import qdet
from conftest import require_asset
from qdet import api
from qdet.config import QuantConfig
from qdet.errors import ConfigError, WeightsError
from qdet.models.darknet import (
    DarknetDetector,
    WeightsHeader,
    build_darknet,
    count_floats,
    decode_darknet,
    load_darknet,
    load_darknet_weights,
    parse_cfg,
    parse_cfg_text,
    save_darknet_weights,
)
from qdet.models.darknet.layers import DarknetMaxPool, darknet_maxpool_reference
from qdet.models.darknet.model import YoloSpec, random_init_

# name: (layers, heads (stride, H at 128 px), parameters, floats in a .weights file)
# parameters = conv weights + conv biases + BN gamma/beta; floats add the BN running mean/var.
BUNDLED = {
    "yolov3": (107, (32, 16, 8), 61_949_149, 62_001_757),
    "yolov3-spp": (114, (32, 16, 8), 62_998_749, 63_052_381),
    "yolov3-tiny": (24, (32, 16), 8_852_366, 8_858_734),
    "yolov4": (162, (8, 16, 32), 64_363_101, 64_429_405),
    "yolov4-tiny": (38, (32, 16), 6_056_606, 6_062_814),
    "yolov4-csp": (175, (8, 16, 32), 52_921_437, 52_986_205),
}

TOY = """[net]
width=64
height=64
channels=3

[convolutional]
batch_normalize=1
filters=8
size=3
stride=2
pad=1
activation=leaky

[convolutional]
filters=18
size=1
activation=linear

[yolo]
mask=0,1
anchors=10,14, 23,27
classes=4
"""


def _cfg(name: str) -> Path:
    return require_asset(f"darknet/{name}.cfg")


def _write(tmp_path: Path, text: str, name: str = "bad.cfg") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ---- the bundled cfgs -------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(BUNDLED))
def test_bundled_cfg_builds_with_darknet_counts_and_shapes(name):
    n_layers, strides, params, floats = BUNDLED[name]
    cfg = parse_cfg(_cfg(name))
    assert (cfg.net.width, cfg.net.channels) == ({"yolov3-spp": 608, "yolov4": 608, "yolov4-csp": 512}.get(name, 416), 3)
    with torch.device("meta"):  # shapes and counts without initialising 60 M parameters
        body = build_darknet(cfg)
    assert len(body.layers) == n_layers
    assert body.strides == strides
    assert sum(p.numel() for p in body.parameters()) == params
    assert count_floats(body) == floats
    with torch.no_grad():
        maps = body(torch.zeros(1, 3, 128, 128, device="meta"))
    assert [tuple(m.shape) for m in maps] == [(1, 255, 128 // s, 128 // s) for s in strides]
    assert cfg.net.letter_box == (name == "yolov4-csp")
    if name == "yolov4-csp":
        assert all(h.new_coords and h.scale_x_y == 2.0 for h in body.yolo_layers)
    if name == "yolov3":  # relative and absolute route references: "layers = -4" and "layers = -1, 61"
        assert [(i, info.inputs) for i, info in enumerate(body.infos) if info.type == "route"] == \
            [(83, (79,)), (86, (85, 61)), (95, (91,)), (98, (97, 36))]
        assert body.infos[4].inputs == (3, 1)  # [shortcut] from=-3 at layer 4


def test_real_format_file_size_of_yolov3_tiny(tmp_path):
    """8,858,734 floats = a 35,434,956-byte file with the 20-byte header (the issue's numbers)."""
    body = build_darknet(parse_cfg(_cfg("yolov3-tiny")))
    path = save_darknet_weights(body, tmp_path / "yolov3-tiny.weights")
    assert path.stat().st_size == 35_434_956 == 20 + 4 * 8_858_734


# ---- layer semantics --------------------------------------------------------------------------

@pytest.mark.parametrize("size,stride,hw", [(2, 1, 13), (2, 2, 13), (2, 2, 12), (5, 1, 9), (9, 1, 13), (13, 1, 13), (3, 2, 11), (3, 1, 7)])
def test_maxpool_matches_darknets_loop(size, stride, hw):
    x = torch.randn(2, 3, hw, hw, generator=torch.Generator().manual_seed(size * 100 + hw)) - 2  # mostly negative
    ref = darknet_maxpool_reference(x, size, stride, size - 1)
    out = DarknetMaxPool(size, stride, size - 1)(x)
    assert out.shape == ref.shape
    assert torch.equal(out, ref)
    if (size, stride) == (2, 1):
        assert out.shape[-1] == hw  # yolov3-tiny's 13×13 size-2 stride-1 layer keeps its size


def test_yolov3_tiny_keeps_13x13_through_the_stride_1_maxpool():
    with torch.device("meta"):
        body = build_darknet(parse_cfg(_cfg("yolov3-tiny")))
    pool = body.layers[11]
    assert isinstance(pool, DarknetMaxPool) and (pool.size, pool.stride, pool.before, pool.after) == (2, 1, 0, 1)
    shapes = {}
    hooks = [m.register_forward_hook(lambda m, i, o, k=k: shapes.__setitem__(k, tuple(o.shape)))
             for k, m in enumerate(body.layers)]
    with torch.no_grad():
        body(torch.zeros(1, 3, 416, 416, device="meta"))
    for h in hooks:
        h.remove()
    assert shapes[10] == shapes[11] == (1, 512, 13, 13)  # the maxpool at layer 11 keeps 13×13


def test_route_groups_take_the_group_id_half_as_in_yolov4_tiny():
    body = build_darknet(parse_cfg(_cfg("yolov4-tiny")))
    route = body.layers[3]  # [route] layers=-1 groups=2 group_id=1
    assert (route.groups, route.group_id, body.infos[3].channels) == (2, 1, 32)
    x = torch.randn(1, 64, 5, 5)
    assert torch.equal(route(x), x[:, 32:])


def test_decode_of_one_cell_by_hand():
    # one head, 2 anchors, 1 class, 2×2 grid on a 64-px input (stride 32); cell (y=1, x=0), anchor 1
    head = YoloSpec(((10.0, 14.0), (23.0, 27.0)), 1, 1.05, False, 32)
    raw = torch.zeros(1, 2 * 6, 2, 2)
    tx, ty, tw, th, to, tc = 0.3, -0.2, 0.5, -0.1, 1.0, -2.0
    raw[0, 6:12, 1, 0] = torch.tensor([tx, ty, tw, th, to, tc])
    out = decode_darknet([raw], [head], (64, 64))  # (1, 2·2·2, 6), order (anchor, y, x)
    got = out[0, 1 * 4 + 1 * 2 + 0]
    sig = lambda v: 1 / (1 + math.exp(-v))
    s = 1.05
    want = [(sig(tx) * s - (s - 1) / 2 + 0) * 32, (sig(ty) * s - (s - 1) / 2 + 1) * 32,
            math.exp(tw) * 23, math.exp(th) * 27, sig(to), sig(tc)]
    assert torch.allclose(got, torch.tensor(want), atol=1e-5)
    # new_coords (yolov4-csp): the map is already logistic; wh = (2t)²·anchor, obj/cls as they are
    csp = YoloSpec(((10.0, 14.0), (23.0, 27.0)), 1, 2.0, True, 32)
    raw_csp = torch.zeros(1, 12, 2, 2)
    raw_csp[0, 6:12, 1, 0] = torch.tensor([0.6, 0.4, 0.7, 0.2, 0.9, 0.3])
    got = decode_darknet([raw_csp], [csp], (64, 64))[0, 6]
    want = [(0.6 * 2 - 0.5 + 0) * 32, (0.4 * 2 - 0.5 + 1) * 32, (1.4 ** 2) * 23, (0.4 ** 2) * 27, 0.9, 0.3]
    assert torch.allclose(got, torch.tensor(want), atol=1e-5)


def test_toy_detector_decodes_through_the_float_island():
    det = DarknetDetector(build_darknet(parse_cfg_text(TOY, "toy.cfg"))).eval()
    with torch.no_grad():
        out = det(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 2 * 32 * 32, 9)
    assert float(out[..., 4:].min()) >= 0 and float(out[..., 4:].max()) <= 1
    with pytest.raises(ConfigError, match="multiples of 2, got \\(1, 3, 63, 64\\)"):
        det(torch.rand(1, 3, 63, 64))


# ---- .weights ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def v4tiny_file(tmp_path_factory):
    body = random_init_(build_darknet(parse_cfg(_cfg("yolov4-tiny"))), seed=1)
    path = save_darknet_weights(body, tmp_path_factory.mktemp("dn") / "yolov4-tiny.weights", WeightsHeader(0, 2, 5, 32013312))
    return body, path


def test_weights_round_trip_bit_exact(v4tiny_file):
    body, path = v4tiny_file
    assert path.stat().st_size == 20 + 4 * 6_062_814
    fresh = build_darknet(parse_cfg(_cfg("yolov4-tiny")))
    header = load_darknet_weights(fresh, path)
    assert header == WeightsHeader(0, 2, 5, 32013312)
    a, b = body.state_dict(), fresh.state_dict()
    for k in a:
        if k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(a[k], b[k]), k


def test_old_header_with_int32_seen_round_trips(tmp_path):
    body = random_init_(build_darknet(parse_cfg_text(TOY, "toy.cfg")), seed=0, img_size=64)
    path = save_darknet_weights(body, tmp_path / "toy.weights", WeightsHeader(0, 1, 0, 7))
    assert path.stat().st_size == 16 + 4 * count_floats(body)
    fresh = build_darknet(parse_cfg_text(TOY, "toy.cfg"))
    assert load_darknet_weights(fresh, path) == WeightsHeader(0, 1, 0, 7)
    assert torch.equal(fresh.layers[0].conv.weight, body.layers[0].conv.weight)
    assert torch.equal(fresh.layers[1].conv.bias, body.layers[1].conv.bias)


def test_truncated_weights_name_the_layer(v4tiny_file, tmp_path):
    _, path = v4tiny_file
    data = path.read_bytes()
    short = tmp_path / "yolov4-tiny.weights"
    short.write_bytes(data[: len(data) - 4 * 1000])
    fresh = build_darknet(parse_cfg(_cfg("yolov4-tiny")))
    with pytest.raises(WeightsError, match=r"yolov4-tiny.weights has 6,061,814 floats, yolov4-tiny.cfg needs "
                                           r"6,062,814: the file runs out at layer 36 "):
        load_darknet_weights(fresh, short)


def test_too_long_weights_say_how_many_floats_are_left_over(v4tiny_file, tmp_path):
    _, path = v4tiny_file
    long = tmp_path / "long.weights"
    long.write_bytes(path.read_bytes() + np.zeros(3, "<f4").tobytes())
    with pytest.raises(WeightsError, match="long.weights has 6,062,817 floats, .* needs 6,062,814: 3 floats left over"):
        load_darknet_weights(build_darknet(parse_cfg(_cfg("yolov4-tiny"))), long)


def test_bad_header_and_partial_floats(tmp_path):
    body = build_darknet(parse_cfg_text(TOY, "toy.cfg"))
    p = tmp_path / "x.weights"
    p.write_bytes(b"\x01\x02")
    with pytest.raises(WeightsError, match="x.weights: 2 bytes is too short"):
        load_darknet_weights(body, p)
    p.write_bytes(np.array([-5, 99999, 1], "<i4").tobytes() + b"\0" * 8)
    with pytest.raises(WeightsError, match="bad Darknet .weights header"):
        load_darknet_weights(body, p)
    p.write_bytes(np.array([0, 2, 0], "<i4").tobytes() + b"\0" * 8 + b"\0" * 6)
    with pytest.raises(WeightsError, match="6 bytes after the header is not a whole number"):
        load_darknet_weights(body, p)
    with pytest.raises(WeightsError, match="cannot read Darknet weights"):
        load_darknet_weights(body, tmp_path / "missing.weights")


# ---- cfg errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("edit,message", [
    (lambda t: t.replace("[yolo]", "[region]"), r"bad.cfg:19: unknown section \[region\]"),
    (lambda t: t.replace("filters=8", "filters=abc"), r"bad.cfg:8: \[convolutional\] filters='abc' is not an integer"),
    (lambda t: t.replace("size=1\n", "size 1\n"), r"bad.cfg:16: expected 'key=value'"),
    (lambda t: t.replace("activation=leaky", "activation=gelu"), r"bad.cfg:12: \[convolutional\] activation='gelu'"),
    (lambda t: t.replace("mask=0,1\n", ""), r"bad.cfg:19: \[yolo\] needs 'mask='"),
    (lambda t: t.replace("anchors=10,14, 23,27\n", ""), r"bad.cfg:19: \[yolo\] needs 'anchors='"),
    (lambda t: t.replace("mask=0,1", "mask=0,5"), r"bad.cfg:20: \[yolo\] mask='0,5': anchor 5 does not exist"),
    (lambda t: t.replace("classes=4", "classes=3"), r"bad.cfg:19: \[yolo\] at layer 2 reads 18 channels"),
    (lambda t: t.replace("[yolo]", "[route]\nlayers=-7\n[yolo]"), r"bad.cfg:20: \[route\] layers=-7 at layer 2 refers to layer -5"),
    (lambda t: t.replace("[yolo]", "[route]\nlayers=4\n[yolo]"), r"bad.cfg:20: \[route\] layers=4 at layer 2 refers to layer 4"),
    (lambda t: t.replace("[yolo]", "[shortcut]\nfrom=-9\n[yolo]"), r"bad.cfg:20: \[shortcut\] from=-9"),
    (lambda t: t.replace("[net]", "width=3\n[net]"), r"bad.cfg:1: option 'width=3' before the first \[section\]"),
    (lambda t: t.replace("[yolo]", "[yolo"), r"bad.cfg:19: malformed section header"),
    (lambda t: t.replace("width=64", "width=-1"), r"bad.cfg:2: \[net\] width=-1 must be >= 1"),
    (lambda t: t[: t.index("[yolo]")], r"bad.cfg: no \[yolo\] layer"),
    (lambda t: t.replace("[yolo]", "[maxpool]\nsize=2\nmaxpool_depth=1\n[yolo]"), r"bad.cfg:21: \[maxpool\] maxpool_depth=1"),
    (lambda t: t.replace("[net]", "[net]\n[net]"), r"bad.cfg:2: a second \[net\] section"),
    (lambda t: t.replace("filters=18", "filters=18\ndilation=2"), r"bad.cfg:16: \[convolutional\] dilation=2 is not supported"),
])
def test_bad_cfg_is_one_line_naming_file_line_and_key(tmp_path, edit, message):
    path = _write(tmp_path, edit(TOY))
    with pytest.raises(ConfigError, match=message) as e:
        cfg = parse_cfg(path)
        _ = cfg.net
        build_darknet(cfg)
    assert "\n" not in str(e.value)


def test_comments_and_repeated_keys():
    text = TOY.replace("filters=8", "filters=4 # first\n; a comment line\nfilters=8")
    body = build_darknet(parse_cfg_text(text, "c.cfg"))
    assert body.layers[0].conv.out_channels == 8  # the last value of a repeated key wins, as in Darknet


# ---- adapter + int8 ---------------------------------------------------------------------------

def test_adapters_are_registered_and_need_weights():
    names = {"darknet-yolov3", "darknet-yolov3-spp", "darknet-yolov3-tiny", "darknet-yolov4", "darknet-yolov4-tiny",
             "darknet-yolov4-csp"}
    assert names <= set(qdet.models.REGISTRY.names())
    from qdet.cli import check_weights

    with pytest.raises(ConfigError, match=r"no bundled weights; pass --weights PATH \(a Darknet .weights file\)"):
        check_weights(api.get_adapter("darknet-yolov4-tiny"), None)


def test_adapter_builds_from_a_weights_file(v4tiny_file):
    body, path = v4tiny_file
    det = api.get_adapter("darknet-yolov4-tiny").build(path)
    assert det.names[:2] == ["person", "bicycle"] and len(det.names) == 80
    assert torch.equal(det.body.layers[0].conv.weight, body.layers[0].conv.weight)


def _sqnr(ref: torch.Tensor, out: torch.Tensor, *, centered: bool = False) -> float:
    signal = ref - ref.mean(dim=(0, 2, 3), keepdim=True) if centered else ref
    return float(10 * torch.log10(signal.pow(2).mean() / (ref - out).pow(2).mean()))


# SQNR of the two raw head maps, int8 vs float (seed 0, 2×2 calibration images and 2 test images,
# uniform [0, 1], 128 px). Measured, reference simulation / OpenVINO: yolov3-tiny raw 28.3, 29.8 /
# 28.4, 29.7 dB; per-channel-centred (the constant objectness/class priors removed) 14.5, 15.5 /
# 14.6, 15.5 dB. yolov4-tiny raw 25.6, 26.2 / 25.6, 26.3; centred 12.2, 12.4 / 12.2, 12.5.
# Floors sit ~2 dB below. Random weights: this bounds the arithmetic, it says nothing about mAP.
FLOORS = {"darknet-yolov3-tiny": (26.5, 12.5, 11, 13), "darknet-yolov4-tiny": (23.5, 10.0, 19, 21)}


@pytest.mark.parametrize("name", ["darknet-yolov3-tiny", pytest.param("darknet-yolov4-tiny", marks=pytest.mark.slow)])
def test_int8_through_the_generic_path_and_openvino(name, tmp_path):
    raw_floor, centred_floor, n_bn, n_conv = FLOORS[name]
    _cfg(name.removeprefix("darknet-"))  # skip without the assets
    adapter = api.get_adapter(name)
    det = adapter.build("random")
    g = torch.Generator().manual_seed(0)
    calib = [torch.rand(2, 3, 128, 128, generator=g) for _ in range(2)]
    qm = api.quantize(det, calib, QuantConfig(), adapter=adapter, progress=False)
    cov = qdet.coverage(qm)
    assert (cov.int8_layers, cov.float_layers, cov.folded_batchnorms, cov.unfolded_batchnorms) == (n_conv, 0, n_bn, [])
    assert cov.int8_mac_share == 1.0
    x = torch.rand(2, 3, 128, 128, generator=g)
    with torch.no_grad():
        ref, out = det.body(x), qm.model.body(x)
        decoded = qm(x)
    assert decoded.shape == (2, 3 * (16 + 64), 85)
    for r, o in zip(ref, out):
        assert _sqnr(r, o) >= raw_floor and _sqnr(r, o, centered=True) >= centred_floor
    # the .qdet artefact reloads without the float weights (the registry builds the architecture)
    path = qdet.save(qm, tmp_path / f"{name}.qdet")
    with pytest.warns(UserWarning, match="no weights given"):
        qm2 = qdet.load(path)
    with torch.no_grad():
        for a, b in zip(out, qm2.model.body(x)):
            assert torch.allclose(a, b, atol=1e-4)
    pytest.importorskip("openvino")
    lowered = api.lower(qm, "openvino", threads=1)
    with torch.no_grad():
        ov = [torch.as_tensor(o) for o in lowered.body(x)]
        assert lowered(x).shape == decoded.shape
    ops = lowered.body.executed_ops()
    assert sum(n for k, n in ops.items() if k.startswith("Convolution/") and k.split("/")[1] in ("u8", "i8")) == n_conv
    assert not any(k.startswith("Convolution/f") for k in ops), ops
    for r, o in zip(ref, ov):
        assert _sqnr(r, o) >= raw_floor and _sqnr(r, o, centered=True) >= centred_floor


def test_load_darknet_random_is_seeded(tmp_path):
    cfg = _write(tmp_path, TOY, "toy.cfg")
    a, b = load_darknet(cfg, "random", seed=3), load_darknet(cfg, "random", seed=3)
    assert torch.equal(a.body.layers[0].conv.weight, b.body.layers[0].conv.weight)
    assert torch.equal(a.body.layers[0].bn.running_var, b.body.layers[0].bn.running_var)


# ---- Darknet preprocessing and COCO inference ---------------------------------------------------

def test_plain_resize_is_darknets_corner_aligned_bilinear():
    from qdet.models.darknet.detect import darknet_preprocess

    image = np.array([[[0] * 3, [255] * 3], [[255] * 3, [255] * 3]], np.uint8)  # (2, 2, 3)
    x, info = darknet_preprocess(image, (3, 3), letter_box=False)
    # corners stay, the centre is the mean of the four corners (Darknet: sx = c·(w−1)/(W−1))
    assert torch.allclose(x[0], torch.tensor([[0, 0.5, 1], [0.5, 0.75, 1], [1, 1, 1]]))
    assert (info.scale, info.offset, info.orig_size) == ((1.5, 1.5), (0.0, 0.0), (2, 2))


def test_letterbox_is_centred_on_grey_and_boxes_map_back():
    from qdet.models.darknet.detect import darknet_preprocess, to_original

    image = np.full((100, 200, 3), 200, np.uint8)
    x, info = darknet_preprocess(image, (64, 64), letter_box=True)
    assert (info.scale, info.offset) == ((0.32, 0.32), (0.0, 16.0))
    assert torch.all(x[:, :16] == 0.5) and torch.all(x[:, 48:] == 0.5)
    assert torch.allclose(x[:, 16:48], torch.full((3, 32, 64), 200 / 255))
    box = torch.tensor([[20.0, 10.0, 120.0, 90.0]])  # original pixels
    in_net = box * 0.32 + torch.tensor([0.0, 16.0, 0.0, 16.0])
    assert torch.allclose(to_original(in_net, info), box, atol=1e-4)


@pytest.mark.assets
def test_coco_inference_through_darknet_preprocessing():
    require_asset("coco/annotations/instances_val2017_subset.json")
    from qdet.data.coco import COCO80_TO_91
    from qdet.models.darknet.detect import run_darknet_on_coco

    adapter = api.get_adapter("darknet-yolov3-tiny")
    det = adapter.build("random")
    calib = adapter.calibration_dataset()
    x, image_id = calib[0]
    assert x.shape == (3, 416, 416) and 0 <= float(x.min()) and float(x.max()) <= 1 and isinstance(image_id, int)
    data = adapter.eval_dataset()
    dets = run_darknet_on_coco(det, data, det.decode, size_wh=(416, 416), letter_box=False, indices=[0, 1], progress=False)
    assert dets, "a random model with head priors still yields candidates above conf 0.005"
    ids = {int(data[i][1]["image_id"]) for i in (0, 1)}
    for d in dets:
        assert d["image_id"] in ids and d["category_id"] in COCO80_TO_91
        assert all(math.isfinite(v) for v in d["bbox"]) and d["bbox"][2] >= 0 and d["bbox"][3] >= 0


# ---- the generic `darknet` adapter: any cfg (--cfg), saved and loaded with its cfg text ------------

def test_generic_darknet_adapter_needs_cfg_and_cli_checks_it(tmp_path, capsys):
    from qdet.cli import main

    assert "darknet" in qdet.models.REGISTRY.names()
    cfg = _write(tmp_path, TOY, "toy.cfg")
    bad = _write(tmp_path, TOY.replace("size=1\n", "size=1\nthis line is wrong\n"), "bad.cfg")
    cases = [
        (["quantize", "darknet", "--weights", "random"], "model 'darknet' needs --cfg PATH"),
        (["quantize", "resnet20", "--cfg", str(cfg)], "--cfg is only for Darknet models"),
        (["quantize", "darknet", "--cfg", str(tmp_path / "missing.cfg"), "--weights", "random"], "missing.cfg'?: no such file"),
        (["bench", "darknet", "--cfg", str(bad), "--weights", "random"], r"bad.cfg:\d+: expected 'key=value'"),
        (["export-int", "darknet", "--cfg", str(bad), "--weights", "random"], r"bad.cfg:\d+: expected 'key=value'"),
        (["quantize", "darknet", "--cfg", str(cfg)], "has no bundled weights; pass --weights PATH"),
    ]
    import re

    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(message, err), (argv, err)


def test_user_cfg_quantizes_saves_and_loads_from_the_qdet_file_alone(tmp_path):
    from qdet.cli import resolve_adapter, build_parser

    cfg = _write(tmp_path, TOY, "toy.cfg")
    args = build_parser().parse_args(["quantize", "darknet", "--cfg", str(cfg), "--weights", "random"])
    adapter = resolve_adapter(args)
    assert adapter.name == "darknet" and adapter.cfg_path == cfg.resolve() and adapter.img_size == 64
    det = adapter.build("random")
    calib = [torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))]
    qm = api.quantize(det, calib, QuantConfig(), adapter=adapter, progress=False)
    path = qdet.save(qm, tmp_path / "toy.qdet")
    cfg.unlink()  # the .qdet carries the cfg text: no cfg file needed to load it
    assert qdet.artifact.read_metadata(path)["model_cfg"] == TOY
    with pytest.warns(UserWarning, match="no weights given"):
        qm2 = qdet.load(path)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(qm(x), qm2(x), atol=1e-5)


# ---- LeakyReLU / Mish fused into the int8 conv where the runtime fuses them (OpenVINO) ------------

def test_leaky_and_mish_have_their_own_op_kinds():
    from torch import fx, nn
    from torch.nn import functional as F

    from qdet.quant.opkinds import LEAKY_MISH, OpKind, op_kind

    class M(nn.Module):
        def forward(self, x):
            return F.mish(F.leaky_relu(x, 0.1))

    gm = fx.symbolic_trace(nn.Sequential(nn.LeakyReLU(0.1), nn.Mish()))
    kinds = [op_kind(n, gm) for n in gm.graph.nodes][1:3]
    fgm = fx.symbolic_trace(M())
    assert kinds == [op_kind(n, fgm) for n in fgm.graph.nodes][1:3] == [OpKind.LEAKY_RELU, OpKind.MISH]
    assert set(kinds) == LEAKY_MISH


@pytest.mark.parametrize("act", ["leaky", "mish"])
def test_fuse_leaky_mish_quantizes_only_the_activation_output_and_openvino_fuses_it(act, tmp_path):
    text = TOY.replace("activation=leaky", f"activation={act}").replace(
        "[convolutional]\nfilters=18", f"[convolutional]\nbatch_normalize=1\nfilters=16\nsize=3\nstride=1\npad=1\n"
                                       f"activation={act}\n\n[convolutional]\nfilters=18")
    det = load_darknet(_write(tmp_path, text, "toy.cfg"), "random")
    calib = [torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))]
    adapter = api.get_adapter("darknet")
    sep = api.quantize(det, calib, QuantConfig(), adapter=adapter, progress=False)
    fused = api.quantize(det, calib, QuantConfig(fuse_leaky_mish=True), adapter=adapter, progress=False)
    names = lambda qm: [rec.name for rec in qm.layers]  # noqa: E731
    assert [n for n in names(sep) if n.endswith(".act")] == ["body.layers.0.act", "body.layers.1.act"]
    assert not [n for n in names(fused) if n.endswith(".act")]
    pytest.importorskip("openvino")
    from qdet.cli import build_parser, config_from_args
    from qdet.runtimes.openvino import _rt

    assert config_from_args(build_parser().parse_args(["quantize", "darknet", "--runtime", "openvino"])).fuse_leaky_mish
    assert not config_from_args(build_parser().parse_args(["quantize", "darknet", "--runtime", "onnxruntime"])).fuse_leaky_mish
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ops = {}
    for tag, qm in (("separate", sep), ("fused", fused)):
        low = api.lower(qm, "openvino", threads=1)
        with torch.no_grad():
            assert low(x).shape == det(x).shape
        compiled = low.body.compiled.get_runtime_model().get_ordered_ops()
        ops[tag] = [(_rt(op.get_rt_info(), "layerType") or op.get_type_name(), _rt(op.get_rt_info(), "originalLayersNames") or "")
                    for op in compiled]
    # fused: each activation is among the layers of its int8 Convolution kernel, nothing runs after it
    convs = [names for kind, names in ops["fused"] if kind == "Convolution"]
    assert len(convs) == 3 and all(("LeakyRelu" if act == "leaky" else "/Mul") in c for c in convs[:2])
    n_after = lambda tag: sum(kind in ("Subgraph", "Eltwise") for kind, _ in ops[tag])  # noqa: E731
    # separate: per activation a DQ → LeakyRelu → Q subgraph (mish: DQ, then the Mish in f32, then Q)
    assert n_after("separate") - n_after("fused") == {"leaky": 2, "mish": 6}[act]


def test_channel_major_decode_equals_the_island_decode():
    """Darknet's whole-graph decode (both coordinate forms, scale_x_y) gives the island numbers box for box."""
    from qdet.models.darknet.model import YoloSpec, decode_darknet, decode_darknet_for_selection
    from qdet.models.yolo.postprocess import xywh2xyxy

    torch.manual_seed(0)
    heads = [YoloSpec(((10.0, 14.0), (23.0, 27.0)), 3, 1.05, False, 16), YoloSpec(((37.0, 58.0),), 3, 2.0, True, 8)]
    raw = [torch.randn(2, 2 * 8, 4, 6), torch.rand(2, 8, 8, 12)]
    pred = decode_darknet(raw, heads, (64, 96))
    boxes, scores = decode_darknet_for_selection(raw, heads, (64, 96))
    torch.testing.assert_close(boxes, xywh2xyxy(pred[..., :4]), rtol=0, atol=1e-4)
    torch.testing.assert_close(scores, (pred[..., 5:] * pred[..., 4:5]).transpose(1, 2), rtol=0, atol=1e-6)
