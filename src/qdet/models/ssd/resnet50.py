"""SSD300 v1.1 with a ResNet50 backbone, in NVIDIA DeepLearningExamples' state-dict layout.

    feature_extractor.feature_extractor   ResNet50 conv1, bn1, relu, maxpool, layer1..layer3 (indices 0..6);
                                          layer3's first block has stride 1 → (B, 1024, 38, 38) at 300 px
    additional_blocks.{0..4}              1×1 conv-BN-ReLU then 3×3 conv-BN-ReLU (stride 2, pad 1 for the
                                          first three; valid 3×3 for the last two): 19, 10, 5, 3, 1
    loc.{0..5} / conf.{0..5}              3×3 convs, [4, 6, 6, 6, 4, 4] boxes per cell

`SSD300ResNet50.forward`: (B, 3, 300, 300) ImageNet-normalised → loc (B, 4, 8732), conf (B, 81, 8732).
`SSDDetector` puts the default boxes, decoding and per-class NMS (float) after it.

    >>> net = SSD300ResNet50()
    >>> "feature_extractor.feature_extractor.0.weight" in net.state_dict()
    True
    >>> [tuple(t.shape) for t in net(torch.zeros(1, 3, 300, 300))]  # doctest: +SKIP
    [(1, 4, 8732), (1, 81, 8732)]
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from qdet.models.ssd.boxes import (
    PostProcess,
    decode,
    default_boxes,
    postprocess,
    scaled_box_config,
)

__all__ = [
    "BOXES_PER_CELL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OUT_CHANNELS",
    "SSD300ResNet50",
    "SSDDetector",
    "feature_sizes",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OUT_CHANNELS = (1024, 512, 512, 256, 256, 256)
MID_CHANNELS = (256, 256, 128, 128, 128)
BOXES_PER_CELL = (4, 6, 6, 6, 4, 4)


class ResNet50Trunk(nn.Module):
    """torchvision ResNet50 through layer3, layer3's first block at stride 1 (NVIDIA's `ResNet`)."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import resnet50

        r = resnet50(weights=None)
        self.feature_extractor = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3)
        block = self.feature_extractor[6][0]
        block.conv1.stride = (1, 1)
        block.conv2.stride = (1, 1)
        block.downsample[0].stride = (1, 1)
        for m in self.modules():  # in-place activations would overwrite what a quantizer still reads
            if isinstance(m, nn.ReLU):
                m.inplace = False

    def forward(self, x: Tensor) -> Tensor:
        return self.feature_extractor(x)  # (B, 1024, H/8, W/8)


def _extra_block(cin: int, mid: int, cout: int, *, downsample: bool) -> nn.Sequential:
    stride, pad = (2, 1) if downsample else (1, 0)
    return nn.Sequential(
        nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
        nn.Conv2d(mid, cout, 3, stride=stride, padding=pad, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
    )


class SSD300ResNet50(nn.Module):
    """The network alone (the int8 region). `num_classes` counts the background (COCO: 81)."""

    def __init__(self, num_classes: int = 81) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.feature_extractor = ResNet50Trunk()
        self.additional_blocks = nn.ModuleList(
            _extra_block(cin, mid, cout, downsample=i < 3)
            for i, (cin, mid, cout) in enumerate(zip(OUT_CHANNELS[:-1], MID_CHANNELS, OUT_CHANNELS[1:])))
        self.loc = nn.ModuleList(nn.Conv2d(c, n * 4, 3, padding=1) for n, c in zip(BOXES_PER_CELL, OUT_CHANNELS))
        self.conf = nn.ModuleList(nn.Conv2d(c, n * num_classes, 3, padding=1)
                                  for n, c in zip(BOXES_PER_CELL, OUT_CHANNELS))
        for layer in [*self.additional_blocks, *self.loc, *self.conf]:  # the reference's initialisation
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.feature_extractor(x)
        feats = [x]
        for block in self.additional_blocks:
            x = block(x)
            feats.append(x)
        b = feats[0].shape[0]
        locs = [head(f).reshape(b, 4, -1) for head, f in zip(self.loc, feats)]
        confs = [head(f).reshape(b, self.num_classes, -1) for head, f in zip(self.conf, feats)]
        return torch.cat(locs, 2), torch.cat(confs, 2)  # (B, 4, N), (B, C, N)


def feature_sizes(img_size: int) -> tuple[int, ...]:
    """The six map sizes at a square input (38, 19, 10, 5, 3, 1 at 300; 264 px is the smallest with all six)."""
    s = (img_size + 1) // 2  # conv1, stride 2, pad 3
    s = (s + 1) // 2  # maxpool 3/2 pad 1
    s = (s + 1) // 2  # layer2 (layer3 keeps it)
    sizes = [s]
    for i in range(5):
        s = (s + 1) // 2 if i < 3 else s - 2
        sizes.append(s)
    if sizes[-1] < 1:
        from qdet.errors import ConfigError

        raise ConfigError(f"img_size={img_size} is too small for SSD300-ResNet50 (its last 3×3 map needs >= 264 px)")
    return tuple(sizes)


class SSDDetector(nn.Module):
    """`net` (int8) → decode with the default boxes → per-class NMS (float islands).

    Input (B, 3, S, S) normalised as `mean`/`std` say. Output per image {"boxes" (k, 4) x1 y1 x2 y2
    relative to the image, "scores", "labels" 1..C-1}. `raw(x)` is the network's (loc, conf).
    """

    def __init__(self, net: nn.Module, *, img_size: int = 300, post: PostProcess | None = None) -> None:
        super().__init__()
        self.net = net
        self.num_classes: int = int(getattr(net, "num_classes", 81))  # with background; survives lowering of `net`
        self.img_size = img_size
        self.box_config = scaled_box_config(img_size, feature_sizes(img_size))
        self.register_buffer("dboxes", default_boxes(self.box_config), persistent=False)  # (N, 4) cxcywh
        self.post = post or PostProcess()
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD

    def forward(self, x: Tensor) -> list[dict[str, Tensor]]:
        loc, conf = self.net(x)
        boxes = decode(loc, self.dboxes, scale_xy=self.box_config.scale_xy, scale_wh=self.box_config.scale_wh)
        return postprocess(boxes, conf, self.post)
