"""The plain default command at every model size: SmolLM2-135M-Instruct (Q4_1-dequantized) and
Qwen2.5-Coder-0.5B / -1.5B-Instruct (Q4_K_M-dequantized) on this CPU.

    python bench/blockwise.py export smollm2 [--rows default,calibration,float]
    python bench/blockwise.py eval smollm2          # ONNX Runtime, 16 x 512 on wiki, code, docs, legal
    python bench/blockwise.py float-torch qwen1.5b # the float reference in PyTorch where the float export does not fit
    python bench/blockwise.py report               # bench/results/blockwise.{json,md}
    python bench/blockwise.py project qwen1.5b     # the first blocks of the pass, the rest projected (also: 7b)
    python bench/blockwise.py sampler qwen1.5b     # the default mix's sampled text: float32 model against the bf16 sampler

Rows, each the command a user types (``SASQ_DATA_DIR`` set to the offline WikiText-2 folder;
``--rows default@vnni`` measures a row again under its own name, on another machine):

- ``default``: ``sasq-export OUT/model.onnx --model M``: wall time and peak RSS of the process
  (``os.wait4``'s ``ru_maxrss`` of that child alone);
- ``wikitext``: ``--data wikitext2``: the default command calibrated on WikiText-2 alone, without
  the default mix's text sampled from the float model;
- ``calibration``: ``--no-blockwise --train-steps 0 --data wikitext2``: calibration only, what a
  model too big for end-to-end training got before block-wise training (for the GGUF models with
  ``--layerwise`` on their converted folder: PTQ one layer at a time, SmoothQuant alpha 0.5);
- ``float``: ``--float``: the reference every ratio is taken against (the same file's float export).

Evaluation: ``sasq-ppl``'s computation (``runtime.perplexity`` on ``runtime.open_session``) on the
first 16 windows of 512 tokens of WikiText-2 raw test and of the code, docs and legal domains of
bench/domains.py. Results accumulate in bench/results/blockwise/<model>.json (resumable).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
ROOT = HERE.parent
OUT = HERE / "results" / "blockwise"
WORK = HERE / ".work" / "blockwise"
ASSETS = Path(os.environ.get("SASQ_ASSETS", str(Path.home() / ".cache" / "sasq-assets")))
DATA = os.environ.get("SASQ_DATA_DIR", str(ROOT.parent / "shared" / "assets" / "wikitext2"))
MODELS = {
    "smollm2": (os.environ.get("SASQ_SMOLLM2_DIR", str(ASSETS / "smollm2-135m-instruct")),
                "SmolLM2-135M-Instruct (Q4_1-dequantized)"),
    "qwen0.5b": (str(ASSETS / "qwen" / "qwen2.5-coder-0.5b-instruct.gguf"), "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M-dequantized)"),
    "qwen1.5b": (str(ASSETS / "qwen" / "qwen2.5-coder-1.5b-instruct.gguf"), "Qwen2.5-Coder-1.5B-Instruct (Q4_K_M-dequantized)"),
}
ROWS = {
    "default": [],
    "wikitext": ["--data", "wikitext2"],
    "calibration": ["--no-blockwise", "--train-steps", "0", "--data", "wikitext2"],
    "float": ["--float"],
}
SEQ_LEN, WINDOWS = 512, 16
DOMAINS = ("wiki", "code", "docs", "legal")


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def machine() -> dict:
    import onnxruntime

    flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0] if Path("/proc/cpuinfo").is_file() else ""
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "avx512_vnni": "avx512_vnni" in flags, "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def run_command(argv: list[str], log: Path) -> dict:
    """Run ``argv`` with its output in ``log``: exit code, wall seconds, peak RSS of that process
    (MiB) and its last output line."""
    env = {**os.environ, "SASQ_DATA_DIR": DATA, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        t = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines = [ln for ln in log.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
    return {"command": shlex.join(argv), "exit": proc.returncode, "wall_s": round(wall, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "last_line": lines[-1] if lines else "",
            "plan": next((ln for ln in lines if "training block by block" in ln), None)}


def model_results(folder: Path):
    """(model key, results) of each model with a results file in ``folder``, in ``MODELS`` order."""
    for key in MODELS:
        res = _load(folder / f"{key}.json")
        if res:
            yield key, res


def pending_rows(path: Path, args) -> tuple[dict, list[str]]:
    """The results in ``path`` (new ones: the model and this machine) and the rows of ``--rows``
    still to run (every one with ``--force``)."""
    res = _load(path) or {"model": MODELS[args.model][1], "machine": machine(), "rows": {}}
    return res, [r for r in args.rows.split(",") if args.force or res["rows"].get(r, {}).get("exit") != 0]


def export_stage(args) -> None:
    path = OUT / f"{args.model}.json"
    res, rows = pending_rows(path, args)
    for row in rows:
        onnx = WORK / args.model / row / "model.onnx"
        model, extra = MODELS[args.model][0], list(ROWS[row.split("@")[0]])
        if row == "calibration" and model.endswith(".gguf"):
            # what a model read layer by layer got before block-wise training: PTQ one layer at a time,
            # SmoothQuant alpha 0.5, through the GGUF's converted folder (the default row made it)
            from sasq_edge.gguf import materialize

            model, extra = str(materialize(model)), [*extra, "--layerwise"]
        argv = ["sasq-export", str(onnx), "--model", model, *extra]
        print("running", shlex.join(argv), flush=True)
        got = {**run_command(argv, WORK / args.model / f"{row}.log"), "machine": machine()}
        if got["exit"] == 0 and (onnx.parent / "recipe.json").is_file():
            recipe = json.loads((onnx.parent / "recipe.json").read_text())
            bw = recipe.get("training", {}).get("blockwise")
            got["recipe"] = {k: recipe.get("method", {}).get(k) for k in ("blockwise", "block_steps", "block_windows",
                                                                         "train_steps", "smooth_alpha", "rotate_block")}
            got["data"] = recipe.get("training", {}).get("data")
            got["heldout"] = recipe.get("training", {}).get("heldout")
            if bw:
                got["blockwise"] = {k: v for k, v in bw.items() if k != "per_block"}
                got["per_block"] = [{k: b[k] for k in ("block", "ptq_error", "trained_error", "alpha", "seconds")}
                                    for b in bw["per_block"]]
        res["rows"][row] = got
        _write(path, res)
        print(row, {k: got[k] for k in ("exit", "wall_s", "peak_rss_mb", "last_line")}, flush=True)


def eval_windows(tokenizer) -> dict[str, np.ndarray]:
    from domains import text

    from runtime.data import load_text, make_windows, tokenize

    out = {"wiki": make_windows(tokenize(load_text("test", DATA), tokenizer), SEQ_LEN, WINDOWS)}
    for d in DOMAINS[1:]:
        out[d] = make_windows(tokenize(text(d), tokenizer), SEQ_LEN, WINDOWS)
    return out


def eval_stage(args) -> None:
    eval_rows(OUT / f"{args.model}.json", WORK / args.model, args.threads, args.model)


def eval_rows(path: Path, work: Path, threads: int, label: str) -> tuple[dict, dict[str, Path]]:
    """ONNX Runtime perplexity of every exported row of ``path`` (``work/ROW/model.onnx``) on every
    domain not yet measured, written back as it goes. Returns the results and the rows' files."""
    from runtime.folder import load_tokenizer
    from runtime.perplexity import perplexity
    from runtime.session import open_session

    res = _load(path)
    windows, done = None, {}
    for row, got in res.get("rows", {}).items():
        onnx = work / row / "model.onnx"
        if got.get("exit") != 0 or not onnx.is_file():
            continue
        done[row] = onnx
        ppl = got.setdefault("ppl", {})
        todo = [d for d in DOMAINS if d not in ppl]
        if not todo:
            continue
        windows = windows or eval_windows(load_tokenizer(str(onnx.parent)))
        session = open_session(onnx, ["cpu"], threads)
        for d in todo:
            t = time.perf_counter()
            r = perplexity(session, windows[d], desc=f"{row} {d}")
            ppl[d] = {"ppl": r.ppl, "windows": r.windows, "tokens": r.tokens, "eval_s": round(time.perf_counter() - t, 1)}
            _write(path, res)
            print(label, row, d, f"{r.ppl:.4f}", flush=True)
        del session
    return res, done


def float_torch_stage(args) -> None:
    """The float reference of a model whose float ONNX export does not fit this machine's memory
    (the 1.5B model: the export holds several copies of its 6 GB of float32 weights): its
    perplexity in PyTorch, float32, on the same windows (row ``float``, marked ``torch``). The
    float ONNX export and PyTorch agree to float32 noise on the smaller models (``float`` rows)."""
    import torch

    from sasq_edge.evaluate import perplexity
    from sasq_edge.gguf import materialize
    from sasq_edge.models import load_model

    torch.set_num_threads(args.threads)
    path = OUT / f"{args.model}.json"
    res = _load(path)
    model = MODELS[args.model][0]
    lm = load_model(str(materialize(model)) if model.endswith(".gguf") else model)
    row = res["rows"].setdefault("float", {"command": "PyTorch float32 (sasq_edge.evaluate.perplexity)", "exit": 0,
                                           "wall_s": 0.0, "peak_rss_mb": 0.0, "last_line": "float (PyTorch)",
                                           "runtime": "torch"})
    ppl = row.setdefault("ppl", {})
    windows = eval_windows(lm.tokenizer)
    for d in DOMAINS:
        if d in ppl:
            continue
        t = time.perf_counter()
        r = perplexity(lm.model, windows[d], desc=f"float {d}")
        ppl[d] = {"ppl": r.ppl, "windows": int(windows[d].shape[0]), "tokens": r.tokens, "eval_s": round(time.perf_counter() - t, 1)}
        _write(path, res)
        print(args.model, "float (torch)", d, f"{r.ppl:.4f}", flush=True)


def project_stage(args) -> None:
    """The block-wise pass of the default recipe on the first ``--blocks`` blocks of a model read
    layer by layer (a GGUF through its converted folder; ``7b``: a random bf16 Llama-2-7B-shaped
    checkpoint made once under ``--work``), in a child process (its own peak RSS), and the whole
    pass projected from the median time per block. For models whose whole command does not fit a
    session's time here."""
    if args.model == "7b":
        from memory_scale import make_checkpoint

        folder = Path(args.work) / "7B"
        make_checkpoint("7B", folder)
        label = "random Llama-2-7B shape (bf16 safetensors)"
    else:
        from sasq_edge.gguf import materialize

        folder = materialize(MODELS[args.model][0])
        label = MODELS[args.model][1]
    argv = [sys.executable, str(Path(__file__).resolve()), "project-child", str(folder), str(args.blocks),
            "random" if args.model == "7b" else "wikitext2"]
    got = run_command(argv, WORK / f"project_{args.model}.log")
    if got["exit"] != 0:
        raise SystemExit(f"the child failed: {got['last_line']}")
    child = json.loads(got["last_line"])
    per_block = float(np.median([b["seconds"] for b in child["per_block"]]))
    # the setup (capture, the alpha search's sweep) ran over the measured blocks only: its share per
    # block counts for every block (an upper bound: the capture is counted once a block too)
    projected = child["layers"] * (per_block + child["setup_s"] / len(child["per_block"]))
    res = {"model": label, **child, "peak_rss_mb": got["peak_rss_mb"], "seconds_per_block_median": round(per_block, 1),
           "projected_pass_s": round(projected),
           "summary": (f"{label}: the block-wise pass of the default recipe ({child['steps']} steps a block on "
                       f"{child['windows']} windows of {child['seq_len']} tokens), read layer by layer, measured on its first "
                       f"{len(child['per_block'])} of {child['layers']} blocks: peak RSS {got['peak_rss_mb'] / 1024:.2f} GiB, "
                       f"{per_block:.0f} s a block (median; phases of the last: {child['per_block'][-1]['phases']}), capture "
                       f"and the alpha search's sweep over those blocks {child['setup_s']:.0f} s; the whole pass projected at "
                       f"{projected / 60:.0f} min on this CPU (each block's share of that sweep included), before the GGUF "
                       "conversion and the export. On one GPU: not measured (no GPU was lent).")}
    _write(OUT / f"project_{args.model}.json", res)
    print(res["summary"])


def project_child(args) -> None:
    import torch

    from runtime.data import sample_windows
    from sasq_edge.blockwise import train_blockwise
    from sasq_edge.config import QuantConfig
    from sasq_edge.layerwise import LayerwiseModel
    from sasq_edge.models import LoadedModel
    from sasq_edge.pipeline import training_data

    cfg = QuantConfig.from_recipe("default", profile="cpu-vnni", train_steps=0)
    lw = LayerwiseModel(args.folder)
    if args.data == "random":
        windows = np.random.default_rng(0).integers(0, 257, (cfg.block_windows, cfg.seq_len))
    else:
        from transformers import AutoTokenizer

        lm = LoadedModel(lw.model, AutoTokenizer.from_pretrained(args.folder), args.folder)
        windows = sample_windows(training_data(lm, cfg, DATA, "wikitext2", progress=False).windows, cfg.block_windows, cfg.seed)
    t = time.perf_counter()
    res = train_blockwise(lw, cfg, windows, str(args.folder), progress=False, max_blocks=int(args.blocks))
    wall = time.perf_counter() - t
    blocks = [b.to_dict() for b in res.blocks]
    print(json.dumps({"layers": lw.layers, "steps": cfg.block_steps, "windows": cfg.block_windows, "seq_len": cfg.seq_len,
                      "per_block": blocks, "setup_s": round(wall - sum(b["seconds"] for b in blocks), 1),
                      "threads": torch.get_num_threads()}))


def sampler_stage(args) -> None:
    """What sampling the default mix's text costs (the 8 sequences of 512 tokens the layer-by-layer
    pass reads, seed 0), each kind in a fresh child process (its own peak RSS): ``float``, the whole
    float32 model, and ``bf16``, the sampler the command builds above ``SAMPLER_BF16_ABOVE`` on a
    CPU with native bf16 (read one layer at a time, cast to bf16). A last child loads the float
    model and scores every sample set (perplexity per token): text a cheaper sampler writes should
    look to the float model like its own. ``--kinds`` picks which to (re)sample; the others keep
    their recorded results and samples."""
    from sasq_edge.gguf import materialize

    model = MODELS[args.model][0]
    folder = materialize(model) if model.endswith(".gguf") else Path(model)
    path = OUT / f"sampler_{args.model}.json"
    res = _load(path) or {"model": MODELS[args.model][1], "machine": machine(), "kinds": {}}
    work = WORK / "sampler"
    for kind in args.kinds.split(","):
        argv = [sys.executable, str(Path(__file__).resolve()), "sampler-child", str(folder), kind, str(work)]
        got = run_command(argv, WORK / f"sampler_{args.model}_{kind}.log")
        if got["exit"] != 0:
            raise SystemExit(f"the {kind} child failed: {got['last_line']}")
        res["kinds"][kind] = {**json.loads(got["last_line"]), "peak_rss_mb": got["peak_rss_mb"], "wall_s": got["wall_s"]}
        print(kind, res["kinds"][kind], flush=True)
        _write(path, res)
    argv = [sys.executable, str(Path(__file__).resolve()), "sampler-child", str(folder), "score", str(work)]
    got = run_command(argv, WORK / f"sampler_{args.model}_score.log")
    if got["exit"] != 0:
        raise SystemExit(f"the scoring child failed: {got['last_line']}")
    for kind, ppl in json.loads(got["last_line"]).items():
        if kind in res["kinds"]:
            res["kinds"][kind]["float_ppl_of_text"] = ppl
    res["summary"] = sampler_summary(res)
    _write(path, res)
    print(res["summary"])


def sampler_summary(res: dict) -> str:
    parts, notes = [], []
    for kind, k in res["kinds"].items():
        parts.append(f"{kind} {k['build_s'] + k['sample_s']:.0f} s (load {k['build_s']:.0f} s), peak RSS "
                     f"{k['peak_before_scoring_mb'] / 1024:.2f} GiB, the float model's perplexity on its text "
                     f"{k.get('float_ppl_of_text', float('nan')):.2f}")
        if k.get("note"):
            notes.append(f"{kind}: {k['note']}")
    m = res.get("machine", {})
    cpu = "an AVX512-VNNI/BF16 CPU" if m.get("avx512_vnni") else "an AVX2 CPU"
    return (f"{res['model']}, {m.get('cores')} cores of {cpu}: sampling 8 x 512 tokens of the default mix: " + "; ".join(parts)
            + "." + "".join(f" Note, {n}." for n in notes))


def sampler_child(args) -> None:
    import tempfile

    import torch
    from transformers import AutoTokenizer

    from runtime.sources import parse_data_spec
    from sasq_edge.data import bos_of, self_windows
    from sasq_edge.evaluate import perplexity
    from sasq_edge.layerwise import bf16_sampler
    from sasq_edge.models import LoadedModel, load_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.kind == "score":  # the float model scores every sample set present
        model = load_model(args.folder).model
        print(json.dumps({f.stem: perplexity(model, np.load(f), desc=f"score {f.stem}").ppl for f in sorted(work.glob("*.npy"))}))
        return
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp()  # sample afresh, never from a cache
    t = time.perf_counter()
    model = bf16_sampler(Path(args.folder)) if args.kind == "bf16" else load_model(args.folder).model
    build = time.perf_counter() - t
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    source = parse_data_spec("self:8").sources[0]
    t = time.perf_counter()
    tokens, _ = self_windows(LoadedModel(model, tokenizer, args.folder), source, SEQ_LEN, bos_of(tokenizer), progress=False,
                             log=lambda line: None)
    sample = time.perf_counter() - t
    np.save(work / f"{args.kind}.npy", tokens)
    peak = int(next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))) / 1024
    print(json.dumps({"build_s": round(build, 1), "sample_s": round(sample, 1), "peak_before_scoring_mb": round(peak, 1),
                      "threads": torch.get_num_threads()}))


LABELS = {"default": "the default command (block-wise)", "wikitext": "block-wise, calibrated on WikiText-2 alone",
          "calibration": "calibration only (no training)",
          "float": "float export (reference)"}


def report_stage(args) -> None:
    out = {"seq_len": SEQ_LEN, "windows": WINDOWS, "models": {}}
    lines = ["# The default command at every model size", "",
             f"`python bench/blockwise.py export|eval|report`. Perplexity on ONNX Runtime (CPU), the first {WINDOWS} "
             f"windows of {SEQ_LEN} tokens of WikiText-2 raw test and of the code, docs and legal domains "
             "(bench/domains.py), as a ratio to the same model's float export. Wall time and peak RSS of the "
             "`sasq-export` process on a 2-core machine; the profile column says which CPU a row ran on (cpu-avx2: "
             "an AVX2-only CPU, 7-bit weights; cpu-vnni: a VNNI CPU, 8-bit weights; the float export is the same "
             "on both). Rows measured while other work shared the 2 cores have inflated wall times (marked).", ""]
    for key, res in model_results(OUT):
        out["models"][key] = res
        rows = res["rows"]
        ref = rows.get("float", {}).get("ppl", {})
        lines += [f"## {res['model']}", "", "| row | command | profile | wall | peak RSS | " + " | ".join(DOMAINS) + " |",
                  "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in DOMAINS) + " |"]
        for row, got in rows.items():
            cells = []
            for d in DOMAINS:
                p = got.get("ppl", {}).get(d, {}).get("ppl")
                r = ref.get(d, {}).get("ppl")
                cells.append("—" if p is None else f"{p:.3f}" + ("" if row == "float" or r is None else f" ({p / r:.3f}x)"))
            flags = " ".join(ROWS[row.split("@")[0]]) or "(plain)"
            if "--layerwise" in got.get("command", ""):
                flags += " --layerwise` on the converted folder `"
            prof = re.search(r"profile ([\w-]+)", got.get("last_line", ""))
            shared = " (cores shared)" if got.get("cores_shared") else ""
            if got.get("runtime") == "torch":  # the float reference computed in PyTorch (float-torch stage)
                lines.append("| float, PyTorch float32 (reference: the float export does not fit this machine) | "
                             "`python bench/blockwise.py float-torch` | float | — | — | " + " | ".join(cells) + " |")
                continue
            base, _, where = row.partition("@")  # ROW@TAG: the same command measured again elsewhere
            label = LABELS.get(base, base) + (f" ({where})" if where else "")
            lines.append(f"| {label} | `{flags}` | {prof.group(1) if prof else '?'} | "
                         f"{got['wall_s'] / 60:.1f} min{shared} | "
                         f"{got['peak_rss_mb'] / 1024:.2f} GiB | " + " | ".join(cells) + " |")
        bw = rows.get("default", {}).get("blockwise")
        if bw:
            lines += ["", f"Block-wise pass: {bw['blocks']} blocks x {bw['steps_per_block']} steps on {bw['windows']} windows "
                          f"of {bw['seq_len']} tokens, {bw['wall_s'] / 60:.1f} min; mean relative reconstruction error "
                          f"{bw['error_ptq_mean']:.2e} after calibration, {bw['error_trained_mean']:.2e} after training."]
        notes = [f"{LABELS.get(r, r)}: {g['note']}" for r, g in rows.items() if g.get("note")]
        if notes:
            lines += ["", *(f"Note, {n}." for n in notes)]
        plan = rows.get("default", {}).get("plan")
        if plan:
            lines += ["", f"The command's plan line: `{plan.strip()}`"]
        lines.append("")
    for key in MODELS:
        samp = _load(OUT / f"sampler_{key}.json")
        if samp:
            samp["summary"] = sampler_summary(samp)
            out.setdefault("sampler", {})[key] = samp
            lines += [f"## Sampling the mix's text: {samp['model']}", "", f"`python bench/blockwise.py sampler {key}`: "
                      f"{samp['summary']}", ""]
    for key in [*MODELS, "7b"]:
        proj = _load(OUT / f"project_{key}.json")
        if proj:
            out.setdefault("projections", {})[key] = proj
            lines += [f"## Projection: {proj['model']}", "", f"`python bench/blockwise.py project {key}`: {proj['summary']}", ""]
    write_report("blockwise", out, lines)


def write_report(name: str, obj: dict, lines: list[str]) -> None:
    """bench/results/NAME.json and NAME.md; the table printed too."""
    _write(HERE / "results" / f"{name}.json", obj)
    (HERE / "results" / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def add_export_eval(sub, rows) -> argparse.ArgumentParser:
    """The ``export MODEL [--rows] [--force]`` and ``eval MODEL [--threads]`` stages; returns eval's parser."""
    e = sub.add_parser("export")
    e.add_argument("model", choices=list(MODELS))
    e.add_argument("--rows", default=",".join(rows))
    e.add_argument("--force", action="store_true")
    v = sub.add_parser("eval")
    v.add_argument("model", choices=list(MODELS))
    v.add_argument("--threads", type=int, default=2)
    return v


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="stage", required=True)
    add_export_eval(sub, ROWS)
    ft = sub.add_parser("float-torch")
    ft.add_argument("model", choices=list(MODELS))
    ft.add_argument("--threads", type=int, default=2)
    sub.add_parser("report")
    pr = sub.add_parser("project")
    pr.add_argument("model", choices=[*MODELS, "7b"])
    pr.add_argument("--blocks", type=int, default=3)
    pr.add_argument("--work", default="/tmp/sasq-scale", help="where the random 7B checkpoint is made once (13.5 GB)")
    sa = sub.add_parser("sampler")
    sa.add_argument("model", choices=list(MODELS))
    sa.add_argument("--kinds", default="float,bf16", help="the samplers to (re)sample: float, bf16, int8")
    sc = sub.add_parser("sampler-child")
    sc.add_argument("folder")
    sc.add_argument("kind", choices=["float", "bf16", "score"])
    sc.add_argument("work")
    ch = sub.add_parser("project-child")
    ch.add_argument("folder")
    ch.add_argument("blocks")
    ch.add_argument("data")
    args = p.parse_args()
    {"export": export_stage, "eval": eval_stage, "float-torch": float_torch_stage, "report": report_stage, "project": project_stage,
     "project-child": project_child, "sampler": sampler_stage, "sampler-child": sampler_child}[args.stage](args)


if __name__ == "__main__":
    main()
