"""qdet: int8 quantization of CNN detectors and classifiers."""
__version__ = "0.1.0"
