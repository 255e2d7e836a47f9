"""The `integer` runtime: a calibrated region executed with integer arithmetic only.

One interpreter pass over the region's fx graph, by node/module type (no model knowledge). Every
value is either a float tensor (region inputs, before their Quantizer) or an `IntValue`: int64
integers on a `Grid` — *codes* (uint8/int8 per tensor, with a zero point) or an *accumulator*
(int32, zero point 0, per-channel scale):

    Quantizer on a float value     → codes = sat(round(x / S) + Z)         (the region's input edge)
    QuantConv2d / QuantLinear      → acc = Σ (q_x − Z_x)·q_w + b_q          int32, grid S_x·S_w
    ReLU / ReLU6                   → clamp at 0 (acc) or at Z (codes)
    add of two codes, then (ReLU)  → codes = sat(Z + round((q1−Z1)·M1 + (q2−Z2)·M2)), M_i = S_i / S_out,
      and its output quantizer       rounded once, exactly in int64 (`_add_to_codes`)
    any other add of two codes     → acc = round((q1−Z1)·2^20·M1) + round((q2−Z2)·2^20·M2),
                                     M_i = S_i / (2·max S), grid 2·max S / 2^20 (gemmlowp-style)
    average pool                   → acc = Σ (q − Z) over the window, grid S / window
    Quantizer on an IntValue       → requantize: sat(Z_out + round(acc · M0 · 2^-n))
    cat                            → every input requantized to the output grid, then concatenated
    max-pool, flatten, view, zero
      pad (pads Z), slicing, nearest
      upsample, TiedQuantizer      → the same op on the integers, grid unchanged
    region outputs                 → dequantized: S · (q − Z)
    anything else                  → ConfigError naming the node

Exactness: convs and linears run as float64 conv/matmul of integer-valued tensors. Every product
and partial sum is an integer of magnitude < 2^31 (checked per layer from the weights and the
input range before running), and float64 represents every integer below 2^53 exactly, so the
result equals the int32 accumulation bit for bit. The scale arithmetic (M = S_acc/S_out → M0, n;
b_q = round(b/(S_x·S_w))) is done once per layer in float64 and cached; the tensors themselves
only see integer multiply, add, shift and clamp.

`IntegerRegion.record` (a dict) collects each activation quantizer's output codes by layer name,
and `IntegerRegion.params` the integer parameters each layer used (see `qdet.runtimes.integer_export`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx, nn
from torch.fx.node import map_arg
from torch.nn import functional as F

from qdet.errors import CalibrationError, ConfigError
from qdet.quant.integer import (
    INT32_MAX,
    INT32_MIN,
    multipliers,
    multiply_by_quantized_multiplier,
    quantize_bias,
    requantize,
    saturate,
)
from qdet.quant.opkinds import CLAMPS, OpKind, op_kind
from qdet.quant.prepare import PreparedRegion
from qdet.quant.quantizer import CastQuantizer, QuantConv2d, QuantLinear, Quantizer, TiedQuantizer, weight_codes
from qdet.runtimes.base import Runtime, _FloatView, register_runtime, traced_module

ADD_SHIFT = 20  # (q − Z) < 2^8, shifted < 2^28: headroom for the 31-bit multiplier, precision 2^-20 of max S

@dataclass(frozen=True)
class Grid:
    """How integers map to reals: r = scale · (q − zero_point); `acc` marks int32 accumulators."""

    scale: torch.Tensor  # float64, () or (C,) along dim 1
    zero_point: int
    qmin: int
    qmax: int
    acc: bool

    def key(self) -> tuple[Any, ...]:
        return (tuple(self.scale.reshape(-1).tolist()), self.zero_point, self.qmin, self.qmax, self.acc)


@dataclass
class IntValue:
    """int64 tensor of integers on `grid`."""

    data: torch.Tensor
    grid: Grid


def _per_channel(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a (C,) vector to broadcast along dim 1 of `like`; scalars stay scalars."""
    if t.numel() == 1:
        return t.reshape(())
    shape = [1] * like.dim()
    shape[1] = -1
    return t.reshape(shape)


def _accumulator_grid(scale: torch.Tensor) -> Grid:
    return Grid(scale.to(torch.float64), 0, INT32_MIN, INT32_MAX, True)


def _codes_grid(q: Quantizer) -> Grid:
    if not q.calibrated:
        raise CalibrationError(f"layer {q.layer_name!r} was never calibrated; run qdet.quantize with calibration data")
    if q.spec.axis is not None and q.scale.numel() > 1:
        raise ConfigError(f"layer {q.layer_name!r}: the integer runtime needs per-tensor activation quantizers")
    return Grid(q.scale.detach().to(torch.float64).reshape(()), int(q.zero_point), q.spec.qmin, q.spec.qmax, False)


class IntegerRegion(nn.Module):
    """Executes a calibrated region GraphModule with integer arithmetic (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, path: str) -> None:
        super().__init__()
        self.gm = gm
        self.path = path
        self.record: dict[str, torch.Tensor] | None = None  # layer name → output codes, when set
        # layer name → codes that replace this layer's output after it is recorded ("teacher forcing":
        # each op then sees the reference's inputs, so differences measure one op, not their propagation)
        self.teacher: dict[str, torch.Tensor] | None = None
        self.params: dict[str, dict[str, Any]] = {}  # layer name → integer parameters last used
        self._cache: dict[tuple[Any, ...], Any] = {}
        self._check_supported()

    # ---------------------------------------------------------------- static checks
    def _check_supported(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            if self._handler(node) is None:
                raise ConfigError(
                    f"region {self.path or '<model>'!r}, node {node.name!r} ({self._describe(node)}): the integer "
                    "runtime has no integer implementation for this op; skip the layer or use the reference runtime"
                )

    def _describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"{type(self.gm.get_submodule(str(node.target))).__name__} at {_join(self.path, str(node.target))!r}"
        return getattr(node.target, "__name__", str(node.target))

    def _module(self, node: fx.Node) -> nn.Module | None:
        return self.gm.get_submodule(str(node.target)) if node.op == "call_module" else None

    def _handler(self, node: fx.Node) -> Callable[[fx.Node, list[Any], dict[str, Any]], Any] | None:
        mod = self._module(node)
        if mod is not None:
            if isinstance(mod, Quantizer):
                return self._quantizer
            if isinstance(mod, TiedQuantizer):
                return self._tied
            if isinstance(mod, CastQuantizer):
                return None
            if isinstance(mod, (QuantConv2d, QuantLinear)):
                return self._conv_linear
        kind = op_kind(node, self.gm)
        if kind is OpKind.AVGPOOL and not (mod is not None or node.target is F.adaptive_avg_pool2d):
            return None  # functional avg_pool2d: window arguments not handled here
        if kind is OpKind.SHAPE and node.target in (torch.chunk, torch.split, "chunk", "split"):
            return None  # tuple results
        if node.op == "call_function" and node.target is F.pad:
            return self._pad
        if node.op == "call_function" and node.target is getattr:
            return self._meta
        return {
            OpKind.RELU: self._relu, OpKind.RELU6: self._relu, OpKind.AVGPOOL: self._avgpool,
            OpKind.MAXPOOL: self._via_float, OpKind.UPSAMPLE_NEAREST: self._via_float,
            OpKind.SHAPE: self._shape_op, OpKind.IDENTITY: self._shape_op, OpKind.META: self._meta,
            OpKind.ADD: self._add, OpKind.CAT: self._cat,
        }.get(kind)

    # ---------------------------------------------------------------- execution
    def forward(self, *args: Any) -> Any:
        env: dict[fx.Node, Any] = {}
        placeholders = iter(args)
        last_use = self._last_uses()
        with torch.no_grad():
            for node in self.gm.graph.nodes:
                if node.op == "placeholder":
                    env[node] = next(placeholders)
                elif node.op == "output":
                    return map_arg(node.args[0], lambda n: _dequantize(env[n]))
                elif node.op == "get_attr":
                    env[node] = _fetch(self.gm, str(node.target))
                else:
                    a = map_arg(node.args, env.__getitem__)
                    kw = map_arg(node.kwargs, env.__getitem__)
                    handler = self._handler(node)
                    assert handler is not None  # _check_supported
                    env[node] = handler(node, list(a), dict(kw))
                # free every value whose last reader has run: peak memory is a few layers, not all of them
                for dead in last_use.get(node, ()):
                    env.pop(dead, None)
        raise ConfigError(f"region {self.path!r} has no output node")

    def _last_uses(self) -> dict[fx.Node, list[fx.Node]]:
        """node → the values it is the last reader of (the output node frees nothing)."""
        if ("last_use",) not in self._cache:
            seen: set[fx.Node] = set()
            frees: dict[fx.Node, list[fx.Node]] = {}
            for node in reversed(list(self.gm.graph.nodes)):
                if node.op == "output":
                    seen.update(node.all_input_nodes)
                    continue
                for arg in node.all_input_nodes:
                    if arg not in seen:
                        seen.add(arg)
                        frees.setdefault(node, []).append(arg)
            self._cache[("last_use",)] = frees
        return self._cache[("last_use",)]

    def _cached(self, key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def _requantize(self, name: str, value: IntValue, out: Grid) -> IntValue:
        """IntValue on any grid → codes on `out` (identity when already there)."""
        g = value.grid
        if not g.acc and g.key() == out.key():
            return value
        data = value.data if g.acc else value.data - g.zero_point  # codes → (q − Z), an accumulator
        m0, n = self._cached(("M", name, g.key(), out.key()),
                             lambda: multipliers(g.scale / out.scale, layer=name))
        self.params.setdefault(name, {}).update(
            requant_m0=m0.tolist(), requant_shift=n.tolist(), requant_input_scale=g.scale.reshape(-1).tolist(),
            output_scale=float(out.scale), output_zero_point=out.zero_point, qmin=out.qmin, qmax=out.qmax)
        m0, n = m0.to(data.device), n.to(data.device)
        codes = requantize(data, _per_channel(m0, data), _per_channel(n, data), zero_point=out.zero_point,
                           qmin=out.qmin, qmax=out.qmax)
        return IntValue(codes, out)

    def _quantizer(self, node: fx.Node, args: list[Any], kwargs: dict[str, Any]) -> Any:
        q = self._module(node)
        assert isinstance(q, Quantizer)
        out = _codes_grid(q)
        x = args[0]
        name = q.layer_name or node.name
        if isinstance(x, IntValue):
            value = self._requantize(name, x, out)
        else:  # the float → integer edge: the region's inputs
            value = _quantize_float(x, out)
            self.params.setdefault(name, {}).update(kind="input", output_scale=float(out.scale),
                                                    output_zero_point=out.zero_point, qmin=out.qmin, qmax=out.qmax)
        if self.record is not None:
            self.record[name] = value.data
        if self.teacher is not None and name in self.teacher:
            value = IntValue(self.teacher[name].to(value.data.device, torch.int64), value.grid)
        return value

    def _tied(self, node: fx.Node, args: list[Any], kwargs: dict[str, Any]) -> Any:
        mod = self._module(node)
        assert isinstance(mod, TiedQuantizer)
        source = mod.source
        assert isinstance(source, Quantizer)
        out = _codes_grid(source)
        x = args[0]
        if isinstance(x, IntValue):
            return self._requantize(mod.layer_name or node.name, x, out)
        return _quantize_float(x, out)

    def _conv_linear(self, node: fx.Node, args: list[Any], kwargs: dict[str, Any]) -> IntValue:
        mod = self._module(node)
        assert isinstance(mod, (QuantConv2d, QuantLinear))
        name = _layer_of(mod, node)
        x = args[0]
        if len(args) != 1 or kwargs or not isinstance(x, IntValue) or x.grid.acc:
            raise ConfigError(f"layer {name!r}: the integer runtime needs a conv/linear input on a quantized grid")
        weights, bias, acc_scale = self._cached(("W", node.name, x.grid.key(), str(x.data.device)),
                                                lambda: self._weights(mod, name, x.grid))
        xi = (x.data - x.grid.zero_point).to(torch.float64)
        if isinstance(mod, QuantConv2d):
            if mod.padding_mode != "zeros":
                raise ConfigError(f"layer {name!r}: the integer runtime supports zero padding only, got {mod.padding_mode!r}")
            acc = F.conv2d(xi, weights, None, mod.stride, mod.padding, mod.dilation, mod.groups)
        else:
            acc = F.linear(xi, weights)
        acc = acc.to(torch.int64)  # exact: integer-valued, |acc| < 2^31 (checked in _weights)
        if bias is not None:
            acc = acc + _per_channel(bias, acc)
        return IntValue(saturate(acc, INT32_MIN, INT32_MAX), _accumulator_grid(acc_scale))

    def _weights(self, mod: QuantConv2d | QuantLinear, name: str, xg: Grid) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        wq = mod.weight_quant
        if not isinstance(wq, Quantizer) or not wq.calibrated:
            raise ConfigError(f"layer {name!r}: the integer runtime needs an int weight quantizer (layer kept float?)")
        if bool((wq.zero_point != 0).any()) or wq.spec.axis not in (None, 0):
            raise ConfigError(f"layer {name!r}: the integer runtime needs symmetric weights (zero point 0), "
                              f"per tensor or per output channel; got axis={wq.spec.axis}")
        w_scale = wq.scale.detach().to(torch.float64).reshape(-1)
        # the one rounding of weights (float64 w / s, as the simulation, .qdet files and exporters do)
        w_codes = weight_codes(mod.weight.detach().float(), wq).to(torch.float64)
        acc_scale = (xg.scale * w_scale).reshape(-1)
        if acc_scale.numel() == 1:
            acc_scale = acc_scale.expand(mod.weight.shape[0]).clone()
        bias = None if mod.bias is None else quantize_bias(mod.bias, acc_scale, layer=name)
        # Worst case |Σ (q_x − Z_x)·q_w| + |b_q| per output channel must stay in int32 (and so below 2^53).
        span = max(abs(xg.qmin - xg.zero_point), abs(xg.qmax - xg.zero_point))
        worst = w_codes.abs().reshape(w_codes.shape[0], -1).sum(1) * span
        if bias is not None:
            worst = worst + bias.abs().to(torch.float64)
        if bool((worst > INT32_MAX).any()):
            raise ConfigError(f"layer {name!r}: the int32 accumulator could overflow (worst case {float(worst.max()):.3g})")
        self.params.setdefault(name, {}).update(
            kind="conv" if isinstance(mod, QuantConv2d) else "linear", input_scale=float(xg.scale),
            input_zero_point=xg.zero_point, weight_scale=w_scale.tolist(), weight_zero_point=0,
            accumulator_scale=acc_scale.tolist(), bias_int32=None if bias is None else bias.tolist(),
            weight_int8=w_codes.to(torch.int64).tolist() if w_codes.numel() <= 16 else None)
        return w_codes, bias, acc_scale

    def _relu(self, node: fx.Node, args: list[Any], kwargs: dict[str, Any]) -> Any:
        x = args[0]
        if not isinstance(x, IntValue):
            raise ConfigError(f"region {self.path!r}, node {node.name!r}: ReLU on a float value in the integer runtime")
        six = op_kind(node, self.gm) is OpKind.RELU6
        g = x.grid
        low = 0 if g.acc else g.zero_point
        data = x.data.clamp(min=low)
        if six:  # 6.0 on this grid, rounded: within half a step of the float clamp
            top = (torch.round(6.0 / g.scale).to(torch.int64) + low).to(data.device)
            data = torch.minimum(data, _per_channel(top, data))
        return IntValue(data, g)

    def _add(self, node: fx.Node, args: list[Any], kwargs: dict[str, Any]) -> IntValue:
        a, b = (v for v in args if isinstance(v, (IntValue, torch.Tensor)))
        if not (isinstance(a, IntValue) and isinstance(b, IntValue)) or a.grid.acc or b.grid.acc:
            raise ConfigError(f"region {self.path!r}, node {node.name!r}: the integer runtime adds two quantized "
                              "values only (quantize with residual=quantized_add, not fuse_conv_add)")
        out_q = _add_output_quantizer(self.gm, node)
        if out_q is not None:
            exact = self._add_to_codes(node, a, b, _codes_grid(out_q))
            if exact is not None:
                return exact
        twice_max = 2 * torch.maximum(a.grid.scale, b.grid.scale)
        out_scale = twice_max / 2**ADD_SHIFT

        def make() -> tuple[Any, ...]:
            (m0a,), (na,) = (t.tolist() for t in multipliers(a.grid.scale / twice_max, layer=node.name))
            (m0b,), (nb,) = (t.tolist() for t in multipliers(b.grid.scale / twice_max, layer=node.name))
            return m0a, na, m0b, nb

        m0a, na, m0b, nb = self._cached(("A", node.name, a.grid.key(), b.grid.key()), make)
        self.params.setdefault(_add_name(self.gm, node), {}).update(
            kind="add", input_scales=[float(a.grid.scale), float(b.grid.scale)],
            input_zero_points=[a.grid.zero_point, b.grid.zero_point], left_shift=ADD_SHIFT,
            input_m0=[m0a, m0b], input_shift=[na, nb], accumulator_scale=float(out_scale))
        sa = multiply_by_quantized_multiplier((a.data - a.grid.zero_point) * 2**ADD_SHIFT, m0a, na)
        sb = multiply_by_quantized_multiplier((b.data - b.grid.zero_point) * 2**ADD_SHIFT, m0b, nb)
        return IntValue(sa + sb, _accumulator_grid(out_scale))

    def _add_to_codes(self, node: fx.Node, a: IntValue, b: IntValue, out: Grid) -> IntValue | None:
        """Add straight onto the output quantizer's grid, rounding once (None if it cannot be exact).

        q_out = sat(Z + round((q1 − Z1)·M1 + (q2 − Z2)·M2)), M_i = S_i / S_out = M0_i · 2^-n_i: both
        terms are brought to the larger shift n exactly, (q_i − Z_i)·M0_i·2^(n − n_i), summed and
        shifted right by n once. That is the fake-quant add (a + b, then round to S_out) up to the
        31-bit multipliers; rounding each input to a 2^-20 grid first (the fallback) moves near-tie
        sums. A ReLU between add and quantizer commutes: it clamps the codes at Z afterwards.
        """
        def make() -> tuple[int, int, int, int] | None:
            (m0a,), (na,) = (t.tolist() for t in multipliers(a.grid.scale / out.scale, layer=node.name))
            (m0b,), (nb,) = (t.tolist() for t in multipliers(b.grid.scale / out.scale, layer=node.name))
            # |q − Z| < 2^9 and M0 < 2^31: each aligned term stays below 2^61 for alignments up to 2^21
            if min(m0a, m0b) == 0 or abs(na - nb) > 21:
                return None
            return m0a, na, m0b, nb

        found = self._cached(("A1", node.name, a.grid.key(), b.grid.key(), out.key()), make)
        if found is None:
            return None
        m0a, na, m0b, nb = found
        n = max(na, nb)
        total = ((a.data - a.grid.zero_point) * (m0a << (n - na))
                 + (b.data - b.grid.zero_point) * (m0b << (n - nb)))
        codes = requantize(total, 1, n, zero_point=out.zero_point, qmin=out.qmin, qmax=out.qmax)
        self.params.setdefault(_add_name(self.gm, node), {}).update(
            kind="add", input_scales=[float(a.grid.scale), float(b.grid.scale)],
            input_zero_points=[a.grid.zero_point, b.grid.zero_point], input_m0=[m0a, m0b], input_shift=[na, nb],
            output_scale=float(out.scale), output_zero_point=out.zero_point, qmin=out.qmin, qmax=out.qmax)
        return IntValue(codes, out)

    def _avgpool(self, node: fx.Node, args: list[Any], kwargs: dict[str, Any]) -> IntValue:
        x = args[0]
        if not isinstance(x, IntValue) or x.grid.acc:
            raise ConfigError(f"region {self.path!r}, node {node.name!r}: average pool needs a quantized input")
        mod = self._module(node)
        centred = (x.data - x.grid.zero_point).to(torch.float64)
        if isinstance(mod, nn.AvgPool2d):
            if mod.ceil_mode or (mod.padding and not mod.count_include_pad) or mod.divisor_override:
                raise ConfigError(f"node {node.name!r}: AvgPool2d with ceil_mode/count_include_pad=False/divisor_override "
                                  "is not supported by the integer runtime")
            k = mod.kernel_size if isinstance(mod.kernel_size, tuple) else (mod.kernel_size, mod.kernel_size)
            window = k[0] * k[1]
            sums = F.avg_pool2d(centred, mod.kernel_size, mod.stride, mod.padding) * window
        else:
            size = mod.output_size if mod is not None else (args[1] if len(args) > 1 else kwargs["output_size"])
            size = (size, size) if isinstance(size, int) else tuple(size)
            h, w = x.data.shape[-2:]
            if any(s is None for s in size):
                size = tuple(d if s is None else s for s, d in zip(size, (h, w)))
            if h % size[0] or w % size[1]:
                raise ConfigError(f"node {node.name!r}: adaptive average pool to {size} from {h}×{w} has unequal "
                                  "windows; the integer runtime needs divisible sizes")
            kh, kw = h // size[0], w // size[1]
            window = kh * kw
            sums = F.avg_pool2d(centred, (kh, kw), (kh, kw)) * window
        # sums of at most `window` integers < 2^8: exact in float64; round() only undoes the ÷·× of avg_pool2d
        return IntValue(torch.round(sums).to(torch.int64), _accumulator_grid(x.grid.scale / window))

    def _cat(self, node: fx.Node, args: list[Any], kwargs: dict[str, Any]) -> IntValue:
        tensors = args[0] if args else kwargs["tensors"]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        users = list(node.users)
        target = self._module(users[0]) if len(users) == 1 else None
        if not isinstance(target, Quantizer) or not all(isinstance(t, IntValue) for t in tensors):
            raise ConfigError(f"region {self.path!r}, node {node.name!r}: the integer runtime concatenates "
                              "quantized values followed by their output quantizer only")
        out = _codes_grid(target)
        parts = [self._requantize(f"{target.layer_name}.in{i}", t, out).data for i, t in enumerate(tensors)]
        return IntValue(torch.cat(parts, dim), out)

    def _shape_op(self, node: fx.Node, args: list[Any], kwargs: dict[str, Any]) -> Any:
        x = args[0]
        if not isinstance(x, IntValue):
            return _call(self, node, args, kwargs)
        if x.grid.acc and x.grid.scale.numel() > 1:
            raise ConfigError(f"region {self.path!r}, node {node.name!r}: reshaping a per-channel accumulator "
                              "(a conv output without its quantizer) is not supported")
        return IntValue(_call(self, node, [x.data, *args[1:]], kwargs), x.grid)

    def _via_float(self, node: fx.Node, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """Max-pool / nearest upsample: selection ops, exact on integer-valued float64."""
        x = args[0]
        if not isinstance(x, IntValue):
            return _call(self, node, args, kwargs)
        out = _call(self, node, [x.data.to(torch.float64), *args[1:]], kwargs)
        return IntValue(out.to(torch.int64), x.grid)

    def _pad(self, node: fx.Node, args: list[Any], kwargs: dict[str, Any]) -> Any:
        x = args[0]
        mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
        value = kwargs.get("value", args[3] if len(args) > 3 else None)
        if not isinstance(x, IntValue):
            return _call(self, node, args, kwargs)
        if mode != "constant" or value:
            raise ConfigError(f"region {self.path!r}, node {node.name!r}: only zero padding is supported")
        pad = args[1] if len(args) > 1 else kwargs["pad"]
        fill = 0 if x.grid.acc else x.grid.zero_point  # real 0 is code Z
        return IntValue(F.pad(x.data, pad, mode="constant", value=fill), x.grid)

    def _meta(self, node: fx.Node, args: list[Any], kwargs: dict[str, Any]) -> Any:
        args = [a.data if isinstance(a, IntValue) else a for a in args]
        return _call(self, node, args, kwargs)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _call(region: IntegerRegion, node: fx.Node, args: list[Any], kwargs: dict[str, Any]) -> Any:
    if node.op == "call_module":
        return region.gm.get_submodule(str(node.target))(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    return node.target(*args, **kwargs)  # type: ignore[operator]


def _quantize_float(x: torch.Tensor, out: Grid) -> IntValue:
    """A float tensor → codes on `out`: sat(round(x / S) + Z), computed in float64."""
    codes = saturate(torch.round(x.to(torch.float64) / out.scale.to(x.device)) + out.zero_point, out.qmin, out.qmax)
    return IntValue(codes.to(torch.int64), out)


def _dequantize(v: Any) -> Any:
    if not isinstance(v, IntValue):
        return v
    scale = _per_channel(v.grid.scale.to(v.data.device), v.data)
    return ((v.data - v.grid.zero_point).to(torch.float64) * scale).to(torch.float32)


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def _layer_of(mod: QuantConv2d | QuantLinear, node: fx.Node) -> str:
    """The layer name reports use: the weight quantizer's name ("<layer>.weight") without ".weight"."""
    wq_name = str(getattr(getattr(mod, "weight_quant", None), "layer_name", "") or "")
    return wq_name.removesuffix(".weight") if wq_name else str(node.target)


def _add_output_quantizer(gm: fx.GraphModule, node: fx.Node) -> Quantizer | None:
    """The Quantizer that alone reads the add (directly or through one ReLU/ReLU6), else None."""
    cur = node
    for _ in range(2):
        if len(cur.users) != 1:
            return None
        (cur,) = cur.users
        mod = gm.get_submodule(str(cur.target)) if cur.op == "call_module" else None
        if isinstance(mod, Quantizer):
            return mod
        if op_kind(cur, gm) not in CLAMPS:
            return None
    return None


def _add_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """The add's layer name: its output quantizer's (through a ReLU), else the node name."""
    q = _add_output_quantizer(gm, node)
    return q.layer_name if q is not None else node.name


@register_runtime
class IntegerRuntime(Runtime):
    """Integer-only reference execution (int8/uint8 codes, int32 accumulators, M0·2^-n requantization)."""

    name = "integer"
    description = "integer-only reference (int32 accumulate, int32 bias, M0·2^-n requantize), pure PyTorch"

    def lower_region(self, region: PreparedRegion, example_inputs: tuple[Any, ...], *, quantized: bool) -> nn.Module:
        gm = traced_module(region)
        if not quantized:
            return _FloatView(gm)
        lowered = IntegerRegion(gm, region.path)
        lowered(*example_inputs)  # fail here, naming the node, rather than on first use
        return lowered


__all__ = ["Grid", "IntValue", "IntegerRegion", "IntegerRuntime", "ADD_SHIFT"]
