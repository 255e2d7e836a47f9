"""Top-k accuracy of any callable that maps a (B, 3, H, W) batch to (B, num_classes) logits.

The same evaluator serves a float `nn.Module`, an int8 model, or a runtime session wrapper (its output may
be a numpy array), so numbers from different runtimes are directly comparable.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> loader = DataLoader(TensorDataset(torch.zeros(4, 3, 8, 8), torch.tensor([0, 0, 1, 2])), batch_size=2)
    >>> model = lambda x: torch.tensor([[9.0, 1, 0]]).expand(x.shape[0], 3)  # always predicts class 0
    >>> evaluate_topk(model, loader, topk=(1,), progress=False).top1
    50.0
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from qdet.errors import ConfigError, DataError

__all__ = ["TopKResult", "count_topk", "evaluate_topk", "topk_correct", "topk_result"]


@dataclass(frozen=True)
class TopKResult:
    """Accuracies in percent; `top5` is None (and `top1` NaN) when not requested."""

    top1: float
    top5: float | None
    n_images: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def topk_correct(logits: Tensor, labels: Tensor, ks: Sequence[int]) -> dict[int, int]:
    """How many rows of (B, C) `logits` have their label among the top k, for each k in `ks`.

    The one place that decides ties: quantized logits often tie, and `torch.topk` and `argmax`
    may pick different indices among equal values, so every top-k count in qdet comes from here.

    >>> topk_correct(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]), (1, 2))
    {1: 1, 2: 2}
    """
    kmax = min(max(ks), logits.shape[1])
    hits = logits.topk(kmax, dim=1).indices == labels.to(logits.device).reshape(-1, 1)  # (B, kmax)
    return {k: int(hits[:, :k].any(dim=1).sum()) for k in ks}


def evaluate_topk(model_or_callable: nn.Module | Callable[[Tensor], Any], loader: Iterable[Any], *,
                  topk: Sequence[int] = (1, 5), progress: bool = True, desc: str = "eval") -> TopKResult:
    """Run `model_or_callable` over `loader` (yielding (images, labels)) and return top-1/top-5 accuracy.

    An `nn.Module` is evaluated in eval mode (its previous mode is restored) on its own device.
    When the model has fewer than k classes, top-k counts every image as correct.

    Example:
        >>> result = evaluate_topk(model, make_loader(cifar10_folder(), 256))  # doctest: +SKIP
        >>> result.as_dict()  # doctest: +SKIP
        {'top1': 91.73, 'top5': 99.72, 'n_images': 10000}
    """
    return topk_result(*count_topk(model_or_callable, loader, topk=topk, progress=progress, desc=desc))


def count_topk(model_or_callable: nn.Module | Callable[[Tensor], Any], loader: Iterable[Any], *,
               topk: Sequence[int] = (1, 5), progress: bool = True, desc: str = "eval") -> tuple[dict[int, int], int]:
    """Top-k hit counts {k: hits} and the number of images over `loader`: what `evaluate_topk` turns
    into percent, and what the shards of a sharded evaluation add up."""
    ks = sorted(set(topk))
    if not ks or ks[0] < 1 or not set(ks) <= {1, 5}:
        raise ConfigError(f"topk must be a non-empty subset of (1, 5), got {tuple(topk)}")
    module = model_or_callable if isinstance(model_or_callable, nn.Module) else None
    device = _device_of(module)
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()

    from qdet.quant.calibrate import DegenerateImages

    correct = {k: 0 for k in ks}
    n = 0
    tally = DegenerateImages()
    bar = _progress_bar(loader, desc) if progress else None
    try:
        with torch.inference_mode():
            for batch in bar if bar is not None else loader:
                images, labels = _split(batch)
                tally.add(images)
                logits = _as_logits(model_or_callable(images.to(device) if device is not None else images))
                labels = torch.as_tensor(labels).to(logits.device).reshape(-1)
                if logits.shape[0] != labels.shape[0]:
                    raise ConfigError(f"model returned {logits.shape[0]} rows of logits for a batch of {labels.shape[0]}")
                for k, hits in topk_correct(logits, labels, ks).items():
                    correct[k] += hits
                n += labels.shape[0]
                if bar is not None:
                    bar.set_postfix({f"top{ks[0]}": f"{100.0 * correct[ks[0]] / n:.2f}"})
    finally:
        if bar is not None:
            bar.close()
        if module is not None:
            module.train(was_training)
    if n == 0:
        raise DataError("the evaluation loader yielded no images")
    tally.warn("evaluation")
    return correct, n


def topk_result(correct: Mapping[int, int], n: int) -> TopKResult:
    """Hit counts of `n` images → accuracies in percent.

    >>> topk_result({1: 3, 5: 4}, 4)
    TopKResult(top1=75.0, top5=100.0, n_images=4)
    """
    pct = {k: 100.0 * c / n for k, c in correct.items()}
    return TopKResult(top1=pct.get(1, float("nan")), top5=pct.get(5), n_images=n)


def _device_of(module: nn.Module | None) -> torch.device | None:
    if module is None:
        return None
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else None


def _split(batch: Any) -> tuple[Tensor, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise DataError(f"the evaluation loader must yield (images, labels) pairs, got {type(batch).__name__}")


def _as_logits(out: Any) -> Tensor:
    # Runtime wrappers may return numpy arrays or a one-element list of outputs.
    if isinstance(out, (tuple, list)) and len(out) == 1:
        out = out[0]
    logits = torch.as_tensor(out)
    if logits.ndim != 2:
        raise ConfigError(f"expected (batch, num_classes) logits from the model, got shape {tuple(logits.shape)}")
    return logits.float()


def _progress_bar(loader: Iterable[Any], desc: str) -> Any:
    from tqdm.auto import tqdm  # lazy: keep `import qdet` light

    total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    return tqdm(loader, total=total, desc=desc, unit="batch", leave=False)
