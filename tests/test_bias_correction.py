"""Bias correction gives back the mean shift weight rounding causes (QuantConfig(bias_correction=True))."""
import tempfile
from pathlib import Path

import torch
from torch import nn

import qdet
from qdet.config import QuantConfig
from qdet.qmodel import quantize


def _channel_mean_error(qm, net, x) -> torch.Tensor:
    with torch.no_grad():
        return (qm(x) - net(x)).mean(0).abs()  # per output (the model ends in a Linear)


def test_depthwise_and_linear_channel_means_are_restored() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 16, 1), nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Flatten(),
                        nn.Linear(16 * 10 * 10, 6)).eval()
    with torch.no_grad():  # coarse weights: a visible rounding error per channel
        net[1].weight.mul_(7.0)
    x = torch.rand(32, 4, 10, 10) + 1.0
    plain = quantize(net, [x], QuantConfig(), progress=False)
    corrected = quantize(net, [x], QuantConfig(bias_correction=True), progress=False)
    assert _channel_mean_error(corrected, net, x).mean() < 0.5 * _channel_mean_error(plain, net, x).mean()
    # the float model is untouched, and the correction is part of the saved artefact
    assert net[0].bias is not None and not torch.equal(net[1].bias, corrected.model.get_submodule("1").bias)
    path = qdet.save(corrected, Path(tempfile.mkdtemp()) / "bc.qdet")
    loaded = qdet.load(path, net)
    assert loaded.config.bias_correction
    with torch.no_grad():
        assert torch.equal(loaded(x), corrected(x))
