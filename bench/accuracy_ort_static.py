"""ONNX Runtime ``quantize_static`` baselines for the accuracy benchmark, on CPU.

Quantizes the float export's 210 weight MatMuls with ORT's MinMax, Percentile and Entropy
calibrators (QDQ, uint8 activations per tensor, int8 weights per channel) on validation windows,
picks the best calibrator by perplexity on held-out *validation* windows (one 2048-token window
takes 7-14 s on 2 cores, so all three on the full test split would take hours), then evaluates
the winner on WikiText-2 raw test with the full protocol (all non-overlapping windows of
``--seq-len``). Writes ``bench/results/accuracy_smollm2/ort_static.json``; resumable.

    python bench/accuracy_ort_static.py --float-onnx bench/.work/deploy/ort-fp32/model.onnx
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from exporters.ort_static import CALIBRATORS, quantize_static_baseline
from runtime import open_session
from runtime.data import load_text, make_windows, sample_windows, tokenize
from runtime.perplexity import perplexity

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "accuracy_smollm2" / "ort_static.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--float-onnx", required=True, help="float export with sasq-export --float")
    p.add_argument("--data-dir", default=os.environ.get("SASQ_DATA_DIR", "../shared/assets/wikitext2"))
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--calib-windows", type=int, default=8)
    p.add_argument("--calib-seq-len", type=int, default=512,
                   help="ORT's calibrators keep every calibrated tensor of every window in memory: 8 x 512 fits")
    p.add_argument("--calibrators", default=",".join(CALIBRATORS))
    p.add_argument("--select-windows", type=int, default=6, help="validation windows that pick the calibrator")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=str(HERE / ".work" / "accuracy"))
    args = p.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(Path(args.float_onnx).parent))
    test = make_windows(tokenize(load_text("test", args.data_dir), tok), args.seq_len, args.max_windows)
    valid = tokenize(load_text("validation", args.data_dir), tok)
    calib = sample_windows(make_windows(valid, args.calib_seq_len), args.calib_windows, 0)
    select = make_windows(valid[::-1].copy(), args.seq_len, args.select_windows)[:, ::-1].copy()  # the text's end
    results = json.loads(OUT.read_text()) if OUT.is_file() else {"rows": {}}
    results.update({"seq_len": args.seq_len, "windows": int(test.shape[0]),
                    "calibration": f"{calib.shape[0]} validation windows x {calib.shape[1]} tokens"})
    def save() -> None:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(results, indent=2) + "\n")

    results["selection"] = f"{select.shape[0]} validation windows x {select.shape[1]} tokens (the text's last ones)"
    for name in args.calibrators.split(","):
        if "valid_ppl" in results["rows"].get(name, {}):
            continue
        dst = Path(args.work) / f"ort-static-{name}" / "model.onnx"
        build = quantize_static_baseline(args.float_onnx, dst, calib, name)
        r = perplexity(open_session(dst, ["cpu"], args.threads), select, desc=f"ort {name} (validation)")
        results["rows"][name] = {**build, "valid_ppl": r.ppl, "bytes": dst.stat().st_size}
        print(f"ORT quantize_static {name}: validation PPL {r.ppl:.3f}", flush=True)
        save()
    best = min(results["rows"], key=lambda n: results["rows"][n]["valid_ppl"])
    results["best"] = best
    row = results["rows"][best]
    if row.get("windows") != int(test.shape[0]):
        t0 = time.perf_counter()
        r = perplexity(open_session(Path(args.work) / f"ort-static-{best}" / "model.onnx", ["cpu"], args.threads),
                       test, desc=f"ort {best} (test)")
        row.update({**r.to_dict(), "eval_s": round(time.perf_counter() - t0, 1)})
        save()
    print(f"best calibrator {best}: test PPL {row['ppl']:.3f}", flush=True)


if __name__ == "__main__":
    main()
