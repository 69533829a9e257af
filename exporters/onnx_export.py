"""Export a causal LM to a QDQ ONNX folder with the dynamo exporter: a lowering step.

``export_onnx(model, out, state=...)`` swaps each layer the ``ScaleState`` quantizes for its
lowering module (``exporters.lowering``: constant activation scales from the state, INT8 weights
from the model's frozen float weights), traces with ``torch.onnx.export(..., dynamo=True)``, puts
the caller's modules back, then runs the graph passes: INT8 weights pre-transposed to ``[K, N]``,
weight initializers named by ``runtime.graph.weight_name``, the deploy profile recorded in
``metadata_props``. Without a state the float model exports as it is (the FP32 reference).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from exporters.fused import ExternalData, fused_proto
from exporters.fused import supports as fused_supports
from exporters.genai import GENAI_FILE, genai_config
from exporters.lowering import ExportError, check_weights, lowered
from exporters.passes import op_counts, pretranspose_int8_weights, rename_initializers, set_metadata
from runtime.families import fused_refusal
from runtime.folder import COMPANION_FILES, CONFIG_FILE, exports_in, manifest
from runtime.graph import WEIGHT_SUFFIX, GraphIndex, cache_names, weight_name, weight_scale_name
from runtime.io import OutputFolder, checkpoint
from runtime.layout import AttentionLayout
from runtime.metadata import META_FILES, META_GRAPH, META_VERSION, META_WEIGHTS, deploy_metadata
from runtime.state import ScaleState
from runtime.version import __version__

OPSET = 21
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GiB limit, with headroom
_WRAPPED = "model"  # attribute under which the wrappers below hold the model: the traced names' prefix


@dataclass
class ExportResult:
    onnx: Path
    bytes: int
    profile: str | None
    op_counts: dict[str, int]
    external_data: bool

    def to_dict(self) -> dict:
        return {
            "onnx": str(self.onnx),
            "bytes": self.bytes,
            "profile": self.profile,
            "quantize_linear": self.op_counts.get("QuantizeLinear", 0),
            "dequantize_linear": self.op_counts.get("DequantizeLinear", 0),
            "matmul": self.op_counts.get("MatMul", 0),
            "external_data": self.external_data,
        }


class _LogitsOnly(nn.Module):
    """``(input_ids, attention_mask) -> logits``: no cache; the smallest graph."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class _WithCache(nn.Module):
    """One graph for prefill and decode, with ORTModelForCausalLM's names and layout:
    ``input_ids, attention_mask, position_ids, past_key_values.{i}.key|value`` ->
    ``logits, present.{i}.key|value``, caches ``[batch, kv_heads, past_sequence, head_dim]``.
    Prefill passes a past of length 0; ``present`` is the past with this call's keys appended.

    Every layer keeps its whole past, sliding-window layers too (Mistral, Gemma 2 and 3): the
    model's masks limit what those layers attend to, so the logits are the model's, and every
    layer's past stays as long as the attention mask. A cache built from the config would drop
    a sliding layer's old keys from its ``present``, and the next call's past and mask would no
    longer line up.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2], strict=True)))
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache, use_cache=True
        )
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def _initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def _fused_bytes(model) -> int:
    """An upper bound of a fused graph's initializer bytes: every parameter in float32 (most
    become INT8, so the real file is about a quarter for big models)."""
    if isinstance(model, nn.Module):
        return 4 * sum(p.numel() for p in model.parameters())
    return int(model.parameter_bytes_fp32())


def _need_bytes(model, state: ScaleState | None, kind: str, proto) -> int | None:
    """About the bytes the export's files take (the space checked before writing): the traced
    graph's initializers; for the fused graph every parameter in float32 except the quantized
    linears' weights (INT8). None where the model is read layer by layer (not known up front)."""
    if proto is not None:
        return _initializer_bytes(proto)
    if not isinstance(model, nn.Module):
        return None
    targets = set(state.scales) if state is not None else set()
    return sum(p.numel() * (1 if name.removesuffix(".weight") in targets else 4) for name, p in model.named_parameters())


def _export_args(model: nn.Module, kv_cache: bool):
    """Example inputs, names and dynamic axes. Batch 2 and lengths > 1: a size-1 example would
    specialise that axis."""
    ids = torch.zeros(2, 16, dtype=torch.long)
    if not kv_cache:
        dyn = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
        return _LogitsOnly(model), (ids, torch.ones_like(ids)), ["input_ids", "attention_mask"], ["logits"], dyn
    layout = AttentionLayout.of(model.config)
    past_names, present_names = cache_names(layout.layers)
    past_len = 3
    mask = torch.ones(2, past_len + ids.shape[1], dtype=torch.long)
    pos = torch.arange(past_len, past_len + ids.shape[1])[None].expand(2, -1).contiguous()
    past = [torch.zeros(2, layout.kv_heads, past_len, layout.head_dim) for _ in past_names]
    batch, seq, total = torch.export.Dim("batch"), torch.export.Dim("sequence"), torch.export.Dim("total_sequence")
    past_seq = torch.export.Dim("past_sequence")
    dyn = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past": tuple({0: batch, 2: past_seq} for _ in past_names),
    }
    names = ["input_ids", "attention_mask", "position_ids", *past_names]
    return _WithCache(model), (ids, mask, pos, *past), names, ["logits", *present_names], dyn


def _quantized_names(proto: onnx.ModelProto, state: ScaleState) -> dict[str, str]:
    """Traced initializer name -> the name readers look up (``runtime.graph``), for every quantized
    weight and, when no other node shares it, its per-channel scale."""
    g = GraphIndex(proto)
    dq_of = g.quantized_weights()
    out = {}
    for layer in state.scales:
        traced = f"{_WRAPPED}.{layer}{WEIGHT_SUFFIX}"
        if traced not in dq_of:
            raise ExportError(f"the traced graph has no INT8 weight for {layer} (looked for {traced!r}): "
                              "this model's layers did not lower as expected")
        out[traced] = weight_name(layer)
        scale = g.nodes[dq_of[traced]].input[1]
        if scale in g.initializers and g.uses(scale) == 1:
            out[scale] = weight_scale_name(layer)
    return out


def _has_custom_linears(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) and type(m) is not nn.Linear for m in model.modules())


def to_onnx_proto(model: nn.Module, state: ScaleState | None = None, opset: int = OPSET, kv_cache: bool = True) -> onnx.ModelProto:
    """Trace ``model`` into an ONNX ``ModelProto``: lowered by ``state`` when given (QDQ with the
    state's scales), else as a float graph. ``model`` is left as it was, training flag included."""
    if state is None and _has_custom_linears(model):
        raise ExportError("the model holds quantized layers: pass its ScaleState to export it quantized, or export a "
                          "freshly loaded model for the float reference")
    module, example, input_names, output_names, dyn = _export_args(model, kv_cache)
    was_training = model.training
    lowering = lowered(model, state) if state is not None else contextlib.nullcontext()
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)  # its "torchvision is not installed" lines read like errors
    try:
        with lowering as digest, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the exporter narrates each stage on stdout; keep stdout for our summary and JSON line
            with contextlib.redirect_stdout(io.StringIO()):
                program = torch.onnx.export(
                    module.eval(),
                    example,
                    input_names=input_names,
                    output_names=output_names,
                    dynamic_shapes=dyn,
                    opset_version=opset,
                    dynamo=True,
                    verbose=False,
                )
    finally:
        model.train(was_training)
        onnx_log.setLevel(level)
    proto = program.model_proto
    if state is not None:
        proto = pretranspose_int8_weights(proto)
        proto = rename_initializers(proto, _quantized_names(proto, state))
        proto = set_metadata(proto, {META_WEIGHTS: digest})
    return proto


GRAPHS = ("auto", "fused", "traced")
CPU_KERNEL_PROFILES = ("cpu-avx2", "cpu-vnni", "arm64")


def resolve_graph(graph: str, model: nn.Module, state: ScaleState | None, kv_cache: bool) -> str:
    """``fused`` or ``traced`` for ``graph`` (``auto``, ``fused`` or ``traced``)."""
    if graph not in GRAPHS:
        raise ExportError(f"unknown graph {graph!r}: choose one of {', '.join(GRAPHS)}")
    if not isinstance(model, nn.Module):  # a weight source read layer by layer: only the fused graph reads it
        if graph == "traced" or state is None or not kv_cache:
            raise ExportError("a model read layer by layer exports only as the fused graph (quantized, with a KV cache)")
        graph = "fused"
    fusable = state is not None and kv_cache and fused_supports(model)
    if graph == "fused":
        if state is None or not kv_cache:
            raise ExportError("the fused graph is a quantized graph with a KV cache: pass scales, drop --no-kv-cache, "
                              "or use --graph traced")
        why = fused_refusal(model.config)
        if why is not None:
            raise ExportError(f"no fused graph for this model ({why}): use --graph traced")
        if state.profile not in CPU_KERNEL_PROFILES:
            raise ExportError(f"the fused graph uses ONNX Runtime contrib ops, which TensorRT does not run; profile "
                              f"{state.profile!r} keeps the traced graph: use --graph traced or a CPU profile")
        return "fused"
    if graph == "auto" and fusable and state.profile in CPU_KERNEL_PROFILES:
        return "fused"
    return "traced"


def other_exports(out_path: Path) -> list[str]:
    """The sasq-edge exports in ``out_path``'s folder other than ``out_path`` itself."""
    return [name for name in exports_in(out_path.parent) if name != out_path.name]


def output_folder(out_path: str | os.PathLike, *, overwrite: bool = False, need: int | None = None) -> OutputFolder:
    """The export folder of ``out_path`` as one unit: lock it (``.lock()``) before a long run so a
    second run fails at once, then write it (``with``). One export per folder: a folder that holds
    another export is refused (its config, tokenizer and scale files would no longer be its own),
    or with ``overwrite`` that export's files are replaced."""
    out_path = Path(out_path)
    others = other_exports(out_path)
    if others and not overwrite:
        raise ExportError(f"{out_path.parent} holds another export ({', '.join(others)}), whose recipe.json, scales and "
                          f"tokenizer files {out_path.name} would replace: write {out_path.name} into a folder of its own, "
                          f"or pass --overwrite to replace that export")
    return OutputFolder(out_path.parent, own_files=(*COMPANION_FILES, out_path.name, out_path.name + ".data"),
                        last=out_path.name, need=need, remove=[n for o in others for n in (o, o + ".data")])


class _Stages:
    """One line per export stage on stderr, with its time: a 30-layer model traces for minutes."""

    def __init__(self, enabled: bool, total: int = 4) -> None:
        self.enabled, self.total, self.n, self.t0 = enabled, total, 0, 0.0

    def start(self, what: str) -> None:
        self.n += 1
        self.t0 = time.perf_counter()
        if self.enabled:
            print(f"export [{self.n}/{self.total}] {what} ...", file=sys.stderr, flush=True)

    def done(self, what: str) -> None:
        if self.enabled:
            print(f"export [{self.n}/{self.total}] {what} in {time.perf_counter() - self.t0:.1f} s", file=sys.stderr, flush=True)


def export_onnx(
    model: nn.Module,
    out_path: str | os.PathLike,
    *,
    state: ScaleState | None = None,
    tokenizer=None,
    opset: int = OPSET,
    kv_cache: bool = True,
    progress: bool = False,
    graph: str = "auto",
    overwrite: bool = False,
) -> ExportResult:
    """Write ``out_path`` (``.../model.onnx``) and, beside it, ``config.json``, the tokenizer files
    and (for a quantized model) the scale state, so the folder alone can be evaluated and
    validated. ``state`` decides what is quantized and how (profile, scales); ``model`` holds
    the float weights it was trained with and is not changed. With ``kv_cache`` (the default) the
    graph takes and returns the KV cache (``_WithCache``), otherwise it maps
    ``(input_ids, attention_mask)`` to logits only. ``progress`` prints each stage on stderr.
    ``graph``: ``fused`` writes the CPU profiles' fused graph (``exporters.fused``), ``traced``
    the dynamo trace (standard ops: TensorRT and every family), ``auto`` (the default) the fused
    graph where the profile runs on ONNX Runtime's CPU kernels and the family has one.
    ``overwrite``: replace another export in the same folder (refused otherwise).

    The folder is written as one unit (``runtime.io.OutputFolder``): every file is staged inside
    it and put in place only when all are written and the ONNX file passed ``onnx.checker``, so a
    failed export (a full disk included) leaves the previous files as they were. The ONNX metadata records a
    digest of each file beside it (``sasq.files``), which every command checks before use.
    """
    out_path = Path(out_path)
    if out_path.suffix != ".onnx":
        raise ExportError(f"output {out_path} must end in .onnx, e.g. out/model.onnx")
    if out_path.is_dir():
        raise ExportError(f"{out_path} is a folder: name the .onnx file inside it, e.g. {out_path / 'model.onnx'}")
    kind = resolve_graph(graph, model, state, kv_cache)
    stages = _Stages(progress)
    proto = None
    if kind == "traced":
        stages.start("tracing with torch.onnx (dynamo): about a minute per 15 decoder layers on 2 CPU cores")
        proto = to_onnx_proto(model, state, opset, kv_cache)
        stages.done("traced")
    checkpoint("traced")
    props = {META_VERSION: __version__}
    if state is not None:
        props = {**deploy_metadata(state.deploy, __version__), META_GRAPH: kind}
    data_name = out_path.name + ".data"
    with output_folder(out_path, overwrite=overwrite, need=_need_bytes(model, state, kind, proto)) as stage:
        streamed = big = False
        if kind == "fused":
            # the weights always go to page-aligned external data, streamed as they are made: ONNX
            # Runtime maps the file instead of reading it into memory, so the copies it pre-packs
            # are the only resident ones (SmolLM2's export: peak RSS 596 against 724 MiB inline at
            # 512 tokens of context, the same decode speed; bench/results/memory_external.md)
            streamed, big = True, _fused_bytes(model) > EXTERNAL_DATA_THRESHOLD
            stages.start("writing the fused graph (GroupQueryAttention, SkipSimplifiedLayerNormalization, INT8 Q/DQ linears)"
                         + f", weights streamed to {data_name}")
            external = ExternalData(stage / data_name, data_name) if streamed else None
            try:
                proto, digest = fused_proto(model, state, external)
            finally:
                if external is not None:
                    external.close()
            check_weights(state, digest)
            proto = set_metadata(proto, {META_WEIGHTS: digest})
            stages.done("wrote the graph")
        big = big or _initializer_bytes(proto) > EXTERNAL_DATA_THRESHOLD
        external = streamed or big
        stages.start(f"writing the folder's files into {stage.name}")
        model.config.to_json_file(str(stage / CONFIG_FILE))
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:  # eos ids for sasq-generate and optimum's generate()
            generation_config.save_pretrained(str(stage))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(stage))
        if state is not None:
            state.write_files(stage)
        if kind == "fused":  # ONNX Runtime GenAI loads the folder too
            config = genai_config(model, out_path.name, dict(state.deploy.session_options))
            (stage / GENAI_FILE).write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
        props[META_FILES] = json.dumps(manifest(stage, [p.name for p in stage.iterdir() if p.name != data_name]))
        proto = set_metadata(proto, props)
        proto.producer_name, proto.producer_version = "sasq-edge", __version__
        stages.done("wrote " + ", ".join(["config"] + ["tokenizer"] * (tokenizer is not None) + ["scales"] * (state is not None)
                                         + ["genai_config"] * (kind == "fused")))
        stages.start(f"saving {out_path.name}" + (" with external data" if external else ""))
        staged = stage / out_path.name
        if external and not streamed:
            onnx.save_model(proto, str(staged), save_as_external_data=True, location=data_name)
        else:  # inline, or already streamed: the proto holds references only
            onnx.save_model(proto, str(staged))
        stages.done("saved")
        stages.start("checking the file (onnx.checker" + ("" if big else ", shape inference") + ")")
        onnx.checker.check_model(str(staged))  # by path: works for external data too
        if not big:  # shape inference keeps a second copy of the graph in memory: small models only
            onnx.shape_inference.infer_shapes_path(str(staged), str(stage / ".shapes.onnx"))
            os.remove(stage / ".shapes.onnx")
        stages.done("checked")
        checkpoint("staged")
    folder = out_path.parent
    size = out_path.stat().st_size + ((folder / data_name).stat().st_size if external else 0)
    counts = dict(op_counts(proto))
    return ExportResult(out_path, size, state.profile if state else None, counts, external)
