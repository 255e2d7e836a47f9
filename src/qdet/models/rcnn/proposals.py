"""Paired analysis of a two-stage detector: let the int8 pass reuse the float pass's proposals.

Quantization moves the RPN's objectness scores, so the int8 model selects (slightly) different
proposals than the float one: box-head activations of the two passes then describe different boxes
(often a different number of them), and a per-layer float-vs-int8 comparison of the second stage is
meaningless or impossible. Inside `shared_proposals(model)` a forward pass given the *same images
list object* as the previous pass returns that pass's proposals from the RPN; the RPN head still runs
(and is measured), the box head sees identical RoIs, and its error is the features' error alone.

`qdet.analysis.errors.layer_errors` runs the float pass first and the int8 pass second on the same
input object, so:

    >>> with shared_proposals(qmodel):  # doctest: +SKIP
    ...     errors = layer_errors(qmodel, batches, adapter.transform_fn(qmodel))
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from qdet.errors import ConfigError
from qdet.models.rcnn.views import is_faster_rcnn

__all__ = ["find_detector", "shared_proposals"]


def find_detector(model: nn.Module) -> nn.Module:
    """The torchvision Faster R-CNN inside `model` (itself, or e.g. QuantizedModel.model)."""
    for m in model.modules():
        if is_faster_rcnn(m):
            return m
    raise ConfigError(f"no torchvision Faster R-CNN inside {type(model).__name__}")


@contextmanager
def shared_proposals(model: nn.Module) -> Iterator[None]:
    """Within the block, consecutive passes on the same input object share the first pass's proposals."""
    det = find_detector(model)
    state: dict[str, Any] = {"key": None, "inputs": None, "stored": None, "current": None}

    def before(_mod: nn.Module, args: tuple[Any, ...]) -> None:
        images = args[0] if args else None
        state["current"] = id(images)
        if state["key"] != id(images):
            state["key"], state["inputs"], state["stored"] = id(images), images, None  # keep a reference

    def after(_mod: nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
        if state["current"] != state["key"]:
            return None
        if state["stored"] is None:
            boxes, losses = output
            state["stored"] = ([b.detach().clone() for b in boxes], losses)
            return None
        boxes, losses = state["stored"]
        return [b.clone() for b in boxes], losses

    handles = [det.register_forward_pre_hook(before), det.rpn.register_forward_hook(after)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
