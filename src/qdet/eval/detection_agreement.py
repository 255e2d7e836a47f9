"""Two detectors' outputs compared detection by detection (island path vs whole graph, runtime vs runtime).

    >>> import torch
    >>> d = [torch.tensor([[0., 0, 10, 10, 0.9, 1]])]
    >>> agreement(d, [d[0] + torch.tensor([0, 0, 0, 0, 1e-4, 0])]).holds(iou=0.99, score=1e-3)
    True
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qdet.errors import ConfigError

__all__ = ["Agreement", "agreement"]


@dataclass(frozen=True)
class Agreement:
    """Two detectors' outputs matched per image and class (Hungarian on 1 − IoU + |Δscore|; a pair
    overlapping less than IoU 0.5 is two unmatched detections, not a bad match).

    `at_cut`: unmatched detections whose score ties (within 1e-6) the lowest score of their own
    image's list: when an image fills `max_det`, equal scores at the cut may be kept by one path and
    dropped by the other (frequent in int8, whose scores come from 256-level maps).
    """

    matched: int
    only_a: int
    only_b: int
    at_cut: int
    min_iou: float  # over matched pairs (1.0 when none)
    max_score_diff: float  # over matched pairs (0.0 when none)

    def holds(self, *, iou: float, score: float, ties_at_cut: bool = False) -> bool:
        """Every detection matched (but ties at the cut, if allowed), each pair with IoU >= `iou`
        and scores within `score`."""
        unmatched = self.only_a + self.only_b - (self.at_cut if ties_at_cut else 0)
        return unmatched == 0 and self.min_iou >= iou and self.max_score_diff <= score


def agreement(a: list[Tensor], b: list[Tensor]) -> Agreement:
    """Per image (n, 6) x1 y1 x2 y2 score class lists (e.g. island path vs whole graph) compared.

    >>> d = [torch.tensor([[0., 0, 10, 10, 0.9, 1]])]
    >>> agreement(d, [d[0] + torch.tensor([0, 0, 0, 0, 1e-4, 0])]).holds(iou=0.99, score=1e-3)
    True
    """
    import numpy as np
    from scipy.optimize import linear_sum_assignment
    from torchvision.ops import box_iou

    if len(a) != len(b):
        raise ConfigError(f"cannot compare {len(a)} images' detections with {len(b)}")
    matched = only_a = only_b = at_cut = 0
    min_iou, max_diff = 1.0, 0.0
    for da, db in zip(a, b):
        da, db = da.float(), db.float()
        cut_a = float(da[:, 4].min()) if len(da) else 0.0
        cut_b = float(db[:, 4].min()) if len(db) else 0.0
        for c in torch.cat([da[:, 5], db[:, 5]]).unique():
            pa, pb = da[da[:, 5] == c], db[db[:, 5] == c]
            ra = rb = np.zeros(0, dtype=np.int64)
            if len(pa) and len(pb):
                iou = box_iou(pa[:, :4], pb[:, :4])
                same = (pa[:, None, :4] == pb[None, :, :4]).all(-1)
                iou = torch.where(iou.isnan(), same.to(iou.dtype), iou)  # two equal zero-area boxes: 0/0
                diff = (pa[:, 4:5] - pb[:, 4].unsqueeze(0)).abs()
                ra, rb = linear_sum_assignment((1 - iou + diff).numpy())
                real = iou.numpy()[ra, rb] >= 0.5  # the assignment pairs leftovers too: those are not matches
                ra, rb = ra[real], rb[real]
                min_iou = min(min_iou, float(np.min(iou.numpy()[ra, rb]))) if len(ra) else min_iou
                max_diff = max(max_diff, float(np.max(diff.numpy()[ra, rb]))) if len(ra) else max_diff
            matched += len(ra)
            rest_a = np.setdiff1d(np.arange(len(pa)), ra)
            rest_b = np.setdiff1d(np.arange(len(pb)), rb)
            only_a, only_b = only_a + len(rest_a), only_b + len(rest_b)
            at_cut += int((pa[rest_a, 4] - cut_a).abs().le(1e-6).sum()) + int((pb[rest_b, 4] - cut_b).abs().le(1e-6).sum())
    return Agreement(matched, only_a, only_b, at_cut, min_iou, max_diff)
