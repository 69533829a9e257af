"""The device side of sasq-edge: everything that reads, runs and checks an exported folder.

Deploy profiles and grids as plain data, the scale-state files, metadata keys, one ONNX graph index,
sessions, perplexity, parity, generation, the fusion check and the TensorRT lint. Imports numpy,
onnx, onnxruntime, safetensors and tokenizers only: never torch, transformers or anything of
``exporters`` or ``sasq_edge`` (tests/test_layers.py checks it).
"""

from runtime.version import __version__  # noqa: I001  (first: the modules below read it)
from runtime.errors import RuntimeSetupError, SasqError
from runtime.metadata import read_metadata
from runtime.parity import ParityAccumulator, ParityReport
from runtime.perplexity import OnnxPpl, perplexity, token_nll
from runtime.session import PROVIDERS, LMSession, open_session
from runtime.state import ScaleState

__all__ = [
    "PROVIDERS",
    "LMSession",
    "OnnxPpl",
    "ParityAccumulator",
    "ParityReport",
    "RuntimeSetupError",
    "SasqError",
    "ScaleState",
    "__version__",
    "open_session",
    "perplexity",
    "read_metadata",
    "token_nll",
]
