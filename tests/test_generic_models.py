"""Models qdet has no adapter for: every conv/linear int8, BN folded, accuracy kept (issue 13)."""
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

import qdet
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
    expected = dw.weight.detach().abs().flatten(1).amax(1) / dw.weight_quant.spec.qmax  # 127, or 63 with 7-bit weights
    others = torch.arange(8) != 5
    assert torch.allclose(w_scale[others], expected[others], rtol=1e-5)
    assert float(w_scale[5]) > 100 * float(expected[5])
    with torch.no_grad():
        ref, out = net(data[0]), qm(data[0])
    assert sqnr_db(ref, out) >= 30
    assert torch.allclose(out[:, 5], ref[:, 5], atol=float(qm.model.get_submodule(qm.layers[-1].quantizer).scale))


class SamePad(nn.Conv2d):
    """A user conv with its own forward: static padding, then F.conv2d (pretrained ports do this)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(nn.functional.pad(x, (0, 1, 0, 1)), self.weight, self.bias, self.stride, 0,
                                    self.dilation, self.groups)


class FunctionalNet(nn.Module):
    """Convs and a linear as functional calls on the module's own parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(8) * 0.1)
        self.fc_w = nn.Parameter(torch.randn(4, 8) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.relu(nn.functional.conv2d(x, self.w1, self.b1, padding=1))
        return nn.functional.linear(y.mean((2, 3)), self.fc_w)


class ConfigLoop(nn.Module):
    """forward loops over a ModuleList with Python branches on each block's config; dict output."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg = [("conv", 8), ("shortcut", 0), ("conv", 8)]
        self.blocks = nn.ModuleList()
        for kind, ch in self.cfg:
            self.blocks.append(nn.Sequential(SamePad(8, ch, 2, bias=False), nn.BatchNorm2d(ch), nn.LeakyReLU(0.1))
                               if kind == "conv" else nn.Identity())
        self.stem = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> dict:
        x = self.stem(x)
        outs = []
        for (kind, _), block in zip(self.cfg, self.blocks):
            x = x + outs[-1] if kind == "shortcut" else block(x)
            outs.append(x)
        return {"features": x, "pyramid": (outs[0], outs[-1])}


def _random_bn(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _leaves(out) -> list[torch.Tensor]:
    return list(torch.utils._pytree.tree_leaves(out))


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(SamePad(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU6(), SamePad(8, 8, 3, groups=8),
                          nn.BatchNorm2d(8), nn.ReLU6(), nn.Flatten(), nn.LazyLinear(5)),
    FunctionalNet,
    ConfigLoop,
    lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Mish(), nn.Conv2d(8, 8, 3), nn.Hardswish(),
                          nn.Conv2d(8, 8, 1), nn.LeakyReLU(0.1)),
], ids=["conv-subclass-same-pad", "functional", "config-loop-dict-out", "mish-hardswish-leaky"])
def test_user_model_is_fully_int8_with_bn_folded(make) -> None:
    torch.manual_seed(0)
    net = make()
    net(torch.randn(1, 3, 16, 16))  # materialise lazy layers
    net = _random_bn(net)
    data = [torch.rand(4, 3, 16, 16) for _ in range(4)]
    qm = quantize(net, data, QuantConfig(), progress=False)
    cov = qm.metrics["coverage"]
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    n_matmul = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in net.modules()) + (2 if make is FunctionalNet else 0)
    assert cov["int8_layers"] == n_matmul and cov["float_layers"] == 0
    assert cov["int8_mac_share"] == 1.0
    assert cov["folded_batchnorms"] == n_bn and not cov["unfolded_batchnorms"]
    with torch.no_grad():
        for ref, out in zip(_leaves(net(data[0])), _leaves(qm(data[0]))):
            assert sqnr_db(ref, out) >= 30


def test_frozen_batchnorm_folds() -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    bn = FrozenBatchNorm2d(8)
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 1.5)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), bn, nn.ReLU()).eval()
    qm = quantize(net, [torch.rand(2, 3, 16, 16)], QuantConfig(), progress=False)
    assert qm.metrics["coverage"]["folded_batchnorms"] == 1


def test_float_ops_are_reported_and_warned() -> None:
    """A Conv1d (no int8 path in qdet) and a matmul on activations stay float, with the reason."""

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv1d(3, 64, 5)
            self.small = nn.Linear(60, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.c1(x)
            return self.small(torch.matmul(y.transpose(1, 2), y).flatten(1)[:, :60])

    data = [torch.rand(2, 3, 32) for _ in range(2)]
    with pytest.warns(UserWarning, match=r"% of the conv/linear MACs are int8; largest float layers: matmul .*; c1 "):
        qm = quantize(Mixed().eval(), data, QuantConfig(), progress=False)
    cov = qm.metrics["coverage"]
    reasons = {f["name"]: f["reason"] for f in cov["kept_float"]}
    assert "Conv1d" in reasons["c1"] and "computed operands" in reasons["matmul"]
    assert cov["int8_layers"] == 1 and cov["float_layers"] == 2


class DataDependent(nn.Module):
    """fx cannot trace this forward (a branch on a tensor value, a loop over a tensor's length)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()) for _ in range(2))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            if x.mean() > -1e9:  # data-dependent: always true, but fx cannot know
                x = block(x)
        return self.head(x)


def test_untraceable_forward_is_split_into_traceable_submodules() -> None:
    torch.manual_seed(0)
    net = _random_bn(DataDependent())
    data = [torch.rand(4, 3, 16, 16) for _ in range(3)]
    with pytest.warns(UserWarning, match=r"could not trace \(model\) \(TraceError: .*own code runs float, the 4 traceable"):
        qm = quantize(net, data, QuantConfig(), progress=False)
    assert sorted(qm.regions) == ["blocks.0", "blocks.1", "head", "stem"]
    cov = qm.metrics["coverage"]
    assert cov["int8_layers"] == 4 and cov["float_layers"] == 0 and cov["folded_batchnorms"] == 1
    assert [u["path"] for u in cov["untraced"]] == ["(model)"]
    assert "untraceable, its own code runs float: (model)" in qdet.coverage(qm).table()
    with torch.no_grad():
        assert sqnr_db(net(data[0]), qm(data[0])) >= 30
    saved = qdet.load(qdet.save(qm, Path(tempfile.mkdtemp()) / "split.qdet"), net)  # regions survive a round trip
    with torch.no_grad():
        assert torch.equal(saved(data[0]), qm(data[0]))


class ClampIfNegative(nn.Module):
    """Weight-free, with a data-dependent branch fx cannot follow."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=0) if bool((x < 0).any()) else x


class OpaqueInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.gate, self.b = nn.Conv2d(3, 8, 3, padding=1), ClampIfNegative(), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gate(self.a(x))
        return self.fc((y + self.b(y)).mean((2, 3)))


def test_weight_free_module_fx_cannot_follow_is_one_float_node() -> None:
    """Only that module runs float; the rest of the graph (the add included) is traced and quantized."""
    torch.manual_seed(0)
    net = OpaqueInside().eval()
    data = [torch.randn(4, 3, 12, 12) for _ in range(3)]
    with pytest.warns(UserWarning, match=r"cannot follow 1 weight-free module.*gate \(TraceError"):
        qm = quantize(net, data, QuantConfig(), progress=False)
    assert list(qm.regions) == [""]  # no split: the model traced
    assert "add" in {rec.kind for rec in qm.layers}
    cov = qm.metrics["coverage"]
    assert cov["int8_layers"] == 3 and cov["float_layers"] == 0
    assert [(u["path"], u["opaque"]) for u in cov["untraced"]] == [("gate", True)]
    assert "runs float as one node: gate" in qdet.coverage(qm).table()
    with torch.no_grad():
        assert sqnr_db(net(data[0]), qm(data[0])) >= 30
    saved = qdet.load(qdet.save(qm, Path(tempfile.mkdtemp()) / "opaque.qdet"), net)
    with torch.no_grad():
        assert torch.equal(saved(data[0]), qm(data[0]))


class DecodingDetector(nn.Module):
    """A YOLO-style head whose forward decodes boxes (sigmoid, grid and anchor arithmetic, exp)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.SiLU(), nn.Conv2d(16, 16, 3, 2, 1),
                                  nn.SiLU())
        self.head = nn.Conv2d(16, 3 * 6, 1)
        self.register_buffer("anchors", torch.tensor([[10.0, 13.0], [16.0, 30.0], [33.0, 23.0]]).view(1, 3, 1, 1, 2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.head(self.body(x))
        b, _, h, w = raw.shape
        p = raw.view(b, 3, 6, h, w).permute(0, 1, 3, 4, 2)
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        grid = torch.stack((xs, ys), -1).view(1, 1, h, w, 2).float()
        xy = (p[..., :2].sigmoid() * 2 - 0.5 + grid) * 4
        wh = torch.exp(p[..., 2:4]) * self.anchors
        return torch.cat((xy, wh, p[..., 4:].sigmoid()), -1).view(b, -1, 6), raw


def test_box_decode_inside_forward_stays_float() -> None:
    torch.manual_seed(0)
    net = _random_bn(DecodingDetector())
    data = [torch.rand(4, 3, 32, 32) for _ in range(3)]
    qm = quantize(net, data, QuantConfig(), progress=False)
    cov = qm.metrics["coverage"]
    assert cov["int8_layers"] == 3 and cov["float_layers"] == 0 and cov["folded_batchnorms"] == 1
    decode = cov["decode_ops"]
    assert any("exp" in op for op in decode) and any("meshgrid" in op or "arange" in op for op in decode)
    assert any("cat" in op for op in decode)  # computed from decoded values: float too
    with torch.no_grad():
        (boxes_f, raw_f), (boxes_q, raw_q) = net(data[0]), qm(data[0])
    assert sqnr_db(raw_f, raw_q) >= 30
    # decoded in float from int8 head outputs: the box error is the head's error, not a second rounding
    head_q = qm.model.get_submodule(next(r.quantizer for r in qm.layers if r.name == "head"))
    assert torch.allclose(raw_q, head_q(raw_q))  # the returned raw map is on the head's int8 grid
    assert sqnr_db(boxes_f, boxes_q) >= 30
