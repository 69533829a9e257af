"""ONNX Runtime side of sasq-edge: sessions, perplexity, parity. Needs no torch."""

from runtime.parity import ParityAccumulator, ParityReport
from runtime.perplexity import OnnxPpl, perplexity, token_nll
from runtime.session import PROVIDERS, LMSession, RuntimeSetupError, open_session, read_metadata

__all__ = [
    "PROVIDERS",
    "LMSession",
    "OnnxPpl",
    "ParityAccumulator",
    "ParityReport",
    "RuntimeSetupError",
    "open_session",
    "perplexity",
    "read_metadata",
    "token_nll",
]
