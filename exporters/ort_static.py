"""ONNX Runtime's own static quantizer as a baseline: ``quantize_static`` (QDQ) applied to our
float export, calibrated on the same validation windows as SASQ."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from runtime.errors import ConfigError
from runtime.io import atomic_path

CALIBRATORS = ("minmax", "percentile", "entropy")


class WindowReader:
    """``CalibrationDataReader`` over token windows, fed as prefill calls: ``input_ids``,
    ``attention_mask`` and, when the model has a KV cache, ``position_ids`` and an empty past."""

    def __init__(self, model_path: str | os.PathLike, windows: np.ndarray) -> None:
        import onnx

        m = onnx.load(str(model_path), load_external_data=False)
        names = {i.name for i in m.graph.input}
        past = [i for i in m.graph.input if i.name.startswith("past_key_values.")]
        self.feeds = []
        for w in windows:
            ids = np.asarray(w, dtype=np.int64)[None]
            feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            if "position_ids" in names:
                feed["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None]
            for p in past:
                dims = [d.dim_value for d in p.type.tensor_type.shape.dim]
                feed[p.name] = np.zeros((1, dims[1], 0, dims[3]), np.float32)
            self.feeds.append(feed)
        self._it = iter(self.feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self.feeds)


def quantize_static_baseline(
    float_onnx: str | os.PathLike,
    out_onnx: str | os.PathLike,
    windows: np.ndarray,
    calibrator: str = "minmax",
    *,
    per_channel: bool = True,
    reduce_range: bool = False,
    percentile: float = 99.999,
    weight_matmuls_only: bool = True,
) -> dict:
    """Quantize every MatMul of ``float_onnx`` with ORT's ``quantize_static`` (QDQ format, uint8
    activations per tensor, int8 weights) calibrated on ``windows``; write ``out_onnx`` atomically.

    Returns the settings and the calibration time. ``reduce_range`` (7-bit weights) is what
    AVX2 CPUs without VNNI need to avoid saturation in ORT's u8s8 kernel.
    ``weight_matmuls_only`` quantizes just the MatMuls whose second input is a weight
    initializer (the decoder linears SASQ quantizes) rather than also the attention products.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if calibrator not in methods:
        raise ConfigError(f"unknown ORT calibrator {calibrator!r}: choose one of {', '.join(CALIBRATORS)}")
    src = Path(float_onnx)
    if not src.is_file():
        raise ConfigError(f"{src} not found: export the float model first with sasq-export --float")
    nodes = weight_matmuls(src) if weight_matmuls_only else None
    out = Path(out_onnx)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with atomic_path(out) as tmp:
        quantize_static(str(src), str(tmp), WindowReader(src, windows), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul"], per_channel=per_channel, reduce_range=reduce_range,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=methods[calibrator], nodes_to_quantize=nodes,
                        extra_options={"CalibPercentile": percentile} if calibrator == "percentile" else {})
        _drop_file_digests(tmp)
    return {"calibrator": calibrator, "per_channel": per_channel, "reduce_range": reduce_range,
            "calibration_windows": int(len(windows)), "seq_len": int(np.asarray(windows).shape[1]),
            "quantized_matmuls": len(nodes) if nodes is not None else "all",
            "quantize_static_s": round(time.perf_counter() - t0, 1),
            **({"percentile": percentile} if calibrator == "percentile" else {})}


def _drop_file_digests(path: Path) -> None:
    """quantize_static copies the float export's metadata, whose file digests describe the float
    export's folder, not this file's: drop them."""
    import onnx

    from runtime.metadata import META_FILES

    model = onnx.load(str(path))
    keep = [p for p in model.metadata_props if p.key != META_FILES]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    onnx.save(model, str(path))


def weight_matmuls(model_path: str | os.PathLike) -> list[str]:
    """Names of the MatMul nodes whose second input is an initializer (the weight linears)."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return [n.name for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
