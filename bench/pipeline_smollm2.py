"""Benchmark of the SASQ pipeline on SmolLM2-135M-Instruct (Q4_1-dequantized), WikiText-2 raw test.

Rows, all on the same first ``--max-windows`` windows of ``--seq-len`` tokens: FP32 PyTorch;
naive static W8A8 (absmax calibration, no training); static PTQ with the chosen initialiser (no
training); SASQ after training; the exported SASQ model on ONNX Runtime, with its parity against
the PyTorch fake-quant model. Writes ``bench/results/pipeline_smollm2.{json,md}``.

    python bench/pipeline_smollm2.py --model ~/.cache/sasq-assets/smollm2-135m-instruct \\
        --data-dir ../shared/assets/wikitext2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import sasq_edge
from exporters import export_onnx
from runtime import open_session
from runtime.data import load_text, make_windows, sample_windows, tokenize
from runtime.parity import compare
from runtime.perplexity import iter_logits as onnx_logits
from sasq_edge.calibrate import calibrate
from sasq_edge.config import QuantConfig
from sasq_edge.evaluate import iter_logits, perplexity
from sasq_edge.models import load_model
from sasq_edge.modules import prepare
from sasq_edge.pipeline import training_windows
from sasq_edge.state import state_from_model
from sasq_edge.train import train_scales

RESULTS = Path(__file__).resolve().parent / "results"


def ptq(base: torch.nn.Module, cfg: QuantConfig, calib: np.ndarray) -> torch.nn.Module:
    model = copy.deepcopy(base)
    prepare(model, cfg)
    calibrate(model, [torch.from_numpy(w)[None] for w in calib], cfg)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(Path.home() / ".cache/sasq-assets/smollm2-135m-instruct"))
    p.add_argument("--data-dir", default=os.environ.get("SASQ_DATA_DIR", "../shared/assets/wikitext2"))
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--calibration", default="mse", help="initialiser of the SASQ run (the naive row is always absmax)")
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "pipeline_smollm2"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    lm = load_model(args.model)
    cfg = QuantConfig.plain(calibration=args.calibration, calib_batches=args.calib_batches, train_steps=args.train_steps,
                      lr=args.lr, seq_len=args.seq_len)
    test = make_windows(tokenize(load_text("test", args.data_dir), lm.tokenizer), args.seq_len, args.max_windows)
    train = training_windows(lm, cfg, args.data_dir)
    calib = sample_windows(train, cfg.calib_batches, cfg.seed)
    rows = []

    def row(name: str, ppl: float, **extra) -> None:
        rows.append({"configuration": name, "ppl": ppl, **extra})
        print(f"{name}: PPL {ppl:.3f}", flush=True)

    row("FP32, PyTorch", perplexity(lm.model, test).ppl)
    naive_cfg = QuantConfig.plain(calibration="absmax", calib_batches=cfg.calib_batches, seq_len=args.seq_len, train_steps=0)
    row("naive static W8A8 (absmax, no training), PyTorch fake-quant", perplexity(ptq(lm.model, naive_cfg, calib), test).ppl)
    model = ptq(lm.model, cfg, calib)
    row(f"static PTQ W8A8 ({cfg.calibration} init, no training), PyTorch fake-quant", perplexity(model, test).ppl)

    report = train_scales(model, torch.from_numpy(train), cfg)
    state = state_from_model(model, cfg, lm.source, training=report.summary())
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = export_onnx(model, Path(tmp) / "model.onnx", state=state, tokenizer=lm.tokenizer)
        export_s = time.perf_counter() - t0
        sess = open_session(res.onnx, ["cpu"], args.threads)
        parity = compare(test, iter_logits(model, test), onnx_logits(sess, test)).report()
    steps = f"{report.steps} steps x {cfg.batch_size} x {cfg.seq_len} = {report.tokens} validation tokens"
    row(f"SASQ static W8A8 ({cfg.calibration} init, {steps}), PyTorch fake-quant", parity.ppl_torch)
    row("SASQ static W8A8, ONNX Runtime CPU (exported QDQ, profile trt)", parity.ppl_onnx,
        onnx_bytes=res.bytes, quantize_linear=res.to_dict()["quantize_linear"])

    result = {
        "model": "SmolLM2-135M-Instruct (Q4_1-dequantized)",
        "data": "WikiText-2 raw test, rows joined with \\n\\n, non-overlapping windows, tail dropped",
        "seq_len": args.seq_len,
        "windows": int(test.shape[0]),
        "predicted_tokens": int(test.shape[0] * (args.seq_len - 1)),
        "config": cfg.to_dict(),
        "training": report.summary(),
        "export_s": round(export_s, 1),
        "parity": parity.to_dict(),
        "rows": rows,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "torch": torch.__version__, "onnxruntime": ort.__version__, "sasq_edge": sasq_edge.__version__},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    t = r["training"]
    lines = [
        f"SmolLM2-135M-Instruct (Q4_1-dequantized), WikiText-2 raw test, first {r['windows']} windows of "
        f"{r['seq_len']} tokens ({r['predicted_tokens']} predicted tokens).",
        "",
        "| configuration | PPL |",
        "| --- | --- |",
        *[f"| {row['configuration']} | {row['ppl']:.3f} |" for row in r["rows"]],
        "",
        f"ONNX Runtime vs PyTorch fake-quant: relative PPL difference {r['parity']['rel_diff']:.2e}, "
        f"top-1 agreement {r['parity']['top1_agreement']:.4f}, max |logit diff| {r['parity']['max_abs_logit_diff']:.3g}, "
        f"mean |logit diff| {r['parity']['mean_abs_logit_diff']:.3g}.",
        "",
        f"Scale training: {t['trainable_parameters']} trainable parameters, {t['steps']} steps, {t['tokens']} tokens, "
        f"{t['wall_s']:.0f} s wall time, peak RSS {t['peak_rss_mb']:.0f} MB (whole process), "
        f"{r['machine']['threads']} threads; export {r['export_s']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
