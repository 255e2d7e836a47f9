"""What keeping a layer float costs: weight bytes and multiply-accumulates (the share of the model's
compute that no longer runs in int8 — a proxy for the latency cost, which a benchmark measures).

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    >>> costs = layer_costs(net, torch.zeros(1, 3, 16, 16))
    >>> costs["0"].macs, costs["2"].macs, round(costs["0"].mac_share, 3)
    (55296, 8192, 0.871)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

__all__ = ["LayerCost", "layer_costs", "kept_float_rows"]


@dataclass(frozen=True)
class LayerCost:
    """Per layer: weight elements, bytes as int8 vs float32, MACs for one input, share of all MACs."""

    name: str
    params: int
    int8_mb: float
    float_mb: float
    macs: int
    mac_share: float

    @property
    def extra_mb(self) -> float:
        """Bytes added by keeping the layer float (float32 instead of int8 weights)."""
        return self.float_mb - self.int8_mb

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "extra_mb": self.extra_mb}


def _macs(mod: nn.Module, out: Tensor) -> int:
    if isinstance(mod, nn.Conv2d):
        k = mod.kernel_size[0] * mod.kernel_size[1] * (mod.in_channels // mod.groups)
        return int(out.numel() // out.shape[0]) * k
    if isinstance(mod, nn.Linear):
        return int(out.numel() // out.shape[0]) * mod.in_features
    return 0


def layer_costs(model: nn.Module, example: Tensor | tuple[Any, ...]) -> dict[str, LayerCost]:
    """Costs of every conv/linear of the FLOAT `model` (names = module paths, as in `quant_points`),
    MACs counted per image of `example` (one forward pass)."""
    found: dict[str, int] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            hooks.append(mod.register_forward_hook(
                lambda m, _i, o, name=name: found.__setitem__(name, found.get(name, 0) + _macs(m, o))))
    try:
        with torch.inference_mode():
            model(*example) if isinstance(example, tuple) else model(example)
    finally:
        for h in hooks:
            h.remove()
    total = max(sum(found.values()), 1)
    mods = dict(model.named_modules())
    out = {}
    for name, macs in found.items():
        n = int(mods[name].weight.numel())
        out[name] = LayerCost(name, n, n / 1e6, 4 * n / 1e6, macs, macs / total)
    return out


def kept_float_rows(result: Any, costs: Mapping[str, LayerCost]) -> list[dict[str, Any]]:
    """One row per layer a `MixedPrecisionResult` keeps float, in the order the search added them:
    the metric after adding it, the gain it brought, and its cost (extra weight MB, share of MACs)."""
    kept = set(result.kept_float)
    rows, prev = [], result.int8_metric
    for s in result.steps:
        if not s.added or s.added.startswith("-"):
            continue
        gain, prev = s.metric - prev, s.metric
        if s.added not in kept:  # dropped again by the refinement pass
            continue
        c = costs.get(s.added.split("#", 1)[0])
        rows.append({"n_float": s.n_float, "layer": s.added, "metric": s.metric, "gain": gain,
                     "params": c.params if c else 0, "extra_mb": c.extra_mb if c else 0.0,
                     "mac_share_pct": 100 * c.mac_share if c else 0.0})
    return rows
