"""The library verbs under the commands: quantize (calibrate and train: a scale state), export
(a model and its state into an export folder) and validate (an export folder into a report with
the verdict), callable without the command line. ``sasq-export`` and ``sasq-validate`` parse their
options, call one verb and print what it returns.

    from sasq_edge.api import export, quantize, validate
    q = quantize("HuggingFaceTB/SmolLM2-135M-Instruct")        # the default recipe, profile auto, default data
    export(q, "out/model.onnx")                                  # the folder sasq-export writes
    report = validate("out/model.onnx", max_windows=4)
    report.passed, report.verdicts, report.failed              # the verdict, check by check
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import RuntimeSetupError
from runtime.parity import Thresholds
from runtime.sources import DEFAULT_CALIBRATION_SPEC, DEFAULT_SPEC, parse_data_spec
from sasq_edge.config import DTYPES


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class Quantized:
    """What ``quantize`` returns: the trained ``state``; the model it was trained on, in memory with
    the state applied (``model``, a ``LoadedModel``), or the checkpoint folder that was read one
    decoder layer at a time (``folder``); the plan line that said which and why; the training report."""

    state: object  # runtime.state.ScaleState
    model: object | None = None
    folder: Path | None = None
    plan: str | None = None
    report: object | None = None  # sasq_edge.train.TrainReport of the end-to-end steps (whole model only)


def quantize(model: str, config=None, *, data: str = DEFAULT_CALIBRATION_SPEC, data_dir: str | None = None,
             layerwise: bool = False, trust_remote_code: bool = False, device="cpu", memory_check: bool = True,
             whole_export: bool = False, for_export: bool = True, dtype: str = "fp32",
             gradient_checkpointing: bool = False, group=None, progress: bool = True,
             on_line: Callable[[str], None] = _stderr, command: str = "sasq", model_config=None) -> Quantized:
    """Calibrate and train the activation scales of ``model`` (a hub id, a local folder, a ``.gguf``
    file, ``tiny-random-llama``) as ``config`` says (a ``QuantConfig``; default: the ``default``
    recipe on the profile this CPU runs exactly) on ``data``. Block-wise configs plan from a
    memory estimate whether the whole model loads or one layer at a time is read (``layerwise``
    forces the latter); ``whole_export``: the export that follows needs the whole model (the traced
    graph); ``for_export`` adds the config's own needs (TensorRT, a RoPE the fused graph cannot
    express; ``sasq-train`` leaves them to its later export). End to end
    (``blockwise=False``): the estimated peak memory is checked before the model loads (``dtype``
    ``fp32`` or ``bf16`` frozen weights, ``gradient_checkpointing``), and ``group`` (a
    ``sasq_edge.distributed.Group``) trains data parallel, every rank calling this. Says what it
    does through ``on_line`` (rank 0 only; the plan line prefixed with ``command``);
    ``model_config``: the model's transformers config, where the caller has read it."""
    import torch

    from runtime.sources import record_summary
    from sasq_edge.config import QuantConfig
    from sasq_edge.distributed import SINGLE
    from sasq_edge.errors import ConfigError
    from sasq_edge.layerwise import run_layerwise, should_go_layerwise
    from sasq_edge.models import load_config, load_model
    from sasq_edge.pipeline import run_sasq
    from sasq_edge.plan import alpha_summary, block_progress, blockwise_plan, model_source

    parse_data_spec(data)  # a bad spec fails before the model loads
    cfg = config if config is not None else QuantConfig()
    group = group or SINGLE
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    say = on_line if group.is_main else (lambda _line: None)
    line = None
    if cfg.blockwise:
        if group.world > 1:
            raise ConfigError(f"block-wise training runs in one process: start {command} without accelerate launch "
                              "/ torchrun, or train end to end on many processes (--no-blockwise)")
        from runtime.families import fused_refusal

        model_config = model_config or load_config(model, trust_remote_code=trust_remote_code)
        # only the fused graph can be written from a model read layer by layer: TensorRT's profile
        # or a config the fused graph cannot express need the whole model (an INT8 head or embedding
        # do not: the fused graph writes them, bit-identical from either source)
        if for_export:
            whole_export = whole_export or cfg.profile == "trt" or fused_refusal(model_config) is not None
        chosen = blockwise_plan(model, cfg, forced_layerwise=layerwise, trust_remote_code=trust_remote_code,
                                check=memory_check, whole_export=whole_export, config=model_config)
        cfg, folder, line = chosen.config, chosen.layerwise, chosen.line
        say(f"{command}: {line}")
    else:
        # bf16 training holds half the float32 model: the memory check below decides whether it fits
        bf16_training = dtype == "bf16" and cfg.train_steps > 0 and not layerwise
        folder = None if bf16_training else should_go_layerwise(model, layerwise, trust_remote_code, cfg.train_steps > 0)
    on_block = block_progress(quiet=not progress)
    if folder is not None:  # bigger than memory: one decoder layer at a time
        if group.world > 1:
            raise ConfigError(f"layer-by-layer calibration runs in one process: start {command} without accelerate "
                              "launch / torchrun")
        say(f"{command}: reading {folder} one decoder layer at a time")
        state = run_layerwise(folder, cfg, data_dir, data, trust_remote_code=trust_remote_code, progress=progress,
                              on_block=on_block, source=model_source(model, folder))
        if alpha_summary(state):
            say(alpha_summary(state))
        return Quantized(state, None, folder, line)
    device = torch.device(device)
    if not cfg.blockwise and memory_check:
        _check_memory(model, cfg, device, dtype, gradient_checkpointing, trust_remote_code)
    group.barrier()  # every process checked the memory before any loads its model
    lm = load_model(model, trust_remote_code=trust_remote_code, dtype=getattr(torch, DTYPES[dtype]))
    lm.model.to(device)
    try:
        result = run_sasq(lm, cfg, data_dir, data=data, group=group, gradient_checkpointing=gradient_checkpointing,
                          progress=progress, on_block=on_block)
    finally:
        lm.model.to("cpu")
    say(record_summary(result.state.training["data"]))
    if alpha_summary(result.state):
        say(alpha_summary(result.state))
    if result.alpha_search is not None:
        alpha = result.state.method["smooth_alpha"]
        say(f"smooth alpha auto -> {alpha} (validation PPL {result.alpha_search[alpha]:.3f})")
    return Quantized(result.state, lm, None, line, result.report)


def _check_memory(model: str, cfg, device, dtype: str, gradient_checkpointing: bool, trust_remote_code: bool) -> None:
    """Refuse, before the model loads, an end-to-end run whose estimated peak memory exceeds what
    this machine (and GPU) has free, every process of an ``accelerate launch`` on it counted."""
    from sasq_edge import memory
    from sasq_edge.distributed import local_processes
    from sasq_edge.models import load_config

    config = load_config(model, trust_remote_code=trust_remote_code)
    est = memory.estimate(config, cfg, dtype=DTYPES[dtype], gradient_checkpointing=gradient_checkpointing,
                          device=device.type)
    memory.check(est, cfg, dtype=DTYPES[dtype], gradient_checkpointing=gradient_checkpointing,
                 processes=local_processes(), host_free=memory.host_available(), device_free=memory.device_available(device))


def export(model, out: str | os.PathLike, *, state=None, graph: str = "auto", kv_cache: bool = True,
           overwrite: bool = False, trust_remote_code: bool = False, progress: bool = True):
    """Write the export folder of ``out`` (``.../model.onnx``): ``model`` is what ``quantize``
    returned (its state, its model or checkpoint folder), a ``LoadedModel`` or a model name with
    ``state`` (a ``ScaleState``, e.g. ``ScaleState.load(run_dir)``; None: the float model).
    Returns ``exporters.ExportResult``."""
    from exporters import export_onnx
    from sasq_edge.layerwise import LayerwiseModel, check_state_matches
    from sasq_edge.models import LoadedModel, load_model
    from sasq_edge.state import apply_state

    if isinstance(model, Quantized):
        state = model.state if state is None else state
        if model.folder is not None:
            from transformers import AutoTokenizer

            source = LayerwiseModel(model.folder, smooth=state.smooth, trust_remote_code=trust_remote_code)
            check_state_matches(source, state)
            tokenizer = AutoTokenizer.from_pretrained(str(model.folder), trust_remote_code=trust_remote_code)
            return export_onnx(source, out, state=state, tokenizer=tokenizer, progress=progress, graph="fused",
                               overwrite=overwrite)
        model = model.model
    if not isinstance(model, LoadedModel):
        model = load_model(str(model), trust_remote_code=trust_remote_code)
        if state is not None:
            apply_state(model.model, state)
    return export_onnx(model.model, out, state=state, tokenizer=model.tokenizer, kv_cache=kv_cache, progress=progress,
                       graph=graph, overwrite=overwrite)


def verdict(passed: bool | None) -> str:
    return "NOT RUN" if passed is None else "PASSED" if passed else "FAILED"


@dataclass
class ValidationReport:
    """What ``validate`` found: ``passed`` (every check that ran passed), each check's verdict
    (``PASSED``, ``FAILED`` or ``NOT RUN``), the failed ones, the lines ``sasq-validate`` prints,
    and every statistic (``details``, its ``--json`` object)."""

    passed: bool
    verdicts: dict[str, str]
    failed: list[str]
    lines: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def summary(self) -> str:
        return f"validation {'PASSED' if self.passed else 'FAILED'}" + (f": {', '.join(self.failed)} failed" if self.failed else "")


def per_layer_table(replay, blocks) -> list[str]:
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


def validate(onnx: str | os.PathLike, *, model: str | None = None, data: str = DEFAULT_SPEC, data_dir: str | None = None,
             seq_len: int = 512, max_windows: int | None = None, thresholds: Thresholds | None = None, layer_windows: int = 2,
             per_layer: bool = False, fusion_check: bool = True, providers: list[str] | tuple[str, ...] = ("cpu",),
             threads: int | None = None, trust_remote_code: bool = False, progress: bool = True,
             on_line: Callable[[str], None] | None = None) -> ValidationReport:
    """Prove that the export at ``onnx`` computes what its PyTorch fake-quant twin computes (the twin
    rebuilt from the folder's scale state and the float checkpoint, ``model`` or the one the recipe
    names): the fusion check, the session options, this CPU, the INT8 weights digest, the integer
    replay of every quantized linear and the teacher-forced blocks (on the first ``layer_windows``
    windows), and the distributions end to end on every window of ``data``. ``on_line`` receives
    each check's line as it is known (``sasq-validate`` prints them)."""
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        if on_line is not None:
            on_line(line)

    thresholds = thresholds or Thresholds()
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

    parse_data_spec(data)  # a bad spec fails before any model loads
    path = Path(onnx)
    sess = open_session(path, list(providers), threads)
    if sess.profile is None:
        raise RuntimeSetupError(f"{path} carries no sasq deploy profile (a float or foreign model): validate models written by sasq-export")
    fusion = check_fusion(path) if fusion_check else None
    if fusion is not None:
        say(fusion.summary())
    options_problem = session_options_problem(sess.metadata, path)
    say(f"session options {verdict(options_problem is None)}: " + (options_problem or f"the ones profile {sess.profile} needs"))
    cpu_problem = cpu_mismatch(sess.profile, sess.providers)
    say(f"this CPU {verdict(cpu_problem is None)}: " + (cpu_problem or "its integer kernels compute the profile exactly"))
    state = ScaleState.load(path.parent)
    lm = load_model(model or state.model_source, trust_remote_code=trust_remote_code)
    apply_state(lm.model, state)
    check_context(seq_len, max_positions(path))
    windows_set = load_windows(lm, data, seq_len, EVALUATION, data_dir=data_dir, max_windows=max_windows)
    windows = windows_set.windows  # the same windows, built once with the model's own tokenizer, feed both sides
    layers = None
    if layer_windows:
        layers = layer_checks(lm.model, state, path, windows[:layer_windows], thresholds, list(providers), threads,
                              progress=progress)
        w = layers.weights
        say(f"weights {verdict(w.passed)}: INT8 weights digest in the graph {w.graph[:12]}, recipe.json {str(w.state)[:12]}, "
            f"twin {w.twin[:12]}")
        say(layers.replay.summary())
        say(layers.blocks.summary())
        if per_layer:
            say("\n".join(per_layer_table(layers.replay, layers.blocks)))
    else:
        say("layer checks NOT RUN (--layer-windows 0)")
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
    result = {**rep.to_dict(), "bos": windows_set.bos is not None, "data": windows_set.record, "thresholds": thresholds.to_dict(),
              "fusion": None if fusion is None else fusion.to_dict(),
              "session_options": {"passed": options_problem is None, "problem": options_problem},
              "cpu": {"passed": cpu_problem is None, "problem": cpu_problem},
              "weights": None if layers is None else layers.weights.to_dict(),
              "replay": None if layers is None else layers.replay.to_dict(),
              "blocks": None if layers is None else layers.blocks.to_dict(),
              "distribution": {"passed": rep.passed, "checks": {c.name: c.to_dict() for c in rep.checks}},
              "verdicts": {k: verdict(v) for k, v in checks.items()}, "failed": failed, "passed": passed}
    conf = "n/a" if not rep.confident_positions else f"{rep.top1_confident:.4f}"
    say(f"distributions {verdict(rep.passed)}: KL mean {rep.kl_mean:.2e} (max {thresholds.kl_mean:g}), p99 {rep.kl_p99:.2e} "
        f"(max {thresholds.kl_p99:g}), max {rep.kl_max:.2e}; ppl twin {rep.ppl_torch:.4f}, onnx {rep.ppl_onnx:.4f} (ratio "
        f"{rep.ppl_ratio:.5f}); top-1 agreement {rep.top1_agreement:.4f} over all {rep.positions} positions, {conf} over "
        f"the {rep.confident_positions} with a margin above {thresholds.top1_margin:g} (min {thresholds.min_top1_confident:g}); "
        f"{rep.windows} windows" + (", BOS first" if windows_set.bos is not None else ""))
    return ValidationReport(passed, {k: verdict(v) for k, v in checks.items()}, failed, lines, result)
