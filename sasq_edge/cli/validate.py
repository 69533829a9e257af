"""sasq-validate: the fusion check, then parity of an export with the PyTorch fake-quant model
rebuilt from its folder's scale state."""

from __future__ import annotations

from pathlib import Path

from runtime.errors import RuntimeSetupError
from sasq_edge.cli.common import (
    DATA_EPILOG,
    EXIT_CHECK_FAILED,
    add_data_args,
    add_runtime_args,
    data_spec,
    emit,
    entry,
    float_in,
    parser,
    providers,
)


def _validate(argv: list[str] | None) -> int:
    p = parser("sasq-validate", "Parity of an exported model with the PyTorch fake-quant model rebuilt from its folder's recipe.",
               epilog=DATA_EPILOG)
    p.add_argument("onnx", help="model.onnx written by sasq-export (its folder holds recipe.json and scales)")
    p.add_argument("--model", help="load the float model from here instead of the source named in recipe.json")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--rel-tol", type=float_in(0), default=0.005, help="max relative perplexity difference (default 0.5%%)")
    p.add_argument("--min-top1", type=float_in(0, 1), default=0.99, help="min top-1 token agreement (default 0.99)")
    p.add_argument("--no-fusion-check", action="store_true",
                   help="skip the check that ONNX Runtime's CPU graph runs every quantized layer as an integer kernel")
    add_data_args(p)
    add_runtime_args(p)
    args = p.parse_args(argv)
    from runtime.data import check_context
    from runtime.folder import max_positions
    from runtime.fusion import check_fusion
    from runtime.parity import compare
    from runtime.perplexity import iter_logits as onnx_logits
    from runtime.session import open_session
    from runtime.sources import EVALUATION
    from runtime.state import ScaleState
    from sasq_edge.data import load_windows
    from sasq_edge.evaluate import iter_logits
    from sasq_edge.models import load_model
    from sasq_edge.state import apply_state

    data_spec(args.data)  # a bad spec fails before any model loads
    path = Path(args.onnx)
    sess = open_session(path, providers(args), args.threads)
    if sess.profile is None:
        raise RuntimeSetupError(f"{path} carries no sasq deploy profile (a float or foreign model): validate models written by sasq-export")
    fusion = None if args.no_fusion_check else check_fusion(path)
    if fusion is not None:
        print(fusion.summary(), flush=True)
    state = ScaleState.load(path.parent)
    lm = load_model(args.model or state.model_source, trust_remote_code=args.trust_remote_code)
    apply_state(lm.model, state)
    check_context(args.seq_len, max_positions(path))
    data = load_windows(lm, args.data, args.seq_len, EVALUATION, data_dir=args.data_dir, max_windows=args.max_windows)
    windows = data.windows  # the same windows, built once with the model's own tokenizer, feed both sides
    rep = compare(windows, iter_logits(lm.model, windows), onnx_logits(sess, windows)).report(args.rel_tol, args.min_top1)
    passed = rep.passed and (fusion is None or fusion.passed)
    verdict = "PASSED" if rep.passed else "FAILED"
    result = {**rep.to_dict(), "bos": data.bos is not None, "data": data.record,
              "fusion": None if fusion is None else fusion.to_dict(), "passed": passed}
    emit(args, f"parity {verdict}: ppl torch {rep.ppl_torch:.4f}, onnx {rep.ppl_onnx:.4f} "
         f"(rel diff {rep.rel_diff:.2e}, tol {rep.rel_tol}), top-1 agreement {rep.top1_agreement:.4f}, "
         f"max |logit diff| {rep.max_abs_logit_diff:.3g} over {rep.windows} windows"
         + (", BOS first" if data.bos is not None else "")
         + ("" if fusion is None else f"; fusion {'PASSED' if fusion.passed else 'FAILED'}"), result)
    return 0 if passed else EXIT_CHECK_FAILED


main = entry("sasq-validate", _validate)
