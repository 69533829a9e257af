"""Run the README's main job exactly as written, command by command, and time each stage.

    python bench/main_job.py [--model M]   # default: the local SmolLM2-135M-Instruct folder ($SASQ_SMOLLM2_DIR)

The commands are the ``bash`` block under "## The main job" in README.md (tests/test_recipes.py
keeps it parseable), run in order in one shell in a scratch working directory, ``MODEL`` set to ``--model`` (the
README's hub id needs the hub; this machine has the same checkpoint as a local folder) and
``SASQ_DATA_DIR`` taken from the environment (WikiText-2 offline). Writes bench/results/main_job.{json,md}: each
command's exit code, wall time and last output line.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
README = ROOT / "README.md"


def readme_commands(text: str | None = None) -> list[str]:
    """The commands of the main job's bash block: comments dropped, continuation lines joined."""
    text = text if text is not None else README.read_text()
    block = text.split("## The main job", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands, pending = [], ""
    for raw in block.splitlines():
        line = re.sub(r"\s+#.*$", "", raw).rstrip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        commands.append((pending + line).strip())
        pending = ""
    return commands


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=os.environ.get(
        "SASQ_SMOLLM2_DIR", str(Path.home() / ".cache" / "sasq-assets" / "smollm2-135m-instruct")))
    args = p.parse_args()
    commands = readme_commands()
    work = Path(tempfile.mkdtemp(prefix="sasq-main-job-"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    (work / "repo").mkdir()
    rows = []
    state = ""  # exports and variables carry from one command to the next, as in one shell
    for cmd in commands:
        if cmd.startswith("MODEL="):
            cmd = f"MODEL={args.model}"
        t = time.perf_counter()
        script = f"set -e\n{state}\n{cmd}\n"
        proc = subprocess.run(["bash", "-c", script], cwd=work / "repo", env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if cmd.startswith(("export ", "MODEL=")) or re.match(r"^[A-Z_]+=", cmd):
            state += cmd + "\n"
        out = (proc.stdout.strip().splitlines() or proc.stderr.strip().splitlines() or [""])[-1]
        rows.append({"command": cmd, "exit": proc.returncode, "wall_s": round(wall, 1), "last_line": out[:300]})
        print(f"[{proc.returncode}] {wall:7.1f} s  {cmd}\n        {out[:200]}", flush=True)
    res = {"bench": "main_job", "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                           "avx512_vnni": "avx512_vnni" in Path("/proc/cpuinfo").read_text()},
           "work": str(work), "rows": rows, "all_exit_0": all(r["exit"] == 0 for r in rows)}
    out = HERE / "results"
    (out / "main_job.json").write_text(json.dumps(res, indent=2) + "\n")
    md = ["# The README's main job, run as written (`python bench/main_job.py`)", "",
          f"Machine: {res['machine']}. Every command in one shell, in a scratch folder.", "",
          "| command | exit | wall s | last line |", "|---|---|---|---|"]
    md += [f"| `{r['command']}` | {r['exit']} | {r['wall_s']} | {r['last_line'].replace('|', '/')[:160]} |" for r in rows]
    (out / "main_job.md").write_text("\n".join(md) + "\n")
    print("all exit 0" if res["all_exit_0"] else "some command failed", flush=True)


if __name__ == "__main__":
    main()
