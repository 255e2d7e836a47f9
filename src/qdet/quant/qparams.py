"""Scale/zero-point arithmetic on plain tensors (seed 002, section 6.4).

    scale = (f_max - f_min) / (q_max - q_min)          affine
    Z     = q_min - round(f_min / scale)               clamped to [q_min, q_max]
    q     = clamp(round(r / scale) + Z, q_min, q_max)
    r'    = scale · (q - Z)

The seed writes ⌊r/S + Z⌉ for the rounding; we round half to even (what ONNX QuantizeLinear and
the integer kernels do), so the round-trip error inside the range is at most scale/2.

When 0 lies outside [f_min, f_max] the seed clamps Z to q_min or q_max. Clamping alone would shift
the representable range away from the data, so we first widen the range to include 0 (then Z is
already inside [q_min, q_max]; the clamp remains as a guard). Zero must be exact anyway: padding
and ReLU produce exact zeros.
"""
from __future__ import annotations

import torch

# Smallest scale we hand out: an all-constant tensor must not give scale 0 (division by zero).
_MIN_SCALE = 1e-8


def _broadcast(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Reshape a per-channel vector (C,) so it broadcasts against x along `axis`."""
    if t.numel() == 1:
        return t.reshape(())
    if axis is None:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def compute_qparams(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    qmin: int,
    qmax: int,
    *,
    symmetric: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (scale float32, zero_point int32) for a range; scalars or per-channel vectors.

    >>> s, z = compute_qparams(torch.tensor(-1.0), torch.tensor(3.0), 0, 255)
    >>> round(float(s), 6), int(z)
    (0.015686, 64)
    """
    min_val = torch.as_tensor(min_val, dtype=torch.float32)
    max_val = torch.as_tensor(max_val, dtype=torch.float32)
    min_neg = torch.minimum(min_val, torch.zeros_like(min_val))
    max_pos = torch.maximum(max_val, torch.zeros_like(max_val))
    if symmetric:
        amax = torch.maximum(-min_neg, max_pos)
        if qmin < 0:
            # signed: zero point 0, amax maps to q_max (narrow range keeps ±q_max symmetric)
            scale = amax / float(qmax)
            zero_point = torch.zeros_like(scale)
        else:
            # unsigned symmetric: zero point in the middle of the range
            half = (qmax - qmin) / 2.0
            scale = amax / half
            zero_point = torch.full_like(scale, float(round((qmin + qmax + 1) / 2)))
    else:
        scale = (max_pos - min_neg) / float(qmax - qmin)
        scale = torch.clamp(scale, min=_MIN_SCALE)
        zero_point = qmin - torch.round(min_neg / scale)
    scale = torch.clamp(scale, min=_MIN_SCALE)
    zero_point = torch.clamp(zero_point, qmin, qmax)
    return scale.to(torch.float32), zero_point.to(torch.int32)


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int | None = None
) -> torch.Tensor:
    """Float → integer codes (returned as int32 so any bit width fits; cast at the storage edge)."""
    s = _broadcast(scale, x, axis)
    z = _broadcast(zero_point, x, axis).to(x.dtype)
    q = torch.round(x / s) + z
    return torch.clamp(q, qmin, qmax).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """Integer codes → float: r = scale · (q − Z)."""
    s = _broadcast(scale, q, axis)
    z = _broadcast(zero_point, q, axis)
    return (q.to(torch.float32) - z.to(torch.float32)) * s


class _FakeQuantizeSTE(torch.autograd.Function):
    """quantize∘dequantize forward; straight-through gradient inside the range, zero outside."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int, axis: int | None):  # type: ignore[override]
        s = _broadcast(scale, x, axis)
        z = _broadcast(zero_point, x, axis).to(x.dtype)
        q_unclamped = torch.round(x / s) + z
        inside = (q_unclamped >= qmin) & (q_unclamped <= qmax)
        ctx.save_for_backward(inside)
        return (torch.clamp(q_unclamped, qmin, qmax) - z) * s

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad_out * inside.to(grad_out.dtype), None, None, None, None, None


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int | None = None
) -> torch.Tensor:
    """Simulate quantization in float: dequantize(quantize(x)); differentiable (clipped STE).

    >>> x = torch.tensor([0.0, 0.1, 0.26, 9.0], requires_grad=True)
    >>> y = fake_quantize(x, torch.tensor(0.1), torch.tensor(0), 0, 255)
    >>> y.tolist()[:3]
    [0.0, 0.10000000149011612, 0.30000001192092896]
    """
    return _FakeQuantizeSTE.apply(x, scale, zero_point, qmin, qmax, axis)


def quantization_error_bound(scale: torch.Tensor) -> torch.Tensor:
    """Largest round-trip error for in-range values: half a step."""
    return scale / 2
