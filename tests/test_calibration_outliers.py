"""Calibration samples that dwarf the others are named (qdet.quant.outliers)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import qdet
from qdet.config import QuantConfig


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


def _sqnr(qm: qdet.QuantizedModel, net: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref, out = net(x), qm(x)
    return float(10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean()))


def test_outlier_samples_are_named_and_cost_the_others_resolution() -> None:
    net = _net()
    g = torch.Generator().manual_seed(1)
    batches = [torch.rand(4, 3, 8, 8, generator=g) for _ in range(4)]
    batches[1][2] *= 300.0  # samples 6 and 13 (calibration order) reach 300× the others
    batches[3][1] *= 300.0
    with pytest.warns(UserWarning, match=r"calibration: 2 of 16 samples .* Samples \(calibration order, from 0\): 6, 13"):
        qm = qdet.quantize(net, batches, QuantConfig(), progress=False)
    assert qm.metrics["calibration_outliers"]["samples"] == [6, 13]
    layers = {o["layer"] for o in qm.metrics["calibration_outliers"]["layers"]}
    assert "0" in layers  # the first conv's output (ReLU fused) is one of them
    clean = [torch.cat([b[i:i + 1] for i in range(4) if (k, i) not in ((1, 2), (3, 1))]) for k, b in enumerate(batches)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # typical data: no warning
        without = qdet.quantize(net, clean, QuantConfig(), progress=False)
    assert "calibration_outliers" not in without.metrics
    typical = torch.rand(16, 3, 8, 8, generator=g)
    assert _sqnr(without, net, typical) > _sqnr(qm, net, typical) + 10.0
