"""The op-kind table: one answer per computation, whatever its spelling (issue 13)."""
import pytest
import torch
from torch import fx, nn
from torch.nn import functional as F

from qdet.config import QuantConfig
from qdet.qmodel import quantize
from qdet.quant.opkinds import OpKind, op_kind


class Spellings(nn.Module):
    def forward(self, x):
        a = F.relu(x)
        b = torch.relu(x)
        c = x.relu()
        d = F.relu6(x)
        e = F.hardtanh(x, 0.0, 6.0)
        f = F.interpolate(x, scale_factor=2.0)
        g = F.pad(x, (1, 1, 1, 1))
        h = x + a
        i = x * 2.0
        return a, b, c, d, e, f, g, h, i


def test_every_spelling_maps_to_one_kind() -> None:
    gm = fx.symbolic_trace(Spellings())
    kinds = [op_kind(n).value for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    assert kinds == ["relu", "relu", "relu", "relu6", "relu6", "upsample_nearest", "zero_pad", "add", "other"]


@pytest.mark.parametrize("bn", [nn.BatchNorm2d(8), nn.SyncBatchNorm(8)], ids=["BatchNorm2d", "SyncBatchNorm"])
def test_batchnorm_variants_fold(bn: nn.Module) -> None:
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 1.5)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), bn, nn.Hardtanh(0.0, 6.0), nn.Conv2d(8, 4, 1)).eval()
    x = torch.rand(2, 3, 12, 12)
    qm = quantize(net, [x], QuantConfig(), progress=False)
    assert qm.metrics["coverage"]["folded_batchnorms"] == 1
    # Hardtanh(0, 6) is a ReLU6: fused into the first conv, so no quantizer of its own
    assert [r.name for r in qm.layers] == ["input_1", "0", "3"]
    import qdet

    with torch.no_grad():
        ref = net(x)
        for runtime in ("integer", "openvino"):
            out = qdet.lower(qm, runtime)(x)
            assert 10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()) >= 30, runtime
