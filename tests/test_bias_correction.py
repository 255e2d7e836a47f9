"""Bias correction gives back the mean shift weight rounding causes (the default: FLOAT_MEANS)."""
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

import qdet
from qdet.config import PTQAlgorithms, QuantConfig
from qdet.qmodel import quantize

PLAIN = QuantConfig(ptq=PTQAlgorithms(bias_correction=None))


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
    plain = quantize(net, [x], PLAIN, progress=False)
    corrected = quantize(net, [x], QuantConfig(), progress=False)
    assert QuantConfig(bias_correction=True).ptq == QuantConfig().ptq  # the original flag is the default now
    assert _channel_mean_error(corrected, net, x).mean() < 0.5 * _channel_mean_error(plain, net, x).mean()
    # the float model is untouched, and the correction is part of the saved artefact
    assert net[0].bias is not None and not torch.equal(net[1].bias, corrected.model.get_submodule("1").bias)
    path = qdet.save(corrected, Path(tempfile.mkdtemp()) / "bc.qdet")
    loaded = qdet.load(path, net)
    assert loaded.config.ptq.bias_correction == QuantConfig().ptq.bias_correction
    with torch.no_grad():
        assert torch.equal(loaded(x), corrected(x))


def _only_weights_quantized(qm):
    from qdet.quant.quantizer import Quantizer

    for m in qm.modules():
        if isinstance(m, Quantizer) and not any(m is getattr(c, "weight_quant", None) for c in qm.modules()):
            m.enabled = False


def test_correction_knows_the_border_taps_padding_drops() -> None:
    """A 5×5 depthwise conv on 6×6 maps: border outputs see as few as 9 of 25 taps. The per-position
    correction leaves no mean shift; the per-channel form (kernel sum × channel mean) would."""
    from qdet.quant.bias_correction import _InputMean

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 8, 5, padding=2, groups=8)).eval()
    with torch.no_grad():
        net[0].weight.mul_(9.0)
    x = torch.rand(64, 8, 6, 6) * 2 + 3.0  # a large input mean: the weight error shows in the output mean
    errors = {}
    limit_before = _InputMean.POSITIONAL_LIMIT
    for name, limit in (("positional", limit_before), ("per_channel", 0)):
        _InputMean.POSITIONAL_LIMIT = limit
        try:
            qm = quantize(net, [x], QuantConfig(), progress=False)
        finally:
            _InputMean.POSITIONAL_LIMIT = limit_before
        _only_weights_quantized(qm)
        with torch.no_grad():
            errors[name] = float((qm(x) - net(x)).mean((0, 2, 3)).abs().max())
    plain = quantize(net, [x], PLAIN, progress=False)
    _only_weights_quantized(plain)
    with torch.no_grad():
        errors["plain"] = float((plain(x) - net(x)).mean((0, 2, 3)).abs().max())
    assert errors["positional"] < 1e-4 < errors["per_channel"]
    assert errors["positional"] < 0.01 * errors["plain"]


@pytest.fixture(scope="module")
def corrected_net():
    """A small conv net with coarse first-layer weights, quantized with the default bias correction."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    with torch.no_grad():
        net[0].weight.mul_(5.0)
    x = torch.rand(8, 3, 12, 12) + 1.0
    return net, x, quantize(net, [x], QuantConfig(), progress=False)


def test_a_layer_with_float_weights_gets_its_uncorrected_bias_back(corrected_net) -> None:
    """Sensitivity analysis switches single layers' quantizers off: the correction must go with them."""
    import copy

    from qdet.analysis.points import all_switches

    net, x, qm = corrected_net
    qm = copy.deepcopy(qm)
    conv = next(m for m in qm.modules() if hasattr(m, "uncorrected_bias"))
    assert not torch.equal(conv.bias, conv.uncorrected_bias)
    for m in all_switches(qm):
        m.enabled = False
    with torch.no_grad():
        torch.testing.assert_close(qm(x), net(x), rtol=0, atol=1e-5)  # all off: the float model exactly


@pytest.mark.parametrize("runtime", ["reference", "torch", "onnxruntime", "openvino", "integer"])
def test_float_baselines_carry_no_bias_correction(runtime, corrected_net) -> None:
    """`lower(qm, quantized=False)` is the float model, whose biases were never corrected."""
    pytest.importorskip({"onnxruntime": "onnxruntime", "openvino": "openvino"}.get(runtime, "torch"))
    net, x, qm = corrected_net
    assert any(hasattr(m, "uncorrected_bias") for m in qm.modules())
    with torch.no_grad():
        torch.testing.assert_close(qdet.lower(qm, runtime, quantized=False)(x), net(x), rtol=1e-4, atol=1e-4)
