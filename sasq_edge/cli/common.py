"""Options every command shares, declared once, and the wrapper that turns errors into one line.
Imports the standard library and ``runtime`` only (the device commands build on it)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from runtime.errors import SasqError

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE = 0, 1, 2
# packages only the training extra brings: a device install that lacks them gets a one-line error
TRAINING_PACKAGES = ("torch", "transformers", "datasets", "onnxscript", "gguf")


class _OneLineParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    p = _OneLineParser(prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p


def add_model_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--model", required=required, help="hub id, local model folder, .gguf file, or tiny-random-llama")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="folder with wiki.test.raw and wiki.valid.tokens (default: $SASQ_DATA_DIR, else the hub)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")


def add_runtime_args(p: argparse.ArgumentParser, windows: bool = True, provider: bool = True) -> None:
    """ONNX Runtime options (and, for commands that evaluate windows, ``--max-windows``)."""
    if windows:
        p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    if provider:
        p.add_argument("--provider", default="cpu", help="ONNX Runtime execution providers, comma separated: cpu, cuda, tensorrt")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")


def providers(args: argparse.Namespace) -> list[str]:
    return [s.strip() for s in args.provider.split(",") if s.strip()]


def eval_windows(args: argparse.Namespace, onnx_path: Path, tokenizer):
    """The evaluation windows of the perplexity protocol for the model at ``onnx_path``."""
    from runtime.data import check_context, load_text, make_windows, tokenize
    from runtime.folder import max_positions

    check_context(args.seq_len, max_positions(onnx_path))
    tokens = tokenize(load_text("test", args.data_dir), tokenizer)
    return make_windows(tokens, args.seq_len, args.max_windows)


def emit(args: argparse.Namespace, summary: str, result: dict) -> None:
    print(summary, flush=True)
    if args.json:
        print(json.dumps(result), flush=True)


def entry(prog: str, body: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Wrap a command: user errors become one line on stderr and exit code 2."""

    def main(argv: list[str] | None = None) -> int:
        try:
            return body(argv)
        except SasqError as e:
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
            return EXIT_USAGE
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] not in TRAINING_PACKAGES:
                raise
            print(f"{prog}: error: {prog} needs {e.name}, which this install lacks: pip install 'sasq-edge[train]' "
                  "(the device install runs sasq-ppl, sasq-generate and sasq-lint)", file=sys.stderr, flush=True)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130

    main.__name__ = prog.replace("-", "_")
    return main
