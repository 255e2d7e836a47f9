"""The `torch` runtime (x86/fbgemm int8 kernels) against the fake-quant reference `qmodel(x)`."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from qdet.config import QuantConfig, QuantSpec, default_weight_spec
from qdet.errors import ConfigError
from qdet.qmodel import QuantizedModel, quantize
from qdet.runtimes.base import get_runtime
from qdet.runtimes.torch_int8 import TorchInt8Runtime

pytestmark = pytest.mark.skipif(not TorchInt8Runtime.is_available(), reason="no x86/fbgemm quantized engine")

# Tolerance, in units of the region output's quantization step (its last Quantizer's scale).
# The reference rounds round(x / s) on a float32 accumulation; fbgemm accumulates in int32 and
# requantizes with its own float multiplier (and a reciprocal scale when quantizing), so a value
# that sits near a rounding boundary can land one LSB away at *each* requantization point. Such a
# 1-LSB flip propagates through the following layers (weighted by their gains) and the flips of
# different layers add up, so the output may differ by a few LSB — but never by a range error
# (wrong scale/zero point/weights give differences of tens to hundreds of LSB).
SMALL_MODEL_LSB = 3  # ≤ 5 quantized layers
RESNET_LSB = 6  # resnet18: ~20 requantization points in sequence


def _batches(shape: tuple[int, ...], n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def _quantize(model: nn.Module, shape: tuple[int, ...], cfg: QuantConfig | None = None) -> QuantizedModel:
    torch.manual_seed(0)
    return quantize(model.eval(), _batches(shape), cfg or QuantConfig(), progress=False)


def _output_scale(qm: QuantizedModel) -> float:
    """Scale of the last output quantizer of the (single) region."""
    region = qm.regions[""]
    last = [rec for rec in region.layers if rec.quantizer][-1]
    return float(region.module.get_submodule(last.quantizer).scale)


def _compare(qm: QuantizedModel, x: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    lowered = get_runtime("torch").lower(qm)
    with torch.no_grad():
        ref, out = qm(x), lowered(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    return float((ref - out).abs().max()) / _output_scale(qm), ref, out


def _bn(c: int) -> nn.BatchNorm2d:
    """A BN with non-trivial statistics, so folding matters."""
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return bn


class ConvStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), _bn(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False), _bn(16), nn.ReLU6(),
            nn.Conv2d(16, 8, 1), _bn(8), nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _bn(8), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), _bn(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), _bn(8)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(y + x)


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(8 * 8 * 8, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv(x)))
        x = torch.flatten(x, 1)
        return self.fc2(torch.relu(self.fc1(x)))


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.out = nn.Conv2d(10, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([torch.relu(self.a(x)), self.b(x)], dim=1)
        return self.out(self.up(y))


class SiLUNet(nn.Module):
    """YOLO-style ops: SiLU (decomposed) and sigmoid gating run int8; chunk runs on quint8."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), _bn(16)
        self.act = nn.SiLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        a, b = x.chunk(2, 1)
        b = self.conv2(b) * torch.sigmoid(b)
        return self.conv3(torch.cat([a, b], 1))


SMALL = [ConvStack, Residual, Head, Concat, SiLUNet]


@pytest.mark.parametrize("cls", SMALL, ids=lambda c: c.__name__)
def test_small_models_match_fake_quant_reference(cls: type[nn.Module]) -> None:
    qm = _quantize(cls(), (4, 3, 16, 16))
    lsb, _, _ = _compare(qm, _batches((8, 3, 16, 16), n=1, seed=1)[0])
    assert lsb <= SMALL_MODEL_LSB, f"{cls.__name__}: max |int8 - reference| = {lsb:.2f} output steps"


def _lowered_kinds(qm: QuantizedModel) -> tuple[set[str], list[str]]:
    lowered = get_runtime("torch").lower(qm)
    kinds = {type(m).__module__.rsplit(".", 1)[-1] + "." + type(m).__name__ for m in lowered.modules()}
    funcs = [str(n.target) for n in lowered.graph.nodes if n.op == "call_function"]
    return kinds, funcs + list(lowered.float_islands)


def test_int8_kernels_are_used_where_they_exist() -> None:
    kinds, _ = _lowered_kinds(_quantize(ConvStack(), (4, 3, 16, 16)))
    assert {"conv_relu.ConvReLU2d"} <= kinds  # ReLU and ReLU6 (grid tops out at 6) fused
    assert not any(k.startswith("conv.") and "Quant" in k for k in kinds)  # no fake-quant conv left
    kinds, calls = _lowered_kinds(_quantize(Residual(), (4, 3, 16, 16)))
    assert "quantized.add_relu" in calls
    kinds, calls = _lowered_kinds(_quantize(Head(), (4, 3, 16, 16)))
    assert {"linear_relu.LinearReLU", "linear.Linear"} <= kinds
    _, calls = _lowered_kinds(_quantize(Concat(), (4, 3, 16, 16)))
    assert "quantized.cat" in calls


def test_silu_and_sigmoid_run_int8() -> None:
    qm = _quantize(SiLUNet(), (4, 3, 16, 16))
    lowered = get_runtime("torch").lower(qm)
    # SiLU is decomposed into int8 sigmoid (native kernel) and int8 mul; the explicit sigmoid too
    assert "act" not in lowered.float_islands and "sigmoid" not in lowered.float_islands
    assert "chunk" not in lowered.float_islands and "conv2" not in lowered.float_islands
    assert "quantized.mul" in [str(n.target) for n in lowered.graph.nodes]  # conv2(b) * sigmoid(b)


def test_resnet18_matches_reference() -> None:
    torchvision = pytest.importorskip("torchvision")
    qm = _quantize(torchvision.models.resnet18(weights=None), (4, 3, 64, 64))
    x = _batches((64, 3, 64, 64), n=1, seed=2)[0]
    lsb, ref, out = _compare(qm, x)
    assert lsb <= RESNET_LSB, f"resnet18: max |int8 - reference| = {lsb:.2f} output steps"
    agree = (ref.argmax(1) == out.argmax(1)).float().mean().item()
    assert agree >= 0.95


def test_float_baseline_is_the_bn_folded_graph_without_quantizers() -> None:
    model = Residual().eval()
    qm = _quantize(model, (4, 3, 16, 16))
    baseline = get_runtime("torch").lower(qm, quantized=False)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(baseline(x), model(x), atol=1e-5, rtol=1e-5)
    assert not any("Quant" in type(m).__name__ for m in baseline.modules())


@pytest.mark.parametrize("bits", [7, 4])
def test_narrow_weights_run_as_int8_codes(bits: int) -> None:
    """7-bit (the overflow fix) and 4-bit weights are qint8 codes in a narrower range on fbgemm."""
    qm = _quantize(ConvStack(), (2, 3, 16, 16), QuantConfig(weights=default_weight_spec(bits=bits)))
    lsb, _, _ = _compare(qm, torch.cat(_batches((2, 3, 16, 16), seed=3)))
    assert lsb <= SMALL_MODEL_LSB


def test_unsigned_weights_are_a_clear_config_error() -> None:
    spec = dataclasses.replace(default_weight_spec(), signed=False, symmetric=False, narrow_range=False)
    qm = _quantize(ConvStack(), (2, 3, 16, 16), QuantConfig(weights=spec))
    with pytest.raises(ConfigError, match=r"layer 'body\.0\.weight'.*int8 weights .*got uint8"):
        get_runtime("torch").lower(qm)


def test_signed_activations_are_a_clear_config_error() -> None:
    qm = _quantize(ConvStack(), (2, 3, 16, 16), QuantConfig(activations=QuantSpec(bits=8, signed=True)))
    with pytest.raises(ConfigError, match=r"uint8 per-tensor activations only, got int8"):
        get_runtime("torch").lower(qm)


def test_deprecated_quantized_api_is_confined_to_torch_int8() -> None:
    src = Path(__import__("qdet").__file__).parent
    pattern = re.compile(r"torch\.ao\b|\bquantize_per_(tensor|channel)\b|torch\.ops\.quantized|\bq(u)?int8\b|backends\.quantized")
    offenders = [str(p.relative_to(src)) for p in src.rglob("*.py")
                 if p.name != "torch_int8.py" and pattern.search(p.read_text(encoding="utf-8"))]
    assert not offenders, f"deprecated torch quantized API used outside runtimes/torch_int8.py: {offenders}"
