"""CPU speed against the runtimes engineers pick instead: SmolLM2-135M-Instruct, batch 1,
2 threads, this machine, one run with the rows interleaved.

Rows: ONNX Runtime FP32 (our float export, traced); ours (the fused CPU graph, profile auto, with
and without the INT8 head; the traced graph of the same scales; ours through ONNX Runtime GenAI's
generator); ONNX Runtime GenAI's own int8 and int4 builds (its model builder, its generator);
llama.cpp Q8_0 and Q4_0 (llama-bench, flash attention).

Per row and round, in a fresh process: prefill of 512 tokens (median of 3), decode step time at
context 512 and at 2048 (median of 16 steps after a prefill of that length), peak RSS. Rounds go
round-robin over the rows (``--rounds``); the table shows the median over rounds, the JSON keeps
every round. Perplexity (WikiText-2 raw test, first 16 windows of 512 tokens, our token windows
for every row; llama.cpp through llama-cpp-python's logits, or else its own llama-perplexity on the
same text, strided to 16 windows of 512 every 511 tokens) is measured once per row. Ratios are
within this run only: the machine is shared.

The side environments are given as paths, built from their registries, never committed:

    --genai-python /tmp/genai-venv/bin/python   (pip install onnxruntime-genai transformers torch==2.13.0)
    --genai-int8 DIR --genai-int4 DIR           (python -m onnxruntime_genai.models.builder -p int8|int4 -e cpu)
    --llama-bench /path/llama-bench --gguf-q8 F --gguf-q4 F   (a llama.cpp build; convert_hf_to_gguf + llama-quantize)
    --llama-python /tmp/llamacpp-venv/bin/python (pip install llama-cpp-python), for llama.cpp's perplexity
    --llama-perplexity /path/llama-perplexity   (the same build), the other way to it

    python bench/speed_smollm2.py --ours out/smollm2/model.onnx --ours-int8-head out/smollm2-head/model.onnx \\
        --traced out/smollm2-traced/model.onnx --float out/smollm2-float/model.onnx ...

Writes ``bench/results/speed_smollm2.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
DECODE_STEPS = 16

# --- one row, in its own process --------------------------------------------------------------

_ORT_ROW = r"""
import json, resource, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from runtime.session import open_session
path, threads, steps = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
sess = open_session(path, ["cpu"], threads)
rng = np.random.default_rng(0)
def prefill(n, capacity=None):  # sasq-generate's decoder: in place on the fused graph's shared buffer
    ids = rng.integers(100, 40000, (1, n))
    decoder = sess.decoder(1, capacity or n)
    t = time.perf_counter(); logits = decoder.step(ids); return time.perf_counter() - t, logits, decoder
def decode(n):
    _, logits, decoder = prefill(n, n + steps)
    times = []
    for _ in range(steps):
        token = np.array([[int(logits[0, -1].argmax())]])
        t = time.perf_counter(); logits = decoder.step(token); times.append(time.perf_counter() - t)
    return float(np.median(times))
prefill(64)  # warm-up
pre = float(np.median([prefill(512)[0] for _ in range(3)]))
out = {"prefill_512_ms": 1000 * pre, "decode_512_ms": 1000 * decode(512), "decode_2048_ms": 1000 * decode(2048),
       "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
print(json.dumps(out))
"""

_GENAI_ROW = r"""
import json, resource, sys, time
import numpy as np
import onnxruntime_genai as og
folder, threads, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
config = og.Config(folder)
model = og.Model(config)
rng = np.random.default_rng(0)
def run(n, decode_steps):
    ids = rng.integers(100, 40000, n).astype(np.int32)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=n + decode_steps + 1, do_sample=False)
    gen = og.Generator(model, params)
    t = time.perf_counter(); gen.append_tokens(ids); pre = time.perf_counter() - t
    times = []
    for _ in range(decode_steps):
        t = time.perf_counter(); gen.generate_next_token(); times.append(time.perf_counter() - t)
    return pre, times
run(64, 1)
pre = float(np.median([run(512, 1)[0] for _ in range(3)]))
out = {"prefill_512_ms": 1000 * pre, "decode_512_ms": 1000 * float(np.median(run(512, steps)[1])),
       "decode_2048_ms": 1000 * float(np.median(run(2048, steps)[1])),
       "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
print(json.dumps(out))
"""


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def _run(cmd: list[str], env: dict | None = None, timeout: int = 1800) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({done.returncode}): {done.stderr[-1500:]}")
    return done.stdout


def measure_ort(path: str, threads: int) -> dict:
    return _last_json(_run([sys.executable, "-c", _ORT_ROW, str(ROOT), path, str(threads), str(DECODE_STEPS)]))


def measure_genai(python: str, folder: str, threads: int) -> dict:
    return _last_json(_run([python, "-c", _GENAI_ROW, folder, str(threads), str(DECODE_STEPS)]))


def measure_llama(bench: str, gguf: str, threads: int) -> dict:
    """llama-bench: prefill 512 and 2048, and prefill+32 decode steps at both; a decode step is
    (prefill+decode - prefill) / 32. Peak RSS from the child's rusage."""
    code = ("import json, resource, subprocess, sys\n"
            "out = subprocess.run(sys.argv[1:], capture_output=True, text=True, check=True).stdout\n"
            "print(json.dumps({'bench': json.loads(out), 'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")
    cmd = [bench, "-m", gguf, "-t", str(threads), "-fa", "1", "-p", "512,2048", "-n", "0", "-pg", "512,32", "-pg", "2048,32",
           "-r", "3", "-o", "json"]
    res = _last_json(_run([sys.executable, "-c", code, *cmd]))
    ms = {(t["n_prompt"], t["n_gen"]): t["avg_ns"] / 1e6 for t in res["bench"]}
    return {"prefill_512_ms": ms[(512, 0)], "decode_512_ms": (ms[(512, 32)] - ms[(512, 0)]) / 32,
            "decode_2048_ms": (ms[(2048, 32)] - ms[(2048, 0)]) / 32, "peak_rss_mb": res["rss"]}


# --- perplexity, once per row -------------------------------------------------------------------

_LLAMA_PPL = r"""
import json, math, sys
import numpy as np
from llama_cpp import Llama
gguf, windows, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=gguf, n_ctx=len(windows[0]), n_threads=threads, n_batch=len(windows[0]), logits_all=True, verbose=False)
nll, count = 0.0, 0
for w in windows:
    llm.reset()
    llm.eval(w)
    logits = np.array(llm.scores[:len(w)], dtype=np.float64)[:-1]
    m = logits.max(-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(-1))
    nll += float((lse - logits[np.arange(len(w) - 1), w[1:]]).sum()); count += len(w) - 1
print(json.dumps({"ppl": math.exp(nll / count), "tokens": count}))
"""


def windows_16x512(model_dir: str, data_dir: str) -> np.ndarray:
    from runtime.data import load_text, make_windows, tokenize
    from runtime.folder import load_tokenizer

    return make_windows(tokenize(load_text("test", data_dir), load_tokenizer(model_dir)), 512, 16)


def ppl_ort(path: str, windows: np.ndarray, threads: int) -> float:
    from runtime.perplexity import perplexity
    from runtime.session import open_session

    return perplexity(open_session(path, ["cpu"], threads), windows).ppl


def ppl_llama_cli(binary: str, gguf: str, data_dir: str, threads: int) -> float:
    """llama.cpp's own ``llama-perplexity`` in its strided mode on the same WikiText-2 test text:
    ``-c 257 -b 257 --ppl-stride 511`` gives windows of 512 tokens starting every 511 tokens, each
    predicting its last 511 (the first 16): our 16 x 512 protocol up to one token of overlap
    between neighbouring windows. Its tokens are llama.cpp's tokenization of the text."""
    import re
    import tempfile

    from runtime.data import load_text

    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8") as f:
        f.write(load_text("test", data_dir))
        f.flush()
        done = subprocess.run([binary, "-m", gguf, "-f", f.name, "-c", "257", "-b", "257", "--ppl-stride", "511", "--chunks", "16",
                               "-t", str(threads)], capture_output=True, text=True, timeout=1800)
    found = re.findall(r"\[16\]([0-9.]+),", done.stdout + done.stderr)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"{binary} failed ({done.returncode}): {(done.stdout + done.stderr)[-1500:]}")
    return float(found[-1])


def ppl_llama(python: str, gguf: str, windows: np.ndarray, threads: int) -> float:
    return _last_json(_run([python, "-c", _LLAMA_PPL, gguf, json.dumps(windows.tolist()), str(threads)]))["ppl"]


# --- the run ------------------------------------------------------------------------------------


def _size_mb(path: str) -> float:
    p = Path(path)
    files = [p] if p.is_file() else [f for f in p.iterdir() if f.suffix in (".onnx", ".data", ".gguf")]
    if p.is_file() and p.suffix == ".onnx":
        files += [f for f in p.parent.iterdir() if f.name.startswith(p.name + ".")]
    return sum(f.stat().st_size for f in files) / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--float", help="our float export (sasq-export --float)")
    p.add_argument("--ours", help="our export, profile auto (fused graph)")
    p.add_argument("--ours-int8-head", help="our export with --int8-lm-head")
    p.add_argument("--traced", help="the same scales exported with --graph traced")
    p.add_argument("--genai-python")
    p.add_argument("--genai-int8")
    p.add_argument("--genai-int4")
    p.add_argument("--llama-bench")
    p.add_argument("--llama-python")
    p.add_argument("--llama-perplexity", help="llama.cpp's llama-perplexity binary: the llama.cpp rows' perplexity "
                                              "(strided, see ppl_llama_cli) when --llama-python is not given")
    p.add_argument("--gguf-q8")
    p.add_argument("--gguf-q4")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "assets" / "wikitext2"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS / "speed_smollm2"))
    p.add_argument("--rounds-from", help="take the timing rounds from the log of an earlier run (printed lines "
                                        "'round N row: {...}'), measure only the perplexities")
    p.add_argument("--ppl-from", help="take each row's perplexity from the JSON of an earlier run where it has one "
                                     "(same exports), measure only the others")
    p.add_argument("--report", action="store_true", help="rewrite the table from the JSON the last run wrote")
    args = p.parse_args()
    if args.report:
        saved = json.loads(Path(args.out).with_suffix(".json").read_text())
        args.threads, args.rounds = saved["threads"], saved["rounds"]
        report(args, saved["rows"])
        return

    rows: dict[str, dict] = {}

    def add(name: str, label: str, measure, ppl, size_of: str) -> None:
        rows[name] = {"label": label, "measure": measure, "ppl": ppl, "size_mb": _size_mb(size_of), "rounds": []}

    windows = windows_16x512(str(Path(args.ours).parent), args.data_dir)
    t = args.threads
    add("ort-fp32", "ONNX Runtime FP32 (our float export, traced graph)", lambda: measure_ort(args.float, t),
        lambda: ppl_ort(args.float, windows, t), args.float)
    add("ours", "ours, profile auto, fused graph (float head)", lambda: measure_ort(args.ours, t),
        lambda: ppl_ort(args.ours, windows, t), args.ours)
    if args.ours_int8_head:
        add("ours-int8-head", "ours, profile auto, fused graph, INT8 head", lambda: measure_ort(args.ours_int8_head, t),
            lambda: ppl_ort(args.ours_int8_head, windows, t), args.ours_int8_head)
    if args.traced:
        add("ours-traced", "ours, the same scales, traced graph", lambda: measure_ort(args.traced, t),
            lambda: ppl_ort(args.traced, windows, t), args.traced)
    if args.genai_python:
        best = args.ours_int8_head or args.ours
        add("ours-genai", "ours (INT8 head), through ONNX Runtime GenAI's generator",
            lambda: measure_genai(args.genai_python, str(Path(best).parent), t), None, best)
        for name, folder in (("genai-int8", args.genai_int8), ("genai-int4", args.genai_int4)):
            if folder:
                add(name, f"ONNX Runtime GenAI {name[-4:]} (its model builder, its generator)",
                    lambda folder=folder: measure_genai(args.genai_python, folder, t),
                    lambda folder=folder: ppl_ort(str(Path(folder) / "model.onnx"), windows, t), folder)
    if args.llama_bench:
        for name, gguf in (("llama.cpp-Q8_0", args.gguf_q8), ("llama.cpp-Q4_0", args.gguf_q4)):
            if gguf:
                if args.llama_python:
                    ppl, method = (lambda gguf=gguf: ppl_llama(args.llama_python, gguf, windows, t)), \
                        "llama-cpp-python logits, our windows"
                elif args.llama_perplexity:
                    ppl, method = (lambda gguf=gguf: ppl_llama_cli(args.llama_perplexity, gguf, args.data_dir, t)), \
                        "llama-perplexity --ppl-stride 511: 16 windows of 512 every 511 tokens, llama.cpp's tokenization"
                else:
                    ppl, method = None, None
                add(name, f"llama.cpp {name.split('-')[1]} (llama-bench, flash attention)",
                    lambda gguf=gguf: measure_llama(args.llama_bench, gguf, t), ppl, gguf)
                rows[name]["ppl_method"] = method

    if args.rounds_from:  # the timing rounds a run printed before it stopped (its PPL stage failed)
        for line in Path(args.rounds_from).read_text().splitlines():
            if line.startswith("round ") and ": {" in line:
                name, data = line.split(" ", 2)[2].split(": ", 1)
                if name in rows:
                    rows[name]["rounds"].append(json.loads(data))
        args.rounds = min(len(r["rounds"]) for r in rows.values())
    for r in range(0 if args.rounds_from else args.rounds):
        for name, row in rows.items():
            row["rounds"].append(row["measure"]())
            print(f"round {r + 1} {name}: {json.dumps(row['rounds'][-1])}", flush=True)
    earlier = json.loads(Path(args.ppl_from).read_text())["rows"] if args.ppl_from else {}
    for name, row in rows.items():
        if earlier.get(name, {}).get("ppl_16x512") is not None:
            row["ppl_16x512"] = earlier[name]["ppl_16x512"]
        else:
            row["ppl_16x512"] = row["ppl"]() if row["ppl"] else None
        for key in ("prefill_512_ms", "decode_512_ms", "decode_2048_ms", "peak_rss_mb"):
            row[key] = float(np.median([x[key] for x in row["rounds"]]))
        del row["measure"], row["ppl"]
        print(name, row["ppl_16x512"], flush=True)
    report(args, rows)


def report(args, rows: dict[str, dict]) -> None:
    import onnxruntime

    fp32 = rows["ort-fp32"]
    result = {"model": "SmolLM2-135M-Instruct (Q4_1-dequantized)", "threads": args.threads, "rounds": args.rounds,
              "rounds_from_log": bool(getattr(args, "rounds_from", None)),
              "decode_steps": DECODE_STEPS, "machine": {"cpu": platform.processor() or platform.machine(),
                                                         "cores": os.cpu_count(), "onnxruntime": onnxruntime.__version__},
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"SmolLM2-135M-Instruct, batch 1, {args.threads} threads, medians over {args.rounds} interleaved rounds "
             f"(decode: median of {DECODE_STEPS} steps); PPL on WikiText-2 test, first 16 windows of 512 tokens.", "",
             "| configuration | prefill 512 ms | x FP32 | decode tok/s @512 | decode tok/s @2048 | file MB | peak RSS MB | PPL 16x512 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in rows.items():
        ppl = f"{row['ppl_16x512']:.3f}" if row["ppl_16x512"] else "—"
        # llama-bench (this build has no depth option) gives decode only as (prefill + 32 steps) - prefill:
        # at 2048 the difference of two ~5 s runs is noise (one round came out negative), so it is not shown
        d2048 = "—" if name.startswith("llama.cpp") else f"{1000 / row['decode_2048_ms']:.1f}"
        lines.append(f"| {row['label']} | {row['prefill_512_ms']:.0f} | {fp32['prefill_512_ms'] / row['prefill_512_ms']:.2f} | "
                     f"{1000 / row['decode_512_ms']:.1f} | {d2048} | {row['size_mb']:.1f} | "
                     f"{row['peak_rss_mb']:.0f} | {ppl} |")
    methods = {row["ppl_method"] for row in rows.values() if row.get("ppl_method") and row["ppl_16x512"]}
    if methods:
        lines += ["", *(f"llama.cpp rows' perplexity: {m}." for m in sorted(methods))]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
