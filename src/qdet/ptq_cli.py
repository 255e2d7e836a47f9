"""`qdet quantize --cle --bias-correction --adaround [--adaround-iters N]`: options and the per-layer table.

    >>> import argparse
    >>> p = argparse.ArgumentParser(); add_ptq_options(p)
    >>> ptq_from_args(p.parse_args(["--adaround", "--adaround-iters", "200", "--bias-correction"]))
    ... # doctest: +NORMALIZE_WHITESPACE
    PTQAlgorithms(cle=False, high_bias_absorption=True, adaround=AdaRound(iterations=200, batch_size=32,
        max_images=1024, lr=0.01, reg_weight=0.01, beta_start=20.0, beta_end=2.0, warmup=0.2, seed=0),
        bias_correction=BiasCorrection(mode=<BiasCorrectionMode.EMPIRICAL: 'empirical'>, max_images=1024),
        relu6_to_relu=False)
"""
from __future__ import annotations

import argparse
import math
from typing import Any

from qdet.config import (
    AdaRound,
    BiasCorrection,
    BiasCorrectionMode,
    PTQAlgorithms,
    parse_enum,
)
from qdet.errors import ConfigError


def add_ptq_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("post-training algorithms (beyond round-to-nearest)")
    g.add_argument("--cle", action="store_true",
                   help="cross-layer equalization (with high-bias absorption) of conv→ReLU/LeakyReLU/identity→conv "
                        "chains, depthwise included, before calibration")
    g.add_argument("--cle-relu6-to-relu", action="store_true",
                   help="with --cle: replace ReLU6 between two convs by ReLU and equalize those chains too "
                        "(changes the float model where a pre-activation exceeds 6; MobileNetV2/EfficientNet-Lite "
                        "have no other chains)")
    g.add_argument("--bias-correction", nargs="?", const="empirical", default=None, metavar="MODE",
                   help="fold the mean output shift into the biases: float_means (the default without this flag: "
                        "E[(W − Q(W)) * x] from the float calibration inputs, no extra pass), empirical (the flag "
                        "alone: measured per layer on the calibration images, quantized layers upstream), "
                        "analytic (from BN statistics, data-free) or none (off)")
    g.add_argument("--adaround", action="store_true",
                   help="AdaRound: learn each weight's rounding (down/up) layer by layer on the calibration images")
    g.add_argument("--adaround-iters", type=int, default=None, metavar="N",
                   help="AdaRound optimiser steps per layer (default: 1000)")


def ptq_from_args(args: argparse.Namespace) -> PTQAlgorithms:
    """The PTQAlgorithms the flags ask for (the defaults when the parser has none of them)."""
    iters = getattr(args, "adaround_iters", None)
    adaround = getattr(args, "adaround", False)
    if iters is not None and not adaround:
        raise ConfigError("--adaround-iters needs --adaround")
    if iters is not None and iters < 1:
        raise ConfigError(f"--adaround-iters {iters}: must be at least 1")
    mode = getattr(args, "bias_correction", None)
    if mode is None:
        bc = PTQAlgorithms().bias_correction
    elif mode == "none":
        bc = None
    else:
        bc = BiasCorrection(parse_enum(BiasCorrectionMode, mode, "--bias-correction mode"))
    cle, relu6 = getattr(args, "cle", False), getattr(args, "cle_relu6_to_relu", False)
    if relu6 and not cle:
        raise ConfigError("--cle-relu6-to-relu needs --cle")
    return PTQAlgorithms(cle=cle, bias_correction=bc, relu6_to_relu=relu6,
                         adaround=AdaRound(iterations=iters or 1000) if adaround else None)


def _db(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def layer_table(qm: Any) -> str | None:
    """Per-layer output SQNR (dB vs float, calibration images) after each step, or None without a pass."""
    from qdet.report.table import format_table

    rows = qm.metrics.get("ptq_layers")
    if not rows:
        return None
    cfg = qm.config.ptq
    plain = "plain" + (" (after CLE)" if cfg.cle else "")
    shown = [{"layer": r["layer"], plain: _db(r["sqnr_plain"]), "nearest here": _db(r["sqnr_nearest"]),
              "+adaround": _db(r["sqnr_adaround"]), "+bias corr.": _db(r["sqnr_bias_corrected"]),
              "flipped": "" if r["flipped"] is None else r["flipped"]} for r in rows]
    cols = ["layer", plain, "nearest here"] + (["+adaround", "flipped"] if cfg.adaround else []) + \
        (["+bias corr."] if cfg.bias_correction is not None and cfg.bias_correction.mode is BiasCorrectionMode.EMPIRICAL
         else [])
    head = ("per-layer output SQNR (dB vs float, calibration images): plain = round-to-nearest everywhere; "
            "nearest here = this layer rounded to nearest after the layers before were processed; then after "
            "each step on this layer")
    return head + "\n" + format_table(shown, cols)


def print_layer_table(qm: Any) -> None:
    table = layer_table(qm)
    if table:
        print(table)
