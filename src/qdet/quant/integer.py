"""Integer-only reference arithmetic (seed 002 §6.6): int32 accumulators, int32 bias, M = 2^-n · M0.

A quantized conv computes, with codes q and zero points Z (weights symmetric, Z_w = 0):

    acc   = Σ (q_x − Z_x) · q_w  +  b_q          int32, on the grid S_x · S_w
    b_q   = round(b / (S_x · S_w))               int32 bias
    q_out = sat(Z_out + rshift_round(acc · M0, n)) with M = S_x·S_w / S_out = M0 · 2^-n

M0 is a 31-bit integer in [2^30, 2^31), so M keeps 31 significant bits; `acc · M0` fits int64
(|acc| < 2^31, M0 < 2^31). Every rounding here rounds half to even, as `torch.round` does in the
fake-quant simulation and ONNX QuantizeLinear does, so ties agree with the reference runtime.
All functions take and return int64 tensors holding integer values; nothing here uses floats
except `decompose_multiplier`, which runs once per layer offline.

    >>> decompose_multiplier(0.25)
    (1073741824, 32)
    >>> requantize(torch.tensor([10, 11, -10]), 1073741824, 32, zero_point=3, qmin=0, qmax=255).tolist()
    [5, 6, 1]
"""
from __future__ import annotations

import math

import torch

from qdet.errors import ConfigError

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
M0_BITS = 31  # M0 ∈ [2^30, 2^31): 31 significant bits, a positive int32
MAX_SHIFT = 62  # acc · M0 < 2^62: a right shift beyond 62 leaves only the sign


def decompose_multiplier(m: float, *, layer: str = "") -> tuple[int, int]:
    """M → (M0, n) with M ≈ M0 · 2^-n, M0 ∈ [2^30, 2^31), 0 ≤ n ≤ 62. M = 0 gives (0, 0).

    Multipliers below 2^-32 cannot keep 31 bits within a 62-bit shift; they keep fewer (their
    products are < 1 LSB anyway). Raises ConfigError naming `layer` for M < 0, M ≥ 2^30 or non-finite M.
    """
    if not math.isfinite(m) or m < 0:
        raise ConfigError(f"layer {layer!r}: requantization multiplier must be finite and >= 0, got {m}")
    if m == 0:
        return 0, 0
    mant, exp = math.frexp(m)  # m = mant · 2^exp, mant ∈ [0.5, 1)
    m0 = round(mant * 2**M0_BITS)  # ∈ [2^30, 2^31]
    n = M0_BITS - exp
    if m0 == 2**M0_BITS:  # rounding carried into bit 31
        m0, n = m0 // 2, n - 1
    if n < 0:
        raise ConfigError(f"layer {layer!r}: requantization multiplier {m:g} >= 2^30 cannot be an int32 M0 · 2^-n")
    if n > MAX_SHIFT:
        m0 = round(m * 2**MAX_SHIFT)
        n = MAX_SHIFT
    return int(m0), int(n)


def rounding_right_shift(x: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
    """round(x / 2^n) with ties to even, exactly, on int64; `n` ≥ 0 (scalar or broadcastable).

    Round half up with one add and an arithmetic shift, then step back by one on exact ties
    whose result is odd.

    >>> rounding_right_shift(torch.tensor([5, 6, 7, -5, -6, -7, 2, -2]), 2).tolist()
    [1, 2, 2, -1, -2, -2, 0, 0]
    """
    x = x.to(torch.int64)
    if isinstance(n, int) or torch.as_tensor(n).numel() == 1:
        k = int(n)
        if k < 0:
            raise ValueError("shift must be >= 0")
        if k == 0:
            return x
        half, mask = 1 << (k - 1), (1 << k) - 1
        r = torch.bitwise_right_shift(x + half, k)
        tie = torch.bitwise_and(x, mask) == half
        return r - (tie & (torch.bitwise_and(r, 1) == 1)).to(torch.int64)
    n_t = torch.as_tensor(n, dtype=torch.int64, device=x.device)
    if bool((n_t < 0).any()):
        raise ValueError("shift must be >= 0")
    one = torch.ones_like(n_t)
    half = torch.where(n_t > 0, torch.bitwise_left_shift(one, (n_t - 1).clamp(min=0)), torch.zeros_like(n_t))
    mask = torch.bitwise_left_shift(one, n_t) - 1
    r = torch.bitwise_right_shift(x + half, n_t)
    tie = (torch.bitwise_and(x, mask) == half) & (n_t > 0)
    return r - (tie & (torch.bitwise_and(r, 1) == 1)).to(torch.int64)


def multiply_by_quantized_multiplier(acc: torch.Tensor, m0: torch.Tensor | int, n: torch.Tensor | int) -> torch.Tensor:
    """round(acc · M0 · 2^-n), exact in int64 for |acc| < 2^31 and M0 < 2^31."""
    return rounding_right_shift(acc.to(torch.int64) * torch.as_tensor(m0, dtype=torch.int64), n)


def saturate(x: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Clamp to [qmin, qmax] (the hardware's saturating cast)."""
    return x.clamp(qmin, qmax)


def requantize(
    acc: torch.Tensor, m0: torch.Tensor | int, n: torch.Tensor | int, *, zero_point: int, qmin: int, qmax: int
) -> torch.Tensor:
    """int32 accumulator → output codes: sat(Z + round(acc · M0 · 2^-n))."""
    return saturate(multiply_by_quantized_multiplier(acc, m0, n) + zero_point, qmin, qmax)


def quantize_bias(bias: torch.Tensor, acc_scale: torch.Tensor, *, layer: str = "") -> torch.Tensor:
    """b_q = round(b / (S_x · S_w)) as int64 values in int32 range; ConfigError naming `layer` if not."""
    q = torch.round(bias.detach().to(torch.float64) / acc_scale.to(torch.float64))
    if bool((q.abs() > INT32_MAX).any()):
        raise ConfigError(f"layer {layer!r}: bias does not fit int32 at its input scale; re-calibrate the model "
                          "(fit_biases_in_int32 raises such weight scales or widens the input grid)")
    return q.to(torch.int64)


def multipliers(scales: torch.Tensor, *, layer: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (M0, n) int64 vectors for a vector (or scalar) of float multipliers."""
    pairs = [decompose_multiplier(float(m), layer=layer) for m in scales.reshape(-1).to(torch.float64)]
    m0 = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
    n = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
    return m0, n


__all__ = [
    "INT32_MIN", "INT32_MAX", "decompose_multiplier", "rounding_right_shift", "multiply_by_quantized_multiplier",
    "saturate", "requantize", "quantize_bias", "multipliers",
]
