"""OverflowFix: 7-bit weights where int8 kernels add u8×s8 pairs in int16 (x86 CPUs without VNNI)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import qdet
from qdet.bench import machine
from qdet.bench.machine import CpuInfo, int8_dot_saturates
from qdet.config import OverflowFix, QuantConfig, default_weight_spec
from qdet.quant.quantizer import weight_codes

INT16_MAX = 2**15 - 1


class TwoBranch(nn.Module):
    """Two convs read the input (both are "first layers"), a third reads their sum, then a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c(torch.relu(self.a(x) + self.b(x))))
        return self.fc(y.mean((2, 3)))


def _batches(n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(4, 3, 16, 16, generator=g) * 4 - 2 for _ in range(n)]


def _quantize(fix: OverflowFix, model: nn.Module | None = None) -> qdet.QuantizedModel:
    torch.manual_seed(0)
    return qdet.quantize((model or TwoBranch()).eval(), _batches(), QuantConfig(overflow_fix=fix), progress=False)


def _weight_bits(qm: qdet.QuantizedModel) -> dict[str, int]:
    return {name: m.weight_quant.spec.bits for name, m in qm.model.named_modules() if hasattr(m, "weight_quant")}


def test_seven_bit_codes_cannot_saturate_int16_pairs_and_eight_bit_ones_can():
    # vpmaddubsw: u8 activation code × s8 weight code, two products added in int16
    assert 2 * 255 * 63 <= INT16_MAX < 2 * 255 * 65  # 7-bit codes (|q| <= 63) are safe, 65 would not be
    assert 2 * 255 * 127 > INT16_MAX


@pytest.mark.parametrize("flags, arch, expected", [
    ({"avx2", "fma"}, "x86_64", True),  # AVX2 only (the AMD EPYC these tests first failed on)
    ({"avx2", "avx512f", "avx512bw"}, "x86_64", True),  # AVX-512 without VNNI saturates too
    ({"avx2", "avx512f", "avx512_vnni"}, "x86_64", False),
    ({"avx2", "avx_vnni"}, "x86_64", False),
    ({"avx2", "amx_int8", "avx512_vnni"}, "x86_64", False),
    ({"asimd", "asimddp"}, "aarch64", False),  # ARM dot products accumulate in int32
    (set(), "x86_64", False),  # lscpu printed no flags: no basis to change the weights
])
def test_which_cpus_saturate(flags, arch, expected):
    assert int8_dot_saturates(CpuInfo("cpu", frozenset(flags)), machine=arch) is expected
    assert not int8_dot_saturates(CpuInfo("?", frozenset(), available=False), machine="x86_64")


@pytest.mark.parametrize("saturates, expected", [(True, OverflowFix.ALL), (False, OverflowFix.NONE)])
def test_auto_is_decided_by_the_machine_and_stored(monkeypatch, saturates, expected):
    monkeypatch.setattr(machine, "int8_dot_saturates", lambda *a, **k: saturates)
    assert QuantConfig().overflow_fix is OverflowFix.AUTO
    qm = _quantize(OverflowFix.AUTO)
    assert qm.config.overflow_fix is expected
    assert set(_weight_bits(qm).values()) == ({7} if saturates else {8})
    assert qdet.coverage(qm).overflow_fixed_layers == (4 if saturates else 0)


def test_all_makes_every_weight_seven_bit_and_uses_the_range():
    qm = _quantize(OverflowFix.ALL)
    layers = [m for m in qm.model.modules() if hasattr(m, "weight_quant")]
    assert len(layers) == 4
    for m in layers:
        codes = weight_codes(m.weight.detach(), m.weight_quant)
        assert int(codes.abs().max()) == 63  # min/max scale: the largest weight of some channel is ±63
        assert m.weight_quant.spec.qmin == -63 and m.weight_quant.spec.qmax == 63
    assert "7-bit weights ([-63, 63]) on 4 layers" in qdet.coverage(qm).table()


def test_first_layer_narrows_only_the_convs_that_read_the_input():
    qm = _quantize(OverflowFix.FIRST_LAYER)
    assert _weight_bits(qm) == {"a": 7, "b": 7, "c": 8, "fc": 8}


def test_narrower_specs_are_left_alone():
    torch.manual_seed(0)
    cfg = QuantConfig(weights=default_weight_spec(bits=4), overflow_fix=OverflowFix.ALL)
    qm = qdet.quantize(TwoBranch().eval(), _batches(), cfg, progress=False)
    assert set(_weight_bits(qm).values()) == {4}
    assert qdet.coverage(qm).overflow_fixed_layers == 0


def test_config_round_trip_and_old_files_mean_eight_bit():
    cfg = QuantConfig(overflow_fix="first_layer")
    assert cfg.overflow_fix is OverflowFix.FIRST_LAYER
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    old = {k: v for k, v in QuantConfig(overflow_fix=OverflowFix.ALL).to_dict().items() if k != "overflow_fix"}
    assert QuantConfig.from_dict(old).overflow_fix is OverflowFix.NONE  # saved before the option existed
    with pytest.raises(qdet.ConfigError, match="unknown overflow_fix 'sometimes'"):
        QuantConfig(overflow_fix="sometimes")


def test_seven_bit_model_saves_and_loads(tmp_path):
    qm = _quantize(OverflowFix.ALL)
    path = qdet.save(qm, tmp_path / "m.qdet")
    loaded = qdet.load(path, model=TwoBranch().eval())
    assert loaded.config.overflow_fix is OverflowFix.ALL
    x = torch.cat(_batches(1, seed=4))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), qm(x))


def test_auto_in_a_saved_file_is_refused(tmp_path):
    import dataclasses

    qm = _quantize(OverflowFix.ALL)
    qm.config = dataclasses.replace(qm.config, overflow_fix=OverflowFix.AUTO)
    path = qdet.save(qm, tmp_path / "m.qdet")
    with pytest.raises(qdet.QdetError, match="overflow_fix='auto' is not a decision"):
        qdet.load(path, model=TwoBranch().eval())


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino", "torch"])
def test_lowering_eight_bit_weights_warns_where_kernels_saturate(monkeypatch, runtime):
    from qdet.runtimes.base import get_runtime

    rt = get_runtime(runtime)
    if not rt.is_available():
        pytest.skip(f"{runtime} not installed")
    monkeypatch.setattr(machine, "int8_dot_saturates", lambda *a, **k: True)
    eight, seven = _quantize(OverflowFix.NONE), _quantize(OverflowFix.ALL)
    with pytest.warns(UserWarning, match="this CPU has no VNNI.*--overflow-fix all"):
        rt.lower(eight)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rt.lower(seven)
        get_runtime("reference").lower(eight)  # the simulation does not saturate
    monkeypatch.setattr(machine, "int8_dot_saturates", lambda *a, **k: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rt.lower(eight)


def _steps_off(qm: qdet.QuantizedModel, runtime: str, x: torch.Tensor) -> float:
    """Largest |runtime − simulation| in output quantization steps."""
    from qdet.quant.quantizer import Quantizer

    out_q = [m for n, m in qm.named_modules() if isinstance(m, Quantizer) and not n.endswith("weight_quant")][-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowered = qdet.lower(qm, runtime)
    with torch.no_grad():
        return float((lowered(x) - qm(x)).abs().max() / out_q.scale)


class WideStem(nn.Module):
    """Inputs that fill the uint8 range meet weights that fill the int8 range: saturation territory."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 8, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.mark.skipif(not int8_dot_saturates(), reason="this CPU's int8 kernels do not saturate (VNNI/AMX or not x86)")
@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino", "torch"])
def test_on_this_cpu_eight_bit_weights_saturate_and_seven_bit_do_not(runtime):
    """The phenomenon itself, where it exists: all-positive inputs near the top of their range times
    all-positive weights of code 127 overflow int16 in pairs; with codes of 63 they cannot."""
    from qdet.runtimes.base import get_runtime

    if not get_runtime(runtime).is_available():
        pytest.skip(f"{runtime} not installed")
    calib = [torch.rand(2, 16, 4, 4)]
    x = 0.9 + 0.1 * torch.rand(2, 16, 4, 4)
    eight = qdet.quantize(WideStem().eval(), calib, QuantConfig(overflow_fix=OverflowFix.NONE), progress=False)
    seven = qdet.quantize(WideStem().eval(), calib, QuantConfig(overflow_fix=OverflowFix.ALL), progress=False)
    assert _steps_off(eight, runtime, x) > 10  # the kernel clipped pair sums at 32,767
    assert _steps_off(seven, runtime, x) <= 1


def test_machine_docstring_examples_hold():
    import doctest

    assert doctest.testmod(machine).failed == 0
