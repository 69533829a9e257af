"""Where sasq-validate's thresholds come from: the statistics of a correct SmolLM2-135M export
(float-kernel noise only) against the same export with each seeded fault written into it
(runtime.faults), through the real `sasq-validate --json` command.

    python bench/validate_thresholds.py [--windows 16] [--seq-len 512]

Writes bench/results/validate_thresholds.{json,md}. A threshold is the correct export's value
times a margin (10x for the computed and distribution statistics), rounded up to one significant
digit, and never tighter than the floor below; the table shows each fault's value beside it, so a
threshold that would let a fault through shows up as a fault that passes. tests/test_validate.py
checks that runtime.parity.Thresholds' defaults are the recorded ones.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from quality_smollm2 import DATA, MODEL, _write, machine  # noqa: E402

MARGIN = 10.0
# the floors: float32 rounding alone would give smaller values on some models, but a tighter bar
# than these only fails correct exports on other CPUs' kernels
FLOORS = {"kl_mean": 0.01, "kl_p99": 0.1, "ppl_ratio": 0.005, "block_error": 1e-5}


def _round_up(x: float) -> float:
    """``x`` rounded up to one significant digit."""
    if x <= 0:
        return 0.0
    e = math.floor(math.log10(x))
    return math.ceil(x / 10**e) * 10**e


def _cli(*args: str) -> tuple[int, dict, float]:
    t = time.perf_counter()
    command = Path(sys.executable).parent / args[0]  # the console script pip installed beside this python
    proc = subprocess.run([str(command), *args[1:], "--json"], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise SystemExit(f"{args[0]} printed nothing (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return proc.returncode, json.loads(lines[-1]), wall


def _stats(rep: dict) -> dict:
    blocks = rep.get("blocks") or {}
    replay = rep.get("replay") or {}
    return {"exit": rep.get("_exit"), "failed": rep["failed"], "kl_mean": rep["kl_mean"], "kl_p99": rep["kl_p99"],
            "ppl_ratio_error": abs(rep["ppl_ratio"] - 1), "top1_confident": rep["top1_confident"],
            "top1_agreement": rep["top1_agreement"], "max_float_error": blocks.get("max_float_error"),
            "max_block_error": blocks.get("max_block_error"), "first_block": blocks.get("first_failure"),
            "replay_unexplained": replay.get("unexplained"), "replay_first": replay.get("first_failure"),
            "wall_s": rep.get("_wall")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--layer-windows", type=int, default=2)
    ap.add_argument("--work", default=None, help="folder for the exports (default: a temporary one)")
    ap.add_argument("--report", action="store_true", help="rewrite the table from the recorded JSON, running nothing")
    args = ap.parse_args()
    if args.report:
        report(json.loads((HERE / "results" / "validate_thresholds.json").read_text()))
        return

    import onnx

    from runtime import faults

    work = Path(args.work or tempfile.mkdtemp(prefix="sasq-thresholds-"))
    good = work / "good" / "model.onnx"
    if not good.is_file():  # a PTQ export: the statistics measure the export, not the training
        code, res, wall = _cli("sasq-export", str(good), "--model", MODEL, "--data-dir", DATA, "--seq-len",
                               str(args.seq_len), "--train-steps", "0", "--calib-batches", "8", "--smooth-alpha", "0.5",
                               "--no-smooth-learn", "--profile", "cpu-vnni")
        assert code == 0, res
    loose = ["--max-kl-mean", "1e9", "--max-kl-p99", "1e9", "--max-ppl-ratio-error", "1e9", "--min-top1-confident", "0",
             "--max-block-error", "1e9"]
    common = ["--data-dir", DATA, "--seq-len", str(args.seq_len), "--max-windows", str(args.windows), "--layer-windows",
              str(args.layer_windows)]

    def validate(path: Path, *extra: str) -> dict:
        code, rep, wall = _cli("sasq-validate", str(path), *common, *extra)
        rep["_exit"], rep["_wall"] = code, round(wall, 1)
        return rep

    correct = validate(good, *loose)  # the raw statistics, every bar open
    noise = _stats(correct)
    derived = {
        "kl_mean": max(FLOORS["kl_mean"], _round_up(noise["kl_mean"] * MARGIN)),
        "kl_p99": max(FLOORS["kl_p99"], _round_up(noise["kl_p99"] * MARGIN)),
        "ppl_ratio": max(FLOORS["ppl_ratio"], _round_up(noise["ppl_ratio_error"] * MARGIN)),
        "top1_margin": 1.0,
        # the share of confident positions that may flip: 10x the correct export's, at most 3%
        "min_top1_confident": round(max(0.97, 1 - _round_up(max(1 - noise["top1_confident"], 1e-4) * MARGIN)), 4),
        "block_error": max(FLOORS["block_error"], _round_up((noise["max_float_error"] or 0) * MARGIN)),
        "tie_ulps": 4,
    }
    with_defaults = validate(good)  # the correct export under the library's current defaults
    results = {"correct": noise, "correct_under_defaults": {"exit": with_defaults["_exit"], "failed": with_defaults["failed"]}}
    proto = onnx.load(str(good))
    cases = dict(faults.seeded_faults(proto))
    mid = faults.middle_layer(proto).split(".")[2]
    cases["RMSNorm epsilon x10 (below the bar: see docs/VALIDATION.md)"] = lambda m: faults.rms_epsilon_times(m, int(mid), 10.0)
    for name, edit in cases.items():
        bad = faults.write_faulty(good.parent, work / "faults" / "".join(c if c.isalnum() else "_" for c in name), edit)
        rep = validate(bad)
        results[name] = _stats(rep)
        print(f"{name}: exit {rep['_exit']}, failed {rep['failed']}", flush=True)

    out = {"bench": "validate_thresholds", "model": MODEL, "machine": machine(), "windows": args.windows,
           "seq_len": args.seq_len, "layer_windows": args.layer_windows, "margin": MARGIN, "floors": FLOORS,
           "derived": derived, "results": results}
    report(out)


# checks whose verdict does not depend on a threshold (tie_ulps aside): kept as the run gave them
FIXED = ("fusion", "session_options", "weights", "replay")


def judge(s: dict, t: dict) -> list[str]:
    """The checks that fail for the statistics ``s`` under thresholds ``t``."""
    failed = [c for c in s["failed"] if c in FIXED]
    if s["max_float_error"] is not None and s["max_float_error"] > t["block_error"]:
        failed.append("blocks")
    dist = [("kl_mean", s["kl_mean"] > t["kl_mean"]), ("kl_p99", s["kl_p99"] > t["kl_p99"]),
            ("ppl_ratio", s["ppl_ratio_error"] > t["ppl_ratio"]), ("top1_confident", s["top1_confident"] < t["min_top1_confident"])]
    return failed + [f"distribution.{name}" for name, bad in dist if bad]


def report(out: dict) -> None:
    """Write the JSON and the table: each export's statistics and the checks that fail under the
    derived thresholds (the defaults of runtime.parity.Thresholds)."""
    from runtime.parity import Thresholds

    derived, results = out["derived"], out["results"]
    out["thresholds"] = Thresholds().to_dict()
    for name, s in results.items():
        if name != "correct_under_defaults":
            s["failed_under_derived"] = judge(s, derived)
    _write(HERE / "results" / "validate_thresholds.json", out)
    rows = ["| export | fails under the derived thresholds | KL mean | KL p99 | PPL ratio err | top-1 (confident) | "
            "max float error (blocks) | replay mismatches (first) |", "|---|---|---|---|---|---|---|---|"]
    for name, s in results.items():
        if name == "correct_under_defaults":
            continue
        rows.append(f"| {name} | {', '.join(s['failed_under_derived']) or 'nothing: passes'} | {s['kl_mean']:.2e} | "
                    f"{s['kl_p99']:.2e} | {s['ppl_ratio_error']:.2e} | {s['top1_confident']:.4f} | "
                    f"{s['max_float_error'] or 0:.2e} | {s['replay_unexplained']} ({s['replay_first'] or '-'}) |")
    md = [f"# sasq-validate thresholds on SmolLM2-135M (fused cpu-vnni export, {out['windows']} windows x {out['seq_len']}, "
          f"layer checks on {out['layer_windows']})", "",
          "Generated by `python bench/validate_thresholds.py` (`--report` rewrites this table from the JSON). The correct "
          "export runs with every bar open (its raw statistics); each seeded fault (runtime/faults.py) is written into the "
          "ONNX file alone, in the middle block (layer 15). The checks without a threshold (fusion, session options, "
          "weights digest, integer replay) are as `sasq-validate` reported them; the others are judged against the "
          "derived thresholds.", "", *rows, "",
          f"Derived (the correct export's value x {out['margin']:g}, rounded up to one digit, floors {out['floors']}): "
          f"{derived}", "", f"Defaults in runtime.parity.Thresholds: {out['thresholds']}"]
    (HERE / "results" / "validate_thresholds.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
