"""Check that optimum's ``ORTModelForCausalLM`` loads an exported folder and generates the same
greedy tokens as ``runtime.generate``.

optimum-onnx pins transformers < 4.58, so it cannot live in the project's environment; this script
runs it in a side environment given by ``--optimum-python``:

    python3.11 -m venv /tmp/optvenv && /tmp/optvenv/bin/pip install torch==2.13.0 "optimum-onnx[onnxruntime]"
    python bench/optimum_compat.py out/smollm2/model.onnx --optimum-python /tmp/optvenv/bin/python

Writes ``bench/results/optimum_compat.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# runs inside the optimum environment; prints one JSON line
_OPTIMUM = """
import json, sys
import optimum.onnxruntime, transformers
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import PreTrainedTokenizerFast
folder, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = ORTModelForCausalLM.from_pretrained(folder, use_cache=True, use_io_binding=False)
tok = PreTrainedTokenizerFast(tokenizer_file=folder + "/tokenizer.json")
ids = tok(prompt, return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
print(json.dumps({"tokens": out[0, ids.shape[1]:].tolist(), "can_use_cache": bool(model.can_use_cache),
                  "transformers": transformers.__version__}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("onnx", help="model.onnx of a folder written by sasq-export (with the KV cache)")
    p.add_argument("--optimum-python", required=True, help="python of an environment with optimum-onnx[onnxruntime]")
    p.add_argument("--prompt", action="append", help="prompt (repeatable)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "optimum_compat"))
    args = p.parse_args()
    from tokenizers import Tokenizer

    from runtime import open_session
    from runtime.generate import Sampling, generate

    path = Path(args.onnx)
    prompts = args.prompt or ["The capital of France is", "def fibonacci(n):"]
    sess = open_session(path, ["cpu"])
    tok = Tokenizer.from_file(str(path.parent / "tokenizer.json"))
    rows = []
    for prompt in prompts:
        ours, _ = generate(sess, tok.encode(prompt).ids, Sampling(max_new_tokens=args.new_tokens))
        done = subprocess.run([args.optimum_python, "-c", _OPTIMUM, str(path.parent), prompt, str(args.new_tokens)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"optimum failed on {path.parent}:\n{done.stderr[-2000:]}")
        theirs = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append({"prompt": prompt, "equal": ours == theirs["tokens"], "ours": ours, "optimum": theirs["tokens"],
                     "optimum_can_use_cache": theirs["can_use_cache"], "optimum_transformers": theirs["transformers"]})
        print(f"{prompt!r}: {'equal' if rows[-1]['equal'] else 'DIFFERENT'} over {args.new_tokens} greedy tokens", flush=True)
    meta = sess.metadata
    result = {"model": str(path), "profile": meta.get("sasq.profile"), "new_tokens": args.new_tokens, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"optimum `ORTModelForCausalLM` (transformers {rows[0]['optimum_transformers']}, cache used: "
             f"{rows[0]['optimum_can_use_cache']}) on our export (profile {result['profile']}), {args.new_tokens} greedy tokens:", "",
             "| prompt | optimum tokens == runtime.generate tokens |", "| --- | --- |"]
    lines += [f"| {r['prompt']!r} | {'yes' if r['equal'] else 'NO'} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if not all(r["equal"] for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
