"""cp-onnx: find, verify and apply reasoning circuits in transformer language models on ONNX graphs."""

__version__ = "0.1.0"
