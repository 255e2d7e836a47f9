"""Saved .qdet files: int8 on disk, no pickle, exact reload, clear errors."""
import pytest
import torch
from torch import nn

from qdet import artifact
from qdet.config import Observer, QuantConfig
from qdet.errors import WeightsError
from qdet.qmodel import quantize


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 10)).eval()


@pytest.fixture
def qm():
    q = quantize(_net(), [torch.randn(4, 3, 8, 8) for _ in range(3)], QuantConfig(activations=Observer.MINMAX), progress=False)
    q.metrics = {"top1": 91.5}
    return q


def test_round_trip_is_exact_and_carries_config_and_metrics(qm, tmp_path):
    path = artifact.save(qm, tmp_path / "m.qdet")
    loaded = artifact.load(path, _net())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), qm(x))
    assert loaded.config == qm.config and loaded.metrics == {"top1": 91.5}


def test_weights_are_int8_on_disk(qm, tmp_path):
    from safetensors import safe_open

    path = artifact.save(qm, tmp_path / "m.qdet")
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("0.weight").dtype == torch.int8
        assert f.get_tensor("4.weight").dtype == torch.int8


def test_save_is_atomic_no_temp_left(qm, tmp_path):
    artifact.save(qm, tmp_path / "m.qdet")
    assert [p.name for p in tmp_path.iterdir()] == ["m.qdet"]


def test_missing_corrupt_and_wrong_architecture(qm, tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        artifact.load(tmp_path / "nope.qdet", _net())
    bad = tmp_path / "bad.qdet"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(WeightsError, match="bad.qdet"):
        artifact.load(bad, _net())
    path = artifact.save(qm, tmp_path / "m.qdet")
    wrong = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()
    with pytest.raises(WeightsError, match="m.qdet"):
        artifact.load(path, wrong)
