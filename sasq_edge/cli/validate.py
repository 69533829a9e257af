"""sasq-validate: prove that an export computes what its PyTorch fake-quant twin (rebuilt from the
folder's scale state) computes. Checks, each against a measured threshold (docs/VALIDATION.md):
the fusion check, the session options, the INT8 weights digest, the exact integer replay of every
quantized linear and the teacher-forced divergence of every decoder block (on the first
``--layer-windows`` windows), and the distributions end to end (per-token KL, PPL ratio, confident
top-1 agreement) on every window."""

from __future__ import annotations

from runtime.parity import Thresholds
from sasq_edge.cli.common import (
    DATA_EPILOG,
    EXIT_CHECK_FAILED,
    add_data_args,
    add_runtime_args,
    data_spec,
    emit,
    entry,
    float_in,
    int_at_least,
    parser,
    providers,
)

_T = Thresholds()


def _validate(argv: list[str] | None) -> int:
    p = parser("sasq-validate", "Prove that an exported model computes what the PyTorch fake-quant model rebuilt from its "
               "folder's scale state computes: integer replay of every quantized linear, teacher-forced decoder blocks, "
               "distributions end to end, fusion.", epilog=DATA_EPILOG)
    p.add_argument("onnx", help="model.onnx written by sasq-export (its folder holds recipe.json and scales)")
    p.add_argument("--model", help="load the float model from here instead of the source named in recipe.json")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--max-kl-mean", type=float_in(0), default=_T.kl_mean,
                   help=f"max mean per-token KL(twin || onnx) of the next-token distributions, nats (default {_T.kl_mean:g})")
    p.add_argument("--max-kl-p99", type=float_in(0), default=_T.kl_p99,
                   help=f"max 99th percentile of the per-token KL, nats (default {_T.kl_p99:g})")
    p.add_argument("--max-ppl-ratio-error", type=float_in(0), default=_T.ppl_ratio,
                   help=f"max |PPL_onnx / PPL_twin - 1| (default {_T.ppl_ratio:g})")
    p.add_argument("--top1-margin", type=float_in(0), default=_T.top1_margin,
                   help=f"a position counts for top-1 agreement when the twin's top two logits differ by more than "
                        f"this (default {_T.top1_margin:g})")
    p.add_argument("--min-top1-confident", type=float_in(0, 1), default=_T.min_top1_confident,
                   help=f"min top-1 agreement over those positions (default {_T.min_top1_confident:g})")
    p.add_argument("--max-block-error", type=float_in(0), default=_T.block_error,
                   help=f"max teacher-forced divergence of a decoder block, relative to its update (default {_T.block_error:g})")
    p.add_argument("--tie-ulps", type=int_at_least(0), default=_T.tie_ulps,
                   help=f"integer replay: x/s this many float32 ulps from a rounding tie may round either way (default {_T.tie_ulps})")
    p.add_argument("--layer-windows", type=int_at_least(0), default=2,
                   help="windows that run the layer checks (integer replay, teacher-forced blocks); 0 skips them (default 2)")
    p.add_argument("--per-layer", action="store_true", help="print the per-layer table (block error, replay of its linears)")
    p.add_argument("--no-fusion-check", action="store_true",
                   help="skip the check that ONNX Runtime's CPU graph runs every quantized layer as an integer kernel")
    add_data_args(p)
    add_runtime_args(p)
    args = p.parse_args(argv)
    from sasq_edge.api import validate

    data_spec(args.data)  # a bad spec fails before any model loads
    thresholds = Thresholds(kl_mean=args.max_kl_mean, kl_p99=args.max_kl_p99, ppl_ratio=args.max_ppl_ratio_error,
                            top1_margin=args.top1_margin, min_top1_confident=args.min_top1_confident,
                            block_error=args.max_block_error, tie_ulps=args.tie_ulps)
    report = validate(args.onnx, model=args.model, data=args.data, data_dir=args.data_dir, seq_len=args.seq_len,
                      max_windows=args.max_windows, thresholds=thresholds, layer_windows=args.layer_windows,
                      per_layer=args.per_layer, fusion_check=not args.no_fusion_check, providers=providers(args),
                      threads=args.threads, trust_remote_code=args.trust_remote_code, progress=not args.json,
                      on_line=lambda line: print(line, flush=True))
    emit(args, report.summary(), report.details)
    return 0 if report.passed else EXIT_CHECK_FAILED


main = entry("sasq-validate", _validate)
