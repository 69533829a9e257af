"""Fingerprint of an exported QDQ graph: what must stay bit-identical when the code around the
export changes: every Q/DQ scale and zero point, every integer initializer, and the
float initializers, each hashed with its dtype and shape (names excluded, so a rename of a tensor
does not count as a change of the model), plus the Q/DQ and MatMul counts.

Imports only onnx, numpy and hashlib (and the runtime, for the perplexity).
"""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

_QDQ = ("QuantizeLinear", "DequantizeLinear")


def _digest(a: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:20]


def export_fingerprint(model: onnx.ModelProto) -> dict:
    inits = {t.name: t for t in model.graph.initializer}
    qdq_inputs = set()
    for n in model.graph.node:
        if n.op_type in _QDQ:
            qdq_inputs.update(i for i in n.input if i in inits)
    quant, floats = [], []
    for name, t in inits.items():
        a = numpy_helper.to_array(t)
        (quant if name in qdq_inputs or a.dtype in (np.int8, np.uint8) else floats).append(_digest(a))
    ops = Counter(n.op_type for n in model.graph.node)
    return {
        "quant_initializers": sorted(quant),
        "float_initializers": sorted(floats),
        "counts": {k: ops.get(k, 0) for k in ("QuantizeLinear", "DequantizeLinear", "MatMul", "Gather", "Tanh")},
    }


def eval_windows() -> np.ndarray:
    """The fixed byte-token windows the recorded perplexities use."""
    return np.random.default_rng(0).integers(0, 257, (4, 64), dtype=np.int64)


def onnx_ppl(path) -> float:
    """ONNX Runtime perplexity of an exported tiny model on ``eval_windows`` (1 thread)."""
    from runtime.perplexity import perplexity
    from runtime.session import open_session

    return perplexity(open_session(path, ["cpu"], threads=1), eval_windows()).ppl
