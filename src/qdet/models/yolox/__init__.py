"""YOLOX (Megvii layout): `qdet.models.yolox.adapter.YoloxAdapter`, architecture in `model`."""
from qdet.models.yolox.adapter import YOLOX_ADAPTERS, YoloxAdapter, YoloxDetector
from qdet.models.yolox.model import YOLOX_SIZES, YOLOXRaw, decode_yolox

__all__ = ["YOLOX_ADAPTERS", "YOLOX_SIZES", "YOLOXRaw", "YoloxAdapter", "YoloxDetector", "decode_yolox"]
