"""Command-line layer: the only place that composes ``sasq_edge``, ``exporters`` and ``runtime``.

Every command has ``--help`` and ``--json`` (the last line printed is one JSON object). A user
error prints one line ``<command>: error: <what and how to fix>`` and exits 2; a failed parity
check exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from sasq_edge.config import CALIBRATIONS, PROFILES, TRUNCATIONS, QuantConfig
from sasq_edge.errors import SasqError

EXIT_USAGE, EXIT_PARITY = 2, 1


class _OneLineParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = _OneLineParser(prog=prog, description=description)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="folder with wiki.test.raw and wiki.valid.tokens (default: $SASQ_DATA_DIR, else the hub)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")


def _add_model_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--model", required=required, help="hub id, local model folder, .gguf file, or tiny-random-llama")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    d = QuantConfig()
    p.add_argument("--profile", default=d.profile, help=f"deploy profile: {', '.join(PROFILES)} (default {d.profile})")
    p.add_argument("--calibration", default=d.calibration, help=f"scale initialiser: {', '.join(CALIBRATIONS)}")
    p.add_argument("--percentile", type=float, default=d.percentile, help="percentile for --calibration percentile")
    p.add_argument("--calib-batches", type=int, default=d.calib_batches, help="calibration windows (default %(default)s)")
    p.add_argument("--truncation", default=d.truncation, help=f"outlier truncation: {', '.join(TRUNCATIONS)}")
    p.add_argument("--train-steps", type=int, default=d.train_steps, help="scale-training steps, 0 = PTQ only")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate on log-scales (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per training step")
    p.add_argument("--seed", type=int, default=d.seed)


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--provider", default="cpu", help="ONNX Runtime execution providers, comma separated: cpu, cuda, tensorrt")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")


def _config(args: argparse.Namespace) -> QuantConfig:
    return QuantConfig(
        profile=args.profile,
        calibration=args.calibration,
        percentile=args.percentile,
        calib_batches=args.calib_batches,
        truncation=args.truncation,
        train_steps=args.train_steps,
        lr=args.lr,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        seed=args.seed,
    )


def _emit(args: argparse.Namespace, summary: str, result: dict) -> None:
    print(summary, flush=True)
    if args.json:
        print(json.dumps(result), flush=True)


def _entry(prog: str, body: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Wrap a command: user errors become one line on stderr and exit code 2."""

    def main(argv: list[str] | None = None) -> int:
        from runtime.session import RuntimeSetupError

        try:
            return body(argv)
        except (SasqError, RuntimeSetupError) as e:
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130

    main.__name__ = prog.replace("-", "_")
    return main


# --- sasq-train --------------------------------------------------------------------------------


def _train(argv: list[str] | None) -> int:
    p = _parser("sasq-train", "Calibrate and train the activation scales of a model; write scales.safetensors + recipe.json.")
    p.add_argument("run_dir", help="output folder for the scale state")
    _add_model_args(p, required=True)
    _add_data_args(p)
    _add_train_args(p)
    args = p.parse_args(argv)
    from sasq_edge.models import load_model
    from sasq_edge.pipeline import run_sasq

    config = _config(args)
    lm = load_model(args.model, trust_remote_code=args.trust_remote_code)
    state, report = run_sasq(lm, config, args.data_dir)
    state.save(args.run_dir)
    result = {"run_dir": str(args.run_dir), "profile": config.profile, "modules": len(state.scales), **report.summary()}
    _emit(args, f"trained {len(state.scales)} activation scales in {report.steps} steps "
          f"({report.tokens} tokens, {report.wall_s:.1f} s) -> {args.run_dir}", result)
    return 0


# --- sasq-export -------------------------------------------------------------------------------


def _export(argv: list[str] | None) -> int:
    p = _parser("sasq-export", "Export a static INT8 QDQ ONNX model (calibrating and training first unless --scales is given).")
    p.add_argument("onnx", help="output path, e.g. out/model.onnx; the folder also gets config, tokenizer and scales")
    _add_model_args(p, required=True)
    p.add_argument("--scales", help="folder written by sasq-train (skip calibration and training)")
    p.add_argument("--float", action="store_true", help="export the unquantized float model (reference)")
    _add_data_args(p)
    _add_train_args(p)
    args = p.parse_args(argv)
    from exporters import export_onnx
    from sasq_edge.models import load_model
    from sasq_edge.pipeline import run_sasq
    from sasq_edge.state import ScaleState

    if args.float and args.scales:
        raise SasqError("--float exports the unquantized model: drop --scales, or drop --float")
    if not str(args.onnx).endswith(".onnx"):
        raise SasqError(f"output {args.onnx} must end in .onnx, e.g. out/model.onnx")
    state = ScaleState.load(args.scales) if args.scales else None  # fail on a bad folder before loading the model
    lm = load_model(args.model, trust_remote_code=args.trust_remote_code)
    if state is not None:
        state.apply(lm.model)
    elif not args.float:
        state, _ = run_sasq(lm, _config(args), args.data_dir)
    res = export_onnx(lm.model, args.onnx, state=state, tokenizer=lm.tokenizer)
    d = res.to_dict()
    _emit(args, f"wrote {res.onnx} ({res.bytes / 1e6:.1f} MB, profile {res.profile or 'float'}, "
          f"{d['quantize_linear']} QuantizeLinear, {d['dequantize_linear']} DequantizeLinear)", d)
    return 0


# --- sasq-ppl ----------------------------------------------------------------------------------


def _folder_context(onnx_path: Path) -> int | None:
    cfg = onnx_path.parent / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text()).get("max_position_embeddings")
    except json.JSONDecodeError:
        raise SasqError(f"{cfg} is not valid JSON: re-export the folder with sasq-export") from None


def _load_tokenizer(folder: Path, override: str | None):
    from transformers import AutoTokenizer

    src = override or str(folder)
    if override is None and not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise SasqError(f"no tokenizer files beside the model in {folder}: pass --tokenizer MODEL_OR_FOLDER")
    try:
        return AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise SasqError(f"could not load a tokenizer from {src}: {str(e).splitlines()[0]}") from None


def _eval_windows(args: argparse.Namespace, onnx_path: Path, tokenizer):
    from sasq_edge.data import check_context, load_text, make_windows, tokenize

    check_context(args.seq_len, _folder_context(onnx_path))
    tokens = tokenize(load_text("test", args.data_dir), tokenizer)
    return make_windows(tokens, args.seq_len, args.max_windows)


def _providers(args: argparse.Namespace) -> list[str]:
    return [s.strip() for s in args.provider.split(",") if s.strip()]


def _ppl(argv: list[str] | None) -> int:
    p = _parser("sasq-ppl", "WikiText-2 test perplexity of an ONNX causal LM on ONNX Runtime (quantized or float).")
    p.add_argument("onnx", help="model.onnx (its folder should hold the tokenizer files)")
    p.add_argument("--tokenizer", help="tokenizer folder or hub id, when none lies beside the model")
    _add_data_args(p)
    _add_runtime_args(p)
    args = p.parse_args(argv)
    from runtime import open_session, perplexity

    path = Path(args.onnx)
    sess = open_session(path, _providers(args), args.threads)  # fails fast on a bad file or provider
    windows = _eval_windows(args, path, _load_tokenizer(path.parent, args.tokenizer))
    res = perplexity(sess, windows)
    _emit(args, f"perplexity {res.ppl:.4f} over {res.windows} windows of {res.seq_len} tokens "
          f"({res.tokens} predicted tokens) on {res.provider}", res.to_dict())
    return 0


# --- sasq-validate -----------------------------------------------------------------------------


def _validate(argv: list[str] | None) -> int:
    p = _parser("sasq-validate", "Parity of an exported model with the PyTorch fake-quant model rebuilt from its folder's recipe.")
    p.add_argument("onnx", help="model.onnx written by sasq-export (its folder holds recipe.json and scales)")
    p.add_argument("--model", help="load the float model from here instead of the source named in recipe.json")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--rel-tol", type=float, default=0.005, help="max relative perplexity difference (default 0.5%%)")
    p.add_argument("--min-top1", type=float, default=0.99, help="min top-1 token agreement (default 0.99)")
    _add_data_args(p)
    _add_runtime_args(p)
    args = p.parse_args(argv)
    from runtime import open_session
    from runtime.parity import compare
    from runtime.perplexity import iter_logits as onnx_logits
    from sasq_edge.evaluate import iter_logits
    from sasq_edge.models import load_model
    from sasq_edge.state import ScaleState

    path = Path(args.onnx)
    sess = open_session(path, _providers(args), args.threads)
    if sess.profile is None:
        raise SasqError(f"{path} carries no sasq deploy profile (a float or foreign model): validate models written by sasq-export")
    state = ScaleState.load(path.parent)
    lm = load_model(args.model or state.model_source, trust_remote_code=args.trust_remote_code)
    state.apply(lm.model)
    windows = _eval_windows(args, path, lm.tokenizer)
    rep = compare(windows, iter_logits(lm.model, windows), onnx_logits(sess, windows)).report(args.rel_tol, args.min_top1)
    verdict = "PASSED" if rep.passed else "FAILED"
    _emit(args, f"parity {verdict}: ppl torch {rep.ppl_torch:.4f}, onnx {rep.ppl_onnx:.4f} "
          f"(rel diff {rep.rel_diff:.2e}, tol {rep.rel_tol}), top-1 agreement {rep.top1_agreement:.4f}, "
          f"max |logit diff| {rep.max_abs_logit_diff:.3g} over {rep.windows} windows", rep.to_dict())
    return 0 if rep.passed else EXIT_PARITY


train_main = _entry("sasq-train", _train)
export_main = _entry("sasq-export", _export)
ppl_main = _entry("sasq-ppl", _ppl)
validate_main = _entry("sasq-validate", _validate)
