"""Plots of a paired capture: activation maps, error hexbins, per-layer SQNR; each writes one PNG.

matplotlib is imported inside the functions (`import qdet` stays light) and only its object API is
used with the Agg canvas — no pyplot, no global backend switch, safe in threads and notebooks.

    >>> import torch, qdet, tempfile, pathlib
    >>> from torch import nn
    >>> from qdet.analysis.capture import capture_pairs
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    >>> qm = qdet.quantize(net, [torch.randn(4, 3, 16, 16)], progress=False)
    >>> cap = capture_pairs(qm, [torch.randn(4, 3, 16, 16)])
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> plot_error_hexbins(cap, out / "hexbin.png").name
    'hexbin.png'
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from qdet.analysis.capture import CaptureResult
from qdet.analysis.errors import LayerError, absolute_error, relative_error
from qdet.errors import ConfigError
from qdet.fileio import write_atomically

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["plot_activation_maps", "plot_error_hexbins", "plot_sqnr_bars", "plot_metric_curve", "plot_grouped_bars",
           "pick_layers"]

_KIND_COLOURS = {"conv": "#4C72B0", "linear": "#8172B2", "add": "#55A868", "cat": "#CCB974", "input": "#937860",
                 "mul": "#64B5CD"}


def _figure(width: float, height: float) -> "Figure":
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig: "Figure", path: str | Path) -> Path:
    """Write the PNG atomically (a reader never sees half a file) and return its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    return write_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))


def _check_layers(cap: CaptureResult, layers: Sequence[str] | None) -> list[str]:
    if layers is None:
        return list(cap.layers)
    import difflib

    for name in layers:
        if name not in cap.layers:
            close = difflib.get_close_matches(name, list(cap.layers), n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"layer {name!r} was not captured{hint}")
    return list(layers)


def pick_layers(names: Sequence[str], n: int) -> list[str]:
    """`n` names evenly spread over `names` (first and last included), in order.

    >>> pick_layers(["a", "b", "c", "d", "e"], 3)
    ['a', 'c', 'e']
    """
    if n >= len(names):
        return list(names)
    if n <= 1:
        return list(names[:n])
    idx = sorted({round(i * (len(names) - 1) / (n - 1)) for i in range(n)})
    return [names[i] for i in idx]


# ---------------------------------------------------------------- activation maps
def _display_image(img: Tensor) -> Tensor:
    """(C, H, W) of any normalisation → (H, W, 3) in [0, 1] (per-channel min–max) for display."""
    x = img.float()
    lo = x.amin(dim=(1, 2), keepdim=True)
    hi = x.amax(dim=(1, 2), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-12)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return x.permute(1, 2, 0)


def _resize(m: Tensor, size: tuple[int, int], *, smooth: bool = False) -> Tensor:
    """(h, w) → size: area when shrinking; nearest (honest pixels) or bilinear (`smooth`) when growing."""
    if tuple(m.shape) == size:
        return m
    up = size[0] >= m.shape[0] and size[1] >= m.shape[1]
    x = m[None, None].float()
    if not up:
        x = F.interpolate(x, size=size, mode="area")
    elif smooth:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    else:
        x = F.interpolate(x, size=size, mode="nearest-exact")
    return x[0, 0]


def plot_activation_maps(
    cap: CaptureResult,
    path: str | Path,
    *,
    layers: Sequence[str] | None = None,
    image_index: int = 0,
    overlay: bool = False,
    max_layers: int = 6,
    size: int | None = None,
    cmap: str = "magma",
    sqnr: dict[str, float] | None = None,
) -> Path:
    """Rows of [input] | float | int8 | error channel-max maps, one row per layer.

    float/int8 columns: max over channels of the activation; error column: max over channels of
    |int8 − float| (the worst error at each pixel). Maps are resized to one common size (default: the largest selected map, ≤ 64 px); float and
    int8 share a colour scale per row, the difference has its own (its colour bar gives the unit).
    With `overlay`, the maps are drawn semi-transparent over the input image. `layers` defaults to
    `max_layers` layers spread over the depth of the model.
    """
    names = [n for n in _check_layers(cap, layers) if cap.layers[n].float_maps is not None]
    if layers is None:
        names = pick_layers(names, max_layers)
    if not names:
        raise ConfigError("no captured layer has a 4-D (N, C, H, W) output to draw as an activation map")
    n_img = min(cap.layers[n].float_maps.shape[0] for n in names)  # type: ignore[union-attr]
    if not 0 <= image_index < n_img:
        raise ConfigError(f"image_index={image_index} out of range: {n_img} image(s) were captured")
    shapes = [tuple(cap.layers[n].float_maps.shape[1:]) for n in names]  # type: ignore[union-attr]
    side = size or max(max(s) for s in shapes)
    image = cap.inputs[image_index] if cap.inputs is not None and image_index < cap.inputs.shape[0] else None
    aspect = image.shape[-2] / image.shape[-1] if image is not None else shapes[0][0] / shapes[0][1]
    common = (max(1, round(side * aspect)), side) if aspect <= 1 else (side, max(1, round(side / aspect)))

    show_input = image is not None and not overlay
    cols = 3 + int(show_input)
    fig = _figure(2.6 * cols + 1.2, 2.35 * len(names) + 0.6)
    axes = fig.subplots(len(names), cols, squeeze=False)
    bg = _display_image(_resize_image(image, common)) if image is not None else None
    for r, name in enumerate(names):
        c = cap.layers[name]
        f = _resize(c.float_maps[image_index], common, smooth=overlay)  # type: ignore[index]
        q = _resize(c.quant_maps[image_index], common, smooth=overlay)  # type: ignore[index]
        e = c.error_maps if c.error_maps is not None else (c.float_maps - c.quant_maps).abs()  # type: ignore[operator]
        d = _resize(e[image_index], common, smooth=overlay)
        vmin, vmax = float(torch.minimum(f.min(), q.min())), float(torch.maximum(f.max(), q.max()))
        col = 0
        if show_input:
            axes[r, 0].imshow(bg.numpy(), interpolation="nearest")  # type: ignore[union-attr]
            axes[r, 0].set_title("input" if r == 0 else "", fontsize=10)
            col = 1
        alpha = 0.65 if overlay and bg is not None else 1.0
        for j, (m, title, lo, hi) in enumerate(((f, "float", vmin, vmax), (q, "int8", vmin, vmax),
                                                (d, "max over channels of |int8 − float|", 0.0, max(float(d.max()), 1e-12)))):
            ax = axes[r, col + j]
            if alpha < 1.0:
                ax.imshow(bg.mean(-1).numpy(), cmap="gray", interpolation="bilinear")  # type: ignore[union-attr]
            im = ax.imshow(m.numpy(), cmap="viridis" if j == 2 else cmap, vmin=lo, vmax=hi, alpha=alpha,
                           interpolation="nearest")
            if j >= 1:  # float/int8 share the colour bar drawn after the int8 map
                cb = fig.colorbar(im, ax=ax if j == 2 else [axes[r, col], axes[r, col + 1]], shrink=0.85,
                                  pad=0.02, aspect=15)
                cb.ax.tick_params(labelsize=7)
            if r == 0:
                ax.set_title(title, fontsize=10)
        label = name if sqnr is None or name not in sqnr else f"{name}\nSQNR {sqnr[name]:.1f} dB"
        axes[r, 0].set_ylabel(label, fontsize=9)
        hw = "×".join(str(v) for v in c.sample_shape)
        axes[r, cols - 1].text(1.0, -0.04, hw, transform=axes[r, cols - 1].transAxes, ha="right", va="top", fontsize=7,
                               color="0.35")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"activation maps (max over channels), sample {image_index}", fontsize=11)
    return _save(fig, path)


def _resize_image(img: Tensor, size: tuple[int, int]) -> Tensor:
    x = img[None].float()
    if x.shape[-2] >= size[0]:
        x = F.interpolate(x, size=size, mode="area")
    else:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x[0]


# ---------------------------------------------------------------- hexbins
def plot_error_hexbins(
    cap: CaptureResult,
    path: str | Path,
    *,
    layers: Sequence[str] | None = None,
    separate: bool = False,
    eps: float = 1e-3,
    gridsize: int = 70,
    max_points: int = 2_000_000,
    seed: int = 0,
    title: str | None = None,
) -> Path:
    """Hexbin density of absolute and relative error against the FLOAT activation (log colour).

    x = float activation f; left: |q − f|; right: |q − f| / max(|f|, eps) on a log axis (zero errors
    are drawn at the bottom edge). `separate=False` pools the sampled pairs of `layers` (default
    all) in one row (at most `max_points` of them, a seeded subsample); `separate=True` draws one
    row per layer.
    """
    names = _check_layers(cap, layers)
    rows: list[tuple[str, Tensor, Tensor]] = []
    if separate:
        rows = [(n, cap.layers[n].float_values, cap.layers[n].quant_values) for n in names]
    else:
        f = torch.cat([cap.layers[n].float_values for n in names]) if names else torch.empty(0)
        q = torch.cat([cap.layers[n].quant_values for n in names]) if names else torch.empty(0)
        if f.numel() > max_points:  # keep the pooled plot fast: a seeded uniform subsample
            idx = torch.randperm(f.numel(), generator=torch.Generator().manual_seed(seed))[:max_points]
            f, q = f[idx], q[idx]
        label = f"{len(names)} layers pooled" if len(names) != 1 else names[0]
        rows = [(label, f, q)]
    rows = [r for r in rows if r[1].numel() > 0]
    if not rows:
        raise ConfigError("no sampled activations to plot (capture with max_elements_per_layer > 0)")
    fig = _figure(12.0, 3.9 * len(rows) + 0.5)
    axes = fig.subplots(len(rows), 2, squeeze=False)
    for r, (label, f, q) in enumerate(rows):
        ae = absolute_error(f, q)
        re = relative_error(f, q, eps)
        floor = _log_floor(re)
        _hexbin(fig, axes[r, 0], f, ae, gridsize, "|int8 − float|")
        _hexbin(fig, axes[r, 1], f, re.clamp_min(floor), gridsize, f"|int8 − float| / max(|float|, {eps:g})",
                logy=True)
        axes[r, 0].set_title(f"{label}: absolute error (n={f.numel():,})", fontsize=10)
        axes[r, 1].set_title(f"{label}: relative error (zeros drawn at {floor:.0e})", fontsize=10)
    fig.suptitle(title or "quantization error vs float activation (density, log colour)", fontsize=11)
    return _save(fig, path)


def _log_floor(re: Tensor) -> float:
    pos = re[re > 0]
    if pos.numel() == 0:
        return 1e-6
    return float(10 ** math.floor(math.log10(float(pos.min().clamp_min(1e-12))) - 0.5))


def _hexbin(fig: "Figure", ax: Any, x: Tensor, y: Tensor, gridsize: int, ylabel: str, logy: bool = False) -> None:
    hb = ax.hexbin(x.numpy(), y.numpy(), gridsize=gridsize, bins="log", mincnt=1, cmap="viridis",
                   yscale="log" if logy else "linear", linewidths=0.2)
    cb = fig.colorbar(hb, ax=ax, pad=0.01)
    cb.set_label("count (log)", fontsize=8)
    ax.set_xlabel("float activation", fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(True, alpha=0.25, linewidth=0.5)


# ---------------------------------------------------------------- per-layer SQNR
def plot_sqnr_bars(errors: Sequence[LayerError], path: str | Path, *, kinds: dict[str, str] | None = None,
                   worst: int = 5, title: str | None = None) -> Path:
    """Horizontal bars of SQNR (dB) per layer in graph order; the `worst` layers are labelled.

    `kinds` (layer → kind) colours the bars; an exact layer (infinite SQNR) is drawn at the axis end.
    """
    if not errors:
        raise ConfigError("no layer errors to plot")
    names = [e.name for e in errors]
    finite = [e.sqnr_db for e in errors if math.isfinite(e.sqnr_db)]
    top = (max(finite) if finite else 60.0) * 1.08 + 1
    values = [e.sqnr_db if math.isfinite(e.sqnr_db) else top for e in errors]
    kinds = kinds or {}
    colours = [_KIND_COLOURS.get(kinds.get(n, ""), "#999999") for n in names]
    n = len(errors)
    fig = _figure(9.0, max(3.0, 0.17 * n + 1.3))
    ax = fig.subplots()
    ys = list(range(n))
    ax.barh(ys, values, color=colours, height=0.8)
    ax.set_yticks(ys)
    ax.set_yticklabels(names, fontsize=7 if n > 40 else 9)
    ax.invert_yaxis()
    ax.set_xlabel("SQNR (dB) of the int8 model's activation vs the float graph (errors accumulate with depth; "
                  "higher is better)", fontsize=8)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlim(min(0.0, min(values) * 1.1), top * 1.12)
    ax.grid(True, axis="x", alpha=0.3)
    order = sorted(range(n), key=lambda i: values[i])[:worst]
    for i in order:
        ax.text(values[i] + top * 0.01, i, f"{values[i]:.1f}", va="center", fontsize=7, color="#C44E52",
                fontweight="bold")
        ax.get_yticklabels()[i].set_color("#C44E52")
    for i, e in enumerate(errors):
        if not math.isfinite(e.sqnr_db):
            ax.text(top, i, " ∞", va="center", fontsize=7)
    used = [k for k in _KIND_COLOURS if k in set(kinds.get(n, "") for n in names)]
    handles = [(k, _KIND_COLOURS[k]) for k in used]
    if any(kinds.get(n, "") not in _KIND_COLOURS for n in names):
        handles.append(("other", "#999999"))
    if handles:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=c, label=k) for k, c in handles], fontsize=8, loc="lower right")
    ax.set_title(title or f"per-layer SQNR ({n} layers; worst {min(worst, n)} in red)", fontsize=11)
    return _save(fig, path)


# ---------------------------------------------------------------- studies
def plot_metric_curve(x: Sequence[float], mean: Sequence[float], lo: Sequence[float], hi: Sequence[float],
                      path: str | Path, *, xlabel: str, ylabel: str, title: str = "",
                      reference: float | None = None, reference_label: str = "float", logx: bool = True) -> Path:
    """Mean line with a min–max band (e.g. metric vs number of calibration images)."""
    fig = _figure(7.0, 4.2)
    ax = fig.subplots()
    ax.fill_between(list(x), list(lo), list(hi), alpha=0.25, color="#4C72B0", label="min–max over seeds")
    ax.plot(list(x), list(mean), "o-", color="#4C72B0", label="mean")
    if reference is not None:
        ax.axhline(reference, color="#C44E52", linestyle="--", linewidth=1, label=reference_label)
    if logx:
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(x))
        ax.set_xticklabels([f"{v:g}" for v in x])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=11)
    return _save(fig, path)


def plot_grouped_bars(groups: Sequence[str], series: dict[str, Sequence[float]], path: str | Path, *,
                      ylabel: str, title: str = "", reference: float | None = None,
                      errors: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None) -> Path:
    """Grouped bars: one group per entry of `groups`, one bar per series (e.g. observer × granularity).

    `errors` (series → (low, high) absolute values) draws min–max whiskers.
    """
    k = max(1, len(series))
    width = 0.8 / k
    fig = _figure(max(6.0, 1.1 * len(groups) * k / 2 + 3), 4.2)
    ax = fig.subplots()
    finite = [v for vals in series.values() for v in vals if math.isfinite(v)]
    for j, (label, vals) in enumerate(series.items()):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(groups))]
        yerr = None
        if errors and label in errors:
            lo, hi = errors[label]
            yerr = [[v - a for v, a in zip(vals, lo)], [b - v for v, b in zip(vals, hi)]]
        ax.bar(xs, list(vals), width=width * 0.95, label=label, yerr=yerr, capsize=2)
    if reference is not None:
        ax.axhline(reference, color="#C44E52", linestyle="--", linewidth=1, label="float")
        finite.append(reference)
    if finite:
        lo_v, hi_v = min(finite), max(finite)
        pad = max((hi_v - lo_v) * 0.15, 1e-3 * max(abs(hi_v), 1.0))
        ax.set_ylim(lo_v - pad * 3, hi_v + pad)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(list(groups), rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=11)
    return _save(fig, path)
