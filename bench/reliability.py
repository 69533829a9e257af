"""Hostile inputs, as a user meets them: each class run as the command a user types, on the tiny
model, with its exit code and the line it printed.

    python bench/reliability.py        # bench/results/reliability.{json,md}

Classes: exports onto a mount point (a tmpfs mounted at the output folder: a USB stick, a Docker or
Kubernetes volume; needs root, else said skipped) and onto a full one, a symlinked output folder,
a second export in one folder, sasq-train into an export folder, a float model copied into a
quantized folder, broken checkpoints (a tensor missing, extra, misshapen, NaN), run folders edited
by hand, numbers beyond what the text holds, a quantized file given as the float one, a JSON line
nested too deep. tests/test_hostile.py asserts the same classes.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from runtime.faults import CHECKPOINT_FAULTS, break_checkpoint

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = os.environ.get("SASQ_DATA_DIR", str(ROOT.parent / "shared" / "assets" / "wikitext2"))
TINY = ["--model", "tiny-random-llama"]
QUICK = ["--seq-len", "32", "--calib-batches", "1", "--train-steps", "1"]


def run(argv: list[str], work: Path) -> dict:
    env = {**os.environ, "SASQ_DATA_DIR": DATA, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(work / "cache"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    err = [ln for ln in proc.stderr.replace("\r", "\n").splitlines() if ln.strip()]
    said = next((ln for ln in reversed(err) if "error:" in ln), err[-1] if err else "")
    out = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    note = next((ln for ln in err if ln.startswith("sasq:") and "the text holds" in ln), None)  # a cap, said
    message = said if proc.returncode else note or (out[-1] if out else said)
    return {"command": shlex.join(argv).replace(str(work), "W"), "exit": proc.returncode,
            "message": message.replace(str(work), "W")}


def mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True).returncode == 0


def checkpoint(work: Path) -> Path:
    from sasq_edge.models import tiny_random_llama

    folder = work / "ckpt"
    lm = tiny_random_llama()
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def edit_scales(run_dir: Path, kind: str) -> None:
    import numpy as np
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(run_dir / "scales.safetensors"))
    key = next(k for k in tensors if k.endswith(".act_scale"))
    if kind == "x1.5":
        tensors[key] = np.asarray(tensors[key] * 1.5, dtype=np.float32)
    elif kind == "extra":
        tensors["extra.tensor"] = np.ones(2, np.float32)
    else:
        tensors[key] = np.full(3, float(tensors[key]), np.float32)
    save_file(tensors, str(run_dir / "scales.safetensors"))


def cases(work: Path) -> list[dict]:
    rows: list[dict] = []

    def add(cls: str, argv: list[str], **extra) -> dict:
        got = {"class": cls, **run(argv, work), **extra}
        rows.append(got)
        print(f"{got['exit']}  {cls}: {got['message'][:150]}", flush=True)
        return got

    export, train, ppl = "sasq-export", "sasq-train", "sasq-ppl"
    usb = work / "usb"
    if mount_tmpfs(usb, "3m"):
        try:
            add("export onto a mount point (the output folder is a tmpfs)", [export, str(usb / "model.onnx"), *TINY, *QUICK])
            add("re-export onto the same mount point", [export, str(usb / "model.onnx"), *TINY, *QUICK, "--seed", "2"])
            st = os.statvfs(usb)
            size = sum(p.stat().st_size for p in usb.iterdir() if p.is_file())
            (usb / ".filler").write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - size // 4))
            add("export onto a full mount point", [export, str(usb / "model.onnx"), *TINY, *QUICK, "--seed", "3"])
            (usb / ".filler").unlink()
            add("the previous export on it afterwards", [ppl, str(usb / "model.onnx"), "--seq-len", "32", "--max-windows", "1"])
        finally:
            subprocess.run(["umount", str(usb)], capture_output=True)
    else:
        rows.append({"class": "export onto a mount point", "command": "", "exit": None,
                     "message": "skipped: mounting a tmpfs needs root"})
    real, link = work / "real", work / "link"
    real.mkdir()
    link.symlink_to(real, target_is_directory=True)
    add("export into a symlinked folder", [export, str(link / "model.onnx"), *TINY, "--float"])
    add("again into the symlinked folder", [export, str(link / "model.onnx"), *TINY, "--float"],
        link_kept=link.is_symlink() and (real / "model.onnx").is_file())
    out = work / "out"
    add("first export in a folder", [export, str(out / "a.onnx"), *TINY, *QUICK])
    add("a second model name in that folder", [export, str(out / "b.onnx"), *TINY, *QUICK])
    add("the same with --overwrite", [export, str(out / "b.onnx"), *TINY, *QUICK, "--overwrite"])
    add("sasq-train into an export folder", [train, str(out), *TINY, *QUICK])
    flt = work / "float" / "model.onnx"
    run([export, str(flt), *TINY, "--float"], work)
    mixed = work / "mixed"
    shutil.copytree(out, mixed)
    shutil.copy(flt, mixed / "b.onnx")
    add("a float model.onnx copied into a quantized folder", [ppl, str(mixed / "b.onnx"), "--seq-len", "32"])
    ckpt = checkpoint(work)
    for kind in CHECKPOINT_FAULTS:
        bad = break_checkpoint(ckpt, work / f"ckpt-{kind}", kind)
        add(f"checkpoint: a weight {kind if kind != 'nan' else 'holding NaN'} (whole model)",
            [export, str(work / f"o-{kind}" / "model.onnx"), "--model", str(bad), "--float"])
        add(f"checkpoint: a weight {kind if kind != 'nan' else 'holding NaN'} (layer by layer)",
            [export, str(work / f"l-{kind}" / "model.onnx"), "--model", str(bad), "--layerwise", "--no-blockwise",
             "--train-steps", "0", "--seq-len", "32", "--calib-batches", "1", "--data", "wikitext2"])
    for kind in ("x1.5", "extra", "vector"):
        run_dir = work / f"run-{kind}"
        run([train, str(run_dir), *TINY, *QUICK], work)
        edit_scales(run_dir, kind)
        what = {"x1.5": "an activation scale x1.5", "extra": "an unknown extra tensor", "vector": "an act_scale as a vector"}
        add(f"run folder: {what[kind]} in scales.safetensors",
            [export, str(work / f"s-{kind}" / "model.onnx"), *TINY, "--scales", str(run_dir)])
    run_dir = work / "run-recipe"
    run([train, str(run_dir), *TINY, *QUICK], work)
    recipe = json.loads((run_dir / "recipe.json").read_text())
    recipe["training"]["notes"] = "hand-edited"
    (run_dir / "recipe.json").write_text(json.dumps(recipe))
    add("run folder: an unknown key inside recipe.json's training record",
        [export, str(work / "s-recipe" / "model.onnx"), *TINY, "--scales", str(run_dir)])
    add("--calib-batches 1000000 (more than the text holds)",
        [export, str(work / "cb" / "model.onnx"), *TINY, "--seq-len", "32", "--calib-batches", "1000000",
         "--train-steps", "0", "--no-blockwise"])
    add("sasq-baseline ort-minmax --float-onnx given a quantized export",
        ["sasq-baseline", "ort-minmax", "--float-onnx", str(out / "b.onnx"), "--out", str(work / "bl" / "b.onnx"),
         "--seq-len", "32"])
    deep = work / "deep.jsonl"
    deep.write_text('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    add("a .jsonl line nested 100,000 deep", [export, str(work / "deep" / "model.onnx"), *TINY, "--data", str(deep), *QUICK])
    return rows


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="sasq-reliability-") as tmp:
        rows = cases(Path(tmp))
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "reliability.json").write_text(json.dumps({"cases": rows}, indent=2) + "\n")
    lines = ["# Hostile inputs", "", "`python bench/reliability.py`: each class run as the command a user types on the "
             "tiny model (W: a temporary folder). Exit codes: 0 done, 2 refused (a user's error, one line), 3 internal "
             "error (none here).", "", "| class | exit | what it printed (last line) | command |", "| --- | --- | --- | --- |"]
    for r in rows:
        msg = r["message"].replace("|", "\\|")
        lines.append(f"| {r['class']} | {r['exit']} | {msg} | `{r['command']}` |")
    (HERE / "results" / "reliability.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
