"""Faster R-CNN support pieces: traceable views, paired-proposal analysis, synthetic data, tiny models.

The adapter itself is `qdet.models.faster_rcnn.FasterRCNNAdapter`.
"""
from qdet.models.rcnn.views import (
                                    TraceableFastRCNNPredictor,
                                    TraceableRPNHead,
                                    check_quantizable,
                                    is_faster_rcnn,
                                    make_quantizable,
                                    unfreeze_batchnorm,
)

__all__ = ["TraceableFastRCNNPredictor", "TraceableRPNHead", "check_quantizable", "is_faster_rcnn",
           "make_quantizable", "unfreeze_batchnorm"]
