"""Quality that holds on text the scales never saw (issue 10): SmolLM2-135M-Instruct
(Q4_1-dequantized) on this 2-core CPU.

Stages (each appends to ``bench/results/quality_smollm2/<stage>.json``, resumable; ``report``
writes ``bench/results/quality_smollm2.{json,md}`` and a plot):

    python bench/quality_smollm2.py curve     # held-out quality against steps and sequence length
    python bench/quality_smollm2.py variants  # the table's SASQ rows, trained at the default budget
    python bench/quality_smollm2.py default   # the plain `sasq-export` a user types, timed end to end
    python bench/quality_smollm2.py eval      # every row on WikiText-2 test (full protocol) + 3 other domains
    python bench/quality_smollm2.py report

Selection never sees evaluation text: the held-out sets are the last 4 x 2048 tokens of the
WikiText-2 *validation* text (removed from the training text) and 2 x 2048-token windows of the
``code`` and ``docs`` domains taken after the windows the evaluation uses (bench/domains.py).
Evaluation: WikiText-2 raw test, all 148 windows of 2048 tokens, and the first 32 (code, docs)
or 25 (legal, all of it) windows of 2048 tokens of each other domain.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
OUT = HERE / "results" / "quality_smollm2"
MODEL = os.environ.get("SASQ_SMOLLM2_DIR", str(Path.home() / ".cache" / "sasq-assets" / "smollm2-135m-instruct"))
DATA = os.environ.get("SASQ_DATA_DIR", str(HERE.parents[1] / "shared" / "assets" / "wikitext2"))
SELECT_TOKENS = 4 * 2048
EVAL_WINDOWS = {"code": 32, "docs": 32, "legal": 25}
SELECT_AT = {"code": 100, "docs": 50}  # held-out windows start here, after the evaluation windows


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def machine() -> dict:
    import onnxruntime
    import torch

    flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0] if Path("/proc/cpuinfo").is_file() else ""
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "avx512_vnni": "avx512_vnni" in flags,
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def token_sets(tokenizer) -> dict[str, np.ndarray]:
    """The token streams: WikiText-2 validation (training) and test, and each other domain."""
    from domains import DOMAINS, text

    from runtime.data import load_text, tokenize

    sets = {"wiki_valid": tokenize(load_text("validation", DATA), tokenizer),
            "wiki_test": tokenize(load_text("test", DATA), tokenizer)}
    for d in DOMAINS:
        sets[d] = tokenize(text(d), tokenizer)
    return sets


def selection_windows(sets: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {"wiki": sets["wiki_valid"][-SELECT_TOKENS:].reshape(-1, 2048)}
    for d, start in SELECT_AT.items():
        out[d] = sets[d][start * 2048:(start + 2) * 2048].reshape(2, 2048)
    return out


def training_tokens(sets: dict[str, np.ndarray]) -> np.ndarray:
    return sets["wiki_valid"][:-SELECT_TOKENS]


def torch_select(model, select: dict[str, np.ndarray]) -> dict[str, float]:
    from sasq_edge.evaluate import perplexity

    return {k: perplexity(model, w, progress=False).ppl for k, w in select.items()}


# --- curve ---------------------------------------------------------------------------------------

CURVE = [(512, 50), (512, 100), (512, 200), (1024, 100), (256, 200), (2048, 50)]


def curve_stage(args) -> None:
    import torch

    from runtime.data import make_windows
    from sasq_edge.config import QuantConfig
    from sasq_edge.models import load_model
    from sasq_edge.pipeline import run_sasq

    torch.set_num_threads(args.threads)
    path = OUT / "curve.json"
    res = _load(path) or {"runs": {}, "machine": machine()}
    lm = load_model(MODEL)
    sets = token_sets(lm.tokenizer)
    select = selection_windows(sets)
    if "float" not in res:
        res["float"] = torch_select(lm.model, select)
        _write(path, res)
    for seq, steps in CURVE:
        key = f"{args.objective} seq{seq} x{steps}"
        if key in res["runs"]:
            continue
        lm = load_model(MODEL)
        cfg = QuantConfig(profile="cpu-vnni", seq_len=seq, calibration="mse", smooth_alpha=0.9, smooth_learn=True,
                          lr_schedule="cosine", lr=0.01, train_steps=steps, objective=args.objective)
        windows = make_windows(training_tokens(sets), seq)
        t0 = time.perf_counter()
        result = run_sasq(lm, cfg, windows=windows, progress=False)
        total = time.perf_counter() - t0
        row = {"seq_len": seq, "steps": steps, "objective": args.objective, "train_s": round(result.report.wall_s, 1),
               "run_sasq_s": round(total, 1), "s_per_step": round(result.report.wall_s / steps, 2),
               "select_ppl": torch_select(lm.model, select), "loss_last10": result.report.summary()["loss_last10"]}
        res["runs"][key] = row
        _write(path, res)
        print(key, json.dumps(row), flush=True)
        del lm, result
        gc.collect()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["curve"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--objective", default="kd")
    args = p.parse_args()
    {"curve": curve_stage}[args.stage](args)


if __name__ == "__main__":
    main()
