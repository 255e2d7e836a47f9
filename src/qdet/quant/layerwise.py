"""Layer-by-layer passes over the calibration data: AdaRound and empirical bias correction.

Both need, for each conv/linear in graph order, its input in the *quantized* model (the layers
before it already rounded and corrected) and its output in the *float* model. Running the
whole model again for every layer would cost a forward pass per layer; instead each region's
graph is walked node by node over all calibration batches at once, two streams side by side
(float: every quantizer off; quantized: as calibrated), each value freed once its last user ran.
Memory is the calibration images' activations at the widest cut of the graph, for the three
streams below: the pass runs on the first max(AdaRound.max_images, BiasCorrection.max_images)
calibration images only; lower them for large inputs (a 640×640 detector: ~64).

For each quantized conv/linear: the float output is computed first (the original weights),
then AdaRound learns the rounding from the quantized input, then bias correction adds the mean
(float − quantized) output difference per channel to the bias, then the quantized stream moves on
with the final layer. Each layer's output SQNR (dB, quantized vs float stream) is recorded at
each step, and in a third stream that keeps round-to-nearest everywhere (plain PTQ): the
per-layer table `qdet quantize --adaround/--bias-correction` prints (`qdet.ptq_cli.layer_table`).

    >>> import torch
    >>> from torch import nn
    >>> import qdet
    >>> _ = torch.manual_seed(0); net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    >>> cfg = qdet.QuantConfig(weights=qdet.QuantSpec(bits=4, signed=True, symmetric=True,
    ...     granularity=qdet.PerChannel(), observer=qdet.Observer.MINMAX, narrow_range=True),
    ...     ptq=qdet.PTQAlgorithms(bias_correction=qdet.BiasCorrection()))
    >>> qm = qdet.quantize(net, [torch.rand(8, 3, 10, 10)], cfg, progress=False)
    >>> [row["layer"] for row in qm.metrics["ptq_layers"]]
    ['0', '2']
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import map_arg
from torch.nn import functional as F
from tqdm.auto import tqdm

from qdet.config import BiasCorrectionMode, PTQAlgorithms
from qdet.quant.adaround import adaround_layer
from qdet.quant.calibrate import default_transform, fit_biases_in_int32
from qdet.quant.opkinds import OpKind, op_kind
from qdet.quant.quantizer import (
    CastQuantizer,
    QuantConv2d,
    Quantizer,
    QuantLinear,
    TiedQuantizer,
    grid_bias,
    keep_uncorrected_bias,
)


@dataclass
class LayerStep:
    """One layer's output SQNR (dB vs the float model's) after each step of the pass."""

    layer: str
    sqnr_plain: float  # round-to-nearest everywhere (plain PTQ; after CLE when CLE is on)
    sqnr_nearest: float  # round-to-nearest here, the layers before already processed
    sqnr_adaround: float | None = None
    sqnr_bias_corrected: float | None = None
    adaround_mse_before: float | None = None
    adaround_mse_after: float | None = None
    flipped: int | None = None  # weights rounded away from nearest by AdaRound
    mean_shift: float | None = None  # max |per-channel mean shift| corrected


def sqnr_db(ref: list[torch.Tensor], q: list[torch.Tensor]) -> float:
    signal = sum(float(r.double().pow(2).sum()) for r in ref)
    noise = sum(float((r.double() - x.double()).pow(2).sum()) for r, x in zip(ref, q))
    return math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)


class _Streams:
    """Switch a region's quantizers between float (all off) and quantized (as they were)."""

    def __init__(self, gm: nn.Module) -> None:
        self.mods = [m for m in gm.modules() if isinstance(m, (Quantizer, TiedQuantizer, CastQuantizer))]
        self.saved = [m.enabled for m in self.mods]

    def float(self) -> None:
        for m in self.mods:
            m.enabled = False

    def quantized(self) -> None:
        for m, e in zip(self.mods, self.saved):
            m.enabled = e


def _run(gm: fx.GraphModule, node: fx.Node, env: dict[fx.Node, list[Any]], b: int) -> Any:
    args = map_arg(node.args, lambda n: env[n][b])
    kwargs = map_arg(node.kwargs, lambda n: env[n][b])
    if node.op == "call_module":
        return gm.get_submodule(str(node.target))(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)  # type: ignore[operator]
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    if node.op == "get_attr":
        obj: Any = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return obj
    raise RuntimeError(f"unexpected node {node.op}")


def _fused_activation(gm: fx.GraphModule, node: fx.Node) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The ReLU/ReLU6 that clips this layer's output when it is its only user (else None)."""
    if len(node.users) != 1:
        return None
    kind = op_kind(next(iter(node.users)), gm)
    return F.relu if kind is OpKind.RELU else F.relu6 if kind is OpKind.RELU6 else None


def _targets(gm: fx.GraphModule) -> dict[fx.Node, nn.Module]:
    out = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(str(node.target))
        wq = getattr(mod, "weight_quant", None)
        if isinstance(mod, (QuantConv2d, QuantLinear)) and isinstance(wq, Quantizer) and wq.calibrated and node.args:
            out[node] = mod
    return out


def _channel_means(outs: list[torch.Tensor]) -> torch.Tensor:
    dims = lambda t: [d for d in range(t.dim()) if d != (1 if t.dim() == 4 else t.dim() - 1)]
    total = sum(t.double().sum(dims(t)) for t in outs)
    count = sum(t.numel() // t.shape[1 if t.dim() == 4 else -1] for t in outs)
    return total / count


def optimize_region(
    gm: fx.GraphModule,
    inputs_float: list[tuple[Any, ...]],
    inputs_quant: list[tuple[Any, ...]],
    algos: PTQAlgorithms,
    *,
    progress: bool = True,
    layer_name: Callable[[nn.Module, fx.Node], str] = lambda m, n: str(n.target),
) -> list[LayerStep]:
    """Walk `gm` over the recorded region inputs (per batch) and apply AdaRound / empirical bias
    correction to each quantized conv/linear in graph order; returns the per-layer steps."""
    streams = _Streams(gm)
    targets = _targets(gm)
    remaining = {n: len(n.users) for n in gm.graph.nodes}
    env_f: dict[fx.Node, list[Any]] = {}  # float model
    env_q: dict[fx.Node, list[Any]] = {}  # quantized, layers processed so far
    env_p: dict[fx.Node, list[Any]] = {}  # quantized, nothing processed (plain PTQ), for the report
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    nb = len(inputs_quant)
    steps: list[LayerStep] = []
    bc = algos.bias_correction
    empirical = bc is not None and bc.mode is BiasCorrectionMode.EMPIRICAL
    bar = tqdm(total=len(targets), desc="adaround / bias correction (layers)", disable=not progress, leave=False)
    try:
        with torch.no_grad():
            for node in gm.graph.nodes:
                if node.op == "output":
                    break
                if node.op == "placeholder":
                    i = placeholders.index(node)
                    default = node.args[0] if node.args else None
                    env_f[node] = [a[i] if i < len(a) else default for a in inputs_float]
                    env_q[node] = [a[i] if i < len(a) else default for a in inputs_quant]
                    env_p[node] = env_q[node]
                else:
                    streams.float()
                    env_f[node] = [_run(gm, node, env_f, b) for b in range(nb)]
                    streams.quantized()
                    # a module changes only when its own node is processed, after its plain output is taken
                    env_p[node] = [_run(gm, node, env_p, b) for b in range(nb)]
                    if node in targets:
                        step, outs = _process_layer(gm, node, targets[node], env_f, env_q, algos, empirical,
                                                    layer_name(targets[node], node), progress, len(steps))
                        step.sqnr_plain = sqnr_db(env_f[node], env_p[node])
                        steps.append(step)
                        env_q[node] = outs
                        bar.update(1)
                    else:
                        env_q[node] = [_run(gm, node, env_q, b) for b in range(nb)]
                for arg in node.all_input_nodes:
                    remaining[arg] -= 1
                    if remaining[arg] == 0:
                        env_f.pop(arg, None)
                        env_q.pop(arg, None)
                        env_p.pop(arg, None)
    finally:
        streams.quantized()
        bar.close()
    fit_biases_in_int32(gm)  # a corrected bias must still fit the int32 accumulator
    return steps


def _process_layer(gm: fx.GraphModule, node: fx.Node, mod: nn.Module, env_f: dict[fx.Node, list[Any]],
                   env_q: dict[fx.Node, list[Any]], algos: PTQAlgorithms, empirical: bool, name: str,
                   progress: bool, index: int) -> tuple[LayerStep, list[Any]]:
    """AdaRound then bias correction on one layer; returns its step record and final quantized outputs."""
    ref = env_f[node]
    nb = len(ref)
    quant_out = lambda: [_run(gm, node, env_q, b) for b in range(nb)]
    outs = quant_out()
    step = LayerStep(name, math.nan, sqnr_db(ref, outs))
    if algos.adaround is not None:
        cfg = algos.adaround
        src = node.args[0]
        assert isinstance(src, fx.Node)
        x_q = _first_images(env_q[src], cfg.max_images)
        x_f = _first_images(env_f[src], cfg.max_images)
        target = _first_images(ref, cfg.max_images)
        with torch.enable_grad():
            res = adaround_layer(mod, mod.weight_quant, x_q, x_f, target, cfg,
                                 activation=_fused_activation(gm, node), seed=cfg.seed * 100003 + index,
                                 progress=progress, desc=f"adaround {name}")
        step.adaround_mse_before, step.adaround_mse_after, step.flipped = res.mse_before, res.mse_after, res.flipped
        outs = quant_out()
        step.sqnr_adaround = sqnr_db(ref, outs)
    if empirical:
        assert algos.bias_correction is not None
        limit = algos.bias_correction.max_images
        shift = _channel_means(_first_images_list(ref, limit)) - _channel_means(_first_images_list(outs, limit))
        keep_uncorrected_bias(mod)
        if mod.bias is None:
            mod.bias = nn.Parameter(torch.zeros(shift.numel(), dtype=mod.weight.dtype))
        # the shift was measured with the bias the kernel adds (snapped to the int32 grid): correct that one,
        # so that snapping the result again leaves at most half a grid step
        mod.bias.copy_(grid_bias(mod).detach() + shift.to(mod.bias.dtype))
        step.mean_shift = float(shift.abs().max())
        outs = quant_out()
        step.sqnr_bias_corrected = sqnr_db(ref, outs)
    return step, outs


def _first_images_list(batches: list[torch.Tensor], limit: int) -> list[torch.Tensor]:
    out, n = [], 0
    for t in batches:
        if n >= limit:
            break
        out.append(t[: limit - n])
        n += out[-1].shape[0]
    return out


def _first_images(batches: list[torch.Tensor], limit: int) -> torch.Tensor:
    return torch.cat(_first_images_list(batches, limit))


def _enough_batches(batches: list[Any], transform_fn: Callable[[Any], Any], images: int) -> list[Any]:
    """The first batches holding at least `images` images: the pass keeps all of their activations."""
    out, n = [], 0
    for batch in batches:
        if n >= images > 0:
            break
        out.append(batch)
        x = transform_fn(batch)
        first = x[0] if isinstance(x, tuple) else x
        n += first.shape[0] if isinstance(first, torch.Tensor) and first.dim() > 0 else 1
    return out


def capture_inputs(model: nn.Module, region: nn.Module, batches: Iterable[Any],
                   transform_fn: Callable[[Any], Any] = default_transform) -> list[tuple[Any, ...]]:
    """The positional inputs `region` receives for each batch when `model` runs."""
    seen: list[tuple[Any, ...]] = []

    def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        seen.append(args)

    handle = region.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for batch in batches:
                inputs = transform_fn(batch)
                model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    finally:
        handle.remove()
    return seen


def optimize_layers(qm: Any, batches: list[Any], algos: PTQAlgorithms,
                    transform_fn: Callable[[Any], Any] = default_transform, *, progress: bool = True) -> list[dict]:
    """AdaRound / empirical bias correction over every region of a calibrated QuantizedModel,
    region by region (each sees the quantized output of the ones before). Returns per-layer rows."""
    from qdet.quant.calibrate import quantization_disabled

    batches = _enough_batches(batches, transform_fn, max(
        algos.adaround.max_images if algos.adaround is not None else 0,
        algos.bias_correction.max_images if algos.bias_correction is not None else 0))
    rows: list[dict] = []
    for region in qm.regions.values():
        gm = region.module
        with quantization_disabled(qm.model):
            x_float = capture_inputs(qm.model, gm, batches, transform_fn)
        x_quant = capture_inputs(qm.model, gm, batches, transform_fn)
        steps = optimize_region(gm, x_float, x_quant, algos, progress=progress,
                                layer_name=lambda m, n: getattr(m.weight_quant, "layer_name", str(n.target))
                                .removesuffix(".weight"))
        rows.extend(asdict(s) for s in steps)
    return rows
