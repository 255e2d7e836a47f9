"""Models qdet has no adapter for: every conv/linear int8, BN folded, accuracy kept (issue 13)."""
import pytest
import torch
from torch import nn

from qdet.config import QuantConfig
from qdet.qmodel import quantize
from qdet.quant.calibrate import INT32_MAX
from qdet.quant.quantizer import QuantConv2d


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean().clamp_min(1e-20)))


def test_dead_bn_channel_raises_its_weight_scale_not_the_input_grid() -> None:
    """A BN-folded channel with ~0 weights (gamma ~0) and an O(1) bias (beta): its bias would not
    fit int32 at s_x·s_w. Only that channel's weight scale may move; the layer's input grid and
    the other channels keep their calibrated scales (widening the input grid cost 10.8 top-1
    points on a depthwise classifier)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                        nn.BatchNorm2d(8), nn.ReLU6()).eval()
    with torch.no_grad():
        bn = net[3]
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 1.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.weight[5] = 1e-12  # a dead channel: folded weights ~1e-12
        bn.bias.uniform_(-0.5, 0.5)
        bn.bias[5] = 2.0
    data = [torch.rand(4, 3, 16, 16) for _ in range(4)]
    qm = quantize(net, data, QuantConfig(), progress=False)
    dw = next(m for n, m in qm.model.named_modules() if isinstance(m, QuantConv2d) and m.groups == 8)
    x_scale = float(dw.input_quant.scale)
    # the input grid is the calibrated one: its range is what the observer saw (ReLU output of conv 0)
    with torch.no_grad():
        relu_out = net[1](net[0](data[0]))
    assert x_scale < 2 * float(relu_out.max()) / 255 + 1e-6
    step = dw.input_quant.scale.double() * dw.weight_quant.scale.double()
    codes = (dw.bias.detach().double() / step).abs()
    assert float(codes.max()) <= INT32_MAX / 2 + 1
    w_scale = dw.weight_quant.scale
    expected = dw.weight.detach().abs().flatten(1).amax(1) / 127
    others = torch.arange(8) != 5
    assert torch.allclose(w_scale[others], expected[others], rtol=1e-5)
    assert float(w_scale[5]) > 100 * float(expected[5])
    with torch.no_grad():
        ref, out = net(data[0]), qm(data[0])
    assert sqnr_db(ref, out) >= 30
    assert torch.allclose(out[:, 5], ref[:, 5], atol=float(qm.model.get_submodule(qm.layers[-1].quantizer).scale))
