"""API-level behaviour: calibration/preprocessing mismatch warning (seed 003's SSD pitfall)."""
import warnings

import pytest
import torch

from qdet import api
from qdet.config import QuantConfig


def test_range_check_flags_unnormalised_and_0_255_inputs():
    assert api.check_input_range(torch.rand(4, 3, 8, 8), (-2.12, 2.64), "m") is not None  # [0,1] vs normalised
    assert api.check_input_range(torch.rand(4, 3, 8, 8) * 255, (0.0, 1.0), "m") is not None  # 0..255 vs [0,1]
    normalised = (torch.rand(4, 3, 8, 8) - 0.45) / 0.225
    assert api.check_input_range(normalised, (-2.12, 2.64), "m") is None


def test_quantize_warns_on_mismatched_calibration_data():
    adapter = api.get_adapter("resnet20")
    model = adapter.build("random")
    unnormalised = [(torch.rand(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)) for _ in range(2)]
    with pytest.warns(UserWarning, match="is the calibration data preprocessed like inference data"):
        api.quantize(model, unnormalised, QuantConfig(), adapter=adapter, progress=False)
    normalised = [((torch.rand(4, 3, 32, 32) - 0.45) / 0.225, torch.zeros(4, dtype=torch.long)) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        api.quantize(model, normalised, QuantConfig(), adapter=adapter, progress=False)


def test_benchmark_times_models_round_robin_on_the_same_inputs():
    calls: list[tuple[str, object]] = []
    x = torch.zeros(2)
    models = {name: ("torch", (lambda inp, name=name: calls.append((name, inp))), None) for name in ("a", "b")}
    rows = api.benchmark(models, (x,), threads=1, warmup=1, repeats=3, progress=False)
    assert [r.name for r in rows] == ["a", "b"] and all(r.latency.repeats == 3 for r in rows)
    assert all(inp is x for _, inp in calls)
    assert [n for n, _ in calls[2:]] == ["a", "b"] * 3  # after one warm-up each: interleaved rounds
