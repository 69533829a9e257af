"""Seeded faults: small, realistic mistakes written into a correct export, to prove that
``sasq-validate`` catches each one by computation (tests/test_validate.py,
bench/validate_thresholds.py). Each is a ``ModelProto -> ModelProto`` edit of the ONNX graph
alone; nothing else in the folder is recomputed, so the folder's recorded file digests still
hold and ``open_session`` accepts it. Imports onnx and numpy only.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from runtime.graph import DEQUANTIZE, GraphIndex, attr, set_attr, weight_name
from runtime.metadata import META_GRAPH, META_SESSION_OPTIONS
from runtime.probe import LinearTap, block_of, linear_taps, name_scopes

INT8_ALLOWED = "session.qdqisint8allowed"
DISABLE_QDQ = "session.disable_quant_qdq"


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _new_init(model: onnx.ModelProto, name: str, value: np.ndarray) -> str:
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return name


def middle_layer(model: onnx.ModelProto, leaf: str = "mlp.down_proj") -> str:
    """The quantized linear named ``leaf`` in the middle decoder block."""
    taps = [t for t in linear_taps(model) if t.layer.endswith("." + leaf)]
    if not taps:
        raise ValueError(f"no quantized linear ending in {leaf!r}")
    blocks = sorted({block_of(t.layer) for t in taps})
    mid = blocks[len(blocks) // 2]
    return next(t.layer for t in taps if block_of(t.layer) == mid)


def _tap(model: onnx.ModelProto, layer: str) -> tuple[GraphIndex, LinearTap]:
    tap = next((t for t in linear_taps(model) if t.layer == layer), None)
    if tap is None:
        raise ValueError(f"no quantized linear {layer!r} in the graph")
    return GraphIndex(model), tap


def _act_dq(g: GraphIndex, tap: LinearTap) -> onnx.NodeProto:
    """The activation DequantizeLinear feeding the layer's MatMul."""
    mm = g.nodes[tap.node]
    dq = g.nodes[g.producer[mm.input[0]]]
    if dq.op_type != DEQUANTIZE:
        raise ValueError(f"{tap.layer} has no activation Q/DQ pair")
    return dq


def scale_times(model: onnx.ModelProto, layer: str, factor: float = 1.05) -> onnx.ModelProto:
    """The activation scale of ``layer``'s QuantizeLinear and DequantizeLinear times ``factor``
    (a new initializer, so other layers sharing the constant keep theirs)."""
    model = _copy(model)
    g, tap = _tap(model, layer)
    dq = _act_dq(g, tap)
    q = g.nodes[g.producer[dq.input[0]]]
    scale = g.values(q.input[1])
    name = _new_init(model, f"{layer}.fault_act_scale", (scale * np.float32(factor)).astype(scale.dtype))
    q.input[1] = dq.input[1] = name
    return model


def zero_point_off_by_one(model: onnx.ModelProto, layer: str) -> onnx.ModelProto:
    """The zero point of ``layer``'s activation DequantizeLinear one step up (its QuantizeLinear
    keeps the right one): a Q/DQ pair that disagrees, every value read one step low."""
    model = _copy(model)
    g, tap = _tap(model, layer)
    dq = _act_dq(g, tap)
    zp = g.values(dq.input[2])
    info = np.iinfo(zp.dtype)
    bumped = np.clip(zp.astype(np.int64) + 1, info.min, info.max).astype(zp.dtype)
    dq.input[2] = _new_init(model, f"{layer}.fault_act_zero_point", bumped)
    return model


def _weight_tensor(model: onnx.ModelProto, layer: str) -> tuple[onnx.TensorProto, int]:
    g = GraphIndex(model)
    name = weight_name(layer)
    dq = g.quantized_weights().get(name)
    if dq is None:
        raise ValueError(f"no INT8 weight {name!r}")
    return g.initializers[name], attr(g.nodes[dq], "axis", 1)


def swap_weight_rows(model: onnx.ModelProto, layer: str, rows: tuple[int, int] = (0, 1)) -> onnx.ModelProto:
    """Two output rows of ``layer``'s INT8 weight (as PyTorch holds it, ``(N, K)``) swapped in
    the stored codes; the per-channel scales stay where they were."""
    model = _copy(model)
    init, axis = _weight_tensor(model, layer)
    w = numpy_helper.to_array(init).copy()
    i, j = rows
    if axis == 1:  # stored (K, N): output rows are columns
        w[:, [i, j]] = w[:, [j, i]]
    else:
        w[[i, j]] = w[[j, i]]
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    return model


def transpose_weight(model: onnx.ModelProto, layer: str) -> onnx.ModelProto:
    """``layer``'s square INT8 weight stored transposed."""
    model = _copy(model)
    init, _ = _weight_tensor(model, layer)
    w = numpy_helper.to_array(init)
    if w.shape[0] != w.shape[1]:
        raise ValueError(f"{layer}'s weight is {w.shape}, not square")
    init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w.T), init.name))
    return model


def drop_qdq(model: onnx.ModelProto, layer: str) -> onnx.ModelProto:
    """``layer``'s MatMul reads the float tensor its activation Q/DQ pair quantized (the pair is
    removed when nothing else reads it)."""
    model = _copy(model)
    g, tap = _tap(model, layer)
    dq = _act_dq(g, tap)
    g.nodes[tap.node].input[0] = tap.x
    if g.uses(dq.output[0]) == 1:
        q = g.nodes[g.producer[dq.input[0]]]
        model.graph.node.remove(dq)
        if g.uses(q.output[0]) == 1:
            model.graph.node.remove(q)
    return model


def rms_epsilon_times(model: onnx.ModelProto, block: int, factor: float = 10.0) -> onnx.ModelProto:
    """The epsilon of block ``block``'s first RMSNorm times ``factor``: in the fused graph the
    ``epsilon`` attribute of its SkipSimplifiedLayerNormalization (block 0: the Add of its
    standard-op norm), in the traced graph the Add of epsilon inside ``input_layernorm``."""
    model = _copy(model)
    g = GraphIndex(model)
    fused = {p.key: p.value for p in model.metadata_props}.get(META_GRAPH) == "fused"
    if fused and block > 0:
        name = f"/model/layers.{block}/input_layernorm/SkipSimplifiedLayerNormalization"
        node = next(n for n in g.nodes if n.name == name)
        set_attr(node, "epsilon", float(attr(node, "epsilon")) * factor)
        return model
    def in_norm(i: int) -> bool:
        n = g.nodes[i]
        if fused:
            return n.name == f"/model/layers.{block}/input_layernorm/Add"
        scopes = name_scopes(n) or []
        return any(s.endswith(f"layers.{block}.input_layernorm") for s in scopes)

    for i, n in enumerate(g.nodes):
        if n.op_type == "Add" and in_norm(i):
            k = next((k for k, x in enumerate(n.input) if g.is_const(x)), None)
            if k is None:
                continue
            eps = g.values(n.input[k])
            n.input[k] = _new_init(model, f"layers.{block}.input_layernorm.fault_eps", (eps * factor).astype(eps.dtype))
            return model
    raise ValueError(f"no epsilon Add found in block {block}'s input_layernorm")


def drop_session_option(model: onnx.ModelProto, key: str = INT8_ALLOWED) -> onnx.ModelProto:
    """The deploy profile's session options in the metadata without ``key`` (a trt export whose
    int8 activations then do not run as integer kernels on ORT CPU)."""
    model = _copy(model)
    for p in model.metadata_props:
        if p.key == META_SESSION_OPTIONS:
            options = json.loads(p.value)
            if key not in options:
                raise ValueError(f"the metadata's session options hold no {key!r}")
            del options[key]
            p.value = json.dumps(options)
            return model
    raise ValueError("the model records no session options")


def set_session_option(model: onnx.ModelProto, key: str = DISABLE_QDQ, value: str = "1") -> onnx.ModelProto:
    """The metadata's session options with ``key`` set to ``value`` (by default the option that
    stops ONNX Runtime from fusing Q/DQ into integer kernels: every quantized linear then runs as
    a float MatMul on dequantized values)."""
    model = _copy(model)
    for p in model.metadata_props:
        if p.key == META_SESSION_OPTIONS:
            p.value = json.dumps({**json.loads(p.value), key: value})
            return model
    model.metadata_props.add(key=META_SESSION_OPTIONS, value=json.dumps({key: value}))
    return model


def seeded_faults(model: onnx.ModelProto) -> dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]]:
    """Every seeded fault that applies to ``model``, by name, each on a middle decoder block."""
    layers = sorted({block_of(t.layer) for t in linear_taps(model)} - {None})
    mid = layers[len(layers) // 2]
    down, q = middle_layer(model, "mlp.down_proj"), middle_layer(model, "self_attn.q_proj")
    options = json.loads({p.key: p.value for p in model.metadata_props}.get(META_SESSION_OPTIONS, "{}"))
    faults = {
        "activation scale x1.05": lambda m: scale_times(m, down, 1.05),
        "zero point off by one": lambda m: zero_point_off_by_one(m, down),
        "two weight rows swapped": lambda m: swap_weight_rows(m, q),
        "Q/DQ pair dropped": lambda m: drop_qdq(m, down),
        "RMSNorm epsilon x1000": lambda m: rms_epsilon_times(m, mid, 1000.0),
        "square weight transposed": lambda m: transpose_weight(m, q),
    }
    if INT8_ALLOWED in options:
        faults["session option qdqisint8allowed lost"] = drop_session_option
    faults["session options disable Q/DQ fusion"] = set_session_option
    return faults


def write_faulty(folder: str | os.PathLike, out: str | os.PathLike, fault: Callable[[onnx.ModelProto], onnx.ModelProto],
                 name: str = "model.onnx") -> Path:
    """A copy of the export folder ``folder`` in ``out`` whose ``name`` carries ``fault``."""
    out = Path(out)
    shutil.copytree(folder, out)
    model = onnx.load(str(out / name))
    onnx.save(fault(model), str(out / name))
    return out / name


# --- broken checkpoints (tests/test_hostile.py, bench/reliability.py) ---------------------------

CHECKPOINT_FAULTS = ("missing", "extra", "misshapen", "nan")


def break_checkpoint(folder: str | os.PathLike, out: str | os.PathLike, kind: str,
                     name: str = "model.layers.1.mlp.down_proj.weight") -> Path:
    """A copy of the safetensors checkpoint ``folder`` at ``out`` with one fault: ``missing`` drops
    ``name``, ``extra`` adds a tensor for a layer no config has, ``misshapen`` gives ``name``
    100 input columns, ``nan`` puts one NaN in it."""
    from safetensors.numpy import load_file, save_file

    out = Path(out)
    shutil.copytree(folder, out)
    tensors = load_file(str(out / "model.safetensors"))
    if kind == "missing":
        del tensors[name]
    elif kind == "extra":
        tensors["model.layers.7.mlp.up_proj.weight"] = np.zeros((4, 4), np.float32)
    elif kind == "misshapen":
        tensors[name] = np.zeros((tensors[name].shape[0], 100), tensors[name].dtype)
    elif kind == "nan":
        tensors[name] = tensors[name].copy()
        tensors[name][3, 4] = np.nan
    else:
        raise ValueError(f"unknown checkpoint fault {kind!r}: one of {', '.join(CHECKPOINT_FAULTS)}")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
