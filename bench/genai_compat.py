"""Check that ONNX Runtime GenAI loads an exported folder (a fused-graph export: its
``genai_config.json``) and generates the same greedy tokens as ``runtime.generate``.

onnxruntime-genai brings its own onnxruntime, so it lives in a side environment given by
``--genai-python`` (never the project's):

    python3.11 -m venv /tmp/genai-venv && /tmp/genai-venv/bin/pip install onnxruntime-genai
    python bench/genai_compat.py out/smollm2/model.onnx --genai-python /tmp/genai-venv/bin/python

Writes ``bench/results/genai_compat.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# runs inside the GenAI environment; prints one JSON line
_GENAI = """
import json, sys
import onnxruntime, onnxruntime_genai as og
folder, n = sys.argv[1], int(sys.argv[2])
prompts = json.loads(sys.argv[3])
model = og.Model(folder)
tok = og.Tokenizer(model)
rows = []
for prompt in prompts:
    ids = tok.encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    out = []
    while not gen.is_done() and len(out) < n:
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    rows.append({"prompt_ids": [int(i) for i in ids], "tokens": out})
print(json.dumps({"rows": rows, "genai": og.__version__, "onnxruntime": onnxruntime.__version__}))
"""

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("onnx", help="model.onnx of a folder written by sasq-export with the fused graph (a CPU profile)")
    p.add_argument("--genai-python", required=True, help="python of an environment with onnxruntime-genai")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "genai_compat"))
    args = p.parse_args()
    from runtime import open_session
    from runtime.folder import eos_ids, load_tokenizer
    from runtime.generate import Sampling, generate

    path = Path(args.onnx)
    done = subprocess.run([args.genai_python, "-c", _GENAI, str(path.parent), str(args.new_tokens), json.dumps(PROMPTS)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"ONNX Runtime GenAI failed on {path.parent}:\n{done.stderr[-2000:]}")
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    sess = open_session(path, ["cpu"])
    tok = load_tokenizer(path.parent)
    rows = []
    for prompt, row in zip(PROMPTS, theirs["rows"], strict=True):
        ids = tok.encode(prompt).ids
        # both stop at the end-of-sequence token, as sasq-generate and GenAI's generator do by default
        ours, _ = generate(sess, ids, Sampling(max_new_tokens=args.new_tokens, stop_ids=tuple(eos_ids(path))))
        rows.append({"prompt": prompt, "same_prompt_ids": ids == row["prompt_ids"], "equal": ours == row["tokens"],
                     "ours": ours, "genai": row["tokens"]})
        verdict = "equal" if rows[-1]["equal"] else "DIFFERENT"
        print(f"{prompt!r}: {verdict} over {len(ours)} greedy tokens (at most {args.new_tokens})", flush=True)
    result = {"model": str(path), "profile": sess.profile, "graph": sess.metadata.get("sasq.graph"),
              "new_tokens": args.new_tokens, "genai": theirs["genai"], "genai_onnxruntime": theirs["onnxruntime"], "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"ONNX Runtime GenAI {theirs['genai']} (onnxruntime {theirs['onnxruntime']}, its generator, shared past/present "
             f"buffer) on our export (profile {result['profile']}, {result['graph']} graph), up to {args.new_tokens} greedy "
             "tokens, both stopping at the end-of-sequence token:", "",
             "| prompt | same prompt ids | tokens | GenAI tokens == runtime.generate tokens |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['prompt']!r} | {'yes' if r['same_prompt_ids'] else 'NO'} | {len(r['ours'])} | {'yes' if r['equal'] else 'NO'} |"
              for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if not all(r["equal"] and r["same_prompt_ids"] for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
