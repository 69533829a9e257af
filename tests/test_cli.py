"""Every command once on the tiny preset, and every bad input it can meet: message, exit code,
and no partial output left behind."""

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from runtime.sources import DEFAULT_CALIBRATION_SPEC
from sasq_edge.cli.export import main as export_main
from sasq_edge.cli.ppl import main as ppl_main
from sasq_edge.cli.train import main as train_main
from sasq_edge.cli.validate import main as validate_main

TINY = ["--model", "tiny-random-llama", "--seq-len", "64"]


def _json_tail(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def _error(capsys, code, expected_code=2) -> str:
    assert code == expected_code
    err = capsys.readouterr().err.strip().splitlines()
    line = err[-1]
    assert line.count("error:") == 1
    return line


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir):
    d = tmp_path_factory.mktemp("run")
    code = train_main([str(d), *TINY, "--data-dir", str(data_dir), "--train-steps", "2", "--calib-batches", "2", "--json"])
    assert code == 0
    return d


@pytest.fixture(scope="module")
def exported(tmp_path_factory, run_dir, data_dir):
    out = tmp_path_factory.mktemp("out") / "model.onnx"
    assert export_main([str(out), *TINY, "--scales", str(run_dir)]) == 0
    return out


def test_train(run_dir):
    assert (run_dir / "recipe.json").is_file() and (run_dir / "scales.safetensors").is_file()
    recipe = json.loads((run_dir / "recipe.json").read_text())
    assert recipe["training"]["steps"] == 2 and recipe["model"]["source"] == "tiny-random-llama"
    data = recipe["training"]["data"]  # what the default --data read: WikiText-2 validation and sampled text, no BOS
    assert data["spec"] == DEFAULT_CALIBRATION_SPEC == "0.5*wikitext2,0.5*self:32" and data["bos"] is False
    text = recipe["training"]["text"]
    assert text.startswith("0.5*wikitext2 validation [") and "sampled from the float model" in text
    # the default recipe holds the last 4 windows out of training: they pick SmoothQuant's alpha and
    # measure the perplexity before and after training
    heldout = recipe["training"]["heldout"]
    assert data["windows"] == recipe["training"]["train_windows"] + heldout["windows"] and heldout["windows"] == 4
    assert {"float_ppl", "ptq_ppl", "trained_ppl"} <= set(heldout)
    assert recipe["method"]["objective"] == "kd" and recipe["method"]["smooth_learn"] is True


def test_export_with_scales_json(tmp_path, run_dir, capsys):
    out = tmp_path / "m" / "model.onnx"
    assert export_main([str(out), *TINY, "--scales", str(run_dir), "--json"]) == 0
    res = _json_tail(capsys)
    assert res["quantize_linear"] == 14 and res["dequantize_linear"] == 28
    assert res["profile"] == json.loads((run_dir / "recipe.json").read_text())["deploy"]["profile"]  # the scales' own
    data = out.parent / (out.name + ".data")  # the fused graph's weights, mapped by ONNX Runtime
    assert res["external_data"] is data.is_file() and res["onnx"] == str(out)
    assert res["bytes"] == out.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def test_export_trains_when_no_scales(tmp_path, data_dir, capsys):
    out = tmp_path / "model.onnx"
    code = export_main([str(out), *TINY, "--data-dir", str(data_dir), "--train-steps", "1", "--calib-batches", "1", "--json"])
    assert code == 0 and _json_tail(capsys)["quantize_linear"] == 14
    assert json.loads((tmp_path / "recipe.json").read_text())["training"]["steps"] == 1


def test_ppl_and_validate(exported, data_dir, capsys):
    assert ppl_main([str(exported), "--data-dir", str(data_dir), "--seq-len", "64", "--max-windows", "3", "--json"]) == 0
    res = _json_tail(capsys)
    assert res["windows"] == 3 and res["seq_len"] == 64 and res["tokens"] == 3 * 63
    # a sanity bound: this near-uniform model over 257 byte tokens gives a ppl near 257
    assert res["provider"] == "CPUExecutionProvider" and 1 < res["ppl"] < 1e4
    code = validate_main([str(exported), "--data-dir", str(data_dir), "--seq-len", "64", "--max-windows", "3", "--json"])
    rep = _json_tail(capsys)
    assert code == 0 and rep["passed"] is True
    assert rep["ppl_onnx"] == pytest.approx(res["ppl"], rel=1e-9)  # same windows, graph and float64 nll sums: float64 rounding
    # float32 noise, or a rounding-tie flip (4.4e-5 measured in tests/test_deploy_options.py), on a near-uniform model
    assert rep["rel_diff"] < 1e-4 and rep["top1_agreement"] == 1.0
    for r in (res, rep):  # the default evaluation text, recorded; the byte tokenizer adds no BOS
        assert r["bos"] is False and r["data"]["sources"][0]["read"] == "wikitext2 test" and r["data"]["windows"] == 3


def test_validate_on_own_text(exported, tmp_path, capsys):
    f = tmp_path / "mine.jsonl"
    lines = [f"My own line number {i}, about nothing much at all." for i in range(20)]
    f.write_text("\n".join(json.dumps({"body": line}) for line in lines))
    code = validate_main([str(exported), "--data", f"{f}:body", "--seq-len", "64", "--max-windows", "2", "--json"])
    rep = _json_tail(capsys)
    assert code == 0 and rep["passed"] is True and rep["windows"] == 2
    assert rep["data"]["spec"] == f"{f}:body" and rep["data"]["sources"][0]["windows_available"] == len("\n\n".join(lines)) // 64


def test_validate_exit_code_1_on_failed_parity(exported, data_dir, tmp_path, capsys):
    """A copy of the export with one activation scale 1.5x off: the check runs, fails, exits 1.
    (The perplexity of this random model moves by about 1e-5; the integer replay catches it.)"""
    import shutil

    import onnx
    from onnx import numpy_helper

    bad = tmp_path / "bad"
    shutil.copytree(exported.parent, bad)
    model = onnx.load(str(bad / "model.onnx"))
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    init = next(t for t in model.graph.initializer if t.name == q.input[1])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    onnx.save(model, str(bad / "model.onnx"))
    code = validate_main([str(bad / "model.onnx"), "--data-dir", str(data_dir), "--seq-len", "64", "--max-windows", "2", "--json"])
    rep = _json_tail(capsys)
    assert code == 1 and rep["passed"] is False and "replay" in rep["failed"]
    assert rep["replay"]["first_failure"] == "model.layers.0.self_attn.q_proj"


def test_ppl_on_float_onnx(tmp_path, data_dir, capsys):
    out = tmp_path / "model.onnx"
    assert export_main([str(out), *TINY, "--float"]) == 0
    capsys.readouterr()
    assert ppl_main([str(out), "--data-dir", str(data_dir), "--seq-len", "64", "--max-windows", "2", "--json"]) == 0
    assert _json_tail(capsys)["windows"] == 2


def test_console_scripts_have_help():
    for cmd in ("sasq-train", "sasq-export", "sasq-ppl", "sasq-validate"):
        exe = f"{sys.prefix}/bin/{cmd}"
        r = subprocess.run([exe, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "--json" in r.stdout, cmd


# --- bad input ---------------------------------------------------------------------------------


def test_missing_model(tmp_path, capsys):
    code = export_main([str(tmp_path / "model.onnx"), "--model", str(tmp_path / "no-such-model"), "--float"])
    assert "not found" in _error(capsys, code)
    assert not list(tmp_path.iterdir())


def test_non_causal_model(tmp_path, capsys):
    from transformers import T5Config

    folder = tmp_path / "t5"  # encoder-decoder: no causal-LM head
    T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2).save_pretrained(folder)
    code = export_main([str(tmp_path / "out" / "model.onnx"), "--model", str(folder), "--float"])
    assert "no causal-LM head" in _error(capsys, code)
    assert not (tmp_path / "out").exists()


def test_corrupt_and_foreign_onnx(tmp_path, data_dir, capsys):
    junk = tmp_path / "model.onnx"
    junk.write_bytes(b"this is not protobuf" * 10)
    code = ppl_main([str(junk), "--data-dir", str(data_dir)])
    assert "ONNX" in _error(capsys, code)
    code = validate_main([str(junk), "--data-dir", str(data_dir)])
    assert "ONNX" in _error(capsys, code)


def test_validate_refuses_float_model(tmp_path, data_dir, capsys):
    out = tmp_path / "model.onnx"
    assert export_main([str(out), *TINY, "--float"]) == 0
    capsys.readouterr()
    code = validate_main([str(out), "--data-dir", str(data_dir), "--seq-len", "64"])
    assert "no sasq deploy profile" in _error(capsys, code)


def test_scales_from_another_model(tmp_path, run_dir, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from sasq_edge.models import byte_tokenizer

    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(other)
    byte_tokenizer().save_pretrained(other)
    out = tmp_path / "out" / "model.onnx"
    code = export_main([str(out), "--model", str(other), "--scales", str(run_dir)])
    assert "different model" in _error(capsys, code)
    assert not out.exists()


def test_scales_from_another_version(tmp_path, run_dir, capsys):
    import shutil

    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    recipe = json.loads((bad / "recipe.json").read_text())
    recipe["version"] = 4
    (bad / "recipe.json").write_text(json.dumps(recipe))
    code = export_main([str(tmp_path / "model.onnx"), *TINY, "--scales", str(bad)])
    assert "format version 4" in _error(capsys, code)
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize("kind", ["scale", "smoothing"])
@pytest.mark.parametrize("bad", [float("nan"), 0.0])
def test_nan_or_zero_scales(tmp_path, run_dir, capsys, bad, kind):
    """A NaN or zero activation scale, or one in a smoothing vector: refused by name, nothing written."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    t = load_file(str(run / "scales.safetensors"))
    key = next(k for k in sorted(t) if (t[k].ndim == 1) == (kind == "smoothing"))
    v = t[key].clone()
    v.view(-1)[0] = bad
    t[key] = v
    save_file(t, str(run / "scales.safetensors"))
    code = export_main([str(tmp_path / "out" / "model.onnx"), *TINY, "--scales", str(run)])
    line = _error(capsys, code)
    assert "positive" in line and "finite" in line and ("smoothing" in line) == (kind == "smoothing")
    assert not (tmp_path / "out").exists()


def test_sequence_longer_than_context(tmp_path, exported, data_dir, capsys):
    code = train_main([str(tmp_path / "run"), "--model", "tiny-random-llama", "--seq-len", "4096", "--data-dir", str(data_dir)])
    assert "exceeds the model's context of 1024" in _error(capsys, code)
    code = ppl_main([str(exported), "--data-dir", str(data_dir), "--seq-len", "2048"])
    assert "exceeds the model's context" in _error(capsys, code)
    assert not (tmp_path / "run").exists()


def test_unknown_profile_and_provider(tmp_path, exported, data_dir, capsys):
    code = train_main([str(tmp_path / "run"), *TINY, "--profile", "tensorrt-fp4", "--data-dir", str(data_dir)])
    assert "unknown deploy profile 'tensorrt-fp4'" in _error(capsys, code)
    code = ppl_main([str(exported), "--provider", "rocm", "--data-dir", str(data_dir)])
    assert "unknown execution provider 'rocm'" in _error(capsys, code)
    assert not (tmp_path / "run").exists()


def test_missing_data_and_bad_flags(tmp_path, no_data_env, capsys):
    code = train_main([str(tmp_path / "run"), *TINY, "--data-dir", str(tmp_path / "nowhere")])
    assert "wiki.valid.tokens" in _error(capsys, code)
    assert export_main([str(tmp_path / "model.onnx")]) == 2  # no --model
    assert "--model" in capsys.readouterr().err
