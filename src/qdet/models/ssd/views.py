"""Make a torchvision SSD / SSDLite quantizable: traceable views of its two scoring heads.

`SSDScoringHead.forward` iterates over the list of feature maps and unpacks `results.shape`, which
torch.fx cannot follow. Its view loops over the heads' own `module_list` (a fixed number of levels)
and flattens with one permute + reshape — the same (N, H·W·A, K) layout. As for Faster R-CNN
(`qdet.models.rcnn.views`), only the *class* of the existing modules changes: parameters, module
paths and state-dict keys stay torchvision's ("head.classification_head.module_list.0.weight").
The backbone needs no view (its forward is traceable; it returns a dict of feature maps).

    >>> from torchvision.models.detection import ssd300_vgg16
    >>> m = make_quantizable(ssd300_vgg16(weights=None, weights_backbone=None))
    >>> type(m.head.classification_head).__name__
    'TraceableScoringHead'
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection.ssd import SSD, SSDScoringHead

from qdet.errors import ConfigError

__all__ = ["TraceableScoringHead", "check_quantizable", "make_quantizable"]


class TraceableScoringHead(SSDScoringHead):
    """`SSDScoringHead` over `len(module_list)` levels: list of (N, C_l, H_l, W_l) → (N, Σ H·W·A, K)."""

    def forward(self, x: list[Tensor]) -> Tensor:
        outs = []
        for level, module in enumerate(self.module_list):  # a ModuleList: fx unrolls the loop
            r = module(x[level])  # (N, A·K, H, W)
            outs.append(r.permute(0, 2, 3, 1).reshape(r.shape[0], -1, self.num_columns))  # (N, H·W·A, K)
        return torch.cat(outs, dim=1)


def make_quantizable(model: nn.Module) -> nn.Module:
    """Swap both scoring heads of a torchvision SSD to their traceable view and turn off in-place
    activations, in place (returned). Idempotent; eval mode; outputs and keys unchanged."""
    from qdet.models.classification import functionalize_inplace

    if not isinstance(model, SSD):
        raise ConfigError(f"{type(model).__name__} is not a torchvision SSD (torchvision.models.detection.SSD)")
    for name in ("classification_head", "regression_head"):
        head = getattr(model.head, name, None)
        if not isinstance(head, SSDScoringHead):
            raise ConfigError(f"head.{name} is a {type(head).__name__}, not torchvision's SSDScoringHead: "
                              "write a traceable view for it (see qdet.models.ssd.views)")
        head.__class__ = TraceableScoringHead
    functionalize_inplace(model)
    return model.eval()


def check_quantizable(model: nn.Module) -> None:
    """ConfigError (saying what to call) unless `make_quantizable` was applied."""
    if not isinstance(model, SSD):
        raise ConfigError(f"{type(model).__name__} is not a torchvision SSD")
    if not all(isinstance(getattr(model.head, n, None), TraceableScoringHead)
               for n in ("classification_head", "regression_head")):
        raise ConfigError("model is not prepared for quantization (its scoring heads are not traceable): build it "
                          "with the adapter's build(), or call qdet.models.ssd.views.make_quantizable(model) first")
