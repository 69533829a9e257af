"""Reading ONNX graphs, and the tensor names the exporter writes and every reader uses.

``GraphIndex`` builds the look-up tables once (producers, consumers, constants, known types and
shapes) and answers the questions the passes, the TensorRT lint and the fusion check all ask:
which integer weight feeds which MatMul, what a QuantizeLinear stores, where a tensor comes from.
The name helpers are the one place the names of quantized weights and KV-cache tensors are made.
Imports onnx and numpy only.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

QUANTIZE, DEQUANTIZE = "QuantizeLinear", "DequantizeLinear"
MATMULS = frozenset({"MatMul", "Gemm"})
# data-movement ops that may sit between a DequantizeLinear and the MatMul it feeds
SHAPE_OPS = frozenset({"Transpose", "Reshape", "Cast", "CastLike", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Expand"})
INT_TYPES = (TensorProto.INT8, TensorProto.UINT8)

# --- names ---------------------------------------------------------------------------------------

WEIGHT_SUFFIX = ".weight_int"
WEIGHT_SCALE_SUFFIX = ".weight_scale"
PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."


def weight_name(layer: str) -> str:
    """The INT8 weight initializer of the quantized linear layer ``layer`` (its PyTorch module name)."""
    return layer + WEIGHT_SUFFIX


def weight_scale_name(layer: str) -> str:
    return layer + WEIGHT_SCALE_SUFFIX


def layer_of(initializer: str) -> str:
    """The layer an INT8 weight initializer belongs to (the inverse of ``weight_name``)."""
    return initializer.removesuffix(WEIGHT_SUFFIX)


# Node names of the fused CPU graph (exporters.fused) that sasq-validate's probe (runtime.probe)
# finds the decoder blocks by: the one contract between the writer and the reader.
FUSED_INPUT_NORM, FUSED_FINAL_NORM = "input_layernorm", "norm"
FUSED_SKIP_NORM, FUSED_FIRST_OP = "SkipSimplifiedLayerNormalization", "Pow"  # a Skip norm's output 3: residual + input


def fused_scope(layer: int | None, part: str) -> str:
    """The node-name prefix of ``part`` of decoder layer ``layer`` (None: the model level) in the
    fused graph, e.g. ``/model/layers.3/input_layernorm``."""
    return f"/model/{part}" if layer is None else f"/model/layers.{layer}/{part}"


def cache_names(layers: int) -> tuple[list[str], list[str]]:
    """KV-cache input and output names (optimum's): ``past_key_values.{i}.key|value`` ->
    ``present.{i}.key|value``, keys before values, layer by layer."""
    past = [f"{PAST_PREFIX}{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"{PRESENT_PREFIX}{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return past, present


# --- attributes and constants ----------------------------------------------------------------------


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


def constant_tensor(node: onnx.NodeProto) -> TensorProto | None:
    """The value of a ``Constant`` node as a TensorProto (None for sparse or string constants)."""
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        if a.name == "value":
            return v
        if a.name in ("value_float", "value_floats"):
            return numpy_helper.from_array(np.asarray(v, dtype=np.float32), node.output[0])
        if a.name in ("value_int", "value_ints"):
            return numpy_helper.from_array(np.asarray(v, dtype=np.int64), node.output[0])
    return None


class GraphIndex:
    """Look-up tables over the main graph of ``model`` (subgraphs are not indexed)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.model = model
        self.nodes = list(g.node)
        self.names = [n.name or f"{n.op_type}#{i}" for i, n in enumerate(self.nodes)]
        self.producer: dict[str, int] = {o: i for i, n in enumerate(self.nodes) for o in n.output if o}
        self.consumers: dict[str, list[tuple[int, int]]] = defaultdict(list)  # tensor -> [(node index, input position)]
        for i, n in enumerate(self.nodes):
            for pos, name in enumerate(n.input):
                if name:
                    self.consumers[name].append((i, pos))
        self.outputs = {o.name for o in g.output}
        self.inputs = {i.name for i in g.input}
        self.initializers: dict[str, TensorProto] = {t.name: t for t in g.initializer}
        self.consts: dict[str, TensorProto] = dict(self.initializers)
        for n in self.nodes:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                t = constant_tensor(n)
                if t is not None:
                    self.consts[n.output[0]] = t
        self.infos = {v.name: v for v in (*g.input, *g.value_info, *g.output)}

    # --- tensors ---------------------------------------------------------------------------

    def uses(self, name: str) -> int:
        """How many node inputs and graph outputs read ``name``."""
        return len(self.consumers.get(name, ())) + (name in self.outputs)

    def is_const(self, name: str) -> bool:
        return name in self.consts

    def values(self, name: str) -> np.ndarray | None:
        """A constant's values; None when not a constant or stored as external data."""
        t = self.consts.get(name)
        if t is None or t.data_location == TensorProto.EXTERNAL:
            return None
        return numpy_helper.to_array(t)

    def shape(self, name: str) -> tuple[int | None, ...] | None:
        if name in self.consts:
            return tuple(self.consts[name].dims)
        info = self.infos.get(name)
        if info is None or not info.type.tensor_type.HasField("shape"):
            return None
        return tuple(d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim)

    def elem_type(self, name: str) -> int | None:
        if name in self.consts:
            return self.consts[name].data_type
        info = self.infos.get(name)
        if info is not None and info.type.tensor_type.elem_type:
            return info.type.tensor_type.elem_type
        i = self.producer.get(name)
        if i is not None and self.nodes[i].op_type == QUANTIZE:
            return self.q_type(self.nodes[i])
        return None

    def describe(self, name: str) -> str:
        """Where a tensor comes from, for messages."""
        if name in self.producer:
            i = self.producer[name]
            return f"from {self.nodes[i].op_type} '{self.names[i]}'"
        if name in self.consts:
            return "an initializer" if name not in self.inputs else "an initializer that is also a graph input"
        if name in self.inputs:
            return "a graph input"
        return "undefined"

    def producer_op(self, name: str) -> str | None:
        i = self.producer.get(name)
        return None if i is None else self.nodes[i].op_type

    # --- Q/DQ ------------------------------------------------------------------------------

    def qdq(self) -> Iterator[tuple[int, onnx.NodeProto]]:
        for i, n in enumerate(self.nodes):
            if n.op_type in (QUANTIZE, DEQUANTIZE):
                yield i, n

    @staticmethod
    def zero_point(node: onnx.NodeProto) -> str | None:
        return node.input[2] if len(node.input) > 2 and node.input[2] else None

    def q_type(self, node: onnx.NodeProto) -> int | None:
        """The integer type a QuantizeLinear produces: its zero point's, else ``output_dtype``,
        else uint8 (the ONNX default)."""
        zp = self.zero_point(node)
        if zp is not None:
            return self.elem_type(zp)
        return attr(node, "output_dtype", 0) or TensorProto.UINT8

    def dq_type(self, node: onnx.NodeProto) -> int | None:
        zp = self.zero_point(node)
        return self.elem_type(zp) if zp is not None else self.elem_type(node.input[0])

    def quantized_source(self, node: onnx.NodeProto) -> str:
        """The real-valued tensor a Q/DQ quantizes: a DQ after a Q looks through to the Q's input."""
        x = node.input[0]
        if node.op_type == DEQUANTIZE and self.producer_op(x) == QUANTIZE:
            return self.nodes[self.producer[x]].input[0]
        return x

    def is_weight(self, node: onnx.NodeProto) -> bool:
        return self.is_const(self.quantized_source(node))

    def dq_producer(self, name: str) -> int | None:
        i = self.producer.get(name)
        return i if i is not None and self.nodes[i].op_type == DEQUANTIZE else None

    # --- MatMul inputs ---------------------------------------------------------------------

    def matmul_inputs(self, node: onnx.NodeProto) -> list[tuple[str, int | None, int | None]]:
        """For inputs A and B: ``(kind, dq index, shape-op index)`` with kind ``dq`` (straight from
        a DequantizeLinear), ``hop`` (DequantizeLinear -> one shape op -> here) or ``float``."""
        out = []
        for name in node.input[:2]:
            dq = self.dq_producer(name)
            if dq is not None:
                out.append(("dq", dq, None))
                continue
            p = self.producer.get(name)
            if p is not None and self.nodes[p].op_type in SHAPE_OPS:
                dq = self.dq_producer(self.nodes[p].input[0])
                if dq is not None:
                    out.append(("hop", dq, p))
                    continue
            out.append(("float", None, None))
        return out

    def is_quantized_matmul(self, node: onnx.NodeProto) -> bool:
        return node.op_type in MATMULS and any(kind != "float" for kind, _, _ in self.matmul_inputs(node))

    def quantized_weights(self) -> dict[str, int]:
        """Integer weight initializer -> index of the DequantizeLinear that reads it, for every
        ``DequantizeLinear(int weight) -> MatMul/Gemm`` (every quantized linear layer)."""
        out = {}
        for i, n in self.qdq():
            if n.op_type != DEQUANTIZE:
                continue
            w = self.initializers.get(n.input[0])
            if w is None or w.data_type not in INT_TYPES:
                continue
            if any(self.nodes[c].op_type in MATMULS for c, _ in self.consumers[n.output[0]]):
                out[n.input[0]] = i
        return out
