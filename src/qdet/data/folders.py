"""Image-folder classification datasets (root/<class>/*.png|jpg|JPEG), seeded subsets and loaders.

Classes are the sub-folder names sorted alphabetically (for CIFAR-10 that is the official label order).
Every failure is a `DataError` naming the folder or image at fault.

Example:
    >>> ds = cifar10_folder()  # assets_dir()/cifar10/test  # doctest: +SKIP
    >>> calib = seeded_subset(ds, 512, seed=0)  # doctest: +SKIP
    >>> images, labels = next(iter(make_loader(calib, 256)))  # (256, 3, 32, 32), (256,)  # doctest: +SKIP
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T

from qdet.errors import ConfigError, DataError
from qdet.paths import assets_dir

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "CIFAR10_CLASSES", "IMAGENETTE_WNID_TO_IMAGENET",
    "ImageFolderDataset", "classification_transform", "cifar10_folder", "imagenette_folder",
    "seeded_subset", "make_loader",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Imagenette's 10 WordNet ids → their index among the 1000 ImageNet classes (logits of torchvision models).
IMAGENETTE_WNID_TO_IMAGENET = {
    "n01440764": 0, "n02102040": 217, "n02979186": 482, "n03000684": 491, "n03028079": 497,
    "n03394916": 566, "n03417042": 569, "n03425413": 571, "n03445777": 574, "n03888257": 701,
}


def classification_transform(mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, *,
                             resize: int | None = None, crop: int | None = None) -> Callable[[Image.Image], Tensor]:
    """PIL image → normalised (3, H, W) float tensor: optional Resize(shorter side) and CenterCrop first.

    Example:
        >>> t = classification_transform(resize=256, crop=224)
        >>> t(Image.new("RGB", (300, 400))).shape
        torch.Size([3, 224, 224])
    """
    steps: list[Any] = []
    if resize is not None:
        steps.append(T.Resize(resize, interpolation=T.InterpolationMode.BILINEAR, antialias=True))
    if crop is not None:
        steps.append(T.CenterCrop(crop))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


class ImageFolderDataset(Dataset[tuple[Tensor, int]]):
    """root/<class>/<image> → (transformed image, label); classes sorted alphabetically.

    Example:
        >>> ds = ImageFolderDataset("cifar10/test", transform=classification_transform())  # doctest: +SKIP
        >>> ds.classes[:2], len(ds)  # doctest: +SKIP
        (['airplane', 'automobile'], 10000)
    """

    def __init__(self, root: str | Path, *, transform: Callable[[Image.Image], Any] | None = None,
                 target_transform: Callable[[int], Any] | None = None,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"image folder '{self.root}' does not exist")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.classes:
            raise DataError(f"image folder '{self.root}' has no class sub-folders (expected root/<class>/*.png)")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        exts = {e.lower() for e in extensions}
        self.samples: list[tuple[Path, int]] = [
            (f, i)
            for i, c in enumerate(self.classes)
            for f in sorted((self.root / c).iterdir())
            if f.suffix.lower() in exts and f.is_file()
        ]
        if not self.samples:
            raise DataError(f"image folder '{self.root}' contains no images with extensions {sorted(exts)}")
        self.transform = transform
        self.target_transform = target_transform
        self.image_size: tuple[int, int] | None = None  # (w, h) every image must have, when set

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        path, label = self.samples[index]
        image = _load_rgb(path)
        if self.image_size is not None and image.size != self.image_size:
            raise DataError(f"image '{path}' is {image.size[0]}x{image.size[1]}, expected "
                            f"{self.image_size[0]}x{self.image_size[1]} like the rest of the folder")
        x = self.transform(image) if self.transform is not None else image
        y = self.target_transform(label) if self.target_transform is not None else label
        return x, y


def _load_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # convert() forces the decode inside the try, and detaches from the file
    except Image.DecompressionBombError as e:
        raise DataError(f"cannot read image '{path}': refused, too many pixels ({e})") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        # PIL raises SyntaxError for some truncated/corrupt PNG chunks.
        raise DataError(f"cannot read image '{path}': {e}") from None


class _LabelTable:
    """Folder index → another label space (a picklable callable, so DataLoader workers can use it)."""

    def __init__(self, table: Sequence[int]) -> None:
        self.table = tuple(table)

    def __call__(self, index: int) -> int:
        return self.table[index]


def cifar10_folder(root: str | Path | None = None, *, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> ImageFolderDataset:
    """The CIFAR-10 test images as PNG folders (default `assets_dir()/cifar10/test`), 32×32, no resize.

    Example:
        >>> ds = cifar10_folder()  # doctest: +SKIP
        >>> ds[0][0].shape, ds[0][1]  # doctest: +SKIP
        (torch.Size([3, 32, 32]), 0)
    """
    ds = ImageFolderDataset(root if root is not None else assets_dir() / "cifar10" / "test",
                            transform=classification_transform(mean, std))
    if len(ds.classes) != len(CIFAR10_CLASSES):
        raise DataError(f"CIFAR-10 folder '{ds.root}' has {len(ds.classes)} class folders, expected 10")
    ds.image_size = (32, 32)
    return ds


def imagenette_folder(root: str | Path | None = None, *, resize: int | None = 256, crop: int | None = 224,
                      mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> ImageFolderDataset:
    """Imagenette val images (default `assets_dir()/imagenette/val`) with labels as ImageNet indices.

    The default Resize(256)+CenterCrop(224) is torchvision's ImageNet evaluation pipeline (the one its
    reference accuracies use); the bundled images are 224×224, so pass `resize=None` to feed them as they are.

    Example:
        >>> ds = imagenette_folder()  # doctest: +SKIP
        >>> ds[0][1]  # n01440764 (tench) → ImageNet class 0  # doctest: +SKIP
        0
    """
    ds = ImageFolderDataset(root if root is not None else assets_dir() / "imagenette" / "val",
                            transform=classification_transform(mean, std, resize=resize, crop=crop))
    unknown = [c for c in ds.classes if c not in IMAGENETTE_WNID_TO_IMAGENET]
    if unknown:
        raise DataError(f"Imagenette folder '{ds.root}' has class folders that are not Imagenette WordNet ids: "
                        f"{', '.join(unknown[:5])}")
    # Models emit 1000 ImageNet logits, so labels must live in that index space too.
    ds.target_transform = _LabelTable([IMAGENETTE_WNID_TO_IMAGENET[c] for c in ds.classes])
    if crop is None:
        ds.image_size = (224, 224) if resize is None else None
    return ds


def seeded_subset(dataset: Dataset[Any], n: int, seed: int = 0) -> Subset[Any]:
    """`n` distinct samples drawn reproducibly from `dataset` (e.g. a calibration set).

    Example:
        >>> ds = torch.utils.data.TensorDataset(torch.arange(10))
        >>> [int(x) for (x,) in seeded_subset(ds, 3, seed=0)] == [int(x) for (x,) in seeded_subset(ds, 3, seed=0)]
        True
    """
    size = len(dataset)  # type: ignore[arg-type]
    if n < 1:
        raise ConfigError(f"subset size must be at least 1, got {n}")
    if n > size:
        raise DataError(f"cannot draw {n} samples from a dataset of {size}")
    generator = torch.Generator().manual_seed(seed)  # local generator: never touches the global RNG
    indices = torch.randperm(size, generator=generator)[:n].tolist()
    return Subset(dataset, indices)


def seeded_split(dataset: Dataset[Any], n_first: int, seed: int = 0) -> tuple[Subset[Any], Subset[Any]]:
    """Two disjoint subsets: `n_first` seeded samples and all the rest (e.g. fine-tune / evaluate).

        >>> ds = torch.utils.data.TensorDataset(torch.arange(10))
        >>> a, b = seeded_split(ds, 4, seed=0)
        >>> len(a), len(b), set(a.indices).isdisjoint(b.indices)
        (4, 6, True)
    """
    size = len(dataset)  # type: ignore[arg-type]
    if not 1 <= n_first < size:
        raise ConfigError(f"split size {n_first} must be between 1 and {size - 1} (dataset of {size})")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, order[:n_first]), Subset(dataset, order[n_first:])


def make_loader(dataset: Dataset[Any], batch_size: int = 256, *, shuffle: bool = False, num_workers: int = 0,
                seed: int = 0, drop_last: bool = False,
                collate_fn: Callable[[list[Any]], Any] | None = None) -> DataLoader[Any]:
    """A DataLoader yielding (images (B, 3, H, W), labels (B,)); shuffling is seeded for reproducibility.

    Example:
        >>> ds = torch.utils.data.TensorDataset(torch.zeros(5, 3, 8, 8), torch.arange(5))
        >>> [x.shape[0] for x, _ in make_loader(ds, 2)]
        [2, 2, 1]
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      generator=generator, drop_last=drop_last, persistent_workers=False, collate_fn=collate_fn)
