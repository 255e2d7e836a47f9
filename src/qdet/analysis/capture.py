"""Paired activation capture with bounded memory: (float, int8) samples and activation maps per layer.

For every batch the prepared graph runs twice — once with every quantizer disabled (the float
reference: same graph, BN folded) and once quantized — and hooks on each layer's output quantizer
pair the two values. Per layer, what is kept does not grow with the data:

* a seeded uniform reservoir of at most `max_elements_per_layer` (float, int8) pairs (for hexbins);
* the channel-max map (max over channels) of the first `max_images` samples, float and int8, and
  the channel-max of |int8 − float|, average-pooled to at most `map_size`×`map_size` (for
  activation maps; 4-D outputs of at least 2×2 only);
* streamed L1/MSE/SQNR/cosine statistics over *all* elements (`qdet.analysis.errors.LayerError`).

Keys are layer names (`QuantizedModel.layers[i].name`), the same for classifiers and detectors.
Peak memory is one batch's float activations at the selected layers (each is freed as soon as its
int8 counterpart is paired): lower the batch size or pass `layers=` for big inputs.

    >>> import torch, qdet
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    >>> qm = qdet.quantize(net, [torch.randn(4, 3, 16, 16)], progress=False)
    >>> cap = capture_pairs(qm, [torch.randn(4, 3, 16, 16)], max_elements_per_layer=100)
    >>> list(cap.layers), cap.layers["0"].float_values.shape, cap.layers["0"].float_maps.shape
    (['input_1', '0', '2'], torch.Size([100]), torch.Size([4, 14, 14]))
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from qdet.analysis.errors import LayerError, _Acc
from qdet.analysis.points import QuantPoint, quant_points, select_points
from qdet.qmodel import QuantizedModel
from qdet.quant.calibrate import default_transform, quantization_disabled

__all__ = ["LayerCapture", "CaptureResult", "capture_pairs", "channel_max_map", "flat_tensors"]


@dataclass
class LayerCapture:
    """What was kept for one layer (see the module docstring)."""

    name: str
    kind: str
    float_values: Tensor  # (n,) float32, n ≤ max_elements_per_layer: reservoir sample of the float activation
    quant_values: Tensor  # (n,) the int8 (fake-quant) value at the same positions
    seen: int = 0  # elements the reservoir was drawn from
    float_maps: Tensor | None = None  # (K, h, w) channel-max maps of the first K samples, float
    quant_maps: Tensor | None = None  # (K, h, w) the same for the int8 activation
    error_maps: Tensor | None = None  # (K, h, w) max over channels of |int8 − float| (the worst error per pixel)
    sample_shape: tuple[int, ...] = ()  # one sample's activation shape, e.g. (C, H, W)
    skipped_calls: int = 0  # calls whose float and int8 shapes differed (data-dependent shapes)
    error: LayerError | None = None  # streamed statistics over every paired element


@dataclass
class CaptureResult:
    """Per-layer captures in graph order, plus the first input images (for overlays)."""

    layers: dict[str, LayerCapture]
    inputs: Tensor | None = None  # (K, C, H, W) first K model inputs (≤ 256 px), when the input is an image
    batches: int = 0
    seed: int = 0
    max_elements_per_layer: int = 0
    output_sqnr_db: float | None = None  # SQNR of the model's output(s), int8 vs the float graph
    notes: list[str] = field(default_factory=list)

    def errors(self) -> list[LayerError]:
        """Per-layer statistics in graph order (layers that never ran are left out)."""
        return [c.error for c in self.layers.values() if c.error is not None]

    def names(self) -> list[str]:
        return list(self.layers)


def channel_max_map(x: Tensor, map_size: int = 64) -> Tensor:
    """(N, C, H, W) → (N, h, w): max over channels, average-pooled so that max(h, w) ≤ map_size.

    >>> channel_max_map(torch.ones(2, 3, 128, 64), 64).shape
    torch.Size([2, 64, 32])
    """
    m = x.detach().float().amax(dim=1)  # (N, H, W)
    h, w = m.shape[-2:]
    if max(h, w) > map_size:
        s = map_size / max(h, w)
        m = F.adaptive_avg_pool2d(m.unsqueeze(1), (max(1, round(h * s)), max(1, round(w * s)))).squeeze(1)
    return m.cpu()


class _Reservoir:
    """Bottom-k sampling: each element gets a uniform key; the k smallest keys are kept.

    That is a uniform sample without replacement over everything seen, whatever the batch sizes.
    numpy does the selection (argpartition; several times faster than torch's topk on CPU).
    """

    def __init__(self, k: int, seed: int) -> None:
        self.k = k
        self.rng = np.random.default_rng(seed)
        self.keys = np.empty(0, np.float32)
        self.f = np.empty(0, np.float32)
        self.q = np.empty(0, np.float32)
        self.seen = 0

    def add(self, f: Tensor, q: Tensor) -> None:
        fa = f.detach().reshape(-1).float().cpu().numpy()
        qa = q.detach().reshape(-1).float().cpu().numpy()
        n, r, k = fa.size, self.keys.size, self.k
        self.seen += n
        if k <= 0 or n == 0:
            return
        keys = self.rng.random(n, dtype=np.float32)
        if r + n <= k:
            self.keys = np.concatenate([self.keys, keys])
            self.f, self.q = np.concatenate([self.f, fa]), np.concatenate([self.q, qa])
            return
        # The new k-th smallest key is ≤ t (the current largest kept key, or 1) and ≈ k/seen: gather only
        # keys below a bound a little above k/seen; fall back to t when too few fall below it.
        t = float(self.keys.max()) if r >= k else 1.0
        guess = min(t, (1.3 * k + 4.0 * k**0.5) / self.seen)
        for bound in (guess, t):
            new_idx = np.flatnonzero(keys <= bound)
            old = np.flatnonzero(self.keys <= bound)
            if new_idx.size + old.size >= k:
                break
        keys = np.concatenate([self.keys[old], keys[new_idx]])
        fa = np.concatenate([self.f[old], fa[new_idx]])
        qa = np.concatenate([self.q[old], qa[new_idx]])
        if keys.size > k:
            idx = np.argpartition(keys, k - 1)[:k]
            keys, fa, qa = keys[idx], fa[idx], qa[idx]
        self.keys, self.f, self.q = keys, fa, qa

    def values(self) -> tuple[Tensor, Tensor]:
        """(float, int8) samples in a seeded order (by key), as float32 tensors."""
        order = np.argsort(self.keys, kind="stable")
        return torch.from_numpy(self.f[order].copy()), torch.from_numpy(self.q[order].copy())


class _FastAcc(_Acc):
    """`errors._Acc` on float32 tensors: torch's cascade float32 sums are accurate to ~1e-7 relative
    (cosine stays meaningful beyond 60 dB), and each batch's sums are accumulated in Python floats."""

    def add(self, ref: Tensor, q: Tensor) -> None:
        ref, q = ref.detach().float(), q.detach().float()
        d = q - ref
        lo, hi = d.aminmax()
        self.abs += float(d.abs().sum())
        self.sq += float((d * d).sum())
        self.ref_sq += float((ref * ref).sum())
        self.q_sq += float((q * q).sum())
        self.dot += float((ref * q).sum())
        self.max_abs = max(self.max_abs, float(-lo), float(hi))
        self.n += ref.numel()


class _LayerState:
    def __init__(self, point: QuantPoint, k: int, seed: int) -> None:
        self.point = point
        self.reservoir = _Reservoir(k, seed)
        self.acc = _FastAcc()
        self.fmaps: list[Tensor] = []
        self.qmaps: list[Tensor] = []
        self.emaps: list[Tensor] = []
        self.n_maps = 0
        self.sample_shape: tuple[int, ...] = ()
        self.skipped = 0

    def add(self, f: Tensor, q: Tensor, max_images: int, map_size: int) -> None:
        if f.shape != q.shape:
            self.skipped += 1
            return
        if f.numel() == 0:
            return
        self.acc.add(f, q)
        self.reservoir.add(f, q)
        if not self.sample_shape and f.dim() > 1:
            self.sample_shape = tuple(f.shape[1:])
        if f.dim() == 4 and min(f.shape[-2:]) >= 2 and self.n_maps < max_images:  # 1×1 maps show nothing
            take = max_images - self.n_maps
            self.fmaps.append(channel_max_map(f[:take], map_size))
            self.qmaps.append(channel_max_map(q[:take], map_size))
            self.emaps.append(channel_max_map((q[:take] - f[:take]).abs(), map_size))
            self.n_maps += self.fmaps[-1].shape[0]

    def result(self) -> LayerCapture:
        fm = _stack_maps(self.fmaps)
        qm = _stack_maps(self.qmaps)
        em = _stack_maps(self.emaps)
        r = self.reservoir
        fv, qv = r.values()
        return LayerCapture(
            self.point.name, self.point.kind, fv, qv, r.seen, fm, qm, em, self.sample_shape, self.skipped,
            self.acc.result(self.point.name) if self.acc.n else None,
        )


def _stack_maps(maps: list[Tensor]) -> Tensor | None:
    if not maps:
        return None
    if len({m.shape[1:] for m in maps}) > 1:  # varying input sizes (detectors): keep the first size
        maps = [m for m in maps if m.shape[1:] == maps[0].shape[1:]]
    return torch.cat(maps)


def _layer_seed(seed: int, name: str) -> int:
    import zlib

    return (seed * 1_000_003 + zlib.crc32(name.encode())) & 0xFFFFFFFF


def _first_image(args: tuple[Any, ...]) -> Tensor | None:
    for a in args:
        if isinstance(a, Tensor) and a.dim() == 4 and a.shape[1] in (1, 3) and a.is_floating_point():
            return a
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], Tensor) and a[0].dim() == 3:
            return a[0].unsqueeze(0)  # detectors take a list of (C, H, W) images
    return None


def _downsample_image(x: Tensor, size: int = 256) -> Tensor:
    x = x.detach().float().cpu()
    h, w = x.shape[-2:]
    if max(h, w) > size:
        s = size / max(h, w)
        x = F.interpolate(x, size=(max(1, round(h * s)), max(1, round(w * s))), mode="area")
    return x


def capture_pairs(
    qmodel: QuantizedModel,
    batches: Iterable[Any],
    transform_fn: Callable[[Any], Any] = default_transform,
    *,
    layers: Sequence[str] | None = None,
    max_elements_per_layer: int = 200_000,
    max_images: int = 4,
    map_size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> CaptureResult:
    """Paired (float, int8) capture over `batches` at every quantized layer (or only `layers`).

    `transform_fn` maps a batch to the model input, exactly as in calibration. Unknown names in
    `layers` raise `ConfigError` naming the layer and close matches. The same `seed` and batches give
    the same samples.
    """
    points = select_points(quant_points(qmodel), layers, need_activation=True)
    # one independent, seeded stream per layer: a layer's sample does not depend on which others are captured
    states = {p.name: _LayerState(p, max_elements_per_layer, _layer_seed(seed, p.name)) for p in points}
    by_module = {id(p.activation): p.name for p in points}
    image_list: list[Tensor] = []
    n_batches = 0
    out_acc = _OutputAcc()
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    was_training = qmodel.training
    qmodel.eval()
    try:
        for batch in tqdm(batches, total=total, desc="capturing", disable=not progress, leave=False):
            inputs = transform_fn(batch)
            args = inputs if isinstance(inputs, tuple) else (inputs,)
            seen_images = sum(x.shape[0] for x in image_list)
            if seen_images < max_images:
                img = _first_image(args)
                if img is not None:
                    image_list.append(_downsample_image(img[: max_images - seen_images]))
            ref, out_f = _run_float(qmodel, args, points, by_module)
            out_q = _run_quantized(qmodel, args, points, by_module, ref, states, max_images, map_size)
            out_acc.add_outputs(out_f, out_q)
            n_batches += 1
    finally:
        qmodel.train(was_training)
    result = CaptureResult(
        {name: s.result() for name, s in states.items()},
        torch.cat(image_list) if image_list and len({i.shape[1:] for i in image_list}) == 1 else None,
        n_batches, seed, max_elements_per_layer, out_acc.sqnr_db(),
    )
    for c in result.layers.values():
        if c.skipped_calls:
            result.notes.append(f"{c.name}: {c.skipped_calls} call(s) skipped (float and int8 shapes differ)")
        if c.error is None:
            result.notes.append(f"{c.name}: never ran on these batches")
    return result


def _hooks(points: Sequence[QuantPoint], fn: Callable[[nn.Module, Tensor], None]) -> list[Any]:
    handles = []
    for p in points:
        assert p.activation is not None
        handles.append(p.activation.register_forward_hook(lambda mod, _inp, out: fn(mod, out)))
    return handles


def _run_float(qmodel: QuantizedModel, args: tuple[Any, ...], points: Sequence[QuantPoint],
               by_module: dict[int, str]) -> tuple[dict[str, list[Tensor]], Any]:
    ref: dict[str, list[Tensor]] = {p.name: [] for p in points}

    def keep(mod: nn.Module, out: Tensor) -> None:
        ref[by_module[id(mod)]].append(out.detach().clone())

    handles = _hooks(points, keep)
    try:
        with torch.no_grad(), quantization_disabled(qmodel):
            out = qmodel(*args)
    finally:
        for h in handles:
            h.remove()
    return ref, out


def _run_quantized(qmodel: QuantizedModel, args: tuple[Any, ...], points: Sequence[QuantPoint],
                   by_module: dict[int, str], ref: dict[str, list[Tensor]], states: dict[str, _LayerState],
                   max_images: int, map_size: int) -> Any:
    calls = {p.name: 0 for p in points}

    def pair(mod: nn.Module, out: Tensor) -> None:
        name = by_module[id(mod)]
        i = calls[name]
        calls[name] += 1
        if i < len(ref[name]):
            f = ref[name][i]
            ref[name][i] = torch.empty(0)  # free the float copy as soon as it is paired
            states[name].add(f, out.detach(), max_images, map_size)
        else:
            states[name].skipped += 1

    handles = _hooks(points, pair)
    try:
        with torch.no_grad():
            out = qmodel(*args)
    finally:
        for h in handles:
            h.remove()
    return out


def flat_tensors(out: Any) -> list[Tensor]:
    """Every floating-point tensor in a nested output (tensors, lists, tuples, dicts by sorted key).

    >>> [t.shape for t in flat_tensors({"boxes": torch.zeros(2, 4), "labels": torch.zeros(2).long()})]
    [torch.Size([2, 4])]
    """
    if isinstance(out, Tensor):
        return [out.detach()] if out.is_floating_point() else []
    if isinstance(out, dict):
        return [t for k in sorted(out, key=str) for t in flat_tensors(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in flat_tensors(v)]
    return []


class _OutputAcc:
    """Σ f² and Σ (f − q)² over the model outputs whose float and int8 shapes match."""

    def __init__(self) -> None:
        self.sig = self.noise = 0.0
        self.pairs = 0

    def add_outputs(self, out_f: Any, out_q: Any) -> None:
        for f, q in zip(flat_tensors(out_f), flat_tensors(out_q)):
            if f.shape == q.shape and f.numel():
                f64, q64 = f.double(), q.double()
                self.sig += float((f64 * f64).sum())
                self.noise += float(((f64 - q64) ** 2).sum())
                self.pairs += 1

    def sqnr_db(self) -> float | None:
        if not self.pairs:
            return None
        if self.noise == 0.0:
            return math.inf
        return 10 * math.log10(max(self.sig, 1e-30) / self.noise)
