"""Export a prepared region to a QDQ ONNX model that carries qdet's own scales and zero points.

torch's (legacy, TorchScript) exporter turns our quantizers into QuantizeLinear/DequantizeLinear
pairs. Two rewrites then make the file what int8 runtimes expect:
  * weight Q nodes are folded: the initializer is stored as int8 (the file shrinks ~4×), followed
    by its DequantizeLinear;
  * float conv/gemm biases become int32 with scale s_x·s_w (seed 002: b_q = round(b / (S1·S2)))
    behind a DequantizeLinear — onnxruntime fuses DQ→Conv→Q into QLinearConv only then;
  * zero points that are 0 on int8/int32 tensors are dropped (0 is the ONNX default).
"""
from __future__ import annotations

import io
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from qdet.errors import ConfigError, RuntimeUnavailable
from qdet.fileio import write_atomically
from qdet.quant.quantizer import Quantizer, clamp_to_grid_range, is_narrow_weight_spec, weight_quantizers

OPSET = 17


@contextmanager
def export_mode(module: nn.Module) -> Iterator[None]:
    """Quantizers emit Q/DQ ops; weights narrower than 8 bits are clamped to their own range for the
    export (restored after), so the int8 codes folded into the file are the narrow ones."""
    quantizers = [m for m in module.modules() if isinstance(m, Quantizer)]
    narrow = [m for m, q in weight_quantizers(module) if q.enabled and q.calibrated and is_narrow_weight_spec(q.spec)]
    saved = [m.weight.detach().clone() for m in narrow]
    try:
        with torch.no_grad():
            for m in narrow:
                m.weight.copy_(clamp_to_grid_range(m.weight, m.weight_quant))
        for q in quantizers:
            q.exporting = True
        yield
    finally:
        for q in quantizers:
            q.exporting = False
        with torch.no_grad():
            for m, w in zip(narrow, saved):
                m.weight.copy_(w)


def _onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeUnavailable("onnx is not installed; pip install 'qdet[onnx]'") from exc
    return onnx, numpy_helper


def export_region(
    module: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    dynamic_batch: bool = False,
    dynamic_spatial: bool = False,
) -> Any:
    """Export `module` (quantizers calibrated, or disabled for the float graph) to an onnx.ModelProto.

    dynamic_batch: dim 0 of every input is symbolic. dynamic_spatial: dims 2.. of every input of
    rank >= 3 are symbolic too (detectors resize each image differently), named per input.
    """
    onnx, _ = _onnx()
    names = [f"input_{i}" for i in range(len(example_inputs))]
    axes = _dynamic_axes(names, example_inputs, batch=dynamic_batch, spatial=dynamic_spatial)
    buf = io.BytesIO()
    with export_mode(module), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, example_inputs, buf, dynamo=False, opset_version=OPSET,
            input_names=names, dynamic_axes=axes, do_constant_folding=True,
        )
    model = onnx.load_from_string(buf.getvalue())
    _constants_to_initializers(model)
    _fold_weight_quantizers(model)
    _quantize_biases(model)
    _drop_unused_initializers(model)
    return model


def _dynamic_axes(names: list[str], inputs: tuple[torch.Tensor, ...], *, batch: bool, spatial: bool) -> dict[str, dict[int, str]] | None:
    if not (batch or spatial):
        return None
    axes: dict[str, dict[int, str]] = {}
    for i, (name, x) in enumerate(zip(names, inputs)):
        dims = {0: "batch"} if batch else {}
        if spatial and x.dim() >= 3:
            dims.update({d: f"input_{i}_dim{d}" for d in range(2, x.dim())})
        if dims:
            axes[name] = dims
    return axes


def save_model(model: Any, path: str | Path) -> Path:
    """Write atomically (temp file + rename), so a crash never leaves a half-written model."""
    onnx, _ = _onnx()
    return write_atomically(path, lambda tmp: onnx.save(model, str(tmp)))


# ---------------------------------------------------------------- graph rewrites
def _initializers(model: Any) -> dict[str, Any]:
    return {init.name: init for init in model.graph.initializer}


def _array(model: Any, name: str) -> np.ndarray | None:
    _, numpy_helper = _onnx()
    init = _initializers(model).get(name)
    return None if init is None else numpy_helper.to_array(init)


def _constants_to_initializers(model: Any) -> None:
    """Constant nodes → initializers, so every rewrite below reads constants one way."""
    onnx, numpy_helper = _onnx()
    keep = []
    for node in model.graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = numpy_helper.to_array(node.attribute[0].t)
            model.graph.initializer.append(numpy_helper.from_array(tensor, node.output[0]))
        else:
            keep.append(node)
    # The exporter deduplicates equal constants behind Identity nodes: point consumers at the source.
    inits = {i.name for i in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    alias = {n.output[0]: n.input[0] for n in keep if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs}
    keep = [n for n in keep if not (n.op_type == "Identity" and n.output[0] in alias)]
    for node in keep:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _quantize_np(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int, dtype: np.dtype) -> np.ndarray:
    """ONNX QuantizeLinear of an initializer, saturate(round_half_even(x / s) + z) with x / s in float64:
    the codes of `quantizer.weight_codes`, which the `.qdet` file stores and the simulation applies.
    (The file used to store float32-rounded codes while this rounded in float64: 3 of ResNet56's
    848,944 weight codes differed, so a model exported right after `quantize` and the same model
    loaded from its `.qdet` ran different weights — issue 21's top-1 93.47 vs 93.45.)"""
    from qdet.quant.qparams import quantize

    info = np.iinfo(dtype)
    codes = quantize(torch.tensor(x, dtype=torch.float64), torch.tensor(scale, dtype=torch.float64),
                     torch.tensor(zp.astype(np.int32)), int(info.min), int(info.max),
                     axis if scale.size > 1 else None)
    return codes.numpy().astype(dtype)


def _fold_weight_quantizers(model: Any) -> None:
    _, numpy_helper = _onnx()
    inits = _initializers(model)
    consumers = _consumers(model)
    keep = []
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in inits and all(
            c.op_type == "DequantizeLinear" for c in consumers.get(node.output[0], [])
        ):
            x = numpy_helper.to_array(inits[node.input[0]])
            scale = numpy_helper.to_array(inits[node.input[1]])
            zp = numpy_helper.to_array(inits[node.input[2]])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            q = _quantize_np(x, scale, zp, axis, zp.dtype)
            model.graph.initializer.append(numpy_helper.from_array(q, node.output[0]))
            for dq in consumers[node.output[0]]:
                # zero point 0 is the default for int8: dropping it saves a byte per channel
                # (onnxruntime fuses Conv without it, but its QGemm fusion needs it)
                if zp.dtype == np.int8 and not zp.any() and all(c.op_type == "Conv" for c in consumers.get(dq.output[0], [])):
                    del dq.input[2:]
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _quantize_biases(model: Any) -> None:
    _, numpy_helper = _onnx()
    producers = {out: n for n in model.graph.node for out in n.output}
    new_nodes = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3:
            continue
        bias = _array(model, node.input[2])
        dq_x, dq_w = producers.get(node.input[0]), producers.get(node.input[1])
        if bias is None or bias.dtype != np.float32 or not _is_dq(dq_x) or not _is_dq(dq_w):
            continue
        s_x = _array(model, dq_x.input[1])
        s_w = _array(model, dq_w.input[1])
        if s_x is None or s_w is None or s_x.size != 1:
            continue
        scale = (s_x.astype(np.float64) * s_w.astype(np.float64)).astype(np.float32).reshape(-1)
        if scale.size == 1:
            scale = np.full(bias.shape, scale[0], dtype=np.float32)
        scale = np.maximum(scale, np.float32(1e-30))  # s_x·s_w can underflow to 0 on dead layers
        q64 = np.rint(bias.astype(np.float64) / scale.astype(np.float64))
        if np.abs(q64).max(initial=0.0) > 2**31 - 1:
            # calibration refits such scales (fit_biases_in_int32); saturating would be wrong
            raise ConfigError(f"bias of {node.name or node.output[0]} does not fit int32 at its input scale; "
                              "re-calibrate the model with this version of qdet")
        q = q64.astype(np.int32)
        base = f"{node.name or node.output[0]}_bias_int32"  # per node: equal biases may share one initializer
        model.graph.initializer.extend([
            numpy_helper.from_array(q, base),
            numpy_helper.from_array(scale, base + "_scale"),
        ])
        from onnx import helper

        new_nodes.append(helper.make_node(
            "DequantizeLinear", [base, base + "_scale"], [base + "_dq"], axis=0, name=base + "_DQ",
        ))
        node.input[2] = base + "_dq"
    # DQ nodes must precede their consumers: put them first (their inputs are initializers).
    nodes = new_nodes + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _is_dq(node: Any) -> bool:
    return node is not None and node.op_type == "DequantizeLinear"


def _consumers(model: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _drop_unused_initializers(model: Any) -> None:
    used = {name for n in model.graph.node for name in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
