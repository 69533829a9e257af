"""sasq-ppl: perplexity of an exported folder on ONNX Runtime. A device command: runtime only."""

from __future__ import annotations

from pathlib import Path

from sasq_edge.cli.common import add_data_args, add_runtime_args, emit, entry, eval_windows, parser, providers


def _ppl(argv: list[str] | None) -> int:
    p = parser("sasq-ppl", "WikiText-2 test perplexity of an ONNX causal LM on ONNX Runtime (quantized or float).")
    p.add_argument("onnx", help="model.onnx (its folder should hold tokenizer.json)")
    p.add_argument("--tokenizer", help="tokenizer folder, tokenizer.json or hub id, when none lies beside the model")
    add_data_args(p)
    add_runtime_args(p)
    args = p.parse_args(argv)
    from runtime.folder import load_tokenizer
    from runtime.perplexity import perplexity
    from runtime.session import open_session

    path = Path(args.onnx)
    sess = open_session(path, providers(args), args.threads)  # fails fast on a bad file or provider
    windows = eval_windows(args, path, load_tokenizer(path.parent, args.tokenizer))
    res = perplexity(sess, windows)
    emit(args, f"perplexity {res.ppl:.4f} over {res.windows} windows of {res.seq_len} tokens "
         f"({res.tokens} predicted tokens) on {res.provider}", res.to_dict())
    return 0


main = entry("sasq-ppl", _ppl)
