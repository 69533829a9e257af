"""Lint a QDQ ONNX graph against TensorRT's explicit-quantization rules.

TensorRT builds an INT8 engine from an ONNX graph only in the shape it documents for explicit
quantization (TensorRT developer guide, "Working with Quantized Types" / "Explicit Quantization"):
``QuantizeLinear -> DequantizeLinear`` pairs with constant, positive, symmetric INT8 scales,
per-tensor on activations and per-output-channel on weights, with the DQ feeding the MatMul,
Gemm or Conv directly and biases left in float. A graph that breaks a rule still runs, but the
layer silently falls back to float (or the build fails). Each rule below is one small function;
``lint`` runs them all on the main graph (subgraphs of ``If``/``Loop`` are not visited) and
returns every violation, naming the node or tensor.

Imports only onnx and numpy, so it can check a file on a machine without torch. A path is loaded
without external data: shapes and types are still known, and a check that needs the values of
an external tensor is skipped for that tensor (our scales and zero points are always inline).

    sasq-lint out/model.onnx [--json]   (the command line: sasq_edge/cli/lint.py)
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import TensorProto

from runtime.graph import DEQUANTIZE, MATMULS, QUANTIZE, GraphIndex, attr

OPSET = "opset"
INT8_TYPE = "int8-type"
SYMMETRIC = "symmetric"
PER_TENSOR_ACTIVATION = "per-tensor-activation"
PER_CHANNEL_WEIGHT = "per-channel-weight"
QDQ_BEFORE_MATMUL = "qdq-before-matmul"
NO_BIAS_DQ = "no-bias-dq"
NO_DYNAMIC_QUANT = "no-dynamic-quant"
CONSTANT_POSITIVE_SCALE = "constant-positive-scale"
QDQ_PAIR = "qdq-pair"

RULES: dict[str, str] = {
    OPSET: "the default-domain opset is at least 13 (per-channel QuantizeLinear/DequantizeLinear)",
    INT8_TYPE: "every Q/DQ zero point and quantized tensor is int8 (uint8 is the CPU profiles' encoding)",
    SYMMETRIC: "every int8 zero point is 0",
    PER_TENSOR_ACTIVATION: "activation Q/DQ scales are scalars (one scale per tensor)",
    PER_CHANNEL_WEIGHT: "a per-channel weight scale lies on the output-channel axis of the MatMul/Gemm/Conv it feeds",
    QDQ_BEFORE_MATMUL: "both inputs of a quantized MatMul/Gemm come straight from DequantizeLinear",
    NO_BIAS_DQ: "no DequantizeLinear on a bias (int32 DQ, Gemm input C, Conv input 2, Add after a quantized MatMul)",
    NO_DYNAMIC_QUANT: "no DynamicQuantizeLinear and no operator-form integer ops (MatMulInteger, QLinear*, ...)",
    CONSTANT_POSITIVE_SCALE: "every Q/DQ scale is a constant whose values are finite and > 0",
    QDQ_PAIR: "a QuantizeLinear feeds only DequantizeLinear nodes with the same scale, zero point and axis",
}

MIN_OPSET = 13
# operator-form or dynamic quantization, in any domain (ai.onnx and com.microsoft)
INTEGER_OPS = frozenset({
    "DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul", "ConvInteger", "QLinearConv", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QAttention",
})
_IN_NAMES = ("A", "B", "C")  # MatMul/Gemm input names, for messages


@dataclass(frozen=True)
class Violation:
    rule: str
    node: str  # the node's name (``OpType#index`` when unnamed), or a tensor's when no node is at fault
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.node}: {self.message}"


@dataclass
class LintReport:
    violations: list[Violation]
    checked: dict[str, int]  # what was looked at: quantize_linear, dequantize_linear, weight_dq, quantized_matmuls, ...

    @property
    def passed(self) -> bool:
        return not self.violations

    def by_rule(self) -> Counter:
        return Counter(v.rule for v in self.violations)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "counts": dict(self.checked),
            "by_rule": dict(self.by_rule()),
            "violations": [asdict(v) for v in self.violations],
        }


def _dtype_name(t: int | None) -> str:
    return "unknown" if t is None else TensorProto.DataType.Name(t).lower()


def _size(shape: tuple[int | None, ...] | None) -> int | None:
    if shape is None or any(d is None for d in shape):
        return None
    return int(np.prod(shape, dtype=np.int64))


def _fmt_values(v: np.ndarray) -> str:
    return f"{v.item():g}" if v.size == 1 else f"[{', '.join(f'{x:g}' for x in v.ravel()[:4])}{', ...' if v.size > 4 else ''}]"


# --- rules: each yields the violations of one rule ---------------------------------------------


def _check_opset(g: GraphIndex) -> Iterator[Violation]:
    versions = [o.version for o in g.model.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        yield Violation(OPSET, "opset_import", f"no default-domain opset import: TensorRT needs opset >= {MIN_OPSET}")
    elif max(versions) < MIN_OPSET:
        yield Violation(OPSET, "opset_import", f"default-domain opset is {max(versions)}: per-channel QuantizeLinear/"
                        f"DequantizeLinear need opset >= {MIN_OPSET}; re-export with a newer opset (we use 21)")


def _check_int8_type(g: GraphIndex) -> Iterator[Violation]:
    for i, n in g.qdq():
        zp = g.zero_point(n)
        t = g.q_type(n) if n.op_type == QUANTIZE else g.dq_type(n)
        if t is None or t == TensorProto.INT8 or (n.op_type == DEQUANTIZE and t == TensorProto.INT32):
            continue  # unknown type: nothing to say; int32 DQ is a bias, reported by no-bias-dq
        if zp is not None:
            what = f"{_dtype_name(t)} zero point '{zp}'"
        elif n.op_type == QUANTIZE and attr(n, "output_dtype", 0):
            what = f"output_dtype {_dtype_name(t)}"
        elif n.op_type == QUANTIZE:
            what = "no zero point and no output_dtype (QuantizeLinear then produces uint8)"
        else:
            what = f"{_dtype_name(t)} input '{n.input[0]}'"
        # uint8 is how the CPU profiles carry the int8 grid; the trt profile exports int8
        hint = "export with --profile trt" if t == TensorProto.UINT8 else "re-quantize to int8"
        yield Violation(INT8_TYPE, g.names[i], f"{what}: TensorRT wants int8; {hint}")


def _check_symmetric(g: GraphIndex) -> Iterator[Violation]:
    for i, n in g.qdq():
        zp = g.zero_point(n)
        if zp is None or g.elem_type(zp) != TensorProto.INT8:
            continue  # a missing zero point is 0; other types are int8-type's business
        v = g.values(zp)
        if v is not None and np.any(v != 0):
            yield Violation(SYMMETRIC, g.names[i], f"zero point '{zp}' is {_fmt_values(v)}: TensorRT supports only "
                            "symmetric quantization (zero point 0)")


def _check_per_tensor_activation(g: GraphIndex) -> Iterator[Violation]:
    for i, n in g.qdq():
        if g.is_weight(n):
            continue
        scale = n.input[1]
        size = _size(g.shape(scale))
        if size is not None and size != 1:
            yield Violation(PER_TENSOR_ACTIVATION, g.names[i], f"activation scale '{scale}' has shape "
                            f"{list(g.shape(scale))}: TensorRT quantizes activations per tensor (one scalar scale)")


def _weight_axis(op: onnx.NodeProto, pos: int, rank: int) -> int | None:
    """The output-channel axis of a weight feeding ``op`` at input ``pos``; None when not a weight input."""
    if op.op_type == "MatMul" and pos == 1:
        return rank - 1  # B is [K, N]
    if op.op_type == "Gemm" and pos == 1:
        return 0 if attr(op, "transB", 0) else 1  # B is [N, K] with transB=1, else [K, N]
    if op.op_type == "Conv" and pos == 1:
        return 0  # W is [M, C/group, kH, kW]
    return None


def _check_per_channel_weight(g: GraphIndex) -> Iterator[Violation]:
    for i, n in g.qdq():
        if n.op_type != DEQUANTIZE or not g.is_weight(n):
            continue
        scale, w_shape = n.input[1], g.shape(g.quantized_source(n))
        s_shape = g.shape(scale)
        if w_shape is None or s_shape is None or _size(s_shape) == 1:
            continue  # per-tensor weight scales are allowed
        rank = len(w_shape)
        axis = attr(n, "axis", 1)
        found = axis + rank if axis < 0 else axis
        for c, pos in g.consumers[n.output[0]]:
            op = g.nodes[c]
            need = _weight_axis(op, pos, rank)
            if need is None:
                continue
            where = f"{op.op_type} '{g.names[c]}' input {_IN_NAMES[pos]} {list(w_shape)}"
            if found != need:
                yield Violation(PER_CHANNEL_WEIGHT, g.names[i], f"per-channel scale '{scale}' on axis {found} "
                                f"(attribute {axis}), but {where} needs axis {need}, the output channels")
            elif list(s_shape) != [w_shape[need]]:
                yield Violation(PER_CHANNEL_WEIGHT, g.names[i], f"scale '{scale}' has shape {list(s_shape)}, but "
                                f"{where} needs [{w_shape[need]}], one scale per output channel")


def _check_qdq_before_matmul(g: GraphIndex) -> Iterator[Violation]:
    for i, n in enumerate(g.nodes):
        if not g.is_quantized_matmul(n):
            continue
        for pos, (kind, dq, hop) in enumerate(g.matmul_inputs(n)):
            if kind == "hop":
                x = g.nodes[hop]
                yield Violation(QDQ_BEFORE_MATMUL, g.names[hop], f"{x.op_type} between DequantizeLinear '{g.names[dq]}' "
                                f"and {n.op_type} '{g.names[i]}' input {_IN_NAMES[pos]}: TensorRT fuses Q/DQ only when "
                                f"the DQ feeds the {n.op_type} directly; apply the {x.op_type} before quantizing "
                                "(pre-transpose/reshape the weight)")
            elif kind == "float":
                name = n.input[pos]
                yield Violation(QDQ_BEFORE_MATMUL, g.names[i], f"input {_IN_NAMES[pos]} '{name}' is float "
                                f"({g.describe(name)}) while the other input is quantized: TensorRT runs a "
                                f"{n.op_type} in INT8 only when both inputs come from DequantizeLinear")


def _check_no_bias_dq(g: GraphIndex) -> Iterator[Violation]:
    found: dict[int, str] = {}  # DQ index -> why it is a bias (first reason wins)
    for i, n in g.qdq():
        if n.op_type == DEQUANTIZE and g.elem_type(n.input[0]) == TensorProto.INT32:
            found.setdefault(i, f"dequantizes int32 tensor '{n.input[0]}' (a bias)")
        for c, pos in g.consumers[n.output[0]] if n.op_type == DEQUANTIZE else ():
            op = g.nodes[c]
            if (op.op_type, pos) in (("Gemm", 2), ("Conv", 2)):
                found.setdefault(i, f"feeds {op.op_type} '{g.names[c]}' input {pos} (the bias)")
    for a, n in enumerate(g.nodes):
        if n.op_type != "Add" or len(n.input) != 2:
            continue
        for mine, other in ((n.input[0], n.input[1]), (n.input[1], n.input[0])):
            mm, dq = g.producer.get(mine), g.dq_producer(other)
            # a DQ of a constant added to a quantized MatMul's output is a bias; a DQ of an
            # activation there is a quantized residual, which TensorRT fuses and is fine
            if mm is not None and dq is not None and g.is_quantized_matmul(g.nodes[mm]) and g.is_weight(g.nodes[dq]):
                found.setdefault(dq, f"feeds Add '{g.names[a]}' after quantized {g.nodes[mm].op_type} "
                                     f"'{g.names[mm]}' (a bias)")
    for i in sorted(found):
        yield Violation(NO_BIAS_DQ, g.names[i], f"{found[i]}: TensorRT wants biases in float; keep the bias a float "
                        "initializer and drop its DequantizeLinear")


def _check_no_dynamic_quant(g: GraphIndex) -> Iterator[Violation]:
    for i, n in enumerate(g.nodes):
        if n.op_type in INTEGER_OPS:
            yield Violation(NO_DYNAMIC_QUANT, g.names[i], f"{n.domain or 'ai.onnx'}::{n.op_type} is dynamic or "
                            "operator-form quantization: TensorRT takes QuantizeLinear/DequantizeLinear only; "
                            "export static QDQ")


def _check_constant_positive_scale(g: GraphIndex) -> Iterator[Violation]:
    for i, n in g.qdq():
        scale = n.input[1]
        if not g.is_const(scale):
            yield Violation(CONSTANT_POSITIVE_SCALE, g.names[i], f"scale '{scale}' is not a constant "
                            f"({g.describe(scale)}): TensorRT needs scales fixed at build time")
            continue
        v = g.values(scale)
        if v is None:
            continue  # stored as external data, not loaded
        bad = ~(np.isfinite(v) & (v > 0))
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            yield Violation(CONSTANT_POSITIVE_SCALE, g.names[i], f"scale '{scale}' has {int(bad.sum())} of {v.size} "
                            f"value(s) not finite and > 0 (first {v.ravel()[first]:g} at index {first})")


def _same_values(g: GraphIndex, a: str | None, b: str | None) -> bool | None:
    """Whether two scale or zero-point inputs hold equal values (a missing zero point is 0);
    None when that cannot be told (non-constant or external)."""
    if a == b:
        return True
    va = np.zeros(1) if a is None else g.values(a)
    vb = np.zeros(1) if b is None else g.values(b)
    if va is None or vb is None:
        return None
    if a is not None and b is not None and g.elem_type(a) != g.elem_type(b):
        return False
    va, vb = va.ravel(), vb.ravel()
    if va.size != vb.size and 1 not in (va.size, vb.size):
        return False
    return bool(np.all((va == vb) | (np.isnan(va) & np.isnan(vb))))  # a scalar broadcasts over per-channel values


def _check_qdq_pair(g: GraphIndex) -> Iterator[Violation]:
    for i, q in g.qdq():
        if q.op_type != QUANTIZE:
            continue
        y = q.output[0]
        if y in g.outputs:
            yield Violation(QDQ_PAIR, g.names[i], f"output '{y}' is a graph output: a QuantizeLinear must feed "
                            "DequantizeLinear only")
        for c, pos in g.consumers[y]:
            dq = g.nodes[c]
            if dq.op_type != DEQUANTIZE or pos != 0:
                yield Violation(QDQ_PAIR, g.names[i], f"output '{y}' feeds {dq.op_type} '{g.names[c]}': "
                                "a QuantizeLinear must feed DequantizeLinear only")
                continue
            diffs = []
            if _same_values(g, q.input[1], dq.input[1]) is False:
                diffs.append(f"scale '{dq.input[1]}' = {_fmt_values(g.values(dq.input[1]))}, "
                             f"not '{q.input[1]}' = {_fmt_values(g.values(q.input[1]))}")
            if _same_values(g, g.zero_point(q), g.zero_point(dq)) is False:
                diffs.append(f"zero point '{g.zero_point(dq)}', not '{g.zero_point(q)}'")
            if _size(g.shape(q.input[1])) not in (1, None):
                rank = len(g.shape(q.input[0]) or ())
                aq, adq = attr(q, "axis", 1), attr(dq, "axis", 1)
                if rank:
                    aq, adq = aq % rank, adq % rank
                if aq != adq:
                    diffs.append(f"axis {adq}, not {aq}")
            if diffs:
                yield Violation(QDQ_PAIR, g.names[c], f"after QuantizeLinear '{g.names[i]}' uses {'; '.join(diffs)}: "
                                "a Q->DQ pair must share scale, zero point and axis")


_CHECKS = (
    _check_opset,
    _check_int8_type,
    _check_symmetric,
    _check_per_tensor_activation,
    _check_per_channel_weight,
    _check_qdq_before_matmul,
    _check_no_bias_dq,
    _check_no_dynamic_quant,
    _check_constant_positive_scale,
    _check_qdq_pair,
)


def _counts(g: GraphIndex) -> dict[str, int]:
    ops = Counter(n.op_type for n in g.nodes)
    return {
        "nodes": len(g.nodes),
        "quantize_linear": ops[QUANTIZE],
        "dequantize_linear": ops[DEQUANTIZE],
        "weight_dq": sum(1 for _, n in g.qdq() if n.op_type == DEQUANTIZE and g.is_weight(n)),
        "quantized_matmuls": sum(1 for n in g.nodes if g.is_quantized_matmul(n)),
        "float_matmuls": sum(1 for n in g.nodes if n.op_type in MATMULS and not g.is_quantized_matmul(n)),
    }


def lint(model: onnx.ModelProto | str | os.PathLike) -> LintReport:
    """Check ``model`` (a ModelProto or a path) against every rule in ``RULES``."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model), load_external_data=False)
    g = GraphIndex(model)
    violations = [v for check in _CHECKS for v in check(g)]
    return LintReport(violations, _counts(g))


def format_report(report: LintReport) -> str:
    c = report.checked
    seen = (f"{c.get('quantized_matmuls', 0)} quantized MatMul/Gemm, {c.get('quantize_linear', 0)} QuantizeLinear, "
            f"{c.get('dequantize_linear', 0)} DequantizeLinear ({c.get('weight_dq', 0)} on weights)")
    if report.passed:
        return f"TensorRT lint passed: {seen}"
    rules = ", ".join(f"{r} x{k}" for r, k in sorted(report.by_rule().items()))
    lines = [str(v) for v in report.violations]
    lines.append(f"TensorRT lint FAILED: {len(report.violations)} violation(s) ({rules}) in {seen}")
    return "\n".join(lines)
