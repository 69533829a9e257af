"""sasq-export: write a static INT8 QDQ ONNX folder (calibrating and training first unless
``--scales`` names a trained state)."""

from __future__ import annotations

import sys
from pathlib import Path

from runtime.errors import ConfigError
from runtime.io import preflight
from sasq_edge.cli import recipe
from sasq_edge.cli.common import DATA_EPILOG, add_data_args, add_model_args, data_spec, emit, entry, parser


def _export(argv: list[str] | None) -> int:
    p = parser("sasq-export", "Export a static INT8 QDQ ONNX model (calibrating and training first unless --scales is given).",
               epilog=DATA_EPILOG)
    p.add_argument("onnx", help="output path, e.g. out/model.onnx; the folder also gets config, tokenizer and scales")
    add_model_args(p, required=True)
    p.add_argument("--scales", help="folder written by sasq-train (skip calibration and training)")
    p.add_argument("--float", action="store_true", help="export the unquantized float model (reference)")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="export (input_ids, attention_mask) -> logits only, without past_key_values inputs and present outputs")
    p.add_argument("--graph", default="auto", choices=("auto", "fused", "traced"),
                   help="fused: ONNX Runtime's fused CPU graph (GroupQueryAttention, fused norms; the CPU profiles); "
                        "traced: the dynamo trace, standard ops (TensorRT, every family); auto (default): fused where it applies")
    p.add_argument("--layerwise", action="store_true",
                   help="read a local safetensors checkpoint one decoder layer at a time (automatic when the float32 "
                        "model would not fit in memory): export with --scales, or calibrate with --train-steps 0")
    p.add_argument("--overwrite", action="store_true",
                   help="replace another export in the output folder (by default a folder holds one export, and a "
                        "second model name there is refused)")
    add_data_args(p, "calibration")
    recipe.add_train_args(p)
    p.add_argument("--no-memory-check", action="store_true",
                   help="train even where the estimated peak memory exceeds the memory free")
    args = p.parse_args(argv)
    from exporters import output_folder
    from sasq_edge.api import Quantized, export, quantize
    from sasq_edge.layerwise import should_go_layerwise
    from sasq_edge.state import load_state

    data_spec(args.data)  # a bad spec fails before the model loads
    if args.float and args.scales:
        raise ConfigError("--float exports the unquantized model: drop --scales, or drop --float")
    out = Path(args.onnx)
    if out.suffix != ".onnx":
        raise ConfigError(f"output {args.onnx} must end in .onnx, e.g. out/model.onnx")
    if out.is_dir():
        raise ConfigError(f"{out} is a folder: name the .onnx file inside it, e.g. {out / 'model.onnx'}")
    unit = output_folder(out, overwrite=args.overwrite)
    preflight(unit.folder)
    with unit.lock():  # a second run on the same folder fails now, not after training
        state = load_state(args.scales) if args.scales else None  # a bad folder fails before the model loads
        if state is not None and args.profile is not None:
            state = state.with_profile(recipe.profile(args))
        opts = dict(graph=args.graph, kv_cache=not args.no_kv_cache, overwrite=args.overwrite,
                    trust_remote_code=args.trust_remote_code, progress=not args.json)
        if args.float:
            res = export(args.model, out, **opts)
        elif state is not None:  # trained scales: the model whole, or one layer at a time where it does not fit
            folder = should_go_layerwise(args.model, args.layerwise, args.trust_remote_code, False)
            if folder is not None:
                print(f"sasq-export: reading {folder} one decoder layer at a time", file=sys.stderr, flush=True)
            res = export(Quantized(state, None, folder) if folder is not None else args.model, out, state=state, **opts)
        else:
            # the traced graph (and a graph without a KV cache) needs the whole model; quantize adds what
            # the config itself rules out for a model read layer by layer
            q = quantize(args.model, recipe.config(args), data=args.data, data_dir=args.data_dir, layerwise=args.layerwise,
                         trust_remote_code=args.trust_remote_code, device=str(recipe.device(args)),
                         memory_check=not args.no_memory_check, progress=not args.json, command="sasq-export",
                         whole_export=args.graph == "traced" or args.no_kv_cache)
            res = export(q, out, **opts)
    d = res.to_dict()
    emit(args, f"wrote {res.onnx} ({res.bytes / 1e6:.1f} MB, profile {res.profile or 'float'}, "
         f"{d['quantize_linear']} QuantizeLinear, {d['dequantize_linear']} DequantizeLinear)", d)
    return 0


main = entry("sasq-export", _export)
