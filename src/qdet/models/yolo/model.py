"""YOLOv5 (v6.1) built from its model yaml, split into a quantizable body and a float decode island.

`forward_raw` runs every layer up to and including the three Detect 1×1 convs and returns the raw
maps; it is `torch.fx`-traceable (layer wiring is Python constants from the yaml). `decode` turns raw
maps into boxes (sigmoid, grid, anchors) and stays float. `forward(x) == decode(forward_raw(x))`.
The module keeps the ultralytics state-dict layout (`model.0.conv.weight` … `model.24.anchors`).

Example:
    >>> import torch
    >>> net = YOLOv5(yolov5_config("n", depth_multiple=0.33, width_multiple=0.125)).eval()
    >>> raw = net.forward_raw(torch.zeros(1, 3, 64, 64))
    >>> [tuple(r.shape) for r in raw]
    [(1, 255, 8, 8), (1, 255, 4, 4), (1, 255, 2, 2)]
    >>> tuple(net.decode(raw).shape)  # 3 anchors × (64 + 16 + 4) cells
    (1, 252, 85)
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from qdet.errors import ConfigError, WeightsError
from qdet.models.yolo.layers import C3, SPPF, Activation, Bottleneck, Concat, Conv, Detect

From = int | tuple[int, ...]  # a layer's input(s): -1 = previous layer, otherwise an absolute index

# The standard v6.1 layer table (channels before width scaling, repeats before depth scaling).
_ANCHORS_P3_P5 = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]
_BACKBONE = [
    [-1, 1, "Conv", [64, 6, 2, 2]],  # 0-P1/2
    [-1, 1, "Conv", [128, 3, 2]],  # 1-P2/4
    [-1, 3, "C3", [128]],
    [-1, 1, "Conv", [256, 3, 2]],  # 3-P3/8
    [-1, 6, "C3", [256]],
    [-1, 1, "Conv", [512, 3, 2]],  # 5-P4/16
    [-1, 9, "C3", [512]],
    [-1, 1, "Conv", [1024, 3, 2]],  # 7-P5/32
    [-1, 3, "C3", [1024]],
    [-1, 1, "SPPF", [1024, 5]],  # 9
]
_HEAD = [
    [-1, 1, "Conv", [512, 1, 1]],
    [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
    [[-1, 6], 1, "Concat", [1]],  # cat backbone P4
    [-1, 3, "C3", [512, False]],  # 13
    [-1, 1, "Conv", [256, 1, 1]],
    [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
    [[-1, 4], 1, "Concat", [1]],  # cat backbone P3
    [-1, 3, "C3", [256, False]],  # 17 (P3/8-small)
    [-1, 1, "Conv", [256, 3, 2]],
    [[-1, 14], 1, "Concat", [1]],  # cat head P4
    [-1, 3, "C3", [512, False]],  # 20 (P4/16-medium)
    [-1, 1, "Conv", [512, 3, 2]],
    [[-1, 10], 1, "Concat", [1]],  # cat head P5
    [-1, 3, "C3", [1024, False]],  # 23 (P5/32-large)
    [[17, 20, 23], 1, "Detect", ["nc", "anchors"]],  # Detect(P3, P4, P5)
]
_MULTIPLIERS = {"n": (0.33, 0.25), "s": (0.33, 0.50), "m": (0.67, 0.75), "l": (1.0, 1.0), "x": (1.33, 1.25)}


def yolov5_config(
    size: str = "n", *, nc: int = 80, depth_multiple: float | None = None, width_multiple: float | None = None
) -> dict[str, Any]:
    """The standard YOLOv5 v6.1 model yaml as a dict, for size n/s/m/l/x (multipliers overridable).

    >>> cfg = yolov5_config("s")
    >>> cfg["depth_multiple"], cfg["width_multiple"], len(cfg["backbone"]) + len(cfg["head"])
    (0.33, 0.5, 25)
    """
    if size not in _MULTIPLIERS:
        raise ConfigError(f"unknown YOLOv5 size {size!r}; expected one of: {', '.join(_MULTIPLIERS)}")
    gd, gw = _MULTIPLIERS[size]
    return {
        "nc": nc,
        "depth_multiple": gd if depth_multiple is None else depth_multiple,
        "width_multiple": gw if width_multiple is None else width_multiple,
        "anchors": copy.deepcopy(_ANCHORS_P3_P5),
        "backbone": copy.deepcopy(_BACKBONE),
        "head": copy.deepcopy(_HEAD),
    }


def _make_divisible(x: float, divisor: int = 8) -> int:
    return int(math.ceil(x / divisor) * divisor)


def _resolve_arg(a: Any, nc: int, anchors: list) -> Any:
    # The yaml names a few values symbolically ('nc', 'anchors', 'None'); everything else is literal.
    # Resolved by lookup, never eval(): the yaml comes from a file.
    if isinstance(a, str):
        return {"nc": nc, "anchors": anchors, "None": None, "True": True, "False": False}.get(a, a)
    return a


def build_layers(
    cfg: Mapping[str, Any], ch_in: int = 3, *, act: Activation = Activation.SILU
) -> tuple[nn.ModuleList, tuple[From, ...], frozenset[int]]:
    """Parse a model yaml dict into (layers, each layer's input indices, indices whose output is reused)."""
    try:
        nc, gd, gw = int(cfg["nc"]), float(cfg["depth_multiple"]), float(cfg["width_multiple"])
        anchors = cfg["anchors"]
        table = list(cfg["backbone"]) + list(cfg["head"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"YOLOv5 model yaml lacks or has a bad {e}: needs nc, depth_multiple, width_multiple, anchors, backbone, head") from None
    if not isinstance(anchors, list):
        raise ConfigError("YOLOv5 model yaml: 'anchors' must be a list of per-level [w, h, ...] pixel lists")
    no = (len(anchors[0]) // 2) * (nc + 5)

    layers: list[nn.Module] = []
    froms: list[From] = []
    save: set[int] = set()
    chs: list[int] = []  # output channels of each layer so far
    for i, row in enumerate(table):
        try:
            f, n, name, args = row
        except (TypeError, ValueError):
            raise ConfigError(f"YOLOv5 model yaml layer {i}: expected [from, number, module, args], got {row!r}") from None
        args = [_resolve_arg(a, nc, anchors) for a in args]
        n = max(round(n * gd), 1) if n > 1 else n  # depth scaling

        def c_of(j: int) -> int:
            return ch_in if (i == 0 and j == -1) else chs[j]

        if name in ("Conv", "Bottleneck", "C3", "SPPF"):
            c1, c2 = c_of(f), args[0]
            if c2 != no:  # width scaling, except for an output layer
                c2 = _make_divisible(c2 * gw, 8)
            rest = args[1:]
            if name == "Conv":
                m = nn.Sequential(*(Conv(c1, c2, *rest, act=act) for _ in range(n))) if n > 1 else Conv(c1, c2, *rest, act=act)
            elif name == "Bottleneck":
                m = nn.Sequential(*(Bottleneck(c1, c2, *rest, act=act) for _ in range(n))) if n > 1 else Bottleneck(c1, c2, *rest, act=act)
            elif name == "C3":
                m = C3(c1, c2, n, *rest, act=act)  # C3 repeats its bottlenecks inside
            else:
                m = SPPF(c1, c2, *rest, act=act)
        elif name in ("nn.Upsample", "Upsample"):
            m, c2 = nn.Upsample(*args), c_of(f)
        elif name == "Concat":
            m, c2 = Concat(*args), sum(c_of(j) for j in f)
        elif name == "Detect":
            m = Detect(args[0], args[1], tuple(c_of(j) for j in f))
            c2 = no
        else:
            raise ConfigError(f"YOLOv5 model yaml layer {i}: unsupported module {name!r}")
        if not isinstance(f, int):
            f = tuple(int(j) for j in f)
        save.update(j % i for j in ((f,) if isinstance(f, int) else f) if j != -1)
        layers.append(m)
        froms.append(f)
        chs.append(c2)
    if not isinstance(layers[-1], Detect):
        raise ConfigError("YOLOv5 model yaml: the last layer must be Detect")
    return nn.ModuleList(layers), tuple(froms), frozenset(save)


def run_layers(layers: nn.ModuleList, froms: Sequence[From], save: frozenset[int], x: torch.Tensor) -> list[torch.Tensor]:
    """Run the layer graph; returns Detect's raw maps. Wiring is Python constants, so fx unrolls it."""
    outs: list[torch.Tensor | None] = []  # per layer; None where no later layer reads it
    y: Any = x
    for i, (layer, f) in enumerate(zip(layers, froms)):
        if f != -1:
            y = outs[f] if isinstance(f, int) else [y if j == -1 else outs[j] for j in f]
        y = layer(y)
        outs.append(y if i in save else None)
    return y


def cell_xy(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """(2, H·W) float32: each cell's x (column) and y (row) index, cells in row-major (y, x) order."""
    gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device),
                            torch.arange(w, dtype=torch.float32, device=device), indexing="ij")
    return torch.stack((gx.reshape(-1), gy.reshape(-1)), 0)


def decode_maps(
    raw: Sequence[torch.Tensor], anchors: torch.Tensor, stride: Sequence[float], na: int, no: int
) -> torch.Tensor:
    """Raw maps → (B, N, 5+nc): xywh in input pixels, objectness and class probabilities.

    anchors: (nl, na, 2) in grid units of each level; N = Σ na·H·W in (level, anchor, y, x) order.
    """
    out = []
    for i, p in enumerate(raw):
        b, _, h, w = p.shape
        # (B, na*no, H, W) → (B, na, H, W, no); float even when the raw map came from an int8 runtime
        y = p.float().view(b, na, no, h, w).permute(0, 1, 3, 4, 2).sigmoid()
        grid = cell_xy(h, w, p.device).t().reshape(1, 1, h, w, 2)  # cell x, y
        s = stride[i]
        anchor_px = (anchors[i].float().to(p.device) * s).view(1, na, 1, 1, 2)
        # v6.1 parameterisation: centres may leave their cell by half a cell; sizes up to 4× the anchor.
        xy = (y[..., 0:2] * 2 - 0.5 + grid) * s  # (B, na, H, W, 2)
        wh = (y[..., 2:4] * 2) ** 2 * anchor_px  # (B, na, H, W, 2)
        out.append(torch.cat((xy, wh, y[..., 4:]), -1).view(b, -1, no))
    return torch.cat(out, 1)  # (B, N, 5+nc)


def selection_layout(xy: torch.Tensor, wh: torch.Tensor, obj: torch.Tensor, cls: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """One level's channel-major decode, (B, na, k, HW) each (k = 2, 2, 1, nc) → (corners (B, na·HW, 4)
    x1 y1 x2 y2, scores (B, nc, na·HW) = objectness · class probability), boxes in (anchor, y, x) order.

    The whole graph's layout: the conv maps are already (channel, position), which is how
    NonMaxSuppression wants its scores, so only the 4 box channels are transposed, never the
    (5 + nc)-channel tensor (in OpenVINO the token-major decode + transpose back measured ~2.3× slower)."""
    b, na, _, hw = xy.shape
    corners = torch.cat((xy - wh / 2, xy + wh / 2), 2)  # (B, na, 4, HW)
    scores = (cls * obj).permute(0, 2, 1, 3).reshape(b, cls.shape[2], na * hw)
    return corners.permute(0, 1, 3, 2).reshape(b, na * hw, 4), scores


def decode_maps_for_selection(
    raw: Sequence[torch.Tensor], anchors: torch.Tensor, stride: Sequence[float], na: int, no: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw maps → (boxes (B, N, 4) x1 y1 x2 y2, scores (B, nc, N)): the numbers of `decode_maps` +
    `xywh2xyxy`, N in the same (level, anchor, y, x) order, in `selection_layout`."""
    boxes, scores = [], []
    for i, p in enumerate(raw):
        b, _, h, w = p.shape
        y = p.float().view(b, na, no, h * w).sigmoid()  # (B, na, no, HW)
        grid = cell_xy(h, w, p.device).view(1, 1, 2, h * w)
        s = stride[i]
        anchor_px = (anchors[i].float().to(p.device) * s).view(1, na, 2, 1)
        xy = (y[:, :, 0:2] * 2 - 0.5 + grid) * s
        wh = (y[:, :, 2:4] * 2) ** 2 * anchor_px
        level_boxes, level_scores = selection_layout(xy, wh, y[:, :, 4:5], y[:, :, 5:])
        boxes.append(level_boxes)
        scores.append(level_scores)
    return torch.cat(boxes, 1), torch.cat(scores, 2)


class YOLOv5Raw(nn.Module):
    """`forward` = `YOLOv5.forward_raw`, sharing the same layers (same `model.*` keys): the module to trace."""

    def __init__(self, layers: nn.ModuleList, froms: tuple[From, ...], save: frozenset[int]) -> None:
        super().__init__()
        self.model = layers
        self.froms, self.save = froms, save

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return run_layers(self.model, self.froms, self.save, x)


class YOLOv5(nn.Module):
    """YOLOv5 from a model yaml dict (or yaml text). Input (B, 3, H, W) RGB in [0, 1], H and W multiples of 32.

    Attributes: `model` (the layers, ultralytics keys), `stride` (per level, Python floats),
    `names` (class names), `yaml` (the config it was built from).
    """

    def __init__(
        self, cfg: Mapping[str, Any] | str, *, ch: int = 3, nc: int | None = None, activation: Activation | str = Activation.SILU
    ) -> None:
        super().__init__()
        from qdet.models.yolo.schema import check_model_yaml, parse_yaml_text

        if isinstance(cfg, str):
            cfg = parse_yaml_text(cfg)
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"YOLOv5 model yaml: expected a mapping, got a {type(cfg).__name__}")
        self.yaml = dict(copy.deepcopy(cfg))
        if nc is not None:
            self.yaml["nc"] = nc
        if "ch" not in self.yaml:
            self.yaml["ch"] = ch
        check_model_yaml(self.yaml)  # every field typed and bounded before a single layer is allocated
        self.activation = Activation.parse(activation)
        ch = self.yaml["ch"]
        # Strides from one probe forward (as the reference does), in eval mode so BN stats stay untouched.
        was_training = self.training
        try:
            self.model, self.froms, self.save = build_layers(self.yaml, ch, act=self.activation)
            self.names = [str(i) for i in range(int(self.yaml["nc"]))]
            det = self.detect
            self.eval()
            with torch.no_grad():
                s = 256
                raw = self.forward_raw(torch.zeros(1, ch, s, s))
        except (RuntimeError, ValueError, TypeError, IndexError) as e:  # wiring the schema cannot see, e.g. map sizes
            raise ConfigError(f"YOLOv5 model yaml: the layer table does not run ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]})") from None
        self.train(was_training)
        if any(r.shape[-2] == 0 or s % r.shape[-2] for r in raw):
            raise ConfigError(f"YOLOv5 model yaml: Detect maps {[tuple(r.shape[-2:]) for r in raw]} do not divide a "
                              f"{s}-pixel input into whole strides")
        det.stride = tuple(float(s // r.shape[-2]) for r in raw)
        self.stride = det.stride
        # The state dict stores anchors in grid units of each level (pixels / stride).
        det.anchors = det.anchors / torch.tensor(det.stride).view(-1, 1, 1)
        self._init_weights()

    @property
    def detect(self) -> Detect:
        return self.model[-1]  # type: ignore[return-value]

    def _init_weights(self) -> None:
        # Detection priors for a fresh model (no effect once weights are loaded): objectness ≈ 8 objects
        # per 640² image per level, class prior ≈ 0.6 / nc, so random models give plausible scores.
        det = self.detect
        with torch.no_grad():
            for conv, s in zip(det.m, det.stride):
                b = conv.bias.view(det.na, -1)  # (na, no), a view: edits land in the parameter
                b[:, 4] += math.log(8 / (640 / s) ** 2)
                b[:, 5:] += math.log(0.6 / (det.nc - 0.99)) if det.nc > 1 else 0.0

    def forward_raw(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Body + Detect convs: (B, 3, H, W) → [(B, na*(5+nc), H/s, W/s) for s in stride]. fx-traceable."""
        return run_layers(self.model, self.froms, self.save, x)

    def raw_module(self) -> YOLOv5Raw:
        """A module whose `forward` is `forward_raw`, sharing parameters (for `torch.fx.symbolic_trace`)."""
        return YOLOv5Raw(self.model, self.froms, self.save)

    def decode(self, raw: Sequence[torch.Tensor]) -> torch.Tensor:
        """Float island: raw maps → (B, N, 5+nc) with xywh in input pixels, objectness and class probabilities."""
        det = self.detect
        return decode_maps(raw, det.anchors, det.stride, det.na, det.no)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.forward_raw(x))


def _read_checkpoint(path: str | Path) -> dict[str, Any]:
    from qdet.models.weights import read_torch_file

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file '{path}' does not exist" if not path.exists() else f"weights path '{path}' is not a file")
    obj = read_torch_file(path)  # weights_only: a pickled object is refused with the reason, never run
    if not isinstance(obj, dict):
        raise WeightsError(f"weights file {path} holds a {type(obj).__name__}, expected a state dict")
    return obj


def load_weights(model: YOLOv5, weights: str | Path | Mapping[str, torch.Tensor], *, source: str | None = None) -> YOLOv5:
    """Load an ultralytics-layout state dict (fp16 is fine: converted to float32) into `model`, checking it fits.

    `weights` is a file (a bare state dict or {"state_dict", "meta"}) or a mapping.

    >>> net = YOLOv5(yolov5_config("n", width_multiple=0.125))
    >>> _ = load_weights(net, net.state_dict())
    """
    if isinstance(weights, (str, Path)):
        source = str(weights)
        ckpt = _read_checkpoint(weights)
        sd = ckpt.get("state_dict", ckpt)
    else:
        sd = weights
    where = source or "the given state dict"
    if not isinstance(sd, Mapping) or not all(isinstance(k, str) for k in sd):
        raise WeightsError(f"{where} does not hold a state dict (found a {type(sd).__name__})")
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise WeightsError(
            f"{where} does not fit this YOLOv5 model: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )
    bad_type = next((k for k in own if not isinstance(sd[k], torch.Tensor)), None)
    if bad_type is not None:
        raise WeightsError(f"{where}: entry {bad_type!r} is a {type(sd[bad_type]).__name__}, not a tensor")
    for k, v in own.items():
        if v.is_floating_point() and not sd[k].is_floating_point():
            raise WeightsError(f"{where} does not fit this YOLOv5 model: {k} is {sd[k].dtype}, expected floating point")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise WeightsError(
                f"{where} does not fit this YOLOv5 model: {k} has shape {tuple(sd[k].shape)}, model expects {tuple(v.shape)} "
                "(a different size n/s/m/l or class count?)"
            )
    from qdet.models.weights import check_finite

    check_finite(sd, where)  # NaN weights are the file's fault, not the calibration data's
    # fp16 checkpoint → float32 model: qdet calibrates and measures error against a float32 reference.
    model.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()})
    return model


def load_yolov5(path: str | Path, *, activation: Activation | str = Activation.SILU) -> YOLOv5:
    """Build YOLOv5 from a checkpoint's meta (model yaml, class names) and load its weights; float32, eval mode.

    >>> from qdet.paths import assets_dir
    >>> net = load_yolov5(assets_dir() / "weights/yolov5n_v6.1_state_dict_fp16.pt")  # doctest: +SKIP
    >>> net.stride  # doctest: +SKIP
    (8.0, 16.0, 32.0)
    """
    ckpt = _read_checkpoint(path)
    meta = ckpt.get("meta")
    if not isinstance(meta, dict) or "yaml" not in meta or "state_dict" not in ckpt:
        raise WeightsError(f"{path} has no meta['yaml']: build YOLOv5(yolov5_config(...)) and call load_weights instead")
    try:
        model = YOLOv5(meta["yaml"], activation=activation)
    except ConfigError as e:
        raise WeightsError(f"weights file '{path}': meta['yaml'] is invalid: {str(e).removeprefix('YOLOv5 model yaml: ')}") from None
    load_weights(model, ckpt["state_dict"], source=str(path))
    if "names" in meta:
        names = meta["names"]
        if isinstance(names, dict):  # ultralytics also writes {index: name}
            names = [names[k] for k in sorted(names)] if all(isinstance(k, int) for k in names) else None
        if not isinstance(names, (list, tuple)) or len(names) != model.detect.nc or not all(isinstance(n, str) for n in names):
            raise WeightsError(f"{path}: meta 'names' must be {model.detect.nc} class-name strings (one per class)")
        model.names = list(names)
    if "stride" in meta:
        stride = meta["stride"]
        if (not isinstance(stride, (list, tuple)) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in stride)
                or tuple(float(v) for v in stride) != model.stride):
            raise WeightsError(f"{path}: meta 'stride' {stride!r:.60} differs from the built model's {model.stride}")
    return model.float().eval()
