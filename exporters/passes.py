"""ONNX post-passes, each a small ``ModelProto -> ModelProto`` function that returns a copy."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import onnx
from onnx import helper, numpy_helper

# metadata_props keys written by the exporter and read by ``runtime`` (which imports nothing of
# ours, so it repeats these four strings; tests/test_export.py checks that both sides agree)
META_FORMAT = "sasq.format"
META_VERSION = "sasq.version"
META_PROFILE = "sasq.profile"
META_SESSION_OPTIONS = "sasq.session_options"
FORMAT_TAG = "sasq-edge-onnx-1"


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


def pretranspose_int8_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite ``DequantizeLinear(W[N, K] int8, axis=0) -> Transpose -> MatMul`` into
    ``DequantizeLinear(W^T[K, N] int8, axis=1) -> MatMul``.

    TensorRT's explicit-quantization rules want the weight DQ to feed the MatMul directly; the
    per-output-channel axis moves with the transposition. Patterns whose DQ or Transpose output
    has other consumers are left alone.
    """
    model = _copy(model)
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, int] = defaultdict(int)
    for n in g.node:
        for i in n.input:
            consumers[i] += 1
    for o in g.output:
        consumers[o.name] += 1
    dead, stale = [], set()
    for mm in g.node:
        if mm.op_type != "MatMul":
            continue
        tr = producer.get(mm.input[1])
        if tr is None or tr.op_type != "Transpose" or list(_attr(tr, "perm", [])) != [1, 0]:
            continue
        dq = producer.get(tr.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or _attr(dq, "axis", 1) != 0:
            continue
        w = inits.get(dq.input[0])
        if w is None or w.data_type != onnx.TensorProto.INT8 or len(w.dims) != 2:
            continue
        if consumers[dq.output[0]] != 1 or consumers[tr.output[0]] != 1 or consumers[w.name] != 1:
            continue
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w).T.copy(), w.name))  # (K, N)
        _set_attr(dq, "axis", 1)
        mm.input[1] = dq.output[0]
        dead.append(tr)
        stale.update((w.name, dq.output[0], tr.output[0]))  # shapes recorded before the transposition
    keep = [v for v in g.value_info if v.name not in stale]
    del g.value_info[:]
    g.value_info.extend(keep)
    for n in dead:
        g.node.remove(n)
    return model


def set_metadata(model: onnx.ModelProto, props: dict[str, str]) -> onnx.ModelProto:
    """Set (replace) ``metadata_props`` entries."""
    model = _copy(model)
    keep = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    return model


def deploy_metadata(profile: str, session_options: tuple[tuple[str, str], ...], version: str) -> dict[str, str]:
    return {
        META_FORMAT: FORMAT_TAG,
        META_VERSION: version,
        META_PROFILE: profile,
        META_SESSION_OPTIONS: json.dumps(dict(session_options)),
    }


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)
