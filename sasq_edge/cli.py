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

from sasq_edge.config import CALIBRATIONS, LR_SCHEDULES, PROFILES, TRUNCATIONS, QuantConfig, resolve_profile
from sasq_edge.errors import SasqError

EXIT_USAGE, EXIT_PARITY = 2, 1


class _OneLineParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    p = _OneLineParser(prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--profile", default=None,
                   help=f"deploy profile: {', '.join(PROFILES)}, or auto to pick from this CPU (default {d.profile})")
    p.add_argument("--calibration", default=d.calibration, help=f"scale initialiser: {', '.join(CALIBRATIONS)}")
    p.add_argument("--percentile", type=float, default=d.percentile, help="percentile for --calibration percentile")
    p.add_argument("--calib-batches", type=int, default=d.calib_batches, help="calibration windows (default %(default)s)")
    p.add_argument("--truncation", default=d.truncation, help=f"outlier truncation: {', '.join(TRUNCATIONS)}")
    p.add_argument("--train-steps", type=int, default=d.train_steps, help="scale-training steps, 0 = PTQ only")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate on log-scales (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per training step")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--int8-lm-head", action="store_true", help="quantize the output head too (INT8 weight, trained activation scale)")
    p.add_argument("--int8-embedding", action="store_true", help="store the embedding table as weight-only per-row INT8")
    p.add_argument("--smooth-alpha", default=None,
                   help="fold SmoothQuant per-channel factors with this strength (0..1) into the preceding RMSNorm / "
                        "linear before quantizing; 'auto' searches it on held-out validation windows (default: off)")
    p.add_argument("--smooth-learn", action="store_true", help="train the smoothing factors too (needs --smooth-alpha)")
    p.add_argument("--lr-schedule", default=d.lr_schedule, help=f"learning-rate schedule: {', '.join(LR_SCHEDULES)}")
    p.add_argument("--device", default="cpu", help="torch device for calibration and training: cpu or cuda (default cpu)")


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--provider", default="cpu", help="ONNX Runtime execution providers, comma separated: cpu, cuda, tensorrt")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")


def _profile(args: argparse.Namespace) -> str:
    """The profile asked for (``auto`` resolved and announced on stderr), or the default."""
    if args.profile is None:
        return QuantConfig().profile
    name, reason = resolve_profile(args.profile)
    if reason is not None:
        print(f"profile auto -> {name} ({reason})", file=sys.stderr, flush=True)
    return name


def _config(args: argparse.Namespace) -> QuantConfig:
    return QuantConfig(
        profile=_profile(args),
        calibration=args.calibration,
        percentile=args.percentile,
        calib_batches=args.calib_batches,
        truncation=args.truncation,
        train_steps=args.train_steps,
        lr=args.lr,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        seed=args.seed,
        lm_head=args.int8_lm_head,
        embedding="int8" if args.int8_embedding else "float",
        smooth_alpha=_smooth_alpha(args.smooth_alpha),
        smooth_learn=args.smooth_learn,
        lr_schedule=args.lr_schedule,
    )


AUTO_ALPHA = 0.5  # placeholder while --smooth-alpha auto is searched (see _run_sasq)
SELECT_WINDOWS = 4  # held-out validation windows that pick alpha for --smooth-alpha auto


def _smooth_alpha(value: str | None) -> float | None:
    if value is None:
        return None
    if value == "auto":
        return AUTO_ALPHA
    try:
        return float(value)
    except ValueError:
        raise SasqError(f"--smooth-alpha {value!r} must be a number in [0, 1] or auto") from None


def _device(args: argparse.Namespace):
    """``--device`` as a torch device that exists here (one-line error otherwise)."""
    import torch

    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise SasqError(f"--device {args.device!r}: {e}; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SasqError("--device cuda, but torch sees no CUDA GPU: use --device cpu")
    return device


def _hold_out(windows, config: QuantConfig):
    """(training windows, the last SELECT_WINDOWS held out to pick SmoothQuant's alpha)."""
    if windows.shape[0] <= SELECT_WINDOWS:
        raise SasqError(f"the alpha search holds out {SELECT_WINDOWS} validation windows, the text has only "
                        f"{windows.shape[0]} of {config.seq_len} tokens: pass --smooth-alpha A or a shorter --seq-len")
    return windows[:-SELECT_WINDOWS], windows[-SELECT_WINDOWS:]


def _run_sasq(lm, args: argparse.Namespace, config: QuantConfig):
    """run_sasq on ``args.device``; with ``--smooth-alpha auto`` the last validation windows are
    held out of training and pick SmoothQuant's alpha first."""
    import dataclasses

    from sasq_edge.pipeline import run_sasq, training_windows

    lm.model.to(_device(args))
    windows = training_windows(lm, config, args.data_dir)
    if args.smooth_alpha == "auto":
        from sasq_edge.baselines import search_smooth_alpha
        from sasq_edge.data import sample_windows

        windows, select = _hold_out(windows, config)
        calib = sample_windows(windows, config.calib_batches, config.seed)
        alpha, tried = search_smooth_alpha(lm.model, dataclasses.replace(config, train_steps=0, smooth_learn=False),
                                           calib, select)
        print(f"smooth alpha auto -> {alpha} (validation PPL {tried[alpha]:.3f})", file=sys.stderr, flush=True)
        config = dataclasses.replace(config, smooth_alpha=alpha)
    state, report = run_sasq(lm, config, args.data_dir, windows=windows)
    lm.model.to("cpu")
    return state, report


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

    config = _config(args)
    lm = load_model(args.model, trust_remote_code=args.trust_remote_code)
    state, report = _run_sasq(lm, args, config)
    state.save(args.run_dir)
    result = {"run_dir": str(args.run_dir), "profile": config.profile, "modules": len(state.scales), **report.summary()}
    factors = sum(v.numel() for v in state.smooth.values())
    what = f"{len(state.scales)} activation scales"
    if factors:
        what += f" and {factors} smoothing factors" if state.config.smooth_learn else f" ({factors} smoothing factors folded)"
    _emit(args, f"trained {what} in {report.steps} steps ({report.tokens} tokens, {report.wall_s:.1f} s) -> {args.run_dir}",
          {**result, "smoothing_factors": factors, "smooth_alpha": state.config.smooth_alpha})
    return 0


# --- sasq-export -------------------------------------------------------------------------------


def _export(argv: list[str] | None) -> int:
    p = _parser("sasq-export", "Export a static INT8 QDQ ONNX model (calibrating and training first unless --scales is given).")
    p.add_argument("onnx", help="output path, e.g. out/model.onnx; the folder also gets config, tokenizer and scales")
    _add_model_args(p, required=True)
    p.add_argument("--scales", help="folder written by sasq-train (skip calibration and training)")
    p.add_argument("--float", action="store_true", help="export the unquantized float model (reference)")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="export (input_ids, attention_mask) -> logits only, without past_key_values inputs and present outputs")
    _add_data_args(p)
    _add_train_args(p)
    args = p.parse_args(argv)
    from exporters import export_onnx
    from sasq_edge.models import load_model
    from sasq_edge.state import ScaleState

    if args.float and args.scales:
        raise SasqError("--float exports the unquantized model: drop --scales, or drop --float")
    if not str(args.onnx).endswith(".onnx"):
        raise SasqError(f"output {args.onnx} must end in .onnx, e.g. out/model.onnx")
    state = ScaleState.load(args.scales) if args.scales else None  # fail on a bad folder before loading the model
    if state is not None and args.profile is not None:
        state = state.with_profile(_profile(args))
    lm = load_model(args.model, trust_remote_code=args.trust_remote_code)
    if state is not None:
        state.apply(lm.model)
    elif not args.float:
        state, _ = _run_sasq(lm, args, _config(args))
    res = export_onnx(lm.model, args.onnx, state=state, tokenizer=lm.tokenizer, kv_cache=not args.no_kv_cache)
    d = res.to_dict()
    _emit(args, f"wrote {res.onnx} ({res.bytes / 1e6:.1f} MB, profile {res.profile or 'float'}, "
          f"{d['quantize_linear']} QuantizeLinear, {d['dequantize_linear']} DequantizeLinear)", d)
    return 0


# --- sasq-ppl ----------------------------------------------------------------------------------


def _folder_context(onnx_path: Path) -> int | None:
    return _folder_config(onnx_path).get("max_position_embeddings")


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
    p.add_argument("--no-fusion-check", action="store_true",
                   help="skip the check that ONNX Runtime's CPU graph runs every quantized layer as an integer kernel")
    _add_data_args(p)
    _add_runtime_args(p)
    args = p.parse_args(argv)
    from runtime import open_session
    from runtime.fusion import check_fusion
    from runtime.parity import compare
    from runtime.perplexity import iter_logits as onnx_logits
    from sasq_edge.evaluate import iter_logits
    from sasq_edge.models import load_model
    from sasq_edge.state import ScaleState

    path = Path(args.onnx)
    sess = open_session(path, _providers(args), args.threads)
    if sess.profile is None:
        raise SasqError(f"{path} carries no sasq deploy profile (a float or foreign model): validate models written by sasq-export")
    fusion = None if args.no_fusion_check else check_fusion(path)
    if fusion is not None:
        print(fusion.summary(), flush=True)
    state = ScaleState.load(path.parent)
    lm = load_model(args.model or state.model_source, trust_remote_code=args.trust_remote_code)
    state.apply(lm.model)
    windows = _eval_windows(args, path, lm.tokenizer)
    rep = compare(windows, iter_logits(lm.model, windows), onnx_logits(sess, windows)).report(args.rel_tol, args.min_top1)
    passed = rep.passed and (fusion is None or fusion.passed)
    verdict = "PASSED" if rep.passed else "FAILED"
    result = {**rep.to_dict(), "fusion": None if fusion is None else fusion.to_dict(), "passed": passed}
    _emit(args, f"parity {verdict}: ppl torch {rep.ppl_torch:.4f}, onnx {rep.ppl_onnx:.4f} "
          f"(rel diff {rep.rel_diff:.2e}, tol {rep.rel_tol}), top-1 agreement {rep.top1_agreement:.4f}, "
          f"max |logit diff| {rep.max_abs_logit_diff:.3g} over {rep.windows} windows"
          + ("" if fusion is None else f"; fusion {'PASSED' if fusion.passed else 'FAILED'}"), result)
    return 0 if passed else EXIT_PARITY


# --- sasq-generate -----------------------------------------------------------------------------


def _generate(argv: list[str] | None) -> int:
    p = _parser("sasq-generate", "Generate text with an exported model on ONNX Runtime, streaming tokens as they come.")
    p.add_argument("onnx", help="model.onnx written by sasq-export (its folder holds tokenizer.json and config.json)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="always take the most likely token (same as --temperature 0)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same tokens)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--provider", default="cpu", help="ONNX Runtime execution providers, comma separated: cpu, cuda, tensorrt")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    args = p.parse_args(argv)
    from runtime import open_session
    from runtime.generate import GenerationStats, Sampling, stream

    path = Path(args.onnx)
    sess = open_session(path, _providers(args), args.threads)
    tok = _runtime_tokenizer(path.parent)
    cfg = _folder_config(path)
    stop = () if args.ignore_eos else _eos_ids(path.parent, cfg)
    sampling = Sampling(args.max_new_tokens, 0.0 if args.greedy else args.temperature, args.top_k, args.top_p, args.seed, stop)
    prompt = tok.encode(args.prompt).ids
    stats, new = GenerationStats(), []
    shown = ""
    for token in stream(sess, prompt, sampling, cfg.get("max_position_embeddings"), stats):
        new.append(token)
        text = tok.decode(new)
        if not args.json and not text.endswith("\ufffd"):  # wait for a whole UTF-8 character
            print(text[len(shown):], end="", flush=True)
            shown = text
    text = tok.decode(new)
    if not args.json:
        print(text[len(shown):], flush=True)
    result = {"prompt": args.prompt, "text": text, "tokens": new, **stats.to_dict()}
    _emit(args, f"{stats.new_tokens} new tokens ({stats.stopped}); prefill {stats.prompt_tokens} tokens in "
          f"{1000 * stats.prefill_s:.0f} ms, decode {stats.decode_tokens_per_s:.1f} tokens/s on {sess.providers[0]}", result)
    return 0


def _folder_config(onnx_path: Path) -> dict:
    cfg = onnx_path.parent / "config.json"
    if not cfg.is_file():
        return {}
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError:
        raise SasqError(f"{cfg} is not valid JSON: re-export the folder with sasq-export") from None


def _runtime_tokenizer(folder: Path):
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise SasqError(f"no tokenizer.json beside the model in {folder}: re-export the folder with sasq-export")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise SasqError(f"{path} is not a readable tokenizer ({str(e).splitlines()[0][:200]}): re-export the folder") from None


def _eos_ids(folder: Path, cfg: dict) -> tuple[int, ...]:
    ids = cfg.get("eos_token_id")
    gen = folder / "generation_config.json"
    if gen.is_file():
        try:
            ids = json.loads(gen.read_text()).get("eos_token_id", ids)
        except json.JSONDecodeError:
            pass
    if ids is None:
        return ()
    return tuple(ids) if isinstance(ids, list) else (int(ids),)


# --- sasq-lint ---------------------------------------------------------------------------------


def _lint(argv: list[str] | None) -> int:
    from exporters.lint import RULES

    p = _parser("sasq-lint", "Check an ONNX model against TensorRT's explicit-quantization rules, and report which\n"
                "linear layers ONNX Runtime's CPU graph runs as integer kernels. Exits 1 on any violation.",
                "rules:\n" + "\n".join(f"  {k:<24} {v}" for k, v in RULES.items()))
    p.add_argument("onnx", help="model.onnx to check")
    p.add_argument("--no-fusion-check", action="store_true", help="skip the ONNX Runtime CPU fusion report")
    args = p.parse_args(argv)
    from exporters.lint import format_report, lint
    from runtime.fusion import check_fusion
    from runtime.session import read_metadata

    path = Path(args.onnx)
    meta = read_metadata(path)  # fails clearly on a missing or non-ONNX file
    report = lint(path)
    print(format_report(report), flush=True)
    fusion = None if args.no_fusion_check else check_fusion(path)
    if fusion is not None:
        print(fusion.summary(), flush=True)
    profile = meta.get("sasq.profile")
    hint = f" (profile {profile}: export with --profile trt for TensorRT)" if profile and profile != "trt" and not report.passed else ""
    result = {"tensorrt": report.to_dict(), "fusion": None if fusion is None else fusion.to_dict(), "profile": profile}
    _emit(args, f"TensorRT rules {'PASSED' if report.passed else 'FAILED'}: {len(report.violations)} violation(s){hint}", result)
    return 0 if report.passed else EXIT_PARITY


# --- sasq-baseline -----------------------------------------------------------------------------

ORT_METHODS = ("ort-minmax", "ort-percentile", "ort-entropy")


def _baseline(argv: list[str] | None) -> int:
    from sasq_edge.baselines import METHODS

    p = _parser(
        "sasq-baseline",
        "WikiText-2 test perplexity of one baseline SASQ is measured against, on the same windows and calibration text.",
        epilog="methods:\n"
        "  fp32, fp16         the float model (fp16 on a GPU or a CPU with AVX512-FP16)\n"
        "  naive              static W8A8, absmax per-tensor activation scales, no training\n"
        "  percentile, mse    static PTQ with percentile / MSE-optimal clipping\n"
        "  smoothquant        SmoothQuant static per-tensor: factors folded into RMSNorm / linears,\n"
        "                     alpha searched on held-out validation windows unless --smooth-alpha is given\n"
        "  dynamic            per-token absmax activation scales at run time (accuracy reference)\n"
        "  ort-minmax, ort-percentile, ort-entropy\n"
        "                     ONNX Runtime quantize_static (QDQ, u8 activations, s8 per-channel weights)\n"
        "                     on a float export (sasq-export --float); evaluated on ONNX Runtime",
    )
    p.add_argument("method", help=f"{', '.join(METHODS)}, {', '.join(ORT_METHODS)}")
    _add_model_args(p, required=False)
    _add_data_args(p)
    _add_train_args(p)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N test windows")
    p.add_argument("--float-onnx", help="ort-*: the float export to quantize (sasq-export --float)")
    p.add_argument("--out", help="ort-*: where to write the quantized .onnx")
    p.add_argument("--calib-seq-len", type=int, default=512,
                   help="ort-*: tokens per calibration window (ORT keeps every window's tensors in memory)")
    p.add_argument("--ort-percentile", type=float, default=99.999, help="ort-percentile: ORT's CalibPercentile (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="ort-*: ONNX Runtime intra-op threads")
    args = p.parse_args(argv)
    if args.method in ORT_METHODS:
        return _baseline_ort(args)
    if args.method not in METHODS:
        raise SasqError(f"unknown baseline {args.method!r}: choose one of {', '.join(METHODS + ORT_METHODS)}")
    if not args.model:
        raise SasqError(f"{args.method} needs --model (hub id, folder, .gguf or tiny-random-llama)")
    import dataclasses

    from sasq_edge.baselines import build_method
    from sasq_edge.data import load_text, make_windows, sample_windows, tokenize
    from sasq_edge.evaluate import perplexity
    from sasq_edge.models import load_model
    from sasq_edge.pipeline import training_windows

    config = dataclasses.replace(_config(args), train_steps=0, smooth_learn=False)
    if args.smooth_alpha == "auto":
        config = dataclasses.replace(config, smooth_alpha=None)
    device = _device(args)
    lm = load_model(args.model, trust_remote_code=args.trust_remote_code)
    lm.model.to(device)
    windows = training_windows(lm, config, args.data_dir)
    select = None
    if args.method == "smoothquant" and config.smooth_alpha is None:
        windows, select = _hold_out(windows, config)
    calib = sample_windows(windows, config.calib_batches, config.seed)
    model, info = build_method(lm.model, args.method, config, calib, select)
    test = make_windows(tokenize(load_text("test", args.data_dir), lm.tokenizer), config.seq_len, args.max_windows)
    res = perplexity(model, test, desc=args.method)
    out = {**info, **res.to_dict()}
    extra = f", alpha {info['alpha']}" if "alpha" in info else ""
    _emit(args, f"{args.method}: perplexity {res.ppl:.4f} over {res.windows} windows of {res.seq_len} tokens{extra}", out)
    return 0


def _baseline_ort(args: argparse.Namespace) -> int:
    from exporters.ort_static import quantize_static_baseline
    from runtime import open_session, perplexity
    from sasq_edge.data import load_text, make_windows, sample_windows, tokenize

    if not args.float_onnx or not args.out:
        raise SasqError(f"{args.method} needs --float-onnx (from sasq-export --float) and --out (the quantized .onnx)")
    if not str(args.out).endswith(".onnx"):
        raise SasqError(f"--out {args.out} must end in .onnx")
    src = Path(args.float_onnx)
    if not src.is_file():
        raise SasqError(f"{src} not found: export the float model first with sasq-export --float")
    open_session(src, ["cpu"], args.threads)  # a corrupt or foreign file fails here, before calibration
    tokenizer = _load_tokenizer(src.parent, None)
    valid = tokenize(load_text("validation", args.data_dir), tokenizer)
    calib = sample_windows(make_windows(valid, args.calib_seq_len), args.calib_batches, args.seed)
    build = quantize_static_baseline(src, args.out, calib, args.method.removeprefix("ort-"), percentile=args.ort_percentile)
    sess = open_session(args.out, ["cpu"], args.threads)
    windows = _eval_windows(args, Path(args.out), tokenizer)
    res = perplexity(sess, windows)
    _emit(args, f"{args.method}: perplexity {res.ppl:.4f} over {res.windows} windows of {res.seq_len} tokens -> {args.out}",
          {**build, **res.to_dict(), "onnx": str(args.out)})
    return 0


train_main = _entry("sasq-train", _train)
export_main = _entry("sasq-export", _export)
ppl_main = _entry("sasq-ppl", _ppl)
validate_main = _entry("sasq-validate", _validate)
generate_main = _entry("sasq-generate", _generate)
lint_main = _entry("sasq-lint", _lint)
baseline_main = _entry("sasq-baseline", _baseline)
