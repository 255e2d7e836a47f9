"""Detection frames: float vs int8 boxes on one image with one layer's activation maps beneath, and a
GIF (Pillow) / MP4 (imageio-ffmpeg, when installed) made from a sequence of such frames.

One pass of the quantized model in float (quantizers disabled) and one in int8 give, per image, the
boxes of each (after the caller's `postprocess`) and the channel-max map of `layer`'s output in each.

    >>> import torch, qdet, tempfile
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1)).eval()
    >>> qm = qdet.quantize(net, [torch.rand(2, 3, 32, 32)], progress=False)
    >>> boxes = lambda out: [torch.tensor([[2.0, 2.0, 20.0, 20.0, 0.9, 1.0]])] * out.shape[0]
    >>> frames = detection_frames(qm, [torch.rand(3, 32, 32)], "0", boxes)
    >>> frames[0].float_map.shape, frames[0].float_boxes.shape
    (torch.Size([32, 32]), torch.Size([1, 6]))
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from qdet.analysis.capture import channel_max_map
from qdet.analysis.points import quant_points, select_points
from qdet.errors import ConfigError
from qdet.fileio import write_atomically
from qdet.qmodel import QuantizedModel
from qdet.quant.calibrate import quantization_disabled

__all__ = ["DetectionFrame", "detection_frames", "plot_detection_frame", "write_gif", "write_mp4"]

Postprocess = Callable[[Any], Sequence[Tensor]]  # model output → per image (n, 6): x1 y1 x2 y2 score class


@dataclass(frozen=True)
class DetectionFrame:
    """One image as the model saw it, with float and int8 detections and `layer`'s maps."""

    image: Tensor  # (3, H, W) in [0, 1]
    float_boxes: Tensor  # (n, 6) x1 y1 x2 y2 score class, input pixels
    int8_boxes: Tensor  # (m, 6)
    float_map: Tensor  # (h, w) channel max of the float activation of `layer`
    int8_map: Tensor  # (h, w) the same for the int8 activation
    layer: str
    sqnr_db: float  # of `layer`'s output on this image


def _sqnr(f: Tensor, q: Tensor) -> float:
    noise = float((f.double() - q.double()).pow(2).sum())
    return math.inf if noise == 0 else 10 * math.log10(max(float(f.double().pow(2).sum()), 1e-30) / noise)


def detection_frames(qmodel: QuantizedModel, images: Sequence[Tensor], layer: str, postprocess: Postprocess, *,
                     map_size: int = 160) -> list[DetectionFrame]:
    """Run each (3, H, W) image through `qmodel` in float and in int8; `layer` names a quantized layer."""
    point = select_points(quant_points(qmodel), [layer], need_activation=True)[0]
    assert point.activation is not None
    if not images:
        raise ConfigError("detection_frames: no images given")
    frames = []
    for img in images:
        if img.dim() != 3 or img.shape[0] != 3:
            raise ConfigError(f"detection_frames: expected (3, H, W) images, got {tuple(img.shape)}")
        kept: list[Tensor] = []
        handle = point.activation.register_forward_hook(lambda _m, _i, out: kept.append(out.detach()))
        try:
            with torch.no_grad():
                with quantization_disabled(qmodel):
                    out_f = qmodel(img[None])
                out_q = qmodel(img[None])
        finally:
            handle.remove()
        if len(kept) < 2:
            raise ConfigError(f"layer {layer!r} did not run on this input")
        f, q = kept[0], kept[-1]
        frames.append(DetectionFrame(img, postprocess(out_f)[0].cpu(), postprocess(out_q)[0].cpu(),
                                     channel_max_map(f, map_size)[0], channel_max_map(q, map_size)[0], layer,
                                     _sqnr(f, q)))
    return frames


def _draw_boxes(ax: Any, boxes: Tensor, color: str, names: Sequence[str] | None, *, linestyle: str = "-") -> None:
    from matplotlib.patches import Rectangle

    for x1, y1, x2, y2, score, cls in boxes.tolist():
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=1.4,
                               linestyle=linestyle))
        label = names[int(cls)] if names and 0 <= int(cls) < len(names) else str(int(cls))
        ax.text(x1, y1 - 2, f"{label} {score:.2f}", color="white", fontsize=6,
                bbox={"facecolor": color, "alpha": 0.7, "pad": 1, "edgecolor": "none"})


def plot_detection_frame(frame: DetectionFrame, path: str | Path, *, names: Sequence[str] | None = None,
                         title: str = "") -> Path:
    """Top: float boxes | int8 boxes; beneath: float map | int8 map | |int8 − float| map of `frame.layer`."""
    from qdet.analysis.plots import _figure, _save

    img = frame.image.permute(1, 2, 0).clamp(0, 1).numpy()
    h, w = img.shape[:2]
    fig = _figure(12.0, 2 * 6.0 * h / w + 1.6)
    grid = fig.add_gridspec(2, 6, height_ratios=[1.0, 1.0])
    top = [fig.add_subplot(grid[0, :3]), fig.add_subplot(grid[0, 3:])]
    for ax, boxes, color, label in ((top[0], frame.float_boxes, "tab:green", "float"),
                                    (top[1], frame.int8_boxes, "tab:red", "int8")):
        ax.imshow(img)
        _draw_boxes(ax, boxes, color, names)
        ax.set_title(f"{label}: {len(boxes)} detections", fontsize=10)
    f, q = frame.float_map.numpy(), frame.int8_map.numpy()
    lo, hi = float(min(f.min(), q.min())), float(max(f.max(), q.max()))
    bottom = [fig.add_subplot(grid[1, 2 * i : 2 * i + 2]) for i in range(3)]
    bottom[0].imshow(f, cmap="magma", vmin=lo, vmax=hi)
    im = bottom[1].imshow(q, cmap="magma", vmin=lo, vmax=hi)
    fig.colorbar(im, ax=bottom[:2], shrink=0.8, pad=0.01)
    err = bottom[2].imshow(abs(q - f), cmap="viridis")
    fig.colorbar(err, ax=bottom[2], shrink=0.8, pad=0.01)
    for ax, t in zip(bottom, ("float", "int8", "|int8 − float| of the channel max")):
        ax.set_title(f"{frame.layer}: {t}" if t != "int8" else t, fontsize=9)
    for ax in (*top, *bottom):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title + ': ' if title else ''}float vs int8; maps of {frame.layer} "
                 f"(SQNR {frame.sqnr_db:.1f} dB on this image)", fontsize=11)
    return _save(fig, path)


def _load_frames(pngs: Sequence[str | Path]) -> list[Any]:
    from PIL import Image

    if not pngs:
        raise ConfigError("no frames to animate")
    frames = []
    for p in pngs:
        with Image.open(p) as im:
            frames.append(im.convert("RGB"))
    size = frames[0].size
    return [f if f.size == size else f.resize(size) for f in frames]


def write_gif(pngs: Sequence[str | Path], path: str | Path, *, fps: float = 2.0) -> Path:
    """An animated GIF (looping) of the frame PNGs, all resized to the first frame's size."""
    frames = _load_frames(pngs)
    return write_atomically(Path(path), lambda tmp: frames[0].save(
        tmp, format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0))


def write_mp4(pngs: Sequence[str | Path], path: str | Path, *, fps: float = 2.0) -> Path:
    """An H.264 MP4 of the frame PNGs via imageio-ffmpeg (`pip install imageio-ffmpeg`)."""
    try:
        import imageio_ffmpeg
    except ImportError:
        raise ConfigError("MP4 output needs imageio-ffmpeg (pip install imageio-ffmpeg); GIF needs only Pillow") from None
    import numpy as np

    frames = _load_frames(pngs)
    w, h = frames[0].size
    w2, h2 = w - w % 2, h - h % 2  # yuv420p needs even sides

    def write(tmp: Path) -> None:
        gen = imageio_ffmpeg.write_frames(str(tmp), (w2, h2), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
                                          macro_block_size=1, output_params=["-y"])
        gen.send(None)
        for f in frames:
            gen.send(np.ascontiguousarray(np.asarray(f)[:h2, :w2]))
        gen.close()

    return write_atomically(Path(path), write)
