"""Model adapters, registered by name: `REGISTRY.get("resnet20").build()`.

Example:
    >>> from qdet.models import REGISTRY
    >>> "resnet56" in REGISTRY.names()
    True
"""
from __future__ import annotations

from qdet.models.base import AdapterRegistry, ModelAdapter, Region, Task
from qdet.models.classification import CLASSIFICATION_ADAPTERS
from qdet.models.darknet.adapter import DARKNET_ADAPTERS
from qdet.models.faster_rcnn import FASTER_RCNN_ADAPTERS
from qdet.models.ssd.adapter import SSD_ADAPTERS
from qdet.models.yolo.adapter import YOLO_ADAPTERS
from qdet.models.yolox.adapter import YOLOX_ADAPTERS

__all__ = ["REGISTRY", "AdapterRegistry", "ModelAdapter", "Region", "Task"]

REGISTRY = AdapterRegistry()
for _adapter in (*CLASSIFICATION_ADAPTERS, *YOLO_ADAPTERS, *FASTER_RCNN_ADAPTERS, *DARKNET_ADAPTERS, *SSD_ADAPTERS,
                 *YOLOX_ADAPTERS):
    REGISTRY.register(_adapter)
del _adapter
