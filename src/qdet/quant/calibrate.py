"""Phases as exception-safe context managers, and the one calibration loop for every model.

    with calibration_mode(qmodel):        # observers on, fake-quant off
        for batch in batches: qmodel(transform_fn(batch))
    finalize(qmodel)                      # ranges → scale / zero point (errors name the layer)

    with quantization_disabled(qmodel):   # the same graph, run in float (paired analysis)
        qmodel(x)
"""
from __future__ import annotations

import itertools
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from qdet.errors import CalibrationError
from qdet.quant.bias_correction import correct_biases, input_means
from qdet.quant.outliers import SamplePeaks
from qdet.quant.outliers import summary as outlier_summary
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
    total: int | None = None,
) -> int:
    """Feed `num_batches` (default: all) batches through `model`; returns how many ran.

    The progress bar counts batches out of `total` (default: `num_batches`, else len(data))."""
    it: Iterable[Any] = itertools.islice(data, num_batches) if num_batches is not None else data
    if total is None:
        total = num_batches if num_batches is not None else len_or_none(data)
    count = 0
    tally = DegenerateImages()
    with torch.no_grad():
        for batch in tqdm(it, total=total, desc=desc, disable=not progress, leave=False):
            inputs = transform_fn(batch)
            tally.add(inputs[0] if isinstance(inputs, tuple) and inputs else inputs)
            model(*inputs) if isinstance(inputs, tuple) else model(inputs)
            count += 1
    tally.warn("calibration" if desc.startswith("calibrating") else desc)
    return count


class DegenerateImages:
    """Counts image-batch rows (B, C, H, W) that are NaN/Inf or constant, and warns once at the end.

    A decoded image cannot hold NaN, but a preprocessing step or a user's dataset can; a constant
    image (all one colour) teaches the observers nothing and is usually a decoding or export mistake.

        >>> import warnings
        >>> t = DegenerateImages(); t.add(torch.zeros(2, 3, 4, 4))
        >>> with warnings.catch_warnings(record=True) as w:
        ...     warnings.simplefilter("always"); t.warn("evaluation")
        >>> str(w[0].message)
        '2 of 2 evaluation images are constant (one value everywhere): is the data decoded and preprocessed correctly?'
    """

    def __init__(self) -> None:
        self.n = self.nonfinite = self.constant = 0

    def add(self, x: Any) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point() or x.numel() == 0:
            return
        flat = x.detach().reshape(x.shape[0], -1)
        finite = torch.isfinite(flat).all(1)
        self.n += x.shape[0]
        self.nonfinite += int((~finite).sum())
        self.constant += int((finite & (flat.amax(1) == flat.amin(1))).sum())

    def warn(self, what: str) -> None:
        import warnings

        if self.nonfinite:
            warnings.warn(f"{self.nonfinite} of {self.n} {what} images contain NaN or Inf: results computed on "
                          "them are not meaningful", stacklevel=3)
        if self.constant:
            warnings.warn(f"{self.constant} of {self.n} {what} images are constant (one value everywhere): is the "
                          "data decoded and preprocessed correctly?", stacklevel=3)


def len_or_none(data: Iterable[Any]) -> int | None:
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
    total: int | None = None,
    bias_correction: bool = False,
) -> int:
    """Observe `data` and compute every activation quantizer's qparams. Returns the batch count.

    With `bias_correction`, each conv/linear's bias also absorbs the mean shift its weight rounding
    causes on these inputs (`qdet.quant.bias_correction`)."""
    with calibration_mode(model), (input_means(model) if bias_correction else nullcontext({})) as means, \
            SamplePeaks(model, activation_quantizers(model)) as peaks:
        count = run_batches(model, data, transform_fn, num_batches=num_batches, progress=progress,
                            desc="calibrating (batches)", total=total)
    if count == 0:
        raise CalibrationError("the calibration set is empty: no batch reached the model")
    outliers = peaks.findings()
    if outliers:
        peaks.warn(outliers)
        metrics = getattr(model, "metrics", None)  # a QuantizedModel keeps them for reports
        if isinstance(metrics, dict):
            metrics["calibration_outliers"] = outlier_summary(outliers)
    correct_biases(means)
    finalize(model)
    return count


def finalize(model: nn.Module) -> None:
    for _, q in activation_quantizers(model):
        q.finalize()
    for gm in (m for m in model.modules() if isinstance(m, fx.GraphModule)):
        fit_biases_in_int32(gm)


INT32_MAX = 2**31 - 1


def fit_biases_in_int32(gm: fx.GraphModule) -> list[str]:
    """Make every conv/linear bias fit int32 as round(b / (s_x·s_w)); returns what was changed.

    Integer kernels add the bias to the int32 accumulator on the s_x·s_w grid. A BN-folded channel
    whose weights are ~0 (its scale clamped to the minimum) but whose bias is O(1) would overflow;
    saturating it would change the output (runtimes do exactly that). With per-channel weights the
    fix is local: raise *that channel's* weight scale until its bias fits (with 2x headroom) — its
    weights are ~0, so they lose nothing that mattered. Widening the per-tensor *input* grid
    instead coarsens every channel of the layer (on a depthwise classifier it cost 10.8 points of
    top-1). The input grid is widened only when the weight scale cannot move: per-tensor weights
    (one scale for all channels) or a QAT weight quantizer recomputed from the weights every step.
    Returns the names of the changed quantizers ("<layer>.weight" or the input quantizer's name).
    """
    changed: list[str] = []
    for node in gm.graph.nodes:
        mod = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if not isinstance(mod, (QuantConv2d, QuantLinear)) or mod.bias is None or not node.args:
            continue
        wq = getattr(mod, "weight_quant", None)
        q = _grid_source(gm, node.args[0])
        if not isinstance(wq, Quantizer) or q is None or q.spec.axis is not None or not q.calibrated:
            continue
        bias = mod.bias.detach().abs().to(torch.float64)
        limit = INT32_MAX / 2  # 2x headroom
        needed_w = bias / (float(q.scale) * limit)  # the weight scale at which each channel's bias fits
        if not bool((needed_w > wq.scale.to(torch.float64)).any()):
            continue
        if wq.spec.axis is not None and wq.scale.numel() == bias.numel() and not wq.dynamic:
            raised = torch.maximum(wq.scale.to(torch.float64), needed_w).to(torch.float32)
            wq.set_qparams(raised, wq.zero_point)
            changed.append(wq.layer_name)
            continue
        needed_x = float((bias / (wq.scale.to(torch.float64) * limit)).max())
        lo = float(q.scale) * (q.spec.qmin - int(q.zero_point))
        hi = float(q.scale) * (q.spec.qmax - int(q.zero_point))
        grow = needed_x / float(q.scale)
        q.set_qparams(*compute_qparams(torch.tensor(lo * grow), torch.tensor(hi * grow), q.spec.qmin, q.spec.qmax,
                                       symmetric=q.spec.symmetric))
        changed.append(q.layer_name)
    return changed


def _grid_source(gm: fx.GraphModule, arg: Any) -> Quantizer | None:
    """The Quantizer whose grid the value `arg` is on (through tied quantizers), if any."""
    if not isinstance(arg, fx.Node) or arg.op != "call_module":
        return None
    mod = gm.get_submodule(str(arg.target))
    if isinstance(mod, TiedQuantizer):
        mod = mod.source
    return mod if isinstance(mod, Quantizer) else None
