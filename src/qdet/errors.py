"""Errors qdet raises for user mistakes.

Every error names the file, layer or option at fault in one message, so that a user never has to
read a traceback from deep inside torch to learn what they did wrong.
"""
from __future__ import annotations


class QdetError(Exception):
    """Base class: a user-facing problem with a one-line explanation."""


class WeightsError(QdetError):
    """A weights file is missing, unreadable, corrupt or does not fit the architecture."""


class DataError(QdetError):
    """A dataset, image, annotation file or calibration set is missing or unusable."""


class ConfigError(QdetError):
    """An unknown or inconsistent option: observer, layer name, runtime, bit width..."""


class CalibrationError(QdetError):
    """Calibration could not produce valid quantization parameters (empty set, NaN, all zero)."""


class RuntimeUnavailable(QdetError):
    """An optional runtime (onnxruntime, openvino, fbgemm kernels) is not installed or cannot run."""


class ModelError(QdetError):
    """A user model (`--model-file`) cannot be loaded, built or run: missing file or function, the file or
    the function raises, it returns no nn.Module, or the model returns nothing tensor-like."""
