"""The smallest file that keeps the quality: the default export against the same command with an
INT8 output head (``--int8-lm-head``: INT8 weight, trained activation scale), a weight-only INT8
embedding table (``--int8-embedding``), and both; the float export is the reference.

    python bench/smallest_file.py export smollm2 [--rows default,int8-head,...]   # sasq-export per row
    python bench/smallest_file.py eval smollm2       # perplexity (16 x 512, four domains), memory at run time
    python bench/smallest_file.py report             # bench/results/smallest_file.{json,md}

Each row is the command a user types (``SASQ_DATA_DIR`` set to the offline WikiText-2 folder), so
each trains its own scales (an INT8 embedding changes what the first block sees, an INT8 head
adds a trained scale). Evaluation: ``runtime.perplexity`` on the first 16 windows of 512 tokens of
WikiText-2 raw test and of the code, docs and legal domains (bench/domains.py), as a ratio to the
float export; file size (the ``.onnx`` and its external data); and, in one fresh process per row
and context (``bench/memory_runtime.py``'s child, default session settings, one thread), peak RSS,
time to first token and decode tokens/s with 512 and 2048 tokens of context, the rows interleaved.
The goal the decision is taken against: a perplexity cost under 0.3 % on every domain.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from blockwise import (  # noqa: E402
    DATA,
    DOMAINS,
    MODELS,
    SEQ_LEN,
    WINDOWS,
    _write,
    add_export_eval,
    eval_rows,
    model_results,
    pending_rows,
    run_command,
    write_report,
)

OUT = HERE / "results" / "smallest_file"
WORK = HERE / ".work" / "smallest_file"
ROWS = {
    "default": [],
    "int8-head": ["--int8-lm-head"],
    "int8-embedding": ["--int8-embedding"],
    "int8-head-embedding": ["--int8-lm-head", "--int8-embedding"],
    "float": ["--float"],
}
CONTEXTS, NEW_TOKENS = (512, 2048), 32
BUDGET = 0.003  # the largest perplexity cost on any domain at which the smaller file is worth it


def _file_mb(onnx: Path) -> float:
    return round(sum(f.stat().st_size for f in [onnx, *onnx.parent.glob(onnx.name + ".data")]) / 1e6, 1)


def export_stage(args) -> None:
    path = OUT / f"{args.model}.json"
    res, rows = pending_rows(path, args)
    for row in rows:
        onnx = WORK / args.model / row / "model.onnx"
        argv = ["sasq-export", str(onnx), "--model", MODELS[args.model][0], *ROWS[row]]
        print("running", " ".join(argv), flush=True)
        got = run_command(argv, WORK / args.model / f"{row}.log")
        if got["exit"] == 0:
            got["file_mb"] = _file_mb(onnx)
        res["rows"][row] = got
        _write(path, res)
        print(row, {k: got.get(k) for k in ("exit", "wall_s", "peak_rss_mb", "file_mb", "last_line")}, flush=True)


def _memory(onnx: Path, context: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(HERE / "memory_runtime.py"), "--child", str(onnx), "default", str(context),
                           str(NEW_TOKENS)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{onnx} at {context}: {proc.stderr.strip().splitlines()[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def eval_stage(args) -> None:
    path = OUT / f"{args.model}.json"
    res, done = eval_rows(path, WORK / args.model, args.threads, args.model)
    for context in CONTEXTS:  # the rows interleaved, one context at a time
        for row, onnx in done.items():
            mem = res["rows"][row].setdefault("memory", {})
            if str(context) in mem and not args.force:
                continue
            mem[str(context)] = _memory(onnx, context)
            _write(path, res)
            print(args.model, row, context, {k: round(v, 1) for k, v in mem[str(context)].items() if isinstance(v, float)},
                  flush=True)


def report_stage(args) -> None:
    out = {"seq_len": SEQ_LEN, "windows": WINDOWS, "budget": BUDGET, "models": {}}
    lines = ["# The smallest file that keeps the quality", "",
             "`python bench/smallest_file.py export|eval|report MODEL`: each row the plain `sasq-export` command with "
             "the flags shown (each trains its own scales). Perplexity on ONNX Runtime (CPU), the first "
             f"{WINDOWS} windows of {SEQ_LEN} tokens of WikiText-2 raw test and of the code, docs and legal domains "
             "(bench/domains.py), as a ratio to the float export; the cost of a row is its largest ratio to the "
             f"default row's on any domain (budget {100 * BUDGET:.1f} %). Memory at run time: one fresh process per row "
             f"and context, one thread, default session settings, prefill `context - {NEW_TOKENS}` tokens, decode "
             f"{NEW_TOKENS} (bench/memory_runtime.py's measurement); peak RSS in MiB, its ratio to the file's size.", ""]
    for key, res in model_results(OUT):
        out["models"][key] = res
        rows = res["rows"]
        ref = {d: rows.get("float", {}).get("ppl", {}).get(d, {}).get("ppl") for d in DOMAINS}
        base = {d: rows.get("default", {}).get("ppl", {}).get(d, {}).get("ppl") for d in DOMAINS}
        head = " | ".join(DOMAINS)
        mem_cols = " | ".join(f"peak MiB @{c} (x file) | TTFT ms @{c} | decode tok/s @{c}" for c in CONTEXTS)
        m = res.get("machine", {})
        cpu = "AVX512-VNNI (profile cpu-vnni)" if m.get("avx512_vnni") else "no VNNI"
        lines += [f"## {res['model']}", "", f"{m.get('cores')} cores, {cpu}, "
                  f"onnxruntime {m.get('onnxruntime')}; the default row's export ran while the test suite shared the cores "
                  "(its wall time only).", "", f"| row | flags | file MB | {head} | cost vs default | {mem_cols} |",
                  "| --- | --- | --- | " + " | ".join("---" for _ in DOMAINS) + " | --- | "
                  + " | ".join("--- | --- | ---" for _ in CONTEXTS) + " |"]
        for row, got in rows.items():
            if got.get("exit") != 0:
                continue
            ppl = {d: got.get("ppl", {}).get(d, {}).get("ppl") for d in DOMAINS}
            cells = ["—" if p is None else f"{p:.3f}" + ("" if row == "float" or not ref[d] else f" ({p / ref[d]:.3f}x)")
                     for d, p in ppl.items()]
            costs = [ppl[d] / base[d] - 1 for d in DOMAINS if ppl[d] and base[d]]
            cost = "—" if row in ("default", "float") or len(costs) < len(DOMAINS) else \
                f"{100 * max(costs):+.2f} % ({'within' if max(costs) < BUDGET else 'over'} budget)"
            got["cost"] = max(costs) if costs and row not in ("default", "float") else None
            mem = []
            for c in CONTEXTS:
                m = got.get("memory", {}).get(str(c))
                mem += ["—"] * 3 if m is None else [f"{m['peak_mb']:.0f} ({m['peak_mb'] * 2**20 / 1e6 / got['file_mb']:.2f}x)",
                                                     f"{m['ttft_ms']:.0f}", f"{m['decode_tokens_per_s']:.1f}"]
            lines.append(f"| {row} | `{' '.join(ROWS[row]) or '(plain)'}` | {got['file_mb']} | " + " | ".join(cells)
                         + f" | {cost} | " + " | ".join(mem) + " |")
        lines.append("")
    write_report("smallest_file", out, lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="stage", required=True)
    v = add_export_eval(sub, ROWS)
    v.add_argument("--force", action="store_true", help="measure the memory again")
    sub.add_parser("report")
    args = p.parse_args()
    os.environ.setdefault("SASQ_DATA_DIR", DATA)
    {"export": export_stage, "eval": eval_stage, "report": report_stage}[args.stage](args)


if __name__ == "__main__":
    main()
