"""Save and load quantized models as `.qdet` files: safetensors + JSON metadata, no pickle.

The file holds int8 weight codes (with their scales), int32/float buffers, the QuantConfig, the
region input shapes, and the measured numbers (numbers travel with the artefact). Loading rebuilds
the float architecture (from the model registry, or a skeleton you pass), re-prepares it with the
saved config and fills in the tensors; nothing is executed from the file.

Schema `qdet/2` (the metadata's `format`): every metadata value is a string (safetensors' rule);
`sha256` is the SHA-256 of the other metadata values and of every tensor (name, dtype, shape,
bytes), so a truncated or bit-flipped file is refused on load. `load` then checks the metadata
against the schema (types, ranges, a bound on every size the file could make qdet allocate) and
every tensor against the rebuilt model: names, shapes, dtypes, scales finite and > 0, zero points
and int weight codes inside their bit range. Any failure is one `WeightsError` naming the file,
the field and, where there is one, the layer. `qdet/1` files (no checksum) still load, with a
warning. A file written by a newer schema is refused with the advice to upgrade.

    >>> import tempfile, torch
    >>> from torch import nn
    >>> from qdet.qmodel import quantize
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    >>> qm = quantize(net, [torch.randn(1, 3, 8, 8)], progress=False)
    >>> path = save(qm, tempfile.mkdtemp() + "/m.qdet")
    >>> loaded = load(path, nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    >>> torch.equal(loaded(torch.ones(1, 3, 8, 8)), qm(torch.ones(1, 3, 8, 8)))
    True
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from qdet.config import (Format, LayerOverride, Observer, OverflowFix, PerChannel, PerTensor, QuantConfig, QuantSpec,
                         ResidualPolicy)
from qdet.errors import QdetError, WeightsError
from qdet.fileio import write_atomically
from qdet.qmodel import QuantizedModel, RegionSpec, build_quantized_from_shapes, declared_leaves
from qdet.quant.calibrate import quantizers
from qdet.quant.qparams import dequantize
from qdet.quant.quantizer import Quantizer, weight_codes

SCHEMA_VERSION = 2
FORMAT = f"qdet/{SCHEMA_VERSION}"
_FORMAT_RE = re.compile(r"qdet/(\d{1,6})")
_JSON_FIELDS = ("config", "regions", "input_shapes", "int_weights", "metrics")
# Bounds on what a file may make qdet allocate while rebuilding the model.
MAX_INPUT_ELEMENTS = 2**28  # per region input tensor (1 GiB of float32 zeros)
MAX_INPUT_DIMS = 8
MAX_BINS = 2**16  # histogram observer bins (one float64 histogram per quantizer)


def _int_weight_names(qm: QuantizedModel) -> dict[str, Quantizer]:
    """weight tensor name → its 8-bit-or-less quantizer (stored as int8 codes)."""
    out: dict[str, Quantizer] = {}
    for name, q in quantizers(qm.model):
        if name.endswith("weight_quant") and q.calibrated and q.spec.bits <= 8:
            out[name[: -len("weight_quant")] + "weight"] = q
    return out


def payload_sha256(meta: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of the metadata (without `sha256`) and of every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def save(qm: QuantizedModel, path: str | Path) -> Path:
    """Write `qm` to `path` atomically (a temporary file renamed into place); returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    state = qm.model.state_dict()
    int_weights = _int_weight_names(qm)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name in int_weights:
            q = int_weights[name]
            codes = weight_codes(tensor, q)
            tensors[name] = codes.to(torch.int8 if q.spec.signed else torch.uint8)
        else:
            tensors[name] = tensor.detach().contiguous().clone()
    meta = {
        "format": FORMAT,
        "model_name": qm.model_name,
        "config": qm.config.to_json(),
        "regions": json.dumps(list(qm.regions)),
        "input_shapes": json.dumps(qm.input_shapes),
        "input_structures": json.dumps(qm.input_structures),
        "int_weights": json.dumps(sorted(int_weights)),
        "metrics": json.dumps(qm.metrics, default=str),
        "calibration_batches": str(qm.calibration_batches),
    }
    cfg_text = getattr(qm.model, "cfg_text", None)  # a model built from a config file (Darknet .cfg): its text
    if cfg_text:
        meta["model_cfg"] = cfg_text
    meta["sha256"] = payload_sha256(meta, tensors)
    return write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


# ---------------------------------------------------------------- reading and verifying

def _bad(path: Path, what: str) -> WeightsError:
    return WeightsError(f"quantized model file {str(path)!r}: {what}")


def _looks_like_pickle(path: Path) -> bool:
    """A torch.save zip or a raw pickle stream (PROTO opcode 0x80 + protocol 2..5). A safetensors file
    starts with its header length (any low byte, 0x80 included) followed by the JSON header's '{'."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return False
    return head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


def _open(path: Path, *, with_tensors: bool) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Raw metadata and (optionally) tensors; a file safetensors cannot parse is corrupt or truncated."""
    from safetensors import safe_open

    if not path.is_file():
        raise WeightsError(f"quantized model file {str(path)!r} does not exist" if not path.exists()
                           else f"quantized model path {str(path)!r} is not a file")
    if _looks_like_pickle(path):
        raise _bad(path, "is a pickle (torch.save) file, not a .qdet file; qdet never unpickles a quantized model "
                         "because a pickle can run code. Write quantized models with qdet.save / `qdet quantize --out`")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()} if with_tensors else {}
    except Exception as exc:  # SafetensorError and friends: the header or the data does not parse
        text = " ".join(str(exc).split())[:160]
        raise _bad(path, f"is corrupt or truncated (not a readable safetensors file: {text})") from None
    return dict(raw), tensors


def _check_version(path: Path, raw: Mapping[str, str]) -> int:
    fmt = raw.get("format")
    m = _FORMAT_RE.fullmatch(fmt) if isinstance(fmt, str) else None
    if m is None:
        raise _bad(path, f"is not a .qdet file (metadata field 'format' is {fmt!r}, expected {FORMAT!r})")
    version = int(m.group(1))
    if version > SCHEMA_VERSION:
        raise _bad(path, f"was written by a newer qdet (schema {fmt}; this qdet reads up to {FORMAT}): upgrade qdet")
    if version < 1:
        raise _bad(path, f"has an unknown schema version {fmt!r}")
    return version


def _check_checksum(path: Path, raw: Mapping[str, str], tensors: Mapping[str, torch.Tensor], version: int) -> None:
    stored = raw.get("sha256")
    if version < 2 and stored is None:
        warnings.warn(f"{str(path)!r} is a {raw.get('format')} file without a checksum; re-save it to protect it",
                      stacklevel=3)
        return
    if not isinstance(stored, str) or not re.fullmatch(r"[0-9a-f]{64}", stored):
        raise _bad(path, "is corrupt or truncated (metadata field 'sha256' is missing or malformed)")
    if payload_sha256(raw, tensors) != stored:
        raise _bad(path, "is corrupt or truncated (SHA-256 of the payload does not match the one recorded at save)")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_spec(path: Path, spec: Any, where: str) -> None:
    if not isinstance(spec, QuantSpec):
        raise _bad(path, f"field 'config' {where} is not a QuantSpec")
    if not isinstance(spec.observer, Observer):
        raise _bad(path, f"field 'config' {where}.observer={spec.observer!r} is not an observer name")
    if not isinstance(spec.granularity, (PerTensor, PerChannel)):
        raise _bad(path, f"field 'config' {where}.granularity={spec.granularity!r:.40} is not PerTensor/PerChannel")
    if not _is_int(spec.bits) or not 2 <= spec.bits <= 16:
        raise _bad(path, f"field 'config' {where}.bits={spec.bits!r} is outside 2..16")
    for flag in ("signed", "symmetric", "narrow_range"):
        if not isinstance(getattr(spec, flag), bool):
            raise _bad(path, f"field 'config' {where}.{flag}={getattr(spec, flag)!r} is not true/false")
    if not _is_int(spec.bins) or not 1 <= spec.bins <= MAX_BINS:
        raise _bad(path, f"field 'config' {where}.bins={spec.bins!r} is outside 1..{MAX_BINS}")
    for name, lo, hi in (("percentile", 50.0, 100.0), ("averaging_constant", 0.0, 1.0)):
        v = getattr(spec, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo < v <= hi:
            raise _bad(path, f"field 'config' {where}.{name}={v!r} is outside ({lo:g}, {hi:g}]")
    axis = spec.axis
    if axis is not None and (not _is_int(axis) or not 0 <= axis < MAX_INPUT_DIMS):
        raise _bad(path, f"field 'config' {where}.granularity.axis={axis!r} is not a tensor axis")


def _parse_config(path: Path, data: Any) -> QuantConfig:
    if not isinstance(data, dict):
        raise _bad(path, "field 'config' is not a JSON object")
    try:
        cfg = QuantConfig.from_dict(data)
    except QdetError as exc:
        raise _bad(path, f"field 'config' is invalid: {exc}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as exc:  # unknown or mistyped dataclass fields
        raise _bad(path, f"field 'config' is invalid: {type(exc).__name__}: {exc}") from None
    _check_spec(path, cfg.activations, "activations")
    _check_spec(path, cfg.weights, "weights")
    if not all(isinstance(s, str) for s in cfg.skip):
        raise _bad(path, "field 'config' skip must be a list of layer names")
    for i, o in enumerate(cfg.overrides):
        if not isinstance(o, LayerOverride) or not isinstance(o.pattern, str):
            raise _bad(path, f"field 'config' overrides[{i}] is not a layer override with a pattern")
        for kind in ("weights", "activations"):
            if getattr(o, kind) is not None:
                _check_spec(path, getattr(o, kind), f"overrides[{i}].{kind}")
    if not isinstance(cfg.format, Format):
        raise _bad(path, f"field 'config' format={cfg.format!r} is not one of: {', '.join(f.value for f in Format)}")
    if not isinstance(cfg.residual, ResidualPolicy):
        raise _bad(path, f"field 'config' residual={cfg.residual!r} is not one of: "
                         f"{', '.join(r.value for r in ResidualPolicy)}")
    if cfg.overflow_fix is OverflowFix.AUTO:  # quantize stores what AUTO chose; the weights depend on it
        raise _bad(path, "field 'config' overflow_fix='auto' is not a decision (expected none, first_layer or all)")
    for flag in (f.name for f in dataclasses.fields(QuantConfig) if isinstance(f.default, bool)):
        if not isinstance(getattr(cfg, flag), bool):
            raise _bad(path, f"field 'config' {flag}={getattr(cfg, flag)!r} is not true/false")
    return cfg


def _parse_meta(path: Path, raw: Mapping[str, str]) -> dict[str, Any]:
    """The metadata as Python values, checked against the schema; every error names the field."""
    out: dict[str, Any] = dict(raw)
    for key in (*_JSON_FIELDS, "model_name"):
        if not isinstance(raw.get(key), str):
            raise _bad(path, f"metadata field {key!r} is missing")
    for key in (*_JSON_FIELDS, "input_structures"):
        try:
            out[key] = json.loads(raw.get(key, "{}"))
        except (ValueError, RecursionError):
            raise _bad(path, f"metadata field {key!r} is not valid JSON") from None
    out["config"] = _parse_config(path, out["config"])
    regions = out["regions"]
    if not isinstance(regions, list) or not all(isinstance(r, str) for r in regions) or len(set(regions)) != len(regions):
        raise _bad(path, "field 'regions' must be a list of distinct submodule paths")
    shapes = out["input_shapes"]
    if not isinstance(shapes, dict) or set(shapes) != set(regions):
        raise _bad(path, f"field 'input_shapes' must have one entry per region {regions}")
    for region, tensors in shapes.items():
        if not isinstance(tensors, list) or len(tensors) > 64:
            raise _bad(path, f"field 'input_shapes' of region {region!r} must be a list of at most 64 shapes")
        for shape in tensors:
            if (not isinstance(shape, list) or len(shape) > MAX_INPUT_DIMS
                    or not all(_is_int(d) and d >= 0 for d in shape)):
                raise _bad(path, f"field 'input_shapes' of region {region!r}: {shape!r} is not a shape of at most "
                                 f"{MAX_INPUT_DIMS} sizes >= 0")
            if math.prod(shape) > MAX_INPUT_ELEMENTS:
                raise _bad(path, f"field 'input_shapes' of region {region!r}: {shape} asks for {math.prod(shape):,} "
                                 f"elements (at most {MAX_INPUT_ELEMENTS:,})")
    structures = out["input_structures"]
    if not isinstance(structures, dict) or not all(k in shapes and isinstance(v, str) for k, v in structures.items()):
        raise _bad(path, "field 'input_structures' must map regions to input structure specs")
    int_weights = out["int_weights"]
    if not isinstance(int_weights, list) or not all(isinstance(n, str) and n.endswith("weight") for n in int_weights):
        raise _bad(path, "field 'int_weights' must be a list of weight tensor names")
    if not isinstance(out["metrics"], dict):
        raise _bad(path, "field 'metrics' is not a JSON object")
    calib = raw.get("calibration_batches", "0")
    if not re.fullmatch(r"\d{1,12}", str(calib)):
        raise _bad(path, f"field 'calibration_batches' {calib!r} is not a non-negative integer")
    out["calibration_batches"] = int(calib)
    return out


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a .qdet file (config, metrics, ...), schema-checked, without loading tensors."""
    path = Path(path)
    raw, _ = _open(path, with_tensors=False)
    _check_version(path, raw)
    return _parse_meta(path, raw)


def _read_verified(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    raw, tensors = _open(path, with_tensors=True)
    version = _check_version(path, raw)
    _check_checksum(path, raw, tensors, version)
    return _parse_meta(path, raw), tensors


def verify(path: str | Path) -> dict[str, Any]:
    """Check a .qdet file on its own (readable, schema version, checksum, metadata schema); its metadata.

    What needs the model (tensor names, shapes, qparam ranges) is checked by `load`. The CLI calls
    this before building anything, so a damaged `--qmodel` fails at once.
    """
    return _read_verified(Path(path))[0]


def _layer(name: str, q: Quantizer | None = None) -> str:
    if q is not None and q.layer_name:
        layer = q.layer_name.removesuffix(".weight")
    else:  # "conv.weight" → "conv", "conv.weight_quant.scale" → "conv"
        layer = name.rsplit(".", 1)[0].removesuffix(".weight_quant")
    return f"tensor {name!r} (layer {layer!r})"


def _check_tensors(path: Path, qm: QuantizedModel, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Every tensor against the rebuilt model: names, shapes, dtypes, finite values, qparams in range."""
    model_name = meta["model_name"] or type(qm.model).__name__
    expected = qm.model.state_dict()
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise _bad(path, f"{_layer(unknown[0])} does not exist in model {model_name!r}"
                         + (f" ({len(unknown)} unknown tensors)" if len(unknown) > 1 else ""))
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise _bad(path, f"lacks {_layer(missing[0])} of model {model_name!r}"
                         + (f" ({len(missing)} tensors missing)" if len(missing) > 1 else ""))
    quants = dict(quantizers(qm.model))
    int_weights = set(meta["int_weights"])
    for name in sorted(int_weights):
        qname = name[: -len("weight")] + "weight_quant"
        q = quants.get(qname)
        if name not in tensors or q is None or q.spec.bits > 8:
            raise _bad(path, f"field 'int_weights' lists {name!r}, which is not a weight with a <=8-bit quantizer "
                             f"in model {model_name!r} under the saved config")
        want = torch.int8 if q.spec.signed else torch.uint8
        codes = tensors[name]
        if codes.dtype != want:
            raise _bad(path, f"{_layer(name, q)} is {codes.dtype}, expected {want} codes for a {q.spec.bits}-bit weight")
    for name, t in tensors.items():
        ref = expected[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise _bad(path, f"{_layer(name)} has shape {tuple(t.shape)}, model {model_name!r} expects {tuple(ref.shape)}")
        if name not in int_weights and t.dtype != ref.dtype:
            hint = " (an int weight not listed in 'int_weights'?)" if not t.is_floating_point() and ref.is_floating_point() else ""
            raise _bad(path, f"{_layer(name)} is {t.dtype}, expected {ref.dtype}{hint}")
    for qname, q in quants.items():
        scale, zp = tensors[qname + ".scale"], tensors[qname + ".zero_point"]
        if not bool((scale > 0).all()):
            bad = float(scale.reshape(-1)[~(scale.reshape(-1) > 0)][0])
            raise _bad(path, f"{_layer(qname + '.scale', q)}: scales must be finite and > 0, found {bad:g}")
        lo, hi = q.spec.qmin, q.spec.qmax
        if zp.numel() and (int(zp.min()) < lo or int(zp.max()) > hi):
            raise _bad(path, f"{_layer(qname + '.zero_point', q)}: zero points must lie in {lo}..{hi} "
                             f"({q.spec.bits}-bit), found {int(zp.min())}..{int(zp.max())}")
        weight = qname[: -len("weight_quant")] + "weight" if qname.endswith("weight_quant") else None
        if weight in int_weights:
            codes = tensors[weight]
            if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
                raise _bad(path, f"{_layer(weight, q)}: int weight codes must lie in {lo}..{hi} ({q.spec.bits}-bit), "
                                 f"found {int(codes.min())}..{int(codes.max())}")
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise _bad(path, f"{_layer(name)} contains NaN or Inf")


def load(
    path: str | Path,
    model: nn.Module | None = None,
    *,
    leaf_modules: dict[str, tuple[type[nn.Module], ...]] | None = None,
) -> QuantizedModel:
    """Rebuild a QuantizedModel from `path`, verifying the file first (see the module docstring).

    `model` is the float architecture (weights are overwritten); when omitted, the model registry
    builds it from the saved model name.
    """
    path = Path(path)
    meta, tensors = _read_verified(path)
    if model is None:
        from qdet.models import REGISTRY

        try:
            adapter = REGISTRY.get(meta["model_name"])
        except QdetError as exc:
            raise _bad(path, f"field 'model_name': {exc}") from None
        model = adapter.build(None, **({"cfg_text": meta["model_cfg"]} if "model_cfg" in meta else {}))
        leaf_modules = leaf_modules or {r.path: r.leaf_modules for r in adapter.regions(model)}
    leaf_modules = leaf_modules or {}
    cfg = meta["config"]
    for region in meta["regions"]:
        try:
            model.get_submodule(region)
        except AttributeError:
            raise _bad(path, f"field 'regions': {region!r} is not a submodule of {type(model).__name__}") from None
    regions = [RegionSpec(p, tuple(declared_leaves(leaf_modules, p))) for p in meta["regions"]]
    try:
        qm = build_quantized_from_shapes(model, regions, cfg, meta["input_shapes"], model_name=meta["model_name"],
                                         input_structures=meta["input_structures"])
    except QdetError as exc:  # a skip pattern that matches nothing, an input shape the model cannot trace on...
        text = " ".join(str(exc).split())[:300]
        raise _bad(path, f"fields 'config'/'regions'/'input_shapes' do not fit {type(model).__name__}: {text}") from None
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as exc:  # shapes the model cannot run on
        text = " ".join(str(exc).split())[:200]
        raise _bad(path, f"fields 'input_shapes'/'input_structures' do not fit {type(model).__name__}: "
                         f"{type(exc).__name__}: {text}") from None
    _check_tensors(path, qm, meta, tensors)
    int_weights = set(meta["int_weights"])
    tensors = dict(tensors)
    for name in int_weights:
        qname = name[: -len("weight")] + "weight_quant"
        q = qm.model.get_submodule(qname)
        tensors[name] = dequantize(tensors[name].to(torch.int32), tensors[qname + ".scale"],
                                   tensors[qname + ".zero_point"], q.spec.axis)
    qm.model.load_state_dict(tensors, strict=True)  # names, shapes and dtypes were checked above
    for _, q in quantizers(qm.model):
        q.observer, q.observing, q.calibrated = None, False, True
    qm.metrics = meta["metrics"]
    qm.calibration_batches = meta["calibration_batches"]
    return qm


def file_size_mb(path: str | Path) -> float:
    return Path(path).stat().st_size / 1e6
