"""qdet: int8 quantization (post-training and QAT) of CNN detectors and classifiers, with the
accuracy lost and the size/speed won measured side by side.

    >>> import qdet
    >>> cfg = qdet.QuantConfig(activations=qdet.Observer.HISTOGRAM, weights=qdet.PerChannel())
"""
from qdet.api import (
    benchmark,
    convert,
    evaluate,
    export_onnx,
    get_adapter,
    load,
    lower,
    prepare_qat,
    quantize,
    save,
)
from qdet.coverage import coverage
from qdet.runtimes.executed import RuntimeCoverage, runtime_coverage
from qdet.config import (
    AdaRound,
    BiasCorrection,
    BiasCorrectionMode,
    PTQAlgorithms,
    Format,
    LayerOverride,
    Observer,
    OverflowFix,
    PerChannel,
    PerTensor,
    QATConfig,
    QuantConfig,
    QuantSpec,
    ResidualPolicy,
)
from qdet.errors import CalibrationError, ConfigError, DataError, QdetError, WeightsError
from qdet.qmodel import QuantizedModel

__version__ = "0.1.0"

__all__ = [
    "QuantConfig", "QuantSpec", "Observer", "PerChannel", "PerTensor", "ResidualPolicy", "Format",
    "LayerOverride", "QATConfig", "QuantizedModel", "quantize", "prepare_qat", "convert", "evaluate", "lower", "benchmark", "export_onnx",
    "save", "load", "get_adapter", "coverage", "runtime_coverage", "RuntimeCoverage", "QdetError", "ConfigError", "DataError", "WeightsError",
    "CalibrationError", "PTQAlgorithms", "AdaRound", "BiasCorrection", "BiasCorrectionMode", "OverflowFix",
]
