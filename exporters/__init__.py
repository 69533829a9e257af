"""ONNX export of SASQ-quantized models: the dynamo export, graph post-passes, lint."""

from exporters.onnx_export import ExportError, ExportResult, export_onnx

__all__ = ["ExportError", "ExportResult", "export_onnx"]
