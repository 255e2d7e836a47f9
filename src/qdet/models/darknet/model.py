"""A Darknet network built from a parsed cfg: `DarknetBody` (raw head maps; the region qdet traces and
quantizes) and `DarknetDetector` (body → float decode island).

Layer i of the cfg (the i-th section after [net]) is `body.layers[i]`, so error messages and module
names follow Darknet's own numbering (`layers.105.conv` is yolov3's last conv).

    >>> from qdet.models.darknet.cfg import parse_cfg_text
    >>> text = ("[net]\\nwidth=64\\nheight=64\\n[convolutional]\\nbatch_normalize=1\\nfilters=8\\nsize=3\\nstride=2\\n"
    ...         "pad=1\\nactivation=leaky\\n[convolutional]\\nfilters=18\\nsize=1\\nactivation=linear\\n"
    ...         "[yolo]\\nmask=0,1\\nanchors=10,14, 23,27\\nclasses=4\\n")
    >>> det = DarknetDetector(build_darknet(parse_cfg_text(text, "toy.cfg"))).eval()
    >>> [tuple(m.shape) for m in det.body(torch.zeros(1, 3, 64, 64))]
    [(1, 18, 32, 32)]
    >>> det(torch.zeros(1, 3, 64, 64)).shape  # (B, N, 5 + classes), N = 2 anchors · 32 · 32
    torch.Size([1, 2048, 9])
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from qdet.errors import ConfigError
from qdet.models.darknet.cfg import DarknetCfg, Section
from qdet.models.darknet.layers import (
    ACTIVATIONS,
    ConvBlock,
    DarknetMaxPool,
    Route,
    Shortcut,
    YoloHead,
)
from qdet.models.random_init import lively_init_
from qdet.models.yolo.model import cell_xy, selection_layout


@dataclass(frozen=True)
class LayerInfo:
    """Wiring of one layer: which earlier layers it reads (absolute indices; () = the previous one)."""

    type: str
    inputs: tuple[int, ...]
    channels: int  # output channels
    stride: int  # cumulative stride of its output w.r.t. the network input


def _act(s: Section) -> str:
    name = s.text("activation", "linear" if s.type == "shortcut" else "logistic").lower()
    if name not in ACTIVATIONS:
        raise s.error("activation", f"activation={name!r} is not supported (one of {', '.join(ACTIVATIONS)})")
    return name


def _positive(s: Section, key: str, default: int) -> int:
    v = s.integer(key, default)
    if v < 1:
        raise s.error(key, f"{key}={v} must be >= 1")
    return v


def _ref(s: Section, key: str, value: int, i: int) -> int:
    """A layer reference (relative when negative) → absolute index; must be an earlier layer."""
    j = i + value if value < 0 else value
    if not 0 <= j < i:
        raise s.error(key, f"{key}={value} at layer {i} refers to layer {j}, which does not exist before it "
                           f"(valid: 0..{i - 1}, or -1..-{i})")
    return j


def _build_layer(s: Section, i: int, infos: list[LayerInfo], c_in0: int) -> tuple[nn.Module, LayerInfo]:
    prev_c = infos[-1].channels if infos else c_in0
    prev_s = infos[-1].stride if infos else 1
    if s.type == "convolutional":
        for key, neutral in (("dilation", 1), ("stride_x", None), ("stride_y", None), ("antialiasing", 0),
                             ("xnor", 0), ("binary", 0), ("deform", 0), ("share_index", None)):
            if s.has(key) and (neutral is None or s.integer(key) != neutral):
                raise s.error(key, f"{key}={s.text(key)} is not supported by this reader")
        filters, size = _positive(s, "filters", 1), _positive(s, "size", 1)
        stride, groups = _positive(s, "stride", 1), _positive(s, "groups", 1)
        padding = size // 2 if s.integer("pad", 0) else s.integer("padding", 0)
        if prev_c % groups or filters % groups:
            raise s.error("groups", f"groups={groups} does not divide the input ({prev_c}) and output ({filters}) channels")
        bn = bool(s.integer("batch_normalize", 0))
        return (ConvBlock(prev_c, filters, size, stride, padding, groups, bn, _act(s)),
                LayerInfo(s.type, (), filters, prev_s * stride))
    if s.type == "shortcut":
        froms = s.integers("from")
        if len(froms) != 1:
            raise s.error("from", f"from={s.text('from')!r}: only one 'from' layer is supported")
        if s.has("weights_type") and s.text("weights_type") != "none":
            raise s.error("weights_type", "weighted shortcuts (weights_type) are not supported")
        j = _ref(s, "from", froms[0], i)
        if infos[j].channels != prev_c:
            raise s.error("from", f"from={froms[0]}: layer {j} has {infos[j].channels} channels, layer {i - 1} has {prev_c}")
        return Shortcut(_act(s)), LayerInfo(s.type, (i - 1, j), prev_c, prev_s)
    if s.type == "route":
        refs = tuple(_ref(s, "layers", v, i) for v in s.integers("layers"))
        groups, group_id = _positive(s, "groups", 1), s.integer("group_id", 0)
        if not 0 <= group_id < groups:
            raise s.error("group_id", f"group_id={group_id} must be in 0..{groups - 1}")
        for j in refs:
            if infos[j].channels % groups:
                raise s.error("groups", f"groups={groups} does not divide layer {j}'s {infos[j].channels} channels")
        strides = {infos[j].stride for j in refs}
        if len(strides) > 1:
            raise s.error("layers", f"layers={s.text('layers')!r} joins maps of different strides {sorted(strides)}")
        return (Route(groups, group_id),
                LayerInfo(s.type, refs, sum(infos[j].channels for j in refs) // groups, infos[refs[0]].stride))
    if s.type == "upsample":
        stride = _positive(s, "stride", 2)
        if prev_s % stride:
            raise s.error("stride", f"upsample stride={stride} does not divide the current stride {prev_s}")
        return nn.Upsample(scale_factor=stride, mode="nearest"), LayerInfo(s.type, (), prev_c, prev_s // stride)
    if s.type == "maxpool":
        if s.integer("maxpool_depth", 0):
            raise s.error("maxpool_depth", "maxpool_depth=1 (max over channels) is not supported")
        stride = _positive(s, "stride", 1)  # Darknet's defaults: stride 1, size = stride
        size = _positive(s, "size", stride)
        pad_total = s.integer("padding", size - 1)
        try:
            pool = DarknetMaxPool(size, stride, pad_total)
        except ConfigError as e:  # add the file and line
            raise s.error("size", str(e)) from None
        return pool, LayerInfo(s.type, (), prev_c, prev_s * stride)
    if s.type == "yolo":
        return _yolo(s, i, prev_c, prev_s)
    raise s.error(None, "is not a layer type this reader builds")  # the parser refuses these already


def _yolo(s: Section, i: int, prev_c: int, prev_s: int) -> tuple[nn.Module, LayerInfo]:
    if not s.has("anchors"):
        raise s.error(None, "needs 'anchors='")
    if not s.has("mask"):
        raise s.error(None, "needs 'mask='")
    values = s.numbers("anchors")
    if len(values) % 2:
        raise s.error("anchors", f"anchors= has {len(values)} numbers; they come in (w, h) pairs")
    pairs = [(values[k], values[k + 1]) for k in range(0, len(values), 2)]
    num = s.integer("num", len(pairs))
    if num != len(pairs):
        raise s.error("num", f"num={num} but anchors= lists {len(pairs)} pairs")
    mask = s.integers("mask")
    for m in mask:
        if not 0 <= m < len(pairs):
            raise s.error("mask", f"mask={s.text('mask')!r}: anchor {m} does not exist (0..{len(pairs) - 1})")
    classes = _positive(s, "classes", 20)
    need = len(mask) * (classes + 5)
    if prev_c != need:
        raise s.error(None, f"at layer {i} reads {prev_c} channels; {len(mask)} anchors × ({classes} classes + 5) "
                            f"need {need} (the 'filters=' of the conv before it)")
    scale = s.number("scale_x_y", 1.0)
    new_coords = bool(s.integer("new_coords", 0))
    head = YoloHead([pairs[m] for m in mask], classes, scale, new_coords)
    return head, LayerInfo(s.type, (), prev_c, prev_s)


def build_darknet(cfg: DarknetCfg) -> "DarknetBody":
    """The body of any YOLOv3/v4-family cfg, randomly initialised (PyTorch's defaults, BN at identity)."""
    c_in0 = cfg.net.channels
    layers: list[nn.Module] = []
    infos: list[LayerInfo] = []
    for i, s in enumerate(cfg.layers):
        layer, info = _build_layer(s, i, infos, c_in0)
        layers.append(layer)
        infos.append(info)
    heads = tuple(i for i, info in enumerate(infos) if info.type == "yolo")
    if not heads:
        raise ConfigError(f"{cfg.source}: no [yolo] layer (this reader builds YOLO detectors)")
    return DarknetBody(nn.ModuleList(layers), tuple(infos), heads, cfg.source, c_in0)


class DarknetBody(nn.Module):
    """(B, C, H, W) → the raw map entering each [yolo] layer, [(B, na·(5+nc), H/s, W/s)], H and W
    multiples of the largest stride. The wiring is Python constants, so torch.fx unrolls the loop."""

    def __init__(self, layers: nn.ModuleList, infos: tuple[LayerInfo, ...], heads: tuple[int, ...], source: str,
                 in_channels: int = 3) -> None:
        super().__init__()
        self.layers = layers
        self.infos, self.heads, self.source = infos, heads, source
        self.in_channels = in_channels
        read = {j for info in infos for j in info.inputs}
        self._keep = frozenset(read | set(heads))

    @property
    def yolo_layers(self) -> list[YoloHead]:
        return [self.layers[i] for i in self.heads]  # type: ignore[misc]

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(self.infos[i].stride for i in self.heads)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs: dict[int, torch.Tensor] = {}
        y = x
        for i, (layer, info) in enumerate(zip(self.layers, self.infos)):
            if info.inputs:
                y = layer(*(outs[j] for j in info.inputs))
            else:
                y = layer(y)
            if i in self._keep:
                outs[i] = y
        return [outs[i] for i in self.heads]


def decode_darknet(raw: Sequence[torch.Tensor], heads: Sequence["YoloSpec | YoloHead"], input_hw: tuple[int, int]) -> torch.Tensor:
    """Float island: raw [yolo] maps → (B, N, 5+nc) of x, y, w, h in input pixels, objectness, class
    probabilities; N in (head, anchor, y, x) order. Darknet's get_yolo_box:

    * default: xy = (σ(t)·s − (s−1)/2 + cell) · stride, wh = exp(t)·anchor, obj/cls = σ(t);
    * new_coords=1 (yolov4-csp, whose last conv already applies `logistic`): the same xy on the map
      values, wh = (2·t)²·anchor, obj/cls = t;

    with s = scale_x_y and anchors in input pixels.
    """
    in_h, in_w = input_hw
    out = []
    for p, head in zip(raw, heads):
        b, _, h, w = p.shape
        na, no = len(head.anchors), head.classes + 5
        t = p.float().view(b, na, no, h, w).permute(0, 1, 3, 4, 2)  # (B, na, H, W, no)
        grid = cell_xy(h, w, p.device).t().reshape(1, 1, h, w, 2)
        step = torch.tensor([in_w / w, in_h / h], device=p.device)  # pixels per cell (x, y)
        anchors = torch.tensor(head.anchors, dtype=torch.float32, device=p.device).view(1, na, 1, 1, 2)
        s = head.scale_x_y
        if head.new_coords:
            xy01, wh, rest = t[..., 0:2], (2 * t[..., 2:4]) ** 2 * anchors, t[..., 4:]
        else:
            xy01, wh, rest = t[..., 0:2].sigmoid(), t[..., 2:4].exp() * anchors, t[..., 4:].sigmoid()
        xy = (xy01 * s - (s - 1) / 2 + grid) * step
        out.append(torch.cat((xy, wh, rest), -1).reshape(b, -1, no))
    return torch.cat(out, 1)


def decode_darknet_for_selection(raw: Sequence[torch.Tensor], heads: Sequence["YoloSpec | YoloHead"],
                                 input_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`decode_darknet` + corners + objectness · class scores, channel-major for the whole graph:
    (boxes (B, N, 4) x1 y1 x2 y2, scores (B, nc, N)), N in the same order (`selection_layout`)."""
    in_h, in_w = input_hw
    boxes, scores = [], []
    for p, head in zip(raw, heads):
        b, _, h, w = p.shape
        na, no = len(head.anchors), head.classes + 5
        t = p.float().view(b, na, no, h * w)  # (B, na, no, HW)
        grid = cell_xy(h, w, p.device).view(1, 1, 2, h * w)
        step = torch.tensor([in_w / w, in_h / h], device=p.device).view(1, 1, 2, 1)
        anchors = torch.tensor(head.anchors, dtype=torch.float32, device=p.device).view(1, na, 2, 1)
        s = head.scale_x_y
        if head.new_coords:
            xy01, wh, rest = t[:, :, 0:2], (2 * t[:, :, 2:4]) ** 2 * anchors, t[:, :, 4:]
        else:
            xy01, wh, rest = t[:, :, 0:2].sigmoid(), t[:, :, 2:4].exp() * anchors, t[:, :, 4:].sigmoid()
        xy = (xy01 * s - (s - 1) / 2 + grid) * step
        level_boxes, level_scores = selection_layout(xy, wh, rest[:, :, 0:1], rest[:, :, 1:])
        boxes.append(level_boxes)
        scores.append(level_scores)
    return torch.cat(boxes, 1), torch.cat(scores, 2)


@dataclass(frozen=True)
class YoloSpec:
    """What decoding needs of one [yolo] layer (plain data: the body may be replaced by a traced graph)."""

    anchors: tuple[tuple[float, float], ...]  # masked anchors (w, h) in input pixels
    classes: int
    scale_x_y: float
    new_coords: bool
    stride: int


class DarknetDetector(nn.Module):
    """`body` (traced and quantized) → `decode` (float island). Input (B, C, H, W) RGB in [0, 1].

    `names`: class names (Darknet's order); `net`: the cfg's [net] input options; `heads`: a
    `YoloSpec` per [yolo] layer, in output order.
    """

    def __init__(self, body: DarknetBody, names: Sequence[str] | None = None, net: object | None = None) -> None:
        super().__init__()
        self.body: nn.Module = body
        self.heads = tuple(YoloSpec(tuple(h.anchors), h.classes, h.scale_x_y, h.new_coords, s)
                           for h, s in zip(body.yolo_layers, body.strides))
        nc = self.heads[0].classes
        self.names = list(names) if names is not None else [str(k) for k in range(nc)]
        self.net = net

    def decode(self, raw: Sequence[torch.Tensor], input_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """Raw maps (tensors or arrays, from any runtime) → (B, N, 5+nc) float."""
        raw = [r if isinstance(r, torch.Tensor) else torch.as_tensor(r) for r in raw]
        if input_hw is None:  # from the first map and its stride
            h, w = raw[0].shape[-2:]
            s = self.heads[0].stride
            input_hw = (h * s, w * s)
        return decode_darknet(raw, self.heads, input_hw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        step = max(h.stride for h in self.heads)
        if x.dim() != 4 or x.shape[-2] % step or x.shape[-1] % step:
            raise ConfigError(f"Darknet input must be (B, C, H, W) with H and W multiples of {step}, got {tuple(x.shape)}")
        return self.decode(self.body(x), tuple(x.shape[-2:]))

    def boxes_and_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole graph's decode: (boxes (B, N, 4) x1 y1 x2 y2, scores (B, nc, N)), channel-major."""
        return decode_darknet_for_selection(self.body(x), self.heads, tuple(x.shape[-2:]))


def init_head_priors(body: DarknetBody, img_size: int = 416) -> None:
    """For a random model only: objectness bias ≈ 8 objects per image per head, class prior ≈ 0.6/nc
    (as the YOLOv5 adapter does), so random models give plausible, not saturated, scores."""
    with torch.no_grad():
        for i in body.heads:
            head: YoloHead = body.layers[i]  # type: ignore[assignment]
            conv_block = body.layers[i - 1]
            if head.new_coords or not isinstance(conv_block, ConvBlock) or conv_block.conv.bias is None:
                continue
            b = conv_block.conv.bias.view(len(head.anchors), -1)
            cells = (img_size / body.infos[i].stride) ** 2
            b[:, 4] += math.log(8 / cells)
            if head.classes > 1:
                b[:, 5:] += math.log(0.6 / (head.classes - 0.99))



def random_init_(body: DarknetBody, *, seed: int = 0, img_size: int = 128) -> DarknetBody:
    """A random model whose activations look like a trained one's, for tests and `--weights random`.

    PyTorch's default conv init shrinks activations layer after layer (a 24-layer yolov3-tiny's
    head maps come out constant to 1e-4), which makes quantization error meaningless. Here: conv
    weights He-normal, BN gamma U(0.5, 1.5), beta N(0, 0.1), then the BN running statistics are set
    from one forward pass over seeded uniform [0, 1] images (as training would leave them), so every
    layer's output is roughly normalised; the heads get the objectness/class priors of
    `init_head_priors`. Deterministic for a seed.
    """
    lively_init_(body, (2, body.in_channels, img_size, img_size), seed=seed)
    init_head_priors(body, img_size)
    return body
