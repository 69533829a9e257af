"""Hostile input and faults: bad arguments, files that are not what they claim, paths
that cannot be written, full and read-only disks, kills at every stage of an export and a
training run, concurrent runs, a closed stdout, internal errors. Each case asserts the message,
the exit code (0 ok, 1 check failed, 2 user error, 3 internal error) and the folder's state
afterwards. docs/RELIABILITY.md's table lists these cases.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sasq_edge.cli.export import main as export_main
from sasq_edge.cli.generate import main as generate_main
from sasq_edge.cli.ppl import main as ppl_main
from sasq_edge.cli.train import main as train_main
from sasq_edge.cli.validate import main as validate_main

TINY = ["--model", "tiny-random-llama"]
QUICK = ["--seq-len", "32", "--calib-batches", "1", "--train-steps", "1"]
ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"


def _outcome(capsys, code: int) -> tuple[int, list[str], list[str]]:
    cap = capsys.readouterr()
    return code, cap.out.strip().splitlines(), cap.err.strip().splitlines()


def _one_error(capsys, code: int, expected: int = 2) -> str:
    """The one error line (the last line on stderr; progress bars of work done before may precede it)."""
    code, out, err = _outcome(capsys, code)
    assert code == expected, (code, err)
    assert [line for line in err if "error:" in line] == err[-1:], err
    return err[-1]


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (a hidden lock file and staging folders left out)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith(".sasq-lock") and ".sasq-stage-" not in str(p.relative_to(folder))}


def _leftovers(parent: Path) -> list[str]:
    """Staging folders, and lock files, under ``parent`` (a killed run leaves its lock file, which
    the next run takes over and removes)."""
    return sorted(p.name for p in parent.rglob("*") if p.name.startswith(".sasq-stage-"))


def _locks(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.rglob(".sasq-lock"))


@pytest.fixture(scope="module")
def good(tmp_path_factory, data_dir) -> Path:
    """A finished export of the tiny model (1 training step)."""
    out = tmp_path_factory.mktemp("good") / "out" / "model.onnx"
    assert export_main([str(out), *TINY, *QUICK, "--data-dir", str(data_dir)]) == 0
    return out


# --- 1. arguments: refused before any work, exit 2, one line; JSON with --json -------------------


@pytest.mark.parametrize("main, argv, message", [
    (ppl_main, ["--threads", "-1"], "argument --threads: -1 must be at least 1"),
    (ppl_main, ["--seq-len", "1"], "argument --seq-len: 1 must be at least 2"),
    (ppl_main, ["--max-windows", "0"], "argument --max-windows: 0 must be at least 1"),
    (ppl_main, ["--max-windows", str(2**40)], f"argument --max-windows: {2**40} must be at most 2147483647"),
    (generate_main, ["--prompt", "a", "--seed", str(10**20)], f"argument --seed: {10**20} must be at most 2147483647"),
    (generate_main, ["--prompt", "a", "--temperature", "nan"], "argument --temperature: nan must be a finite number"),
    (generate_main, ["--prompt", "a", "--temperature", "inf"], "argument --temperature: inf must be a finite number"),
    (generate_main, ["--prompt", "a", "--top-p", "1.5"], "argument --top-p: 1.5 must be a finite number in (0, 1]"),
    (generate_main, ["--prompt", "a", "--max-new-tokens", "0"], "argument --max-new-tokens: 0 must be at least 1"),
    (validate_main, ["--max-kl-mean", "-1"], "argument --max-kl-mean: -1 must be a finite number in [0, inf)"),
    (validate_main, ["--max-kl-p99", "nan"], "argument --max-kl-p99: nan must be a finite number"),
    (validate_main, ["--max-ppl-ratio-error", "-0.1"], "argument --max-ppl-ratio-error: -0.1 must be a finite number"),
    (validate_main, ["--min-top1-confident", "2"], "argument --min-top1-confident: 2 must be a finite number in [0, 1]"),
    (validate_main, ["--top1-margin", "inf"], "argument --top1-margin: inf must be a finite number"),
    (validate_main, ["--max-block-error", "-1"], "argument --max-block-error: -1 must be a finite number in [0, inf)"),
    (validate_main, ["--tie-ulps", "-1"], "argument --tie-ulps: -1 must be at least 0"),
    (validate_main, ["--layer-windows", "-2"], "argument --layer-windows: -2 must be at least 0"),
    (ppl_main, ["--provider", "rocm"], "unknown execution provider 'rocm'"),
])
def test_bad_numbers_and_names(good, capsys, main, argv, message):
    line = _one_error(capsys, main([str(good), *argv]))
    assert message in line


@pytest.mark.parametrize("argv, message", [
    (["--lr", "0"], "argument --lr: 0 must be a finite number in (0, inf)"),
    (["--lr", "nan"], "argument --lr: nan must be a finite number"),
    (["--percentile", "101"], "argument --percentile: 101 must be a finite number in (50, 100]"),
    (["--train-steps", "-3"], "argument --train-steps: -3 must be at least 0"),
    (["--smooth-alpha", "2"], "smooth_alpha=2.0 must be a number in [0, 1]"),
    (["--profile", "avx-512"], "unknown deploy profile 'avx-512'"),
])
def test_bad_training_options(tmp_path, capsys, argv, message):
    run = tmp_path / "run"
    line = _one_error(capsys, train_main([str(run), *TINY, *argv]))
    assert message in line
    assert not run.exists()


@pytest.mark.parametrize("main, argv", [
    (ppl_main, ["--threads", "-1"]),
    (train_main, ["run", *TINY, "--lr", "0"]),
    (ppl_main, ["--data-dir", "/nonexistent-sasq-dir"]),
])
def test_json_on_error_ends_with_one_json_object(good, capsys, main, argv):
    argv = [str(good), *argv] if main is ppl_main else argv
    code, out, err = _outcome(capsys, main([*argv, "--json"]))
    assert code == 2 and len(err) == 1
    last = json.loads(out[-1])
    assert last["code"] == 2 and last["error"] in err[0]


# --- 2. the model -----------------------------------------------------------------------------


def test_missing_relative_model_path(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "some").mkdir()  # "some/dir" with some/ here is a path, not a hub id: refused at once
    line = _one_error(capsys, export_main(["out/model.onnx", "--model", "some/dir", "--float"]))
    assert "model folder some/dir not found: check the path" in line
    assert not (tmp_path / "out").exists()


def test_garbage_and_cut_gguf(tmp_path, capsys):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(range(256)) * 10)
    line = _one_error(capsys, export_main([str(tmp_path / "o" / "model.onnx"), "--model", str(junk), "--float"]))
    assert "is not a complete GGUF file" in line and "download it again" in line
    notgguf = tmp_path / "weights.gguf"
    notgguf.write_text("hello")
    assert "is not a GGUF file" in _one_error(capsys, export_main([str(tmp_path / "o" / "model.onnx"), "--model",
                                                                  str(notgguf), "--float"]))
    real = ASSETS / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if real.is_file():
        cut = tmp_path / "cut.gguf"
        with open(real, "rb") as f:
            cut.write_bytes(f.read(real.stat().st_size // 2))
        line = _one_error(capsys, export_main([str(tmp_path / "o" / "model.onnx"), "--model", str(cut), "--float"]))
        assert "is not a complete GGUF file" in line or "is truncated" in line
    assert not (tmp_path / "o").exists()


def test_pickle_with_code_is_refused_and_never_runs(tmp_path, capsys):
    import torch

    from sasq_edge.models import tiny_random_llama

    folder, marker = tmp_path / "pickled", tmp_path / "pwned"
    lm = tiny_random_llama()
    lm.model.config.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({**lm.model.state_dict(), "payload": Payload()}, folder / "pytorch_model.bin")
    line = _one_error(capsys, export_main([str(tmp_path / "o" / "model.onnx"), "--model", str(folder), "--float"]))
    assert "refused to unpickle" in line and "convert it to safetensors" in line
    assert not marker.exists()


# --- 3. the data ------------------------------------------------------------------------------


@pytest.mark.parametrize("content, message", [
    (b"caf\xe9 au lait\n" * 50, "is not UTF-8 text (byte 0xe9 at offset 3)"),
    (b"", "is empty"),
    (b"\n  \n\n", "is empty"),
    (b"\x00\x01\x02" * 100, "holds NUL bytes"),
])
def test_bad_data_files(good, tmp_path, capsys, content, message):
    data = tmp_path / "data"
    data.mkdir()
    (data / "wiki.test.raw").write_bytes(content)
    line = _one_error(capsys, ppl_main([str(good), "--data-dir", str(data), "--seq-len", "32"]))
    assert message in line


# --- 4. state files and folders that do not belong together ------------------------------------


def test_unknown_key_in_recipe(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    assert train_main([str(run), *TINY, *QUICK, "--data-dir", str(data_dir)]) == 0
    capsys.readouterr()
    recipe = json.loads((run / "recipe.json").read_text())
    recipe["notes"] = "hand-edited"
    (run / "recipe.json").write_text(json.dumps(recipe))
    line = _one_error(capsys, export_main([str(tmp_path / "o" / "model.onnx"), *TINY, "--scales", str(run)]))
    assert "unknown key(s) notes" in line
    assert not (tmp_path / "o").exists()


def test_mixed_folder_is_refused_by_every_reader(good, tmp_path, data_dir, capsys):
    """The recipe and scales of another run copied beside an export (what a re-export killed
    halfway into a shared folder leaves): every command that reads the folder refuses it."""
    mixed = tmp_path / "mixed"
    shutil.copytree(good.parent, mixed)
    run = tmp_path / "run"
    assert train_main([str(run), *TINY, *QUICK, "--seed", "7", "--data-dir", str(data_dir)]) == 0
    capsys.readouterr()
    for name in ("recipe.json", "scales.safetensors"):
        shutil.copy(run / name, mixed / name)
    onnx_path = str(mixed / "model.onnx")
    for main, extra in ((ppl_main, ["--data-dir", str(data_dir), "--seq-len", "32"]), (generate_main, ["--prompt", "a"]),
                        (validate_main, ["--data-dir", str(data_dir), "--seq-len", "32"])):
        line = _one_error(capsys, main([onnx_path, *extra]))
        assert "recipe.json does not belong to model.onnx" in line and "re-export the folder" in line


def test_unreadable_scale_file(good, tmp_path):
    """A scale file without read permission, read by a process that cannot override permissions."""
    folder = tmp_path / "scales"
    shutil.copytree(good.parent, folder)
    os.chmod(folder / "scales.safetensors", 0o000)
    res = _without_permission_override(_cli("export", [str(tmp_path / "o" / "model.onnx"), "--model", "tiny-random-llama",
                                                       "--scales", str(folder)]))
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(err) == 1 and "no permission to read" in err[0] and "scales.safetensors" in err[0]


# --- 5. output paths --------------------------------------------------------------------------


def test_output_paths(tmp_path, capsys):
    (tmp_path / "adir.onnx").mkdir()
    assert "is a folder" in _one_error(capsys, export_main([str(tmp_path / "adir.onnx"), *TINY, "--float"]))
    (tmp_path / "afile").write_text("x")
    line = _one_error(capsys, export_main([str(tmp_path / "afile" / "model.onnx"), *TINY, "--float"]))
    assert "is a file, so" in line
    long = tmp_path / ("x" * 300) / "model.onnx"
    assert "255" in _one_error(capsys, export_main([str(long), *TINY, "--float"]))
    assert "must end in .onnx" in _one_error(capsys, export_main([str(tmp_path / "model.txt"), *TINY, "--float"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir.onnx", "afile"]


def test_shared_folder_keeps_other_files_and_normal_permissions(tmp_path, capsys, monkeypatch):
    """A folder holding the user's own files is filled file by file, and nothing else is touched."""
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    assert export_main(["model.onnx", *TINY, "--float"]) == 0  # the mission's plain form, in the working directory
    capsys.readouterr()
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "model.onnx").is_file()
    assert _leftovers(tmp_path) == []
    mask = os.umask(0)
    os.umask(mask)
    for name in ("model.onnx", "config.json", "tokenizer.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name


# --- 6. the environment: read-only and full disks, a closed pipe ------------------------------


def _mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    return res.returncode == 0


def _umount(where: Path) -> None:
    subprocess.run(["umount", str(where)], capture_output=True)


def test_folder_without_write_permission(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o555)
    res = _without_permission_override(_cli("export", [str(locked / "out" / "model.onnx"), "--model", "tiny-random-llama",
                                                       "--float"]))
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(err) == 1 and f"no permission to write in {locked}" in err[0]
    assert list(locked.iterdir()) == []


def test_read_only_disk(tmp_path, capsys):
    ro = tmp_path / "ro"
    if not _mount_tmpfs(ro, "ro,size=1m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        line = _one_error(capsys, export_main([str(ro / "out" / "model.onnx"), *TINY, "--float"]))
        assert "read-only file system" in line
    finally:
        _umount(ro)


def test_full_disk_leaves_the_previous_export(tmp_path, data_dir, capsys):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "size=4m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = disk / "out" / "model.onnx"
        args = [*TINY, "--seq-len", "32", "--calib-batches", "1", "--data-dir", str(data_dir)]
        assert export_main([str(out), *args, "--train-steps", "0"]) == 0
        before = _tree(out.parent)
        # fill the disk until half an export of the same size would still fit: the second one cannot
        size = sum(len(b) for b in before.values())
        st = os.statvfs(disk)
        (disk / "filler").write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - size // 2))
        capsys.readouterr()
        line = _one_error(capsys, export_main([str(out), *args, "--train-steps", "1"]))
        assert f"no space left on {disk}" in line and "MB needed" in line and "MB free" in line
        assert _tree(out.parent) == before and _leftovers(disk) == []
    finally:
        _umount(disk)


def test_closed_stdout_ends_quietly(good):
    code = (f"import sys\nfrom sasq_edge.cli.generate import main\n"
            f"sys.exit(main([{str(good)!r}, '--prompt', 'hello', '--max-new-tokens', '20']))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first token, as with `| head -c 0`
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and err.decode().strip() == ""


# --- 7. kills at every stage, and two runs at once --------------------------------------------


def _run(code: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _without_permission_override(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` so that file permissions apply to it: as root, without the capabilities that
    bypass them (``setpriv``); as another user, as is."""
    cmd = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("root without setpriv: permissions cannot be made to apply")
        caps = "-dac_override,-dac_read_search"
        cmd = [setpriv, "--bounding-set", caps, "--inh-caps", caps, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _cli(module: str, argv: list[str]) -> str:
    return f"import sys\nfrom sasq_edge.cli.{module} import main\nsys.exit(main({argv!r}))"


@pytest.mark.parametrize("stage", ["traced", "staged", "commit"])
def test_export_killed_at_each_stage(good, tmp_path, data_dir, stage, capsys):
    folder = tmp_path / "out"
    shutil.copytree(good.parent, folder)
    before = _tree(folder)
    argv = [str(folder / "model.onnx"), *TINY, *QUICK, "--seed", "5", "--data-dir", str(data_dir)]
    res = _run(_cli("export", argv), {"SASQ_TEST_KILL_AT": stage})
    assert res.returncode == -signal.SIGKILL
    assert _tree(folder) == before  # the previous export, byte for byte
    assert len(_leftovers(tmp_path)) <= 1  # the killed run's one staging folder at most (none when killed at 'traced')
    # the next run cleans up, says so, and writes the new export
    assert export_main(argv) == 0
    err = capsys.readouterr().err
    assert _leftovers(tmp_path) == [] and _locks(tmp_path) == []
    assert ("left by a run that did not finish" in err) == (stage != "traced")
    assert _tree(folder) != before and ppl_main([str(folder / "model.onnx"), "--data-dir", str(data_dir),
                                                 "--seq-len", "32", "--max-windows", "1"]) == 0


@pytest.mark.parametrize("stage", ["state-staged", "commit"])
def test_training_killed_at_each_stage(tmp_path, data_dir, stage, capsys):
    run = tmp_path / "run"
    assert train_main([str(run), *TINY, *QUICK, "--data-dir", str(data_dir)]) == 0
    before = _tree(run)
    argv = [str(run), *TINY, *QUICK, "--seed", "9", "--data-dir", str(data_dir)]
    assert _run(_cli("train", argv), {"SASQ_TEST_KILL_AT": stage}).returncode == -signal.SIGKILL
    assert _tree(run) == before and len(_leftovers(tmp_path)) == 1
    capsys.readouterr()
    assert train_main(argv) == 0
    assert "left by a run that did not finish" in capsys.readouterr().err and _leftovers(tmp_path) == []
    assert _locks(tmp_path) == []


def test_two_exports_at_once(tmp_path, data_dir):
    out = tmp_path / "out" / "model.onnx"
    argv = [str(out), *TINY, *QUICK, "--data-dir", str(data_dir)]
    first = subprocess.Popen([sys.executable, "-c", _cli("export", argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "SASQ_TEST_PAUSE_AT": "traced:15"})
    lock = out.parent / ".sasq-lock"
    deadline = time.time() + 120
    while not lock.exists() and time.time() < deadline:  # the first run locks before it loads the model
        time.sleep(0.1)
    second = _run(_cli("export", argv))
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    err = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(err) == 1 and "another sasq run is writing" in err[0]
    assert (out.parent / "model.onnx").is_file() and _leftovers(tmp_path) == []


# --- 8. internal errors -----------------------------------------------------------------------


def test_internal_error_is_one_line_with_a_traceback_file(good, tmp_path, data_dir, capsys, monkeypatch):
    import importlib

    def broken(*_a, **_k):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(importlib.import_module("runtime.perplexity"), "perplexity", broken)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    argv = [str(good), "--seq-len", "32", "--max-windows", "1", "--data-dir", str(data_dir)]
    code, out, err = _outcome(capsys, ppl_main([*argv, "--json"]))
    assert code == 3 and len(err) == 1
    assert err[0].startswith("sasq-ppl: internal error: RuntimeError: simulated bug (full traceback in ")
    logs = list((tmp_path / "cache" / "sasq-edge" / "logs").iterdir())
    assert len(logs) == 1 and "simulated bug" in logs[0].read_text() and "Traceback" in logs[0].read_text()
    assert json.loads(out[-1])["code"] == 3
    code, _, err = _outcome(capsys, ppl_main([*argv, "--debug"]))
    assert code == 3 and any(line.startswith("Traceback") for line in err)


# --- 9. where users really write: mount points, symlinked folders, one export per folder --------


def test_export_onto_a_mount_point_and_onto_a_full_one(tmp_path, data_dir, capsys):
    """The output folder is itself a mount point (a USB stick, a Docker or Kubernetes volume): the
    export is written, replaced, and on a full one refused in one line with the numbers, the
    previous export intact and loadable."""
    disk = tmp_path / "usb"
    if not _mount_tmpfs(disk, "size=3m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = disk / "model.onnx"
        args = [*TINY, "--seq-len", "32", "--calib-batches", "1", "--data-dir", str(data_dir)]
        assert export_main([str(out), *args, "--train-steps", "0"]) == 0
        assert export_main([str(out), *args, "--train-steps", "1"]) == 0  # replaced in place
        assert os.path.ismount(disk) and _leftovers(disk) == [] and _locks(disk) == []
        before = _tree(disk)
        size = sum(len(b) for b in before.values())
        st = os.statvfs(disk)
        filler = disk / ".filler"
        filler.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - size // 2))
        capsys.readouterr()
        line = _one_error(capsys, export_main([str(out), *args, "--train-steps", "0", "--seed", "3"]))
        assert f"no space left on {disk}" in line and "MB needed" in line and "MB free" in line
        filler.unlink()
        assert _tree(disk) == before and _leftovers(disk) == []
        assert ppl_main([str(out), "--data-dir", str(data_dir), "--seq-len", "32", "--max-windows", "1"]) == 0
    finally:
        _umount(disk)


def test_symlinked_output_folder_stays_a_link(tmp_path, data_dir, capsys):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    args = [*TINY, "--float"]
    for _ in range(2):  # written, then replaced
        assert export_main([str(link / "model.onnx"), *args]) == 0
        assert link.is_symlink() and (real / "model.onnx").is_file() and _leftovers(real) == []


def test_one_export_per_folder(tmp_path, data_dir, capsys):
    """A second model name in a folder holding an export is refused, naming it and --overwrite;
    with --overwrite the other export is replaced; sasq-train refuses an export folder."""
    folder = tmp_path / "out"
    args = [*TINY, *QUICK, "--data-dir", str(data_dir)]
    assert export_main([str(folder / "a.onnx"), *args]) == 0
    before = _tree(folder)
    capsys.readouterr()
    line = _one_error(capsys, export_main([str(folder / "b.onnx"), *args]))
    assert f"{folder} holds another export (a.onnx)" in line and "--overwrite" in line
    assert _tree(folder) == before
    (folder / "encoder.onnx").write_bytes(b"the user's own file, not an export")
    assert export_main([str(folder / "b.onnx"), *args, "--overwrite"]) == 0
    assert sorted(p.name for p in folder.glob("*.onnx")) == ["b.onnx", "encoder.onnx"]  # only the export replaced
    assert ppl_main([str(folder / "b.onnx"), "--data-dir", str(data_dir), "--seq-len", "32", "--max-windows", "1"]) == 0
    capsys.readouterr()
    line = _one_error(capsys, train_main([str(folder), *args]))
    assert "is an export folder (b.onnx)" in line and "--scales" in line


def test_float_model_in_a_quantized_folder_is_refused(good, tmp_path, data_dir, capsys):
    folder = tmp_path / "q"
    shutil.copytree(good.parent, folder)
    flt = tmp_path / "f" / "model.onnx"
    assert export_main([str(flt), *TINY, "--float"]) == 0
    shutil.copy(flt, folder / "model.onnx")
    capsys.readouterr()
    line = _one_error(capsys, ppl_main([str(folder / "model.onnx"), "--data-dir", str(data_dir), "--seq-len", "32"]))
    assert "is a float model, but its folder holds a quantized export's recipe.json" in line
    code, out, _ = _outcome(capsys, ppl_main([str(flt), "--data-dir", str(data_dir), "--seq-len", "32", "--max-windows", "1"]))
    assert code == 0 and "(float model)" in out[-1]


def test_kill_between_renames_is_refused_until_the_next_export(good, tmp_path, data_dir, capsys):
    """A kill after some files of the new export are in place and before the ONNX file is: the
    digests the old ONNX file records no longer match, every reader refuses the folder, and the
    next export repairs it."""
    folder = tmp_path / "out"
    shutil.copytree(good.parent, folder)
    argv = [str(folder / "model.onnx"), *TINY, *QUICK, "--seed", "5", "--data-dir", str(data_dir)]
    assert _run(_cli("export", argv), {"SASQ_TEST_KILL_AT": "commit-half"}).returncode == -signal.SIGKILL
    line = _one_error(capsys, ppl_main([str(folder / "model.onnx"), "--data-dir", str(data_dir), "--seq-len", "32"]))
    assert "does not belong to model.onnx" in line and "re-export the folder" in line
    assert export_main(argv) == 0
    assert ppl_main([str(folder / "model.onnx"), "--data-dir", str(data_dir), "--seq-len", "32", "--max-windows", "1"]) == 0


# --- 10. files read back are what wrote them --------------------------------------------------


def _edit_scales(run: Path, edit) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(run / "scales.safetensors"))
    edit(tensors)
    save_file(tensors, str(run / "scales.safetensors"), metadata={"format": "sasq-scales", "version": "3"})


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update({k: v * 1.5 for k, v in list(t.items())[:1]}), "is not the file written with recipe.json"),
    (lambda t: t.update({"extra.tensor": np.ones(2, np.float32)}), "holds tensor(s) sasq-edge does not write (extra.tensor)"),
    (lambda t: t.update({k: np.full(3, float(v), np.float32) for k, v in [next((k, v) for k, v in t.items()
                                                                               if k.endswith(".act_scale"))]}),
     "a per-tensor scale is one number"),
], ids=["scale-x1.5", "extra-tensor", "vector-scale"])
def test_edited_run_folder_is_refused(tmp_path, data_dir, capsys, edit, message):
    run = tmp_path / "run"
    assert train_main([str(run), *TINY, *QUICK, "--data-dir", str(data_dir)]) == 0
    _edit_scales(run, edit)
    capsys.readouterr()
    line = _one_error(capsys, export_main([str(tmp_path / "o" / "model.onnx"), *TINY, "--scales", str(run)]))
    assert message in line
    assert not (tmp_path / "o").exists()


def test_edited_recipe_is_refused(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    assert train_main([str(run), *TINY, *QUICK, "--data-dir", str(data_dir)]) == 0
    recipe = json.loads((run / "recipe.json").read_text())
    recipe["training"]["notes"] = "hand-edited"  # inside the free-form training record
    (run / "recipe.json").write_text(json.dumps(recipe))
    capsys.readouterr()
    line = _one_error(capsys, export_main([str(tmp_path / "o" / "model.onnx"), *TINY, "--scales", str(run)]))
    assert "recipe.json was changed after sasq-edge wrote it" in line


@pytest.mark.parametrize("layerwise", [False, True], ids=["whole", "layer-by-layer"])
@pytest.mark.parametrize("kind, message", [
    ("missing", "the checkpoint lacks model.layers.1.mlp.down_proj.weight"),
    ("extra", "the checkpoint holds model.layers.7.mlp.up_proj.weight, for which"),
    ("misshapen", "model.layers.1.mlp.down_proj.weight has shape [64, 100] in the checkpoint"),
    ("nan", "model.layers.1.mlp.down_proj.weight holds 1 NaN or infinite value(s)"),
])
def test_broken_checkpoint_is_refused_naming_the_tensor(folder, tmp_path, data_dir, capsys, kind, message, layerwise):
    from runtime.faults import break_checkpoint

    ckpt = break_checkpoint(folder, tmp_path / "ckpt", kind)
    extra = ["--layerwise", "--no-blockwise", "--train-steps", "0"] if layerwise else ["--float"]
    line = _one_error(capsys, export_main([str(tmp_path / "o" / "model.onnx"), "--model", str(ckpt), *extra,
                                           "--seq-len", "32", "--calib-batches", "1", "--data-dir", str(data_dir)]))
    assert message in line
    assert not (tmp_path / "o").exists()


# --- 11. numbers with a bound, files with a depth limit -------------------------------------------


def test_calib_batches_beyond_the_text_are_capped_and_said(tmp_path, data_dir, capsys):
    code = export_main([str(tmp_path / "o" / "model.onnx"), *TINY, "--seq-len", "32", "--calib-batches", "1000000",
                        "--train-steps", "0", "--no-blockwise", "--data-dir", str(data_dir)])
    err = capsys.readouterr().err
    assert code == 0 and "--calib-batches 1000000: the text holds" in err
    assert json.loads((tmp_path / "o" / "recipe.json").read_text())["training"]["calib_windows"] < 1000000  # capped


def test_baseline_refuses_a_quantized_float_onnx(good, tmp_path, data_dir, capsys):
    from sasq_edge.cli.baseline import main as baseline_main

    line = _one_error(capsys, baseline_main(["ort-minmax", "--float-onnx", str(good), "--out", str(tmp_path / "b.onnx"),
                                             "--data-dir", str(data_dir), "--seq-len", "32"]))
    assert "is already quantized" in line and "sasq-export --float" in line
    assert not (tmp_path / "b.onnx").exists()


def test_deeply_nested_json_line_is_one_error(tmp_path, data_dir, capsys):
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    line = _one_error(capsys, export_main([str(tmp_path / "o" / "model.onnx"), *TINY, "--data", str(deep), *QUICK]))
    assert "line 1 of" in line and "nested deeper than the JSON parser allows" in line


def test_output_larger_than_the_free_space_is_refused_before_writing(tmp_path):
    from runtime.io import NoSpaceError, OutputFolder, device_of, free_bytes

    free = free_bytes(tmp_path)
    with pytest.raises(NoSpaceError) as e, OutputFolder(tmp_path / "out", need=free + 10**9):
        pass
    assert f"no space left on {device_of(tmp_path)}" in str(e.value) and "MB needed" in str(e.value)
    assert not (tmp_path / "out").exists()  # nothing written, not even the folder
