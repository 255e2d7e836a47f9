"""Schema check of a YOLOv5 model yaml (from a checkpoint's meta or a file) before anything is built.

`check_model_yaml` walks the layer table the way `build_layers` will, with sizes only: it checks
every field's type and range, that each layer reads earlier layers, that channel counts, repeats,
the parameter total and the feature-map sizes stay within bounds (a crafted yaml must not make qdet
allocate terabytes), and that the table ends in Detect. Each problem is one `ConfigError` naming the
field, e.g. "YOLOv5 model yaml: head[3] (layer 13) 'number' must be an integer >= 1, got 'three'".

    >>> from qdet.models.yolo.model import yolov5_config
    >>> cfg = check_model_yaml(yolov5_config("n"))
    >>> check_model_yaml({**yolov5_config("n"), "width_multiple": 1e6})
    Traceback (most recent call last):
    ...
    qdet.errors.ConfigError: YOLOv5 model yaml: 'width_multiple' must be a number in (0, 4], got 1000000.0
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from qdet.errors import ConfigError

MODULES = ("Conv", "Bottleneck", "C3", "SPPF", "nn.Upsample", "Upsample", "Concat", "Detect")
MAX_LAYERS = 512
MAX_CHANNELS = 8192  # per layer, after width scaling
MAX_REPEATS = 64  # after depth scaling
MAX_PARAMS = 300_000_000  # yolov5x has 87M
MAX_CLASSES = 100_000
_REQUIRED = ("nc", "depth_multiple", "width_multiple", "anchors", "backbone", "head")
_SYMBOLS = {"None": None, "True": True, "False": False}


def _fail(what: str) -> ConfigError:
    return ConfigError(f"YOLOv5 model yaml: {what}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _make_divisible(x: float, divisor: int = 8) -> int:
    return int(math.ceil(x / divisor) * divisor)


def parse_yaml_text(text: str) -> Any:
    """yaml.safe_load (no Python objects) with parse errors as one ConfigError line."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = " ".join(str(exc).split())[:200]
        raise _fail(f"not valid YAML ({first})") from None


def check_model_yaml(cfg: Any) -> Mapping[str, Any]:
    """Raise ConfigError naming the first bad field of a model yaml dict; return it unchanged when valid."""
    if not isinstance(cfg, Mapping):
        raise _fail(f"expected a mapping with {', '.join(_REQUIRED)}, got a {type(cfg).__name__}")
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise _fail(f"missing field {missing[0]!r} (needs {', '.join(_REQUIRED)})")
    nc = cfg["nc"]
    if not _is_int(nc) or not 1 <= nc <= MAX_CLASSES:
        raise _fail(f"'nc' must be an integer in 1..{MAX_CLASSES}, got {nc!r}")
    for key in ("depth_multiple", "width_multiple"):
        v = cfg[key]
        if not _is_num(v) or not 0 < v <= 4:
            raise _fail(f"{key!r} must be a number in (0, 4], got {v!r}")
    ch = cfg.get("ch", 3)
    if not _is_int(ch) or not 1 <= ch <= 64:
        raise _fail(f"'ch' must be an integer in 1..64, got {ch!r}")
    anchors = _check_anchors(cfg["anchors"])
    for key in ("backbone", "head"):
        if not isinstance(cfg[key], list):
            raise _fail(f"{key!r} must be a list of [from, number, module, args] rows, got a {type(cfg[key]).__name__}")
    rows = [("backbone", i, r) for i, r in enumerate(cfg["backbone"])] + [("head", i, r) for i, r in enumerate(cfg["head"])]
    if not rows or len(rows) > MAX_LAYERS:
        raise _fail(f"'backbone' + 'head' must have 1..{MAX_LAYERS} layers, got {len(rows)}")
    _walk(rows, nc, float(cfg["depth_multiple"]), float(cfg["width_multiple"]), ch, anchors)
    return cfg


def _check_anchors(anchors: Any) -> list[list[float]]:
    if not isinstance(anchors, list) or not 1 <= len(anchors) <= 8:
        raise _fail(f"'anchors' must be a list of 1..8 per-level [w, h, ...] pixel lists, got {anchors!r:.80}")
    width = None
    for i, level in enumerate(anchors):
        if (not isinstance(level, list) or not 2 <= len(level) <= 40 or len(level) % 2
                or not all(_is_num(a) and 0 < a <= 1e5 for a in level)):
            raise _fail(f"'anchors[{i}]' must be an even-length list of 2..40 positive pixel sizes, got {level!r:.80}")
        if width is not None and len(level) != width:
            raise _fail(f"'anchors[{i}]' has {len(level) // 2} anchors, level 0 has {width // 2}")
        width = len(level)
    return anchors


def _walk(rows: list[tuple[str, int, Any]], nc: int, gd: float, gw: float, ch_in: int, anchors: list) -> None:
    """Channels, repeats, parameters and feature-map scale of every layer, as build_layers computes them."""
    no = (len(anchors[0]) // 2) * (nc + 5)
    chs: list[int] = []
    scales: list[float] = []  # feature-map size relative to the input
    params = 0
    for i, (part, j, row) in enumerate(rows):
        where = f"{part}[{j}] (layer {i})"
        if not isinstance(row, list) or len(row) != 4:
            raise _fail(f"{where} must be [from, number, module, args], got {row!r:.80}")
        f, n, name, args = row
        froms = _check_from(f, i, where)
        if not _is_int(n) or not 1 <= n <= 1000:
            raise _fail(f"{where} 'number' must be an integer >= 1, got {n!r}")
        if not isinstance(name, str) or name not in MODULES:
            raise _fail(f"{where} unknown module {name!r}; supported: {', '.join(MODULES)}")
        if not isinstance(args, list):
            raise _fail(f"{where} 'args' must be a list, got {args!r:.80}")
        args = [_SYMBOLS.get(a, a) if isinstance(a, str) else a for a in args]
        n = max(round(n * gd), 1) if n > 1 else n
        if n > MAX_REPEATS:
            raise _fail(f"{where} repeats {n} after depth_multiple (at most {MAX_REPEATS})")
        c_in = [ch_in if (i == 0 and k == -1) else chs[k] for k in froms]
        s_in = [1.0 if (i == 0 and k == -1) else scales[k] for k in froms]
        if name in ("Conv", "Bottleneck", "C3", "SPPF"):
            if len(froms) != 1:
                raise _fail(f"{where} {name} reads one layer, 'from' lists {len(froms)}")
            c2, scale, p = _conv_like(name, args, c_in[0], s_in[0], n, no, gw, where)
            params += p
        elif name in ("nn.Upsample", "Upsample"):
            if len(froms) != 1:
                raise _fail(f"{where} {name} reads one layer, 'from' lists {len(froms)}")
            factor = args[1] if len(args) > 1 else None
            if len(args) > 3 or (args and args[0] is not None) or not _is_int(factor) or not 1 <= factor <= 4:
                raise _fail(f"{where} {name} 'args' must be [None, scale factor 1..4, mode], got {row[3]!r:.80}")
            if len(args) > 2 and args[2] not in ("nearest", "bilinear"):
                raise _fail(f"{where} {name} mode must be 'nearest' or 'bilinear', got {args[2]!r}")
            c2, scale = c_in[0], s_in[0] * factor
        elif name == "Concat":
            if len(froms) < 2:
                raise _fail(f"{where} Concat needs a list of >= 2 layers in 'from', got {f!r}")
            if args not in ([], [1]):
                raise _fail(f"{where} Concat 'args' must be [1] (channel dimension), got {row[3]!r:.80}")
            if len(set(s_in)) != 1:
                raise _fail(f"{where} Concat joins layers {list(froms)} whose feature maps have different sizes")
            c2, scale = sum(c_in), s_in[0]
        else:  # Detect
            if i != len(rows) - 1:
                raise _fail(f"{where} Detect must be the last layer")
            if len(args) != 2 or args[0] not in ("nc", nc) or args[1] not in ("anchors", anchors):
                raise _fail(f"{where} Detect 'args' must be [nc, anchors], got {row[3]!r:.80}")
            if len(froms) != len(anchors):
                raise _fail(f"{where} Detect reads {len(froms)} layers but 'anchors' has {len(anchors)} levels")
            for k, s in zip(froms, s_in):
                if s < 1 / 128:
                    raise _fail(f"{where} Detect input layer {k} is downsampled {round(1 / s)}× (at most 128×)")
            params += sum(c_in) * no
            c2, scale = no, min(s_in)
        if c2 > MAX_CHANNELS:
            raise _fail(f"{where} has {c2} channels after width_multiple (at most {MAX_CHANNELS})")
        if scale > 4:
            raise _fail(f"{where} feature map would be {scale:g}× the input size (at most 4×)")
        if params > MAX_PARAMS:
            raise _fail(f"the model would have over {MAX_PARAMS:,} parameters (at {where})")
        chs.append(c2)
        scales.append(scale)
    if rows[-1][2][2] != "Detect":
        raise _fail("the last layer must be Detect")


def _check_from(f: Any, i: int, where: str) -> tuple[int, ...]:
    froms = (f,) if _is_int(f) else tuple(f) if isinstance(f, list) and f else None
    if froms is None or not all(_is_int(k) for k in froms):
        raise _fail(f"{where} 'from' must be an integer or a non-empty list of integers, got {f!r:.80}")
    for k in froms:
        if i == 0 and k != -1:
            raise _fail(f"{where} 'from' must be -1 (the input) for the first layer, got {k}")
        if not -i <= k < i and not (i == 0 and k == -1):
            raise _fail(f"{where} 'from' index {k} does not name an earlier layer (0..{i - 1}, or -1..-{i})")
    return froms


def _conv_like(name: str, args: list, c1: int, s_in: float, n: int, no: int, gw: float,
               where: str) -> tuple[int, float, int]:
    """(output channels, output scale, parameters) of Conv / Bottleneck / C3 / SPPF."""
    if not args or not _is_int(args[0]) or not 1 <= args[0] <= 100_000:
        raise _fail(f"{where} {name} 'args[0]' (output channels) must be a positive integer, got {args[:1]!r}")
    c2 = args[0] if args[0] == no else _make_divisible(args[0] * gw, 8)
    if c2 > MAX_CHANNELS:
        raise _fail(f"{where} has {c2} channels after width_multiple (at most {MAX_CHANNELS})")
    rest = args[1:]
    if name == "Conv":
        if len(rest) > 4:
            raise _fail(f"{where} Conv 'args' must be [c2, k, s, p, g], got {len(args)} values")
        k, s, p, g = (list(rest) + [1, 1, None, 1][len(rest):])[:4]
        if not _is_int(k) or not 1 <= k <= 11:
            raise _fail(f"{where} Conv kernel size must be an integer in 1..11, got {k!r}")
        if not _is_int(s) or not 1 <= s <= 4:
            raise _fail(f"{where} Conv stride must be an integer in 1..4, got {s!r}")
        if p is not None and (not _is_int(p) or not 0 <= p <= k):
            raise _fail(f"{where} Conv padding must be None or an integer in 0..{k}, got {p!r}")
        if not _is_int(g) or g < 1 or c1 % g or c2 % g:
            raise _fail(f"{where} Conv groups must be a positive integer dividing {c1} and {c2}, got {g!r}")
        return c2, s_in / s, n * (c1 * c2 * k * k // g + 2 * c2)
    if name == "SPPF":
        if len(rest) > 1 or (rest and (not _is_int(rest[0]) or not 1 <= rest[0] <= 13 or rest[0] % 2 == 0)):
            raise _fail(f"{where} SPPF 'args' must be [c2, odd pool size 1..13], got {args!r:.80}")
        c_ = c1 // 2
        return c2, s_in, c1 * c_ + 4 * c_ * c2
    # Bottleneck [c2, shortcut, g, e] / C3 [c2, shortcut, g, e]
    if len(rest) > 3:
        raise _fail(f"{where} {name} 'args' must be [c2, shortcut, g, e], got {len(args)} values")
    shortcut, g, e = (list(rest) + [True, 1, 0.5][len(rest):])[:3]
    if not isinstance(shortcut, bool):
        raise _fail(f"{where} {name} shortcut must be true/false, got {shortcut!r}")
    if not _is_num(e) or not 0 < e <= 4:
        raise _fail(f"{where} {name} expansion e must be a number in (0, 4], got {e!r}")
    c_ = int(c2 * e)
    if c_ < 1 or not _is_int(g) or g < 1 or c_ % g or c2 % g:
        raise _fail(f"{where} {name} groups must be a positive integer dividing the hidden channels, got {g!r}")
    if name == "Bottleneck":
        return c2, s_in, n * (c1 * c_ + 9 * c_ * c2 // g)
    return c2, s_in, 2 * c1 * c_ + 2 * c_ * c2 + n * (c_ * c_ + 9 * c_ * c_ // g)
