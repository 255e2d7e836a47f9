"""The verbs: quantize, evaluate, lower, benchmark, export, save/load — thin orchestration.

    >>> import qdet  # doctest: +SKIP
    >>> adapter = qdet.get_adapter("resnet56")  # doctest: +SKIP
    >>> model = adapter.build()  # doctest: +SKIP
    >>> calib = qdet.calibration_loader(adapter, images=512, seed=0)  # doctest: +SKIP
    >>> qm = qdet.quantize(model, calib, qdet.QuantConfig(), adapter=adapter)  # doctest: +SKIP
    >>> qdet.evaluate(qm, adapter).top1  # doctest: +SKIP
"""
from __future__ import annotations

import copy
import inspect
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from qdet import artifact
from qdet.bench.latency import Latency, measure_latencies
from qdet.config import QATConfig, QuantConfig, QuantSpec
from qdet.errors import ConfigError
from qdet.models.base import ModelAdapter, Task
from qdet.qmodel import (
    QuantizedModel,
    RegionSpec,
    build_quantized,
    example_runner,
    first_batch,
)
from qdet.qmodel import quantize as _quantize
from qdet.quant.calibrate import default_transform
from qdet.runtimes.base import get_runtime


def get_adapter(name: str) -> ModelAdapter:
    """The adapter registered under `name` (see `qdet list`)."""
    from qdet.models import REGISTRY

    return REGISTRY.get(name)


def quantize(
    model: nn.Module,
    calib_data: Iterable[Any],
    cfg: QuantConfig | None = None,
    *,
    adapter: ModelAdapter | None = None,
    transform_fn: Callable[[Any], Any] | None = None,
    num_batches: int | None = None,
    progress: bool = True,
) -> QuantizedModel:
    """Post-training quantization of `model` on `calib_data`; returns a new QuantizedModel.

    With an `adapter`, its regions (what is int8, where the float islands are) and its
    `transform_fn` (the inference preprocessing) are used; otherwise the whole model is one region.
    """
    regions, transform, name, calib_data = _adapter_setup(model, calib_data, adapter, transform_fn)
    return _quantize(
        model, calib_data, cfg, regions=regions, transform_fn=transform,
        num_batches=num_batches, model_name=name, progress=progress,
    )


def _adapter_setup(
    model: nn.Module, calib_data: Iterable[Any], adapter: ModelAdapter | None,
    transform_fn: Callable[[Any], Any] | None,
) -> tuple[Sequence[RegionSpec], Callable[[Any], Any], str, Iterable[Any]]:
    """Regions, preprocessing and name from `adapter` (one whole-model region without one), and the
    calibration data wrapped in the adapter's input-range check (mis-normalised data warns)."""
    if adapter is None:
        return (RegionSpec(),), transform_fn or default_transform, "", calib_data
    transform = transform_fn or adapter.transform_fn(model)
    expected = getattr(adapter, "input_range", None)
    if expected is not None:
        calib_data = _checked(calib_data, transform, expected, adapter.name)
    return list(adapter.regions(model)), transform, adapter.name, calib_data


def prepare_qat(
    model: nn.Module,
    calib_data: Iterable[Any],
    cfg: QuantConfig | None = None,
    *,
    qat: QATConfig | None = None,
    adapter: ModelAdapter | None = None,
    transform_fn: Callable[[Any], Any] | None = None,
    progress: bool = True,
) -> QuantizedModel:
    """A trainable fake-quant copy of `model` for quantization-aware training (in train mode).

    Conv-BN pairs become QATConvBn2d (BN folded into the fake-quantized weight at every forward),
    weights are re-quantized every step (straight-through gradients), activation ranges start from
    `qat.calibration_batches` batches of `calib_data` and then follow an EMA while training. Train
    it with `qdet.train.train_qat` or your own loop (call `QATSchedule.step()` after each step),
    then `convert` it. The float `model` is untouched.
    """
    import dataclasses
    import itertools

    from qdet.quant.calibrate import calibration_mode, run_batches
    from qdet.quant.qat import start_qat

    qat = qat or QATConfig()
    cfg = cfg or QuantConfig()
    assert isinstance(cfg.activations, QuantSpec)
    cfg = dataclasses.replace(cfg, activations=dataclasses.replace(cfg.activations, observer=qat.activation_observer))
    regions, transform, name, calib_data = _adapter_setup(model, calib_data, adapter, transform_fn)
    first, iterator = first_batch(calib_data, "QAT calibration set")
    qm = build_quantized(model, regions, cfg, example_runner(first, transform), model_name=name, qat=True)
    batches = itertools.chain([first], iterator)
    with calibration_mode(qm):
        qm.calibration_batches = run_batches(qm, batches, transform, num_batches=qat.calibration_batches,
                                             progress=progress, desc="QAT initial ranges")
    start_qat(qm)
    qm.qat_config = qat
    qm.train()
    return qm


def convert(qat_model: QuantizedModel) -> QuantizedModel:
    """The int8 QuantizedModel of a QAT-trained model: BN folded for good, weight qparams fixed
    from the trained weights, EMA ranges turned into qparams. Same structure as `quantize` gives,
    so it saves, loads and lowers to every runtime. `qat_model` is untouched."""
    from qdet.quant.qat import convert_qat

    qm = copy.deepcopy(qat_model)
    convert_qat(qm)
    qm.eval()
    return qm


def check_input_range(x: torch.Tensor, expected: tuple[float, float], model_name: str) -> str | None:
    """A warning text when a calibration batch does not look like the model's preprocessing.

    Seed 003: SSD calibrated on [0, 1] images while inference fed ImageNet-normalised ones
    collapsed from 0.253 to 0.107 mAP. A batch covering under half of the expected span, or
    reaching 10 % beyond it, is flagged.
    """
    lo, hi = float(x.min()), float(x.max())
    e_lo, e_hi = expected
    span = e_hi - e_lo
    if (hi - lo) < 0.5 * span or lo < e_lo - 0.1 * span or hi > e_hi + 0.1 * span:
        return (f"calibration inputs span [{lo:.3g}, {hi:.3g}] but {model_name} expects about "
                f"[{e_lo:.3g}, {e_hi:.3g}]: is the calibration data preprocessed like inference data?")
    return None


def _checked(data: Iterable[Any], transform_fn: Callable[[Any], Any], expected: tuple[float, float], name: str) -> Iterable[Any]:
    import itertools
    import warnings

    it = iter(data)
    first = next(it, None)
    if first is None:
        return []
    x = transform_fn(first)
    if isinstance(x, torch.Tensor):
        message = check_input_range(x, expected, name)
        if message:
            warnings.warn(message, stacklevel=4)
    return itertools.chain([first], it)


def lower(qmodel: QuantizedModel, runtime: str = "onnxruntime", *, quantized: bool = True, threads: int | None = None,
          whole_graph: bool = False, nms: Any = None, adapter: ModelAdapter | None = None) -> nn.Module:
    """Run `qmodel` on a runtime; `quantized=False` gives the float baseline on that runtime.

    whole_graph=True (detectors; openvino and onnxruntime): the int8 regions, decode, score filter
    and NMS as ONE exported graph, one runtime call per batch (`qdet.runtimes.whole_graph`); `nms`
    (a `NmsSettings`) overrides the adapter's evaluation thresholds; `adapter` defaults to the one
    registered under `qmodel.model_name`. The default (False) runs the float islands in PyTorch.
    """
    rt = get_runtime(runtime, threads=threads)
    if not whole_graph:
        if nms is not None:
            raise ConfigError("nms= applies to whole_graph=True only (the island path takes thresholds at evaluation)")
        return rt.lower(qmodel, quantized=quantized)
    from qdet.runtimes.whole_graph import lower_whole_graph

    if adapter is None:
        if not qmodel.model_name:
            raise ConfigError("whole_graph=True needs the model's adapter: pass adapter= (the QuantizedModel has no model name)")
        adapter = get_adapter(qmodel.model_name)
    return lower_whole_graph(qmodel, rt, adapter, quantized=quantized, nms=nms)


def evaluate(model: nn.Module | Callable[..., Any], adapter: Any, data: Any = None, *, progress: bool = True,
             batch_size: int = 256, desc: str | None = None) -> Any:
    """Evaluate any runnable (float model, QuantizedModel, lowered runtime model) with the adapter's metric.

    `desc` names what runs on the progress bar (e.g. "int8 (openvino)"); the bar adds what is counted.

    Classification: top-1/top-5 over `data` (a Dataset; default the adapter's evaluation set).
    """
    if adapter.task is Task.CLASSIFICATION:
        from qdet.data.folders import make_loader
        from qdet.eval.classification import evaluate_topk

        dataset = data if data is not None else adapter.eval_dataset()
        return evaluate_topk(model, make_loader(dataset, batch_size), progress=progress,
                             desc=f"{desc or adapter.name}: top-1, {len(dataset)} images")
    evaluate_detection = getattr(adapter, "evaluate", None)
    if evaluate_detection is None:
        raise ConfigError(f"model {adapter.name!r} has no evaluation defined")
    if desc is not None and "desc" in inspect.signature(evaluate_detection).parameters:
        return evaluate_detection(model, data, progress=progress, desc=desc)
    return evaluate_detection(model, data, progress=progress)


@dataclass(frozen=True)
class BenchRow:
    """One model on one runtime: size on disk and latency."""

    name: str
    runtime: str
    size_mb: float | None
    latency: Latency

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("latency"))
        return d


def benchmark(
    models: Mapping[str, tuple[str, nn.Module | Callable[..., Any], float | None]],
    inputs: tuple[Any, ...],
    *,
    threads: int = 2,
    warmup: int = 3,
    repeats: int = 20,
    progress: bool = True,
) -> list[BenchRow]:
    """Time each model on the same `inputs` with the same thread count, in one run, round-robin
    (each repeat calls every model once), so load changes on a shared machine hit all of them alike.

    `models`: label → (runtime name, callable, size in MB or None).
    """
    calls = {label: (lambda fn=fn: fn(*inputs)) for label, (_, fn, _) in models.items()}
    lat = measure_latencies(calls, threads=threads, warmup=warmup, repeats=repeats, progress=progress,
                            desc=f"timing {len(calls)} models")
    return [BenchRow(label, runtime, size, lat[label]) for label, (runtime, _, size) in models.items()]


def export_onnx(qmodel: QuantizedModel, path: str | Path, *, quantized: bool = True) -> Path:
    """Write the (single-region) quantized model as a QDQ ONNX file carrying qdet's scales."""
    if list(qmodel.regions) != [""]:
        raise ConfigError("ONNX export of a whole file needs a single whole-model region; lower() detectors instead")
    lowered = lower(qmodel, "onnxruntime", quantized=quantized)
    return lowered.save(path)  # type: ignore[operator]


def onnx_size_mb(qmodel: QuantizedModel, *, quantized: bool) -> float:
    """Size on disk of the model's ONNX file (int8 QDQ or fp32), measured by writing it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(qmodel, Path(tmp) / "m.onnx", quantized=quantized)
        return path.stat().st_size / 1e6


save = artifact.save
load = artifact.load
