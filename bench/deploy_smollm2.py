"""Deployment benchmark on SmolLM2-135M-Instruct: speed, size, memory and perplexity side by side.

Rows (batch 1, all on this machine in one run): PyTorch FP32; ONNX Runtime FP32 (our float
export, KV cache); ORT ``quantize_dynamic`` (per-channel INT8 weights, ``reduce_range``: its
best setting here); ORT ``quantize_static`` (QDQ, Percentile, per-channel,
``reduce_range``: its best setting here); and ours, SASQ-trained and exported, for each profile
that runs on this CPU: ``cpu-avx2`` (also with INT8 lm_head and embedding), ``cpu-vnni`` (the
8-bit-weight grid: it runs here, but AVX2's saturating kernel makes it inexact: the row shows
why cpu-avx2 exists) and ``trt`` (int8 activations: exact on ORT CPU, slow without VNNI).

Each row is measured in a fresh subprocess (peak RSS is that process's): prefill latency at
``--prefill`` tokens (median of ``--runs``), decode tokens/s at context ``--prefill`` (median of
``--decode`` single-token steps with the KV cache), and perplexity on the first ``--max-windows``
windows of ``--seq-len`` tokens. Artifacts are cached in ``--work``; ``--only-measure`` re-runs
the measurements on them. Writes ``bench/results/deploy_smollm2.{json,md}``.

    python bench/deploy_smollm2.py --model ~/.cache/sasq-assets/smollm2-135m-instruct \\
        --data-dir ../shared/assets/wikitext2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

# name -> (kind, how it is built)
OURS = {
    "sasq-cpu-avx2": ("cpu-avx2", {}),
    "sasq-cpu-avx2-int8-head-emb": ("cpu-avx2", {"lm_head": True, "embedding": "int8"}),
    "sasq-trt": ("trt", {}),
    "sasq-cpu-vnni": ("cpu-vnni", "from:sasq-trt"),  # same grids as trt: one training, two encodings
}
LABELS = {
    "torch-fp32": "PyTorch FP32 (eager, HF KV cache)",
    "ort-fp32": "ONNX Runtime FP32 (our float export)",
    "ort-dynamic": "ORT quantize_dynamic (per-channel s8 weights, reduce_range)",
    "ort-dynamic-8bit": "ORT quantize_dynamic (per-channel s8 weights, full 8-bit range)",
    "ort-static": "ORT quantize_static (QDQ, Percentile, per-channel, reduce_range, u8 act)",
    "sasq-cpu-avx2": "ours, SASQ, profile cpu-avx2",
    "sasq-cpu-avx2-int8-head-emb": "ours, SASQ, cpu-avx2 + INT8 lm_head + INT8 embedding",
    "sasq-trt": "ours, SASQ, profile trt (int8 act, ORT CPU)",
    "sasq-cpu-vnni": "ours, SASQ, profile cpu-vnni (8-bit weights: exact only on VNNI/ARM kernels)",
}


# --- building the artifacts ---------------------------------------------------------------------


def _done(path: Path) -> bool:
    return (path / "model.onnx").is_file()


def build_float(args, work: Path) -> None:
    from exporters import export_onnx
    from sasq_edge.models import load_model

    out = work / "ort-fp32"
    if _done(out):
        return
    lm = load_model(args.model)
    export_onnx(lm.model, out / "model.onnx", tokenizer=lm.tokenizer)


def build_ort_baselines(args, work: Path, calib: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    from exporters.ort_static import WindowReader

    src = work / "ort-fp32" / "model.onnx"
    for name, reduce_range in (("ort-dynamic", True), ("ort-dynamic-8bit", False)):
        out = work / name
        if not _done(out):
            out.mkdir(parents=True, exist_ok=True)
            quantize_dynamic(str(src), str(out / "model.onnx"), op_types_to_quantize=["MatMul"], per_channel=True,
                             reduce_range=reduce_range, weight_type=QuantType.QInt8)
    out = work / "ort-static"
    if not _done(out):
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        quantize_static(str(src), str(out / "model.onnx"), WindowReader(src, calib), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.Percentile)
        (out / "build.json").write_text(json.dumps({"quantize_static_s": time.perf_counter() - t0}))


def build_ours(args, work: Path) -> None:

    import torch

    from exporters import export_onnx
    from runtime.state import ScaleState
    from sasq_edge.config import QuantConfig
    from sasq_edge.evaluate import perplexity
    from sasq_edge.models import load_model
    from sasq_edge.pipeline import run_sasq
    from sasq_edge.state import apply_state

    torch.set_num_threads(args.threads)
    test = None
    for name, (profile, how) in OURS.items():
        out = work / name
        if _done(out):
            continue
        lm = load_model(args.model)
        if isinstance(how, str):  # re-encode another row's trained scales
            state = ScaleState.load(work / how.removeprefix("from:")).with_profile(profile)
            apply_state(lm.model, state)
            train_info = {"from": how.removeprefix("from:")}
        else:
            cfg = QuantConfig.plain(profile=profile, calibration="mse", calib_batches=args.calib_batches, train_steps=args.train_steps,
                              lr=args.lr, seq_len=args.seq_len, **how)
            result = run_sasq(lm, cfg, args.data_dir)

            state, report = result.state, result.report
            train_info = report.summary()
        if test is None:
            test = _test_windows(args, lm.tokenizer)
        twin = perplexity(lm.model, test, desc=f"{name} torch twin")
        t0 = time.perf_counter()
        export_onnx(lm.model, out / "model.onnx", state=state, tokenizer=lm.tokenizer)
        info = {"training": train_info, "export_s": time.perf_counter() - t0, "torch_twin_ppl": twin.ppl,
                "config": state.method}
        (out / "build.json").write_text(json.dumps(info, indent=2))


def _test_windows(args, tokenizer) -> np.ndarray:
    from runtime.data import load_text, make_windows, tokenize

    return make_windows(tokenize(load_text("test", args.data_dir), tokenizer), args.seq_len, args.max_windows)


def _cached_test_windows(work: Path) -> np.ndarray:
    """The test windows, tokenized once by the parent (a row's process imports no tokenizer
    library, so its peak RSS is the runtime's)."""
    return np.load(work / "test_windows.npy")


# --- measuring one row (runs in a subprocess) -----------------------------------------------------


def _median_ms(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def _torch_decode_fns(args, model, prompt):
    import torch

    ids = torch.from_numpy(prompt)

    def prefill():
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False)

    def decode() -> list[float]:
        steps = []
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(args.decode + 1):
                t = time.perf_counter()
                out = model(input_ids=token, past_key_values=past, use_cache=True)
                steps.append(time.perf_counter() - t)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return steps[1:]

    return prefill, decode


def _onnx_decode_fns(args, sess, prompt):
    def prefill():
        return sess.logits(prompt)

    def decode() -> list[float]:
        logits, past = sess.step(prompt, sess.cache.empty(1))
        steps = []
        for _ in range(args.decode + 1):
            token = logits[:, -1:].argmax(-1).astype(np.int64)
            t = time.perf_counter()
            logits, past = sess.step(token, past)
            steps.append(time.perf_counter() - t)
        return steps[1:]

    return prefill, decode


def measure_row(args, name: str, work: Path, what: str) -> dict:
    """``what="quality"``: perplexity, file size, fusion, peak RSS; ``what="timing"``: one round of
    prefill (median of ``--runs``) and decode (median of ``--decode`` steps)."""
    test = _cached_test_windows(work)
    prompt = test[0][: args.prefill][None].astype(np.int64)
    row: dict = {"name": name}
    if name == "torch-fp32":
        import torch

        from sasq_edge.evaluate import perplexity
        from sasq_edge.models import load_model

        torch.set_num_threads(args.threads)
        model = load_model(args.model).model
        prefill, decode = _torch_decode_fns(args, model, prompt)
        if what == "quality":
            row["ppl"] = perplexity(model, test, desc=name).ppl
            row["file_bytes"] = None
    else:
        from runtime import open_session, perplexity

        path = work / name / "model.onnx"
        sess = open_session(path, ["cpu"], args.threads)
        prefill, decode = _onnx_decode_fns(args, sess, prompt)
        if what == "quality":
            row["ppl"] = perplexity(sess, test, desc=name).ppl
            row["file_bytes"] = sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith("model.onnx"))
            if sess.profile is not None:
                from runtime.fusion import check_fusion

                fusion = check_fusion(path)
                row["fused_layers"] = f"{len(fusion.fused)}/{len(fusion.kernels)}"
    if what == "timing":
        row["prefill_ms"] = _median_ms(prefill, args.runs)
        row["decode_ms"] = 1000 * float(np.median(decode()))
    else:
        prefill()  # the peak RSS includes a 512-token prefill
        row["peak_rss_mb"] = _peak_rss_mb()
        build = work / name / "build.json"
        if build.is_file():
            row["build"] = json.loads(build.read_text())
    return row


def _run_row(name: str, what: str) -> dict:
    cmd = [sys.executable, __file__, "--measure-row", name, "--measure-what", what,
           *[a for a in sys.argv[1:] if a != "--only-measure"]]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"row {name} ({what}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_all(args, names: list[str]) -> list[dict]:
    """Quality once per row; timing in ``--rounds`` round-robin passes over all rows (each in a
    fresh process), so a slow spell of this shared machine hits every row, not one. A row's
    prefill and decode figures are the medians over the rounds."""
    rows = {}
    for name in names:
        print(f"quality {name} ...", flush=True)
        rows[name] = _run_row(name, "quality")
        print(f"  PPL {rows[name]['ppl']:.3f}, peak RSS {rows[name]['peak_rss_mb']:.0f} MB", flush=True)
    rounds: dict[str, list[dict]] = {n: [] for n in names}
    for k in range(args.rounds):
        for name in names:
            t = _run_row(name, "timing")
            rounds[name].append({"prefill_ms": t["prefill_ms"], "decode_ms": t["decode_ms"]})
            print(f"round {k + 1}/{args.rounds} {name}: prefill {t['prefill_ms']:.0f} ms, decode {t['decode_ms']:.1f} ms/token",
                  flush=True)
    for name in names:
        r = rows[name]
        r["rounds"] = rounds[name]
        r["prefill_ms"] = float(np.median([x["prefill_ms"] for x in rounds[name]]))
        r["decode_tokens_per_s"] = 1000.0 / float(np.median([x["decode_ms"] for x in rounds[name]]))
    return [rows[n] for n in names]


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ``ru_maxrss``: Linux carries that across
    fork+exec, so a child would report its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- greedy generation, ONNX Runtime against the PyTorch fake-quant twin ---------------------------

PROMPTS = ("The capital of France is", "Once upon a time, there was a", "The quick brown fox", "def fibonacci(n):")


def greedy_agreement(args, work: Path, names: list[str]) -> dict:
    """Per SASQ row and prompt: how many of ``--greedy-tokens`` greedy tokens from ONNX Runtime
    (KV cache) equal PyTorch's before the first difference."""
    import torch

    from runtime import open_session
    from runtime.generate import Sampling, generate
    from runtime.state import ScaleState
    from sasq_edge.evaluate import greedy_tokens
    from sasq_edge.models import load_model
    from sasq_edge.state import apply_state

    torch.set_num_threads(args.threads)
    out = {}
    for name in names:
        if not name.startswith("sasq-"):
            continue
        lm = load_model(args.model)
        apply_state(lm.model, ScaleState.load(work / name))
        sess = open_session(work / name / "model.onnx", ["cpu"], args.threads)
        out[name] = {}
        for prompt in PROMPTS:
            ids = lm.tokenizer(prompt)["input_ids"]
            a = greedy_tokens(lm.model, ids, args.greedy_tokens)
            b, _ = generate(sess, ids, Sampling(max_new_tokens=args.greedy_tokens))
            out[name][prompt] = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
        print(f"greedy agreement {name}: {out[name]}", flush=True)
    return out


# --- the report -------------------------------------------------------------------------------------


def machine(threads: int) -> dict:
    import onnxruntime as ort
    import torch

    flags, model_name = "", platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model_name:
                model_name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f" {f}" in flags]
    return {"cpu": model_name or platform.machine(), "isa": isa, "cores": os.cpu_count(), "threads": threads,
            "torch": torch.__version__, "onnxruntime": ort.__version__, "python": platform.python_version()}


def summarize(rows: list[dict]) -> dict:
    by = {r["name"]: r for r in rows}
    base = by.get("ort-fp32")
    for r in rows:
        if base:
            r["prefill_speedup_vs_ort_fp32"] = base["prefill_ms"] / r["prefill_ms"]
            r["decode_speedup_vs_ort_fp32"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        twin = r.get("build", {}).get("torch_twin_ppl")
        if twin:
            r["ppl_rel_diff_vs_torch_twin"] = abs(r["ppl"] - twin) / twin
    ours = by.get("sasq-cpu-avx2")
    dyns = [by[n] for n in ("ort-dynamic", "ort-dynamic-8bit") if n in by]
    dyn = min(dyns, key=lambda r: r["prefill_ms"]) if dyns else None
    targets = {}
    if ours and base and dyn:
        targets = {
            "prefill >= 1.5x ORT FP32": ours["prefill_speedup_vs_ort_fp32"] >= 1.5,
            "decode >= 2.5x ORT FP32": ours["decode_speedup_vs_ort_fp32"] >= 2.5,
            "prefill faster than ORT dynamic INT8": ours["prefill_ms"] < dyn["prefill_ms"],
            "decode faster than ORT dynamic INT8": ours["decode_tokens_per_s"] > dyn["decode_tokens_per_s"],
            "PPL within 0.5% of its PyTorch fake-quant twin": ours.get("ppl_rel_diff_vs_torch_twin", 1.0) <= 0.005,
        }
    return targets


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"SmolLM2-135M-Instruct (Q4_1-dequantized), batch 1, {m['cpu']} ({', '.join(m['isa'])}), "
        f"{m['threads']} threads, onnxruntime {m['onnxruntime']}, torch {m['torch']}.",
        f"Prefill: {r['prefill']} tokens, median of {r['runs']} runs. Decode: tokens/s at context {r['prefill']}, "
        f"median of {r['decode']} single-token steps with the KV cache. Timings: medians over {r.get('rounds', 1)} "
        f"round-robin passes over all rows, each row in a fresh process. PPL: WikiText-2 raw test, first "
        f"{r['windows']} windows of {r['seq_len']} tokens. Peak RSS: the process that ran the row's perplexity.",
        "",
        "| configuration | PPL | prefill ms | x ORT FP32 | decode tok/s | x ORT FP32 | file MB | peak RSS MB | integer layers |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in r["rows"]:
        size = f"{row['file_bytes'] / 1e6:.1f}" if row.get("file_bytes") else "—"
        lines.append(
            f"| {LABELS[row['name']]} | {row['ppl']:.3f} | {row['prefill_ms']:.0f} | {row.get('prefill_speedup_vs_ort_fp32', 0):.2f} | "
            f"{row['decode_tokens_per_s']:.1f} | {row.get('decode_speedup_vs_ort_fp32', 0):.2f} | {size} | "
            f"{row['peak_rss_mb']:.0f} | {row.get('fused_layers', '—')} |"
        )
    lines += ["", "PyTorch fake-quant twins (the model each ONNX row was exported from, same windows):", ""]
    for row in r["rows"]:
        b = row.get("build", {})
        if "torch_twin_ppl" in b:
            lines.append(f"- {LABELS[row['name']]}: PyTorch {b['torch_twin_ppl']:.3f}, ONNX Runtime {row['ppl']:.3f} "
                         f"(relative difference {row['ppl_rel_diff_vs_torch_twin']:.2e})")
    if r.get("greedy_agreement"):
        n = r["greedy_tokens"]
        lines += ["", f"Greedy generation, ONNX Runtime (KV cache) against the PyTorch fake-quant twin: tokens equal "
                  f"before the first difference, out of {n}:", "",
                  "| configuration | " + " | ".join(repr(p) for p in PROMPTS) + " |", "| --- |" + " --- |" * len(PROMPTS)]
        for name, per in r["greedy_agreement"].items():
            lines.append(f"| {LABELS[name]} | " + " | ".join(str(per[p]) for p in PROMPTS) + " |")
    if r["targets"]:
        lines += ["", "Targets (ratios from this run):", ""]
        lines += [f"- {k}: {'met' if v else 'NOT met'}" for k, v in r["targets"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(Path.home() / ".cache/sasq-assets/smollm2-135m-instruct"))
    p.add_argument("--data-dir", default=os.environ.get("SASQ_DATA_DIR", str(ROOT.parent / "shared/assets/wikitext2")))
    p.add_argument("--work", default=str(ROOT / "bench" / ".work" / "deploy"), help="artifact cache (reused when present)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-steps", type=int, default=100)
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--rows", default=",".join(["torch-fp32", "ort-fp32", "ort-dynamic", "ort-dynamic-8bit", "ort-static", *OURS]))
    p.add_argument("--only-measure", action="store_true", help="skip building; measure the cached artifacts")
    p.add_argument("--greedy-tokens", type=int, default=32)
    p.add_argument("--only-greedy", action="store_true",
                   help="only (re)run the greedy-generation comparison and merge it into the existing results")
    p.add_argument("--rounds", type=int, default=3, help="round-robin timing passes over all rows (default 3)")
    p.add_argument("--measure-row", help=argparse.SUPPRESS)  # internal: one row, in this process
    p.add_argument("--measure-what", default="quality", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(RESULTS / "deploy_smollm2"))
    args = p.parse_args()
    work = Path(args.work)
    if args.measure_row:
        print(json.dumps(measure_row(args, args.measure_row, work, args.measure_what)))
        return
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in LABELS]
    if unknown:
        p.error(f"unknown row(s) {', '.join(unknown)}: choose from {', '.join(LABELS)}")
    out = Path(args.out)
    if args.only_greedy:
        result = json.loads(out.with_suffix(".json").read_text())
        result["greedy_tokens"] = args.greedy_tokens
        result["greedy_agreement"] = greedy_agreement(args, work, [r["name"] for r in result["rows"]])
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(result))
        print(markdown(result))
        return
    if not args.only_measure:
        from runtime.data import load_text, make_windows, sample_windows, tokenize
        from sasq_edge.models import load_model

        build_float(args, work)
        tok = load_model(args.model).tokenizer
        val = make_windows(tokenize(load_text("validation", args.data_dir), tok), args.seq_len)
        build_ort_baselines(args, work, sample_windows(val, args.calib_batches, 0))
        build_ours(args, work)
        np.save(work / "test_windows.npy", _test_windows(args, tok))
    rows = measure_all(args, names)
    result = {"model": "SmolLM2-135M-Instruct (Q4_1-dequantized)", "seq_len": args.seq_len, "windows": args.max_windows,
              "prefill": args.prefill, "runs": args.runs, "decode": args.decode, "rounds": args.rounds,
              "machine": machine(args.threads),
              "rows": rows}
    result["targets"] = summarize(rows)
    result["greedy_tokens"] = args.greedy_tokens
    result["greedy_agreement"] = greedy_agreement(args, work, names)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
