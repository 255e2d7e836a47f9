"""AdaRound for one conv/linear (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training
Quantization", 2020), written from the paper.

Each weight's code is floor(w / s) + h(V), h(V) = clip(σ(V)·(ζ − γ) + γ, 0, 1) (a rectified
sigmoid, ζ = 1.1, γ = −0.1), V initialised so that h(V) = frac(w / s): at the start the soft
weights equal the float ones. Adam minimises

    ‖f(W̃ x_q + b) − f(W x + b)‖² (summed over channels, mean over positions)  +  λ · Σ (1 − |2h − 1|^β)

with x_q the layer's input in the quantized model (upstream layers already rounded) and x its
float input ("asymmetric" reconstruction), f the layer's fused ReLU/ReLU6 if it has one. The
regulariser is off for the first `warmup` share of the iterations, then β anneals from 20 to 2,
pushing every h to 0 or 1. The result rounds each weight down or up: never more than one step
from round-to-nearest.

    >>> import torch
    >>> from torch import nn
    >>> from qdet.config import AdaRound, default_weight_spec
    >>> from qdet.quant.quantizer import make_weight_quantizer
    >>> _ = torch.manual_seed(0); conv = nn.Conv2d(4, 8, 3)
    >>> wq = make_weight_quantizer(conv.weight, default_weight_spec(bits=3), "conv.weight")
    >>> x = torch.randn(64, 4, 6, 6); target = conv(x).detach()
    >>> res = adaround_layer(conv, wq, x, x, target, AdaRound(iterations=200), progress=False)
    >>> res.mse_after < res.mse_before
    True
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from qdet.config import AdaRound
from qdet.quant.quantizer import Quantizer, weight_codes

ZETA, GAMMA = 1.1, -0.1


@dataclass
class AdaRoundResult:
    """What one layer's optimisation did: reconstruction MSE (on all its images) before/after,
    and how many weights were rounded differently from round-to-nearest."""

    mse_before: float
    mse_after: float
    flipped: int
    weights: int


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _grid(wq: Quantizer, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scale and zero point shaped to broadcast against `weight` (per-channel along the spec's axis)."""
    axis = wq.spec.axis
    shape = [1] * weight.dim()
    if axis is not None and wq.scale.numel() > 1:
        shape[axis] = -1
    return wq.scale.double().reshape(shape), wq.zero_point.double().reshape(shape)


def _forward_fn(mod: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    bias = mod.bias.detach() if mod.bias is not None else None
    if isinstance(mod, nn.Conv2d):
        return lambda x, w: mod._conv_forward(x, w, bias)
    return lambda x, w: F.linear(x, w, bias)


def _mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over the channel axis (1 for conv maps, last for linear), mean elsewhere."""
    err = (out - target).pow(2)
    return err.sum(1 if err.dim() == 4 else -1).mean()


def adaround_layer(
    mod: nn.Module,
    wq: Quantizer,
    x_quant: torch.Tensor,
    x_float: torch.Tensor,
    target: torch.Tensor,
    cfg: AdaRound,
    *,
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "adaround",
) -> AdaRoundResult:
    """Learn the rounding of `mod.weight` on `wq`'s grid and write the rounded weights (exactly on
    the grid, so `weight_codes` gives the learned codes) into `mod.weight`.

    x_quant / x_float: the layer's quantized-model and float-model inputs (N first); target: the
    float layer's output on x_float (before `activation`). x_float is only used for its count."""
    del x_float  # the target already is W·x + b on the float input
    act = activation or (lambda t: t)
    weight = mod.weight.detach()
    scale, zp = _grid(wq, weight)
    qmin, qmax = wq.spec.qmin, wq.spec.qmax
    w_s = weight.double() / scale
    floor = torch.floor(w_s)
    rest = (w_s - floor).clamp(1e-4, 1 - 1e-4)
    # h(V) = rest at the start: σ(V) = (rest − γ)/(ζ − γ)
    v = torch.logit((rest - GAMMA) / (ZETA - GAMMA)).float().requires_grad_(True)
    floor_f, scale_f, zp_f = floor.float(), scale.float(), zp.float()
    fwd = _forward_fn(mod)
    target_act = act(target)

    def soft_weight(h: torch.Tensor) -> torch.Tensor:
        codes = torch.clamp(floor_f + h + zp_f, qmin, qmax)
        return (codes - zp_f) * scale_f

    def full_mse(w: torch.Tensor) -> float:
        with torch.no_grad():
            total, n = 0.0, 0
            for i in range(0, x_quant.shape[0], 256):
                xb = x_quant[i:i + 256]
                total += float(_mse(act(fwd(xb, w)), target_act[i:i + 256])) * xb.shape[0]
                n += xb.shape[0]
            return total / max(n, 1)

    nearest = weight_codes(weight, wq)
    w_nearest = ((nearest.double() - zp) * scale).float()
    mse_before = full_mse(w_nearest)

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([v], lr=cfg.lr)
    n = x_quant.shape[0]
    warm = int(cfg.warmup * cfg.iterations)
    for it in tqdm(range(cfg.iterations), desc=desc, disable=not progress, leave=False):
        idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=gen)
        h = rectified_sigmoid(v)
        loss = _mse(act(fwd(x_quant[idx], soft_weight(h))), target_act[idx])
        if it >= warm and cfg.reg_weight > 0:
            progress_share = (it - warm) / max(cfg.iterations - warm, 1)
            beta = cfg.beta_end + (cfg.beta_start - cfg.beta_end) * (1 - progress_share)
            loss = loss + cfg.reg_weight * (1 - (2 * h - 1).abs().pow(beta)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()

    with torch.no_grad():
        up = (rectified_sigmoid(v) >= 0.5).double()
        codes = torch.clamp(floor + up + zp, qmin, qmax)
        rounded = ((codes - zp) * scale).to(weight.dtype)
    mse_after = full_mse(rounded)
    if mse_after > mse_before:  # never worse than round-to-nearest on the layer's own data
        rounded, mse_after = w_nearest.to(weight.dtype), mse_before
    with torch.no_grad():
        mod.weight.copy_(rounded)
    flipped = int((weight_codes(mod.weight.detach(), wq) != nearest).sum())
    return AdaRoundResult(mse_before, mse_after, flipped, weight.numel())
