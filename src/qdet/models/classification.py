"""Classifier adapters: CIFAR-10 ResNet20/32/44/56 and torchvision ResNet18/34/50, SqueezeNet 1.0/1.1.

A classifier is quantized as one region (the whole model); a batch is `(images, labels)` and the model
input is `images`. Each adapter also carries what evaluation needs: input size, normalisation, number of
classes, class names and its evaluation dataset.

Example:
    >>> from qdet.models import REGISTRY
    >>> adapter = REGISTRY.get("resnet20")
    >>> model = adapter.build()  # bundled CIFAR-10 weights from assets_dir()/weights  # doctest: +SKIP
    >>> adapter.regions(model)  # doctest: +SKIP
    [Region(path='', leaf_modules=())]
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qdet.data.folders import (CIFAR10_CLASSES, IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset,
                               cifar10_folder, classification_transform, imagenette_folder)
from qdet.errors import ConfigError, WeightsError
from qdet.models import cifar_resnet
from qdet.models.base import Region, Task
from qdet.models.weights import load_into, load_state_dict_file
from qdet.paths import assets_dir

__all__ = ["RANDOM_INIT", "functionalize_inplace", "CifarResNetAdapter", "TorchvisionClassifierAdapter",
           "CLASSIFICATION_ADAPTERS"]

# Pass weights="random" for an explicit random initialisation (no warning), e.g. in tests.
RANDOM_INIT = "random"


def functionalize_inplace(model: nn.Module) -> nn.Module:
    """Set `inplace=False` on every module that has an in-place flag (ReLU, ReLU6, Hardtanh, Dropout, ...).

    In-place activations overwrite the tensor an observer or a quantizer inserted before them still
    refers to. torchvision's `out += identity` needs nothing: fx traces a Proxy's `+=` as `operator.add`.

    Example:
        >>> m = functionalize_inplace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(inplace=True)))
        >>> m[1].inplace
        False
    """
    for module in model.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False
    return model


def _images_of(batch: Any) -> Tensor:
    # Loaders yield (images, labels); calibration loops may also pass bare image tensors.
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@dataclass(frozen=True)
class _ClassifierAdapter:
    """Shared behaviour; subclasses implement `build`, `class_names` and `eval_dataset`."""

    name: str
    num_classes: int
    input_size: tuple[int, int]  # (H, W) the model is evaluated at
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: int | None  # shorter side before the center crop; None: images are fed at their size
    task: Task = Task.CLASSIFICATION

    @property
    def input_range(self) -> tuple[float, float]:
        """Value range of a correctly preprocessed input (pixels in [0, 1], normalised)."""
        return min(-m / s for m, s in zip(self.mean, self.std)), max((1 - m) / s for m, s in zip(self.mean, self.std))

    def regions(self, model: nn.Module) -> list[Region]:
        """A classifier is quantized whole: no float islands."""
        return [Region("")]

    def transform_fn(self, model: nn.Module) -> Callable[[Any], Tensor]:
        """Batch `(images, labels)` → `images` on the model's device."""
        device = _device_of(model)
        return lambda batch: _images_of(batch).to(device)

    def preprocess(self) -> Callable[[Any], Tensor]:
        """PIL image → normalised (3, H, W) tensor, exactly as at evaluation."""
        return classification_transform(self.mean, self.std, resize=self.resize, crop=self.input_size[0])


@dataclass(frozen=True)
class CifarResNetAdapter(_ClassifierAdapter):
    """CIFAR-10 ResNet-(6n+2) with option-A shortcuts; bundled weights in assets_dir()/weights.

    Example:
        >>> adapter = CifarResNetAdapter.for_depth(20)
        >>> model = adapter.build(weights="random")
        >>> model(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """

    depth: int = 20

    @classmethod
    def for_depth(cls, depth: int) -> CifarResNetAdapter:
        return cls(name=f"resnet{depth}", num_classes=10, input_size=(32, 32), mean=IMAGENET_MEAN,
                   std=IMAGENET_STD, resize=None, depth=depth)

    def bundled_weights(self) -> Path:
        """Where the pretrained CIFAR-10 file is expected (it may be absent)."""
        return assets_dir() / "weights" / f"cifar10_resnet{self.depth}.pt"

    def build(self, weights: str | Path | None = None, **options: Any) -> nn.Module:
        """Float model in eval mode. weights: a file, None (bundled file, else random + warning) or "random".

        Options: num_classes (default 10).
        """
        num_classes = int(options.pop("num_classes", self.num_classes))
        _reject_unknown(self.name, options)
        model = cifar_resnet.cifar_resnet(self.depth, num_classes)
        if weights is None:
            bundled = self.bundled_weights()
            if not bundled.is_file():
                warnings.warn(f"{self.name}: bundled weights '{bundled}' not found; using random initialisation",
                              stacklevel=2)
                return model.eval()
            weights = bundled
        if str(weights) != RANDOM_INIT:
            state = load_state_dict_file(weights, expected_keys_from=model)
            load_into(model, state, source=str(weights), model_name=self.name)
        return model.eval()

    def class_names(self) -> list[str]:
        return list(CIFAR10_CLASSES)

    def eval_dataset(self, root: str | Path | None = None) -> ImageFolderDataset:
        """CIFAR-10 test folders (default assets_dir()/cifar10/test) with this model's normalisation."""
        return cifar10_folder(root, mean=self.mean, std=self.std)


@dataclass(frozen=True)
class TorchvisionClassifierAdapter(_ClassifierAdapter):
    """A torchvision ImageNet classifier (resnet18/34/50, squeezenet1_0/1_1) with in-place ops disabled.

    weights: a state-dict file, a torchvision weights name ("DEFAULT", "IMAGENET1K_V1"; downloads),
    "random", or None (random + warning).

    Example:
        >>> model = TorchvisionClassifierAdapter.imagenet("resnet18").build(weights="random")
        >>> model(torch.zeros(1, 3, 224, 224)).shape
        torch.Size([1, 1000])
    """

    @classmethod
    def imagenet(cls, name: str) -> TorchvisionClassifierAdapter:
        return cls(name=name, num_classes=1000, input_size=(224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   resize=256)

    def _weights_enum(self) -> Any:
        from torchvision.models import get_model_weights

        return get_model_weights(self.name)

    def build(self, weights: str | Path | None = None, **options: Any) -> nn.Module:
        """Float model in eval mode with `inplace=False` everywhere. Options: num_classes (default 1000)."""
        import torchvision

        num_classes = int(options.pop("num_classes", self.num_classes))
        _reject_unknown(self.name, options)
        model = getattr(torchvision.models, self.name)(weights=None, num_classes=num_classes)
        functionalize_inplace(model)
        if weights is None:
            warnings.warn(f"{self.name}: no weights given; using random initialisation (pass a state-dict file "
                          "or weights='DEFAULT')", stacklevel=2)
        elif str(weights) != RANDOM_INIT:
            member = self._enum_member(weights)
            if member is not None:
                state, source = self._download(member, num_classes), f"torchvision {member}"
            else:
                state, source = load_state_dict_file(weights, expected_keys_from=model), str(weights)
            load_into(model, state, source=source, model_name=self.name)
        return model.eval()

    def _enum_member(self, weights: str | Path) -> Any | None:
        """The torchvision weights-enum member `weights` names, or None when it should be a file path."""
        if isinstance(weights, Path):
            return None
        enum = self._weights_enum()
        key = weights.removeprefix(f"{enum.__name__}.")
        if key in enum.__members__:
            return enum[key]
        if key.isupper() and not any(c in key for c in "./\\") and not Path(weights).exists():
            # Looks like an enum name ("IMAGENET1K_V3") rather than a path: say which names exist.
            raise ConfigError(f"unknown torchvision weights {weights!r} for {self.name}; "
                              f"known: {', '.join(enum.__members__)}, or a state-dict file")
        return None

    def _download(self, member: Any, num_classes: int) -> dict[str, Tensor]:
        n = len(member.meta.get("categories", ()))
        if n and n != num_classes:
            raise ConfigError(f"{self.name}: torchvision weights {member} have {n} classes, not num_classes={num_classes}")
        try:
            # weights_only=True: torch.hub's default would unpickle arbitrary code.
            return member.get_state_dict(progress=True, check_hash=True, weights_only=True)
        except OSError as e:  # URLError / socket errors / unwritable cache
            raise WeightsError(
                f"could not download torchvision weights {member} for {self.name} from {member.url} "
                f"(no network? {e}); download the file elsewhere and pass it: build(weights='path/to/file.pth')"
            ) from None
        except RuntimeError as e:  # hash mismatch or a truncated download
            raise WeightsError(f"downloaded torchvision weights {member} for {self.name} are corrupt ({e})") from None

    def class_names(self) -> list[str]:
        """The 1000 ImageNet category names (from torchvision's metadata; no download)."""
        return list(self._weights_enum().DEFAULT.meta["categories"])

    def eval_dataset(self, root: str | Path | None = None) -> ImageFolderDataset:
        """Imagenette val folders (default assets_dir()/imagenette/val), labels as ImageNet indices."""
        return imagenette_folder(root, resize=self.resize, crop=self.input_size[0], mean=self.mean, std=self.std)


def _reject_unknown(name: str, options: dict[str, Any]) -> None:
    if options:
        raise ConfigError(f"unknown build option(s) for {name}: {', '.join(sorted(options))}; known: num_classes")


CIFAR_DEPTHS: Sequence[int] = (20, 32, 44, 56)
TORCHVISION_NAMES: Sequence[str] = ("resnet18", "resnet34", "resnet50", "squeezenet1_0", "squeezenet1_1")

CLASSIFICATION_ADAPTERS: tuple[_ClassifierAdapter, ...] = (
    *(CifarResNetAdapter.for_depth(d) for d in CIFAR_DEPTHS),
    *(TorchvisionClassifierAdapter.imagenet(n) for n in TORCHVISION_NAMES),
)
