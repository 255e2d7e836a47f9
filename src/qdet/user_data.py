"""Inputs for a user model: `--input-size`, `--preprocess`, an image folder or seeded synthetic images.

    --input-size C,H,W | H,W          default 3,224,224 (H,W means 3 channels)
    --preprocess imagenet             ImageNet mean/std
    --preprocess "mean=0.5;std=0.25"  one value, or one per channel, each list comma-separated
    --preprocess prep.py:fn           fn(image) → tensor; image: float (C, H, W) in [0, 1]
    (no --preprocess)                 the (C, H, W) image in [0, 1] as it is

Images of a folder are resized (shorter side to max(H, W)) and centre-cropped to H×W, converted to
RGB (C = 3) or grayscale (C = 1), scaled to [0, 1], then preprocessed. A folder of the form
root/<class>/<image> with two or more classes is labeled (classes in sorted order, or their integer
values when every class folder is a number); any other folder is read recursively, unlabeled.
Without --data, calibration and evaluation use seeded uniform-noise images in [0, 1] (then the
preprocessing): "synthetic" data, which measures agreement with float, never accuracy.

    >>> parse_input_size("32,32"), parse_input_size("1,28,28")
    ((3, 32, 32), (1, 28, 28))
    >>> p = parse_preprocess("mean=0.5;std=0.25", channels=3)
    >>> p(torch.ones(3, 2, 2))[0, 0, 0].item()
    2.0
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from qdet.errors import ConfigError, DataError, ModelError

DEFAULT_INPUT_SIZE = (3, 224, 224)
UNLABELED = -1  # the label of an image from an unlabeled folder or of a synthetic image


def parse_input_size(text: str) -> tuple[int, int, int]:
    """`C,H,W` or `H,W` (3 channels) → (C, H, W); every value a positive integer (H, W up to 8192)."""
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (2, 3) or any(v < 1 for v in values) or any(v > 8192 for v in values[-2:]):
        raise ConfigError(f"--input-size {text!r}: expected C,H,W or H,W with positive integers "
                          f"(e.g. 3,224,224 or 224,224)")
    return (3, *values) if len(values) == 2 else tuple(values)  # type: ignore[return-value]


@dataclass(frozen=True)
class Normalize:
    """(image - mean) / std per channel; image (C, H, W)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, image: Tensor) -> Tensor:
        c = image.shape[0]
        mean = torch.tensor(self.mean * (c if len(self.mean) == 1 else 1), dtype=image.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std * (c if len(self.std) == 1 else 1), dtype=image.dtype).view(-1, 1, 1)
        return (image - mean) / std

    def __str__(self) -> str:
        return f"mean={','.join(f'{v:g}' for v in self.mean)};std={','.join(f'{v:g}' for v in self.std)}"


@dataclass(frozen=True)
class UserPreprocess:
    """A `file.py:fn` preprocessing function."""

    fn: Callable[[Tensor], Any]
    label: str

    def __call__(self, image: Tensor) -> Tensor:
        try:
            out = self.fn(image)
        except Exception as exc:  # noqa: BLE001 -- the user's function
            raise ModelError(f"--preprocess {self.label!r}: raised {type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:240]}") from None
        if not isinstance(out, Tensor) or not out.is_floating_point():
            raise ModelError(f"--preprocess {self.label!r}: returned {type(out).__name__}, expected a float tensor")
        return out

    def __str__(self) -> str:
        return self.label


def identity(image: Tensor) -> Tensor:
    return image


def parse_preprocess(text: str | None, channels: int) -> Callable[[Tensor], Tensor]:
    """`--preprocess` → a function of one (C, H, W) image in [0, 1] (see the module docstring)."""
    if text is None or text.strip().lower() in ("", "none"):
        return identity
    spec = text.strip()
    if spec.lower() == "imagenet":
        return _checked_normalize(Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), channels, text)
    head, sep, fn = spec.rpartition(":")
    if sep and head.lower().endswith(".py"):
        from qdet.user_model import load_function

        if not fn.isidentifier():
            raise ConfigError(f"--preprocess {text!r}: {fn!r} is not a function name (expected FILE.py:FUNCTION)")
        return UserPreprocess(load_function(Path(head), fn, option="--preprocess"), spec)
    fields: dict[str, tuple[float, ...]] = {}
    for item in filter(None, (p.strip() for p in spec.split(";"))):
        key, eq, values = item.partition("=")
        key = key.strip().lower()
        if not eq or key not in ("mean", "std") or key in fields:
            raise ConfigError(_preprocess_usage(text))
        try:
            fields[key] = tuple(float(v) for v in values.split(","))
        except ValueError:
            raise ConfigError(_preprocess_usage(text)) from None
    if set(fields) != {"mean", "std"}:
        raise ConfigError(_preprocess_usage(text))
    return _checked_normalize(Normalize(fields["mean"], fields["std"]), channels, text)


def _preprocess_usage(text: str) -> str:
    return (f"--preprocess {text!r}: expected imagenet, \"mean=M1,M2,M3;std=S1,S2,S3\" (one value or one per "
            f"channel) or FILE.py:FUNCTION")


def _checked_normalize(norm: Normalize, channels: int, text: str) -> Normalize:
    for name, values in (("mean", norm.mean), ("std", norm.std)):
        if len(values) not in (1, channels):
            raise ConfigError(f"--preprocess {text!r}: {name} has {len(values)} values, the input has {channels} "
                              f"channels (give 1 or {channels})")
        if not all(math.isfinite(v) for v in values):
            raise ConfigError(f"--preprocess {text!r}: {name} values must be finite numbers")
    if any(v <= 0 for v in norm.std):
        raise ConfigError(f"--preprocess {text!r}: std values must be > 0")
    return norm


class SyntheticImages(Dataset[tuple[Tensor, int]]):
    """`n` seeded uniform-noise images (C, H, W) in [0, 1], preprocessed; label UNLABELED."""

    synthetic = True
    labeled = False
    classes: Sequence[str] = ()

    def __init__(self, n: int, size: tuple[int, int, int], preprocess: Callable[[Tensor], Tensor], seed: int) -> None:
        self.n, self.size, self.preprocess, self.seed = n, size, preprocess, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return self.preprocess(torch.rand(self.size, generator=g)), UNLABELED


class FolderImages(Dataset[tuple[Tensor, int]]):
    """Image files (labels from class folders when the folder is labeled), resized and cropped to H×W."""

    synthetic = False

    def __init__(self, root: str | Path, size: tuple[int, int, int], preprocess: Callable[[Tensor], Tensor]) -> None:
        from torchvision import transforms as T

        from qdet.data.folders import IMAGE_EXTENSIONS

        self.root = Path(root)
        if not self.root.exists():
            raise DataError(f"--data '{self.root}': folder not found")
        if not self.root.is_dir():
            raise DataError(f"--data '{self.root}': not a folder (expected a folder of images)")
        if size[0] not in (1, 3):
            raise ConfigError(f"--input-size {','.join(map(str, size))}: image folders give 1 (grayscale) or 3 (RGB) "
                              f"channels, not {size[0]}")
        exts = set(IMAGE_EXTENSIONS)
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in exts and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(self.root).parts))
        if not files:
            raise DataError(f"--data '{self.root}': no images ({', '.join(sorted(exts))}) found in it or its "
                            f"sub-folders")
        classes = sorted({p.relative_to(self.root).parts[0] for p in files if len(p.relative_to(self.root).parts) == 2})
        self.labeled = len(classes) >= 2 and all(len(p.relative_to(self.root).parts) == 2 for p in files)
        self.classes: Sequence[str] = classes if self.labeled else ()
        if self.labeled and all(c.isdigit() for c in classes):
            index = {c: int(c) for c in classes}
        else:
            index = {c: i for i, c in enumerate(classes)}
        self.samples = [(p, index[p.relative_to(self.root).parts[0]] if self.labeled else UNLABELED) for p in files]
        h, w = size[1:]
        self.mode = "RGB" if size[0] == 3 else "L"
        self.resize = T.Compose([T.Resize(max(h, w), antialias=True), T.CenterCrop((h, w)), T.ToTensor()])
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image, UnidentifiedImageError

        path, label = self.samples[index]
        try:
            with Image.open(path) as im:
                image = im.convert(self.mode)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError) as exc:
            raise DataError(f"cannot read image '{path}': {exc}") from None
        return self.preprocess(self.resize(image)), label
