"""Deploy profiles: their integer grids, picking one from the CPU, re-encoding a scale state, and
the tiny model exported with each of them (zero points, weight ranges, ORT fusion, parity)."""

from __future__ import annotations

import dataclasses
import json
import platform
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from exporters import export_onnx
from runtime import open_session
from runtime.fusion import INTEGER_KERNELS, check_fusion
from runtime.graph import layer_of
from runtime.grids import IntGrid
from runtime.profiles import PROFILES, cpu_features, detect_profile, get_profile, inexact_here, resolve_profile
from runtime.state import ScaleState
from sasq_edge.calibrate import calibrate
from sasq_edge.cli.export import main as export_main
from sasq_edge.cli.train import main as train_main
from sasq_edge.config import QuantConfig
from sasq_edge.errors import ConfigError, StateError
from sasq_edge.models import tiny_random_llama
from sasq_edge.modules import prepare
from sasq_edge.state import quant_config, state_from_model

CPU_PROFILES = ("cpu-avx2", "cpu-vnni", "arm64")
U8_ACT = IntGrid(-128, 127, zero_point=128, dtype="uint8")
S8_WEIGHT = IntGrid(-127, 127, zero_point=0, dtype="int8")
INT16_MAX = int(np.iinfo(np.int16).max)


# --- the grids ---------------------------------------------------------------------------------


def test_profile_grids():
    assert list(PROFILES) == ["trt", "cpu-avx2", "cpu-vnni", "arm64"]
    assert PROFILES["trt"].act == IntGrid(-128, 127, zero_point=0, dtype="int8")
    assert PROFILES["trt"].weight == S8_WEIGHT
    assert dict(PROFILES["trt"].session_options) == {"session.qdqisint8allowed": "1"}
    assert PROFILES["cpu-avx2"].act == U8_ACT
    assert PROFILES["cpu-avx2"].weight == IntGrid(-64, 63, zero_point=0, dtype="int8")
    for name in ("cpu-vnni", "arm64"):
        assert PROFILES[name].act == U8_ACT and PROFILES[name].weight == S8_WEIGHT, name
    for name in CPU_PROFILES:
        assert PROFILES[name].session_options == (), name  # uint8 activations fuse without any switch
    for name, p in PROFILES.items():
        assert p.name == name and QuantConfig.plain(profile=name).deploy is p
        # the stored codes (grid + zero point) fill exactly the deployed integer type
        info = np.iinfo(p.act.dtype)
        assert (p.act.qmin + p.act.zero_point, p.act.qmax + p.act.zero_point) == (info.min, info.max), name
        # every profile carries the same real-valued activation grid: 256 levels, symmetric around 0
        assert (p.act.qmin, p.act.qmax, p.act.levels) == (-128, 127, 256), name


def _pair_sum_range(act: IntGrid, weight: IntGrid) -> tuple[int, int]:
    """Range of ``a0 * w0 + a1 * w1`` for stored activation codes (zero point included, as the
    u8 x s8 instruction sees them) and weight codes: AVX2's vpmaddubsw adds two such products
    into one int16 lane, saturating."""
    a = np.arange(act.qmin + act.zero_point, act.qmax + act.zero_point + 1, dtype=np.int64)
    w = np.arange(weight.qmin, weight.qmax + 1, dtype=np.int64)
    products = np.outer(a, w)
    return 2 * int(products.min()), 2 * int(products.max())


def test_cpu_avx2_pair_sums_cannot_saturate_int16():
    p = PROFILES["cpu-avx2"]
    lo, hi = _pair_sum_range(p.act, p.weight)
    assert (lo, hi) == (-255 * 64 * 2, 255 * 63 * 2) == (-32640, 32130)
    assert -INT16_MAX - 1 <= lo and hi <= INT16_MAX
    # the same uint8 activations with 8-bit weights (cpu-vnni's grid) can: the reason for the profile
    lo8, hi8 = _pair_sum_range(p.act, PROFILES["cpu-vnni"].weight)
    assert (lo8, hi8) == (-64770, 64770)
    assert lo8 < -INT16_MAX - 1 and hi8 > INT16_MAX


# --- picking a profile from the CPU ------------------------------------------------------------


def _cpuinfo(flags: str, key: str = "flags") -> str:
    """Two processors, as /proc/cpuinfo lists them (the first flags line is read)."""
    return "".join(f"processor\t: {i}\nvendor_id\t: GenuineIntel\n{key}\t\t: {flags}\nbogomips\t: 4800.00\n\n" for i in range(2))


X86_BASE = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ssse3 sse4_1 sse4_2 popcnt aes xsave avx f16c"


@pytest.mark.parametrize(("machine", "cpuinfo", "profile", "reason_has"), [
    ("x86_64", _cpuinfo(X86_BASE + " avx2 fma bmi2"), "cpu-avx2", "AVX2 and no VNNI"),
    ("AMD64", _cpuinfo(X86_BASE + " avx2"), "cpu-avx2", "AVX2"),
    ("x86_64", _cpuinfo(X86_BASE + " avx2 avx512f avx512bw avx512_vnni"), "cpu-vnni", "avx512_vnni"),
    ("x86_64", _cpuinfo(X86_BASE + " avx2 avx_vnni"), "cpu-vnni", "avx_vnni"),
    ("aarch64", _cpuinfo("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics asimddp", key="Features"), "arm64", "aarch64"),
    ("arm64", "", "arm64", "arm64"),
])
def test_detect_profile(machine, cpuinfo, profile, reason_has):
    name, reason = detect_profile(cpuinfo, machine)
    assert name == profile and reason_has in reason


@pytest.mark.parametrize(("machine", "cpuinfo", "message"), [
    ("x86_64", _cpuinfo(X86_BASE), "no AVX2"),  # AVX but no AVX2
    ("x86_64", "", "cannot read the CPU flags"),
    ("riscv64", _cpuinfo("rv64imafdc"), "no CPU profile for machine type 'riscv64'"),
])
def test_detect_profile_fails_naming_the_flag(machine, cpuinfo, message):
    with pytest.raises(ConfigError, match=message) as e:
        detect_profile(cpuinfo, machine)
    assert "--profile" in str(e.value)


AVX2_ONLY = _cpuinfo(X86_BASE + " avx2 fma bmi2")
VNNI = _cpuinfo(X86_BASE + " avx2 avx512f avx512bw avx512_vnni")
ARM = _cpuinfo("fp asimd asimddp", key="Features")


@pytest.mark.parametrize(("profile", "machine", "cpuinfo", "inexact"), [
    ("cpu-vnni", "x86_64", AVX2_ONLY, True),  # 2 * 255 * 127 > 32767: the 16-bit pair sums saturate
    ("arm64", "x86_64", AVX2_ONLY, True),  # the same grids as cpu-vnni
    ("cpu-avx2", "x86_64", AVX2_ONLY, False),  # 2 * 255 * 64 = 32640: 7-bit weights cannot saturate
    ("trt", "x86_64", AVX2_ONLY, False),  # int8 activations: the s8 x s8 kernel widens to 16 bits first
    ("cpu-vnni", "x86_64", VNNI, False),
    ("cpu-vnni", "x86_64", _cpuinfo(X86_BASE + " avx2 avx_vnni"), False),
    ("cpu-vnni", "aarch64", ARM, False),
])
def test_inexact_here_names_the_saturating_kernel(profile, machine, cpuinfo, inexact):
    why = inexact_here(profile, cpuinfo, machine)
    assert (why is not None) == inexact
    if inexact:
        assert f"profile {profile} needs VNNI" in why and "--profile cpu-avx2" in why


def test_unknown_machine_lists_every_profile():
    with pytest.raises(ConfigError) as e:
        detect_profile("", "mips")
    assert all(name in str(e.value) for name in PROFILES)


CPUINFO = Path("/proc/cpuinfo")


@pytest.fixture
def this_cpu() -> str:
    """What ``detect_profile`` makes of this machine's own /proc/cpuinfo text and machine type
    (the decision itself is tested on the cpuinfo texts above)."""
    if not CPUINFO.is_file():
        pytest.skip("no /proc/cpuinfo on this platform")
    try:
        return detect_profile(CPUINFO.read_text(encoding="utf-8", errors="replace"), platform.machine())[0]
    except ConfigError:
        pytest.skip("auto has no profile to pick on this CPU")


def test_cpu_features_read_this_machine():
    if not CPUINFO.is_file():
        pytest.skip("no /proc/cpuinfo on this platform")
    machine, flags = cpu_features()
    assert machine == platform.machine().lower()
    first = next((ln for ln in CPUINFO.read_text().splitlines() if ln.split(":")[0].strip() in ("flags", "Features")), "")
    assert flags == frozenset(first.partition(":")[2].split()) and flags


def test_resolve_profile_auto_on_this_machine(this_cpu):
    name, reason = resolve_profile("auto")  # reads /proc/cpuinfo and platform.machine() itself
    assert name == this_cpu and reason
    assert resolve_profile("cpu-avx2") == ("cpu-avx2", None)
    with pytest.raises(ConfigError, match="choose one of trt, cpu-avx2, cpu-vnni, arm64 or auto"):
        resolve_profile("avx2")


# --- re-encoding a scale state -----------------------------------------------------------------


@pytest.fixture
def trt_state() -> ScaleState:
    scales = {f"model.layers.{i}.self_attn.{p}": 0.01 * (i + 1) + 0.001 * k for i in range(2) for k, p in enumerate("qkvo")}
    method = QuantConfig.plain(profile="trt", seq_len=64, calib_batches=2, train_steps=3).to_dict()
    return ScaleState("trt", scales, "0123abcd", "tiny-random-llama", method=method, training={"steps": 3})


def test_with_profile_same_grids(trt_state):
    assert trt_state.with_profile("trt") is trt_state
    for name in ("cpu-vnni", "arm64"):
        moved = trt_state.with_profile(name)
        assert moved.profile == moved.method["profile"] == name and moved.deploy is PROFILES[name]
        assert moved.scales == trt_state.scales
        assert quant_config(moved) == dataclasses.replace(quant_config(trt_state), profile=name)
        assert (moved.fingerprint, moved.model_source, moved.training) == (trt_state.fingerprint, trt_state.model_source, {"steps": 3})
        assert moved.with_profile("trt") == trt_state  # and back
    assert trt_state.profile == trt_state.method["profile"] == "trt"  # the original is untouched


def test_with_profile_other_weight_grid(trt_state):
    with pytest.raises(StateError, match=r"\(weights \[-127, 127\] vs \[-64, 63\]\): retrain with sasq-train --profile cpu-avx2"):
        trt_state.with_profile("cpu-avx2")
    avx2 = ScaleState("cpu-avx2", dict(trt_state.scales), "0123abcd", "tiny-random-llama")
    for name in ("trt", "cpu-vnni", "arm64"):
        with pytest.raises(StateError, match=f"--profile {name}$"):
            avx2.with_profile(name)
    with pytest.raises(ConfigError, match="unknown deploy profile 'avx512'"):
        trt_state.with_profile("avx512")


# --- the tiny model exported with each profile -------------------------------------------------


def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


@pytest.fixture(scope="module", params=["cpu-avx2", "cpu-vnni", "arm64", "trt"])
def exported(request, tmp_path_factory):
    """Prepare, calibrate on 2 windows (no training) and export the tiny model with the profile."""
    profile = request.param
    lm = tiny_random_llama()
    cfg = QuantConfig.plain(profile=profile, seq_len=64, calib_batches=2, train_steps=0)
    windows = torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(1))
    prepare(lm.model, cfg)
    calibrate(lm.model, [windows[:1], windows[1:]], cfg)
    state = state_from_model(lm.model, cfg, lm.source)
    res = export_onnx(lm.model, tmp_path_factory.mktemp(profile) / "model.onnx", state=state, tokenizer=lm.tokenizer)
    return profile, lm, state, res, onnx.load(str(res.onnx))


def test_activation_zero_points(exported):
    profile, _, state, _, model = exported
    act = get_profile(profile).act
    producers = {o: n for n in model.graph.node for o in n.output}
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    act_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in producers
              and producers[n.input[0]].op_type == "QuantizeLinear"]
    # no training: q/k/v (and gate/up) see the same input with the same scale and share one quantizer
    assert len(quantize) == len(act_dq) == len(set(state.scales.values())) == 8
    for n in quantize + act_dq:
        zp = _init(model, n.input[2])
        assert zp.dtype == np.dtype(act.dtype) and zp.shape == () and int(zp) == act.zero_point, n.name
    assert sorted(float(_init(model, n.input[1])) for n in quantize) == sorted({float(np.float32(v)) for v in state.scales.values()})


def test_weights_on_the_profile_grid(exported):
    profile, lm, _, _, model = exported
    grid = get_profile(profile).weight
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith(".weight_int")]
    assert len(weight_dq) == 14
    for n in weight_dq:
        w = _init(model, n.input[0])  # (K, N), pre-transposed
        assert w.dtype == np.int8 and grid.qmin <= w.min() and w.max() <= grid.qmax, n.input[0]
        # symmetric per-output-channel scales put each channel's largest magnitude exactly on qmax
        assert (np.abs(w.astype(np.int32)).max(axis=0) == grid.qmax).all(), n.input[0]
        zp = _init(model, n.input[2])
        assert zp.dtype == np.int8 and not zp.any()
        module = lm.model.get_submodule(layer_of(n.input[0]))
        assert np.array_equal(w, module.weight_int.numpy().T)


def test_every_layer_runs_as_an_integer_kernel(exported):
    _, _, state, res, _ = exported
    report = check_fusion(res.onnx)
    assert report.passed and not report.unfused
    assert len(report.fused) == len(report.kernels) == 14
    assert set(report.kernels) == set(state.scales)
    assert set(report.kernels.values()) <= set(INTEGER_KERNELS)
    assert sum(report.op_counts.values()) == 14


def test_onnx_runtime_equals_fake_quant(exported, capsys):
    profile, lm, _, res, _ = exported
    why = inexact_here(profile)
    if why is not None:  # this CPU computes other numbers for this profile, and says so when the file opens
        open_session(res.onnx)
        assert why in capsys.readouterr().err
        pytest.skip(f"exactness of {profile} is checked on a CPU that runs it: {why}")
    sess = open_session(res.onnx)
    assert sess.profile == profile
    assert json.loads(sess.metadata["sasq.session_options"]) == dict(get_profile(profile).session_options)
    ids = torch.randint(0, 257, (2, 48), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = lm.model(input_ids=ids).logits.numpy()
    out = sess.logits(ids.numpy())
    # measured: max |diff| 2.4e-7 (cpu-vnni, arm64, trt) and 3.6e-7 (cpu-avx2), float rounding in
    # attention; one flipped activation code would move logits by ~1e-3
    assert np.abs(out - ref).max() <= 1e-6
    assert (out.argmax(-1) == ref.argmax(-1)).all()


# --- the command line --------------------------------------------------------------------------


CLI = ["--model", "tiny-random-llama", "--seq-len", "32", "--train-steps", "0", "--calib-batches", "1"]


def _one_error_line(capsys, code: int) -> str:
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].count("error:") == 1, err
    return err[0]


def test_train_profile_auto(tmp_path, data_dir, this_cpu, capsys):
    run = tmp_path / "run"
    assert train_main([str(run), *CLI, "--data-dir", str(data_dir), "--profile", "auto", "--json"]) == 0
    captured = capsys.readouterr()
    announced = [ln for ln in captured.err.splitlines() if ln.startswith("profile auto ->")]
    assert len(announced) == 1 and announced[0].startswith(f"profile auto -> {this_cpu} (")
    assert json.loads(captured.out.strip().splitlines()[-1])["profile"] == this_cpu
    recipe = json.loads((run / "recipe.json").read_text())
    assert recipe["method"]["profile"] == recipe["deploy"]["profile"] == this_cpu
    assert recipe["deploy"]["act"] == {"qmin": -128, "qmax": 127, "zero_point": 128, "dtype": "uint8"}
    assert ScaleState.load(run).deploy is PROFILES[this_cpu]


def test_unknown_profile_exits_2(tmp_path, data_dir, capsys):
    code = train_main([str(tmp_path / "run"), *CLI, "--data-dir", str(data_dir), "--profile", "avx-512"])
    line = _one_error_line(capsys, code)
    assert "unknown deploy profile 'avx-512'" in line and all(name in line for name in (*PROFILES, "auto"))
    assert not (tmp_path / "run").exists()


def test_export_refuses_scales_of_another_weight_grid(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    assert train_main([str(run), *CLI, "--data-dir", str(data_dir), "--profile", "trt"]) == 0
    capsys.readouterr()
    out = tmp_path / "out" / "model.onnx"
    code = export_main([str(out), "--model", "tiny-random-llama", "--scales", str(run), "--profile", "cpu-avx2"])
    assert _one_error_line(capsys, code).endswith("retrain with sasq-train --profile cpu-avx2")
    assert not out.parent.exists()


def test_cpu_mismatch_only_where_the_cpu_provider_computes():
    from runtime.session import cpu_mismatch

    assert cpu_mismatch(None, ["CPUExecutionProvider"]) is None  # a float model
    assert cpu_mismatch("cpu-vnni", ["CUDAExecutionProvider", "CPUExecutionProvider"]) is None
    assert cpu_mismatch("cpu-vnni", ["CPUExecutionProvider"]) == inexact_here("cpu-vnni")
