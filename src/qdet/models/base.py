"""The adapter contract: everything qdet needs to know about a model family, and nothing else.

Quantization algorithms (`qdet.quant`) never import `qdet.models`; they receive the regions an adapter
declares. A *region* is a submodule, named by its dotted path, whose `forward` is traced with
`torch.fx` and rewritten with quantizers. Everything outside the regions (box decoding, anchor/grid
generation, NMS, RoIAlign, post-processing) stays float: those are the model's *float islands*.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Protocol

from torch import nn

from qdet.qmodel import RegionSpec


class Task(Enum):
    CLASSIFICATION = "classification"
    DETECTION = "detection"


# The core's region type: the quantizer (qdet.qmodel) and adapters share one definition.
Region = RegionSpec


class ModelAdapter(Protocol):
    """What a model family declares. Implementations live in `qdet.models.*` and are registered by name."""

    name: str
    task: Task

    def build(self, weights: str | Path | None = None, **options: Any) -> nn.Module:
        """Return the float model in eval mode, with `weights` loaded (a file path) when given."""

    def regions(self, model: nn.Module) -> list[Region]:
        """The submodules to quantize; everything else is a float island."""

    def transform_fn(self, model: nn.Module) -> Callable[[Any], Any]:
        """Map one batch as the data loader yields it to the positional input of `model`.

        Calibration calls exactly this, so it sees the same preprocessing as inference.
        """


@dataclass
class AdapterRegistry:
    """Name → adapter. `qdet list` prints it; the CLI resolves model names through it."""

    _adapters: dict[str, ModelAdapter] = field(default_factory=dict)

    def register(self, adapter: ModelAdapter) -> ModelAdapter:
        self._adapters[adapter.name] = adapter
        return adapter

    def get(self, name: str) -> ModelAdapter:
        from qdet.errors import ConfigError

        try:
            return self._adapters[name]
        except KeyError:
            known = ", ".join(sorted(self._adapters))
            raise ConfigError(f"unknown model {name!r}; known models: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._adapters)


