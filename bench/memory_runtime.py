"""Where the memory of a running export goes: ``sasq-generate``'s work (prefill a prompt, decode
with the KV cache) in a fresh process per setting, and its resident memory split into parts.

    python bench/memory_runtime.py out/smollm2/model.onnx [more exports] [--contexts 512,2048] [--new-tokens 32]

For each export, context length (prompt = context - new tokens, random token ids, seeded) and
setting (``default``: what ``sasq-generate`` runs, the prompt in chunks of
``runtime.generate.PREFILL_CHUNK`` tokens; ``one prefill call``: the whole prompt at once;
``no-prepack``: ``session.disable_prepacking``; ``no-arena``: ONNX Runtime's CPU memory arena off;
both), one child process measures: its resident memory after importing
onnxruntime (the runtime itself), after opening the session, and its peak (``VmHWM``) over the
generation; time to first token and decode tokens/s. The split of the default setting's peak:

- weights as stored: the initializers' bytes (the ``.onnx`` file and its external data);
- pre-packed copies: what opening the session holds beyond the no-prepack session (ONNX Runtime
  re-lays INT8 and float weights out for its kernels and keeps both);
- KV buffer: the shared past/present buffer the decoder allocates, ``2 x layers x kv_heads x
  head_dim x capacity x 4`` bytes;
- arena and activations: the rest of the peak above the opened session.

Settings are interleaved (each context runs every setting before the next context), one thread
each. ``--external``: each export is measured a second time as a copy with every initializer of
1 KiB or more in ``model.onnx.data`` at page-aligned offsets (how exports over 2 GB are written,
``exporters.fused.ExternalData``), which ONNX Runtime can map instead of reading. Writes
bench/results/memory_runtime.{json,md}.
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
# setting -> (session config entries, CPU arena, prompt tokens per prefill call; None: generate's default)
SETTINGS = {"default": ({}, True, None), "one prefill call": ({}, True, 1 << 30),
            "no-prepack": ({"session.disable_prepacking": "1"}, True, None), "no-arena": ({}, False, None),
            "no-prepack, no-arena": ({"session.disable_prepacking": "1"}, False, None)}


def _status(key: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(path: str, setting: str, context: int, new_tokens: int) -> None:
    import numpy as np

    from runtime.folder import max_positions
    from runtime.generate import Sampling, generate
    from runtime.session import open_session

    base = _status("VmRSS")
    config, arena, chunk = SETTINGS[setting]
    t = time.perf_counter()
    sess = open_session(path, threads=1, config=config, arena=arena)
    open_s = time.perf_counter() - t
    opened = _status("VmRSS")
    vocab = json.loads((Path(path).parent / "config.json").read_text())["vocab_size"]
    prompt = np.random.default_rng(0).integers(3, vocab, context - new_tokens).tolist()
    kwargs = {} if chunk is None else {"prefill_chunk": chunk}
    tokens, stats = generate(sess, prompt, Sampling(max_new_tokens=new_tokens, stop_ids=()), max_positions(path), **kwargs)
    spec = sess.cache  # past_names: one per layer and key/value; the decoder's buffer holds context positions
    print(json.dumps({"runtime_mb": base, "opened_mb": opened, "peak_mb": _status("VmHWM"), "open_s": open_s,
                      "ttft_ms": 1000 * stats.prefill_s, "decode_tokens_per_s": stats.decode_tokens_per_s,
                      "new_tokens": len(tokens), "kv_mb": None if spec is None else
                      len(spec.past_names) * spec.kv_heads * spec.head_dim * context * np.dtype(spec.dtype).itemsize / 2**20}))


def _weights_mb(path: Path) -> tuple[float, float]:
    """(file MB: the .onnx and its external data, initializer MiB)."""
    import onnx

    files = [path, *path.parent.glob(path.name + ".data")]
    size = sum(f.stat().st_size for f in files) / 1e6
    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return size, total / 2**20


def external_copy(path: Path, folder: Path) -> Path:
    """A copy of the export folder of ``path`` in ``folder`` whose initializers of 1 KiB or more
    live in ``model.onnx.data`` at page-aligned offsets (the exporter's own writer)."""
    import shutil

    import onnx
    from onnx import numpy_helper

    from exporters.fused import ExternalData

    folder.mkdir(parents=True, exist_ok=True)
    for f in path.parent.iterdir():
        if f.is_file() and not f.name.startswith(path.name):
            shutil.copy2(f, folder / f.name)
    model = onnx.load(str(path))
    out = folder / path.name
    data = ExternalData(folder / (path.name + ".data"), path.name + ".data")
    try:
        for i, t in enumerate(model.graph.initializer):
            ext = data.tensor(t.name, numpy_helper.to_array(t))
            if ext is not None:
                model.graph.initializer[i].CopyFrom(ext)
    finally:
        data.close()
    onnx.save_model(model, str(out))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("exports", nargs="*")
    p.add_argument("--contexts", default="512,2048")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--name", default="memory_runtime", help="results file name under bench/results (default memory_runtime)")
    p.add_argument("--settings", default=",".join(SETTINGS), help="which settings (default: all)")
    p.add_argument("--external", action="store_true", help="also measure a copy of each export with external, page-aligned data")
    p.add_argument("--child", nargs=4, metavar=("PATH", "SETTING", "CONTEXT", "NEW"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], int(args.child[2]), int(args.child[3]))
    rows = []
    exports = [Path(e) for e in args.exports]
    if args.external:
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="sasq-external-"))
        exports += [external_copy(e, tmp / f"{e.parent.name} (external data)") for e in exports]
    for path in exports:
        file_mb, weights_mib = _weights_mb(path)
        meta = {m.key: m.value for m in __import__("onnx").load(str(path), load_external_data=False).metadata_props}
        for context in [int(c) for c in args.contexts.split(",")]:
            for setting in args.settings.split(","):
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                proc = subprocess.run([sys.executable, __file__, "--child", str(path), setting, str(context), str(args.new_tokens)],
                                      capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    raise SystemExit(f"{path} {setting} {context}: {proc.stderr.strip().splitlines()[-1]}")
                got = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append({"export": str(path), "profile": meta.get("sasq.profile", "float"), "file_mb": round(file_mb, 1),
                             "weights_mib": round(weights_mib, 1), "context": context, "setting": setting, **got})
                print(json.dumps(rows[-1]), flush=True)
    by = {(r["export"], r["context"], r["setting"]): r for r in rows}
    cmd = " ".join(["python bench/memory_runtime.py", *(f"--{k} {v}" for k, v in (("name", args.name), ("settings", args.settings))
                                                        if v != p.get_default(k)), *(["--external"] if args.external else []),
                    "EXPORT ..."])
    lines = [f"# Memory of a running export (`{cmd}`)", "",
             "Each row one fresh process, one thread: open the session, prefill `context - 32` tokens, decode 32 with "
             "the KV cache sized to the context. MiB of resident memory. Split of the default setting's peak: the "
             "runtime (python + onnxruntime imported), weights as stored (initializer bytes), pre-packed copies "
             "(opened default minus opened no-prepack), the KV buffer (computed from its shape), arena and activations "
             "(the rest).", "",
             "| export | profile | file MB | context | setting | open | peak | TTFT ms | decode tok/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {Path(r['export']).parent.name} | {r['profile']} | {r['file_mb']} | {r['context']} | {r['setting']} | "
                     f"{r['opened_mb']:.0f} | {r['peak_mb']:.0f} | {r['ttft_ms']:.0f} | {r['decode_tokens_per_s']:.1f} |")
    lines += ["", "| export | context | peak (default) | runtime | weights as stored | pre-packed copies | KV buffer | "
                  "arena and activations | peak / file |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (export, context, setting), r in by.items():
        if setting != "default" or (export, context, "no-prepack") not in by:
            continue
        nopack = by[(export, context, "no-prepack")]
        prepack = r["opened_mb"] - nopack["opened_mb"]
        weights_in_rss = nopack["opened_mb"] - r["runtime_mb"]
        rest = r["peak_mb"] - r["opened_mb"] - (r["kv_mb"] or 0)
        lines.append(f"| {Path(export).parent.name} | {context} | {r['peak_mb']:.0f} | {r['runtime_mb']:.0f} | "
                     f"{r['weights_mib']:.0f} (resident after open, no pre-packing: {weights_in_rss:.0f}) | {prepack:.0f} | "
                     f"{(r['kv_mb'] or 0):.0f} | {rest:.0f} | {r['peak_mb'] * 2**20 / 1e6 / r['file_mb']:.2f}x |")
    out = {"bench": "memory_runtime", "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
           "new_tokens": args.new_tokens, "rows": rows}
    (HERE / "results" / f"{args.name}.json").write_text(json.dumps(out, indent=2) + "\n")
    (HERE / "results" / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
