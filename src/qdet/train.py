"""A small training loop for quantization-aware training (progress bar, freeze schedule).

Any loop works with a `prepare_qat` model; this one only adds the schedule and a log:

    qat_model = qdet.prepare_qat(model, calib_loader, cfg, adapter=adapter)
    log = train_qat(qat_model, train_loader, classification_loss, steps=300, lr=1e-4)
    qmodel = qdet.convert(qat_model)

Detectors: `qdet qat yolov5n` trains the quantized body on qdet's YOLOv5 loss (`qat_jobs.yolo_recipe`).
A torchvision Faster R-CNN returns its own loss dict in train mode, so (images, targets) batches suffice:

    log = train_qat(qat_model, loader, lambda losses, _: sum(losses.values()), steps=100,
                    transform_fn=lambda batch: (batch[0], batch[1]))
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from qdet.config import QATConfig
from qdet.errors import ConfigError, DataError
from qdet.quant.calibrate import default_transform
from qdet.quant.qat import QATSchedule


@dataclass
class TrainLog:
    """What a QAT run did: per-step losses, freeze events (step, "bn"/"observers"), seconds."""

    steps: int = 0
    losses: list[float] = field(default_factory=list)
    events: list[tuple[int, str]] = field(default_factory=list)
    seconds: float = 0.0


def classification_loss(outputs: torch.Tensor, batch: Any) -> torch.Tensor:
    """Cross-entropy against the labels of an `(images, labels)` batch."""
    return F.cross_entropy(outputs, batch[1].to(outputs.device))


def train_qat(
    model: nn.Module,
    data: Iterable[Any],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    *,
    steps: int,
    lr: float = 1e-4,
    optimizer: torch.optim.Optimizer | None = None,
    transform_fn: Callable[[Any], Any] = default_transform,
    qat: QATConfig | None = None,
    progress: bool = True,
) -> TrainLog:
    """Train `model` (from `prepare_qat`) for `steps` optimiser steps, cycling over `data`.

    `loss_fn(outputs, batch)` returns a scalar. Default optimiser: Adam(lr). The freeze schedule
    comes from `qat` or the model's own `qat_config`.
    """
    if steps < 1:
        raise ConfigError(f"steps={steps} must be at least 1")
    qat = qat or getattr(model, "qat_config", None) or QATConfig()
    schedule = QATSchedule(model, qat.freeze_bn_after, qat.freeze_observers_after)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer or torch.optim.Adam(params, lr=lr)
    log = TrainLog()
    model.train()
    start = time.perf_counter()
    batches = _cycle(data)
    bar = tqdm(range(steps), desc="QAT", disable=not progress)
    for step in bar:
        batch = next(batches)
        inputs = transform_fn(batch)
        outputs = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
        loss = loss_fn(outputs, batch)
        value = float(loss.detach())
        if not torch.isfinite(loss.detach()):
            raise DataError(f"QAT loss became {value} at step {step + 1}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.events.extend((step + 1, e) for e in schedule.step())
        log.losses.append(value)
        bar.set_postfix(loss=f"{log.losses[-1]:.4f}")
    log.steps = steps
    log.seconds = time.perf_counter() - start
    model.eval()
    return log


def random_crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """CIFAR training augmentation on a batch (B, C, H, W): one random `pad`-pixel shifted crop
    for the batch and a per-image horizontal flip."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (pad, pad, pad, pad))
    i, j = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    x = padded[..., i:i + h, j:j + w]
    flip = torch.rand(len(x), generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class ShuffledBatches:
    """Seeded, reshuffled-every-epoch batches of in-memory (images, labels), optionally augmented.

    >>> data = ShuffledBatches(torch.zeros(10, 3, 4, 4), torch.arange(10), batch_size=4, seed=0)
    >>> [len(y) for _, y in data]
    [4, 4]
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, seed: int = 0,
                 augment: bool = False) -> None:
        if len(images) < batch_size:
            raise DataError(f"{len(images)} training images are fewer than one batch of {batch_size}")
        self.images, self.labels, self.batch_size, self.augment = images, labels, batch_size, augment
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Any:
        order = torch.randperm(len(self.images), generator=self.gen)
        for i in range(0, len(order) - self.batch_size + 1, self.batch_size):
            idx = order[i:i + self.batch_size]
            x = self.images[idx]
            yield (random_crop_flip(x, self.gen) if self.augment else x), self.labels[idx]


def stack_dataset(dataset: Any, *, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode an (image, label) dataset once into (N, C, H, W) images and (N,) labels."""
    items = [dataset[i] for i in tqdm(range(len(dataset)), desc="loading", disable=not progress, leave=False)]
    if not items:
        raise DataError("the dataset is empty")
    xs, ys = zip(*items)
    return torch.stack(xs), torch.tensor(ys)


def _cycle(data: Iterable[Any]) -> Any:
    """Endless iteration over a re-iterable loader (a new epoch each pass, so shuffling applies)."""
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise DataError("the QAT training data is empty")
