"""Per family: the tiny seeded model of tests/test_families.py (2 layers, hidden 64),
SASQ (3 steps, learned smoothing factors) then exported as the traced graph (profile trt) and the
fused CPU graph (the profile this CPU runs exactly): export time, node and Q/DQ counts, ONNX Runtime
against the PyTorch twin (max |logit difference|, top-1 agreement on 2 x 48 tokens), the
integer-kernel fusion check, and decode speed: 32 greedy tokens after a 16-token prompt with the
KV cache, one thread, the two graphs of a family interleaved over 5 rounds, median tokens/s.

    python bench/families.py        # a few minutes on 2 cores

Writes bench/results/families.{json,md}.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))


def main() -> None:
    import onnx
    from quality_smollm2 import machine
    from test_families import FAMILIES, GRAPHS, _windows

    from exporters import export_onnx
    from exporters.passes import op_counts
    from runtime import open_session
    from runtime.fusion import check_fusion
    from runtime.generate import Sampling, generate
    from sasq_edge.config import QuantConfig
    from sasq_edge.pipeline import run_sasq
    from sasq_edge.state import apply_state

    rows = []
    work = Path(tempfile.mkdtemp(prefix="sasq-families-"))
    ids = torch.randint(0, 257, (2, 48), generator=torch.Generator().manual_seed(5))
    prompt = list(b"The capital of Fr")  # 16 byte tokens (+ the byte tokenizer adds none)
    for family in FAMILIES:
        sessions = {}
        for graph, profile in GRAPHS.items():
            lm = family.build()
            cfg = QuantConfig.plain(profile=profile, seq_len=64, calib_batches=2, train_steps=3, lr=0.05, smooth_alpha=0.5,
                              smooth_learn=True)
            state = run_sasq(lm, cfg, windows=_windows(), progress=False).state
            t = time.perf_counter()
            res = export_onnx(lm.model, work / f"{family.name}-{graph}" / "model.onnx", state=state, tokenizer=lm.tokenizer,
                              graph=graph)
            export_s = time.perf_counter() - t
            counts = op_counts(onnx.load(str(res.onnx)))
            twin = apply_state(family.build().model, state)
            with torch.no_grad():
                ref = twin(input_ids=ids).logits.numpy()
            out = open_session(res.onnx).logits(ids.numpy())
            fusion = check_fusion(res.onnx)
            sessions[graph] = open_session(res.onnx, threads=1)
            rows.append({"family": family.name, "model_type": family.model_type, "graph": graph, "profile": profile,
                         "export_s": round(export_s, 2), "nodes": sum(counts.values()),
                         "quantize_linear": counts.get("QuantizeLinear", 0), "dequantize_linear": counts.get("DequantizeLinear", 0),
                         "max_abs_logit_diff": float(np.abs(out - ref).max()),
                         "top1_agreement": float((out.argmax(-1) == ref.argmax(-1)).mean()),
                         "fusion": f"{len(fusion.fused)}/{len(state.scales)}", "fusion_passed": fusion.passed})
            print(json.dumps(rows[-1]), flush=True)
        speeds = {g: [] for g in sessions}
        for _ in range(5):  # interleaved rounds: both graphs see the same machine state
            for graph, sess in sessions.items():
                _, stats = generate(sess, prompt, Sampling(max_new_tokens=32))
                speeds[graph].append(stats.decode_tokens_per_s)
        for r in rows[-len(sessions):]:
            r["decode_tokens_per_s"] = round(float(np.median(speeds[r["graph"]])), 1)
        if len(sessions) == 2:
            rows[-1]["decode_speedup_vs_traced"] = round(float(np.median(speeds["fused"]) / np.median(speeds["traced"])), 2)
    out = {"bench": "families", "machine": machine(), "rows": rows,
           "model": "tiny seeded models of tests/test_families.py (2 layers, hidden 64, 4/2 heads, byte vocabulary)"}
    (HERE / "results" / "families.json").write_text(json.dumps(out, indent=2) + "\n")
    md = ["# Every family on a tiny seeded model (`python bench/families.py`)", "",
          "2 layers, hidden 64; SASQ 3 steps with learned smoothing factors; ONNX Runtime CPU against the PyTorch "
          "fake-quant twin on 2 x 48 tokens; fusion: quantized linears running as integer kernels; decode: 32 "
          "greedy tokens after 16 with the KV cache, 1 thread, median of 5 rounds interleaved with the other graph "
          "(fused / traced: the ratio of the two, same run).", "",
          "| family | graph (profile) | export s | nodes | Q / DQ | max abs logit diff | top-1 agreement | fusion | "
          "decode tokens/s | fused / traced |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    md += [f"| {r['family']} | {r['graph']} ({r['profile']}) | {r['export_s']} | {r['nodes']} | {r['quantize_linear']} / "
           f"{r['dequantize_linear']} | {r['max_abs_logit_diff']:.1e} | {r['top1_agreement']:.3f} | {r['fusion']} | "
           f"{r['decode_tokens_per_s']} | {r.get('decode_speedup_vs_traced', '')} |" for r in rows]
    (HERE / "results" / "families.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
