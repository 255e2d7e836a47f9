"""Cross-layer equalization and high-bias absorption (Nagel et al., "Data-Free Quantization", 2019).

For conv1 → act → conv2, with act positively homogeneous per channel (ReLU, LeakyReLU, identity,
max-pool, zero padding: act(x / s) = act(x) / s for s > 0), dividing output channel c of conv1
(weights and bias) by s_c and multiplying input channel c of conv2 by s_c leaves the float
function unchanged. With s_c = √(r1_c / r2_c), r1_c = max|W1[c]| and r2_c = max|W2[:, c]|, both
ranges become √(r1_c · r2_c): a channel that was tiny next to its neighbours (a per-tensor weight
grid wastes all its levels on it) gets its share of the grid. Depthwise convs in the middle of a
conv → dw → conv chain are equalized against both neighbours by iterating over the pairs.

High-bias absorption then moves c = max(0, β − 3γ) (β, γ: the folded BN's mean and std per
channel) out of conv1's bias and into conv2's: ReLU(x − c) = ReLU(x) − c wherever x ≥ c, which
holds for all but ~0.1 % of a Gaussian pre-activation; it is not exact at zero-padded borders.

ReLU6 is not positively homogeneous (it clips at 6), so chains through ReLU6 are left alone —
unless `relu6_to_relu` asks to replace those ReLU6 by ReLU first, as the paper does for MobileNetV2
(AIMET before 2.4 did it unasked; 2.4+ leaves it to the user). That changes the float function
wherever a pre-activation exceeds 6; the replaced call sites are reported (`EqualizedPair.relu6_replaced`).

    >>> import torch
    >>> from torch import fx, nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    >>> with torch.no_grad(): _ = net[0].weight[:4].mul_(20.0)
    >>> gm = fx.symbolic_trace(net); x = torch.randn(2, 3, 9, 9); ref = gm(x)
    >>> pairs = equalize(gm, high_bias_absorption=False)
    >>> len(pairs), bool(torch.allclose(gm(x), ref, atol=1e-5))
    (1, True)
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from qdet.quant.fusion import BN_STATS, bn_stats
from qdet.quant.opkinds import OpKind, op_kind

# Kinds between two weighted layers through which a per-channel positive scale passes unchanged.
_HOMOGENEOUS = frozenset({OpKind.RELU, OpKind.LEAKY_RELU, OpKind.IDENTITY, OpKind.MAXPOOL, OpKind.AVGPOOL,
                          OpKind.ZERO_PAD})
_ROUNDS = 20  # sweeps over all pairs; conv → dw → conv chains converge in a few


@dataclass
class EqualizedPair:
    """One equalized conv1 → conv2 pair (module paths in the region) and what was done."""

    first: str
    second: str
    through: str  # the op kinds in between, e.g. "relu"
    absorbed: bool = False
    relu6_replaced: bool = False  # a ReLU6 in between became ReLU (the float function changed)
    # with relu6_replaced: the estimated share of first's outputs above 6 — where ReLU6 clipped and
    # ReLU now does not — from its folded BN's mean and std (Gaussian); None without BN statistics
    above6: float | None = None


def _module(gm: fx.GraphModule, node: object) -> nn.Module | None:
    if not isinstance(node, fx.Node) or node.op != "call_module":
        return None
    return gm.get_submodule(str(node.target))


def _weighted(mod: nn.Module | None) -> bool:
    return type(mod) is nn.Conv2d and mod.padding_mode == "zeros"


def find_pairs(gm: fx.GraphModule, *, through_relu6: bool = False
               ) -> tuple[list[tuple[fx.Node, list[fx.Node], fx.Node]], list[str]]:
    """conv → homogeneous ops → conv chains, each value used once along the way.

    Returns (pairs, skipped): pairs as (first, nodes between, second); skipped names chains that
    only ReLU6 keeps from equalizing. With `through_relu6`, ReLU6 counts as homogeneous (the caller
    replaces it by ReLU) and nothing is skipped."""
    pairs: list[tuple[fx.Node, list[fx.Node], fx.Node]] = []
    skipped: list[str] = []
    for node in gm.graph.nodes:
        first = _module(gm, node)
        if not _weighted(first):
            continue
        between: list[fx.Node] = []
        cur = node
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            kind = op_kind(nxt, gm)
            if kind is OpKind.CONV:  # a Linear after a conv acts on the last axis, not on channels
                second = _module(gm, nxt)
                if isinstance(second, nn.Conv2d) and _weighted(second) and nxt.args and nxt.args[0] is cur:
                    pairs.append((node, between, nxt))
                break
            if kind in _HOMOGENEOUS or (through_relu6 and kind is OpKind.RELU6):
                between.append(nxt)
                cur = nxt
                continue
            if kind is OpKind.RELU6:
                skipped.append(f"{node.target} (relu6)")
            break
    return pairs, skipped


def _out_ranges(w: torch.Tensor) -> torch.Tensor:
    return w.detach().abs().reshape(w.shape[0], -1).amax(1)


def _in_ranges(mod: nn.Conv2d, channels: int) -> torch.Tensor:
    """max |W2| per input channel of conv2 (grouped convs: over the rows of the channel's group)."""
    w = mod.weight.detach().abs()
    groups, per_group = mod.groups, w.shape[1]
    rows = w.reshape(groups, w.shape[0] // groups, per_group, -1).amax((1, 3))  # (groups, C_in/groups)
    return rows.reshape(-1)[:channels]


def _scale_inputs(mod: nn.Conv2d, s: torch.Tensor) -> None:
    """Multiply conv2's input channel c by s_c."""
    w = mod.weight
    groups, per_group = mod.groups, w.shape[1]
    out_per_group = w.shape[0] // groups
    factors = s.reshape(groups, 1, per_group).expand(groups, out_per_group, per_group).reshape(w.shape[0], per_group)
    w.mul_(factors.reshape(w.shape[0], per_group, *([1] * (w.dim() - 2))))


def _own(gm: fx.GraphModule, node: fx.Node, owned: set[str]) -> nn.Module:
    """The module at `node`, replaced by a copy the first time (the traced model is not mutated)."""
    path = str(node.target)
    if path not in owned:
        from qdet.quant.fusion import _set_submodule

        _set_submodule(gm, path, copy.deepcopy(gm.get_submodule(path)))
        owned.add(path)
    return gm.get_submodule(path)


def _absorb(first: nn.Conv2d, second: nn.Conv2d, between_kinds: list[OpKind]) -> bool:
    """Move max(0, β − 3γ) out of first's bias into second's (ReLU-like chains, BN stats known)."""
    stats = bn_stats(first)
    if stats is None or first.bias is None or not all(k in (OpKind.RELU, OpKind.IDENTITY) for k in between_kinds):
        return False
    if OpKind.RELU not in between_kinds:
        return False  # without ReLU nothing clips: the bias would just move (no range to win)
    beta, gamma = stats
    c = torch.clamp(beta - 3.0 * gamma, min=0.0)
    if not bool((c > 0).any()):
        return False
    w2 = second.weight.detach()
    groups = second.groups
    summed = w2.sum(tuple(range(2, w2.dim()))).reshape(groups, w2.shape[0] // groups, -1)
    shift = torch.einsum("goi,gi->go", summed, c.reshape(groups, -1)).reshape(-1)
    if second.bias is None:
        second.bias = nn.Parameter(torch.zeros(w2.shape[0], dtype=w2.dtype))
    first.bias.sub_(c)
    second.bias.add_(shift)
    setattr(first, BN_STATS, (beta - c, gamma))
    return True


# warn when ReLU6 → ReLU changes this share of some layer's outputs (measured on EfficientNet-Lite1:
# its stem and first block clip 4 % and 11 %, and the ReLU model's float top-1 fell 74.4 → 50.3)
_ABOVE6_WARN = 0.01


def _share_above6(first: nn.Module) -> float | None:
    stats = bn_stats(first)
    if stats is None:
        return None
    beta, gamma = stats
    return float((0.5 * torch.erfc((6.0 - beta) / (gamma.clamp(min=1e-12) * math.sqrt(2.0)))).mean())


def _as_relu(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Replace one ReLU6 call site (module, F.relu6 or hardtanh(0, 6)) by F.relu on the same input;
    a ReLU6 module shared with other call sites stays ReLU6 there."""
    with gm.graph.inserting_before(node):
        relu = gm.graph.call_function(F.relu, (node.args[0] if node.args else node.kwargs["input"],))
    relu.meta = dict(node.meta)
    node.replace_all_uses_with(relu)
    gm.graph.erase_node(node)
    return relu


def equalize(gm: fx.GraphModule, *, high_bias_absorption: bool = True,
             relu6_to_relu: bool = False) -> list[EqualizedPair]:
    """Equalize every conv → (ReLU/LeakyReLU/identity/pooling) → conv pair of `gm` in place
    (touched modules are replaced by copies); returns the pairs. Run it on the BN-folded graph.
    With `relu6_to_relu`, ReLU6 between two convs becomes ReLU and those chains are equalized too."""
    found, _ = find_pairs(gm, through_relu6=relu6_to_relu)
    pairs: list[tuple[fx.Node, list[fx.Node], fx.Node]] = []
    above6: dict[str, float | None] = {}  # keyed by the first conv of each chain whose ReLU6 was replaced
    for a, between, b in found:
        replaced = [op_kind(n, gm) is OpKind.RELU6 for n in between]
        if any(replaced):
            above6[str(a.target)] = _share_above6(gm.get_submodule(str(a.target)))
        pairs.append((a, [_as_relu(gm, n) if r else n for n, r in zip(between, replaced)], b))
    clipped = {k: v for k, v in above6.items() if v is not None and v > _ABOVE6_WARN}
    if clipped:
        worst = sorted(clipped.items(), key=lambda kv: -kv[1])[:3]
        warnings.warn(f"ReLU6 → ReLU changes the float model: by BN statistics, {len(clipped)} of {len(above6)} "
                      "replaced layers send more than 1 % of their outputs above 6 (" +
                      ", ".join(f"{k} {100 * v:.1f} %" for k, v in worst) + "); compare the float accuracy with "
                      "quantization disabled before using relu6_to_relu", stacklevel=2)
    owned: set[str] = set()
    result: list[EqualizedPair] = []
    with torch.no_grad():
        for _ in range(_ROUNDS):
            moved = 0.0
            for a, _between, b in pairs:
                first, second = _own(gm, a, owned), _own(gm, b, owned)
                r1 = _out_ranges(first.weight)
                r2 = _in_ranges(second, first.out_channels)
                ok = (r1 > 0) & (r2 > 0)
                s = torch.where(ok, torch.sqrt(r1 / torch.where(ok, r2, torch.ones_like(r2))), torch.ones_like(r1))
                first.weight.div_(s.reshape(-1, *([1] * (first.weight.dim() - 1))))
                if first.bias is not None:
                    first.bias.div_(s)
                stats = bn_stats(first)
                if stats is not None:
                    setattr(first, BN_STATS, (stats[0] / s, stats[1] / s))
                _scale_inputs(second, s)
                moved = max(moved, float((s - 1).abs().max()))
            if moved < 1e-6:
                break
        for a, between, b in pairs:
            kinds = [op_kind(n, gm) for n in between]
            absorbed = high_bias_absorption and _absorb(gm.get_submodule(str(a.target)),
                                                        gm.get_submodule(str(b.target)), kinds)
            first = str(a.target)
            result.append(EqualizedPair(first, str(b.target), "+".join(k.value for k in kinds) or "identity",
                                        absorbed, first in above6, above6.get(first)))
    gm.recompile()
    return result
