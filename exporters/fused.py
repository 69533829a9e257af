"""A fused decoder graph for the CPU profiles, written directly with ONNX Runtime's contrib ops.

The traced export is a faithful but plain graph (about 2,900 nodes for a 30-layer model; the KV
cache grown by ``Concat``, the rotary tables recomputed every call). This module writes the same
model the way ONNX Runtime's fastest CPU path wants it, per decoder layer:

    SkipSimplifiedLayerNormalization (residual add + RMSNorm in one kernel)
    -> Q/DQ -> q, k, v MatMuls on INT8 weights (each fused to MatMulIntegerToFloat)
    -> GroupQueryAttention (rotary from cached cos/sin tables, causal / sliding-window mask,
       per-head q/k RMSNorm where the family has it, the KV cache appended in place)
    -> Q/DQ -> o_proj -> SkipSimplifiedLayerNormalization -> Q/DQ -> gate, up
    -> SiLU(gate) * up -> Q/DQ -> down_proj

Every quantized linear keeps the static Q/DQ of the traced export: the same constant activation
scale (straight from the ``ScaleState``), the same INT8 weight codes
(``runtime.grids.encode_weight``), ``DequantizeLinear(axis=1)`` feeding the ``MatMul``; only the
float operations around them are fused. Inputs and outputs keep optimum's names
(``input_ids``, ``attention_mask``, ``past_key_values.{i}.key|value`` -> ``logits``,
``present.{i}.key|value``); the rotary positions come from the attention mask, so there is no
``position_ids`` input (as in ONNX Runtime GenAI's graphs, which this one is loadable by).

Contrib ops run on ONNX Runtime (CPU, CUDA), not TensorRT: the ``trt`` profile keeps the traced
graph. A config whose rotary embedding changes with the sequence length exports traced
(``runtime.families.fused_refusal``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from runtime.families import ARCHITECTURES, activation, embedding_scale, fused_refusal, layer_plan, softcaps
from runtime.graph import FUSED_FINAL_NORM, FUSED_INPUT_NORM, FUSED_SKIP_NORM, cache_names, fused_scope, weight_name, weight_scale_name
from runtime.grids import EMBEDDING_GRID, encode_weight
from runtime.layout import AttentionLayout
from runtime.rotation import hadamard
from runtime.state import ScaleState, weights_digest

OPSET = 21
MS = "com.microsoft"
FUSED_FAMILIES = tuple(ARCHITECTURES)  # every registered family (a config may still refuse: fused_refusal)


def supports(model: nn.Module) -> bool:
    return fused_refusal(model.config) is None


class ExternalData:
    """Initializer bytes appended to one file as they are made (``model.onnx.data``), so a model of
    any size is written with one tensor in memory at a time; the graph keeps only references."""

    ALIGN = 4096  # offsets on page boundaries, so ONNX Runtime can map the file

    def __init__(self, path: str | os.PathLike, location: str, min_bytes: int = 1024) -> None:
        self.path, self.location, self.min_bytes = Path(path), location, min_bytes
        self._file = open(self.path, "wb")  # noqa: SIM115  closed by close()
        self.bytes = 0

    def tensor(self, name: str, array: np.ndarray) -> TensorProto | None:
        """An external TensorProto for ``array``, or None when it is small enough to stay inline."""
        if array.nbytes < self.min_bytes:
            return None
        offset = -self._file.tell() % self.ALIGN + self._file.tell()
        self._file.seek(offset)
        self._file.write(np.ascontiguousarray(array).tobytes())
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=list(array.shape))
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(array.nbytes))):
            t.external_data.add(key=key, value=value)
        self.bytes += array.nbytes
        return t

    def close(self) -> None:
        self._file.close()


class _Graph:
    """Nodes, initializers and names for one graph."""

    def __init__(self, external: ExternalData | None = None) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.external = external
        self._names: set[str] = set()
        self._scalars: dict[tuple, str] = {}

    def init(self, name: str, array: np.ndarray) -> str:
        assert name not in self._names, name
        self._names.add(name)
        array = np.asarray(array)
        array = array if array.flags.c_contiguous else array.copy(order="C")
        t = self.external.tensor(name, array) if self.external is not None else None
        self.inits.append(t if t is not None else numpy_helper.from_array(array, name))
        return name

    def shared(self, name: str, array: np.ndarray) -> str:
        """A constant every layer reads under one ``name`` (made on first use)."""
        return name if name in self._names else self.init(name, array)

    def scalar(self, value, dtype) -> str:
        """A shared scalar constant (scales, zero points, small shapes)."""
        key = (np.dtype(dtype).str, np.asarray(value, dtype=dtype).tobytes())
        if key not in self._scalars:
            self._scalars[key] = self.init(f"const_{len(self._scalars)}", np.asarray(value, dtype=dtype))
        return self._scalars[key]

    def op(self, op_type: str, inputs: list[str], name: str, outputs: int | list[str] = 1, domain: str = "", **attrs) -> list[str]:
        outs = [f"{name}/output_{k}" for k in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain, **attrs))
        return outs

    def rename(self, old: str, new: str) -> None:
        """Rename a node output (to make it a graph output); nothing may read it yet by its old name."""
        for n in self.nodes:
            assert old not in n.input, old
            for k, o in enumerate(n.output):
                if o == old:
                    n.output[k] = new

    def one(self, op_type: str, inputs: list[str], name: str, domain: str = "", **attrs) -> str:
        return self.op(op_type, inputs, name, 1, domain, **attrs)[0]


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float32).numpy()


class ModelSource:
    """Where the builder reads weights: the modules of a model in memory. A source that loads a
    checkpoint one decoder layer at a time (``sasq_edge.layerwise``) has the same methods, so
    the builder never needs the whole model at once."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.config = model, model.config

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def embedding(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def head(self) -> tuple[str, nn.Module]:
        head = self.model.get_output_embeddings()
        return next(n for n, m in self.model.named_modules() if m is head), head

    def tied(self) -> bool:
        """Whether the output head reads the embedding table itself."""
        return self.model.get_output_embeddings().weight is self.model.get_input_embeddings().weight

    def rotary(self) -> nn.Module:
        return self.model.model.rotary_emb

    def release(self, prefix: str) -> None:
        """The builder is done with the modules under ``prefix``; a streaming source frees them."""


class FusedBuilder:
    """Writes the fused graph of the model ``source`` reads, quantized as ``state`` says (see the
    module docstring). ``external``: stream initializers to a data file as they are made."""

    def __init__(self, source: ModelSource, state: ScaleState, max_positions: int | None = None,
                 external: ExternalData | None = None) -> None:
        why = fused_refusal(source.config)
        if why is not None:
            raise ValueError(f"no fused graph for this {source.config.model_type!r} model: {why}")
        self.src, self.state, self.cfg = source, state, source.config
        self.spec = ARCHITECTURES[source.config.model_type]
        self.deploy = state.deploy
        self.lay = AttentionLayout.of(self.cfg)
        self.max_positions = max_positions or self.cfg.max_position_embeddings
        self.g = _Graph(external)
        self.digest_items: list[tuple[str, np.ndarray, np.ndarray]] = []
        self._act: dict[tuple[str, float], str] = {}
        self._rotated: dict[tuple[str, int], str] = {}

    # --- quantized pieces ------------------------------------------------------------------

    def _qdq(self, x: str, scale: float, name: str) -> str:
        """``DequantizeLinear(QuantizeLinear(x))`` on the profile's activation grid; one pair per
        (tensor, scale), so linears reading one tensor with one scale share it."""
        key = (x, scale)
        if key not in self._act:
            g, grid = self.g, self.deploy.act
            s = g.scalar(np.float32(scale), np.float32)
            zp = g.scalar(grid.zero_point, np.dtype(grid.dtype))
            q = g.one("QuantizeLinear", [x, s, zp], f"{name}/QuantizeLinear")
            self._act[key] = g.one("DequantizeLinear", [q, s, zp], f"{name}/DequantizeLinear")
        return self._act[key]

    def linear(self, x: str, module_name: str, name: str) -> str:
        """``x @ W^T (+ b)``: Q/DQ on ``x`` and an INT8 weight when the state quantizes
        ``module_name``, else a float MatMul."""
        g = self.g
        module = self.src.module(module_name)
        bias = getattr(module, "bias", None)
        if module_name in self.state.scales:
            rotation = self.state.rotation.get(module_name, 1)
            codes, scale = encode_weight(_f32(module.weight), self.deploy.weight, rotation)  # (N, K), (N,); W R if rotated
            if rotation > 1:  # the input rotated online in Hadamard blocks
                x = self._rotate(x, codes.shape[1], rotation, name)
            self.digest_items.append((module_name, codes, scale))
            w = g.init(weight_name(module_name), codes.T.copy())  # (K, N)
            ws = g.init(weight_scale_name(module_name), scale)
            zeros = g.init(f"{module_name}.weight_zero_point", np.zeros(scale.shape, np.int8))
            w_dq = g.one("DequantizeLinear", [w, ws, zeros], f"{name}/weight/DequantizeLinear", axis=1)
            trunc = self.state.truncation.get(module_name)
            if trunc is not None:  # soft truncation a * tanh(x / a) before the quantizer
                a = g.scalar(np.float32(trunc), np.float32)
                x = g.one("Mul", [g.one("Tanh", [g.one("Div", [x, a], f"{name}/trunc/Div")], f"{name}/trunc/Tanh"), a],
                          f"{name}/trunc/Mul")
            y = g.one("MatMul", [self._qdq(x, self.state.scales[module_name], name), w_dq], f"{name}/MatMul")
        else:
            w = g.init(f"{module_name}.weight_t", _f32(module.weight).T.copy())
            y = g.one("MatMul", [x, w], f"{name}/MatMul")
        if bias is not None:
            y = g.one("Add", [y, g.init(f"{module_name}.bias", _f32(bias))], f"{name}/Add")
        return y

    def _rotate(self, x: str, features: int, block: int, name: str) -> str:
        """``x`` ``(B, T, K)`` times the block-diagonal Hadamard matrix: ``Reshape`` to
        ``(B, T, K / b, b)``, ``MatMul`` by the constant ``H_b``, ``Reshape`` back; once per
        (tensor, block), so the linears reading one norm output share it."""
        key = (x, block)
        if key not in self._rotated:
            self._rotated[key] = self._rotation_nodes(x, features, block, name)
        return self._rotated[key]

    def _rotation_nodes(self, x: str, features: int, block: int, name: str) -> str:
        g = self.g
        split = g.shared(f"rotation_shape_{features}_{block}", np.array([0, 0, features // block, block], np.int64))
        merged = g.shared(f"rotation_shape_{features}", np.array([0, 0, features], np.int64))
        h = g.shared(f"hadamard_{block}", hadamard(block))
        blocks = g.one("Reshape", [x, split], f"{name}/rotation/Reshape")
        return g.one("Reshape", [g.one("MatMul", [blocks, h], f"{name}/rotation/MatMul"), merged], f"{name}/rotation/Reshape_1")

    # --- the graph ---------------------------------------------------------------------------

    def _embed(self, ids: str) -> str:
        x = self._embed_rows(ids)
        scale = embedding_scale(self.spec, self.cfg)
        if scale is None:
            return x
        return self.g.one("Mul", [x, self.g.scalar(np.float32(scale), np.float32)], "/model/embed_tokens/Scale")

    def _embed_rows(self, ids: str) -> str:
        g, emb = self.g, self.src.embedding()
        if self.state.embedding != "int8":
            table = g.init("model.embed_tokens.weight", _f32(emb.weight))
            return g.one("Gather", [table, ids], "/model/embed_tokens/Gather")
        codes, scale = encode_weight(_f32(emb.weight), EMBEDDING_GRID)
        table = g.init("model.embed_tokens.weight_int", codes)
        scales = g.init("model.embed_tokens.weight_scale", scale)
        flat = g.one("Reshape", [ids, g.init("embed_flat_shape", np.array([-1], np.int64))], "/model/embed_tokens/Flatten")
        rows = g.one("Gather", [table, flat], "/model/embed_tokens/GatherRows")
        row_scale = g.one("Gather", [scales, flat], "/model/embed_tokens/GatherScales")
        deq = g.one("DequantizeLinear", [rows, row_scale], "/model/embed_tokens/DequantizeLinear", axis=0)
        shape = g.one("Concat", [g.one("Shape", [ids], "/model/embed_tokens/Shape"),
                                 g.init("embed_dim", np.array([emb.weight.shape[1]], np.int64))],
                      "/model/embed_tokens/Concat", axis=0)
        return g.one("Reshape", [deq, shape], "/model/embed_tokens/Reshape")

    def _rotary_caches(self, layer_type: str | None) -> tuple[str, str]:
        """cos/sin tables ``(max_positions, head_dim / 2)`` from the model's own rotary module (for
        ``layer_type`` where the family has one table per layer type), so RoPE scaling (Llama 3,
        ...) and its attention scaling come with them; made once per table."""
        key = f"_{layer_type}" if layer_type else ""
        if f"cos_cache{key}" in self.g._names:
            return f"cos_cache{key}", f"sin_cache{key}"
        rotary = self.src.rotary()
        pos = torch.arange(self.max_positions, dtype=torch.long)[None]
        dummy = torch.zeros(1, dtype=torch.float32)
        with torch.no_grad():  # (1, P, head_dim): the halves repeat
            cos, sin = rotary(dummy, pos, layer_type) if layer_type else rotary(dummy, pos)
        half = cos.shape[-1] // 2
        return (self.g.init(f"cos_cache{key}", _f32(cos[0, :, :half])), self.g.init(f"sin_cache{key}", _f32(sin[0, :, :half])))

    def _norm_weight(self, module_name: str) -> str:
        """An RMSNorm's gamma: ``norm_offset + weight`` (Gemma's ``1 + w``), as the kernel multiplies."""
        w = _f32(self.src.module(module_name).weight)
        return self.g.init(f"{module_name}.weight", w + np.float32(self.spec.norm_offset) if self.spec.norm_offset else w)

    def build(self) -> onnx.ModelProto:
        g, cfg, lay, spec = self.g, self.cfg, self.lay, self.spec
        eps = float(cfg.rms_norm_eps)
        past_names, present_names = cache_names(lay.layers)
        ids, mask = "input_ids", "attention_mask"
        # GroupQueryAttention's lengths: seqlens_k = tokens so far - 1 per row, total = mask width
        seqlens = g.one("Cast", [g.one("Sub", [g.one("ReduceSum", [mask, g.init("axis_1", np.array([1], np.int64))],
                                                   "/model/attn_mask/ReduceSum", keepdims=0),
                                          g.scalar(1, np.int64)], "/model/attn_mask/Sub")],
                        "/model/attn_mask/Cast_seqlens", to=TensorProto.INT32)
        total = g.one("Cast", [g.one("Gather", [g.one("Shape", [mask], "/model/attn_mask/Shape"), g.scalar(1, np.int64)],
                                     "/model/attn_mask/Gather", axis=0)], "/model/attn_mask/Cast_total", to=TensorProto.INT32)
        attn_cap, _ = softcaps(cfg)
        hidden = self._embed(ids)
        residual, pending = hidden, None  # pending: the last sublayer's output, added to the residual
        for i, plan in enumerate(layer_plan(cfg)):
            p = f"{spec.blocks}.{i}"
            n = fused_scope(i, "")[:-1]
            normed, residual = self._add_norm(pending, residual, f"{p}.{spec.input_norm}", fused_scope(i, FUSED_INPUT_NORM), eps)
            q, k, v = self._split(normed, p, spec.qkv, [lay.heads * lay.head_dim, lay.kv_heads * lay.head_dim,
                                                       lay.kv_heads * lay.head_dim], f"{n}/attn")
            attn_module = self.src.module(f"{p}.self_attn")
            if spec.qk_norm:  # per-head RMSNorm on q and k, before rotary
                # (GroupQueryAttention's q/k-norm inputs run on CUDA only, so the norm stands before it)
                q = self._head_norm(q, f"{p}.{spec.qk_norm[0]}", lay.heads, f"{n}/attn/q_norm")
                k = self._head_norm(k, f"{p}.{spec.qk_norm[1]}", lay.kv_heads, f"{n}/attn/k_norm")
            gqa_in = [q, k, v, past_names[2 * i], past_names[2 * i + 1], seqlens, total]
            gqa_in += list(self._rotary_caches(plan.layer_type if spec.rope_per_layer_type else None)) if plan.rope else ["", ""]
            attrs = dict(num_heads=lay.heads, kv_num_heads=lay.kv_heads, do_rotary=int(plan.rope),
                         local_window_size=plan.window, scale=float(self._attn_scale(attn_module)))
            if attn_cap:
                attrs["softcap"] = attn_cap
            attn = g.op("GroupQueryAttention", gqa_in, f"{n}/attn/GroupQueryAttention",
                        [f"{n}/attn/output", present_names[2 * i], present_names[2 * i + 1]], domain=MS, **attrs)[0]
            o = self.linear(attn, f"{p}.{spec.o_proj}", f"{n}/attn/o_proj")
            if spec.attn_out_norm:
                o = self._rms(o, self._norm_weight(f"{p}.{spec.attn_out_norm}"), eps, f"{n}/{spec.attn_out_norm}")
            normed, residual = self._add_norm(o, residual, f"{p}.{spec.mlp_norm}", f"{n}/{spec.mlp_norm}", eps)
            gate, up = self._split(normed, p, spec.gate_up, [int(cfg.intermediate_size)] * 2, f"{n}/mlp")
            pending = self.linear(g.one("Mul", [self._activation(gate, f"{n}/mlp/act"), up], f"{n}/mlp/Mul"),
                                  f"{p}.{spec.down_proj}", f"{n}/mlp/down_proj")
            if spec.mlp_out_norm:
                pending = self._rms(pending, self._norm_weight(f"{p}.{spec.mlp_out_norm}"), eps, f"{n}/{spec.mlp_out_norm}")
            self.src.release(p)
        normed, _ = self._add_norm(pending, residual, spec.final_norm, fused_scope(None, FUSED_FINAL_NORM), eps)
        logits = self._head(normed)
        _, cap = softcaps(cfg)
        if cap:  # c * tanh(logits / c)
            c = g.scalar(np.float32(cap), np.float32)
            logits = g.one("Mul", [g.one("Tanh", [g.one("Div", [logits, c], "/lm_head/softcap/Div")], "/lm_head/softcap/Tanh"), c],
                           "/lm_head/softcap/Mul")
        return self._model(logits, past_names, present_names)

    def _split(self, x: str, block: str, names: tuple[str, ...], sizes: list[int], name: str) -> list[str]:
        """The outputs of the projections ``names`` reading ``x``: one linear each, or one fused
        linear whose output rows ``Split`` into ``sizes`` (Phi-3's qkv_proj, gate_up_proj)."""
        leaf = [nm.rsplit(".", 1)[-1] for nm in names]
        if len(names) == len(sizes):
            return [self.linear(x, f"{block}.{nm}", f"{name}/{lf}") for nm, lf in zip(names, leaf, strict=True)]
        y = self.linear(x, f"{block}.{names[0]}", f"{name}/{leaf[0]}")
        return self.g.op("Split", [y, self.g.init(f"{name}/split_sizes", np.array(sizes, np.int64))], f"{name}/Split",
                         len(sizes), axis=-1)

    def _activation(self, x: str, name: str) -> str:
        kind = activation(self.cfg)
        if kind == "silu":  # x * sigmoid(x)
            return self.g.one("Mul", [x, self.g.one("Sigmoid", [x], f"{name}/Sigmoid")], f"{name}/Mul")
        return self.g.one("Gelu", [x], f"{name}/Gelu", approximate="tanh" if kind == "gelu_tanh" else "none")

    def _rms(self, x: str, gamma: str, eps: float, name: str) -> str:
        """RMSNorm over the last axis in standard ops (onnx.checker knows them; ONNX Runtime fuses
        the pattern into SimplifiedLayerNormalization)."""
        g = self.g
        sq = g.one("Pow", [x, g.scalar(np.float32(2), np.float32)], f"{name}/Pow")
        mean = g.one("ReduceMean", [sq, g.init(f"{name}/axes", np.array([-1], np.int64))], f"{name}/ReduceMean", keepdims=1)
        rms = g.one("Sqrt", [g.one("Add", [mean, g.scalar(np.float32(eps), np.float32)], f"{name}/Add")], f"{name}/Sqrt")
        return g.one("Mul", [g.one("Div", [x, rms], f"{name}/Div"), gamma], f"{name}/Mul")

    def _head_norm(self, x: str, module_name: str, heads: int, name: str) -> str:
        """Per-head RMSNorm of ``(B, S, heads * D)``: reshaped to ``(B, S, heads, D)`` and back."""
        g, d = self.g, self.lay.head_dim
        norm = self.src.module(module_name)
        eps = float(getattr(norm, "variance_epsilon", None) or norm.eps)
        split = g.one("Reshape", [x, g.scalar(np.array([0, 0, heads, d], np.int64), np.int64)], f"{name}/Reshape")
        normed = self._rms(split, self._norm_weight(module_name), eps, name)
        return g.one("Reshape", [normed, g.scalar(np.array([0, 0, heads * d], np.int64), np.int64)], f"{name}/Reshape_back")

    def _attn_scale(self, attn: nn.Module) -> float:
        return float(getattr(attn, "scaling", self.lay.head_dim ** -0.5))

    def _add_norm(self, x: str | None, residual: str, module_name: str, name: str, eps: float) -> tuple[str, str]:
        """RMSNorm of ``residual + x`` (of ``residual`` alone for the first layer): the normed
        tensor and the new residual stream."""
        gamma = self._norm_weight(module_name)
        if x is None:
            return self._rms(residual, gamma, eps, name), residual
        outs = self.g.op(FUSED_SKIP_NORM, [x, residual, gamma], f"{name}/{FUSED_SKIP_NORM}", 4, domain=MS, epsilon=eps)
        return outs[0], outs[3]

    def _head(self, normed: str) -> str:
        g = self.g
        name, head = self.src.head()
        if name in self.state.scales:
            return self.linear(normed, name, "/lm_head")
        # a float head (tied to the embedding in most small models): Gemm with transB reads the
        # (V, H) table as it is, so a tied table is stored once
        w = "model.embed_tokens.weight" if self._tied() else g.init("lm_head.weight", _f32(head.weight))
        flat = g.one("Reshape", [normed, g.init("head_flat_shape", np.array([-1, head.weight.shape[1]], np.int64))],
                     "/lm_head/Flatten")
        y = g.one("Gemm", [flat, w], "/lm_head/Gemm", transB=1)
        shape = g.one("Concat", [g.one("Slice", [g.one("Shape", [normed], "/lm_head/Shape"), g.scalar([0], np.int64),
                                                 g.scalar([2], np.int64)], "/lm_head/Slice"),
                                 g.init("vocab_dim", np.array([head.weight.shape[0]], np.int64))], "/lm_head/Concat", axis=0)
        return g.one("Reshape", [y, shape], "/lm_head/Reshape")

    def _tied(self) -> bool:
        return self.state.embedding != "int8" and self.src.tied()

    def _model(self, logits: str, past_names: list[str], present_names: list[str]) -> onnx.ModelProto:
        lay = self.lay
        kv = ["batch", lay.kv_heads, "past_sequence", lay.head_dim]
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
                  helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"])]
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, kv) for n in past_names]
        self.g.rename(logits, "logits")
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", self.cfg.vocab_size])]
        outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", lay.kv_heads, "total_sequence", lay.head_dim])
                    for n in present_names]
        graph = helper.make_graph(self.g.nodes, "sasq_fused_decoder", inputs, outputs, self.g.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)])
        model.ir_version = 10
        return model

    @property
    def digest(self) -> str:
        return weights_digest(self.digest_items)


def fused_proto(model: nn.Module | ModelSource, state: ScaleState,
                external: ExternalData | None = None) -> tuple[onnx.ModelProto, str]:
    """The fused graph of ``model`` (or of a weight source) quantized by ``state``, and the digest
    of its INT8 weights."""
    source = model if isinstance(model, ModelSource) or not isinstance(model, nn.Module) else ModelSource(model)
    b = FusedBuilder(source, state, external=external)
    proto = b.build()
    missing = sorted(set(state.scales) - {name for name, _, _ in b.digest_items})
    if missing:
        raise ValueError(f"the fused graph has no place for the quantized layer {missing[0]}: export it traced")
    return proto, b.digest

