"""`qdet quantize --model-file ...`: any user model through the generic path, float vs int8 side by side.

The model is quantized with `qdet.quantize(model, batches, cfg)` and no adapter (one whole-model
region), lowered to the chosen runtime, and compared with its float self on the same inputs:

* a labeled image folder (root/<class>/<image>) and classifier-shaped outputs (B, K): top-1
  (and top-5) accuracy on the images not used for calibration;
* always: top-1 agreement with the float model's argmax (classifier-shaped outputs) and the SQNR
  (dB) of every output tensor against the float PyTorch model — the only numbers for unlabeled
  folders and for synthetic data (seeded noise images, labeled "synthetic" in every row and field).
"""
from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.data import Dataset

from qdet import api
from qdet.bench.latency import torch_threads
from qdet.config import QuantConfig
from qdet.coverage import coverage, warn_if_runtime_float
from qdet.data.folders import make_loader, seeded_split, seeded_subset
from qdet.errors import ConfigError, ModelError
from qdet.jobs import JobOptions, JobResult, _saved_size, _state_dict_size, timing_input
from qdet.qmodel import QuantizedModel
from qdet.user_data import (
    DEFAULT_INPUT_SIZE,
    FolderImages,
    SyntheticImages,
    parse_input_size,
    parse_preprocess,
)
from qdet.user_model import (
    ModelFile,
    check_outputs,
    load_model,
    model_input_shape,
)

SYNTHETIC_EVAL_IMAGES = 64  # evaluation images when there is no --data (seeded, disjoint from calibration)
SQNR_CAP_DB = 300.0  # identical outputs


@dataclass(frozen=True)
class UserInputs:
    """Calibration and evaluation sets of a user model, and how to describe them."""

    calib: Dataset[Any]
    eval: Dataset[Any]
    data: str  # "synthetic", "held-out images", "calibration images", printed in every row
    description: str
    labeled: bool
    batch: int | None  # a batch size the model was exported with, else None
    classes: tuple[str, ...] = ()  # class folder names of a labeled folder


def labels_fit(inputs: UserInputs, out: Any) -> UserInputs:
    """Keep the folder's labels only when they can be the model's class indices: classifier-shaped
    outputs (B, K) and either K class folders, or folders named by their class index (all < K).
    Otherwise accuracy would be measured against the wrong classes: agreement with float only."""
    from dataclasses import replace

    if not inputs.labeled:
        return inputs
    logits = _classifier_logits(out)
    n = len(inputs.classes)
    if logits is None:
        why = "the model's output is not (batch, classes) logits"
    elif n == logits.shape[1] or (all(c.isdigit() for c in inputs.classes)
                                  and max(int(c) for c in inputs.classes) < logits.shape[1]):
        return inputs
    else:
        why = (f"{n} class folders vs {logits.shape[1]} model outputs (name the folders by class index, 0, 1, ..., "
               f"to get accuracy)")
    return replace(inputs, labeled=False,
                   description=inputs.description.replace(f"labeled ({n} classes)", f"labels not used: {why}"))


def user_inputs(spec: ModelFile, *, input_size: str | None, preprocess: str | None, data: str | None,
                opts: JobOptions) -> UserInputs:
    """Parse `--input-size` / `--preprocess` and build the seeded calibration and evaluation sets."""
    size = parse_input_size(input_size) if input_size is not None else None
    batch = None
    found = model_input_shape(spec)  # a .pt2 / .onnx file knows the shape it was exported for
    if found is not None:
        batch, shape = found
        if size is not None and tuple(size) != tuple(shape):
            raise ConfigError(f"--input-size {input_size}: {spec.path} was exported for inputs of shape "
                              f"{','.join(map(str, shape))}")
        if len(shape) != 3:
            raise ConfigError(f"--model-file {str(spec.path)!r}: exported for {len(shape) + 1}-D inputs; "
                              f"qdet feeds images (N, C, H, W)")
        size = shape  # type: ignore[assignment]
    size = size or DEFAULT_INPUT_SIZE
    prep = parse_preprocess(preprocess, channels=size[0])
    if data is None:
        n_eval = opts.eval_images or SYNTHETIC_EVAL_IMAGES
        calib = SyntheticImages(opts.calib_images, size, prep, seed=opts.seed)
        evalset = SyntheticImages(n_eval, size, prep, seed=opts.seed + 1)
        return UserInputs(calib, evalset, "synthetic",
                          f"synthetic: seeded uniform-noise images {tuple(size)} (seed {opts.seed}), "
                          f"{len(calib)} calibration + {len(evalset)} evaluation; agreement with float only, "
                          f"no accuracy", labeled=False, batch=batch)
    folder = FolderImages(data, size, prep)
    inputs_labeled = folder.labeled
    n = len(folder)
    if n > opts.calib_images:
        calib, rest = seeded_split(folder, opts.calib_images, seed=opts.seed)
        if opts.eval_images is not None and opts.eval_images < len(rest):
            rest = seeded_subset(rest, opts.eval_images, seed=opts.seed + 1)
        kind = "held-out images"
    else:
        calib = rest = folder  # too few images to hold some out: say so in every row
        kind = "calibration images"
    label = (f"labeled ({len(folder.classes)} classes)" if folder.labeled else "unlabeled: agreement with float only")
    return UserInputs(calib, rest, kind,
                      f"{data}: {n} images, {label}; {len(calib)} calibrate, {len(rest)} evaluate ({kind})",
                      labeled=inputs_labeled, batch=batch, classes=tuple(folder.classes))


def user_quantize_job(spec: ModelFile, cfg: QuantConfig, opts: JobOptions, *, input_size: str | None = None,
                      preprocess: str | None = None) -> tuple[JobResult, QuantizedModel]:
    """Load, probe, quantize, lower and compare a user model; returns the table and the int8 model."""
    inputs = user_inputs(spec, input_size=input_size, preprocess=preprocess, data=opts.data, opts=opts)
    model = load_model(spec)
    batch = inputs.batch or opts.calib_batch
    calib = make_loader(inputs.calib, batch, drop_last=inputs.batch is not None and len(inputs.calib) >= batch)
    first = next(iter(calib))[0]
    probe = check_outputs(model, first[: inputs.batch or 2], spec.label)
    inputs = labels_fit(inputs, probe)
    flat = ("note: the float model's outputs hardly vary across inputs (std < 1e-6; random weights?): agreement "
            "and SQNR compare noise-level numbers and say little")
    notes = [] if _varies(probe) else [flat]
    torch.manual_seed(opts.seed)
    t0 = time.perf_counter()
    try:
        qm = api.quantize(model, calib, cfg, progress=opts.progress)
    except ConfigError as exc:
        raise ConfigError(f"--model-file {spec.label!r}: {exc}") from None
    quant_s = time.perf_counter() - t0
    qm.model_name = spec.run_name
    lowered_q = api.lower(qm, opts.runtime, threads=opts.threads)
    lowered_f = api.lower(qm, opts.runtime, quantized=False, threads=opts.threads)
    candidates: dict[str, tuple[str, Callable[..., Any]]] = {
        "float (PyTorch eager)": ("torch", model),
        f"float ({opts.runtime})": (opts.runtime, lowered_f),
        f"int8 ({opts.runtime})": (opts.runtime, lowered_q),
    }
    eval_loader = make_loader(inputs.eval, inputs.batch or 64,
                              drop_last=inputs.batch is not None and len(inputs.eval) >= inputs.batch)
    with torch_threads(opts.threads):
        rows = compare_outputs(candidates, eval_loader, inputs, progress=opts.progress)
    _add_sizes(rows, model, lowered_f, lowered_q, qm, opts.runtime)
    if opts.bench:
        _add_latency(rows, candidates, timing_input(next(iter(calib)), inputs.batch or 1), opts)
    cov = coverage(qm)
    warn_if_runtime_float(cov.add_runtime(lowered_q))  # what the runtime really executes in int8
    meta = {
        "model": spec.run_name, "model_file": str(spec.path), "function": spec.function, "data": inputs.data,
        "data_description": inputs.description, "synthetic": inputs.data == "synthetic",
        "labeled": inputs.labeled, "input_size": list(_sample_shape(first)), "config": cfg.to_dict(),
        "calibration_images": len(inputs.calib), "calibration_batches": qm.calibration_batches,
        "eval_images": len(inputs.eval), "threads": opts.threads, "seed": opts.seed, "runtime": opts.runtime,
        "quantize_seconds": quant_s, "coverage": cov.as_dict(),
    }
    qm.metrics = {"rows": rows, **meta}
    metric_cols = [c for c in ("top1", "top5", "d_top1", "agree_top1", "sqnr_db") if any(c in r for r in rows)]
    cols = ["model", "data", *metric_cols, "size_mb"]
    if opts.bench:
        cols += ["latency_ms", "speedup_vs_eager", "speedup_vs_same_runtime_fp32"]
    what = "synthetic inputs" if inputs.data == "synthetic" else inputs.data
    title = (f"{spec.label}: float vs int8 ({len(inputs.eval)} {what}, {opts.threads} threads)"
             f"\ndata: {inputs.description}")
    meta["notes"] = notes
    return JobResult(title, rows, cols, meta, [cov.table(), *notes]), qm


def _varies(out: Any) -> bool:
    """Whether the float outputs differ across the inputs of a batch by more than noise (std >= 1e-6)."""
    leaves = [t for t in _leaves(out) if t.dim() >= 1 and t.shape[0] > 1]
    return not leaves or any(float(t.std(dim=0).max()) >= 1e-6 for t in leaves)


def _sample_shape(batch: Any) -> tuple[int, ...]:
    return tuple(batch.shape[1:]) if isinstance(batch, torch.Tensor) else ()


def _leaves(out: Any) -> list[torch.Tensor]:
    return [t.detach().float() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)
            and t.is_floating_point()]


def _classifier_logits(out: Any) -> torch.Tensor | None:
    """The (B, K) logits of a classifier-shaped output (one 2-D tensor with K >= 2), else None."""
    leaves = _leaves(out)
    if len(leaves) == 1 and leaves[0].dim() == 2 and leaves[0].shape[1] >= 2:
        return leaves[0]
    return None


def compare_outputs(candidates: dict[str, tuple[str, Callable[..., Any]]], loader: Any, inputs: UserInputs, *,
                    progress: bool = True) -> list[dict[str, Any]]:
    """One row per candidate: accuracy (labeled, classifier-shaped), top-1 agreement with the first
    candidate (the float PyTorch model) and SQNR (dB) of all its output tensors against it."""
    from tqdm.auto import tqdm

    names = list(candidates)
    signal = 0.0
    noise = {n: 0.0 for n in names}
    agree = {n: 0 for n in names}
    correct = {n: [0, 0] for n in names}  # top-1, top-5
    seen = labeled_seen = 0
    classifier = True
    with torch.no_grad():
        for x, y in tqdm(loader, desc="float vs int8", disable=not progress, leave=False):
            ref_out = candidates[names[0]][1](x)
            ref = _leaves(ref_out)
            ref_logits = _classifier_logits(ref_out)
            classifier = classifier and ref_logits is not None
            signal += sum(float((r ** 2).sum()) for r in ref)
            has_labels = inputs.labeled and bool((y >= 0).all())
            if has_labels and ref_logits is not None and int(y.max()) >= ref_logits.shape[1]:
                raise ConfigError(f"--data: a class index {int(y.max())} is beyond the model's "
                                  f"{ref_logits.shape[1]} outputs")
            for name in names:
                out = ref_out if name == names[0] else candidates[name][1](x)
                leaves = _leaves(out)
                if len(leaves) != len(ref) or any(a.shape != b.shape for a, b in zip(leaves, ref)):
                    raise ModelError(f"{name}: outputs of shapes {[tuple(t.shape) for t in leaves]} differ from the "
                                     f"float model's {[tuple(t.shape) for t in ref]}")
                noise[name] += sum(float(((a - b) ** 2).sum()) for a, b in zip(leaves, ref))
                logits = _classifier_logits(out)
                if classifier and logits is not None:
                    agree[name] += int((logits.argmax(1) == ref_logits.argmax(1)).sum())
                    if has_labels:
                        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
                        correct[name][0] += int((top5[:, 0] == y).sum())
                        correct[name][1] += int((top5 == y[:, None]).any(1).sum())
            seen += len(x)
            labeled_seen += len(x) if has_labels else 0
    rows: list[dict[str, Any]] = []
    for name in names:
        row: dict[str, Any] = {"model": name, "runtime": candidates[name][0], "data": inputs.data}
        if classifier and inputs.labeled and labeled_seen == seen and seen:
            row["top1"] = 100.0 * correct[name][0] / seen
            row["top5"] = 100.0 * correct[name][1] / seen
        if classifier and seen:
            row["agree_top1"] = 100.0 * agree[name] / seen
        if name != names[0]:
            sqnr = SQNR_CAP_DB if noise[name] == 0 else 10 * math.log10(max(signal, 1e-30) / noise[name])
            row["sqnr_db"] = round(min(sqnr, SQNR_CAP_DB), 2)
        rows.append(row)
    if "top1" in rows[0]:
        for r in rows:
            r["d_top1"] = r["top1"] - rows[0]["top1"]
    return rows


def _add_sizes(rows: list[dict[str, Any]], model: nn.Module, lowered_f: Any, lowered_q: Any, qm: QuantizedModel,
               runtime: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {
            "float (PyTorch eager)": _state_dict_size(model, Path(tmp) / "f.safetensors"),
            f"float ({runtime})": _saved_size(lowered_f, Path(tmp) / "f"),
            f"int8 ({runtime})": _saved_size(lowered_q, Path(tmp) / "q"),
        }
        if runtime == "reference":  # the fake-quant simulation has no runtime file: the .qdet artefact
            sizes[f"int8 ({runtime})"] = api.save(qm, Path(tmp) / "q.qdet").stat().st_size / 1e6
    for r in rows:
        size = sizes.get(r["model"])
        r["size_mb"] = None if size is None else round(size, 4)


def _add_latency(rows: list[dict[str, Any]], candidates: dict[str, tuple[str, Callable[..., Any]]], x: Any,
                 opts: JobOptions) -> None:
    timed = api.benchmark({k: (rt, fn, None) for k, (rt, fn) in candidates.items()}, (x,), threads=opts.threads,
                          repeats=opts.repeats, progress=opts.progress)
    eager, same = timed[0].latency.median_ms, timed[1].latency.median_ms
    for r, t in zip(rows, timed):
        r["latency_ms"] = t.latency.median_ms
        r["speedup_vs_eager"] = eager / t.latency.median_ms
        if t.runtime == opts.runtime:
            r["speedup_vs_same_runtime_fp32"] = same / t.latency.median_ms
