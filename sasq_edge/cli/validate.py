"""sasq-validate: prove that an export computes what its PyTorch fake-quant twin (rebuilt from the
folder's scale state) computes. Checks, each against a measured threshold (docs/VALIDATION.md):
the fusion check, the session options, the INT8 weights digest, the exact integer replay of every
quantized linear and the teacher-forced divergence of every decoder block (on the first
``--layer-windows`` windows), and the distributions end to end (per-token KL, PPL ratio, confident
top-1 agreement) on every window."""

from __future__ import annotations

from pathlib import Path

from runtime.errors import RuntimeSetupError
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


def _verdict(passed: bool | None) -> str:
    return "NOT RUN" if passed is None else "PASSED" if passed else "FAILED"


def _table(replay, blocks) -> list[str]:
    """One row per stage: its teacher-forced float error (linears forced to ONNX Runtime's
    outputs), its block error with the twin's own linears, and the replay of its linears."""
    from runtime.probe import block_of

    per_stage: dict[str, list] = {}
    for r in replay.layers if replay is not None else []:
        b = block_of(r.layer)
        per_stage.setdefault("final norm + head" if b is None else f"layer {b}", []).append(r)
    stages = blocks.stages if blocks is not None and blocks.mapped else []
    by_name = {s.name: s for s in stages}
    names = [s.name for s in stages] or list(per_stage)
    rows = [f"{'stage':<18} {'float error':>11} {'block error':>11}  {'linears exact':>13} {'mismatched':>10} {'tie rows':>8}  verdict"]
    for name in names:
        s, linears = by_name.get(name), per_stage.get(name, [])
        ok = (s is None or blocks.error_ok(s)) and all(r.passed for r in linears)
        fe = "-" if s is None else f"{s.float_error:.2e}"
        be = "-" if s is None else f"{s.error:.2e}"
        exact = f"{sum(r.passed for r in linears)}/{len(linears)}" if linears else "-"
        mism = str(sum(r.unexplained for r in linears)) if linears else "-"
        ties = str(sum(r.tie_rows for r in linears)) if linears else "-"
        rows.append(f"{name:<18} {fe:>11} {be:>11}  {exact:>13} {mism:>10} {ties:>8}  {'ok' if ok else 'FAILED'}")
    if blocks is not None and not blocks.mapped:
        rows.append(f"(block boundaries not mapped: {blocks.reason})")
    return rows


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
    from runtime.data import check_context
    from runtime.folder import max_positions
    from runtime.fusion import check_fusion
    from runtime.metadata import session_options_problem
    from runtime.session import cpu_mismatch, open_session
    from runtime.sources import EVALUATION
    from runtime.state import ScaleState
    from sasq_edge.data import load_windows
    from sasq_edge.models import load_model
    from sasq_edge.state import apply_state
    from sasq_edge.validate import distribution_check, layer_checks

    data_spec(args.data)  # a bad spec fails before any model loads
    thresholds = Thresholds(kl_mean=args.max_kl_mean, kl_p99=args.max_kl_p99, ppl_ratio=args.max_ppl_ratio_error,
                            top1_margin=args.top1_margin, min_top1_confident=args.min_top1_confident,
                            block_error=args.max_block_error, tie_ulps=args.tie_ulps)
    path = Path(args.onnx)
    sess = open_session(path, providers(args), args.threads)
    if sess.profile is None:
        raise RuntimeSetupError(f"{path} carries no sasq deploy profile (a float or foreign model): validate models written by sasq-export")
    fusion = None if args.no_fusion_check else check_fusion(path)
    if fusion is not None:
        print(fusion.summary(), flush=True)
    options_problem = session_options_problem(sess.metadata, path)
    print(f"session options {_verdict(options_problem is None)}: "
          + (options_problem or f"the ones profile {sess.profile} needs"), flush=True)
    cpu_problem = cpu_mismatch(sess.profile, sess.providers)
    print(f"this CPU {_verdict(cpu_problem is None)}: " + (cpu_problem or "its integer kernels compute the profile exactly"),
          flush=True)
    state = ScaleState.load(path.parent)
    lm = load_model(args.model or state.model_source, trust_remote_code=args.trust_remote_code)
    apply_state(lm.model, state)
    check_context(args.seq_len, max_positions(path))
    data = load_windows(lm, args.data, args.seq_len, EVALUATION, data_dir=args.data_dir, max_windows=args.max_windows)
    windows = data.windows  # the same windows, built once with the model's own tokenizer, feed both sides
    layers = None
    if args.layer_windows:
        layers = layer_checks(lm.model, state, path, windows[: args.layer_windows], thresholds, providers(args), args.threads,
                              progress=not args.json)
        w = layers.weights
        print(f"weights {_verdict(w.passed)}: INT8 weights digest in the graph {w.graph[:12]}, recipe.json {str(w.state)[:12]}, "
              f"twin {w.twin[:12]}", flush=True)
        print(layers.replay.summary(), flush=True)
        print(layers.blocks.summary(), flush=True)
        if args.per_layer:
            print("\n".join(_table(layers.replay, layers.blocks)), flush=True)
    else:
        print("layer checks NOT RUN (--layer-windows 0)", flush=True)
    rep = distribution_check(lm.model, sess, windows, thresholds)
    checks = {"fusion": None if fusion is None else fusion.passed,
              "session_options": options_problem is None,
              "cpu": cpu_problem is None,
              "weights": None if layers is None else layers.weights.passed,
              "replay": None if layers is None else layers.replay.passed,
              "blocks": None if layers is None or not layers.blocks.ran else layers.blocks.passed,
              **{f"distribution.{c.name}": c.passed for c in rep.checks}}
    failed = [name for name, ok in checks.items() if ok is False]
    passed = not failed
    result = {**rep.to_dict(), "bos": data.bos is not None, "data": data.record, "thresholds": thresholds.to_dict(),
              "fusion": None if fusion is None else fusion.to_dict(),
              "session_options": {"passed": options_problem is None, "problem": options_problem},
              "cpu": {"passed": cpu_problem is None, "problem": cpu_problem},
              "weights": None if layers is None else layers.weights.to_dict(),
              "replay": None if layers is None else layers.replay.to_dict(),
              "blocks": None if layers is None else layers.blocks.to_dict(),
              "distribution": {"passed": rep.passed, "checks": {c.name: c.to_dict() for c in rep.checks}},
              "verdicts": {k: _verdict(v) for k, v in checks.items()}, "failed": failed, "passed": passed}
    conf = "n/a" if not rep.confident_positions else f"{rep.top1_confident:.4f}"
    print(f"distributions {_verdict(rep.passed)}: KL mean {rep.kl_mean:.2e} (max {thresholds.kl_mean:g}), p99 {rep.kl_p99:.2e} "
          f"(max {thresholds.kl_p99:g}), max {rep.kl_max:.2e}; ppl twin {rep.ppl_torch:.4f}, onnx {rep.ppl_onnx:.4f} (ratio "
          f"{rep.ppl_ratio:.5f}); top-1 agreement {rep.top1_agreement:.4f} over all {rep.positions} positions, {conf} over "
          f"the {rep.confident_positions} with a margin above {thresholds.top1_margin:g} (min {thresholds.min_top1_confident:g}); "
          f"{rep.windows} windows" + (", BOS first" if data.bos is not None else ""), flush=True)
    emit(args, f"validation {'PASSED' if passed else 'FAILED'}" + (f": {', '.join(failed)} failed" if failed else ""), result)
    return 0 if passed else EXIT_CHECK_FAILED


main = entry("sasq-validate", _validate)
