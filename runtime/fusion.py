"""Which linear layers ONNX Runtime actually runs as integer kernels.

A QDQ graph is only a promise: ONNX Runtime's optimizer decides, per ``MatMul``, whether the
``DequantizeLinear -> MatMul`` pattern becomes an integer kernel (``MatMulIntegerToFloat``,
``QLinearMatMul``, ``MatMulInteger``) or stays a float ``MatMul`` after dequantizing the weight
(correct, and slow). This module opens the model the way ``open_session`` does, has ORT write its
optimized graph, and reports for every quantized weight which kernel consumes it.

A "target layer" is an integer weight initializer that feeds ``DequantizeLinear`` whose output
feeds a ``MatMul`` or ``Gemm`` in the exported graph (every quantized linear layer sasq-export
writes); it is named by ``runtime.graph.layer_of``, the inverse of the name the exporter gave it.
"""

from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnxruntime as ort

from runtime.errors import RuntimeSetupError
from runtime.graph import GraphIndex, layer_of
from runtime.session import session_options

INTEGER_KERNELS = ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "DynamicQuantizeMatMul")


@dataclass
class FusionReport:
    path: str
    provider: str
    kernels: dict[str, str]  # target layer -> op type that consumes its integer weight
    op_counts: dict[str, int] = field(default_factory=dict)  # integer kernels in the optimized graph

    @property
    def fused(self) -> list[str]:
        return [n for n, op in self.kernels.items() if op in INTEGER_KERNELS]

    @property
    def unfused(self) -> list[str]:
        return [n for n, op in self.kernels.items() if op not in INTEGER_KERNELS]

    @property
    def passed(self) -> bool:
        return bool(self.kernels) and not self.unfused

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "provider": self.provider,
            "target_layers": len(self.kernels),
            "fused": len(self.fused),
            "unfused": self.unfused,
            "kernels": dict(sorted(self.op_counts.items())),
            "passed": self.passed,
        }

    def summary(self) -> str:
        head = f"{len(self.fused)}/{len(self.kernels)} quantized linear layers run as integer kernels on {self.provider}"
        kinds = ", ".join(f"{k} x{v}" for k, v in sorted(self.op_counts.items()))
        lines = [head + (f" ({kinds})" if kinds else "")]
        lines += [f"  float fallback: {n} (weight consumed by {self.kernels[n]})" for n in self.unfused]
        return "\n".join(lines)


def target_weights(model: onnx.ModelProto) -> dict[str, str]:
    """Integer weight initializer -> layer name, for every DQ(weight) -> MatMul/Gemm in ``model``."""
    return {w: layer_of(w) for w in GraphIndex(model).quantized_weights()}


def check_fusion(path: str | os.PathLike, provider: str = "cpu", threads: int | None = 1) -> FusionReport:
    """Open ``path`` on ``provider`` with the session options from its metadata, let ORT
    optimize it, and report which kernel consumes each quantized weight."""
    path = Path(path)
    if provider != "cpu":
        raise RuntimeSetupError(f"the fusion check reads ONNX Runtime's CPU graph; provider {provider!r} compiles its own kernels: use cpu")
    source = onnx.load(str(path), load_external_data=False)  # read once: targets and metadata
    targets = target_weights(source)
    if not targets:
        raise RuntimeSetupError(f"{path} has no quantized linear layers (DequantizeLinear(int8 weight) -> MatMul): nothing to check")
    with tempfile.TemporaryDirectory(prefix="sasq-fusion-") as tmp:
        so = session_options(path, threads, {p.key: p.value for p in source.metadata_props})
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        # large models: keep the optimized weights out of the protobuf (2 GB limit); we read nodes only
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            raise RuntimeSetupError(f"ONNX Runtime cannot load {path}: {str(e).strip().splitlines()[0][:300]}") from None
        optimized = onnx.load(so.optimized_model_filepath, load_external_data=False)
    consumer_op: dict[str, str] = {}
    counts: dict[str, int] = defaultdict(int)
    for n in optimized.graph.node:
        if n.op_type in INTEGER_KERNELS:
            counts[n.op_type] += 1
        for i in n.input:
            if i in targets:
                # an integer kernel wins over any other consumer of the same weight
                if consumer_op.get(i) not in INTEGER_KERNELS:
                    consumer_op[i] = n.op_type
    kernels = {layer: consumer_op.get(w, "(removed)") for w, layer in targets.items()}
    return FusionReport(str(path), "CPUExecutionProvider", kernels, dict(counts))
