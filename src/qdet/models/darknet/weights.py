"""Darknet `.weights` files: read into a `DarknetBody`, and write (tests, conversions).

Format (little-endian): int32 major, minor, revision; `seen` (images trained on) as int64 when
major·10 + minor >= 2, else int32; then, for every [convolutional] layer in cfg order: with
batch_normalize the BN beta (bias), gamma (weight), running mean, running var, without it the conv
bias — `filters` floats each — then the conv weights (filters, c_in/groups, size, size); all float32.

    >>> from qdet.models.darknet.cfg import parse_cfg_text
    >>> from qdet.models.darknet.model import build_darknet
    >>> body = build_darknet(parse_cfg_text("[net]\\n[convolutional]\\nfilters=6\\nsize=1\\n[yolo]\\nmask=0\\n"
    ...                                     "anchors=1,1\\nclasses=1\\n", "toy.cfg"))
    >>> count_floats(body)  # 6 biases + 6·3 weights
    24
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qdet.errors import WeightsError
from qdet.models.darknet.layers import ConvBlock
from qdet.models.darknet.model import DarknetBody


@dataclass(frozen=True)
class WeightsHeader:
    major: int = 0
    minor: int = 2
    revision: int = 0
    seen: int = 0

    @property
    def seen_is_int64(self) -> bool:
        return self.major * 10 + self.minor >= 2

    @property
    def nbytes(self) -> int:
        return 12 + (8 if self.seen_is_int64 else 4)


def _tensors(block: ConvBlock) -> list[torch.Tensor]:
    """The tensors of one conv layer in file order."""
    conv = block.conv
    if isinstance(block.bn, nn.BatchNorm2d):
        bn = block.bn
        return [bn.bias, bn.weight, bn.running_mean, bn.running_var, conv.weight]  # type: ignore[list-item]
    assert conv.bias is not None
    return [conv.bias, conv.weight]


def _conv_layers(body: DarknetBody) -> list[tuple[int, ConvBlock]]:
    return [(i, m) for i, m in enumerate(body.layers) if isinstance(m, ConvBlock)]


def count_floats(body: DarknetBody) -> int:
    """How many float32 values a .weights file for this network holds after its header."""
    return sum(t.numel() for _, block in _conv_layers(body) for t in _tensors(block))


def read_header(data: bytes, name: str) -> tuple[WeightsHeader, int]:
    """The header and its size in bytes; WeightsError when the file is too short or implausible."""
    if len(data) < 12:
        raise WeightsError(f"{name}: {len(data)} bytes is too short for a Darknet .weights header (12-20 bytes)")
    major, minor, revision = (int(v) for v in np.frombuffer(data[:12], "<i4"))
    if not (0 <= major <= 1000 and 0 <= minor <= 1000 and 0 <= revision <= 1_000_000):
        raise WeightsError(f"{name}: bad Darknet .weights header (major={major}, minor={minor}, "
                           f"revision={revision}): not a Darknet weights file?")
    wide = major * 10 + minor >= 2
    end = 20 if wide else 16
    if len(data) < end:
        raise WeightsError(f"{name}: {len(data)} bytes is too short for the header of a version {major}.{minor} file ({end} bytes)")
    seen = int(np.frombuffer(data[12:end], "<i8" if wide else "<i4")[0])
    return WeightsHeader(major, minor, revision, seen), end


def load_darknet_weights(body: DarknetBody, path: str | Path) -> WeightsHeader:
    """Fill `body` in place from a Darknet .weights file; returns its header.

    Refuses a file that does not fit the cfg exactly: too short names the layer where it ran out,
    too long says how many floats were left over.
    """
    path = Path(path)
    name = path.name
    try:
        data = path.read_bytes()
    except OSError as e:
        raise WeightsError(f"cannot read Darknet weights '{path}': {e.strerror or e}") from None
    header, offset = read_header(data, name)
    payload = len(data) - offset
    need = count_floats(body)
    cfg = body.source
    if payload % 4:
        raise WeightsError(f"{name}: {payload} bytes after the header is not a whole number of float32 values")
    have = payload // 4
    values = np.frombuffer(data, "<f4", count=have, offset=offset)
    pos = 0
    for i, block in _conv_layers(body):
        for t in _tensors(block):
            n = t.numel()
            if pos + n > have:
                raise WeightsError(f"{name} has {have:,} floats, {cfg} needs {need:,}: the file runs out at layer {i} "
                                   f"([convolutional], {block.conv.out_channels} filters) — a different cfg?")
            with torch.no_grad():
                t.copy_(torch.from_numpy(values[pos:pos + n].copy()).view_as(t))
            pos += n
    if pos != have:
        raise WeightsError(f"{name} has {have:,} floats, {cfg} needs {need:,}: {have - pos:,} floats left over "
                           "after the last layer — a different cfg?")
    if not all(torch.isfinite(t).all() for _, b in _conv_layers(body) for t in _tensors(b)):
        raise WeightsError(f"{name}: the file holds NaN or infinite values")
    return header


def save_darknet_weights(body: DarknetBody, path: str | Path, header: WeightsHeader = WeightsHeader()) -> Path:
    """Write `body`'s conv/BN tensors as a Darknet .weights file (atomically: a temporary file, then rename)."""
    path = Path(path)
    seen_dtype = "<i8" if header.seen_is_int64 else "<i4"
    parts = [np.array([header.major, header.minor, header.revision], "<i4").tobytes(),
             np.array([header.seen], seen_dtype).tobytes()]
    for _, block in _conv_layers(body):
        for t in _tensors(block):
            parts.append(t.detach().cpu().float().contiguous().numpy().astype("<f4").tobytes())
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for p in parts:
            f.write(p)
    os.replace(tmp, path)
    return path
