"""Where static W8A8 loses quality on a domain its scales never saw: SmolLM2-135M on
source code (bench/domains.py, the first 6 windows of 512 tokens), in PyTorch, each row against
FP32:

- dynamic per-token W8A8 (every token its own activation scale at run time): what 8-bit
  activations cost when the range always fits;
- SmoothQuant static (alpha 0.5), scales calibrated on WikiText-2 validation;
- the same recipe calibrated on code itself (MSE, 4 other code windows): what calibrating on the
  user's domain recovers;
- the committed best SASQ state (cross-entropy on WikiText).

    python bench/domain_gap.py        # about 3 minutes on 2 cores

Writes bench/results/domain_gap.{json,md}.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from domains import text  # noqa: E402
from quality_smollm2 import DATA, MODEL, machine  # noqa: E402

WINDOWS, SEQ = 6, 512


@torch.no_grad()
def ppl(model, windows: np.ndarray) -> float:
    nll, n = 0.0, 0
    for w in windows:
        ids = torch.from_numpy(w)[None]
        logits = model(input_ids=ids).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        n += ids.shape[1] - 1
    return float(np.exp(nll / n))


def main() -> None:
    from runtime.data import load_text, make_windows, tokenize
    from runtime.state import ScaleState
    from sasq_edge.baselines import build_method
    from sasq_edge.config import QuantConfig
    from sasq_edge.models import load_model
    from sasq_edge.pipeline import quantize_ptq
    from sasq_edge.state import apply_state

    torch.manual_seed(0)
    lm = load_model(MODEL)
    code = make_windows(tokenize(text("code"), lm.tokenizer), SEQ)
    evaluate, code_calib = code[:WINDOWS], code[WINDOWS:WINDOWS + 4]
    wiki_calib = make_windows(tokenize(load_text("validation", DATA), lm.tokenizer), SEQ)[:4]
    rows, times = {}, {}

    def row(name: str, build) -> None:
        t = time.perf_counter()
        model = build()
        rows[name] = ppl(model, evaluate)
        times[name] = round(time.perf_counter() - t, 1)
        print(f"{name}: {rows[name]:.3f}", flush=True)

    cfg = QuantConfig.plain(profile="cpu-vnni", seq_len=SEQ)
    row("FP32", lambda: lm.model)
    row("dynamic per-token W8A8", lambda: build_method(lm.model, "dynamic", cfg, wiki_calib)[0])
    smooth = QuantConfig.plain(profile="cpu-vnni", seq_len=SEQ, smooth_alpha=0.5)
    row("SmoothQuant static (alpha 0.5), calibrated on WikiText", lambda: build_method(lm.model, "smoothquant", smooth, wiki_calib)[0])

    def on_code():
        m = copy.deepcopy(lm.model)
        quantize_ptq(m, QuantConfig.plain(profile="cpu-vnni", seq_len=SEQ, smooth_alpha=0.5, calibration="mse"), code_calib)
        return m

    row("static (alpha 0.5, MSE), calibrated on code", on_code)

    def best():
        m = copy.deepcopy(lm.model)
        apply_state(m, ScaleState.load(HERE / "results" / "accuracy_smollm2" / "best_state"))
        return m

    row("SASQ best state (cross-entropy on WikiText, 2048 x 200)", best)
    fp32 = rows["FP32"]
    out = {"model": MODEL, "domain": "code", "windows": WINDOWS, "seq_len": SEQ, "machine": machine(), "ppl": rows,
           "vs_fp32": {k: v / fp32 for k, v in rows.items()}, "seconds": times}
    (HERE / "results" / "domain_gap.json").write_text(json.dumps(out, indent=2) + "\n")
    md = [f"# Static W8A8 on a domain its scales never saw: SmolLM2-135M on code ({WINDOWS} x {SEQ}, PyTorch)", "",
          "`python bench/domain_gap.py`", "", "| configuration | PPL | vs FP32 |", "| --- | --- | --- |"]
    md += [f"| {k} | {v:.3f} | {v / fp32:.3f}x |" for k, v in rows.items()]
    (HERE / "results" / "domain_gap.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
