"""Intermediate tensors of an exported graph, for the layer-level parity checks. Imports onnx,
onnxruntime and numpy only.

Two kinds of taps, each a tensor name of the exported graph:

- ``linear_taps``: for every quantized linear layer (an INT8 weight initializer feeding
  ``DequantizeLinear -> MatMul``, ``runtime.graph.GraphIndex.quantized_weights``), the float
  tensor the activation ``QuantizeLinear`` reads and the ``MatMul``'s output, so the integer
  arithmetic of the layer can be replayed (``runtime.replay``);
- ``block_taps``: the residual stream at every decoder-block boundary (entering block ``i``, and
  entering the final norm after the last block), so each block can be recomputed on its own input.

``probe_model`` adds taps as graph outputs of an in-memory copy; ``ProbeSession`` runs it with
the session options the file's metadata names, as ``open_session`` runs the file itself.
"""

from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from runtime.errors import RuntimeSetupError
from runtime.graph import (
    DEQUANTIZE,
    FUSED_FINAL_NORM,
    FUSED_FIRST_OP,
    FUSED_INPUT_NORM,
    FUSED_SKIP_NORM,
    MATMULS,
    QUANTIZE,
    GraphIndex,
    fused_scope,
    layer_of,
)
from runtime.metadata import META_GRAPH
from runtime.session import LMSession, provider_options, resolve_providers, session_options

_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)")  # a decoder block's index in a module or weight name
NAME_SCOPES = "pkg.torch.onnx.name_scopes"  # node metadata the dynamo exporter writes: the module path


@dataclass(frozen=True)
class LinearTap:
    """One quantized linear layer of the graph: its PyTorch module name (``layer_of`` its INT8
    weight), the float tensor quantized for it (``x``), the ``MatMul`` output (``y``), whether an
    activation ``QuantizeLinear -> DequantizeLinear`` pair feeds the ``MatMul`` (when not, ``x`` is
    the float tensor the ``MatMul`` reads), and the graph's activation scale and zero point."""

    layer: str
    weight: str
    x: str
    y: str
    quantized: bool
    graph_scale: float | None
    graph_zero_point: int | None
    node: int  # index of the MatMul in the graph (topological order)


def block_of(name: str) -> int | None:
    """The decoder block index in a module name (``model.layers.3.mlp.up_proj`` -> 3)."""
    m = _BLOCK.search(name)
    return None if m is None else int(m.group(1))


def _scalar(g: GraphIndex, name: str | None) -> float | int | None:
    if not name:
        return None
    v = g.values(name)
    return None if v is None or v.size != 1 else v.reshape(()).item()


def linear_taps(model: onnx.ModelProto) -> list[LinearTap]:
    """Every quantized linear layer of ``model``, in graph order."""
    g = GraphIndex(model)
    taps = []
    for weight, dq in g.quantized_weights().items():
        for mm, _pos in g.consumers[g.nodes[dq].output[0]]:
            node = g.nodes[mm]
            if node.op_type not in MATMULS:
                continue
            a = node.input[0]
            q_scale = q_zp = None
            x, quantized = a, False
            p = g.producer.get(a)
            if p is not None and g.nodes[p].op_type == DEQUANTIZE:
                src = g.producer.get(g.nodes[p].input[0])
                if src is not None and g.nodes[src].op_type == QUANTIZE:
                    q = g.nodes[src]
                    x, quantized = q.input[0], True
                    q_scale, q_zp = _scalar(g, q.input[1]), _scalar(g, g.zero_point(q))
            taps.append(LinearTap(layer_of(weight), weight, x, node.output[0], quantized, q_scale, q_zp, mm))
    return sorted(taps, key=lambda t: t.node)


@dataclass(frozen=True)
class BlockTaps:
    """The residual stream at the block boundaries: ``inputs[i]`` enters decoder block ``i``,
    ``inputs[layers]`` leaves the last block (the final norm's input). ``inputs`` is empty when
    the graph could not be mapped; ``reason`` says why."""

    inputs: tuple[str, ...]
    how: str  # how the boundaries were found
    reason: str | None = None
    required: bool = False  # the graph's writer guarantees the boundaries (the fused graph): unmapped is a failure

    @property
    def mapped(self) -> bool:
        return bool(self.inputs)


def _fused_blocks(g: GraphIndex, layers: int) -> BlockTaps:
    """The fused graph (``exporters.fused``): block ``i >= 1`` is entered by output 3
    (``input_skip_bias_sum``) of its ``input_layernorm`` SkipSimplifiedLayerNormalization, block 0
    by the embedding output its RMSNorm reads, and the final norm's output 3 leaves the last one."""
    by_name = {n: i for i, n in enumerate(g.names)}
    out = []
    for i in range(layers):
        if i == 0:
            k = by_name.get(f"{fused_scope(0, FUSED_INPUT_NORM)}/{FUSED_FIRST_OP}")
            out.append(None if k is None else g.nodes[k].input[0])
        else:
            k = by_name.get(f"{fused_scope(i, FUSED_INPUT_NORM)}/{FUSED_SKIP_NORM}")
            out.append(None if k is None or len(g.nodes[k].output) < 4 else g.nodes[k].output[3])
    k = by_name.get(f"{fused_scope(None, FUSED_FINAL_NORM)}/{FUSED_SKIP_NORM}")
    out.append(None if k is None or len(g.nodes[k].output) < 4 else g.nodes[k].output[3])
    if None in out:
        missing = out.index(None)
        return BlockTaps((), "fused node names", f"no residual-stream tensor found for block {missing} in the fused graph "
                                                 "(runtime.graph.fused_scope names it)", required=True)
    return BlockTaps(tuple(out), "fused node names", required=True)


def name_scopes(node: onnx.NodeProto) -> list[str] | None:
    """The module path the dynamo exporter recorded for ``node`` (None when it recorded none)."""
    for p in node.metadata_props:
        if p.key == NAME_SCOPES:
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                return None
            return [str(s) for s in scopes] if isinstance(scopes, list) else None
    return None


def _norm_input(g: GraphIndex, members: list[int]) -> str | None:
    """The one non-constant tensor a norm module's nodes read from outside the module."""
    inside = {o for i in members for o in g.nodes[i].output}
    outside = {x for i in members for x in g.nodes[i].input if x and x not in inside and not g.is_const(x)}
    return next(iter(outside)) if len(outside) == 1 else None


def _traced_blocks(g: GraphIndex, layers: int) -> BlockTaps:
    """The dynamo trace: each node records its module path (``pkg.torch.onnx.name_scopes``).
    Block ``i`` is entered by what its first norm (``...layers.{i}.input_layernorm``) reads from
    outside the norm; the last block is left by what the final norm (``...model.norm``) reads."""
    how = "dynamo module scopes"
    norms: dict[str, list[int]] = {}
    for i, n in enumerate(g.nodes):
        scopes = name_scopes(n)
        if not scopes:
            continue
        for s in scopes:
            if s.endswith(".input_layernorm") or re.search(r"(?:^|\.)model\.norm$", s):
                norms.setdefault(s, []).append(i)
    if not norms:
        return BlockTaps((), how, "the graph's nodes carry no module scopes (pkg.torch.onnx.name_scopes) naming "
                                  "input_layernorm and the final norm")
    entering: dict[int, str | None] = {}
    final: str | None = None
    for scope, members in norms.items():
        tensor = _norm_input(g, members)
        if scope.endswith(".input_layernorm"):
            b = block_of(scope)
            if b is not None:
                entering[b] = tensor
        else:
            final = tensor
    missing = [i for i in range(layers) if entering.get(i) is None]
    if missing or final is None:
        where = f"block {missing[0]}" if missing else "the final norm"
        return BlockTaps((), how, f"cannot find the residual stream entering {where} from the module scopes")
    return BlockTaps(tuple(entering[i] for i in range(layers)) + (final,), how)


def block_taps(model: onnx.ModelProto, layers: int) -> BlockTaps:
    """The block boundaries of a sasq-export graph with ``layers`` decoder blocks."""
    g = GraphIndex(model)
    kind = {p.key: p.value for p in model.metadata_props}.get(META_GRAPH, "traced")
    return _fused_blocks(g, layers) if kind == "fused" else _traced_blocks(g, layers)


def probe_model(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also returns ``tensors`` (float32) as graph outputs."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    produced = {o for n in out.graph.node for o in n.output} | {i.name for i in out.graph.input}
    for name in tensors:
        if name in have:
            continue
        if name not in produced:
            raise RuntimeSetupError(f"the graph has no tensor {name!r} to return")
        out.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
        have.add(name)
    return out


class ProbeSession:
    """An ONNX Runtime session over ``probe_model(model, tensors)``, opened with the session
    options of ``path``'s metadata (the deployed profile's), on the given providers."""

    def __init__(self, path: str | os.PathLike, model: onnx.ModelProto, tensors: list[str],
                 providers: list[str] | tuple[str, ...] = ("cpu",), threads: int | None = None) -> None:
        path = Path(path)
        meta = {p.key: p.value for p in model.metadata_props}
        self.tensors = list(dict.fromkeys(tensors))
        probe = probe_model(model, self.tensors)
        so = session_options(path, threads, meta)
        try:
            blob = probe.SerializeToString()
        except ValueError:
            raise RuntimeSetupError(f"{path} is over 2 GB with its probes: the layer checks need a model that fits "
                                    "one protobuf (run sasq-validate with --layer-windows 0)") from None
        try:
            sess = ort.InferenceSession(blob, sess_options=so,
                                        providers=provider_options(resolve_providers(list(providers)), path, quantized=True))
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            raise RuntimeSetupError(f"ONNX Runtime cannot load {path} with probes: {str(e).strip().splitlines()[0][:300]}") from None
        self.lm = LMSession(sess, path, sess.get_providers(), meta, None)
        from runtime.session import _cache_spec

        self.lm.cache = _cache_spec(sess, path)

    def run(self, ids: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One window ``(T,)`` of token ids -> its logits ``(T, V)`` and every probed tensor
        (batch axis dropped)."""
        lm = self.lm
        row = np.ascontiguousarray(ids, dtype=np.int64)[None]
        feed = {"input_ids": row, "attention_mask": np.ones_like(row)}
        if lm.cache is not None:
            feed.update(lm.cache.empty(1))
            if lm.takes_positions:
                feed["position_ids"] = np.arange(row.shape[1], dtype=np.int64)[None]
        outs = lm.session.run(["logits", *self.tensors], feed)
        return outs[0][0], {n: v[0] if v.ndim >= 3 else v for n, v in zip(self.tensors, outs[1:], strict=True)}
