"""Integer-only arithmetic (qdet.quant.integer) and the `integer` runtime against the fake-quant reference."""
from __future__ import annotations

import json
from fractions import Fraction

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from qdet.config import QuantConfig, ResidualPolicy
from qdet.errors import ConfigError
from qdet.qmodel import quantize
from qdet.quant.integer import (
    decompose_multiplier,
    quantize_bias,
    requantize,
    rounding_right_shift,
)
from qdet.runtimes.base import get_runtime, runtime_names
from qdet.quant.quantizer import grid_bias
from qdet.runtimes.integer_export import export_integer_params, float64_reference, integer_params, layer_agreement

from conftest import require_asset


# ------------------------------------------------------------------ arithmetic
@pytest.mark.parametrize("m, expected", [
    (0.25, (2**30, 32)),
    (0.5, (2**30, 31)),
    (0.75, (3 * 2**29, 31)),
    (1.0, (2**30, 30)),
    (0.0, (0, 0)),
    (1 - 2.0**-40, (2**30, 30)),  # M0 rounds up to 2^31: carried into the shift
])
def test_decompose_multiplier_known_values(m: float, expected: tuple[int, int]) -> None:
    assert decompose_multiplier(m) == expected


def test_decompose_multiplier_keeps_31_bits() -> None:
    for m in [1 / 3, 0.1, 3.7e-5, 0.999, 2.2e-9]:
        m0, n = decompose_multiplier(m)
        assert 2**30 <= m0 < 2**31
        assert abs(Fraction(m0, 2**n) - Fraction(m)) <= Fraction(1, 2**(n + 1))  # M0 is round(M · 2^n)


def test_decompose_multiplier_rejects_bad_values() -> None:
    for bad in (-0.1, float("nan"), float("inf"), 2.0**31):
        with pytest.raises(ConfigError, match="conv7"):
            decompose_multiplier(bad, layer="conv7")


def test_rounding_right_shift_ties_to_even_and_negatives() -> None:
    x = torch.tensor([5, 6, 7, -5, -6, -7, 2, -2, 3, -3, 0])
    assert rounding_right_shift(x, 1).tolist() == [2, 3, 4, -2, -3, -4, 1, -1, 2, -2, 0]
    assert rounding_right_shift(x, 2).tolist() == [1, 2, 2, -1, -2, -2, 0, 0, 1, -1, 0]
    assert torch.equal(rounding_right_shift(x, 0), x)


def test_rounding_right_shift_matches_exact_rationals() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2**40, 2**40, (500,), generator=g)
    n = torch.randint(0, 45, (500,), generator=g)
    got = rounding_right_shift(x, n)  # per-element shifts
    want = [round(Fraction(int(v), 2**int(k))) for v, k in zip(x, n)]  # Python rounds Fractions half to even
    assert got.tolist() == want
    for k in (1, 20, 33):
        assert rounding_right_shift(x, k).tolist() == [round(Fraction(int(v), 2**k)) for v in x]


def test_requantize_rounds_and_saturates() -> None:
    m0, n = decompose_multiplier(0.25)
    acc = torch.tensor([10, 11, -10, 4000, -4000])
    assert requantize(acc, m0, n, zero_point=3, qmin=0, qmax=255).tolist() == [5, 6, 1, 255, 0]
    assert requantize(acc, m0, n, zero_point=0, qmin=-128, qmax=127).tolist() == [2, 3, -2, 127, -128]


def test_quantize_bias_rounds_and_refuses_overflow() -> None:
    b = quantize_bias(torch.tensor([1.0, -0.25]), torch.tensor([0.1, 0.1]))
    assert b.tolist() == [10, -2]  # -2.5 → -2 (half to even)
    with pytest.raises(ConfigError, match="layer 'fc'"):
        quantize_bias(torch.tensor([1.0]), torch.tensor([1e-12]), layer="fc")


# ------------------------------------------------------------------ runtime on tiny models
class _Tiny(nn.Module):
    """conv-bn-relu, residual add, max-pool, zero pad, concat, average pool, linear: every integer op."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(8, 4, 1)
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu1(self.bn1(self.conv1(x)))
        b = self.relu2(self.conv2(a) + a)
        p = self.pool(b)
        c = torch.cat([F.pad(self.conv3(p), (0, 0, 0, 0, 0, 0)), p], 1)
        return self.fc(torch.flatten(self.avg(c), 1))


def _tiny_qmodel(cfg: QuantConfig | None = None) -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    net = _Tiny().eval()
    batches = [torch.randn(4, 3, 12, 12) for _ in range(4)]
    return quantize(net, batches, cfg or QuantConfig(), progress=False), batches


def test_integer_runtime_registered() -> None:
    assert "integer" in runtime_names()


def test_tiny_model_agrees_with_reference_within_one_lsb() -> None:
    qm, _ = _tiny_qmodel()
    lowered = get_runtime("integer").lower(qm)
    x = [torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(1))]
    forced, _ = layer_agreement(qm, lowered, x, teacher_forced=True)
    assert forced, "no layer compared"
    for s in forced.values():  # one op at a time: integer and float simulation differ only on near-ties
        assert s.max_diff <= 1, s
        assert s.pct_equal >= 99.0, s
    e2e, outs = layer_agreement(qm, lowered, x)
    total = sum(s.elements for s in e2e.values())
    assert sum(s.within_1 for s in e2e.values()) / total >= 0.999
    fake_out, int_out = outs[0]
    out_q = qm.model.get_submodule(qm.layers[-1].quantizer)
    assert float(((fake_out - int_out).abs() / out_q.scale).max()) <= 1.0 + 1e-4


def test_fake_quant_bias_is_the_int32_bias_of_the_integer_runtime() -> None:
    qm, _ = _tiny_qmodel()
    layers = integer_params(qm)["layers"]
    for name in ("conv1", "conv2", "fc"):
        mod = qm.model.get_submodule(name)
        step = torch.tensor(layers[name]["accumulator_scale"], dtype=torch.float64)
        b = grid_bias(mod).detach().double()
        assert torch.equal(torch.round(b / step), torch.tensor(layers[name]["bias_int32"], dtype=torch.float64))
        assert float((b - mod.bias.detach().double()).abs().max()) <= float(step.max()) / 2 + 1e-9


def test_grid_bias_passes_gradients_straight_through() -> None:
    qm, _ = _tiny_qmodel()
    mod = qm.model.get_submodule("conv1")
    grid_bias(mod).sum().backward()
    assert torch.equal(mod.bias.grad, torch.ones_like(mod.bias))


def test_float64_simulation_equals_integer_runtime_on_every_code() -> None:
    """Bias on the int32 grid and adds rounded once: the float64 simulation computes the same codes."""
    qm, _ = _tiny_qmodel()
    lowered = get_runtime("integer").lower(qm)
    x = [torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(1))]
    stats, _ = layer_agreement(float64_reference(qm), lowered, x)
    assert "relu2" in stats or any("add" in k for k in stats)  # the residual add is compared
    for s in stats.values():
        assert s.equal == s.elements, s


class _TwoConvAdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3)
        self.c2 = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c1(x) + self.c2(x)


def test_add_without_output_quantizer_uses_the_shared_2_20_grid() -> None:
    torch.manual_seed(0)
    qm = quantize(_TwoConvAdd().eval(), [torch.randn(4, 3, 8, 8) for _ in range(2)],
                  QuantConfig(quantize_outputs=False), progress=False)
    add = integer_params(qm)["layers"]["add"]
    assert add["kind"] == "add" and add["left_shift"] == 20 and "output_scale" not in add
    x = torch.randn(4, 3, 8, 8)
    lowered = get_runtime("integer").lower(qm)
    # the float add result, on a grid 2^-20 of the larger input step: equal up to float32 round-off
    with torch.no_grad():
        assert float((qm(x) - lowered(x)).abs().max()) <= 2 * add["accumulator_scale"] + 1e-6


def test_unsupported_op_names_the_node() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Hardswish()).eval()
    qm = quantize(net, [torch.randn(2, 3, 8, 8)], QuantConfig(), progress=False)
    with pytest.raises(ConfigError, match=r"Hardswish at '1'"):
        get_runtime("integer").lower(qm)


def test_fused_conv_add_gives_a_clear_error() -> None:
    qm, _ = _tiny_qmodel(QuantConfig(residual=ResidualPolicy.FUSE_CONV_ADD))
    with pytest.raises(ConfigError, match="quantized_add"):
        get_runtime("integer").lower(qm)


def test_export_json_reproduces_the_first_layer(tmp_path) -> None:
    qm, batches = _tiny_qmodel()
    path = export_integer_params(qm, tmp_path / "params.json")
    params = json.loads(path.read_text())
    layer = params["layers"]["conv1"]
    assert all(2**30 <= m < 2**31 for m in layer["requant_m0"])
    # A hardware engineer's conv from the JSON alone (plus the int8 weight codes) matches the runtime.
    mod = qm.model.get_submodule("conv1")
    wq = mod.weight_quant
    w = torch.round(mod.weight.detach().double() / wq.scale.double().reshape(-1, 1, 1, 1))
    x_in = params["layers"]["x"]
    x = batches[0]
    qx = torch.clamp(torch.round(x.double() / x_in["output_scale"]) + x_in["output_zero_point"], 0, 255)
    acc = F.conv2d(qx - layer["input_zero_point"], w, None, 1, 1).to(torch.int64)
    acc = acc + torch.tensor(layer["bias_int32"]).reshape(1, -1, 1, 1)
    acc = acc.clamp(min=0)  # the fused ReLU
    m0 = torch.tensor(layer["requant_m0"]).reshape(1, -1, 1, 1)
    n = torch.tensor(layer["requant_shift"]).reshape(1, -1, 1, 1)
    codes = requantize(acc, m0, n, zero_point=layer["output_zero_point"], qmin=layer["qmin"], qmax=layer["qmax"])
    lowered = get_runtime("integer").lower(qm)
    region = next(m for m in lowered.modules() if hasattr(m, "record"))
    region.record = {}
    lowered(x)
    assert torch.equal(codes, region.record["conv1"])


# ------------------------------------------------------------------ real weights
@pytest.mark.assets
def test_resnet20_integer_matches_fake_quant_on_real_images(one_torch_thread: None) -> None:
    require_asset("weights/cifar10_resnet20.pt")
    require_asset("cifar10/test")
    from qdet import api
    from qdet.data.folders import make_loader, seeded_subset

    adapter = api.get_adapter("resnet20")
    data = adapter.eval_dataset()
    qm = api.quantize(adapter.build(), make_loader(seeded_subset(data, 64, seed=0), 32), QuantConfig(),
                      adapter=adapter, progress=False)
    lowered = api.lower(qm, "integer")
    images = next(iter(make_loader(seeded_subset(data, 64, seed=1), 64)))[0]
    forced, _ = layer_agreement(qm, lowered, [images], teacher_forced=True)
    assert max(s.max_diff for s in forced.values()) <= 1
    # issue #6 criterion: >= 99.9 % of all output codes within 1 LSB end to end, with the default
    # (float32) simulation and with its float64 twin
    for ref in (qm, float64_reference(qm)):
        e2e, outs = layer_agreement(ref, lowered, [images])
        total = sum(s.elements for s in e2e.values())
        assert sum(s.within_1 for s in e2e.values()) / total >= 0.999
        fake_out, int_out = outs[0]
        assert float((fake_out.argmax(1) == int_out.argmax(1)).float().mean()) >= 63 / 64
    assert sum(s.equal for s in e2e.values()) / total >= 0.9999  # float64: (nearly) every code identical


@pytest.mark.assets
def test_cli_export_int_writes_json(tmp_path) -> None:
    require_asset("weights/cifar10_resnet20.pt")
    require_asset("cifar10/test")
    from qdet.cli import main

    out = tmp_path / "r20.json"
    assert main(["export-int", "resnet20", "--calib-images", "32", "--out", str(out), "--no-progress"]) == 0
    params = json.loads(out.read_text())
    assert params["format"] == "qdet-integer/2"
    add = params["layers"]["layer1.0.add"]
    assert add["kind"] == "add" and len(add["input_m0"]) == 2 and len(add["input_shift"]) == 2
    assert "left_shift" not in add and add["qmax"] == 255  # rounded once, straight onto the add's output grid
    assert all(isinstance(b, int) for b in params["layers"]["conv1"]["bias_int32"])
