"""Save and load quantized models as `.qdet` files: safetensors + JSON metadata, no pickle.

The file holds int8 weight codes (with their scales), int32/float buffers, the QuantConfig, the
region input shapes, and the measured numbers (numbers travel with the artefact). Loading rebuilds
the float architecture (from the model registry, or a skeleton you pass), re-prepares it with the
saved config and fills in the tensors; nothing is executed from the file.

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

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdet.config import QuantConfig
from qdet.errors import WeightsError
from qdet.fileio import write_atomically
from qdet.qmodel import QuantizedModel, RegionSpec, build_quantized_from_shapes, declared_leaves
from qdet.quant.calibrate import quantizers
from qdet.quant.qparams import dequantize
from qdet.quant.quantizer import Quantizer, weight_codes

FORMAT = "qdet/1"


def _int_weight_names(qm: QuantizedModel) -> dict[str, Quantizer]:
    """weight tensor name → its 8-bit-or-less quantizer (stored as int8 codes)."""
    out: dict[str, Quantizer] = {}
    for name, q in quantizers(qm.model):
        if name.endswith("weight_quant") and q.calibrated and q.spec.bits <= 8:
            out[name[: -len("weight_quant")] + "weight"] = q
    return out


def save(qm: QuantizedModel, path: str | Path) -> Path:
    """Write `qm` to `path` atomically; returns the path."""
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
    return write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a .qdet file (config, metrics, ...) without loading tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"quantized model file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as exc:
        raise WeightsError(f"{str(path)!r} is not a readable .qdet file ({exc})") from None
    if raw.get("format") != FORMAT:
        raise WeightsError(f"{str(path)!r} is not a {FORMAT} file (format={raw.get('format')!r})")
    out: dict[str, Any] = dict(raw)
    for key in ("config", "regions", "input_shapes", "int_weights", "metrics"):
        out[key] = json.loads(raw[key])
    out["input_structures"] = json.loads(raw.get("input_structures", "{}"))
    out["calibration_batches"] = int(raw.get("calibration_batches", 0))
    return out


def load(
    path: str | Path,
    model: nn.Module | None = None,
    *,
    leaf_modules: dict[str, tuple[type[nn.Module], ...]] | None = None,
) -> QuantizedModel:
    """Rebuild a QuantizedModel from `path`.

    `model` is the float architecture (weights are overwritten); when omitted, the model registry
    builds it from the saved model name.
    """
    from safetensors import safe_open

    meta = read_metadata(path)
    if model is None:
        from qdet.models import REGISTRY

        adapter = REGISTRY.get(meta["model_name"])
        model = adapter.build(None)
        leaf_modules = leaf_modules or {r.path: r.leaf_modules for r in adapter.regions(model)}
    leaf_modules = leaf_modules or {}
    cfg = QuantConfig.from_dict(meta["config"])
    regions = [RegionSpec(p, tuple(declared_leaves(leaf_modules, p))) for p in meta["regions"]]
    qm = build_quantized_from_shapes(model, regions, cfg, meta["input_shapes"], model_name=meta["model_name"],
                                     input_structures=meta["input_structures"])
    int_weights = set(meta["int_weights"])
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for name in int_weights:
        q = qm.model.get_submodule(name[: -len("weight")] + "weight_quant")
        scale, zp = tensors[name[: -len("weight")] + "weight_quant.scale"], tensors[name[: -len("weight")] + "weight_quant.zero_point"]
        tensors[name] = dequantize(tensors[name].to(torch.int32), scale, zp, q.spec.axis)
    try:
        qm.model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise WeightsError(f"{str(path)!r} does not fit {type(model).__name__}: {' '.join(first)}") from None
    for _, q in quantizers(qm.model):
        q.observer, q.observing, q.calibrated = None, False, True
    qm.metrics = meta["metrics"]
    qm.calibration_batches = meta["calibration_batches"]
    return qm


def file_size_mb(path: str | Path) -> float:
    return Path(path).stat().st_size / 1e6
