"""sasq-baseline: the perplexity of one baseline SASQ is measured against (WikiText-2 test, or --data)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime.errors import ConfigError
from sasq_edge.cli import recipe
from sasq_edge.cli.common import (
    DATA_EPILOG,
    add_data_args,
    add_model_args,
    add_runtime_args,
    data_spec,
    emit,
    entry,
    eval_windows,
    float_in,
    int_at_least,
    parser,
)

ORT_METHODS = ("ort-minmax", "ort-percentile", "ort-entropy")


def _baseline(argv: list[str] | None) -> int:
    from sasq_edge.baselines import METHODS

    p = parser(
        "sasq-baseline",
        "WikiText-2 test perplexity of one baseline SASQ is measured against, on the same windows and calibration text.",
        epilog="methods:\n"
        "  fp32, fp16         the float model (fp16 on a GPU or a CPU with AVX512-FP16)\n"
        "  naive              static W8A8, absmax per-tensor activation scales, no training\n"
        "  percentile, mse    static PTQ with percentile / MSE-optimal clipping\n"
        "  smoothquant        SmoothQuant static per-tensor: factors folded into RMSNorm / linears,\n"
        "                     alpha searched on held-out validation windows unless --smooth-alpha is given\n"
        "  dynamic            per-token absmax activation scales at run time (accuracy reference)\n"
        "  ort-minmax, ort-percentile, ort-entropy\n"
        "                     ONNX Runtime quantize_static (QDQ, u8 activations, s8 per-channel weights)\n"
        "                     on a float export (sasq-export --float); evaluated on ONNX Runtime\n\n" + DATA_EPILOG,
    )
    p.add_argument("method", help=f"{', '.join(METHODS)}, {', '.join(ORT_METHODS)}")
    add_model_args(p, required=False)
    add_data_args(p)
    p.add_argument("--calib-data", default="wikitext2", metavar="SPEC",
                   help="calibration text, the same syntax as --data (default wikitext2: its validation split)")
    recipe.add_train_args(p, train=False)
    p.add_argument("--float-onnx", help="ort-*: the float export to quantize (sasq-export --float)")
    p.add_argument("--out", help="ort-*: where to write the quantized .onnx")
    p.add_argument("--calib-seq-len", type=int_at_least(2), default=512,
                   help="ort-*: tokens per calibration window (ORT keeps every window's tensors in memory)")
    p.add_argument("--ort-percentile", type=float_in(0, 100, low_open=True), default=99.999,
                   help="ort-percentile: ORT's CalibPercentile (default %(default)s)")
    add_runtime_args(p, provider=False)  # ort-*: ONNX Runtime runs on the CPU
    args = p.parse_args(argv)
    data_spec(args.data)  # a bad spec fails before any work
    data_spec(args.calib_data)
    if args.method in ORT_METHODS:
        return _baseline_ort(args)
    if args.method not in METHODS:
        raise ConfigError(f"unknown baseline {args.method!r}: choose one of {', '.join(METHODS + ORT_METHODS)}")
    if not args.model:
        raise ConfigError(f"{args.method} needs --model (hub id, folder, .gguf or tiny-random-llama)")
    import dataclasses

    from runtime.data import sample_windows
    from runtime.sources import EVALUATION, record_summary
    from sasq_edge.baselines import build_method
    from sasq_edge.data import load_windows
    from sasq_edge.evaluate import perplexity
    from sasq_edge.models import load_model
    from sasq_edge.pipeline import hold_out, training_data

    config = dataclasses.replace(recipe.config(args), train_steps=0, smooth_learn=False)
    device = recipe.device(args)
    lm = load_model(args.model, trust_remote_code=args.trust_remote_code)
    lm.model.to(device)
    calib_data = training_data(lm, config, args.data_dir, args.calib_data)  # before build_method: self:N samples the float model
    print(record_summary(calib_data.record), file=sys.stderr, flush=True)
    windows = calib_data.windows
    select = None
    if args.method == "smoothquant" and config.smooth_alpha in (None, "auto"):
        windows, select = hold_out(windows)
    calib = sample_windows(windows, config.calib_batches, config.seed)
    test = load_windows(lm, args.data, config.seq_len, EVALUATION, data_dir=args.data_dir, max_windows=args.max_windows)
    model, info = build_method(lm.model, args.method, config, calib, select)
    res = perplexity(model, test.windows, desc=args.method, bos=test.bos is not None)
    out = {**info, **res.to_dict(), "data": test.record, "calib_data": calib_data.record}
    extra = f", alpha {info['alpha']}" if "alpha" in info else ""
    emit(args, f"{args.method}: perplexity {res.ppl:.4f} over {res.windows} windows of {res.seq_len} tokens{extra}; "
         f"data: {test.text}", out)
    return 0


def _baseline_ort(args: argparse.Namespace) -> int:
    import onnx

    from exporters.ort_static import quantize_static_baseline
    from runtime.data import bos_id, sample_windows
    from runtime.folder import load_tokenizer, tokenizer_config
    from runtime.perplexity import perplexity
    from runtime.session import open_session
    from runtime.sources import CALIBRATION, load_windows
    from sasq_edge.config import QuantConfig

    if not args.float_onnx or not args.out:
        raise ConfigError(f"{args.method} needs --float-onnx (from sasq-export --float) and --out (the quantized .onnx)")
    if not str(args.out).endswith(".onnx"):
        raise ConfigError(f"--out {args.out} must end in .onnx")
    src = Path(args.float_onnx)
    if not src.is_file():
        raise ConfigError(f"{src} not found: export the float model first with sasq-export --float")
    src_sess = open_session(src, ["cpu"], args.threads)  # a corrupt or foreign file fails here, before calibration
    if src_sess.profile is not None or any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "MatMulInteger")
                                           for n in onnx.load(str(src), load_external_data=False).graph.node):
        raise ConfigError(f"{src} is already quantized (profile {src_sess.profile or 'unknown'}): {args.method} quantizes the "
                          "float export; pass the file sasq-export --float wrote")
    del src_sess
    tokenizer, tok_config = load_tokenizer(src.parent), tokenizer_config(src.parent)
    preset = QuantConfig.from_recipe(args.recipe)
    seed = preset.seed if args.seed is None else args.seed
    batches = preset.calib_batches if args.calib_batches is None else args.calib_batches
    calib_data = load_windows(args.calib_data, tokenizer, args.calib_seq_len, CALIBRATION, bos=bos_id(tokenizer, tok_config),
                              data_dir=args.data_dir, seed=seed)
    calib = sample_windows(calib_data.windows, batches, seed)
    build = quantize_static_baseline(src, args.out, calib, args.method.removeprefix("ort-"), percentile=args.ort_percentile)
    sess = open_session(args.out, ["cpu"], args.threads)
    test = eval_windows(args, Path(args.out), tokenizer, tok_config)
    res = perplexity(sess, test.windows, bos=test.bos is not None)
    emit(args, f"{args.method}: perplexity {res.ppl:.4f} over {res.windows} windows of {res.seq_len} tokens -> {args.out}",
         {**build, **res.to_dict(), "onnx": str(args.out), "data": test.record, "calib_data": calib_data.record})
    return 0


main = entry("sasq-baseline", _baseline)
