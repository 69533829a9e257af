"""Export a (prepared, calibrated) causal LM to a QDQ ONNX folder with the dynamo exporter.

With the quantizers in ``export`` mode, ``torch.onnx.export(..., dynamo=True)`` turns each
activation quantizer into ``QuantizeLinear -> DequantizeLinear`` with constant scales and each
weight into an INT8 initializer feeding ``DequantizeLinear``; post-passes then pre-transpose the
weights and record the deploy profile in ``metadata_props``. A model without quantizers exports
as a plain float graph (the FP32 reference).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

import sasq_edge
from exporters.passes import META_VERSION, deploy_metadata, op_counts, pretranspose_int8_weights, set_metadata
from sasq_edge.errors import SasqError
from sasq_edge.io import atomic_path
from sasq_edge.modules import quant_linears, quant_mode
from sasq_edge.state import ScaleState

OPSET = 21
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GiB limit, with headroom


class ExportError(SasqError):
    """The model cannot be exported as asked."""


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
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2], strict=True)), config=self.model.config)
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache, use_cache=True
        )
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


@dataclass(frozen=True)
class CacheLayout:
    """Shape facts of the KV cache, read from the model config (the runtime reads them back from
    the graph's input shapes)."""

    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> CacheLayout:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, kv_heads, head_dim)

    def names(self) -> tuple[list[str], list[str]]:
        past = [f"past_key_values.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]
        present = [f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]
        return past, present


def _initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def _export_args(model: nn.Module, kv_cache: bool):
    """Example inputs, names and dynamic axes. Batch 2 and lengths > 1: a size-1 example would
    specialise that axis."""
    ids = torch.zeros(2, 16, dtype=torch.long)
    if not kv_cache:
        dyn = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
        return _LogitsOnly(model), (ids, torch.ones_like(ids)), ["input_ids", "attention_mask"], ["logits"], dyn
    layout = CacheLayout.of(model.config)
    past_names, present_names = layout.names()
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


def to_onnx_proto(model: nn.Module, state: ScaleState | None = None, opset: int = OPSET, kv_cache: bool = True) -> onnx.ModelProto:
    """Trace ``model`` (quantizers in export mode, if any) into an ONNX ``ModelProto``; with
    ``state``, the graph's scale constants are exactly the state's values."""
    module, example, input_names, output_names, dyn = _export_args(model, kv_cache)
    with quant_mode(model, "export"), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if state is not None:
            for name, m in quant_linears(model):
                m.act_quant.freeze(state.scales[name], state.truncation.get(name))
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
    return program.model_proto


def export_onnx(
    model: nn.Module,
    out_path: str | os.PathLike,
    *,
    state: ScaleState | None = None,
    tokenizer=None,
    opset: int = OPSET,
    kv_cache: bool = True,
) -> ExportResult:
    """Write ``out_path`` (``.../model.onnx``) and, beside it, ``config.json``, the tokenizer files
    and (for a quantized model) the scale state, so the folder alone can be evaluated and
    validated. ``state`` must be the state the model's scales came from; it decides the profile.
    With ``kv_cache`` (the default) the graph takes and returns the KV cache (``_WithCache``),
    otherwise it maps ``(input_ids, attention_mask)`` to logits only.
    The ``.onnx`` file is written last and atomically.
    """
    out_path = Path(out_path)
    if out_path.suffix != ".onnx":
        raise ExportError(f"output {out_path} must end in .onnx, e.g. out/model.onnx")
    quantized = any(True for _ in quant_linears(model))
    if quantized and state is None:
        raise ExportError("a quantized model needs its ScaleState to export: pass state=ScaleState.from_model(...)")
    if state is not None:
        state.apply(model)  # the exported scales are exactly the state's, whatever the model held
    proto = to_onnx_proto(model, state, opset, kv_cache)
    props = {META_VERSION: sasq_edge.__version__}
    if state is not None:
        proto = pretranspose_int8_weights(proto)
        deploy = state.config.deploy
        props = deploy_metadata(deploy.name, deploy.session_options, sasq_edge.__version__)
    proto = set_metadata(proto, props)
    proto.producer_name, proto.producer_version = "sasq-edge", sasq_edge.__version__
    external = _initializer_bytes(proto) > EXTERNAL_DATA_THRESHOLD

    folder = out_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(str(folder / "config.json"))
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:  # eos ids for sasq-generate and optimum's generate()
        generation_config.save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    if state is not None:
        state.save(folder)
    with atomic_path(out_path) as tmp:
        if external:
            # the weights file lands beside the final path; the .onnx that names it is atomic
            onnx.save_model(proto, str(tmp), save_as_external_data=True, location=out_path.name + ".data")
        else:
            onnx.save_model(proto, str(tmp))
        onnx.checker.check_model(str(tmp))  # by path: works for external data too
        onnx.shape_inference.infer_shapes_path(str(tmp), str(tmp) + ".shapes")
        os.remove(str(tmp) + ".shapes")
    size = out_path.stat().st_size + ((folder / (out_path.name + ".data")).stat().st_size if external else 0)
    counts = dict(op_counts(proto))
    return ExportResult(out_path, size, state.config.profile if state else None, counts, external)
