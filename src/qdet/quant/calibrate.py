"""Phases as exception-safe context managers, and the one calibration loop for every model.

    with calibration_mode(qmodel):        # observers on, fake-quant off
        for batch in batches: qmodel(transform_fn(batch))
    finalize(qmodel)                      # ranges → scale / zero point (errors name the layer)

    with quantization_disabled(qmodel):   # the same graph, run in float (paired analysis)
        qmodel(x)
"""
from __future__ import annotations

import itertools
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from qdet.errors import CalibrationError
from qdet.quant.qparams import compute_qparams
from qdet.quant.quantizer import CastQuantizer, QuantConv2d, QuantLinear, Quantizer, TiedQuantizer


def quantizers(model: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    """All calibrated/calibratable quantizers (weights and activations) of a model."""
    for name, m in model.named_modules():
        if isinstance(m, Quantizer):
            yield name, m


def activation_quantizers(model: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    for name, q in quantizers(model):
        if not name.endswith("weight_quant"):
            yield name, q


@contextmanager
def calibration_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Observers record activation ranges; fake-quant is off, so they see float activations."""
    saved = [(q, q.observing, q.enabled) for _, q in activation_quantizers(model)]
    was_training = model.training
    model.eval()
    try:
        for q, _, _ in saved:
            if q.observer is not None:
                q.observing, q.enabled = True, False
        yield model
    finally:
        for q, observing, enabled in saved:
            q.observing, q.enabled = observing, enabled
        model.train(was_training)


@contextmanager
def quantization_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the prepared model in float (BN still folded): the paired reference for analysis."""
    mods = [m for m in model.modules() if isinstance(m, (Quantizer, TiedQuantizer, CastQuantizer))]
    saved = [m.enabled for m in mods]
    try:
        for m in mods:
            m.enabled = False
        yield model
    finally:
        for m, enabled in zip(mods, saved):
            m.enabled = enabled


def default_transform(batch: Any) -> Any:
    """(images, labels) → images; a tensor stays itself."""
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    return batch


def run_batches(
    model: nn.Module,
    data: Iterable[Any],
    transform_fn: Callable[[Any], Any] = default_transform,
    *,
    num_batches: int | None = None,
    progress: bool = True,
    desc: str = "calibrating",
) -> int:
    """Feed `num_batches` (default: all) batches through `model`; returns how many ran."""
    it: Iterable[Any] = itertools.islice(data, num_batches) if num_batches is not None else data
    total = num_batches if num_batches is not None else _len_or_none(data)
    count = 0
    with torch.no_grad():
        for batch in tqdm(it, total=total, desc=desc, disable=not progress, leave=False):
            inputs = transform_fn(batch)
            model(*inputs) if isinstance(inputs, tuple) else model(inputs)
            count += 1
    return count


def _len_or_none(data: Iterable[Any]) -> int | None:
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None


def calibrate(
    model: nn.Module,
    data: Iterable[Any],
    transform_fn: Callable[[Any], Any] = default_transform,
    *,
    num_batches: int | None = None,
    progress: bool = True,
) -> int:
    """Observe `data` and compute every activation quantizer's qparams. Returns the batch count."""
    with calibration_mode(model):
        count = run_batches(model, data, transform_fn, num_batches=num_batches, progress=progress)
    if count == 0:
        raise CalibrationError("the calibration set is empty: no batch reached the model")
    finalize(model)
    return count


def finalize(model: nn.Module) -> None:
    for _, q in activation_quantizers(model):
        q.finalize()
    for gm in (m for m in model.modules() if isinstance(m, fx.GraphModule)):
        fit_biases_in_int32(gm)


INT32_MAX = 2**31 - 1


def fit_biases_in_int32(gm: fx.GraphModule) -> list[str]:
    """Widen input scales so that every conv/linear bias fits int32 as round(b / (s_x·s_w)).

    Integer kernels add the bias to the int32 accumulator on the s_x·s_w grid. A (near-)dead input
    gives a tiny s_x and the bias overflows; saturating it would change the output (runtimes do
    exactly that), so the input grid is coarsened instead: its values are ~0 anyway. Returns the
    names of the widened quantizers.
    """
    widened: list[str] = []
    for node in gm.graph.nodes:
        mod = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if not isinstance(mod, (QuantConv2d, QuantLinear)) or mod.bias is None or not node.args:
            continue
        wq = getattr(mod, "weight_quant", None)
        q = _grid_source(gm, node.args[0])
        if not isinstance(wq, Quantizer) or q is None or q.spec.axis is not None or not q.calibrated:
            continue
        needed = float((mod.bias.detach().abs() / (wq.scale * (INT32_MAX / 2))).max())  # 2x headroom
        if needed > float(q.scale):
            lo = float(q.scale) * (q.spec.qmin - int(q.zero_point))
            hi = float(q.scale) * (q.spec.qmax - int(q.zero_point))
            grow = needed / float(q.scale)
            q.set_qparams(*compute_qparams(torch.tensor(lo * grow), torch.tensor(hi * grow), q.spec.qmin, q.spec.qmax,
                                           symmetric=q.spec.symmetric))
            widened.append(q.layer_name)
    return widened


def _grid_source(gm: fx.GraphModule, arg: Any) -> Quantizer | None:
    """The Quantizer whose grid the value `arg` is on (through tied quantizers), if any."""
    if not isinstance(arg, fx.Node) or arg.op != "call_module":
        return None
    mod = gm.get_submodule(str(arg.target))
    if isinstance(mod, TiedQuantizer):
        mod = mod.source
    return mod if isinstance(mod, Quantizer) else None
