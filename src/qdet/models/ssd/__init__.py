"""SSD detectors: NVIDIA's SSD300-ResNet50 (its state-dict layout) and torchvision's SSD300-VGG16 /
SSDLite320-MobileNetV3 as int8 detectors; default boxes, decoding and NMS stay float.

    boxes.py     default-box generator (SSD300's published sizes/ratios), decode, per-class NMS
    resnet50.py  the SSD300-ResNet50 network (NVIDIA layout) and the detector around it
    views.py     traceable views of torchvision's SSD scoring heads
    data.py      preprocessing (resize, ImageNet normalisation) and COCO result conversion
    adapter.py   the three adapters, `Scope` (whole detector or backbone only)
"""
from qdet.models.ssd.adapter import (
    SSD_ADAPTERS,
    Scope,
    SSDResNet50Adapter,
    TorchvisionSSDAdapter,
)
from qdet.models.ssd.boxes import (
    SSD300_BOXES,
    BoxConfig,
    PostProcess,
    decode,
    default_boxes,
    postprocess,
)
from qdet.models.ssd.resnet50 import SSD300ResNet50, SSDDetector

__all__ = ["SSD300_BOXES", "SSD_ADAPTERS", "BoxConfig", "PostProcess", "SSD300ResNet50", "SSDDetector",
    "SSDResNet50Adapter", "Scope", "TorchvisionSSDAdapter", "decode", "default_boxes", "postprocess"]
