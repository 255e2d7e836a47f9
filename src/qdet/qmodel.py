"""`QuantizedModel`: the float model's copy with its regions rewritten, plus what defines it.

It runs as the fake-quant *reference* runtime (float arithmetic on int-grid values); runtimes in
`qdet.runtimes` lower its regions to real int8 kernels. Numbers travel with it: `metrics` holds
measured results and `save()` writes them next to the weights.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

from qdet.config import BiasCorrectionMode, QuantConfig
from qdet.coverage import coverage, warn_if_mostly_float
from qdet.errors import CalibrationError, ConfigError
from qdet.quant.calibrate import len_or_none, calibrate, default_transform
from qdet.quant.split import UntracedModule, split_untraceable
from qdet.quant.prepare import (
    LayerRecord,
    PreparedRegion,
    check_patterns,
    prepare_region,
)


@dataclass(frozen=True)
class RegionSpec:
    """Where to quantize: a submodule path and module types the tracer keeps opaque."""

    path: str = ""
    leaf_modules: tuple[type[nn.Module], ...] = ()


class QuantizedModel(nn.Module):
    """A quantized copy of a float model. Call it like the float model.

    Attributes: model (the rewritten copy), config, regions (path → PreparedRegion),
    input_shapes (per region, for rebuilding on load), model_name, metrics (measured numbers).
    """

    def __init__(
        self,
        model: nn.Module,
        config: QuantConfig,
        regions: dict[str, PreparedRegion],
        input_shapes: dict[str, list[list[int]]],
        model_name: str = "",
    ) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.regions = regions
        self.input_shapes = input_shapes
        self.model_name = model_name
        self.metrics: dict[str, Any] = {}
        self.calibration_batches = 0
        self.qat_config: Any = None  # the QATConfig while this is a trainable QAT model
        # region path → pytree spec (JSON) of its inputs, for regions fed lists/dicts of tensors
        self.input_structures: dict[str, str] = {}
        self.untraced: list[UntracedModule] = []  # modules fx could not trace: their own code runs float
        self.train(model.training)  # a fresh Module is in train mode; follow the wrapped model (eval)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    @property
    def layers(self) -> list[LayerRecord]:
        return [rec for region in self.regions.values() for rec in region.layers]

    def layer_names(self) -> list[str]:
        return [rec.name for rec in self.layers]


def _get(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        raise ConfigError(f"region {path!r} is not a submodule of {type(model).__name__}") from None


def _set(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Replace the submodule at `path` (returns the new root when path is "")."""
    if not path:
        return module
    parent, _, name = path.rpartition(".")
    setattr(_get(model, parent), name, module)
    return model


def capture_region_inputs(model: nn.Module, paths: Sequence[str], run: Callable[[], Any], *,
                          required: Sequence[str] | None = None) -> dict[str, tuple[Any, ...]]:
    """Run `run()` once and record the positional inputs each region receives first.

    A region in `required` (default: all of `paths`) that the forward never calls is an error;
    the others are just absent from the result."""
    captured: dict[str, tuple[Any, ...]] = {}
    handles = []
    for path in paths:
        def hook(_mod: nn.Module, args: tuple[Any, ...], path: str = path) -> None:
            captured.setdefault(path, args)
        handles.append(_get(model, path).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    missing = [p for p in (paths if required is None else required) if p not in captured]
    if missing:
        raise ConfigError(f"regions {missing} were never called by the model's forward")
    return captured


def _shapes(args: tuple[Any, ...]) -> list[list[int]]:
    return [list(a.shape) for a in pytree.tree_leaves(args) if isinstance(a, torch.Tensor)]


def _structure(args: tuple[Any, ...]) -> str | None:
    """The pytree spec (JSON) of a region's inputs when they are not plain positional tensors."""
    leaves, spec = pytree.tree_flatten(args)
    if not leaves or not all(isinstance(a, torch.Tensor) for a in leaves):
        return None
    if spec == pytree.tree_structure(tuple(leaves)):
        return None  # positional tensors: the shapes say everything
    return pytree.treespec_dumps(spec)


def example_inputs(shapes: list[list[int]], structure: str | None = None) -> tuple[Any, ...]:
    """Zeros of the recorded shapes, rebuilt into the recorded input structure (lists, dicts)."""
    zeros = [torch.zeros(s) for s in shapes]
    if structure is None:
        return tuple(zeros)
    return pytree.tree_unflatten(zeros, pytree.treespec_loads(structure))


def build_quantized(
    model: nn.Module,
    regions: Sequence[RegionSpec],
    cfg: QuantConfig,
    example_run: Callable[[nn.Module], Any],
    *,
    model_name: str = "",
    qat: bool = False,
) -> QuantizedModel:
    """Copy `model`, trace and prepare each region using the inputs `example_run` feeds it.

    The returned model is prepared but not calibrated (quantizers pass values through). With
    `qat`, conv-bn pairs stay trainable (QATConvBn2d) instead of being folded.
    """
    cfg = cfg.resolved()  # a saved model records what AUTO chose on this machine
    work = copy.deepcopy(model).eval()
    traceable, untraced = split_untraceable(work, regions)
    inputs = capture_region_inputs(work, [r.path for r in traceable], lambda: example_run(work),
                                   required=[r.path for r in regions if r in traceable])
    traceable = [r for r in traceable if r.path in inputs]  # pieces the glue never calls directly
    if not traceable:
        raise ConfigError(f"no part of {type(model).__name__} could be traced for quantization: "
                          + "; ".join(f"{u.path}: {u.reason}" for u in untraced[:3]))
    qm = _assemble(work, traceable, cfg, inputs, model_name, qat=qat)
    qm.untraced = untraced
    check_quantizable(qm, type(model).__name__)
    split = [u for u in untraced if not u.opaque]
    if split:
        warnings.warn("torch.fx could not trace " + "; ".join(f"{u.path} ({u.reason})" for u in split[:4])
                      + f": {'its' if len(split) == 1 else 'their'} own code runs float, the "
                      f"{len(traceable)} traceable submodules inside are quantized", stacklevel=3)
    opaque = [u for u in untraced if u.opaque]
    if opaque:
        warnings.warn(f"torch.fx cannot follow {len(opaque)} weight-free module(s), each runs float as one node: "
                      + "; ".join(f"{u.path} ({u.reason})" for u in opaque[:4]), stacklevel=3)
    return qm


def check_quantizable(qm: QuantizedModel, what: str) -> None:
    """A model whose traced graph has no conv, linear or matmul at all has nothing to quantize: an error,
    never a silently float "int8" model. (Conv/linear kept float, by skip or kind, still count.)"""
    if not any(rec.kind in ("conv", "linear") for rec in qm.layers):
        regions = ", ".join(repr(p) for p in qm.regions if p) or "the whole model"
        untraced = "; untraced, running float: " + ", ".join(u.path for u in qm.untraced[:4]) if qm.untraced else ""
        raise ConfigError(f"{qm.model_name or what}: no quantizable op in the traced graph of {regions} (no conv, "
                          f"linear or matmul): nothing would run in int8{untraced}")


def build_quantized_from_shapes(
    model: nn.Module,
    regions: Sequence[RegionSpec],
    cfg: QuantConfig,
    input_shapes: dict[str, list[list[int]]],
    *,
    model_name: str = "",
    input_structures: dict[str, str] | None = None,
) -> QuantizedModel:
    """Like `build_quantized`, tracing each region on zeros of the recorded shapes (used on load)."""
    work = copy.deepcopy(model).eval()
    structures = input_structures or {}
    inputs = {r.path: example_inputs(input_shapes[r.path], structures.get(r.path)) for r in regions}
    return _assemble(work, regions, cfg, inputs, model_name)


def declared_leaves(leaf_modules: dict[str, tuple[type[nn.Module], ...]], path: str) -> tuple[type[nn.Module], ...]:
    """Leaf types declared for `path` or, for a piece split off an untraceable region, its nearest ancestor."""
    while path not in leaf_modules and path:
        path = path.rpartition(".")[0]
    return leaf_modules.get(path, ())


def float_twin(
    qmodel: QuantizedModel,
    model: nn.Module,
    leaf_modules: dict[str, tuple[type[nn.Module], ...]] | None = None,
) -> QuantizedModel:
    """`model` (the float model) prepared exactly like `qmodel` — same regions, BN folded, same graph —
    with its own float weights and no calibrated activation quantizer. `lower(twin, rt,
    quantized=False)` is the float baseline of `model` on a runtime; lowering `qmodel` itself with
    quantized=False would run `qmodel`'s weights, which after `load()` are the int8 codes.

    `leaf_modules`: region path → module types the tracer kept opaque (an adapter's regions)."""
    leaves = leaf_modules or {}
    regions = [RegionSpec(p, tuple(declared_leaves(leaves, p))) for p in qmodel.regions]
    return build_quantized_from_shapes(model, regions, qmodel.config, qmodel.input_shapes,
                                       model_name=qmodel.model_name, input_structures=qmodel.input_structures)


def with_float_weights(
    qmodel: QuantizedModel,
    model: nn.Module,
    leaf_modules: dict[str, tuple[type[nn.Module], ...]] | None = None,
) -> QuantizedModel:
    """`qmodel` (e.g. loaded from a `.qdet`, whose weights ARE the int8 codes) rebuilt on `model`'s
    float weights with `qmodel`'s scales and zero points: the int8 model is unchanged (the codes are
    recomputed from the float weights with the same scales, by the same rounding), and switching
    quantizers off now gives the float model — what analysis needs (paired float vs int8 capture,
    "keep layer i float" in sensitivity sweeps, the float reference of a mixed-precision search)."""
    from qdet.quant.calibrate import quantizers

    twin = float_twin(qmodel, model, leaf_modules)
    ours = dict(quantizers(qmodel.model))
    theirs = dict(quantizers(twin.model))
    if set(ours) != set(theirs):
        raise ConfigError(f"{qmodel.model_name or type(model).__name__}: the float model does not prepare into "
                          f"the quantized model's layers ({len(theirs)} vs {len(ours)} quantizers)")
    for name, q in theirs.items():
        src = ours[name]
        if src.calibrated:
            q.set_qparams(src.scale, src.zero_point)
        q.observer, q.observing, q.calibrated = None, False, src.calibrated
    from qdet.quant.quantizer import QuantConv2d, QuantLinear, keep_uncorrected_bias, weight_codes

    loaded = dict(qmodel.model.named_modules())
    for name, mod in twin.model.named_modules():
        wq = getattr(mod, "weight_quant", None)
        if isinstance(mod, (QuantConv2d, QuantLinear)) and getattr(wq, "calibrated", False) and wq.spec.bits <= 8:
            if not torch.equal(weight_codes(mod.weight.detach(), wq), weight_codes(loaded[name].weight.detach(), wq)):
                raise ConfigError(f"layer {name!r}: the quantized model was not made from these float weights "
                                  f"(its int8 codes differ); pass the --weights it was quantized from")
        if isinstance(mod, (QuantConv2d, QuantLinear)):
            corrected = loaded[name].bias
            if corrected is not None and (mod.bias is None or not torch.equal(mod.bias.detach(), corrected.detach())):
                keep_uncorrected_bias(mod)  # the twin's float bias, for quantizers off
                mod.bias = nn.Parameter(corrected.detach().clone())  # the int8 model's (bias-corrected) one
    twin.metrics = dict(qmodel.metrics)
    twin.calibration_batches = qmodel.calibration_batches
    return twin


def _assemble(
    work: nn.Module,
    regions: Sequence[RegionSpec],
    cfg: QuantConfig,
    inputs: dict[str, tuple[Any, ...]],
    model_name: str,
    *,
    qat: bool = False,
) -> QuantizedModel:
    prepared: dict[str, PreparedRegion] = {}
    for spec in regions:
        prepared[spec.path] = prepare_region(
            _get(work, spec.path), inputs[spec.path], cfg, prefix=spec.path, leaf_types=spec.leaf_modules, qat=qat
        )
    for path, region in prepared.items():
        work = _set(work, path, region.module)
    qm = QuantizedModel(work, cfg, prepared, {p: _shapes(a) for p, a in inputs.items()}, model_name)
    qm.input_structures = {p: s for p, a in inputs.items() if (s := _structure(a)) is not None}
    check_patterns(cfg, qm.layer_names())
    return qm


def first_batch(data: Iterable[Any], what: str) -> tuple[Any, Iterator[Any]]:
    """The first batch of `data` (it traces the model) and an iterator over the rest; empty data is an error."""
    iterator = iter(data)
    first = next(iterator, None)
    if first is None:
        raise CalibrationError(f"the {what} is empty: no batch reached the model")
    return first, iterator


def example_runner(batch: Any, transform_fn: Callable[[Any], Any]) -> Callable[[nn.Module], Any]:
    """A function running a module on `batch` after the inference preprocessing (for tracing)."""
    def run(m: nn.Module) -> Any:
        inputs = transform_fn(batch)
        return m(*inputs) if isinstance(inputs, tuple) else m(inputs)

    return run


def quantize(
    model: nn.Module,
    calib_data: Iterable[Any],
    cfg: QuantConfig | None = None,
    *,
    regions: Sequence[RegionSpec] = (RegionSpec(),),
    transform_fn: Callable[[Any], Any] = default_transform,
    num_batches: int | None = None,
    model_name: str = "",
    progress: bool = True,
) -> QuantizedModel:
    """Post-training quantization: prepare, calibrate on `calib_data`, return a new model.

    `transform_fn` maps one batch to the model's input (the inference preprocessing); the float
    `model` is never modified.

    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4)).eval()
    >>> _ = net(torch.randn(1, 3, 8, 8))
    >>> batches = [torch.randn(2, 3, 8, 8) for _ in range(4)]
    >>> qm = quantize(net, batches, QuantConfig(), progress=False)
    >>> qm(batches[0]).shape
    torch.Size([2, 4])
    """
    cfg = cfg or QuantConfig()
    first, iterator = first_batch(calib_data, "calibration set")
    qm = build_quantized(model, regions, cfg, example_runner(first, transform_fn), model_name=model_name)
    remaining = None if num_batches is None else max(num_batches - 1, 0)
    batches = _chain_first(first, iterator, remaining)
    total = len_or_none(calib_data)
    total = num_batches if total is None else total if num_batches is None else min(total, num_batches)
    algos = cfg.ptq
    if algos.layerwise:  # the layer-by-layer pass reads the calibration batches again
        batches = list(batches)
    bc_mode = algos.bias_correction.mode if algos.bias_correction is not None else None
    qm.calibration_batches = calibrate(qm, batches, transform_fn, progress=progress, total=total,
                                       bias_correction=bc_mode is BiasCorrectionMode.FLOAT_MEANS)
    if qm.regions and any(r.equalized for r in qm.regions.values()):
        qm.metrics["cle_pairs"] = [asdict(p) for r in qm.regions.values() for p in r.equalized]
    if bc_mode is BiasCorrectionMode.ANALYTIC:
        from qdet.quant.bias_correction import analytic_input_means, correct_biases
        from qdet.quant.calibrate import fit_biases_in_int32

        for region in qm.regions.values():
            correct_biases(analytic_input_means(region.module))
            fit_biases_in_int32(region.module)
    if algos.layerwise:
        from qdet.quant.layerwise import optimize_layers

        qm.metrics["ptq_layers"] = optimize_layers(qm, batches, algos, transform_fn, progress=progress)
    cov = coverage(qm)
    qm.metrics["coverage"] = cov.as_dict()
    warn_if_mostly_float(cov)
    return qm


def _chain_first(first: Any, rest: Iterable[Any], limit: int | None) -> Iterable[Any]:
    import itertools

    tail = rest if limit is None else itertools.islice(rest, limit)
    return itertools.chain([first], tail)
