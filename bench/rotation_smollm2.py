"""Where static W8A8 loses SmolLM2-135M's quality, and what rotating the linears' inputs buys:
PyTorch fake-quant, the first 6 windows of 512 tokens of WikiText-2 test and of
code (bench/domains.py), each row's perplexity over FP32's.

Part 1 starts from the default command's state before rotation (the default recipe with
``--rotate-block 0``, bench/results/quality_smollm2/states/default-norot) and puts one piece back
in float at a time: all weights (activations float), all activations (weights float), the inputs
of one kind of linear. Part 2 keeps that state's other scales and rotates the input of some
linears (runtime.rotation): the down projections' in Hadamard blocks of 16 ... 512 or by a dense
random orthogonal matrix; then q/k/v, gate/up and down (the default's set), and every linear, in
blocks of 64; each rotated scale calibrated by MSE on 4 WikiText-2 validation windows and not
trained; "none" is the same MSE recalibration without rotation.

Part 3 (``cost``) times what the rotation costs on ONNX Runtime: the default command's export
against the same recipe's without rotation (bench/.work/quality_default{,_norot}, made by
``bench/quality_smollm2.py default``), each in a fresh process per round, rounds interleaved
(bench/speed_smollm2.py's measurement: prefill of 512 tokens, decode steps at 512 and 2048, 2
threads), medians over the rounds.

    python bench/rotation_smollm2.py analysis   # parts 1 and 2, about 5 minutes on 2 cores
    python bench/rotation_smollm2.py cost       # part 3, about 4 minutes

Writes bench/results/rotation_smollm2.{json,md} (each stage keeps the other's results).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from domain_gap import ppl  # noqa: E402  (PyTorch perplexity of a few windows)
from domains import text  # noqa: E402
from quality_smollm2 import DATA, MODEL, OUT, machine  # noqa: E402

WINDOWS, SEQ, CALIB = 6, 512, 4
STATE = OUT / "states" / "default-norot"
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROTATIONS = ("none", "16", "64", "256", "512", "dense random orthogonal")
GROUPS = {"q/k/v, gate/up, down_proj (the default)": ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"),
          "every linear (o_proj too)": KINDS}


def mse_scale(x: torch.Tensor, qmin: int, qmax: int) -> float:
    """The per-tensor scale (50 clipping ratios of max|x|) with the least quantization MSE on ``x``."""
    amax, best = float(x.abs().max()), (math.inf, 1.0)
    for c in np.linspace(0.02, 1.0, 50):
        s = amax * float(c) / qmax
        err = float(((torch.clamp(torch.round(x / s), qmin, qmax) * s - x) ** 2).mean())
        best = min(best, (err, s))
    return best[1]


def analysis() -> dict:
    from runtime.data import load_text, make_windows, tokenize
    from runtime.grids import encode_weight
    from runtime.rotation import hadamard, rotate_weight
    from runtime.state import ScaleState
    from sasq_edge.models import load_model
    from sasq_edge.modules import quant_linears, quant_mode
    from sasq_edge.state import apply_state

    torch.manual_seed(0)
    t_start = time.perf_counter()
    lm = load_model(MODEL)
    sets = {"wiki": make_windows(tokenize(load_text("test", DATA), lm.tokenizer), SEQ)[:WINDOWS],
            "code": make_windows(tokenize(text("code"), lm.tokenizer), SEQ)[:WINDOWS]}
    calib = make_windows(tokenize(load_text("validation", DATA), lm.tokenizer), SEQ)[:CALIB]
    fp32 = {d: ppl(lm.model, w) for d, w in sets.items()}
    print("FP32", fp32, flush=True)
    apply_state(lm.model, ScaleState.load(STATE))
    mods = dict(quant_linears(lm.model))

    def run(label: str, patches: dict) -> dict:
        for name, fwd in patches.items():
            mods[name].forward = fwd
        try:
            r = {d: round(ppl(lm.model, w) / fp32[d], 4) for d, w in sets.items()}
        finally:
            for name in patches:
                del mods[name].forward
        print(f"{label}: {r}", flush=True)
        return r

    def weights_only(m):
        return lambda x: F.linear(x, m.weight_dq.to(x.dtype), m.bias)

    def acts_only(m):
        return lambda x: F.linear(m.act_quant(x.float()), m.weight.float(), m.bias)

    def float_linear(m):
        return lambda x: F.linear(x, m.weight, m.bias)

    part1 = {"static W8A8 (the state as trained)": run("all", {}),
             "weights INT8, activations float": run("weights", {n: weights_only(m) for n, m in mods.items()}),
             "activations INT8, weights float": run("acts", {n: acts_only(m) for n, m in mods.items()})}
    for kind in KINDS:
        part1[f"{kind} inputs float (its weights INT8)"] = run(kind, {n: weights_only(m) for n, m in mods.items()
                                                                      if n.endswith(kind)})
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in mods}
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1])))
             for n, m in mods.items()]
    with torch.no_grad(), quant_mode(lm.model, "float"):
        for w in calib:
            lm.model(input_ids=torch.from_numpy(w)[None])
    for h in hooks:
        h.remove()
    acts = {n: torch.cat(v).float() for n, v in seen.items()}
    grid = next(iter(mods.values())).weight_grid
    act = next(iter(mods.values())).act_quant.grid

    def rotated(kinds: tuple[str, ...], kind: str) -> dict:
        """Patches for the linears ending in ``kinds``: input rotated as ``kind`` says, scale by MSE."""
        patches = {}
        for name, m in mods.items():
            if not name.endswith(kinds):
                continue
            k = m.in_features
            if kind == "none":
                r = None
            elif kind.isdigit():
                r = torch.block_diag(*[torch.from_numpy(hadamard(int(kind)))] * (k // int(kind)))
            else:
                q, rr = torch.linalg.qr(torch.randn(k, k, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
                r = (q * torch.sign(torch.diag(rr))).float()
            w = m.weight.detach().float().numpy()
            if r is not None:
                w = rotate_weight(w, int(kind)) if kind.isdigit() else (m.weight.detach().double() @ r.double()).float().numpy()
            codes, ws = encode_weight(w, grid)
            wdq = torch.from_numpy(codes).float() * torch.from_numpy(ws)[:, None]
            s = mse_scale(acts[name] if r is None else acts[name] @ r, act.qmin, act.qmax)

            def fwd(x, r=r, s=s, wdq=wdq, m=m):
                x = x.float() if r is None else x.float() @ r
                return F.linear(torch.clamp(torch.round(x / s), act.qmin, act.qmax) * s, wdq, m.bias)
            patches[name] = fwd
        return patches

    part2 = {f"down_proj: {kind}": run(f"down {kind}", rotated(("down_proj",), kind)) for kind in ROTATIONS}
    for label, kinds in GROUPS.items():
        for kind in ("none", "64"):
            part2[f"{label}: {kind}"] = run(f"{label} {kind}", rotated(kinds, kind))
    return {"model": "SmolLM2-135M-Instruct (Q4_1-dequantized)", "state": str(STATE.relative_to(HERE.parent)),
            "windows": WINDOWS, "seq_len": SEQ, "fp32_ppl": fp32, "float_back": part1, "rotation": part2,
            "wall_s": round(time.perf_counter() - t_start, 1), "machine": machine()}


EXPORTS = {"rotated (the default command)": HERE / ".work" / "quality_default" / "model.onnx",
           "not rotated (--rotate-block 0)": HERE / ".work" / "quality_default_norot" / "model.onnx"}
METRICS = ("prefill_512_ms", "decode_512_ms", "decode_2048_ms")


def cost(rounds: int = 5, threads: int = 2) -> dict:
    from speed_smollm2 import measure_ort

    for path in EXPORTS.values():
        if not path.is_file():
            raise SystemExit(f"{path} is missing: run `python bench/quality_smollm2.py default` (and keep the previous "
                             "default's folder as quality_default_norot)")
    runs: dict[str, list[dict]] = {k: [] for k in EXPORTS}
    for i in range(rounds):
        for name, path in EXPORTS.items():
            runs[name].append(measure_ort(str(path), threads))
            print(i, name, runs[name][-1], flush=True)
    med = {k: {m: float(np.median([r[m] for r in v])) for m in METRICS} for k, v in runs.items()}
    rot, plain = (med[k] for k in EXPORTS)
    return {"rounds": rounds, "threads": threads, "runs": runs, "median": med,
            "ratio": {m: rot[m] / plain[m] for m in METRICS}, "machine": machine()}


def write(result: dict) -> None:
    res = HERE / "results"
    (res / "rotation_smollm2.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = []
    if "float_back" in result:
        lines += _analysis_lines(result)
    if "cost" in result:
        c = result["cost"]
        lines += ["", f"What the rotation costs on ONNX Runtime (fused cpu-vnni graph, batch 1, {c['threads']} threads, "
                  f"medians of {c['rounds']} interleaved rounds, each in a fresh process):", "",
                  "| export | prefill 512 tokens (ms) | decode step at 512 (ms) | decode step at 2048 (ms) |",
                  "| --- | --- | --- | --- |"]
        for name, m in c["median"].items():
            lines.append(f"| {name} | {m['prefill_512_ms']:.1f} | {m['decode_512_ms']:.2f} | {m['decode_2048_ms']:.2f} |")
        r = c["ratio"]
        lines.append(f"| ratio | {r['prefill_512_ms']:.3f} | {r['decode_512_ms']:.3f} | {r['decode_2048_ms']:.3f} |")
    (res / "rotation_smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _analysis_lines(result: dict) -> list[str]:
    fp32, part1, part2 = result["fp32_ppl"], result["float_back"], result["rotation"]
    lines = ["# Where static W8A8 loses quality, and rotating the linears' inputs", "",
             f"`python bench/rotation_smollm2.py`: SmolLM2-135M-Instruct, PyTorch fake-quant, the first {WINDOWS} windows of "
             f"{SEQ} tokens of WikiText-2 test and of code; perplexity over FP32 (wiki {fp32['wiki']:.3f}, code "
             f"{fp32['code']:.3f}).", "",
             "From the default command's state before rotation (--rotate-block 0), one piece back in float:", "",
             "| configuration | wiki | code |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v['wiki']:.4f}x | {v['code']:.4f}x |" for k, v in part1.items()]
    lines += ["", "Inputs rotated (runtime.rotation; `none`: the same MSE recalibration without rotation; a number: "
              f"Hadamard blocks of that size), their scales MSE-calibrated on {CALIB} WikiText-2 validation windows, "
              "untrained; every other scale as in that state:", "",
              "| linears: rotation | wiki | code |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v['wiki']:.4f}x | {v['code']:.4f}x |" for k, v in part2.items()]
    return lines


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["analysis", "cost"])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    path = HERE / "results" / "rotation_smollm2.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    if args.stage == "analysis":
        result.update(analysis())
    else:
        result["cost"] = cost(args.rounds)
    write(result)


if __name__ == "__main__":
    main()
