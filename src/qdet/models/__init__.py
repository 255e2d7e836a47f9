"""Model adapters, registered by name: `REGISTRY.get("resnet20").build()`.

Example:
    >>> from qdet.models import REGISTRY
    >>> "resnet56" in REGISTRY.names()
    True
"""
from __future__ import annotations

from qdet.models.base import AdapterRegistry, ModelAdapter, Region, Task
from qdet.models.classification import CLASSIFICATION_ADAPTERS

__all__ = ["REGISTRY", "AdapterRegistry", "ModelAdapter", "Region", "Task"]

REGISTRY = AdapterRegistry()
for _adapter in CLASSIFICATION_ADAPTERS:
    REGISTRY.register(_adapter)
# Detection adapters (yolo, faster_rcnn, ...) are registered here too, once their modules exist.
del _adapter
