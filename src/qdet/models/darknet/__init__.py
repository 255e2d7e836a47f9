"""YOLOv3/v4 from Darknet files: `.cfg` parser, model, `.weights` reader/writer, adapters.

    >>> from qdet.models.darknet import load_darknet  # doctest: +SKIP
    >>> det = load_darknet("yolov4-tiny.cfg", "yolov4-tiny.weights")  # doctest: +SKIP
"""
from qdet.models.darknet.adapter import DARKNET_ADAPTERS, DarknetAdapter, load_darknet, read_names
from qdet.models.darknet.cfg import DarknetCfg, Section, parse_cfg, parse_cfg_text
from qdet.models.darknet.model import DarknetBody, DarknetDetector, build_darknet, decode_darknet
from qdet.models.darknet.weights import WeightsHeader, count_floats, load_darknet_weights, save_darknet_weights

__all__ = [
    "DARKNET_ADAPTERS", "DarknetAdapter", "DarknetBody", "DarknetCfg", "DarknetDetector", "Section", "WeightsHeader",
    "build_darknet", "count_floats", "decode_darknet", "load_darknet", "load_darknet_weights", "parse_cfg",
    "parse_cfg_text", "read_names", "save_darknet_weights",
]
