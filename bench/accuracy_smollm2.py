"""Accuracy benchmark: SASQ against real baselines on SmolLM2-135M, WikiText-2 raw
test, full protocol (all non-overlapping windows of 2048 tokens).

Stages (each writes a JSON under ``bench/results/accuracy_smollm2/``; ``report`` merges them):

    # PyTorch rows (GPU if there is one): FP32, FP16, naive static, percentile / MSE PTQ,
    # SmoothQuant-static (alpha searched), dynamic per-token, SASQ variants, PPL vs steps,
    # full-weight QAT cost, activation histograms; saves the best SASQ state
    python bench/accuracy_smollm2.py torch --device cuda --model DIR --data-dir DIR
    # ONNX Runtime quantize_static (MinMax / Percentile / Entropy), CPU
    python bench/accuracy_ort_static.py --float-onnx FLOAT/model.onnx
    # activation histograms of the best state (recomputed on this machine; CPU is enough)
    python bench/accuracy_smollm2.py hist
    # the best SASQ state exported and evaluated on ONNX Runtime CPU, next to PyTorch on CPU
    python bench/accuracy_smollm2.py onnx --state bench/results/accuracy_smollm2/best_state
    # greedy tokens of that export vs its PyTorch twin (4 prompts x 32 tokens)
    python bench/accuracy_smollm2.py greedy
    # table, plots
    python bench/accuracy_smollm2.py report

Every choice (SmoothQuant's alpha, the best PTQ initialiser, the best SASQ variant) is made on
held-out *validation* windows; the test split is only evaluated.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "accuracy_smollm2"
HIST_LAYERS = ("model.layers.0.self_attn.q_proj", "model.layers.11.mlp.down_proj",
               "model.layers.28.mlp.down_proj", "model.layers.15.self_attn.o_proj")


# --- shared ------------------------------------------------------------------------------------


def windows_for(tokenizer, data_dir: str, seq_len: int, select: int, max_windows: int | None):
    """(test, train, select): test windows; validation windows for training and calibration;
    the last ``select`` validation windows, held out from training, for every choice."""
    from runtime.data import load_text, make_windows, tokenize

    test = make_windows(tokenize(load_text("test", data_dir), tokenizer), seq_len, max_windows)
    valid = make_windows(tokenize(load_text("validation", data_dir), tokenizer), seq_len)
    return test, valid[:-select], valid[-select:]


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# --- torch stage -------------------------------------------------------------------------------


def torch_stage(args) -> None:
    import torch

    from runtime.data import sample_windows
    from runtime.state import ScaleState
    from sasq_edge.baselines import build_method, fp16_supported, train_qat
    from sasq_edge.config import QuantConfig
    from sasq_edge.evaluate import perplexity
    from sasq_edge.models import load_model
    from sasq_edge.pipeline import run_sasq

    t_start = time.perf_counter()
    out = Path(args.out_dir)
    path = out / "torch.json"
    res = json.loads(path.read_text()) if path.is_file() and args.resume else {"rows": {}, "variants": {}}
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # full FP32 matmuls, as on the CPU
    torch.manual_seed(0)
    lm = load_model(args.model)
    lm.model.to(device)
    test, train, select = windows_for(lm.tokenizer, args.data_dir, args.seq_len, args.select_windows, args.max_windows)
    res.update({
        "model": "SmolLM2-135M-Instruct (Q4_1-dequantized)",
        "protocol": f"WikiText-2 raw test, all {test.shape[0]} non-overlapping windows of {args.seq_len} tokens",
        "seq_len": args.seq_len, "test_windows": int(test.shape[0]),
        "train_windows": int(train.shape[0]), "select_windows": int(select.shape[0]),
        "machine": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                    "torch": torch.__version__, "python": platform.python_version()},
    })
    base = QuantConfig.plain(calibration="mse", calib_batches=args.calib_batches, train_steps=0, seq_len=args.seq_len,
                       batch_size=args.batch_size, lr=args.lr)
    calib = sample_windows(train, base.calib_batches, base.seed)  # the windows run_sasq calibrates on

    def state_dir(variant: str) -> Path:
        return Path(args.states_dir or out / "states") / variant.replace(" ", "_").replace("+", "_")

    def left() -> float:
        return args.deadline_s - (time.perf_counter() - t_start)

    def evaluate(model) -> dict:
        t0 = time.perf_counter()
        v = perplexity(model, select, desc="valid", progress=False).ppl
        t = perplexity(model, test, desc="test", progress=False)
        return {"valid_ppl": v, "ppl": t.ppl, "nll": t.nll, "tokens": t.tokens, "eval_s": round(time.perf_counter() - t0, 1)}

    def save() -> None:
        res["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        _write(path, res)

    def free() -> None:  # after the caller dropped its last reference to a model copy
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # 1. baselines
    for method in ("fp32", "fp16", "naive", "percentile", "mse", "smoothquant", "dynamic"):
        if method in res["rows"] or left() < 60:
            continue
        if method == "fp16" and not fp16_supported(device)[0]:
            res["rows"][method] = {"skipped": fp16_supported(device)[1]}
            continue
        t0 = time.perf_counter()
        cfg = dataclasses.replace(base, calibration="absmax") if method == "smoothquant" else base
        model, info = build_method(lm.model, method, cfg, calib, select)
        build_s = time.perf_counter() - t0
        res["rows"][method] = {**info, **evaluate(model), "build_s": round(build_s, 1)}
        print(f"{method}: {res['rows'][method]['ppl']:.3f} (valid {res['rows'][method]['valid_ppl']:.3f})", flush=True)
        del model
        free()
        save()

    alpha = res["rows"].get("smoothquant", {}).get("alpha", 0.5)
    ptq = {m: res["rows"][m]["valid_ppl"] for m in ("percentile", "mse") if "valid_ppl" in res["rows"].get(m, {})}
    init = min(ptq, key=ptq.get) if ptq else "mse"
    res["sasq_init"] = init

    # 2. SASQ variants, each one option of QuantConfig
    steps = args.steps
    variants = {
        "clip": {},
        "tanh": {"truncation": "tanh"},
        "smooth": {"smooth_alpha": alpha},
        "smooth+tanh": {"smooth_alpha": alpha, "truncation": "tanh"},
        "smooth+cosine": {"smooth_alpha": alpha, "lr_schedule": "cosine"},
        f"smooth+cosine x{args.long_factor}": {"smooth_alpha": alpha, "lr_schedule": "cosine",
                                                "train_steps": steps * args.long_factor},
        "smooth-learned+cosine": {"smooth_alpha": alpha, "smooth_learn": True, "lr_schedule": "cosine"},
        "smooth-learned+cosine lr/5": {"smooth_alpha": alpha, "smooth_learn": True, "lr_schedule": "cosine",
                                       "lr": args.lr / 5},
    }
    curve_variant = "smooth+cosine"
    for name, over in variants.items():
        if name in res["variants"]:
            continue
        cfg = dataclasses.replace(base, **{"calibration": init, "train_steps": steps, **over})
        budget = cfg.train_steps * args.step_s_guess + 60
        if left() < budget:
            res["variants"][name] = {"skipped": f"deadline: {left():.0f} s left, about {budget:.0f} s needed"}
            continue
        lm_v = load_copy(lm)
        curve: list[dict] = []

        def on_step(step, model, curve=curve, name=name):
            if name == curve_variant and (step in (10, 25, 50) or step % args.curve_every == 0):
                curve.append({"step": step, "ppl": perplexity(model, test, progress=False).ppl})

        t0 = time.perf_counter()
        if name == curve_variant:
            calib_model = load_copy(lm)
            from sasq_edge.pipeline import quantize_ptq

            quantize_ptq(calib_model.model, dataclasses.replace(cfg, train_steps=0), calib)
            curve.append({"step": 0, "ppl": perplexity(calib_model.model, test, progress=False).ppl})
            del calib_model
            free()
        result = run_sasq(lm_v, cfg, windows=train, progress=False, on_step=on_step)
        state, report = result.state, result.report
        row = {"config": cfg.to_dict(), "training": report.summary(), "losses": report.losses,
               **evaluate(lm_v.model), "total_s": round(time.perf_counter() - t0, 1)}
        if curve:
            row["curve"] = curve
        res["variants"][name] = row
        print(f"SASQ {name}: {row['ppl']:.3f} (valid {row['valid_ppl']:.3f}), {report.wall_s:.0f} s", flush=True)
        state.save(state_dir(name))
        del lm_v
        free()
        save()

    trained = {n: v for n, v in res["variants"].items() if "valid_ppl" in v}
    if trained:
        best = min(trained, key=lambda n: trained[n]["valid_ppl"])
        res["best_variant"] = best
        src = state_dir(best)
        dst = out / "best_state"
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            (dst / f.name).write_bytes(f.read_bytes())
        save()

    # 3. training cost: SASQ vs full-weight QAT, same steps, batch and windows
    if "qat" not in res and left() > steps * args.step_s_guess * 3 + 60 and trained:
        cfg = dataclasses.replace(base, calibration=init, train_steps=steps)
        lm_q = load_copy(lm)
        from sasq_edge.pipeline import quantize_ptq

        quantize_ptq(lm_q.model, cfg, calib)
        report = train_qat(lm_q.model, torch.from_numpy(train), cfg, progress=False)
        res["qat"] = {"config": cfg.to_dict(), "weight_lr": 1e-5, "training": report.summary(), **evaluate(lm_q.model)}
        print(f"full QAT: {res['qat']['ppl']:.3f}, {report.wall_s:.0f} s", flush=True)
        del lm_q
        free()
        save()

    # 4. activation histograms before / after (best state)
    if res.get("hist_variant") != res.get("best_variant") and trained and left() > 30:
        state = ScaleState.load(out / "best_state")
        res["hist"] = histograms(lm, state, select[0], device)
        res["hist_variant"] = res["best_variant"]
        save()
    print(f"torch stage done in {time.perf_counter() - t_start:.0f} s", flush=True)


def load_copy(lm):
    """A deep copy of the loaded float model (the original stays float and unsmoothed)."""
    from sasq_edge.models import LoadedModel

    return LoadedModel(copy.deepcopy(lm.model), lm.tokenizer, lm.source)


def histograms(lm, state, window: np.ndarray, device) -> dict:
    """Inputs of ``HIST_LAYERS`` on one validation window: float model (before) and the values
    the trained static grid represents, ``clamp(round(x / s)) * s`` in the smoothed space (after)."""
    import torch

    from sasq_edge.modules import QuantLinear
    from sasq_edge.state import apply_state

    seen: dict[str, dict] = {}
    present = {n for n, _ in lm.model.named_modules()}
    layers = [n for n in HIST_LAYERS if n in present] or ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]

    def record(tag: str, model) -> None:
        handles = []
        for name in layers:
            mod = model.get_submodule(name)

            def hook(m, args, name=name):
                x = args[0].detach().float()
                if isinstance(m, QuantLinear):
                    q, s = m.act_quant.codes(x)
                    x, clip = q * s, float(s) * m.act_quant.grid.qmax
                else:
                    clip = None
                flat = x.reshape(-1, x.shape[-1])
                amax = float(flat.abs().max())
                edges = torch.linspace(-amax, amax, 201, device=flat.device)
                counts = torch.histc(flat.flatten(), bins=200, min=-amax, max=amax)
                mags = flat.abs().flatten().clamp_min(1e-6).log10()  # magnitudes, 1e-6 .. 1e4
                log_counts = torch.histc(mags, bins=100, min=-6.0, max=4.0)
                seen.setdefault(name, {})[tag] = {
                    "absmax": amax, "clip": clip, "edges": edges.cpu().tolist(), "counts": counts.cpu().tolist(),
                    "log10_edges": torch.linspace(-6.0, 4.0, 101).tolist(), "log10_counts": log_counts.cpu().tolist(),
                    "channel_absmax": flat.abs().amax(dim=0).cpu().tolist(),
                    "p99_9": float(flat.abs().flatten().float().quantile(0.999)) if flat.numel() < 16_000_000 else None,
                }
            handles.append(mod.register_forward_pre_hook(hook))
        try:
            with torch.no_grad():
                model(input_ids=torch.from_numpy(window)[None].to(device))
        finally:
            for h in handles:
                h.remove()

    record("before", lm.model)
    lm_a = load_copy(lm)
    apply_state(lm_a.model, state)
    record("after", lm_a.model)
    return seen


def hist_stage(args) -> None:
    """Recompute the activation histograms of the best state on this machine (CPU is enough)."""
    import torch

    from runtime.state import ScaleState
    from sasq_edge.models import load_model

    torch.set_num_threads(args.threads)
    path = Path(args.out_dir) / "torch.json"
    res = json.loads(path.read_text())
    lm = load_model(args.model)
    _, _, select = windows_for(lm.tokenizer, args.data_dir, args.seq_len, args.select_windows, 1)
    res["hist"] = histograms(lm, ScaleState.load(args.state), select[0], torch.device("cpu"))
    res["hist_variant"] = res["best_variant"]
    res["hist_machine"] = platform.processor() or platform.machine()
    _write(path, res)


# --- onnx stage --------------------------------------------------------------------------------


def onnx_stage(args) -> None:
    """Export the best state, evaluate it on ONNX Runtime CPU over the full protocol, and check
    window-level parity against PyTorch on this CPU on the first ``--parity-windows`` windows."""
    import torch

    from exporters import export_onnx
    from runtime import open_session
    from runtime.parity import compare
    from runtime.perplexity import iter_logits as onnx_logits
    from runtime.perplexity import perplexity as onnx_perplexity
    from runtime.state import ScaleState
    from sasq_edge.evaluate import iter_logits
    from sasq_edge.models import load_model
    from sasq_edge.state import apply_state

    torch.set_num_threads(args.threads)
    state = ScaleState.load(args.state).with_profile(args.profile)
    lm = load_model(args.model)
    apply_state(lm.model, state)
    test, _, _ = windows_for(lm.tokenizer, args.data_dir, args.seq_len, args.select_windows, args.max_windows)
    dst = Path(args.work) / f"best-{args.profile}" / "model.onnx"
    t0 = time.perf_counter()
    res = export_onnx(lm.model, dst, state=state, tokenizer=lm.tokenizer, kv_cache=True)
    export_s = time.perf_counter() - t0
    sess = open_session(res.onnx, ["cpu"], args.threads)
    head = test[: args.parity_windows]
    parity = compare(head, iter_logits(lm.model, head), onnx_logits(sess, head)).report()
    t0 = time.perf_counter()
    full = onnx_perplexity(sess, test, desc="onnx (test)")
    out = {
        "profile": args.profile, "state": os.path.relpath(args.state, HERE.parent), "export_s": round(export_s, 1),
        "bytes": res.bytes, "onnx": full.to_dict(), "eval_s": round(time.perf_counter() - t0, 1),
        "parity_windows": parity.to_dict(), "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
    }
    _write(Path(args.out_dir) / "onnx.json", out)
    print(f"ONNX Runtime CPU PPL {full.ppl:.4f} over {full.windows} windows; first {len(head)} windows: "
          f"PyTorch {parity.ppl_torch:.4f} vs ORT {parity.ppl_onnx:.4f}, top-1 agreement {parity.top1_agreement:.4f}")


def greedy_stage(args) -> None:
    """Greedy tokens (32, four prompts) of the exported best model on ONNX Runtime vs its
    PyTorch twin: how many agree before the first difference. Adds ``greedy`` to onnx.json."""
    import sys

    import torch

    from runtime import open_session
    from runtime.generate import Sampling, generate
    from runtime.state import ScaleState
    from sasq_edge.evaluate import greedy_tokens
    from sasq_edge.models import load_model
    from sasq_edge.state import apply_state

    sys.path.insert(0, str(HERE))
    from deploy_smollm2 import PROMPTS

    torch.set_num_threads(args.threads)
    path = Path(args.out_dir) / "onnx.json"
    res = json.loads(path.read_text())
    lm = load_model(args.model)
    apply_state(lm.model, ScaleState.load(args.state).with_profile(args.profile))
    sess = open_session(Path(args.work) / f"best-{args.profile}" / "model.onnx", ["cpu"], args.threads)
    agree = {}
    for prompt in PROMPTS:
        ids = lm.tokenizer(prompt)["input_ids"]
        a = greedy_tokens(lm.model, ids, 32)
        b, _ = generate(sess, ids, Sampling(max_new_tokens=32))
        agree[prompt] = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
    res["greedy_prefix_agreement_of_32"] = agree
    _write(path, res)
    print(f"greedy agreement: {agree}", flush=True)


# --- report ------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=("torch", "hist", "onnx", "greedy", "report"))
    p.add_argument("--model", default=str(Path.home() / ".cache/sasq-assets/smollm2-135m-instruct"))
    p.add_argument("--data-dir", default=os.environ.get("SASQ_DATA_DIR", "../shared/assets/wikitext2"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--select-windows", type=int, default=4, help="held-out validation windows for every choice")
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--long-factor", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--curve-every", type=int, default=100)
    p.add_argument("--step-s-guess", type=float, default=0.5, help="seconds per training step, to plan the deadline")
    p.add_argument("--deadline-s", type=float, default=1e9)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--state", default=str(RESULTS / "best_state"))
    p.add_argument("--profile", default="cpu-vnni")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parity-windows", type=int, default=8, help="windows compared logit by logit on this CPU")
    p.add_argument("--work", default=str(HERE / ".work" / "accuracy"))
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--states-dir", default=None, help="where every variant's state goes (default OUT_DIR/states)")
    args = p.parse_args()
    if args.stage == "torch":
        torch_stage(args)
    elif args.stage == "hist":
        hist_stage(args)
    elif args.stage == "onnx":
        onnx_stage(args)
    elif args.stage == "greedy":
        greedy_stage(args)
    else:
        import sys

        sys.path.insert(0, str(HERE))
        from accuracy_report import report

        report(Path(args.out_dir))


if __name__ == "__main__":
    main()
