"""Lowering a model and its ``ScaleState`` into ONNX, and the graph passes that shape the file.

Imports torch, onnx and ``runtime``; never the method (``sasq_edge``) or the command line.
"""

from exporters.lowering import ExportError
from exporters.onnx_export import ExportResult, export_onnx, output_folder

__all__ = ["ExportError", "ExportResult", "export_onnx", "output_folder"]
