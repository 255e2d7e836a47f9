"""YOLOv5 (v6.1): model, pre/post-processing and COCO inference."""
from qdet.models.yolo.layers import Activation
from qdet.models.yolo.model import YOLOv5, YOLOv5Raw, load_weights, load_yolov5, yolov5_config

__all__ = ["Activation", "YOLOv5", "YOLOv5Raw", "load_weights", "load_yolov5", "yolov5_config"]
