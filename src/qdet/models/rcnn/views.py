"""Make a torchvision Faster R-CNN quantizable: BN that folds, and traceable views of two heads.

Three things stand between torchvision's detector and `qdet.quant.prepare`:
  * pretrained detection backbones use `FrozenBatchNorm2d`, which the conv-BN fold does not know:
    it is replaced by an eval-mode `nn.BatchNorm2d` with the same statistics (exactly equal in eval);
  * `RPNHead.forward` loops over a Python list of feature maps, which fx cannot iterate: its view
    indexes a fixed number of levels (the anchor generator's);
  * `FastRCNNPredictor.forward` branches on `x.dim()`: its view flattens unconditionally.

Views are subclasses that change only the *class* of the existing module (`__class__` swap), so
parameters, buffers, module paths and state-dict keys stay those of torchvision: "rpn.head.conv.0.0".
`backbone` (body + FPN) needs no view: traced together, the FPN receives a real dict of proxies.

Example:
    >>> from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn
    >>> model = make_quantizable(fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None))
    >>> type(model.rpn.head).__name__
    'TraceableRPNHead'
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.rpn import RPNHead

from qdet.errors import ConfigError
from qdet.quant.fusion import mark_frozen

__all__ = [
    "TraceableFastRCNNPredictor",
    "TraceableRPNHead",
    "check_quantizable",
    "is_faster_rcnn",
    "make_quantizable",
    "unfreeze_batchnorm",
]


class TraceableRPNHead(RPNHead):
    """`RPNHead` over a fixed number of levels (the class is swapped in; see `make_quantizable`).

    Input: a list of `num_levels` feature maps (B, C, H_l, W_l). Output: (logits per level
    (B, A, H_l, W_l), box deltas per level (B, 4A, H_l, W_l)) — torchvision's format.
    """

    num_levels: int

    def forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits, bbox_reg = [], []
        for level in range(self.num_levels):  # a Python int: fx unrolls the loop
            t = self.conv(x[level])
            logits.append(self.cls_logits(t))
            bbox_reg.append(self.bbox_pred(t))
        return logits, bbox_reg


class TraceableFastRCNNPredictor(FastRCNNPredictor):
    """`FastRCNNPredictor` without the data-dependent shape assertion: (N, C[,1,1]) → (scores, deltas)."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


def unfreeze_batchnorm(model: nn.Module) -> int:
    """Replace every `FrozenBatchNorm2d` with an eval-mode `nn.BatchNorm2d` holding the same numbers.

    Equal in eval mode (both compute (x − μ)·γ/√(σ² + ε) + β), and the conv-BN fold then applies.
    Returns how many were replaced. The replacements are marked frozen (`fusion.mark_frozen`): QAT
    folds them with their running statistics from the first step. Outside QAT the model must stay
    in eval mode: in train mode a BatchNorm2d would update its statistics where the frozen one did not.

    >>> from torchvision.ops.misc import FrozenBatchNorm2d
    >>> m = nn.Sequential(nn.Conv2d(3, 4, 1), FrozenBatchNorm2d(4))
    >>> unfreeze_batchnorm(m), type(m[1]).__name__
    (1, 'BatchNorm2d')
    """
    from torchvision.ops.misc import FrozenBatchNorm2d

    count = 0
    for name, child in list(model.named_children()):
        if isinstance(child, FrozenBatchNorm2d):
            n = child.weight.numel()
            bn = nn.BatchNorm2d(n, eps=child.eps, device=child.weight.device, dtype=child.weight.dtype)
            with torch.no_grad():
                bn.weight.copy_(child.weight)
                bn.bias.copy_(child.bias)
                bn.running_mean.copy_(child.running_mean)
                bn.running_var.copy_(child.running_var)
            bn.weight.requires_grad_(False)
            bn.bias.requires_grad_(False)
            setattr(model, name, mark_frozen(bn).eval())  # QAT keeps its statistics fixed
            count += 1
        else:
            count += unfreeze_batchnorm(child)
    return count


def is_faster_rcnn(model: nn.Module) -> bool:
    """A torchvision two-stage detector: transform, backbone, rpn with a head, roi_heads with box heads."""
    rpn = getattr(model, "rpn", None)
    roi = getattr(model, "roi_heads", None)
    return (
        hasattr(model, "transform") and hasattr(model, "backbone") and rpn is not None and roi is not None
        and hasattr(rpn, "head") and hasattr(rpn, "anchor_generator")
        and hasattr(roi, "box_head") and hasattr(roi, "box_predictor")
    )


def _num_levels(model: nn.Module) -> int:
    gen = model.rpn.anchor_generator
    sizes = getattr(gen, "sizes", None)
    if not sizes:
        raise ConfigError(f"cannot tell the number of feature levels from {type(gen).__name__}: it has no 'sizes'")
    return len(sizes)


def make_quantizable(model: nn.Module) -> nn.Module:
    """Prepare a torchvision Faster R-CNN for `qdet.quantize`, in place (returned for chaining).

    Replaces FrozenBatchNorm2d by BatchNorm2d, disables in-place activations, and swaps the RPN
    head and box predictor to their traceable views. Idempotent; the model ends in eval mode.
    Outputs are unchanged (eval mode), and so are module paths and state-dict keys.
    """
    from qdet.models.classification import functionalize_inplace

    if not is_faster_rcnn(model):
        raise ConfigError(f"{type(model).__name__} is not a torchvision Faster R-CNN "
                          "(expected transform, backbone, rpn.head, roi_heads.box_head/box_predictor)")
    unfreeze_batchnorm(model)
    functionalize_inplace(model)
    head = model.rpn.head
    if type(head) is not TraceableRPNHead:
        if type(head) is not RPNHead:
            raise ConfigError(f"rpn.head is a {type(head).__name__}, not torchvision's RPNHead: "
                              "write a traceable view for it (see qdet.models.rcnn.views)")
        head.__class__ = TraceableRPNHead
    head.num_levels = _num_levels(model)
    predictor = model.roi_heads.box_predictor
    if type(predictor) is not TraceableFastRCNNPredictor:
        if type(predictor) is not FastRCNNPredictor:
            raise ConfigError(f"roi_heads.box_predictor is a {type(predictor).__name__}, not torchvision's "
                              "FastRCNNPredictor: write a traceable view for it (see qdet.models.rcnn.views)")
        predictor.__class__ = TraceableFastRCNNPredictor
    return model.eval()


def check_quantizable(model: nn.Module) -> None:
    """ConfigError (saying what to call) unless `make_quantizable` was applied."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    if not is_faster_rcnn(model):
        raise ConfigError(f"{type(model).__name__} is not a torchvision Faster R-CNN")
    problems = []
    if not isinstance(model.rpn.head, TraceableRPNHead):
        problems.append("rpn.head is not traceable")
    if not isinstance(model.roi_heads.box_predictor, TraceableFastRCNNPredictor):
        problems.append("roi_heads.box_predictor is not traceable")
    if any(isinstance(m, FrozenBatchNorm2d) for m in model.modules()):
        problems.append("FrozenBatchNorm2d not replaced by BatchNorm2d")
    if problems:
        raise ConfigError("model is not prepared for quantization (" + "; ".join(problems) + "): build it with "
                          "the adapter's build(), or call qdet.models.rcnn.make_quantizable(model) first")
