"""Memory and time of ``sasq-export`` against model size: random-initialised
Llama-shaped models saved in bf16 safetensors, exported on this machine with the plain command,
each in its own process.

Shapes: 135M (SmolLM2-135M), 1.1B (TinyLlama-1.1B), 3B (Llama-3.2-3B), 7B (Llama-2-7B). For each:
``sasq-export`` (calibration on one window of ``--seq-len`` tokens, training steps where the
model fits for it on this CPU, export), then ``sasq-ppl`` on one short window, then
``onnx.checker`` by path. Peak RSS of each command (its process tree, from rusage), wall time,
file sizes and whether external data was used. The checkpoints are made once under ``--work``
(about 16 GB for the four) and reused.

    python bench/memory_scale.py --work /tmp/sasq-scale            # all four
    python bench/memory_scale.py --work /tmp/sasq-scale --only 135M 1.1B

Writes ``bench/results/memory_scale.{json,md}``.
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

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
VENV_BIN = Path(sys.executable).parent

SHAPES = {
    "135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                 vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    "1.1B": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                 vocab_size=32000, tie_word_embeddings=False, rope_theta=10000.0),
    "3B": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
               vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               vocab_size=32000, tie_word_embeddings=False, rope_theta=10000.0),
}
TRAIN_STEPS = {"135M": 2, "1.1B": 0, "3B": 0, "7B": 0}  # CPU training needs the whole float32 model (+ its activations)
SHARD_BYTES = 2 * 2**30


def make_checkpoint(name: str, folder: Path) -> None:
    """A seeded random Llama of the shape, bf16 safetensors shards + index, config, a byte tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from sasq_edge.models import byte_tokenizer

    if (folder / "config.json").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**SHAPES[name], max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=256,
                         pad_token_id=None, torch_dtype="bfloat16")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(0)
    shard, size, index, n = {}, 0, {}, 0

    def flush() -> None:
        nonlocal shard, size, n
        if shard:
            file = f"model-{n:05d}.safetensors"
            save_file(shard, str(folder / file), metadata={"format": "pt"})
            index.update({k: file for k in shard})
            shard, size, n = {}, 0, n + 1

    for key, p in skeleton.state_dict().items():
        if config.tie_word_embeddings and key == "lm_head.weight":
            continue
        if p.dim() == 1:  # norm weights
            t = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16)
        shard[key] = t
        size += t.numel() * 2
        if size >= SHARD_BYTES:
            flush()
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=1))
    config.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)


def _timed(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; its wall time and the peak RSS of its process tree (rusage of the children)."""
    code = ("import json, resource, subprocess, sys, time\n"
            "t = time.perf_counter(); r = subprocess.run(sys.argv[1:])\n"
            "print(json.dumps({'rc': r.returncode, 'wall_s': time.perf_counter() - t,"
            " 'peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")
    out = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, env={**os.environ, **(env or {})})
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["stderr_tail"] = out.stderr[-1500:]
    return res


def measure(name: str, work: Path, seq_len: int, data: Path) -> dict:
    folder = work / f"llama-{name}"
    t0 = time.perf_counter()
    make_checkpoint(name, folder)
    checkpoint_s = time.perf_counter() - t0
    ckpt_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    out = work / f"out-{name}" / "model.onnx"
    steps = TRAIN_STEPS[name]
    export = _timed([str(VENV_BIN / "sasq-export"), str(out), "--model", str(folder), "--data", str(data), "--seq-len",
                     str(seq_len), "--calib-batches", "1", "--train-steps", str(steps), "--smooth-alpha", "0.5",
                     "--no-smooth-learn", "--json"])
    row = {"shape": name, "parameters": None, "checkpoint_gb": round(ckpt_bytes / 1e9, 2), "train_steps": steps,
           "make_checkpoint_s": round(checkpoint_s, 1), "export": export}
    if export["rc"] == 0:
        files = list(out.parent.iterdir())
        row["onnx_gb"] = round(sum(f.stat().st_size for f in files if f.name.startswith("model.onnx")) / 1e9, 2)
        row["external_data"] = (out.parent / "model.onnx.data").is_file()
        recipe = json.loads((out.parent / "recipe.json").read_text())
        row["layerwise"] = bool(recipe["training"].get("layerwise"))
        ppl = _timed([str(VENV_BIN / "sasq-ppl"), str(out), "--data", str(data), "--seq-len", str(seq_len),
                      "--max-windows", "1", "--json"])
        row["ppl_run"] = ppl
        check = _timed([sys.executable, "-c", f"import onnx; onnx.checker.check_model({str(out)!r}); print('ok')"])
        row["checker_by_path"] = check["rc"] == 0
    from transformers import AutoConfig

    from sasq_edge.layerwise import estimate_fp32_bytes

    row["parameters"] = estimate_fp32_bytes(AutoConfig.from_pretrained(str(folder))) // 4
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="folder for the checkpoints and exports (about 30 GB for all four)")
    p.add_argument("--only", nargs="*", default=list(SHAPES))
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--out", default=str(RESULTS / "memory_scale"))
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "calibration.txt"
    if not data.is_file():  # any text: the models are random, the point is memory and time
        data.write_text((ROOT / "README.md").read_text(encoding="utf-8") * 4, encoding="utf-8")
    out = Path(args.out)
    result = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {"rows": {}}
    result.update({"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                               "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)},
                   "seq_len": args.seq_len, "date": time.strftime("%Y-%m-%d")})
    for name in args.only:
        row = measure(name, work, args.seq_len, data)
        result["rows"][name] = row
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        print(name, json.dumps({k: v for k, v in row.items() if k not in ("export", "ppl_run")}),
              "export", {k: row["export"][k] for k in ("rc", "wall_s", "peak_rss_mb")}, flush=True)
    write_md(result, out)


def write_md(result: dict, out: Path) -> None:
    lines = [f"`sasq-export` of random-initialised Llama-shaped bf16 checkpoints on this machine "
             f"({result['machine']['cores']} cores, {result['machine']['memory_gb']} GB); calibration on 1 window of "
             f"{result['seq_len']} tokens, then `sasq-ppl` on 1 window, each command in its own process.", "",
             "| shape | parameters | checkpoint GB | training steps | path | export wall s | export peak RSS GB | "
             "ONNX GB | external data | sasq-ppl wall s | sasq-ppl peak RSS GB | onnx.checker by path |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in result["rows"].items():
        e, q = r["export"], r.get("ppl_run", {})
        path = "layer by layer" if r.get("layerwise") else "whole model"
        lines.append(f"| {name} | {r['parameters'] / 1e9:.2f} B | {r['checkpoint_gb']} | {r['train_steps']} | {path} | "
                     f"{e['wall_s']:.0f} | {e['peak_rss_mb'] / 1024:.1f} | {r.get('onnx_gb', '—')} | "
                     f"{'yes' if r.get('external_data') else 'no'} | {q.get('wall_s', float('nan')):.0f} | "
                     f"{q.get('peak_rss_mb', float('nan')) / 1024:.1f} | {'yes' if r.get('checker_by_path') else 'no'} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
