"""sasq-generate: stream text from an exported folder on ONNX Runtime. A device command: runtime only."""

from __future__ import annotations

from pathlib import Path

from sasq_edge.cli.common import add_runtime_args, emit, entry, float_in, int_at_least, parser, providers


def _generate(argv: list[str] | None) -> int:
    p = parser("sasq-generate", "Generate text with an exported model on ONNX Runtime, streaming tokens as they come.")
    p.add_argument("onnx", help="model.onnx written by sasq-export (its folder holds tokenizer.json and config.json)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=64)
    p.add_argument("--greedy", action="store_true", help="always take the most likely token (same as --temperature 0)")
    p.add_argument("--temperature", type=float_in(0), default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-k", type=int_at_least(0), default=0, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float_in(0, 1, low_open=True), default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="sampling seed (same seed, same tokens)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    add_runtime_args(p, windows=False)
    args = p.parse_args(argv)
    from runtime.folder import eos_ids, load_tokenizer, max_positions
    from runtime.generate import GenerationStats, Sampling, TextStream, stream
    from runtime.session import open_session

    path = Path(args.onnx)
    sess = open_session(path, providers(args), args.threads)
    tok = load_tokenizer(path.parent)
    stop = () if args.ignore_eos else eos_ids(path)
    sampling = Sampling(args.max_new_tokens, 0.0 if args.greedy else args.temperature, args.top_k, args.top_p, args.seed, stop)
    prompt = tok.encode(args.prompt).ids
    stats, new = GenerationStats(), []
    pieces = TextStream(tok.decode)  # constant work per token, whatever the length so far
    for token in stream(sess, prompt, sampling, max_positions(path), stats):
        new.append(token)
        piece = pieces.push(token)
        if piece and not args.json:
            print(piece, end="", flush=True)
    rest = pieces.flush()
    if not args.json:
        print(rest, flush=True)
    text = tok.decode(new)
    result = {"prompt": args.prompt, "text": text, "tokens": new, **stats.to_dict()}
    emit(args, f"{stats.new_tokens} new tokens ({stats.stopped}); prefill {stats.prompt_tokens} tokens in "
         f"{1000 * stats.prefill_s:.0f} ms, decode {stats.decode_tokens_per_s:.1f} tokens/s on {sess.providers[0]}", result)
    return 0


main = entry("sasq-generate", _generate)
