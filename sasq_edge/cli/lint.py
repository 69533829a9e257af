"""sasq-lint: TensorRT's explicit-quantization rules and ONNX Runtime's fusion report. A device
command: runtime only."""

from __future__ import annotations

from pathlib import Path

from sasq_edge.cli.common import EXIT_CHECK_FAILED, emit, entry, parser


def _lint(argv: list[str] | None) -> int:
    from runtime.lint import RULES

    p = parser("sasq-lint", "Check an ONNX model against TensorRT's explicit-quantization rules, and report which\n"
               "linear layers ONNX Runtime's CPU graph runs as integer kernels. Exits 1 on any violation.",
               "rules:\n" + "\n".join(f"  {k:<24} {v}" for k, v in RULES.items()))
    p.add_argument("onnx", help="model.onnx to check")
    p.add_argument("--no-fusion-check", action="store_true", help="skip the ONNX Runtime CPU fusion report")
    args = p.parse_args(argv)
    from runtime.fusion import check_fusion
    from runtime.lint import format_report, lint
    from runtime.metadata import META_PROFILE, read_metadata

    path = Path(args.onnx)
    meta = read_metadata(path)  # fails clearly on a missing or non-ONNX file
    report = lint(path)
    print(format_report(report), flush=True)
    fusion = None if args.no_fusion_check else check_fusion(path)
    if fusion is not None:
        print(fusion.summary(), flush=True)
    profile = meta.get(META_PROFILE)
    hint = f" (profile {profile}: export with --profile trt for TensorRT)" if profile and profile != "trt" and not report.passed else ""
    result = {"tensorrt": report.to_dict(), "fusion": None if fusion is None else fusion.to_dict(), "profile": profile}
    emit(args, f"TensorRT rules {'PASSED' if report.passed else 'FAILED'}: {len(report.violations)} violation(s){hint}", result)
    return 0 if report.passed else EXIT_CHECK_FAILED


main = entry("sasq-lint", _lint)
