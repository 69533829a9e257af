"""Options every command shares, declared once, and the wrapper that turns every outcome into an
exit code a script can trust. Imports the standard library and ``runtime`` only (the device
commands build on it).

Exit codes: 0 success; 1 a check that ran and failed (parity, fusion, lint); 2 a user error (a
bad argument, input file, model or environment: one line naming the problem and the fix); 3 an
internal error (one line, and where the full traceback was written; ``--debug`` prints it);
130 interrupted; 141 stdout closed by the reader (``| head``), which ends quietly. With ``--json``
every outcome ends with one JSON object on stdout, errors included: ``{"error": ..., "code": ...}``.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from runtime.errors import SasqError
from runtime.sources import DEFAULT_CALIBRATION_SPEC

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_PIPE = 130, 141
# packages only the training extra brings: a device install that lacks them gets a one-line error
TRAINING_PACKAGES = ("torch", "transformers", "datasets", "onnxscript", "gguf", "accelerate")


class UsageError(SasqError):
    """A command-line argument argparse or a range check refused."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose errors become ``UsageError`` (one line, exit code 2, JSON with ``--json``)."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see --help)")


def parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    p = _OneLineParser(prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line (errors too)")
    p.add_argument("--debug", action="store_true", help="on an internal error, print the full traceback")
    return p


# --- numbers: every numeric option is checked (finite, in range) before any work starts ---------


INT_MAX = 2**31 - 1  # every integer option's upper bound: what seeds, counts and lengths hold everywhere below


def int_at_least(low: int, high: int = INT_MAX) -> Callable[[str], int]:
    """An integer in ``[low, high]``; counts beyond what the data holds are capped where used, and said."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be at least {low}")
        if value > high:
            raise argparse.ArgumentTypeError(f"{value} must be at most {high}")
        return value

    parse.__name__ = "integer"
    return parse


def float_in(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """A finite float in ``[low, high]`` (ends excluded where ``*_open``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if not math.isfinite(value) or below or above:
            lo, hi = "(" if low_open else "[", ")" if high_open or high == math.inf else "]"
            raise argparse.ArgumentTypeError(f"{text} must be a finite number in {lo}{low:g}, {high:g}{hi}")
        return value

    parse.__name__ = "number"
    return parse


# --- shared options -------------------------------------------------------------------------------


def add_model_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--model", required=required, help="hub id, local model folder, .gguf file, or tiny-random-llama")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")


DATA_EPILOG = """data (--data SPEC): one source, or a mix W1*SOURCE1,W2*SOURCE2,... (docs/DATA.md)
  wikitext2                  WikiText-2 (the default): its validation split to calibrate and train, its
                             raw test split to evaluate; from --data-dir / $SASQ_DATA_DIR, else the hub
  FILE.txt                   your own text, the whole file (any suffix but .jsonl/.json/.parquet is text)
  FILE.jsonl[:COLUMN]        rows of a .jsonl / .json / .parquet file: COLUMN (default 'text'); a column of
                             chat 'messages' [{role, content}], or PROMPT+RESPONSE columns, is rendered
                             with the model's chat template (training commands and sasq-validate)
  FOLDER[:COLUMN]            every .txt/.jsonl/.json/.parquet file in it, in path order
  hf:NAME:CONFIG:SPLIT[:COLUMN]
                             a datasets id (or a local dataset folder), e.g.
                             hf:wikitext:wikitext-2-raw-v1:validation:text; CONFIG may be empty
                             (hf:NAME::train); SPLIT is required and may slice (train[:2000])
  self:N[:temperature=T][:top_k=K][:seed=S]
                             N windows of text sampled from the float model (calibration only; sampled
                             once, then reused from ~/.cache/sasq-edge/selfgen)
  0.5*wikitext2,0.5*self:64  a mix: each source cut into its own windows, drawn in proportion to the
                             weights (the scarcest source gives all its windows), interleaved
Documents are joined with a blank line and cut into windows of --seq-len tokens; where the tokenizer
adds a BOS token (Llama-2/3, Gemma), every window starts with it and predicts --seq-len - 1 tokens."""


def add_data_args(p: argparse.ArgumentParser, role: str = "evaluation") -> None:
    """``--data`` (read as ``role`` text: ``evaluation`` or ``calibration``), ``--data-dir``, ``--seq-len``."""
    if role == "calibration":
        default = DEFAULT_CALIBRATION_SPEC
        what = f"calibration and training text (default {default}: half WikiText-2 validation, half text sampled from the float model)"
    else:
        default, what = "wikitext2", "evaluation text (default wikitext2: its raw test split)"
    p.add_argument("--data", default=default, metavar="SPEC", help=f"{what}; see 'data' below")
    p.add_argument("--data-dir", help="folder with wiki.test.raw and wiki.valid.tokens (default: $SASQ_DATA_DIR, else the hub)")
    if role == "calibration":
        p.add_argument("--seq-len", type=int_at_least(2), default=None,
                       help="tokens per calibration and training window (default: the --recipe's)")
    else:
        p.add_argument("--seq-len", type=int_at_least(2), default=512, help="tokens per window (default 512)")


def add_runtime_args(p: argparse.ArgumentParser, windows: bool = True, provider: bool = True) -> None:
    """ONNX Runtime options (and, for commands that evaluate windows, ``--max-windows``)."""
    if windows:
        p.add_argument("--max-windows", type=int_at_least(1), default=None, help="evaluate only the first N windows")
    if provider:
        p.add_argument("--provider", default="cpu", help="ONNX Runtime execution providers, comma separated: cpu, cuda, tensorrt")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="ONNX Runtime intra-op threads (default: all cores)")


def providers(args: argparse.Namespace) -> list[str]:
    return [s.strip() for s in args.provider.split(",") if s.strip()]


def data_spec(text: str):
    """``--data`` parsed (``runtime.sources.parse_data_spec``): a bad spec fails before any work."""
    from runtime.sources import parse_data_spec

    return parse_data_spec(text)


def eval_windows(args: argparse.Namespace, onnx_path: Path, tokenizer, tokenizer_config: dict | None = None):
    """The evaluation windows (a ``runtime.sources.WindowSet``) of ``--data`` for the model at
    ``onnx_path``, with the folder's ``tokenizers.Tokenizer``: the device side (plain text, files,
    hub ids; no chat template, no sampling)."""
    from runtime.data import bos_id, check_context
    from runtime.folder import max_positions
    from runtime.sources import EVALUATION, load_windows

    check_context(args.seq_len, max_positions(onnx_path))
    return load_windows(args.data, tokenizer, args.seq_len, EVALUATION, bos=bos_id(tokenizer, tokenizer_config),
                        data_dir=args.data_dir, max_windows=args.max_windows)


def emit(args: argparse.Namespace, summary: str, result: dict) -> None:
    print(summary, flush=True)
    if args.json:
        print(json.dumps(result), flush=True)


# --- outcomes ---------------------------------------------------------------------------------------

_OS_FIXES = {
    errno.ENOSPC: "no space left on the device: free some space or write elsewhere",
    errno.EDQUOT: "disk quota exceeded: free some space or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.EACCES: "permission denied: check the permissions, or write elsewhere",
    errno.EPERM: "operation not permitted: check the permissions, or write elsewhere",
    errno.ENAMETOOLONG: "a name in the path is too long (255 bytes at most per name): use a shorter path",
    errno.EISDIR: "it is a folder, not a file: pass a file path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: fix the path",
    errno.ENOENT: "no such file or folder: check the path",
    errno.EEXIST: "it already exists: remove it or choose another path",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
    errno.EFBIG: "the file is too large for this file system or the file size limit (ulimit -f): write elsewhere",
}


def os_error_message(e: OSError) -> str | None:
    """One line for an OSError that the environment caused (full disk, permissions, bad paths),
    or None for one that is ours to explain."""
    fix = _OS_FIXES.get(e.errno)
    if fix is None:
        return None
    where = f" {e.filename}" if e.filename else ""
    return f"cannot write or read{where}: {fix}"


def _log_traceback(prog: str) -> Path | None:
    text = traceback.format_exc()
    for base in (Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sasq-edge" / "logs",
                 Path(tempfile.gettempdir())):
        try:
            base.mkdir(parents=True, exist_ok=True)
            path = base / f"{prog}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:
            continue
    return None


def _quiet_stdout() -> None:
    """After the reader closed stdout: point it at /dev/null so the interpreter's final flush is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def entry(prog: str, body: Callable[[list[str]], int]) -> Callable[[list[str] | None], int]:
    """Wrap a command so that every outcome has its exit code and, with ``--json``, a JSON line."""

    def main(argv: list[str] | None = None) -> int:
        argv = list(sys.argv[1:] if argv is None else argv)
        as_json, debug = "--json" in argv, "--debug" in argv

        def fail(code: int, message: str) -> int:
            try:
                print(f"{prog}: {'error' if code != EXIT_INTERNAL else 'internal error'}: {message}", file=sys.stderr, flush=True)
                if as_json:
                    print(json.dumps({"error": message, "code": code}), flush=True)
            except BrokenPipeError:
                _quiet_stdout()
            return code

        try:
            return body(argv)
        except BrokenPipeError:
            _quiet_stdout()
            return EXIT_PIPE
        except SasqError as e:
            return fail(EXIT_USAGE, str(e))
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] not in TRAINING_PACKAGES:
                return _internal(prog, e, debug, fail)
            return fail(EXIT_USAGE, f"{prog} needs {e.name}, which this install lacks: pip install 'sasq-edge[train]' "
                                    "(the device install runs sasq-ppl, sasq-generate and sasq-lint)")
        except KeyboardInterrupt:
            return fail(EXIT_INTERRUPTED, "interrupted")
        except MemoryError:
            return fail(EXIT_USAGE, "out of memory: use a shorter --seq-len or fewer windows, or a machine with more memory")
        except OSError as e:
            message = os_error_message(e)
            return fail(EXIT_USAGE, message) if message else _internal(prog, e, debug, fail)
        except Exception as e:  # a bug: say so in one line, keep the traceback
            return _internal(prog, e, debug, fail)

    main.__name__ = prog.replace("-", "_")
    return main


def _internal(prog: str, e: BaseException, debug: bool, fail: Callable[[int, str], int]) -> int:
    if debug:
        traceback.print_exc()
    path = _log_traceback(prog)
    first = (str(e).strip().splitlines() or [""])[0][:300]
    where = f"full traceback in {path}" if path else "the traceback could not be written"
    return fail(EXIT_INTERNAL, f"{type(e).__name__}: {first} ({where}; --debug prints it); please report it")
