"""Quality that holds on text the scales never saw: SmolLM2-135M-Instruct
(Q4_1-dequantized) on this 2-core CPU.

Stages (each appends to ``bench/results/quality_smollm2/<stage>.json``, resumable; ``report``
writes ``bench/results/quality_smollm2.{json,md}`` and a plot):

    python bench/quality_smollm2.py curve     # held-out quality against steps and sequence length
    python bench/quality_smollm2.py variants  # the table's SASQ rows: the default recipe at 512 x 50, objective and data varied
    python bench/quality_smollm2.py default   # the plain `sasq-export` a user types, timed end to end
    python bench/quality_smollm2.py eval      # every row on WikiText-2 test (full protocol) + 3 other domains
    python bench/quality_smollm2.py report    # the same --seq-len/--windows as eval (committed: 512, 16)

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

# cheapest first: each point appends to curve.json, so a run cut short keeps the points it finished
CURVE = [(512, 50), (512, 100), (1024, 50), (256, 200), (512, 200), (1024, 100), (2048, 50)]


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
        cfg = QuantConfig.plain(profile="cpu-vnni", seq_len=seq, calibration="mse", smooth_alpha=0.9, smooth_learn=True,
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


# --- variants: the table's SASQ rows, the default recipe at 512 x 50 (the default before the budget curve's
# second point moved it to 512 x 100), objective and data varied --------------------------------------------

SELF = "self:32"
VARIANT_STEPS = 50
VARIANTS = {
    "sasq-ce-wiki": ("wikitext2", {"objective": "ce"}),
    "sasq-kd-wiki": ("wikitext2", {}),
    "sasq-kd-self": (SELF, {}),
    "sasq-kd-mix": (f"0.5*wikitext2,0.5*{SELF}", {}),
}


def variants_stage(args) -> None:
    import torch

    from sasq_edge.config import QuantConfig
    from sasq_edge.models import load_model
    from sasq_edge.pipeline import run_sasq

    torch.set_num_threads(args.threads)
    path = OUT / "variants.json"
    res = _load(path) or {"rows": {}, "machine": machine()}
    lm = load_model(MODEL)
    select = selection_windows(token_sets(lm.tokenizer))
    for name, (spec, over) in VARIANTS.items():
        if name in res["rows"]:
            continue
        lm = load_model(MODEL)
        cfg = QuantConfig.from_recipe("default", profile="cpu-vnni", train_steps=VARIANT_STEPS, **over)
        t0 = time.perf_counter()
        result = run_sasq(lm, cfg, DATA, data=spec, progress=False)
        total = time.perf_counter() - t0
        result.state.save(OUT / "states" / name)
        res["rows"][name] = {"data": spec, "config": result.state.method, "run_sasq_s": round(total, 1),
                             "training": {k: v for k, v in result.state.training.items() if k != "data"},
                             "select_ppl": torch_select(lm.model, select)}
        _write(path, res)
        print(name, json.dumps(res["rows"][name]["select_ppl"]), round(total), flush=True)
        del lm, result
        gc.collect()


# --- default: the plain command, as a user types it ------------------------------------------------


def default_stage(args) -> None:
    import subprocess

    path = OUT / "default.json"
    out = OUT.parent.parent / ".work" / "quality_default" / "model.onnx"
    cmd = [str(Path(sys.executable).parent / "sasq-export"), str(out), "--model", MODEL, "--json"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "SASQ_DATA_DIR": DATA})
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"the default command failed:\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    recipe = json.loads((out.parent / "recipe.json").read_text())
    _write(path, {"command": "sasq-export out/model.onnx --model MODEL (SASQ_DATA_DIR set for offline WikiText-2)",
                  "wall_s": round(wall, 1), "export": summary, "method": recipe["method"], "training": recipe["training"],
                  "onnx": str(out), "machine": machine()})
    print(f"default command: {wall:.0f} s", flush=True)


# --- eval: every row on ONNX Runtime (dynamic per-token: PyTorch), full protocol + other domains ---

WORK = OUT.parent.parent / ".work" / "quality"
# earlier defaults of the same command, each export kept beside the current one (made by an earlier
# `default` stage) with its bench/main_job.py record: no rotation (rotate_block 0), then the down
# projections' input rotated alone; everything else the same recipe
EARLIER = {"default-norot": "norot", "default-down": "down"}
ROWS = ["fp32", "dynamic", "smoothquant", "sasq-ce-best", *VARIANTS, *EARLIER, "default"]


def eval_windows_all(tokenizer, seq_len: int = 2048, cap: int | None = None) -> dict[str, np.ndarray]:
    """The evaluation windows of every domain: by default the full protocol (all 148 WikiText-2
    test windows of 2048, and ``EVAL_WINDOWS`` of each other domain); ``seq_len`` and ``cap`` (the
    first ``cap`` windows of each domain) give the shorter protocol."""
    from runtime.data import make_windows

    sets = token_sets(tokenizer)
    out = {"wiki": make_windows(sets["wiki_test"], seq_len, cap)}  # cap None: all windows, the full protocol
    for d, n in EVAL_WINDOWS.items():
        out[d] = make_windows(sets[d], seq_len, min(n, cap) if cap else n)
    return out


def eval_path(seq_len: int, cap: int | None) -> Path:
    return OUT / ("eval.json" if (seq_len, cap) == (2048, None) else f"eval_{cap}x{seq_len}.json")


def _export_state(name: str, state) -> Path:
    from exporters import export_onnx
    from sasq_edge.models import load_model
    from sasq_edge.state import apply_state

    out = WORK / name / "model.onnx"
    if not out.is_file():
        lm = load_model(MODEL)
        apply_state(lm.model, state)
        export_onnx(lm.model, out, state=state, tokenizer=lm.tokenizer)
    return out


def _row_model(name: str):
    """An ONNX path for the exported rows, a torch model for ``dynamic``."""
    from runtime.state import ScaleState

    if name == "fp32":
        out = WORK / "fp32" / "model.onnx"
        if not out.is_file():
            from exporters import export_onnx
            from sasq_edge.models import load_model

            lm = load_model(MODEL)
            export_onnx(lm.model, out, tokenizer=lm.tokenizer)
        return out
    if name == "dynamic":
        from sasq_edge.baselines import build_method
        from sasq_edge.config import QuantConfig
        from sasq_edge.models import load_model

        lm = load_model(MODEL)
        return build_method(lm.model, "dynamic", QuantConfig.plain(profile="cpu-vnni"), np.zeros((1, 8), np.int64))[0]
    if name == "smoothquant":
        state_dir = OUT / "states" / "smoothquant"
        if not (state_dir / "recipe.json").is_file():
            from sasq_edge.config import QuantConfig
            from sasq_edge.models import load_model
            from sasq_edge.pipeline import run_sasq

            cfg = QuantConfig.plain(profile="cpu-vnni", calibration="absmax", smooth_alpha="auto", train_steps=0)
            run_sasq(load_model(MODEL), cfg, DATA, progress=False).state.save(state_dir)
        return _export_state(name, ScaleState.load(state_dir))
    if name == "sasq-ce-best":
        return _export_state(name, ScaleState.load(HERE / "results" / "accuracy_smollm2" / "best_state").with_profile("cpu-vnni"))
    if name == "default":
        return OUT.parent.parent / ".work" / "quality_default" / "model.onnx"
    if name in EARLIER:
        return OUT.parent.parent / ".work" / f"quality_default_{EARLIER[name]}" / "model.onnx"
    return _export_state(name, ScaleState.load(OUT / "states" / name))


def eval_stage(args) -> None:
    import torch

    from runtime.folder import load_tokenizer
    from runtime.perplexity import perplexity as onnx_ppl
    from runtime.session import open_session
    from sasq_edge.evaluate import perplexity as torch_ppl

    torch.set_num_threads(args.threads)
    path = eval_path(args.seq_len, args.windows)
    res = _load(path) or {"rows": {}, "machine": machine(), "seq_len": args.seq_len, "windows_cap": args.windows}
    windows = eval_windows_all(load_tokenizer(str(Path(MODEL))), args.seq_len, args.windows)
    for name in args.rows or ROWS:
        row = res["rows"].setdefault(name, {})
        todo = [d for d in windows if d not in row]
        if not todo:
            continue
        model = _row_model(name)
        for d in todo:
            t0 = time.perf_counter()
            if isinstance(model, Path):
                r = onnx_ppl(open_session(model, ["cpu"], args.threads), windows[d], desc=f"{name} {d}")
            else:
                r = torch_ppl(model, windows[d], desc=f"{name} {d}")
            row[d] = {"ppl": r.ppl, "windows": r.windows, "tokens": r.tokens, "eval_s": round(time.perf_counter() - t0, 1),
                      "runtime": "onnxruntime" if isinstance(model, Path) else "pytorch"}
            _write(path, res)
            print(name, d, f"{r.ppl:.4f}", flush=True)


# --- report ----------------------------------------------------------------------------------------

LABELS = {
    "fp32": "FP32 (ONNX Runtime, our float export)",
    "dynamic": "dynamic per-token W8A8 (PyTorch: not exportable)",
    "smoothquant": "SmoothQuant static (absmax, alpha searched, no training)",
    "sasq-ce-best": "SASQ, cross-entropy on WikiText (the best end-to-end run: 2048 x 200 steps, GPU)",
    "sasq-ce-wiki": "SASQ, cross-entropy on WikiText, 512 x 50",
    "sasq-kd-wiki": "SASQ, distillation on WikiText, 512 x 50",
    "sasq-kd-self": f"SASQ, distillation on self-generated text ({SELF}), 512 x 50",
    "sasq-kd-mix": f"SASQ, distillation on a mix (0.5 WikiText + 0.5 {SELF}), 512 x 50",
    "default-norot": "the default command before rotation (the same recipe, --rotate-block 0)",
    "default-down": "the same with only the down projections' input rotated (blocks of 64)",
    "default": "the default command: `sasq-export out/model.onnx --model M` (distillation on the mix, 512 x 100, "
               "inputs of q/k/v, gate/up and down rotated in Hadamard blocks of 64)",
}
DOMAIN_NAMES = {"wiki": "WikiText-2 test (148 x 2048)", "code": "code (32 x 2048)", "docs": "docs (32 x 2048)",
                "legal": "legal (25 x 2048)"}


def _main_job(name: str) -> list[dict]:
    """The rows of bench/main_job.py's run of the default command: the current one, or that of an
    earlier default (kept as quality_smollm2/main_job_<norot|down>.json)."""
    path = HERE / "results" / "main_job.json" if name == "default" else OUT / f"main_job_{EARLIER[name]}.json"
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def report_stage(args) -> None:
    curve, variants, default = (_load(OUT / f) for f in ("curve.json", "variants.json", "default.json"))
    path = eval_path(args.seq_len, args.windows)
    if not path.is_file():  # a report of blanks would overwrite the committed table
        raise SystemExit(f"no evaluation at {args.windows or 'all'} x {args.seq_len} ({path.name} is missing): "
                         "run `eval` with the same --seq-len/--windows first, or pass the ones it used "
                         "(the committed table: --seq-len 512 --windows 16)")
    ev = _load(path)
    if (args.seq_len, args.windows) != (2048, None):  # the shorter protocol: the first N windows of each domain
        for d in DOMAIN_NAMES:
            DOMAIN_NAMES[d] = f"{d} ({args.windows} x {args.seq_len})"
    rows = ev.get("rows", {})
    fp32 = rows.get("fp32", {})
    result = {"model": "SmolLM2-135M-Instruct (Q4_1-dequantized)", "curve": curve, "variants": variants, "default": default,
              "eval": ev, "domains": DOMAIN_NAMES}
    lines = ["# Quality on text the scales never saw", "",
             "SmolLM2-135M-Instruct (Q4_1-dequantized). Every exported row is the fused cpu-vnni graph on ONNX Runtime "
             "(2 threads, this CPU); PPL per domain and its ratio to FP32. Calibration and training read WikiText-2 "
             "*validation* (or self-generated text); code, docs and legal come from text that ships with Python and "
             "Debian (bench/domains.py) and no calibration or training text comes from them.", "",
             "| configuration | " + " | ".join(DOMAIN_NAMES.values()) + " | training on this CPU |",
             "| --- | " + " | ".join("---" for _ in DOMAIN_NAMES) + " | --- |"]
    for name in ROWS:
        r = rows.get(name, {})
        cells = []
        for d in DOMAIN_NAMES:
            if d in r and d in fp32:
                cells.append(f"{r[d]['ppl']:.3f} ({r[d]['ppl'] / fp32[d]['ppl']:.3f}x)")
            else:
                cells.append("—")
        if name in variants.get("rows", {}):
            t = f"{variants['rows'][name]['run_sasq_s'] / 60:.1f} min"
        elif name == "default" and default:
            t = f"{default['wall_s'] / 60:.1f} min (whole command)"
        elif name in ("default", *EARLIER) and (job := _main_job(name)):  # bench/main_job.py ran it
            wall = next(r["wall_s"] for r in job if r["command"].startswith("sasq-export") and "--scales" not in r["command"])
            t = f"{wall / 60:.1f} min (whole command, bench/main_job.py)"
        else:
            t = "—"
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + f" | {t} |")
    if variants.get("rows") and curve.get("float"):
        f = curve["float"]
        lines += ["", "How the rows were chosen: perplexity on the held-out selection sets (PyTorch fake-quant; WikiText-2 "
                  "validation tail, code and docs windows after the evaluation ones; none of them trains):", "",
                  "| configuration | wiki held-out | code held-out | docs held-out |", "| --- | --- | --- | --- |",
                  f"| float | {f['wiki']:.3f} | {f['code']:.3f} | {f['docs']:.3f} |"]
        for name, r in variants["rows"].items():
            sp = r["select_ppl"]
            lines.append(f"| {LABELS.get(name, name)} | {sp['wiki']:.3f} | {sp['code']:.3f} | {sp['docs']:.3f} |")
    if curve.get("runs"):
        lines += ["", "Quality against the training budget (held-out selection sets, PyTorch fake-quant; alpha 0.9, "
                  "distillation, cosine, lr 0.01):", "",
                  "| seq_len x steps | wiki held-out | code held-out | docs held-out | s/step |", "| --- | --- | --- | --- | --- |"]
        lines.append(f"| float | {curve['float']['wiki']:.3f} | {curve['float']['code']:.3f} | {curve['float']['docs']:.3f} | — |")
        for r in curve["runs"].values():
            sp = r["select_ppl"]
            lines.append(f"| {r['seq_len']} x {r['steps']} | {sp['wiki']:.3f} | {sp['code']:.3f} | {sp['docs']:.3f} | "
                         f"{r['s_per_step']} |")
    (OUT.parent / "quality_smollm2.md").write_text("\n".join(lines) + "\n")
    (OUT.parent / "quality_smollm2.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, fp32)
    print("\n".join(lines))


def plot(rows: dict, fp32: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ROWS if n != "fp32" and all(d in rows.get(n, {}) for d in DOMAIN_NAMES)]
    if not names or not fp32:
        return
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(DOMAIN_NAMES)
    for k, d in enumerate(DOMAIN_NAMES):
        ratios = [rows[n][d]["ppl"] / fp32[d]["ppl"] for n in names]
        ax.bar([i + k * width for i in range(len(names))], ratios, width, label=DOMAIN_NAMES[d])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(1.02, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks([i + width * (len(DOMAIN_NAMES) - 1) / 2 for i in range(len(names))])
    ax.set_xticklabels(names, rotation=20, ha="right")
    ax.set_ylabel("perplexity / FP32")
    ax.set_title("SmolLM2-135M static W8A8 on ONNX Runtime: ratio to FP32 per text domain (dashed: +2 %)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "ratio_by_domain.png", dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["curve", "variants", "default", "eval", "report"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--objective", default="kd")
    p.add_argument("--rows", nargs="*", help="eval: only these rows")
    p.add_argument("--seq-len", type=int, default=2048, help="eval: window length (default 2048, the full protocol)")
    p.add_argument("--windows", type=int, default=None, help="eval: the first N windows of each domain (default: all)")
    args = p.parse_args()
    {"curve": curve_stage, "variants": variants_stage, "default": default_stage, "eval": eval_stage,
     "report": report_stage}[args.stage](args)


if __name__ == "__main__":
    main()
