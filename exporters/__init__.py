"""Sources (Hugging Face folders, GGUF files, packaged models) -> cp-onnx model folders (ONNX + tokenizer + manifest).

Importing this package is torch-free: torch, transformers and Optimum are imported only when export() builds.
"""
from .errors import ExportError
from .manifest import MANIFEST_NAME, graph_format_of, is_export, precision_of, read_manifest, write_manifest
from .pipeline import export

__all__ = ["ExportError", "MANIFEST_NAME", "export", "graph_format_of", "is_export", "precision_of", "read_manifest",
           "write_manifest"]
