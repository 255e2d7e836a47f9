"""Seed-002 formulas, checked exactly."""
import pytest
import torch

from qdet.quant.qparams import compute_qparams, dequantize, fake_quantize, quantize


def test_affine_scale_and_zero_point_match_seed_formulas():
    f_min, f_max, q_min, q_max = -1.0, 3.0, 0, 255
    scale, zp = compute_qparams(torch.tensor(f_min), torch.tensor(f_max), q_min, q_max)
    assert float(scale) == pytest.approx((f_max - f_min) / (q_max - q_min), rel=1e-7)  # Eq. 2
    assert int(zp) == round(q_min - f_min / float(scale))  # Eq. 3
    assert int(zp) == 64


def test_signed_int8_range():
    scale, zp = compute_qparams(torch.tensor(-2.0), torch.tensor(2.0), -128, 127)
    assert float(scale) == pytest.approx(4.0 / 255)
    assert int(zp) == round(-128 + 2.0 / float(scale))


@pytest.mark.parametrize("lo,hi", [(2.0, 4.0), (-5.0, -1.0)])
def test_range_excluding_zero_is_widened_and_zero_point_stays_in_range(lo, hi):
    scale, zp = compute_qparams(torch.tensor(lo), torch.tensor(hi), 0, 255)
    assert 0 <= int(zp) <= 255
    # zero is exactly representable (padding and ReLU produce exact zeros)
    assert float(fake_quantize(torch.tensor(0.0), scale, zp, 0, 255)) == 0.0
    if lo > 0:
        assert int(zp) == 0  # seed: "set Z to q_min" when 0 lies below the range
        assert float(scale) == pytest.approx(hi / 255)
    else:
        assert int(zp) == 255  # ... and q_max when it lies above
        assert float(scale) == pytest.approx(-lo / 255)


def test_round_trip_error_at_most_half_a_step_inside_range():
    torch.manual_seed(0)
    x = torch.randn(10_000) * 3
    scale, zp = compute_qparams(x.min(), x.max(), 0, 255)
    err = (dequantize(quantize(x, scale, zp, 0, 255), scale, zp) - x).abs()
    assert float(err.max()) <= float(scale) / 2 + 1e-6


def test_values_outside_range_are_clamped():
    scale, zp = torch.tensor(0.1), torch.tensor(0, dtype=torch.int32)
    q = quantize(torch.tensor([-1.0, 100.0]), scale, zp, 0, 255)
    assert q.tolist() == [0, 255]


def test_per_channel_symmetric_weights():
    w = torch.tensor([[1.0, -2.0], [0.5, 0.25]])
    scale, zp = compute_qparams(w.min(1).values, w.max(1).values, -127, 127, symmetric=True)
    assert torch.allclose(scale, torch.tensor([2.0 / 127, 0.5 / 127]))
    assert zp.tolist() == [0, 0]
    q = quantize(w, scale, zp, -127, 127, axis=0)
    assert q.tolist() == [[64, -127], [127, 64]]


def test_matches_aten_fake_quant():
    torch.manual_seed(1)
    x = torch.randn(1000) * 2
    scale, zp = compute_qparams(x.min(), x.max(), 0, 255)
    ours = fake_quantize(x, scale, zp, 0, 255)
    ref = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), 0, 255)
    assert torch.equal(ours, ref)


def test_straight_through_gradient_inside_range_zero_outside():
    x = torch.tensor([0.05, 0.5, 30.0], requires_grad=True)
    y = fake_quantize(x, torch.tensor(0.1), torch.tensor(0, dtype=torch.int32), 0, 255)
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0]


def test_constant_tensor_gets_positive_scale():
    scale, zp = compute_qparams(torch.tensor(0.0), torch.tensor(0.0), 0, 255)
    assert float(scale) > 0 and int(zp) == 0
