"""Merge the accuracy benchmark's stage files into ``bench/results/accuracy_smollm2.{json,md}``
and draw its plots (``bench/results/accuracy_smollm2/*.png``). Called by
``python bench/accuracy_smollm2.py report``; needs matplotlib (``pip install -e .[bench]``)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

VARIANT_NOTES = {
    "clip": "learned clipping only (per-tensor scales), MSE init",
    "tanh": "+ soft truncation a*tanh(x/a), a learned",
    "smooth": "SmoothQuant factors folded (alpha from its search), then learned clipping",
    "smooth+tanh": "smooth + soft truncation",
    "smooth+cosine": "smooth, cosine LR schedule",
    "smooth-learned+cosine": "smooth factors trained too (86k parameters), cosine, lr 0.05",
    "smooth-learned+cosine lr/5": "smooth factors trained too (86k parameters), cosine, lr 0.01",
}


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _pct(ppl: float, ref: float) -> str:
    return f"{100 * (ppl / ref - 1):+.1f} %"


def summarize(t: dict, ort: dict, onnx: dict) -> dict:
    rows = t["rows"]
    fp32 = rows["fp32"]["ppl"]
    best = t["best_variant"]
    bv = t["variants"][best]
    ptq = {m: rows[m]["ppl"] for m in ("percentile", "mse")}
    best_ptq = min(("percentile", "mse"), key=lambda m: rows[m]["valid_ppl"])
    ort_best = ort.get("best")
    table = [
        ("FP32, PyTorch", fp32, "float reference"),
        ("FP16, PyTorch (GPU)", rows["fp16"].get("ppl"), "float reference"),
        ("naive static W8A8 (absmax, no training)", rows["naive"]["ppl"], "static"),
        (f"static PTQ, {best_ptq} clipping (best PTQ by validation)", ptq[best_ptq], "static"),
        (f"static PTQ, {'mse' if best_ptq == 'percentile' else 'percentile'} clipping",
         ptq["mse" if best_ptq == "percentile" else "percentile"], "static"),
        (f"SmoothQuant static per-tensor (alpha {rows['smoothquant']['alpha']}, searched)", rows["smoothquant"]["ppl"], "static"),
    ]
    if ort_best:
        table.append((f"ONNX Runtime quantize_static, {ort_best} (best calibrator by validation), ORT CPU",
                      ort["rows"][ort_best]["ppl"], "static"))
    table += [
        ("dynamic per-token W8A8 (accuracy reference)", rows["dynamic"]["ppl"], "dynamic"),
        (f"**SASQ static W8A8, best variant ({best}), PyTorch fake-quant**", bv["ppl"], "SASQ"),
    ]
    if onnx:
        table.append((f"**SASQ exported ({onnx['profile']}), ONNX Runtime CPU**", onnx["onnx"]["ppl"], "SASQ"))
    statics = [p for name, p, kind in table if kind == "static"]
    goals = {
        "sasq_at_or_below_fp32": bv["ppl"] <= fp32,
        "sasq_below_every_static_baseline": all(bv["ppl"] < p for p in statics),
        "sasq_at_or_below_dynamic_per_token": bv["ppl"] <= rows["dynamic"]["ppl"],
    }
    if onnx:
        rel = abs(onnx["onnx"]["ppl"] - bv["ppl"]) / bv["ppl"]
        goals["onnx_within_0.1pct_of_torch"] = rel <= 1e-3
        goals["onnx_vs_torch_rel_diff"] = rel
    return {"fp32": fp32, "best_variant": best, "table": [{"configuration": n, "ppl": p, "kind": k} for n, p, k in table],
            "goals": goals}


def markdown(t: dict, ort: dict, onnx: dict, s: dict) -> str:
    fp32 = s["fp32"]
    lines = [
        "# Accuracy: SmolLM2-135M-Instruct on WikiText-2, full protocol",
        "",
        f"{t['protocol']} ({t['test_windows'] * (t['seq_len'] - 1):,} predicted tokens). Calibration and training use the "
        f"validation split only: {t['train_windows']} windows for training and calibration, the last "
        f"{t['select_windows']} held out to make every choice (alpha, PTQ initialiser, ORT calibrator, best SASQ variant). "
        f"PyTorch rows ran on {t['machine']['device']} (torch {t['machine']['torch']}, FP32 matmuls without TF32).",
        "",
        "| configuration | PPL | vs FP32 |",
        "| --- | --- | --- |",
        *[f"| {r['configuration']} | {r['ppl']:.3f} | {_pct(r['ppl'], fp32)} |" for r in s["table"] if r["ppl"] is not None],
        "",
        "Goals: " + ", ".join(f"{k} = {v:.2e}" if isinstance(v, float) else f"{k} = {'yes' if v else 'NO'}"
                              for k, v in s["goals"].items()) + ".",
        "",
        "## SASQ variants",
        "",
        f"All start from the {t['sasq_init']} initialiser (the better PTQ by validation), 8 calibration windows, "
        "batch 1 x 2048 tokens, Adam on log-scales; only activation scales (and, where said, smoothing factors) train.",
        "",
        "| variant | what it adds | steps | trainable | valid PPL | test PPL | vs FP32 | train s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, v in t["variants"].items():
        if "ppl" not in v:
            continue
        tr = v["training"]
        note = VARIANT_NOTES.get(name, "longer training (3x steps), cosine" if "x3" in name else "")
        lines.append(f"| {name}{' (best)' if name == s['best_variant'] else ''} | {note} | {tr['steps']} | "
                     f"{tr['trainable_parameters']:,} | {v['valid_ppl']:.3f} | {v['ppl']:.3f} | {_pct(v['ppl'], fp32)} | "
                     f"{tr['wall_s']:.0f} |")
    q = t.get("qat")
    if q:
        clip = t["variants"]["clip"]["training"]
        bt = t["variants"][s["best_variant"]]["training"]
        lines += [
            "",
            "## Training cost: SASQ vs full-weight QAT (same steps, batch, windows, GPU)",
            "",
            "| run | trainable parameters | wall s | peak GPU memory | test PPL |",
            "| --- | --- | --- | --- | --- |",
            f"| SASQ, scales only (clip) | {clip['trainable_parameters']:,} | {clip['wall_s']:.0f} | "
            f"{clip.get('peak_gpu_mb', 0) / 1024:.1f} GiB | {t['variants']['clip']['ppl']:.3f} |",
            f"| SASQ best ({s['best_variant']}) | {bt['trainable_parameters']:,} | {bt['wall_s']:.0f} | "
            f"{bt.get('peak_gpu_mb', 0) / 1024:.1f} GiB | {t['variants'][s['best_variant']]['ppl']:.3f} |",
            f"| full QAT (every weight, lr {q['weight_lr']}, same init) | {q['training']['trainable_parameters']:,} | "
            f"{q['training']['wall_s']:.0f} | {q['training'].get('peak_gpu_mb', 0) / 1024:.1f} GiB | {q['ppl']:.3f} |",
        ]
    sq = t["rows"]["smoothquant"].get("alpha_search", {})
    if sq:
        lines += ["", "SmoothQuant alpha search (validation PPL): "
                  + ", ".join(f"{a}: {p:.2f}" for a, p in sq.items()) + "."]
    if ort:
        lines += ["", f"ONNX Runtime quantize_static ({ort['calibration']}, QDQ, u8 activations per tensor, s8 weights "
                  f"per channel, the 210 weight MatMuls), chosen on {ort['selection']}: "
                  + ", ".join(f"{n} validation PPL {r['valid_ppl']:.2f}" for n, r in ort["rows"].items()) + "."]
    if onnx:
        p = onnx["parity_windows"]
        lines += ["", f"Exported best state, profile {onnx['profile']}: {onnx['bytes'] / 1e6:.1f} MB; ONNX Runtime CPU PPL "
                  f"{onnx['onnx']['ppl']:.4f} over {onnx['onnx']['windows']} windows ({onnx['eval_s']:.0f} s, "
                  f"{onnx['threads']} threads). On the first {p['windows']} windows, PyTorch on the same CPU "
                  f"{p['ppl_torch']:.4f} vs ONNX Runtime {p['ppl_onnx']:.4f} (rel diff {p['rel_diff']:.1e}, top-1 agreement "
                  f"{p['top1_agreement']:.4f})."]
        g = onnx.get("greedy_prefix_agreement_of_32")
        if g:
            lines += ["", "Greedy tokens of the export on ONNX Runtime (KV cache) vs PyTorch, equal before the first "
                      "difference, out of 32: " + ", ".join(f"{n} ({p!r})" for p, n in g.items()) + "."]
    h = t.get("hist", {})
    if h:
        lines += ["", "## Outliers before and after (one validation window)", "",
                  "| layer input | max abs before | max abs after (clip range) |", "| --- | --- | --- |"]
        lines += [f"| {n} | {v['before']['absmax']:.1f} | {v['after']['absmax']:.2f} ({v['after']['clip']:.2f}) |"
                  for n, v in h.items()]
    lines += ["", "Plots: [results](accuracy_smollm2/results_bar.png), "
              "[perplexity vs steps](accuracy_smollm2/ppl_vs_steps.png), "
              "[activation ranges](accuracy_smollm2/activations.png).", ""]
    return "\n".join(lines)


def plots(t: dict, s: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fp32 = s["fp32"]
    # 1. results bar chart
    rows = [r for r in s["table"] if r["ppl"] is not None]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.2))
    colors = {"float reference": "#888888", "static": "#d08c60", "dynamic": "#6a9fd0", "SASQ": "#3a9a5b"}
    names = [r["configuration"].replace("**", "") for r in rows][::-1]
    vals = [r["ppl"] for r in rows][::-1]
    ax.barh(names, vals, color=[colors[r["kind"]] for r in rows][::-1])
    ax.axvline(fp32, color="black", lw=1, ls="--", label=f"FP32 {fp32:.2f}")
    ax.set_xscale("log")
    ax.set_xlabel("WikiText-2 test perplexity (log scale), lower is better")
    for y, v in enumerate(vals):
        ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
    ax.legend(loc="lower right")
    ax.set_title("SmolLM2-135M W8A8, WikiText-2, seq 2048, all windows", loc="right")
    fig.tight_layout()
    fig.savefig(out / "results_bar.png", dpi=110)
    plt.close(fig)

    # 2. perplexity vs training steps
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, v in t["variants"].items():
        if "curve" in v:
            c = v["curve"]
            a1.plot([p["step"] for p in c], [p["ppl"] for p in c], marker="o", label=f"SASQ {name}")
    for key, style in (("fp32", "--"), ("dynamic", ":"), ("smoothquant", "-.")):
        a1.axhline(t["rows"][key]["ppl"], ls=style, color="gray", label=f"{key} {t['rows'][key]['ppl']:.2f}")
    a1.set_xlabel("training step")
    a1.set_ylabel("test perplexity")
    a1.set_title("test perplexity during scale training")
    a1.legend(fontsize=8)
    for name, v in t["variants"].items():
        losses = v.get("losses")
        if not losses:
            continue
        k = 20
        smooth = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1]) for i in range(len(losses))]
        a2.plot(range(1, len(smooth) + 1), [math.exp(x) for x in smooth], label=name, lw=1)
    a2.set_xlabel("training step")
    a2.set_ylabel("training perplexity (20-step running mean)")
    a2.set_title("training loss (validation text), every variant")
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ppl_vs_steps.png", dpi=110)
    plt.close(fig)

    # 3. per-channel activation ranges before / after
    h = t.get("hist", {})
    if h:
        fig, axes = plt.subplots(len(h), 2, figsize=(12, 2.6 * len(h)))
        for i, (name, v) in enumerate(h.items()):
            b, a = v["before"], v["after"]
            ax = axes[i][0]
            ax.plot(b["channel_absmax"], lw=0.7, color="#d08c60", label="before (float input)")
            ax.plot(a["channel_absmax"], lw=0.7, color="#3a9a5b", label="after SASQ (values on the static grid)")
            ax.set_yscale("log")
            ax.set_title(f"{name}: max |x| per channel", fontsize=9)
            ax.legend(fontsize=7)
            ax = axes[i][1]
            for tag, col in (("before", "#d08c60"), ("after", "#3a9a5b")):
                log_hist = "log10_counts" in v[tag]
                e = v[tag]["log10_edges" if log_hist else "edges"]
                c = v[tag]["log10_counts" if log_hist else "counts"]
                centers = [10 ** ((e[j] + e[j + 1]) / 2) if log_hist else (e[j] + e[j + 1]) / 2 for j in range(len(c))]
                ax.plot(centers, [max(x, 0.5) for x in c], color=col, lw=0.8,
                        label=f"{tag}: max {v[tag]['absmax']:.3g}")
                if log_hist:
                    ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{name}: histogram of |x| (log-log)" if "log10_counts" in v["before"]
                         else f"{name}: histogram (log counts)", fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "activations.png", dpi=100)
        plt.close(fig)


def report(out_dir: Path) -> None:
    t = _load(out_dir / "torch.json")
    if not t:
        raise SystemExit(f"{out_dir / 'torch.json'} not found: run the torch stage first")
    ort = _load(out_dir / "ort_static.json")
    onnx = _load(out_dir / "onnx.json")
    s = summarize(t, ort, onnx)
    md = markdown(t, ort, onnx, s)
    plots(t, s, out_dir)
    merged = {"summary": s, "torch": copy.deepcopy(t), "ort_static": ort, "onnx": onnx}
    for v in merged["torch"].get("variants", {}).values():
        v.pop("losses", None)  # kept in torch.json; the merged file stays readable
    merged["torch"].pop("hist", None)  # likewise
    base = out_dir.parent / "accuracy_smollm2"
    base.with_suffix(".json").write_text(json.dumps(merged, indent=2) + "\n")
    base.with_suffix(".md").write_text(md)
    print(md)
