"""The deploy options: INT8 lm_head (a 15th quantized linear) and the weight-only INT8 embedding
table, on the tiny model; and the sasq-lint / sasq-validate commands on exported folders."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from exporters import export_onnx
from exporters.passes import op_counts
from runtime import open_session
from runtime.fusion import check_fusion, target_weights
from runtime.lint import INT8_TYPE, RULES, lint
from runtime.state import ScaleState
from sasq_edge.calibrate import calibrate
from sasq_edge.cli.lint import main as lint_main
from sasq_edge.cli.validate import main as validate_main
from sasq_edge.config import QuantConfig
from sasq_edge.errors import ConfigError
from sasq_edge.models import tiny_random_llama
from sasq_edge.modules import EMBEDDING_GRID, QuantEmbedding, QuantLinear, prepare, quant_linears
from sasq_edge.state import apply_state, state_from_model
from sasq_edge.train import train_scales

V, H = 257, 64  # the tiny model's vocabulary and hidden size
WINDOWS = torch.randint(0, V, (6, 64), generator=torch.Generator().manual_seed(1))


def _run(profile: str, tmp, graph: str = "traced", **options):
    """Prepare, calibrate (2 windows), train 2 steps (so no two quantizers share a scale and merge
    in the graph) and export (the traced graph: these tests read its structure; the fused graph's
    are in tests/test_fused.py); returns the model, its state, the export and the float parameters
    as they were before ``prepare``."""
    lm = tiny_random_llama()
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    params = {"embedding": lm.model.get_input_embeddings().weight, "lm_head": lm.model.lm_head.weight}
    cfg = QuantConfig.plain(profile=profile, seq_len=64, calib_batches=2, train_steps=2, lr=0.05, **options)
    prepare(lm.model, cfg)
    calibrate(lm.model, [WINDOWS[:1], WINDOWS[1:2]], cfg)
    train_scales(lm.model, WINDOWS, cfg, progress=False)
    state = state_from_model(lm.model, cfg, lm.source)
    res = export_onnx(lm.model, tmp / "model.onnx", state=state, tokenizer=lm.tokenizer, graph=graph)
    return lm, state, res, before, params


@pytest.fixture(scope="module")
def deploy(tmp_path_factory):
    """cpu-avx2 with --int8-lm-head and --int8-embedding."""
    return _run("cpu-avx2", tmp_path_factory.mktemp("deploy"), lm_head=True, embedding="int8")


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """trt with the defaults (float embedding and lm_head): the clean TensorRT export, and the size
    reference (codes, zero points and scales take the same bytes in every profile)."""
    return _run("trt", tmp_path_factory.mktemp("plain"))


def _inits(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _attr(node: onnx.NodeProto, name: str):
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


# --- prepare -----------------------------------------------------------------------------------


def test_prepare_swaps_embedding_and_head(tiny):
    emb, head = tiny.model.get_input_embeddings(), tiny.model.lm_head
    prepare(tiny.model, QuantConfig.plain(profile="cpu-vnni", embedding="int8", lm_head=True))
    q_emb, q_head = tiny.model.get_input_embeddings(), tiny.model.lm_head
    assert type(q_emb) is QuantEmbedding and type(q_head) is QuantLinear
    assert q_emb.weight is emb.weight and q_head.weight is head.weight  # the same (tied) Parameter
    assert q_emb.grid == EMBEDDING_GRID and q_head.weight_grid == QuantConfig.plain(profile="cpu-vnni").deploy.weight
    names = [n for n, _ in quant_linears(tiny.model)]
    assert len(names) == 15 and names[-1] == "lm_head"
    assert q_emb.weight_int.shape == (V, H) and q_emb.weight_int.dtype == torch.int8
    assert (q_emb.weight_int.abs().amax(dim=1) == 127).all()  # each row spans the grid
    err = (q_emb.weight_int.float() * q_emb.weight_scale[:, None] - emb.weight).abs()
    # half a step bounds round-to-nearest; 1e-8 > the float32 rounding of q * s for |w| < 0.125 (half an ulp 3.7e-9)
    assert (err <= q_emb.weight_scale[:, None] / 2 + 1e-8).all()


def test_defaults_keep_embedding_and_head_float(tiny):
    prepare(tiny.model, QuantConfig.plain())
    assert type(tiny.model.get_input_embeddings()) is nn.Embedding and type(tiny.model.lm_head) is nn.Linear


def test_unknown_embedding_value():
    with pytest.raises(ConfigError, match="unknown embedding 'int4': choose one of float, int8"):
        QuantConfig.plain(embedding="int4")
    with pytest.raises(ConfigError, match="unknown embedding 'INT8'"):
        QuantConfig.from_dict({**QuantConfig.plain().to_dict(), "embedding": "INT8"})


# --- the export --------------------------------------------------------------------------------


def test_exact_qdq_counts(deploy, plain):
    _, state, res, _, _ = deploy
    model = onnx.load(str(res.onnx))
    counts = op_counts(model)
    assert len(state.scales) == len(set(state.scales.values())) == 15
    assert counts["QuantizeLinear"] == 15
    assert counts["DequantizeLinear"] == 15 + 15 + 1  # activations, weights, embedding rows
    assert len(target_weights(model)) == 15 and "lm_head.weight_int" in target_weights(model)
    assert op_counts(onnx.load(str(plain[2].onnx)))["DequantizeLinear"] == 14 + 14


def test_embedding_is_a_gather_of_int8_rows(deploy):
    _, _, res, _, _ = deploy
    model = onnx.load(str(res.onnx))
    inits = _inits(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    gathers = [n for n in model.graph.node if n.op_type in ("Gather", "GatherND") and n.input[0] in inits
               and inits[n.input[0]].data_type == TensorProto.INT8]
    assert len(gathers) == 1
    table = inits[gathers[0].input[0]]
    assert list(table.dims) == [V, H]
    (dq,) = consumers[gathers[0].output[0]]
    assert dq.op_type == "DequantizeLinear" and _attr(dq, "axis") == 0
    # the rows' scales are gathered by the same ids: one float scale per row, none per element
    scale_src = next(n for n in model.graph.node if dq.input[1] in n.output)
    assert scale_src.op_type == gathers[0].op_type and scale_src.input[1] == gathers[0].input[1]
    assert list(inits[scale_src.input[0]].dims) == [V]
    # no float copy of the table is left in the file
    assert not [t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and np.prod(t.dims) >= V * H]


def test_every_layer_incl_lm_head_is_fused(deploy):
    _, state, res, _, _ = deploy
    report = check_fusion(res.onnx)
    assert report.passed and len(report.fused) == len(report.kernels) == 15
    assert report.op_counts == {"MatMulIntegerToFloat": 15}
    decoder = {n for n in state.scales if n != "lm_head"}
    assert decoder < set(report.kernels)


def test_fusion_names_the_head_by_its_module_name(deploy):
    _, state, res, _, _ = deploy
    assert set(check_fusion(res.onnx).kernels) == set(state.scales)


def _initializer_bytes(path) -> int:
    return sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer)


def test_file_size(deploy, plain):
    deploy_bytes, plain_bytes = _initializer_bytes(deploy[2].onnx), _initializer_bytes(plain[2].onnx)
    # the tied float table (V x H float32, shared by the Gather and the head's MatMul) becomes two
    # INT8 copies with per-row float scales (embedding rows on [-127, 127], head on the profile's
    # grid), plus the head's weight zero points and activation scale and zero point
    expected = 4 * V * H - 2 * (V * H + 4 * V) - V - 5
    saved = plain_bytes - deploy_bytes
    assert expected - 32 <= saved <= expected, (saved, expected)  # measured: expected - 7 (small shape constants)
    assert deploy[2].bytes < plain[2].bytes  # measured 12.3 KB smaller: the Q/DQ nodes' protobuf eats the rest


def test_onnx_runtime_equals_fake_quant(deploy):
    lm, _, res, _, _ = deploy
    ids = torch.randint(0, V, (2, 48), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = lm.model(input_ids=ids).logits.numpy()
    out = open_session(res.onnx).logits(ids.numpy())
    assert np.abs(out - ref).max() <= 1e-6  # measured: bit-identical (0.0)
    assert (out.argmax(-1) == ref.argmax(-1)).all()


def test_frozen_weights_untouched(deploy):
    lm, _, _, before, params = deploy
    after = lm.model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert lm.model.get_input_embeddings().weight is params["embedding"]
    assert lm.model.lm_head.weight is params["lm_head"] is params["embedding"]  # tied, and still tied
    assert not any(p.requires_grad for p in lm.model.parameters())


def test_recipe_round_trip(deploy, tmp_path):
    lm, state, res, _, _ = deploy
    recipe = json.loads((res.onnx.parent / "recipe.json").read_text())
    assert (recipe["method"]["lm_head"], recipe["deploy"]["embedding"]) == (True, "int8")
    assert "lm_head" in recipe["modules"]
    state.save(tmp_path)
    for loaded in (ScaleState.load(tmp_path), ScaleState.load(res.onnx.parent)):
        assert loaded.method == state.method and loaded.scales == state.scales and loaded.embedding == "int8"
    fresh = tiny_random_llama()
    apply_state(fresh.model, ScaleState.load(tmp_path))
    assert type(fresh.model.get_input_embeddings()) is QuantEmbedding and type(fresh.model.lm_head) is QuantLinear
    with torch.no_grad():
        assert torch.equal(fresh.model(input_ids=WINDOWS[:2]).logits, lm.model(input_ids=WINDOWS[:2]).logits)


def test_int8_embedding_is_refused_for_tensorrt():
    """Its DequantizeLinear takes per-row scales gathered at run time, which TensorRT's
    constant-scale rule forbids: the config says so before any work is done."""
    with pytest.raises(ConfigError, match="--int8-embedding"):
        QuantConfig.plain(profile="trt", embedding="int8")


def test_int8_embedding_graph_breaks_only_the_tensorrt_rules_it_must(deploy):
    """On a CPU profile the lint names exactly the embedding's run-time scale and the uint8
    activations, nothing else."""
    report = lint(deploy[2].onnx)
    assert {v.rule for v in report.violations} <= {INT8_TYPE, "constant-positive-scale", "per-tensor-activation"}
    embedding = [v for v in report.violations if v.rule != INT8_TYPE]
    assert embedding and all("dequantize_per_channel" in v.node for v in embedding), embedding


# --- sasq-lint and sasq-validate ---------------------------------------------------------------


def _tail(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_lint_cli_on_trt_export(plain, capsys):
    assert lint_main([str(plain[2].onnx), "--json"]) == 0
    res = _tail(capsys)
    assert res["profile"] == "trt" and res["tensorrt"]["passed"] is True and res["tensorrt"]["violations"] == []
    assert res["tensorrt"]["counts"]["quantized_matmuls"] == 14
    assert res["fusion"]["passed"] is True and res["fusion"]["fused"] == res["fusion"]["target_layers"] == 14


def test_lint_cli_on_cpu_avx2_export(deploy, capsys):
    assert lint_main([str(deploy[2].onnx), "--json"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    assert res["profile"] == "cpu-avx2" and res["tensorrt"]["passed"] is False
    # every activation QuantizeLinear and its DequantizeLinear carry a uint8 zero point
    assert res["tensorrt"]["by_rule"][INT8_TYPE] == 2 * 15
    assert out[-2].endswith("(profile cpu-avx2: export with --profile trt for TensorRT)")
    assert res["fusion"]["passed"] is True  # the CPU profile still runs every layer as an integer kernel


def _lint_help(capsys) -> str:
    with pytest.raises(SystemExit) as e:
        lint_main(["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_lint_help_describes_every_rule(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    text = " ".join(_lint_help(capsys).split())
    assert all(description in text for description in RULES.values())


def test_lint_help_lists_rule_ids(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    text = _lint_help(capsys)
    assert [r for r in RULES if r not in text] == []


def test_validate_reports_fusion(deploy, data_dir, capsys):
    path = str(deploy[2].onnx)
    args = [path, "--data-dir", str(data_dir), "--seq-len", "64", "--max-windows", "2", "--json"]
    assert validate_main(args) == 0
    rep = _tail(capsys)
    # measured: rel diff 4.4e-5, max |logit diff| 6.6e-3 on these windows: one activation code of
    # the head's quantizer flips on a rounding-level difference (without the deploy options the
    # same run gives 1e-9 and 2.4e-7)
    assert rep["passed"] is True and rep["top1_agreement"] == 1.0 and rep["rel_diff"] < 1e-3
    assert rep["fusion"]["passed"] is True and rep["fusion"]["fused"] == rep["fusion"]["target_layers"] == 15
    assert rep["fusion"]["unfused"] == []
    assert validate_main([*args, "--no-fusion-check"]) == 0
    rep = _tail(capsys)
    assert rep["fusion"] is None and rep["passed"] is True
