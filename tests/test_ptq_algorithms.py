"""Cross-layer equalization, bias correction (empirical, analytic) and AdaRound (qdet.PTQAlgorithms)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from torch import fx, nn

import qdet
from qdet.config import (
    AdaRound,
    BiasCorrection,
    BiasCorrectionMode,
    PTQAlgorithms,
    QuantConfig,
    default_weight_spec,
)
from qdet.errors import ConfigError
from qdet.quant.adaround import adaround_layer
from qdet.quant.calibrate import quantization_disabled
from qdet.quant.equalize import equalize
from qdet.quant.fusion import fold_batchnorms
from qdet.quant.quantizer import (
    QuantConv2d,
    QuantLinear,
    make_weight_quantizer,
    weight_codes,
)


def _randomise_bn(net: nn.Module) -> nn.Module:
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.1, 4)
            m.weight.data.uniform_(0.1, 3)
            m.bias.data.uniform_(-1, 2)
    return net


def _net() -> nn.Module:
    """conv-bn-relu → depthwise-bn-leaky → pointwise → maxpool → grouped conv → relu6 → conv → linear."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.LeakyReLU(0.1),
        nn.Conv2d(16, 8, 1), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU6(), nn.Conv2d(8, 4, 1),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 5)).eval()
    _randomise_bn(net)
    with torch.no_grad():
        net[0].weight[:8].mul_(30.0)  # channel ranges far apart: what CLE is for
    return net


W4 = default_weight_spec(bits=4)


def _out_ranges(gm: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().abs().reshape(m.weight.shape[0], -1).amax(1)
            for n, m in gm.named_modules() if isinstance(m, nn.Conv2d)}


# ---------------------------------------------------------------- config
def test_config_round_trips_and_old_flag_migrates() -> None:
    cfg = QuantConfig(ptq=PTQAlgorithms(cle=True, adaround=AdaRound(iterations=10, seed=3),
                                        bias_correction=BiasCorrection(BiasCorrectionMode.ANALYTIC)))
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    old = QuantConfig(bias_correction=True).to_dict()
    old.pop("ptq")  # an artefact written before PTQAlgorithms existed
    migrated = QuantConfig.from_dict(old)
    assert migrated.ptq.bias_correction == BiasCorrection(BiasCorrectionMode.FLOAT_MEANS)
    with pytest.raises(ConfigError, match="conflicts"):
        QuantConfig(bias_correction=True, ptq=PTQAlgorithms(bias_correction=BiasCorrection()))
    with pytest.raises(ConfigError, match="iterations"):
        AdaRound(iterations=0)


# ---------------------------------------------------------------- CLE
def test_cle_keeps_the_float_function_and_equalises_ranges() -> None:
    net = _net()
    gm = fx.symbolic_trace(net)
    fold_batchnorms(gm)
    x = torch.randn(4, 3, 12, 12)
    ref = gm(x)
    before = _out_ranges(gm)
    pairs = equalize(gm, high_bias_absorption=False)
    assert [(p.first, p.second) for p in pairs] == [("0", "3"), ("3", "6"), ("6", "8")]  # relu6 chain left alone
    assert torch.allclose(gm(x), ref, atol=1e-5, rtol=0)
    after = _out_ranges(gm)
    spread = lambda r: float(r.max() / r.min())
    assert spread(after["0"]) < 0.1 * spread(before["0"])
    # both sides of an equalized pair have the same range per channel: r1_c = max_o |W2[o, c]|
    w3 = gm.get_submodule("3").weight.detach().abs().reshape(16, -1).amax(1)
    first = after["0"]
    assert torch.allclose(first, w3, rtol=1e-4) or spread(first) < spread(before["0"])


def test_cle_in_quantize_is_exact_in_float_and_reloads() -> None:
    net = _net()
    x = torch.randn(8, 3, 12, 12)
    cfg = QuantConfig(weights=default_weight_spec(qdet.PerTensor()),
                      ptq=PTQAlgorithms(cle=True, high_bias_absorption=False))
    qm = qdet.quantize(net, [x], cfg, progress=False)
    assert len(qm.metrics["cle_pairs"]) == 3
    with torch.no_grad(), quantization_disabled(qm):
        assert torch.allclose(qm(x), net(x), atol=1e-5, rtol=0)
    plain = qdet.quantize(net, [x], QuantConfig(weights=default_weight_spec(qdet.PerTensor())), progress=False)
    with torch.no_grad():  # per-tensor weights: equalized ranges lose less
        err = lambda m: float((m(x) - net(x)).pow(2).mean())
        assert err(qm) < err(plain)
    loaded = qdet.load(qdet.save(qm, Path(tempfile.mkdtemp()) / "cle.qdet"), net)
    with torch.no_grad():
        assert torch.equal(loaded(x), qm(x))


def test_cle_through_relu6_replaces_it_by_relu_and_reports_it() -> None:
    import torch.nn.functional as F

    torch.manual_seed(2)

    class Lite(nn.Module):  # one shared ReLU6 module, a functional relu6 and a hardtanh(0, 6)
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.c3, self.c4 = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)
            self.act = nn.ReLU6()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.c3(F.relu6(self.c2(self.act(self.c1(x)))))
            return self.c4(F.hardtanh(y, 0.0, 6.0)) + self.act(y).sum()  # y has two users: no c3 → c4 chain

    net = Lite().eval()
    with torch.no_grad():
        net.c1.weight[:4].mul_(40.0)
    gm = fx.symbolic_trace(net)
    x = 0.05 * torch.randn(2, 3, 6, 6)  # small inputs: every pre-activation stays below 6
    with torch.no_grad():
        ref, pre = gm(x), net.c1(x)
    assert float(pre.max()) < 6.0
    spread = lambda r: float(r.max() / r.min())
    before = spread(_out_ranges(gm)["c1"])
    pairs = equalize(gm, high_bias_absorption=False, relu6_to_relu=True)
    assert [(p.first, p.second, p.through, p.relu6_replaced) for p in pairs] == \
        [("c1", "c2", "relu", True), ("c2", "c3", "relu", True)]
    assert spread(_out_ranges(gm)["c1"]) < 0.2 * before
    assert torch.allclose(gm(x), ref, atol=1e-5, rtol=0)  # ReLU = ReLU6 below 6
    targets = [n.target for n in gm.graph.nodes if n.op != "placeholder"]
    assert targets.count(F.relu) == 2 and targets.count("act") == 1  # the shared module's other call stays ReLU6
    assert F.hardtanh in targets  # its conv has two users: not a chain, left alone
    with pytest.raises(ConfigError, match="needs cle"):
        PTQAlgorithms(relu6_to_relu=True)
    qm = qdet.quantize(net, [x], QuantConfig(ptq=PTQAlgorithms(cle=True, relu6_to_relu=True)), progress=False)
    assert sum(p["relu6_replaced"] for p in qm.metrics["cle_pairs"]) == 2
    relus = [n for n in qm.regions[""].module.graph.nodes if n.target is F.relu]
    assert [n.args[0].target for n in relus] == ["c1", "c2"]  # fused: conv → relu → one output quantizer
    loaded = qdet.load(qdet.save(qm, Path(tempfile.mkdtemp()) / "relu6.qdet"), net)
    with torch.no_grad():
        assert torch.equal(loaded(x), qm(x))


def test_relu6_to_relu_warns_when_bn_statistics_say_relu6_clipped() -> None:
    def net(mean: float) -> fx.GraphModule:
        torch.manual_seed(3)
        seq = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU6(), nn.Conv2d(4, 4, 1)).eval()
        with torch.no_grad():
            seq[1].running_mean.zero_(), seq[1].running_var.fill_(1.0)
            seq[1].weight.fill_(2.0), seq[1].bias.fill_(mean)  # folded pre-activation ~ N(mean, 2²)
        gm = fx.symbolic_trace(seq)
        fold_batchnorms(gm)
        return gm

    with pytest.warns(UserWarning, match=r"1 of 1 replaced layers .*\(0 50\.0 %\)"):
        pairs = equalize(net(6.0), relu6_to_relu=True)  # half of N(6, 2²) lies above 6
    assert pairs[0].above6 == pytest.approx(0.5, abs=1e-6)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = equalize(net(-2.0), relu6_to_relu=True)  # 6 is 4 std above the mean: 3e-5 above
    assert quiet[0].relu6_replaced and quiet[0].above6 < 1e-4


def test_high_bias_absorption_is_exact_where_relu_passes_everything() -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1)).eval()
    with torch.no_grad():
        net[0].weight.zero_()  # pre-activations are the BN output β: always ≥ β − 3γ
        net[1].bias.copy_(torch.tensor([3.0, 0.1, 5.0, -1.0, 2.0, 8.0]))
        net[1].weight.fill_(0.5)
    gm = fx.symbolic_trace(net)
    fold_batchnorms(gm)
    x = torch.randn(2, 3, 5, 5)
    ref = gm(x)
    pairs = equalize(gm, high_bias_absorption=True)
    assert pairs[0].absorbed
    assert torch.allclose(gm(x), ref, atol=1e-5, rtol=0)
    assert float(gm.get_submodule("0").bias.detach().max()) < 8.0 - 1.0  # β − 3γ moved into the next conv


# ---------------------------------------------------------------- bias correction
def _layer_outputs(qm: qdet.QuantizedModel, x: torch.Tensor) -> dict[str, torch.Tensor]:
    outs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _a, o, n=n: outs.__setitem__(n, o.detach()))
             for n, m in qm.model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    with torch.no_grad():
        qm(x)
    for h in hooks:
        h.remove()
    return outs


def _channel_mean(t: torch.Tensor) -> torch.Tensor:
    return t.mean((0, 2, 3)) if t.dim() == 4 else t.mean(0)


def test_empirical_bias_correction_zeroes_mean_output_shift_on_calibration_data() -> None:
    net = _net()
    x = torch.rand(32, 3, 12, 12) * 2
    plain = qdet.quantize(net, [x[:16], x[16:]], QuantConfig(weights=W4, ptq=PTQAlgorithms(bias_correction=None)), progress=False)
    with quantization_disabled(plain):
        float_outs = _layer_outputs(plain, x)  # the float model, same graph and names
    corrected = qdet.quantize(net, [x[:16], x[16:]],
                              QuantConfig(weights=W4, ptq=PTQAlgorithms(bias_correction=BiasCorrection())),
                              progress=False)
    q_plain, q_corr = _layer_outputs(plain, x), _layer_outputs(corrected, x)
    for name, ref in float_outs.items():
        shift_plain = (_channel_mean(q_plain[name]) - _channel_mean(ref)).abs()
        shift_corr = (_channel_mean(q_corr[name]) - _channel_mean(ref)).abs()
        mod = corrected.model.get_submodule(name)
        # zeroed up to the int32 bias grid: kernels add round(b / (s_x·s_w)), so half a step per channel remains
        half_step = 0.5 * float(mod.input_quant.scale) * mod.weight_quant.scale
        assert bool((shift_corr <= half_step * 1.01 + 1e-5).all()), (name, shift_corr, half_step)
        assert float(shift_corr.max()) < 0.5 * float(shift_plain.max())
    rows = corrected.metrics["ptq_layers"]
    assert [r["layer"] for r in rows] == ["0", "3", "6", "8", "10", "12"]
    assert all(r["sqnr_bias_corrected"] >= r["sqnr_nearest"] - 0.5 for r in rows)


def test_analytic_bias_correction_uses_bn_statistics() -> None:
    net = _net()
    x = torch.rand(8, 3, 12, 12)
    cfg = QuantConfig(weights=W4, ptq=PTQAlgorithms(bias_correction=BiasCorrection(BiasCorrectionMode.ANALYTIC)))
    plain = qdet.quantize(net, [x], QuantConfig(weights=W4, ptq=PTQAlgorithms(bias_correction=None)), progress=False)
    qm = qdet.quantize(net, [x], cfg, progress=False)
    changed = [n for n, m in qm.model.named_modules() if isinstance(m, QuantConv2d)
               and not torch.equal(m.bias, plain.model.get_submodule(n).bias)]
    assert changed == ["3", "6"]  # the convs fed by a BN-folded conv through ReLU / LeakyReLU
    y = torch.randn(200000, 1) * 1.5 + 0.3  # E[LeakyReLU(y)] of the analytic means, checked by sampling
    from qdet.quant.bias_correction import analytic_input_means
    means = analytic_input_means(qm.regions[""].module)
    assert set(means) == {qm.model.get_submodule("3"), qm.model.get_submodule("6")}
    from qdet.quant.bias_correction import clipped_normal_mean
    est = clipped_normal_mean(torch.tensor([0.3]), torch.tensor([1.5]), 0.0, 6.0)
    assert abs(float(est) - float(y.clamp(0, 6).mean())) < 0.01
    # TF-"same" convs (EfficientNet-Lite) pad before the conv: the mean passes the zero padding
    padded = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU6(), nn.ZeroPad2d((0, 1, 0, 1)),
                           nn.Conv2d(8, 4, 2)).eval()
    _randomise_bn(padded)
    qp = qdet.quantize(padded, [x], cfg, progress=False)
    assert set(analytic_input_means(qp.regions[""].module)) == {qp.model.get_submodule("4")}


# ---------------------------------------------------------------- AdaRound
def test_adaround_stays_within_one_step_and_lowers_layer_mse() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3)
    wq = make_weight_quantizer(conv.weight, default_weight_spec(bits=3), "conv.weight")
    nearest = weight_codes(conv.weight.detach(), wq)
    # correlated channels, spatially smooth (as image features are): with white inputs round-to-nearest
    # is already optimal per weight and there is nothing for AdaRound to win
    base = torch.randn(64, 2, 6, 6)
    x = nn.functional.avg_pool2d(torch.einsum("ck,nkhw->nchw", torch.randn(8, 2), base)
                                 + 0.1 * torch.randn(64, 8, 6, 6), 3, 1, 1)
    x_q = x + 0.01 * torch.randn_like(x)  # the quantized model's input differs slightly from the float one
    with torch.no_grad():
        target = conv(x)
    res = adaround_layer(conv, wq, x_q, x, target, AdaRound(iterations=200, seed=0), progress=False)
    codes = weight_codes(conv.weight.detach(), wq)
    assert int((codes - nearest).abs().max()) <= 1
    assert res.flipped > 0 and res.mse_after < 0.5 * res.mse_before, res
    # the rounded weights lie exactly on the grid: the codes are what `weight_codes` returns
    assert torch.allclose(conv.weight.detach().double(), codes.double() * wq.scale.double().reshape(-1, 1, 1, 1))


def test_adaround_model_saves_loads_and_lowers_with_its_rounding() -> None:
    ort = pytest.importorskip("onnxruntime")  # noqa: F841
    net = _net()
    x = torch.rand(32, 3, 12, 12)
    cfg = QuantConfig(ptq=PTQAlgorithms(adaround=AdaRound(iterations=40, batch_size=8)))
    plain = qdet.quantize(net, [x[:16], x[16:]], QuantConfig(), progress=False)
    qm = qdet.quantize(net, [x[:16], x[16:]], cfg, progress=False)
    rows = qm.metrics["ptq_layers"]
    assert all(r["adaround_mse_after"] <= r["adaround_mse_before"] for r in rows)
    flipped = sum(r["flipped"] for r in rows)
    assert flipped > 0
    moved = 0
    for name, m in qm.model.named_modules():
        if isinstance(m, (QuantConv2d, QuantLinear)):
            ours = weight_codes(m.weight.detach(), m.weight_quant)
            theirs = weight_codes(plain.model.get_submodule(name).weight.detach(), m.weight_quant)
            assert int((ours - theirs).abs().max()) <= 1
            moved += int((ours != theirs).sum())
    assert moved == flipped
    loaded = qdet.load(qdet.save(qm, Path(tempfile.mkdtemp()) / "ada.qdet"), net)
    with torch.no_grad():
        assert torch.equal(loaded(x), qm(x))
        lowered = qdet.lower(qm, "onnxruntime", threads=1)
        ort_out, ref, other = torch.as_tensor(lowered(x)), qm(x), plain(x)
    assert float((ort_out - ref).abs().max()) < 0.25 * float((other - ref).abs().max())


# ---------------------------------------------------------------- CLI
def test_cli_flags_build_the_algorithms_and_the_layer_table() -> None:
    import argparse

    from qdet.ptq_cli import add_ptq_options, layer_table, ptq_from_args

    p = argparse.ArgumentParser()
    add_ptq_options(p)
    algos = ptq_from_args(p.parse_args(["--cle", "--bias-correction", "--adaround", "--adaround-iters", "5"]))
    assert algos.cle and algos.adaround == AdaRound(iterations=5)
    assert algos.bias_correction == BiasCorrection(BiasCorrectionMode.EMPIRICAL)
    assert ptq_from_args(p.parse_args(["--bias-correction", "analytic"])).bias_correction.mode is \
        BiasCorrectionMode.ANALYTIC
    with pytest.raises(ConfigError, match="--adaround-iters needs --adaround"):
        ptq_from_args(p.parse_args(["--adaround-iters", "5"]))
    assert ptq_from_args(p.parse_args(["--cle", "--cle-relu6-to-relu"])).relu6_to_relu
    with pytest.raises(ConfigError, match="--cle-relu6-to-relu needs --cle"):
        ptq_from_args(p.parse_args(["--cle-relu6-to-relu"]))
    with pytest.raises(ConfigError, match="--bias-correction mode"):
        ptq_from_args(p.parse_args(["--bias-correction", "magic"]))
    net = _net()
    x = torch.rand(8, 3, 12, 12)
    qm = qdet.quantize(net, [x], QuantConfig(weights=W4, ptq=algos), progress=False)
    table = layer_table(qm)
    assert table is not None and "plain (after CLE)" in table and "+adaround" in table and "+bias corr." in table
    assert len(table.splitlines()) == 3 + 6  # heading, column names, rule, one row per conv/linear


def test_cli_rejects_bad_ptq_options_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    from qdet.cli import main

    assert main(["quantize", "resnet20", "--adaround-iters", "10"]) == 2
    assert "--adaround-iters needs --adaround" in capsys.readouterr().err
