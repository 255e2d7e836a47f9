"""After `lower`, the runtime itself says how many convs/matmuls it executes in int8 (issue 13).

Tiny user models (no adapter), one per pattern the generic path must handle: each must be fully
int8 with BN folded by qdet's coverage report, AND OpenVINO's compiled model / onnxruntime's
optimised graph must execute every conv and linear of it in int8, AND each runtime's int8 output
must stay within 30 dB SQNR of the float model on the model's own seeded data.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import qdet
from qdet.runtimes.executed import RuntimeCoverage, classify, runtime_coverage

pytest.importorskip("onnx")
RUNTIMES = [r for r, mod in (("openvino", "openvino"), ("onnxruntime", "onnxruntime"))
            if __import__("importlib").util.find_spec(mod) is not None]


class SamePadConv(nn.Conv2d):
    """A conv subclass with its own forward: TF-style static 'same' padding, then F.conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class FunctionalConvs(nn.Module):
    """Two convs and a linear as functional calls on the module's own parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(8) * 0.1)
        self.w2 = nn.Parameter(torch.randn(8, 1, 3, 3) * 0.3)  # depthwise
        self.fc_w = nn.Parameter(torch.randn(4, 8) * 0.3)
        self.fc_b = nn.Parameter(torch.randn(4) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(F.conv2d(x, self.w1, self.b1, padding=1))
        y = F.relu6(F.conv2d(y, self.w2, None, padding=1, groups=8))
        return F.linear(y.mean((2, 3)), self.fc_w, self.fc_b)


class ConfigLoop(nn.Module):
    """forward loops over a ModuleList with Python branches on each block's config; dict + tuple output."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg = [("conv", 1), ("shortcut", 0), ("dw", 8), ("conv", 1)]
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Identity() if kind == "shortcut" else
            nn.Sequential(SamePadConv(8, 8, 2, groups=groups, bias=False), nn.BatchNorm2d(8), nn.LeakyReLU(0.1))
            for kind, groups in self.cfg)

    def forward(self, x: torch.Tensor) -> dict:
        x = self.stem(x)
        outs = []
        for (kind, _), block in zip(self.cfg, self.blocks):
            x = x + outs[-1] if kind == "shortcut" else block(x)
            outs.append(x)
        return {"features": x, "pyramid": (outs[0], outs[2])}


def _same_pad_depthwise() -> nn.Module:
    return nn.Sequential(SamePadConv(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU6(),
                         SamePadConv(8, 8, 3, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),
                         nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU6(), nn.Flatten(), nn.Linear(16 * 7 * 7, 5))


def _activations() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Mish(), nn.Conv2d(8, 8, 3, groups=8),
                         nn.Hardswish(), nn.Conv2d(8, 8, 1), nn.LeakyReLU(0.1))


def _frozen_bn() -> nn.Module:
    from torchvision.ops.misc import FrozenBatchNorm2d

    return nn.Sequential(nn.Conv2d(3, 8, 3), FrozenBatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         FrozenBatchNorm2d(8), nn.ReLU())


# name → (builder, convs, linears): functional convs/linears are not modules, so they are counted here
MODELS = {
    "conv-subclass-same-pad-depthwise": (_same_pad_depthwise, 3, 1),
    "functional-convs": (FunctionalConvs, 2, 1),
    "config-loop-dict-tuple-out": (ConfigLoop, 4, 0),
    "mish-hardswish-leaky": (_activations, 3, 0),
    "frozen-bn": (_frozen_bn, 2, 0),
}


def _randomise_bn(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "running_mean") and hasattr(m, "running_var"):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                if getattr(m, "weight", None) is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _n_bn(model: nn.Module) -> int:
    return sum(hasattr(m, "running_mean") and hasattr(m, "running_var") for m in model.modules())


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean().clamp_min(1e-20)))


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    build, n_conv, n_linear = MODELS[request.param]
    torch.manual_seed(0)
    net = _randomise_bn(build())
    g = torch.Generator().manual_seed(1)
    data = [torch.rand(4, 3, 16, 16, generator=g) for _ in range(4)]
    qm = qdet.quantize(net, data, qdet.QuantConfig(), progress=False)
    return net, qm, data, n_conv, n_linear


def test_coverage_report_says_every_conv_linear_int8_and_bn_folded(case) -> None:
    net, qm, _, n_conv, n_linear = case
    cov = qdet.coverage(qm)
    assert (cov.int8_layers, cov.float_layers) == (n_conv + n_linear, 0)
    assert cov.int8_mac_share == 1.0
    assert cov.folded_batchnorms == _n_bn(net) and not cov.unfolded_batchnorms


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_runtime_executes_every_conv_and_linear_in_int8(case, runtime) -> None:
    net, qm, data, n_conv, n_linear = case
    lowered = qdet.lower(qm, runtime, threads=1)
    rc = qdet.runtime_coverage(lowered)
    assert rc is not None and rc.runtime == runtime
    assert (rc.int8_convs, rc.float_convs) == (n_conv, 0), rc.summary()
    assert (rc.int8_matmuls, rc.float_matmuls) == (n_linear, 0), rc.summary()
    with torch.no_grad():
        refs = torch.utils._pytree.tree_leaves(net(data[0]))
        outs = torch.utils._pytree.tree_leaves(lowered(data[0]))
    assert len(refs) == len(outs)
    for ref, out in zip(refs, outs):
        assert sqnr_db(ref, out) >= 30, (runtime, sqnr_db(ref, out))


def test_coverage_table_and_json_carry_the_runtime_counts() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    qm = qdet.quantize(net, [torch.rand(2, 3, 8, 8)], progress=False)
    lowered = qdet.lower(qm, "onnxruntime", threads=1)
    cov = qdet.coverage(qm, lowered=lowered)
    assert "onnxruntime executes 1 of 1 convolutions and 1 of 1 matmuls in int8" in cov.table()
    assert cov.as_dict()["runtime"]["onnxruntime"]["int8_convs"] == 1
    assert runtime_coverage(qm.model) is None  # the fake-quant simulation cannot tell
    assert runtime_coverage(qdet.lower(qm, "reference")) is None


def test_float_kernels_are_counted_and_named() -> None:
    """The float lowering (quantized=False) runs every conv/linear in fp32: all counted float, by name."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    qm = qdet.quantize(net, [torch.rand(2, 3, 8, 8)], progress=False)
    for runtime in RUNTIMES:
        rc = qdet.runtime_coverage(qdet.lower(qm, runtime, quantized=False, threads=1))
        assert (rc.int8_convs, rc.float_convs, rc.int8_matmuls, rc.float_matmuls) == (0, 1, 0, 1), rc
        assert len(rc.float_names) == 2 and any("0" in n for n in rc.float_names), rc.float_names


def test_classify_and_sum() -> None:
    a = classify("x", [("Conv", "c1", True), ("Conv", "c2", False), ("MatMul", "m", True), ("Add", "a", False)],
                 conv_types=frozenset({"Conv"}), matmul_types=frozenset({"MatMul"}))
    total = a + RuntimeCoverage("x", int8_convs=2)
    assert (total.int8_convs, total.float_convs, total.int8_matmuls, total.float_matmuls) == (3, 1, 1, 0)
    assert total.float_names == ["c2"]
    assert total.summary().startswith("x executes 3 of 4 convolutions and 1 of 1 matmuls in int8; float: c2")


def test_a_conv_the_runtime_keeps_float_is_counted_named_and_warned() -> None:
    """onnxruntime has no int8 conv+SiLU kernel: with fuse_silu the conv before SiLU runs fp32 there
    (DequantizeLinear → Conv → SiLU), while OpenVINO fuses it into its int8 conv."""
    import warnings

    from qdet.coverage import warn_if_runtime_float

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.SiLU(), nn.Conv2d(8, 8, 3), nn.ReLU()).eval()
    qm = qdet.quantize(net, [torch.rand(2, 3, 12, 12)], qdet.QuantConfig(fuse_silu=True), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lower() itself warns about SiLU on onnxruntime
        ort = qdet.lower(qm, "onnxruntime", threads=1)
    rc = qdet.runtime_coverage(ort)
    assert (rc.int8_convs, rc.float_convs) == (1, 1) and rc.float_names == ["0/Conv"], rc
    with pytest.warns(UserWarning, match=r"onnxruntime executes 1 of 2 convolutions .* float: 0/Conv"):
        warn_if_runtime_float(rc)
    if "openvino" in RUNTIMES:
        assert qdet.runtime_coverage(qdet.lower(qm, "openvino", threads=1)).float_convs == 0
