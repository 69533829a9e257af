"""How far apart two correct runs of one static W8A8 model can be: the PyTorch twin of an export
against the same twin with its embedding output moved by one float32 ulp (a random sign per
element), against the export on ONNX Runtime. A one-ulp difference is what two float kernels of
RMSNorm, softmax or SiLU leave; it flips the rounding of a few activations that sit on a rounding
boundary, and each flip moves one value by a whole quantization step, which the next layers carry
on. The float model under the same perturbation is the contrast.

    python bench/parity_floor.py EXPORT_DIR [EXPORT_DIR ...] [--windows 16] [--seq-len 512]

Writes bench/results/parity_floor.{json,md}; each comparison is runtime.parity's report, its
``ppl_torch`` the twin and its ``ppl_onnx`` the other side (the nudged twin or ONNX Runtime).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from quality_smollm2 import DATA, MODEL, _write, machine  # noqa: E402

from runtime.parity import compare  # noqa: E402
from runtime.perplexity import iter_logits as onnx_logits  # noqa: E402
from runtime.session import open_session  # noqa: E402
from runtime.sources import EVALUATION  # noqa: E402
from runtime.state import ScaleState  # noqa: E402
from sasq_edge.data import load_windows  # noqa: E402
from sasq_edge.evaluate import iter_logits  # noqa: E402
from sasq_edge.models import load_model  # noqa: E402
from sasq_edge.state import apply_state  # noqa: E402


def ulp_nudge(model: torch.nn.Module, seed: int) -> torch.utils.hooks.RemovableHandle:
    """Move every element of the embedding output one float32 ulp up or down (seeded signs)."""
    gen = torch.Generator().manual_seed(seed)

    def hook(_module, _inputs, out):
        sign = torch.randint(0, 2, out.shape, generator=gen).to(out.dtype) * 2 - 1
        return torch.nextafter(out, out + sign * torch.inf)

    return model.get_input_embeddings().register_forward_hook(hook)


def measure(export: Path | None, windows_n: int, seq_len: int, seeds: int) -> dict:
    """The twin against itself nudged by one ulp (``seeds`` draws of the signs), and against ONNX
    Runtime (skipped for the float model, ``export=None``), on the same windows."""
    lm = load_model(MODEL)
    recipe = None
    if export is not None:
        state = ScaleState.load(export)
        apply_state(lm.model, state)
        m = state.method
        recipe = (f"{m['objective']} on {state.training['data']['spec']}, {m['seq_len']} x {m['train_steps']}, profile "
                  f"{state.profile}, {'INT8' if m['lm_head'] else 'float'} head")
    windows = load_windows(lm, "wikitext2", seq_len, EVALUATION, data_dir=DATA, max_windows=windows_n).windows
    base = list(iter_logits(lm.model, windows, desc="twin"))
    nudged = []
    for seed in range(seeds):
        handle = ulp_nudge(lm.model, seed)
        try:
            nudged.append(compare(windows, base, iter_logits(lm.model, windows, desc=f"twin, one ulp, seed {seed}")).report().to_dict())
        finally:
            handle.remove()
    row = {"export": None if export is None else str(export), "recipe": recipe, "windows": len(windows),
           "seq_len": seq_len, "one_ulp": nudged}
    if export is not None:
        sess = open_session(export / "model.onnx", ["cpu"], 2)
        row["onnx"] = compare(windows, base, onnx_logits(sess, windows)).report().to_dict()
    return row


def _line(name: str, label: str, s: dict) -> str:
    return (f"| {name} | {label} | {100 * s['rel_diff']:.3f} % | {s['kl_mean']:.2e} | {s['kl_p99']:.2e} | "
            f"{s['top1_agreement']:.4f} | {s['top1_confident']:.4f} |")


def _table(rows: list[dict]) -> str:
    lines = ["| model | compared with the twin | PPL error | KL mean | KL p99 | top-1 | top-1 (margin > 1) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        name = "float (no quantizers)" if r["export"] is None else Path(r["export"]).name
        for i, s in enumerate(r["one_ulp"]):
            lines.append(_line(name, f"itself, embedding output +-1 ulp (seed {i})", s))
        if "onnx" in r:
            lines.append(_line(name, "**ONNX Runtime**", r["onnx"]))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("exports", nargs="+", type=Path, help="export folders (model.onnx + recipe.json + scales)")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seeds", type=int, default=4, help="draws of the one-ulp signs per model")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = [measure(e, args.windows, args.seq_len, args.seeds) for e in (None, *args.exports)]
    result = {"machine": machine(), "model": str(MODEL), "data": "wikitext2 test", "rows": rows}
    md = (f"# The float-noise floor of parity: one ulp against ONNX Runtime ({args.windows} x {args.seq_len}, "
          "WikiText-2 test)\n\n`python bench/parity_floor.py " + " ".join(e.name for e in args.exports) + "`\n\n"
          + "\n".join(f"- `{Path(r['export']).name}`: {r['recipe']}" for r in rows if r["export"]) + "\n\n"
          + _table(rows) + "\n")
    _write(HERE / "results" / "parity_floor.json", result)
    (HERE / "results" / "parity_floor.md").write_text(md)


if __name__ == "__main__":
    main()
