"""The device install (README: ``pip install sasq-edge``, no torch, transformers or datasets):
``sasq-ppl``, ``sasq-generate``, ``sasq-lint`` and the Python runtime API on a real export of the
tiny model, each in a subprocess where importing torch, transformers or datasets raises
ImportError. Their results must equal what the full install computes in this process."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from bounds import HOST_PROFILE

from runtime.data import load_text, make_windows, tokenize
from runtime.generate import Sampling, generate
from runtime.perplexity import perplexity
from runtime.session import open_session

BLOCKED = ("torch", "transformers", "datasets")
_PRELUDE = f"""
import importlib.abc, sys
class _DeviceInstall(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not installed on this device)", name=name)
sys.meta_path.insert(0, _DeviceInstall())
"""


def _device(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _PRELUDE + code], capture_output=True, text=True, timeout=300)


def _command(module: str, argv: list[str]) -> subprocess.CompletedProcess:
    return _device(f"from sasq_edge.cli.{module} import main\nsys.exit(main({argv!r}))")


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny model calibrated and trained 2 steps, exported for this CPU (the full install)."""
    from exporters import export_onnx
    from sasq_edge.config import QuantConfig
    from sasq_edge.models import tiny_random_llama
    from sasq_edge.pipeline import run_sasq

    lm = tiny_random_llama()
    windows = np.random.default_rng(3).integers(0, 257, (6, 64))
    state = run_sasq(lm, QuantConfig.plain(profile=HOST_PROFILE, seq_len=64, calib_batches=2, train_steps=2, lr=0.05),
                     windows=windows, progress=False).state
    res = export_onnx(lm.model, tmp_path_factory.mktemp("device") / "model.onnx", state=state, tokenizer=lm.tokenizer)
    return res.onnx, lm.tokenizer


def test_the_blocker_blocks():
    res = _device("import torch")
    assert res.returncode == 1 and "No module named 'torch' (not installed on this device)" in res.stderr
    assert _device("import runtime, numpy, onnxruntime, tokenizers, safetensors").returncode == 0


def test_ppl_without_torch(folder, data_dir):
    onnx_path, tokenizer = folder
    res = _command("ppl", [str(onnx_path), "--data-dir", str(data_dir), "--seq-len", "64", "--max-windows", "3",
                           "--threads", "1", "--json"])
    assert res.returncode == 0, res.stderr
    got = _last_json(res.stdout)
    # the same windows through transformers' tokenizer and the same session, in this process
    windows = make_windows(tokenize(load_text("test", data_dir), tokenizer), 64, 3)
    ref = perplexity(open_session(onnx_path, ["cpu"], 1), windows)
    assert (got["windows"], got["tokens"], got["seq_len"]) == (3, 3 * 63, 64)
    assert got["ppl"] == ref.ppl  # the device's tokenizers library gives the same ids


def test_ppl_on_own_files_without_datasets(folder, tmp_path):
    """``--data`` with .txt and .jsonl files on the device: no datasets needed, the same windows
    and perplexity as the full install; .parquet and hub ids say in one line what they need."""
    from runtime.sources import EVALUATION, load_windows

    onnx_path, tokenizer = folder
    txt = tmp_path / "mine.txt"
    txt.write_text("Some text of my own, written for this device test. " * 30)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"body": f"Row {i} of my own data, read on the device."}) for i in range(40)))
    sess = open_session(onnx_path, ["cpu"], 1)
    for spec in (str(txt), f"{rows}:body", f"0.5*{txt},0.5*{rows}:body"):
        res = _command("ppl", [str(onnx_path), "--data", spec, "--seq-len", "32", "--threads", "1", "--json"])
        assert res.returncode == 0, res.stderr
        got = _last_json(res.stdout)
        ref = load_windows(spec, tokenizer, 32, EVALUATION, bos=None)
        assert got["data"] == ref.record and got["ppl"] == perplexity(sess, ref.windows).ppl
    (tmp_path / "rows.parquet").write_bytes(b"PAR1")
    for spec in (str(tmp_path / "rows.parquet"), "hf:wikitext:wikitext-2-raw-v1:test"):
        res = _command("ppl", [str(onnx_path), "--data", spec, "--seq-len", "32"])
        err = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(err) == 1 and "is read with the datasets package, which this install lacks" in err[0]


def test_generate_without_torch(folder):
    onnx_path, tokenizer = folder
    res = _command("generate", [str(onnx_path), "--prompt", "The capital of France is", "--max-new-tokens", "12",
                                "--ignore-eos", "--threads", "1", "--json"])
    assert res.returncode == 0, res.stderr
    got = _last_json(res.stdout)
    ids = tokenizer("The capital of France is")["input_ids"]
    tokens, _ = generate(open_session(onnx_path, ["cpu"], 1), ids, Sampling(max_new_tokens=12))
    assert got["tokens"] == tokens and got["new_tokens"] == 12 and got["prompt_tokens"] == len(ids)
    assert got["text"] == tokenizer.decode(tokens)


def test_lint_without_torch(folder):
    onnx_path, _ = folder
    res = _command("lint", [str(onnx_path), "--json"])
    assert res.returncode == 1, res.stderr  # a CPU profile: uint8 activations break TensorRT's int8 rule
    got = _last_json(res.stdout)
    assert got["profile"] == HOST_PROFILE and set(got["tensorrt"]["by_rule"]) == {"int8-type"}
    assert got["fusion"]["passed"] and got["fusion"]["fused"] == got["fusion"]["target_layers"] == 14
    assert "export with --profile trt for TensorRT" in res.stdout


def test_python_runtime_api_without_torch(folder):
    onnx_path, _ = folder
    code = f"""
from pathlib import Path
import numpy as np
from runtime import ScaleState, open_session, perplexity
from runtime.fusion import check_fusion
path = Path({str(onnx_path)!r})
sess = open_session(path, ["cpu"], 1)
state = ScaleState.load(path.parent)
ids = np.arange(64, dtype=np.int64)[None] % 257
print(sess.profile, state.profile, len(state.scales), check_fusion(path).passed, round(perplexity(sess, ids).ppl, 3))
print(sorted(m for m in sys.modules if m.split(".")[0] in ("sasq_edge", "exporters")))
"""
    res = _device(code)
    assert res.returncode == 0, res.stderr
    first, second = res.stdout.strip().splitlines()[-2:]
    profile, state_profile, n, fused, ppl = first.split()
    # ppl >= 1 by definition; the near-uniform tiny model gives about its vocabulary, 257
    assert (profile, state_profile, n, fused) == (HOST_PROFILE, HOST_PROFILE, "14", "True") and float(ppl) > 1
    assert second == "[]"  # the runtime API pulled in nothing of the layers above it


def test_training_commands_say_what_to_install():
    res = _command("train", ["run", "--model", "tiny-random-llama"])
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(err) == 1
    assert err[0].startswith("sasq-train: error: sasq-train needs torch") and "pip install 'sasq-edge[train]'" in err[0]
