"""Every model family of the registry (``runtime.families``) on a tiny seeded model, end to end:
prepare, calibrate, train 3 steps (plain, and with learned SmoothQuant factors), export to QDQ
ONNX, then ONNX Runtime against the PyTorch fake-quant twin (logits, greedy KV-cache generation),
the integer-kernel fusion check and exact Q/DQ counts; and, in float64, that folding smoothing
factors keeps the float model's function. A meta-test fails when the registry and ``FAMILIES``
drift apart.

The tiny models follow tests/test_generate.py: 2 layers, hidden 64, the byte vocabulary (257),
GQA 4/2 heads of 16, the decoder's linear weights multiplied by ``GAIN`` so that greedy decoding
does not just repeat the prompt; norm weights and biases get seeded noise so that folding into
them is tested on values other than their init (1, or 0 for Gemma's ``1 + w``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import torch
from bounds import HOST_PROFILE
from torch import nn

from exporters import export_onnx
from exporters.passes import op_counts
from runtime import open_session
from runtime.families import ARCHITECTURES, arch_spec, fused_refusal
from runtime.fusion import INTEGER_KERNELS, check_fusion
from runtime.generate import Sampling, generate
from sasq_edge.config import QuantConfig
from sasq_edge.evaluate import greedy_tokens
from sasq_edge.models import LoadedModel, byte_tokenizer
from sasq_edge.modules import prepare, quant_linears, target_names
from sasq_edge.pipeline import run_sasq
from sasq_edge.smooth import smooth_groups, smooth_model
from sasq_edge.state import apply_state

GAIN = 8.0
LAYERS = 2
COMMON = dict(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=None,
              eos_token_id=256, pad_token_id=None)
GEMMA = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8)  # a window the 48-token inputs slide past


def _llama():
    from transformers import LlamaConfig
    return LlamaConfig(**COMMON)


def _llama3():
    from transformers import LlamaConfig
    # Llama 3.1's frequency-dependent RoPE scaling; with head_dim 16 and an original context of 64,
    # the 8 frequencies fall on both sides of and between the low/high wavelength bounds
    return LlamaConfig(**COMMON, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64})


def _mistral():
    from transformers import MistralConfig
    return MistralConfig(**COMMON, sliding_window=8)


def _qwen2():
    from transformers import Qwen2Config
    return Qwen2Config(**COMMON)  # q/k/v biases


def _qwen3():
    from transformers import Qwen3Config
    return Qwen3Config(**COMMON, head_dim=16)  # per-head q/k RMSNorm


def _gemma2():
    from transformers import Gemma2Config
    # alternating sliding/full layers; attention (50) and final-logit (30) soft-capping by default
    return Gemma2Config(**COMMON, **GEMMA)


def _gemma3():
    from transformers import Gemma3TextConfig
    # q/k norms, one sliding and one full layer with their own RoPE bases, final-logit soft-capping
    # (Gemma 3's attention takes no soft-capping in transformers' modeling code: Gemma 2 covers it)
    return Gemma3TextConfig(**COMMON, **GEMMA, layer_types=["sliding_attention", "full_attention"],
                            final_logit_softcapping=30.0)


def _phi3():
    from transformers import Phi3Config
    return Phi3Config(**COMMON)  # fused qkv_proj and gate_up_proj


def _smollm3():
    from transformers import SmolLM3Config
    return SmolLM3Config(**COMMON, no_rope_layers=[1, 0])  # layer 1 has no rotary embedding (NoPE)


@dataclass(frozen=True)
class Family:
    name: str  # test id
    config: Callable[[], object]

    @property
    def model_type(self) -> str:
        return self.config().model_type

    def build(self, seed: int = 0) -> LoadedModel:
        from transformers import AutoModelForCausalLM

        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(self.config())
            noise = torch.Generator().manual_seed(seed + 1)
            with torch.no_grad():
                for p in model.get_submodule(arch_spec(model.config.model_type).blocks).parameters():
                    if p.dim() == 2:
                        p.mul_(GAIN)
                    else:  # norm weights, biases
                        p.add_(0.1 * torch.randn(p.shape, generator=noise))
        return LoadedModel(model.eval(), byte_tokenizer(), f"tiny-{self.name}")


FAMILIES = [
    Family("llama", _llama),
    Family("llama3", _llama3),
    Family("mistral", _mistral),
    Family("qwen2", _qwen2),
    Family("qwen3", _qwen3),
    Family("gemma2", _gemma2),
    Family("gemma3_text", _gemma3),
    Family("phi3", _phi3),
    Family("smollm3", _smollm3),
]
RECIPES = {"sasq": {}, "smooth-learned": {"smooth_alpha": 0.5, "smooth_learn": True}}
PROMPTS = [list(b"hello world"), list(b"The capital of France is")]
NEW_TOKENS = 16


def _windows() -> np.ndarray:
    return torch.randint(0, 257, (6, 64), generator=torch.Generator().manual_seed(1)).numpy()  # (N, T)


def test_registry_matches_tested_families():
    """Adding a family is one registry entry plus its tiny test here: a registered family without a
    test, or without either graph kind in CASES, fails this."""
    assert sorted({f.model_type for f in FAMILIES}) == sorted(ARCHITECTURES)
    for family in FAMILIES:
        assert fused_refusal(family.config()) is None, family.name
        kinds = {g for f, _, g in CASES if f is family}
        assert kinds == set(GRAPHS), (family.name, kinds)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_description_names_every_quantized_linear(model_type):
    """The graph part of a family's description (the projections the fused writer and the probe
    read) names exactly the linears the method quantizes, and every smoothing group and rotated
    input among them."""
    spec = arch_spec(model_type)
    assert sorted(n.rsplit(".", 1)[-1] for n in spec.linears) == sorted(spec.targets)
    assert set(spec.rotated) <= set(spec.linears)
    assert {n for g in spec.smooth for n in g.linears} <= set(spec.linears)


# --- the registry on each family, in torch ----------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_prepare_quantizes_the_targets_and_float_mode_is_the_float_model(family):
    lm = family.build()
    spec = arch_spec(family.model_type)
    ids = torch.from_numpy(_windows()[:2])
    with torch.no_grad():
        ref = lm.model(input_ids=ids).logits
        prepare(lm.model, QuantConfig.plain())
        assert sorted(n.rsplit(".", 1)[-1] for n, _ in quant_linears(lm.model)) == sorted(spec.targets * LAYERS)
        assert torch.equal(lm.model(input_ids=ids).logits, ref)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_smoothing_groups_read_every_target_once(family):
    model = family.build().model
    groups = smooth_groups(model)
    assert len(groups) == LAYERS * len(arch_spec(family.model_type).smooth)
    consumers = [f"{k[: -len(g.prev) - 1]}.{n}" for k, g in groups.items() for n in g.linears]
    assert sorted(consumers) == sorted(target_names(model, QuantConfig.plain()))
    for key in groups:
        assert isinstance(model.get_submodule(key).weight, nn.Parameter)


class _Float64Norm(nn.Module):
    """An RMSNorm computed in its input's dtype, sharing the norm's weight: Gemma's norms compute
    in float32 whatever the model's dtype, which would hide a folding error below 1e-7."""

    def __init__(self, norm: nn.Module, offset: float) -> None:
        super().__init__()
        self.weight, self.eps, self.offset = norm.weight, norm.eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (self.offset + self.weight)


def _float64(model: nn.Module) -> nn.Module:
    model = model.double()
    offset = arch_spec(model.config.model_type).norm_offset
    if offset:  # Gemma: swap each norm for the same function in float64
        for name, m in list(model.named_modules()):
            if name and type(m).__name__.endswith("RMSNorm"):
                parent, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(parent), leaf, _Float64Norm(m, offset))
    return model


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_smoothing_keeps_the_float_function_in_float64(family):
    model = _float64(family.build().model)
    ref = copy.deepcopy(model)
    before = {n: p.clone() for n, p in model.named_parameters()}
    windows = torch.from_numpy(_windows())
    factors = smooth_model(model, [windows[:2]], alpha=0.5)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    groups = smooth_groups(model)
    assert changed == {f"{k}.weight" for k in groups} | {f"{k[: -len(g.prev) - 1]}.{n}.weight" for k, g in groups.items()
                                                          for n in g.linears} | {n for n in before if n.endswith("v_proj.bias")}
    column_factors = {f"{k[: -len(g.prev) - 1]}.{n}": factors[k] for k, g in groups.items() for n in g.linears}
    for key, g in groups.items():  # the rows of a fused projection no linear of the group reads (q and k, gate)
        if g.rows == "tail":  # only took their own input group's column factors
            head = model.get_submodule(key).weight.shape[0] - factors[key].numel()
            expected = before[f"{key}.weight"][:head] * column_factors[key][None, :].double()
            assert torch.equal(model.get_submodule(key).weight[:head], expected)
    with torch.no_grad():
        diff = (model(input_ids=windows).logits - ref(input_ids=windows).logits).abs().max().item()
    assert diff < 1e-10  # float64 on both sides: an identity up to float64 rounding (2^-53 = 1.1e-16 per op)
    cfg = model.config
    kv = cfg.num_key_value_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    assert all(factors[k].shape == (kv,) for k, g in groups.items() if g.heads)  # one factor per shared KV channel


# --- export and ONNX Runtime, per family and recipe -------------------------------------------


@dataclass
class Exported:
    family: Family
    recipe: str
    trained: LoadedModel
    twin: nn.Module  # apply_state(fresh model, state): what sasq-validate compares with
    state: object
    onnx: onnx.ModelProto
    path: object


# both graph kinds for every family: traced (profile trt, standard ops) and the fused CPU graph (the
# profile this CPU runs exactly; GroupQueryAttention and friends: exporters/fused.py)
GRAPHS = {"traced": "trt", "fused": HOST_PROFILE}
# the traced graph (a dynamo trace: seconds per export) with learned smoothing, the superset of
# what the plain recipe does to a model; the fused graph (milliseconds) with both recipes
CASES = [(f, r, g) for f in FAMILIES for r in RECIPES for g in GRAPHS if g == "fused" or r == "smooth-learned"]


@pytest.fixture(scope="module", params=CASES, ids=lambda p: f"{p[0].name}-{p[1]}-{p[2]}")
def exported(request, tmp_path_factory) -> Exported:
    family, recipe, graph = request.param
    lm = family.build()
    cfg = QuantConfig.plain(profile=GRAPHS[graph], seq_len=64, calib_batches=2, train_steps=3, lr=0.05, **RECIPES[recipe])
    state = run_sasq(lm, cfg, windows=_windows(), progress=False).state
    out = tmp_path_factory.mktemp(f"{family.name}-{recipe}-{graph}") / "model.onnx"
    res = export_onnx(lm.model, out, state=state, tokenizer=lm.tokenizer, graph=graph)
    twin = apply_state(family.build().model, state)
    return Exported(family, recipe, lm, twin, state, onnx.load(str(res.onnx)), res.onnx)


def test_state_rebuilds_the_trained_model(exported):
    a, b = exported.trained.model.state_dict(), exported.twin.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_exact_qdq_counts(exported):
    n = LAYERS * len(arch_spec(exported.family.model_type).targets)  # 14, Phi-3's fused linears 8
    assert len(exported.state.scales) == n
    counts = op_counts(exported.onnx)
    assert counts["QuantizeLinear"] == n
    assert counts["DequantizeLinear"] == 2 * n  # activation + weight per layer
    assert counts.get("DynamicQuantizeLinear", 0) == 0


def test_onnx_runtime_matches_the_fake_quant_twin(exported):
    ids = torch.randint(0, 257, (2, 48), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = exported.twin(input_ids=ids).logits.numpy()
    out = open_session(exported.path).logits(ids.numpy())
    rows = np.abs(out - ref).max(axis=-1)  # (B, T): max |diff| over the vocabulary
    # measured on the traced exports (96 positions each): at most 3.0e-7 at every position, except
    # in llama3-sasq, where one value entering layer 1's v_proj quantizer lies within one float32 ulp
    # of a rounding tie (x / s = 54.500004); ORT rounds it to the other code, which moves the logits
    # of one later position by 1.0e-2. The fused graphs compute norms and attention with other
    # float kernels: at most 3.6e-7 everywhere except qwen3-sasq-fused, where one such flip moves
    # 9 positions by up to 2.3e-2. A wrong scale or weight moves every position by far more.
    assert (rows > 1e-6).sum() <= 0.1 * rows.size
    assert rows.max() < 5e-2
    assert (out.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("prompt", PROMPTS, ids=bytes)
def test_greedy_kv_cache_generation_equals_torch(exported, prompt):
    tokens, _ = generate(open_session(exported.path), prompt, Sampling(max_new_tokens=NEW_TOKENS))
    assert tokens == greedy_tokens(exported.twin, prompt, NEW_TOKENS)


def test_layer_checks_pass_and_map_every_block(exported):
    """sasq-validate's layer checks on each family and graph kind: the weights digest, the integer
    replay of every quantized linear and the teacher-forced blocks, every block boundary found
    (the fused graph through runtime.graph.fused_scope's names, the traced one through the
    exporter's module scopes)."""
    from runtime.parity import Thresholds
    from sasq_edge.validate import layer_checks

    ids = torch.randint(0, 257, (1, 48), generator=torch.Generator().manual_seed(7)).numpy()
    checks = layer_checks(exported.twin, exported.state, exported.path, ids, Thresholds(), ["cpu"], 1, progress=False)
    assert checks.weights.passed
    assert checks.replay.passed, checks.replay.summary()
    assert checks.blocks.mapped and checks.blocks.passed, checks.blocks.summary()
    assert len(checks.blocks.stages) == LAYERS + 2


def test_every_quantized_layer_runs_as_an_integer_kernel(exported):
    report = check_fusion(exported.path)
    assert report.passed, report.summary()
    assert sorted(report.kernels) == sorted(exported.state.scales)
    assert sum(report.op_counts.get(k, 0) for k in INTEGER_KERNELS) == len(exported.state.scales)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_blockwise_pass_on_every_family(family):
    """The block-wise pass (sasq_edge.blockwise) on each family: the capture reproduces the model's
    own forward block by block (sliding and full layers, NoPE layers, q/k norms), training lowers
    the reconstruction error, and the model ends as ``apply_state``
    rebuilds it from the state, bit for bit."""
    from sasq_edge.blockwise import WholeModel, train_blockwise

    lm = family.build()
    # the grids of cpu-vnni and trt (8-bit weights); nothing here runs on ONNX Runtime
    cfg = QuantConfig.from_recipe("default", profile="cpu-vnni", seq_len=64, blockwise=True, block_steps=30,
                                  block_windows=6, calib_batches=4, train_steps=0)
    res = train_blockwise(WholeModel(lm.model), cfg, _windows(), lm.source, progress=False)
    assert len(res.blocks) == LAYERS
    # a block whose training ends above its calibrated error keeps the calibrated scales; the pass as
    # a whole lowers the error
    assert all(b.trained_error <= b.ptq_error for b in res.blocks), [b.to_dict() for b in res.blocks]
    assert sum(b.trained_error for b in res.blocks) < sum(b.ptq_error for b in res.blocks)
    fresh = family.build()
    apply_state(fresh.model, res.state)
    ids = torch.from_numpy(_windows()[:2])
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=ids).logits, fresh.model(input_ids=ids).logits)
