"""Prepare/calibrate/convert on toy models: structure, SQNR floors, policies, errors."""
import copy

import pytest
import torch
from torch import nn

from qdet.config import Format, LayerOverride, Observer, OverflowFix, PerTensor, QuantConfig, ResidualPolicy
from qdet.errors import CalibrationError, ConfigError
from qdet.qmodel import quantize
from qdet.quant.calibrate import quantization_disabled
from qdet.quant.fusion import fold_conv_bn
from qdet.quant.quantizer import CastQuantizer, QuantConv2d, Quantizer


class Block(nn.Module):
    """conv-bn-relu, conv-bn, residual add, relu, cat, pool, linear: every rule in one toy."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * 4 * 4, 5)

    def forward(self, x):
        a = self.relu(self.bn1(self.conv1(x)))
        b = self.bn2(self.conv2(a))
        y = self.relu(b + a)
        y = torch.cat([y, a], dim=1)
        return self.fc(torch.flatten(self.pool(y), 1))


def _model():
    torch.manual_seed(0)
    m = Block()
    for bn in (m.bn1, m.bn2):  # non-trivial BN statistics so folding matters
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
    return m.eval()


def _batches(n=4):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(n)]


def sqnr(ref, test):
    ref, test = ref.detach(), test.detach()
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - test).pow(2).mean()))


def test_bn_folding_is_exact():
    m = _model()
    fused = fold_conv_bn(m.conv1, m.bn1)
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(fused(x), m.bn1(m.conv1(x)), atol=1e-5)


def test_quantized_model_structure_and_names():
    qm = quantize(_model(), _batches(), QuantConfig(), progress=False)
    names = qm.layer_names()
    assert names == ["x", "conv1", "conv2", "add", "cat", "fc"]
    assert isinstance(qm.model.conv1, QuantConv2d)
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in qm.model.modules())
    kinds = {r.name: r.kind for r in qm.layers}
    assert kinds["add"] == "add" and kinds["cat"] == "cat"


def test_float_model_untouched_and_prepared_float_equals_original():
    m = _model()
    before = copy.deepcopy(m.state_dict())
    qm = quantize(m, _batches(), QuantConfig(), progress=False)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    x = torch.randn(2, 3, 8, 8)
    with quantization_disabled(qm):
        assert torch.allclose(qm(x), m(x), atol=1e-5)


@pytest.mark.parametrize("observer", [Observer.MINMAX, Observer.HISTOGRAM, Observer.PERCENTILE, Observer.ENTROPY, Observer.MSE, Observer.MOVING_AVERAGE])
@pytest.mark.parametrize("policy", list(ResidualPolicy))
def test_sqnr_floor_every_observer_and_policy(observer, policy):
    m = _model()
    qm = quantize(m, _batches(), QuantConfig(activations=observer, residual=policy), progress=False)
    x = torch.cat(_batches(2))
    # every observer measured ≥ 40 dB on this toy
    with torch.no_grad():
        assert sqnr(m(x), qm(x)) >= 35.0


def test_fuse_conv_add_removes_the_conv_output_quantizer():
    qa = quantize(_model(), _batches(), QuantConfig(residual=ResidualPolicy.QUANTIZED_ADD), progress=False)
    qf = quantize(_model(), _batches(), QuantConfig(residual=ResidualPolicy.FUSE_CONV_ADD), progress=False)
    rec_a = {r.name: r for r in qa.layers}
    rec_f = {r.name: r for r in qf.layers}
    assert rec_a["conv2"].quantizer and not rec_f["conv2"].quantizer
    assert rec_f["conv2"].weight_quantizer  # weights still int8
    # in the graph, the add reads the raw conv output: nothing sits on that edge
    add = next(n for n in qf.model.graph.nodes if n.name == "add")
    assert any(a.op == "call_module" and a.target == "conv2" for a in add.args)


def test_skip_keeps_layer_float_and_pattern_typo_is_an_error():
    qm = quantize(_model(), _batches(), QuantConfig(skip=("fc",)), progress=False)
    assert type(qm.model.fc) is nn.Linear
    with pytest.raises(ConfigError, match="'fcc' matches no quantizable layer; did you mean fc"):
        quantize(_model(), _batches(), QuantConfig(skip=("fcc",)), progress=False)


def test_override_per_layer_spec_and_half_formats():
    from qdet.config import QuantSpec

    cfg = QuantConfig(overrides=(LayerOverride("conv*", weights=QuantSpec(bits=4, signed=True, symmetric=True, narrow_range=True, observer=Observer.MINMAX, granularity=PerTensor())),),
                      overflow_fix=OverflowFix.NONE)  # 8-bit weights elsewhere on every CPU
    qm = quantize(_model(), _batches(), cfg, progress=False)
    assert qm.model.conv1.weight_quant.spec.bits == 4 and qm.model.fc.weight_quant.spec.bits == 8
    half = quantize(_model(), _batches(), QuantConfig(format=Format.FP16), progress=False)
    assert any(isinstance(mm, CastQuantizer) for mm in half.modules())
    int8 = quantize(_model(), _batches(), QuantConfig(), progress=False)
    x = torch.cat(_batches(1))
    with torch.no_grad():
        ref = _model()(x)
        # fp16 keeps 11 significant bits against int8's 8: clearly closer to float (seed 003)
        assert sqnr(ref, half(x)) > sqnr(ref, int8(x)) + 5


def test_weight_bits_lower_sqnr_monotonically():
    from qdet.config import default_weight_spec

    x = torch.cat(_batches(2))
    ref = _model()(x)
    scores = [sqnr(ref, quantize(_model(), _batches(), QuantConfig(weights=default_weight_spec(bits=b)), progress=False)(x)) for b in (8, 6, 4)]
    assert scores[0] > scores[1] > scores[2]


def test_empty_calibration_set_is_an_error():
    with pytest.raises(CalibrationError, match="calibration set is empty"):
        quantize(_model(), [], QuantConfig(), progress=False)


def test_nan_batch_names_the_layer():
    bad = _batches(1)[0].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(CalibrationError, match="NaN at layer 'x'"):
        quantize(_model(), [_batches(1)[0], bad], QuantConfig(), progress=False)


def test_all_zero_calibration_set_is_an_error():
    with pytest.raises(CalibrationError, match="zero"):
        quantize(_model(), [torch.zeros(2, 3, 8, 8)], QuantConfig(), progress=False)


def test_calibration_is_reproducible():
    x = torch.cat(_batches(1))
    a = quantize(_model(), _batches(), QuantConfig(activations=Observer.MSE), progress=False)(x)
    b = quantize(_model(), _batches(), QuantConfig(activations=Observer.MSE), progress=False)(x)
    assert torch.equal(a, b)


def test_untraceable_model_gives_config_error():
    class Dyn(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(ConfigError, match=r"no part of Dyn could be traced for quantization: \(model\): TraceError"):
        quantize(Dyn(), [torch.randn(1, 3)], QuantConfig(), progress=False)


def test_quantizers_are_calibrated():
    qm = quantize(_model(), _batches(), QuantConfig(), progress=False)
    qs = [q for q in qm.modules() if isinstance(q, Quantizer)]
    assert qs and all(q.calibrated and q.observer is None for q in qs)
