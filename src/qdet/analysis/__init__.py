"""Layer-level analysis of a quantized model: paired capture, per-layer error, plots, sensitivity,
mixed precision, calibration studies and the HTML report. matplotlib is imported only when plotting.

    >>> from qdet.analysis import analyze, capture_pairs, layer_sensitivity  # doctest: +SKIP
    >>> rep = analyze(qmodel, batches, adapter.transform_fn(model), "runs/analysis")  # doctest: +SKIP
    >>> [e.name for e in rep.worst(5)]  # doctest: +SKIP
"""
from qdet.analysis.calibration_study import (
    CalibrationCurve,
    ObserverSweep,
    adapter_quantize_fn,
    calibration_curve,
    observer_sweep,
)
from qdet.analysis.capture import CaptureResult, LayerCapture, capture_pairs
from qdet.analysis.errors import LayerError, absolute_error, compare, layer_errors, relative_error
from qdet.analysis.report import AnalysisReport, analyze
from qdet.analysis.sensitivity import (
    MixedPrecisionResult,
    SensitivityMode,
    SensitivityResult,
    layer_sensitivity,
    mixed_precision_search,
    output_sqnr,
    to_config,
)

__all__ = [
    "capture_pairs", "CaptureResult", "LayerCapture", "LayerError", "layer_errors", "compare", "absolute_error",
    "relative_error", "analyze", "AnalysisReport", "layer_sensitivity", "SensitivityMode", "SensitivityResult",
    "mixed_precision_search", "MixedPrecisionResult", "to_config", "output_sqnr", "calibration_curve",
    "CalibrationCurve", "observer_sweep", "ObserverSweep", "adapter_quantize_fn",
]
