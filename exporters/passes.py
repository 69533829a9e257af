"""ONNX post-passes, each a small ``ModelProto -> ModelProto`` function that returns a copy."""

from __future__ import annotations

from collections import Counter

import onnx
from onnx import numpy_helper

from runtime.graph import GraphIndex, attr, set_attr


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def pretranspose_int8_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite ``DequantizeLinear(W[N, K] int8, axis=0) -> Transpose -> MatMul`` into
    ``DequantizeLinear(W^T[K, N] int8, axis=1) -> MatMul``.

    TensorRT's explicit-quantization rules want the weight DQ to feed the MatMul directly; the
    per-output-channel axis moves with the transposition. Patterns whose DQ or Transpose output
    has other consumers are left alone.
    """
    model = _copy(model)
    g = GraphIndex(model)  # indexes the copy: its nodes are the ones edited below
    dead, stale = [], set()
    for mm in g.nodes:
        if mm.op_type != "MatMul":
            continue
        tr_i = g.producer.get(mm.input[1])
        tr = None if tr_i is None else g.nodes[tr_i]
        if tr is None or tr.op_type != "Transpose" or list(attr(tr, "perm", [])) != [1, 0]:
            continue
        dq_i = g.dq_producer(tr.input[0])
        dq = None if dq_i is None else g.nodes[dq_i]
        if dq is None or attr(dq, "axis", 1) != 0:
            continue
        w = g.initializers.get(dq.input[0])
        if w is None or w.data_type != onnx.TensorProto.INT8 or len(w.dims) != 2:
            continue
        if g.uses(dq.output[0]) != 1 or g.uses(tr.output[0]) != 1 or g.uses(w.name) != 1:
            continue
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w).T.copy(), w.name))  # (K, N)
        set_attr(dq, "axis", 1)
        mm.input[1] = dq.output[0]
        dead.append(tr)
        stale.update((w.name, dq.output[0], tr.output[0]))  # shapes recorded before the transposition
    keep = [v for v in model.graph.value_info if v.name not in stale]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
    for n in dead:
        model.graph.node.remove(n)
    return model


def rename_initializers(model: onnx.ModelProto, names: dict[str, str]) -> onnx.ModelProto:
    """Rename initializers (and every node input that reads them) by ``names``: old -> new.
    Every old name must exist and no new name may clash with another tensor."""
    model = _copy(model)
    g = model.graph
    present = {t.name for t in g.initializer}
    missing = sorted(set(names) - present)
    if missing:
        raise ValueError(f"no initializer named {missing[0]!r} to rename")
    taken = present | {o for n in g.node for o in n.output} | {i.name for i in g.input}
    clash = sorted((set(names.values()) & taken) - set(names))
    if clash:
        raise ValueError(f"renaming would reuse the tensor name {clash[0]!r}")
    for t in g.initializer:
        t.name = names.get(t.name, t.name)
    for n in g.node:
        for k, i in enumerate(n.input):
            if i in names:
                n.input[k] = names[i]
    for v in g.value_info:
        v.name = names.get(v.name, v.name)
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


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)

