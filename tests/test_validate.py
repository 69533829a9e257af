"""sasq-validate proves parity by computation: seeded faults in a correct export of the tiny model
(the traced trt graph and the fused cpu-vnni graph), each written into the ONNX file alone, exit 1
with the statistic that caught them; the correct exports exit 0. Plus the pieces: KL, margins,
the integer replay, the block boundaries of both graph kinds, the thresholds' provenance."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from bounds import HOST_PROFILE

from exporters import export_onnx
from runtime import faults
from runtime.grids import IntGrid
from runtime.parity import ParityAccumulator, Thresholds, token_kl, top2_margin
from runtime.probe import block_taps, linear_taps
from runtime.profiles import inexact_here
from runtime.replay import TwinLinear, activation_codes, near_ties, replay_output
from sasq_edge.calibrate import calibrate
from sasq_edge.cli.validate import main as validate_main
from sasq_edge.config import QuantConfig
from sasq_edge.models import tiny_random_llama
from sasq_edge.modules import prepare
from sasq_edge.state import state_from_model
from sasq_edge.train import train_scales

ROOT = Path(__file__).resolve().parents[1]
WINDOWS = torch.randint(0, 257, (6, 64), generator=torch.Generator().manual_seed(1))
GRAPHS = {"traced": "trt", "fused": HOST_PROFILE}


def _export(profile: str, graph: str, out: Path) -> Path:
    """Calibrate (2 windows), train 2 steps (every layer gets its own scale) and export, the down
    projections' input rotated as the default recipe does (runtime.rotation)."""
    lm = tiny_random_llama()
    cfg = QuantConfig.plain(profile=profile, seq_len=64, calib_batches=2, train_steps=2, lr=0.05, rotate_block=64)
    prepare(lm.model, cfg)
    calibrate(lm.model, [WINDOWS[:1], WINDOWS[1:2]], cfg)
    train_scales(lm.model, WINDOWS, cfg, progress=False)
    state = state_from_model(lm.model, cfg, lm.source)
    return export_onnx(lm.model, out / "model.onnx", state=state, tokenizer=lm.tokenizer, graph=graph).onnx


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    return {graph: _export(profile, graph, tmp_path_factory.mktemp(graph)) for graph, profile in GRAPHS.items()}


def _validate(path: Path, data_dir: Path, capsys, *extra: str) -> tuple[int, dict, str]:
    code = validate_main([str(path), "--data-dir", str(data_dir), "--seq-len", "64", "--max-windows", "2", "--threads", "1",
                          "--json", *extra])
    out = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(out[-1]), "\n".join(out[:-1])


# --- the correct exports pass ---------------------------------------------------------------------


@pytest.mark.parametrize("graph", GRAPHS)
def test_correct_export_passes_every_check(exports, data_dir, capsys, graph):
    code, rep, text = _validate(exports[graph], data_dir, capsys, "--per-layer")
    assert code == 0 and rep["passed"] is True and rep["failed"] == []
    assert set(rep["verdicts"].values()) == {"PASSED"}
    # every quantized linear matches the integer replay bit for bit (ties left out: none or a few rows)
    assert rep["replay"]["layers_exact"] == rep["replay"]["layers"] == 14 and rep["replay"]["unexplained"] == 0
    assert all(r["mismatched"] == 0 for r in rep["replay"]["per_layer"])
    # the block boundaries are found in both graph kinds; with the linears forced, float noise only
    blocks = rep["blocks"]
    assert blocks["mapped"] and [s["name"] for s in blocks["stages"]] == ["embedding", "layer 0", "layer 1", "final norm + head"]
    assert blocks["max_float_error"] < 1e-6  # float32 noise of the ops between linears, a few 2^-24; 10x under the 1e-5 bar
    assert rep["weights"]["passed"] and rep["weights"]["graph"] == rep["weights"]["state"]
    # KL is quadratic in the logit difference: float32 noise (~1e-6) gives ~1e-12; a flip moving one position
    # by 1e-2 adds at most ~5e-5 / 128 positions
    assert rep["kl_mean"] < 1e-6 and rep["top1_agreement"] == 1.0
    assert "stage" in text and "layer 1" in text and "final norm + head" in text  # the per-layer table


# --- seeded faults -----------------------------------------------------------------------------------

# without qdqisint8allowed ONNX Runtime runs int8 layers as uint8 x int8 (8-bit weights): the same
# bits where that kernel is exact, while on an x86 CPU without VNNI its 16-bit pair sums saturate and
# the replay sees other numbers too
LOST_OPTION_REPLAY = set() if inexact_here("cpu-vnni") is None else {"replay"}

# fault -> the checks that must fail (and no other); "computed" says whether a computed check
# (replay or blocks) is among them
CAUGHT = {
    "activation scale x1.05": {"replay"},
    "zero point off by one": {"replay"},
    "two weight rows swapped": {"replay", "weights"},
    "Q/DQ pair dropped": {"replay", "fusion"},
    "RMSNorm epsilon x1000": {"blocks"},
    "square weight transposed": {"replay", "weights"},
    "session options disable Q/DQ fusion": {"replay", "fusion", "session_options"},
    # ONNX Runtime 1.32's CPU graph converts int8 Q/DQ to uint8 (zero point 128) without the option
    # and still runs MatMulIntegerToFloat: the outputs are bit for bit the same, so only the
    # recorded options show it (docs/VALIDATION.md)
    "session option qdqisint8allowed lost": {"session_options"} | LOST_OPTION_REPLAY,
}
CASES = [(graph, fault) for graph in GRAPHS for fault in CAUGHT
         if not (graph == "fused" and fault == "session option qdqisint8allowed lost")]


@pytest.mark.parametrize("graph, fault", CASES)
def test_seeded_fault_is_caught(exports, data_dir, tmp_path, capsys, graph, fault):
    source = exports[graph]
    edits = faults.seeded_faults(onnx.load(str(source)))
    bad = faults.write_faulty(source.parent, tmp_path / "bad", edits[fault])
    code, rep, text = _validate(bad, data_dir, capsys)
    assert code == 1 and rep["passed"] is False, text
    failed = {name for name in rep["failed"] if not name.startswith("distribution.")}
    assert failed == CAUGHT[fault], (failed, text)
    if fault != "session option qdqisint8allowed lost":
        assert failed & {"replay", "blocks"}, "every computational fault is caught by a computed check"
    elif not LOST_OPTION_REPLAY:  # the computed checks see the same bits as the correct export
        assert rep["replay"]["passed"] and rep["blocks"]["passed"] and rep["replay"]["per_layer"][0]["mismatched"] == 0
    if "replay" in failed:  # the replay names the faulty layer first
        layer = rep["replay"]["first_failure"]
        # the seeded faults sit in layer 1; the session-wide ones reach every layer
        assert layer.startswith("model.layers.1.") or fault.startswith("session option")
        assert f"first failure {layer}" in text
    if "blocks" in failed:
        assert rep["blocks"]["first_failure"] == "layer 1" and "first stage to leave float noise: layer 1" in text
        assert rep["replay"]["passed"]  # a float op: the integer replay cannot see it, the blocks do
    # end to end, this 2-layer model moves by far less than the distribution bars: only the computed
    # checks see these faults (docs/VALIDATION.md)
    assert rep["kl_mean"] < Thresholds().kl_mean / 100


def test_every_fault_kind_is_seeded(exports):
    assert set(faults.seeded_faults(onnx.load(str(exports["traced"])))) == set(CAUGHT)
    assert set(faults.seeded_faults(onnx.load(str(exports["fused"])))) == set(CAUGHT) - {"session option qdqisint8allowed lost"}


def test_unmapped_graph_says_so(exports, data_dir, tmp_path, capsys):
    """A traced graph whose nodes lost the exporter's module scopes: the block check says it cannot
    map the boundaries instead of guessing; the other checks still run and pass."""
    def strip(model: onnx.ModelProto) -> onnx.ModelProto:
        for n in model.graph.node:
            del n.metadata_props[:]
        return model

    bad = faults.write_faulty(exports["traced"].parent, tmp_path / "stripped", strip)
    code, rep, text = _validate(bad, data_dir, capsys)
    assert code == 0 and rep["verdicts"]["blocks"] == "NOT RUN" and rep["verdicts"]["replay"] == "PASSED"
    assert rep["blocks"]["mapped"] is False and "module scopes" in rep["blocks"]["reason"]
    assert "block check NOT RUN" in text


def test_layer_checks_can_be_skipped(exports, data_dir, capsys):
    code, rep, text = _validate(exports["fused"], data_dir, capsys, "--layer-windows", "0")
    assert code == 0 and rep["replay"] is None and rep["verdicts"]["replay"] == "NOT RUN"
    assert "layer checks NOT RUN" in text


def test_thresholds_are_options(exports, data_dir, capsys):
    """Every statistic has its option: an impossible bar fails the correct export, exit 1."""
    code, rep, _ = _validate(exports["fused"], data_dir, capsys, "--max-block-error", "0", "--min-top1-confident", "1",
                             "--max-kl-mean", "0")
    assert code == 1 and "blocks" in rep["failed"] and "distribution.kl_mean" in rep["failed"]
    assert rep["thresholds"]["block_error"] == 0 and rep["thresholds"]["kl_mean"] == 0


# --- the graph taps ---------------------------------------------------------------------------------


@pytest.mark.parametrize("graph", GRAPHS)
def test_taps_of_both_graph_kinds(exports, graph):
    model = onnx.load(str(exports[graph]))
    taps = linear_taps(model)
    assert len(taps) == 14 and all(t.quantized for t in taps)
    assert [t.layer for t in taps[:3]] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    bt = block_taps(model, 2)
    assert bt.mapped and len(bt.inputs) == 3
    if graph == "fused":
        assert bt.inputs[1].startswith("/model/layers.1/input_layernorm/SkipSimplifiedLayerNormalization")


# --- the pieces ---------------------------------------------------------------------------------------


def test_token_kl_and_margin_by_hand():
    p = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]))
    q = np.log(np.array([[0.25, 0.5, 0.25], [0.1, 0.2, 0.7]]))
    kl = token_kl(p, q)
    # float64 on both sides, ~1e-16 apart (measured 0.0): approx's default rel 1e-6 and abs=1e-15 are slack
    assert kl[0] == pytest.approx(0.5 * math.log(2) + 0.25 * math.log(0.5)) and kl[1] == pytest.approx(0.0, abs=1e-15)
    assert token_kl(p + 3.0, p).max() < 1e-12  # a shift of every logit is the same distribution
    np.testing.assert_allclose(top2_margin(p), [math.log(2), math.log(3.5)])  # float64: ~1e-16, default rtol 1e-7


def test_confident_top1_ignores_near_ties():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((16, 10)).astype(np.float32) * 3
    b = a.copy()
    order = np.argsort(a[0])
    b[0, order[-1]], b[0, order[-2]] = a[0, order[-2]], a[0, order[-1]]  # swap the top two of position 0
    acc = ParityAccumulator()
    acc.update(rng.integers(0, 10, 16), a, b)
    margin = float(a[0, order[-1]] - a[0, order[-2]])
    # +-1e-3 puts position 0 on either side: the code takes the margin as the same float32 difference
    below = acc.report(Thresholds(top1_margin=margin + 1e-3))  # position 0 is not confident
    above = acc.report(Thresholds(top1_margin=margin - 1e-3, min_top1_confident=1.0))
    assert below.top1_agreement == 15 / 16 and below.top1_confident == 1.0
    assert above.top1_confident < 1.0 and not above.passed
    assert {c.name for c in above.checks if not c.passed} == {"top1_confident"}


def test_replay_rounds_half_to_even_and_finds_ties():
    grid = IntGrid(-128, 127)
    x = np.array([0.5, 1.5, 2.5, -0.5, 300.0, np.nextafter(np.float32(0.5), np.float32(1))], dtype=np.float32)
    np.testing.assert_array_equal(activation_codes(x, 1.0, grid), [0, 2, 2, -0, 127, 1])
    assert near_ties(x, 1.0).tolist() == [True, True, True, True, False, True]
    assert not near_ties(np.array([0.4, 7.0], np.float32), 1.0).any()


def test_replay_output_is_the_integer_kernel():
    rng = np.random.default_rng(1)
    codes = rng.integers(-127, 128, (5, 8)).astype(np.int8)
    ws = rng.uniform(0.01, 0.02, 5).astype(np.float32)
    twin = TwinLinear(codes, ws, 0.05)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    q = np.clip(np.rint(x / np.float32(0.05)), -128, 127)
    expected = (q @ codes.T.astype(np.float32)) * (np.float32(0.05) * ws)
    np.testing.assert_array_equal(replay_output(x, twin, IntGrid(-128, 127)), expected.astype(np.float32))


def test_default_thresholds_are_the_measured_ones():
    """The defaults are the thresholds bench/validate_thresholds.py derived and recorded."""
    recorded = json.loads((ROOT / "bench" / "results" / "validate_thresholds.json").read_text())
    assert Thresholds().to_dict() == recorded["derived"] == recorded["thresholds"]
    # on the real model every seeded fault fails a check under them, and the correct export none
    results = recorded["results"]
    assert results["correct"]["failed_under_derived"] == []
    assert all(r["failed_under_derived"] for k, r in results.items() if k not in ("correct", "correct_under_defaults")
               and "below the bar" not in k)
