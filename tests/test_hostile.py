"""Hostile input and faults (issue 13): bad arguments, files that are not what they claim, paths
that cannot be written, full and read-only disks, kills at every stage of an export and a
training run, concurrent runs, a closed stdout, internal errors. Each case asserts the message,
the exit code (0 ok, 1 check failed, 2 user error, 3 internal error) and the folder's state
afterwards. The README's reliability table lists these cases.
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
    assert len(_leftovers(tmp_path)) <= 1
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
