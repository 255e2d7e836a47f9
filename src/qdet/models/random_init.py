"""Random weights with trained-looking activations, for tests and `--weights random` benchmarks.

PyTorch's default conv init shrinks activations layer after layer, so a random deep detector's
head maps come out nearly constant and its quantization error means nothing.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def lively_init_(model: nn.Module, input_shape: tuple[int, ...], *, seed: int = 0) -> nn.Module:
    """Random weights whose activations are roughly normalised layer after layer, in place:
    He-normal convs, BN gamma U(0.5, 1.5) and beta N(0, 0.1), BN running statistics from one
    training-mode pass over seeded uniform [0, 1] inputs of `input_shape`. Deterministic for a seed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the pass below
        was_training = model.training
        model.train()
        model(torch.rand(*input_shape, generator=g))
        model.train(was_training)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
    return model



def recalibrate_bn(module: nn.Module, run: Callable[[], Any]) -> None:
    """Running statistics of every BatchNorm2d in `module` from one pass of `run()` (cumulative
    average, no gradients); the BatchNorms end in eval mode. For random-weight models, whose default
    statistics (mean 0, var 1) do not match what their convs produce."""
    bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    with torch.no_grad():
        run()
    for bn in bns:
        bn.eval()
