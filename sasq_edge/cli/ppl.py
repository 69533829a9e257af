"""sasq-ppl: perplexity of an exported folder on ONNX Runtime. A device command: runtime only."""

from __future__ import annotations

from pathlib import Path

from sasq_edge.cli.common import (
    DATA_EPILOG,
    add_data_args,
    add_runtime_args,
    data_spec,
    emit,
    entry,
    eval_windows,
    parser,
    providers,
)


def _ppl(argv: list[str] | None) -> int:
    p = parser("sasq-ppl", "Perplexity of an ONNX causal LM on ONNX Runtime (quantized or float), on WikiText-2 test "
               "or the text --data names.", epilog=DATA_EPILOG)
    p.add_argument("onnx", help="model.onnx (its folder should hold tokenizer.json)")
    p.add_argument("--tokenizer", help="tokenizer folder, tokenizer.json or hub id, when none lies beside the model")
    add_data_args(p)
    add_runtime_args(p)
    args = p.parse_args(argv)
    from runtime.folder import load_tokenizer, tokenizer_config
    from runtime.perplexity import perplexity
    from runtime.session import open_session

    data_spec(args.data)  # a bad spec fails before the model loads
    path = Path(args.onnx)
    sess = open_session(path, providers(args), args.threads)  # fails fast on a bad file or provider
    data = eval_windows(args, path, load_tokenizer(path.parent, args.tokenizer), tokenizer_config(path.parent, args.tokenizer))
    res = perplexity(sess, data.windows, bos=data.bos is not None)
    bos = ", windows start with BOS" if res.bos else ""
    kind = f"INT8 model, profile {sess.profile}" if sess.profile else "float model"
    emit(args, f"perplexity {res.ppl:.4f} over {res.windows} windows of {res.seq_len} tokens "
         f"({res.tokens} predicted tokens{bos}) on {res.provider} ({kind}); data: {data.text}",
         {**res.to_dict(), "profile": sess.profile, "data": data.record})
    return 0


main = entry("sasq-ppl", _ppl)
