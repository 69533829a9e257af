"""The KV-cache graph and generation on ONNX Runtime: graph names and shapes, incremental decoding
against one full pass, greedy tokens against the torch fake-quant model, sampling, stops, and
the sasq-generate command.

The tiny preset's decoder weights are multiplied by 8 here: at the preset's init scale the
residual stream is nearly the input embedding, and the tied head makes greedy decoding repeat
the last prompt byte forever, so "same 32 tokens" would hold for a broken decoder too. With the
gain the greedy continuations have 19-29 distinct tokens in 32.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from exporters import export_onnx
from runtime import RuntimeSetupError, open_session
from runtime.generate import GenerationStats, Sampling, generate, pick_token, stream
from runtime.graph import cache_names
from runtime.layout import AttentionLayout
from sasq_edge.calibrate import calibrate
from sasq_edge.cli.generate import main as generate_main
from sasq_edge.config import QuantConfig
from sasq_edge.evaluate import greedy_tokens
from sasq_edge.models import LoadedModel, tiny_random_llama
from sasq_edge.modules import prepare
from sasq_edge.state import state_from_model

GAIN = 8.0
PROMPTS = [list(b"hello world"), list(b"The capital of France is"), list(b"abc"), list(b"x")]


def _tiny_with_gain() -> LoadedModel:
    lm = tiny_random_llama()
    with torch.no_grad():
        for p in lm.model.model.layers.parameters():
            if p.dim() == 2:  # the decoder's linear weights; norms stay 1
                p.mul_(GAIN)
    return lm


@pytest.fixture(scope="module")
def quant(tmp_path_factory):
    """Calibrated (2 windows, no training) cpu-avx2 export, with and without the KV cache."""
    lm = _tiny_with_gain()
    cfg = QuantConfig.plain(profile="cpu-avx2", seq_len=64, calib_batches=2, train_steps=0)
    windows = torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(1))
    prepare(lm.model, cfg)
    calibrate(lm.model, [windows[:1], windows[1:]], cfg)
    state = state_from_model(lm.model, cfg, lm.source)
    root = tmp_path_factory.mktemp("gen")
    cached = export_onnx(lm.model, root / "kv" / "model.onnx", state=state, tokenizer=lm.tokenizer)
    plain = export_onnx(lm.model, root / "nokv" / "model.onnx", state=state, tokenizer=lm.tokenizer, kv_cache=False)
    return lm, open_session(cached.onnx), open_session(plain.onnx)


@pytest.fixture(scope="module")
def flt(tmp_path_factory):
    lm = _tiny_with_gain()
    res = export_onnx(lm.model, tmp_path_factory.mktemp("gen_float") / "model.onnx", tokenizer=lm.tokenizer)
    return lm, open_session(res.onnx)


@pytest.fixture(params=["float", "quantized"])
def cached(request, flt, quant):
    return flt if request.param == "float" else quant[:2]


def _torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).logits.numpy()


# --- the graph ---------------------------------------------------------------------------------


def test_cache_graph_names_and_shapes(cached):
    lm, sess = cached
    cfg = lm.model.config
    layout = AttentionLayout.of(cfg)
    assert layout == AttentionLayout(cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
                                     cfg.hidden_size // cfg.num_attention_heads) == AttentionLayout(2, 4, 2, 16)
    assert AttentionLayout.of(cfg.to_dict()) == layout  # config.json of an export folder gives the same facts
    past = [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert cache_names(2) == (past, present)
    inputs, outputs = sess.session.get_inputs(), sess.session.get_outputs()
    # the traced graph (the float export) takes position_ids; the fused CPU graph (the quantized
    # cpu-avx2 export) derives positions from the attention mask, as ONNX Runtime GenAI's graphs do
    graph = sess.metadata.get("sasq.graph", "traced")
    assert graph == ("traced" if sess.profile is None else "fused")
    positions = ["position_ids"] if graph == "traced" else []
    assert sess.takes_positions == bool(positions)
    assert [i.name for i in inputs] == ["input_ids", "attention_mask", *positions, *past]
    assert [o.name for o in outputs] == ["logits", *present]
    for i in inputs[2 + len(positions):]:
        batch, heads, seq, dim = i.shape  # [batch, kv_heads, past_sequence, head_dim]
        assert (i.type, heads, dim) == ("tensor(float)", 2, 16) and isinstance(batch, str) and isinstance(seq, str)
    for o in outputs[1:]:
        assert len(o.shape) == 4 and (o.shape[1], o.shape[3]) == (2, 16)
    assert outputs[0].shape[2] == cfg.vocab_size == 257
    spec = sess.cache
    assert (spec.past_names, spec.present_names) == (tuple(past), tuple(present))
    assert (spec.kv_heads, spec.head_dim, spec.dtype) == (2, 16, np.float32)
    assert all(v.shape == (3, 2, 0, 16) and v.dtype == np.float32 for v in spec.empty(3).values())


# --- incremental decoding ----------------------------------------------------------------------


def test_incremental_decoding_equals_one_full_pass(cached):
    lm, sess = cached
    ids = np.random.default_rng(7).integers(0, 257, (1, 20))
    full = sess.logits(ids)
    logits, past = sess.step(ids[:, :12], sess.cache.empty(1))
    parts = [logits]
    for t in range(12, 20):
        logits, past = sess.step(ids[:, t:t + 1], past)
        parts.append(logits)
    inc = np.concatenate(parts, axis=1)
    assert inc.shape == full.shape == (1, 20, 257)
    assert all(v.shape == (1, 2, 20, 16) for v in past.values())
    # measured over 5 inputs: 0.0 for the quantized graph, <= 4.8e-7 for the float one (other
    # MatMul shapes round differently); a wrong position or cache slot moves logits by O(1)
    assert np.abs(inc - full).max() <= 2e-6
    assert (inc.argmax(-1) == full.argmax(-1)).all()
    ref = _torch_logits(lm.model, ids)
    assert np.abs(full - ref).max() <= 1e-4  # measured <= 6e-7


def test_shared_buffer_decoder_updates_the_cache_in_place(quant):
    """The fused graph's decoder binds one buffer per cache name as past and present: the same
    logits as the copying path (measured: bit-identical), no new buffer per step, and a clear
    error past its capacity or for another batch."""
    _, sess, _ = quant
    assert sess.shares_buffer
    ids = np.random.default_rng(11).integers(0, 257, (2, 20))
    copying, shared = sess.decoder(2), sess.decoder(2, capacity=20)
    assert type(copying).__name__ == "Decoder" and type(shared).__name__ == "SharedBufferDecoder"
    pointers = {n: v.data_ptr() for n, v in shared.buffers.items()}
    for a, b in [(0, 12), *((t, t + 1) for t in range(12, 20))]:
        assert np.array_equal(copying.step(ids[:, a:b]), shared.step(ids[:, a:b]))
    assert copying.length == shared.length == 20
    assert {n: v.data_ptr() for n, v in shared.buffers.items()} == pointers
    for name, value in shared.buffers.items():  # the buffer holds exactly the copying path's cache
        assert np.array_equal(value.numpy(), copying.past[name])
    with pytest.raises(RuntimeSetupError, match="do not fit the cache of 20"):
        shared.step(ids[:, :1])
    with pytest.raises(RuntimeSetupError, match="batch 2"):
        sess.decoder(2, capacity=4).step(ids[:1, :1])


def test_only_the_fused_graph_shares_its_buffer(flt):
    _, sess = flt  # the float export is the traced graph: Concat grows the cache
    assert not sess.shares_buffer
    assert type(sess.decoder(1, capacity=8)).__name__ == "Decoder"


def test_float_cache_equals_torch_cache(flt):
    lm, sess = flt
    ids = np.random.default_rng(3).integers(0, 257, (1, 9))
    _, past = sess.step(ids, sess.cache.empty(1))
    with torch.no_grad():
        cache = lm.model(input_ids=torch.from_numpy(ids), use_cache=True).past_key_values
    for i, layer in enumerate(cache.layers):
        # measured <= 2.0e-6
        assert np.abs(past[f"past_key_values.{i}.key"] - layer.keys.numpy()).max() <= 1e-5
        assert np.abs(past[f"past_key_values.{i}.value"] - layer.values.numpy()).max() <= 1e-5


def test_batch_2_prefill(cached):
    lm, sess = cached
    ids = np.random.default_rng(8).integers(0, 257, (2, 10))
    logits, past = sess.step(ids, sess.cache.empty(2))
    assert logits.shape == (2, 10, 257)
    assert all(v.shape == (2, 2, 10, 16) for v in past.values())
    assert np.abs(logits - _torch_logits(lm.model, ids)).max() <= 1e-5  # measured <= 8e-7
    for b in range(2):  # each row is what it would be alone (measured: bit-identical)
        assert np.abs(logits[b] - sess.logits(ids[b:b + 1])[0]).max() <= 1e-6


# --- the graph without a cache -----------------------------------------------------------------


def test_no_kv_cache_export(quant):
    lm, cached_sess, sess = quant
    assert [i.name for i in sess.session.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in sess.session.get_outputs()] == ["logits"]
    assert sess.cache is None
    with pytest.raises(RuntimeSetupError, match="no KV-cache inputs"):
        sess.step(np.zeros((1, 3), np.int64), {})
    ids = np.random.default_rng(9).integers(0, 257, (2, 24))
    assert np.abs(sess.logits(ids) - cached_sess.logits(ids)).max() <= 1e-6  # measured: bit-identical
    for prompt in PROMPTS[:2]:
        tokens, stats = generate(sess, prompt, Sampling(max_new_tokens=32))
        assert tokens == generate(cached_sess, prompt, Sampling(max_new_tokens=32))[0]
        assert stats.new_tokens == 32 and len(stats.decode_s) == 31  # each decode re-ran the sequence


# --- greedy tokens: ORT against torch ----------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS, ids=lambda p: bytes(p).decode())
def test_greedy_generate_equals_torch_fake_quant(quant, prompt):
    lm, sess, _ = quant
    tokens, stats = generate(sess, prompt, Sampling(max_new_tokens=32))
    assert tokens == greedy_tokens(lm.model, prompt, 32)
    assert len(set(tokens)) >= 10  # not a repeated token (measured 19-29 distinct)
    assert (stats.prompt_tokens, stats.new_tokens, stats.stopped, len(stats.decode_s)) == (len(prompt), 32, "max_new_tokens", 31)
    assert stats.prefill_s > 0 and stats.decode_tokens_per_s > 0
    assert set(stats.to_dict()) == {"prompt_tokens", "new_tokens", "prefill_ms", "decode_tokens_per_s", "stopped"}


@pytest.mark.parametrize("chunk", [1, 5, 7])
def test_chunked_prefill_gives_the_same_tokens(cached, quant, chunk):
    """The prompt fed in chunks, each appended to the cache (the fused graph's shared buffer and the
    traced graph's growing cache), gives the tokens one prefill call gives, with the logits of the
    last prompt position within float32 noise of the single call (measured: 0 on the quantized
    fused graph; other MatMul shapes round the float graph's sums differently, <= 1e-6)."""
    for sess in {id(s): s for s in (cached[1], quant[1])}.values():
        prompt = list(b"The capital of France is")
        whole, _ = generate(sess, prompt, Sampling(max_new_tokens=16), prefill_chunk=len(prompt))
        parts, stats = generate(sess, prompt, Sampling(max_new_tokens=16), prefill_chunk=chunk)
        assert parts == whole and stats.prompt_tokens == len(prompt)
        one = sess.decoder(1, capacity=len(prompt)).step(np.array([prompt]))[0, -1]
        dec = sess.decoder(1, capacity=len(prompt))
        for start in range(0, len(prompt), chunk):
            last = dec.step(np.array([prompt[start:start + chunk]]))[0, -1]
        assert np.abs(last - one).max() <= 1e-5


# --- picking tokens ----------------------------------------------------------------------------


def _rows(n: int = 50, vocab: int = 257) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, vocab)).astype(np.float32) * 3


def test_greedy_and_degenerate_sampling_are_argmax():
    rng = np.random.default_rng(0)
    for row in _rows():
        best = int(np.argmax(row))
        assert pick_token(row, Sampling(), rng) == best
        for t in (0.01, 0.7, 1.0, 5.0, 100.0):
            assert pick_token(row, Sampling(temperature=t, top_k=1), rng) == best
            assert pick_token(row, Sampling(temperature=t, top_p=1e-9), rng) == best


def _draws(logits: np.ndarray, sampling: Sampling, n: int) -> np.ndarray:
    rng = np.random.default_rng(sampling.seed)
    return np.bincount([pick_token(logits, sampling, rng) for _ in range(n)], minlength=logits.shape[0]) / n


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


N_DRAWS = 20_000


def _assert_frequencies(freq: np.ndarray, p: np.ndarray) -> None:
    """Each frequency within 5 binomial standard deviations of its probability (and exactly 0
    where the probability is 0)."""
    sd = np.sqrt(p * (1 - p) / N_DRAWS)
    assert (np.abs(freq - p) <= 5 * sd + 1e-12).all(), (freq, p)


def test_sampling_frequencies_match_softmax():
    logits = np.array([0.0, 1.0, 2.0, 3.0], np.float32)
    t = 1.5
    p = _softmax(logits.astype(np.float64) / t)  # [0.071, 0.138, 0.269, 0.523]
    _assert_frequencies(_draws(logits, Sampling(temperature=t, seed=11), N_DRAWS), p)
    top2 = np.where(np.arange(4) >= 2, p, 0.0) / p[2:].sum()
    _assert_frequencies(_draws(logits, Sampling(temperature=t, top_k=2, seed=12), N_DRAWS), top2)
    # nucleus: the smallest head of mass >= 0.6 is {3, 2} (0.523 < 0.6 <= 0.791)
    _assert_frequencies(_draws(logits, Sampling(temperature=t, top_p=0.6, seed=13), N_DRAWS), top2)
    # 0.5 is reached by token 3 alone
    assert (_draws(logits, Sampling(temperature=t, top_p=0.5, seed=14), 2_000) == [0, 0, 0, 1]).all()


def test_seeded_sampling_is_reproducible(quant):
    def draws(seed: int) -> list[int]:
        rng = np.random.default_rng(seed)
        return [pick_token(row, Sampling(temperature=1.0, seed=seed), rng) for _ in range(64)]

    row = _rows(1)[0] / 3
    assert draws(5) == draws(5) != draws(6)
    _, sess, _ = quant
    a = generate(sess, PROMPTS[0], Sampling(max_new_tokens=24, temperature=1.0, seed=5))[0]
    assert a == generate(sess, PROMPTS[0], Sampling(max_new_tokens=24, temperature=1.0, seed=5))[0]
    assert a != generate(sess, PROMPTS[0], Sampling(max_new_tokens=24, temperature=1.0, seed=6))[0]
    assert a != generate(sess, PROMPTS[0], Sampling(max_new_tokens=24))[0]


# --- stopping ----------------------------------------------------------------------------------


def test_stop_ids_stop_the_stream(quant):
    _, sess, _ = quant
    greedy = generate(sess, PROMPTS[1], Sampling(max_new_tokens=32))[0]
    stop = greedy[5]
    n = greedy.index(stop) + 1
    stats = GenerationStats()
    tokens = list(stream(sess, PROMPTS[1], Sampling(max_new_tokens=32, stop_ids=(stop, 999)), stats=stats))
    assert tokens == greedy[:n] and tokens[-1] == stop
    assert (stats.new_tokens, stats.stopped, len(stats.decode_s)) == (n, "stop_id", n - 1)


def test_max_positions_stops_at_the_context(quant):
    _, sess, _ = quant
    prompt = PROMPTS[0]
    greedy = generate(sess, prompt, Sampling(max_new_tokens=32))[0]
    tokens, stats = generate(sess, prompt, Sampling(max_new_tokens=32), max_positions=len(prompt) + 5)
    assert tokens == greedy[:5] and (stats.new_tokens, stats.stopped) == (5, "context")
    with pytest.raises(RuntimeSetupError, match="the prompt has 11 tokens, the model's context is 11"):
        generate(sess, prompt, Sampling(), max_positions=len(prompt))
    with pytest.raises(RuntimeSetupError, match="the prompt is empty"):
        generate(sess, [], Sampling())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_new_tokens": 0}, "max_new_tokens=0 must be at least 1"),
    ({"temperature": -0.5}, "temperature=-0.5 must be 0"),
    ({"top_k": -1}, "top_k=-1 must be 0"),
    ({"top_p": 0.0}, r"top_p=0.0 must lie in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p=1.5 must lie in \(0, 1\]"),
])
def test_invalid_sampling(kwargs, message):
    with pytest.raises(RuntimeSetupError, match=message):
        Sampling(**kwargs)


# --- sasq-generate -----------------------------------------------------------------------------


def _cli(capsys, *argv: str) -> tuple[int, list[str], list[str]]:
    code = generate_main(list(argv))
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err.strip().splitlines()


def _tokenizer(sess):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(sess.path.parent / "tokenizer.json"))


def test_cli_generate_json(quant, capsys):
    _, sess, _ = quant
    path = str(sess.path)
    code, out, _ = _cli(capsys, path, "--prompt", "hello", "--max-new-tokens", "8", "--ignore-eos", "--json")
    assert code == 0
    res = json.loads(out[-1])
    tok = _tokenizer(sess)
    prompt = tok.encode("hello").ids
    assert len(prompt) == 5 and res["prompt"] == "hello"
    assert res["tokens"] == generate(sess, prompt, Sampling(max_new_tokens=8))[0] and len(res["tokens"]) == 8
    assert res["text"] == tok.decode(res["tokens"])
    assert (res["prompt_tokens"], res["new_tokens"], res["stopped"]) == (5, 8, "max_new_tokens")
    # streamed text (no --json): the same text, then the summary line
    code, out, _ = _cli(capsys, path, "--prompt", "hello", "--max-new-tokens", "8", "--ignore-eos")
    assert code == 0 and "\n".join(out[:-1]) == res["text"] and out[-1].startswith("8 new tokens (max_new_tokens)")


def test_cli_sampling_is_seeded(quant, capsys):
    _, sess, _ = quant
    args = [str(sess.path), "--prompt", "hello", "--max-new-tokens", "8", "--ignore-eos", "--temperature", "1.0", "--json"]
    runs = [json.loads(_cli(capsys, *args, "--seed", s)[1][-1])["tokens"] for s in ("7", "7", "8")]
    assert runs[0] == runs[1] != runs[2]
    assert runs[0] == generate(sess, _tokenizer(sess).encode("hello").ids, Sampling(max_new_tokens=8, temperature=1.0, seed=7))[0]


def test_cli_missing_tokenizer(quant, tmp_path, capsys):
    _, sess, _ = quant
    folder = tmp_path / "copy"
    shutil.copytree(sess.path.parent, folder, ignore=shutil.ignore_patterns("tokenizer.json"))
    assert (folder / "model.onnx").is_file() and not (folder / "tokenizer.json").exists()
    code, out, err = _cli(capsys, str(folder / "model.onnx"), "--prompt", "hello")
    assert code == 2 and out == [] and len(err) == 1
    # the export recorded tokenizer.json among its files: the folder no longer belongs together
    assert err[0].startswith("sasq-generate: error: ") and "tokenizer.json is missing: model.onnx was exported with it" in err[0]


def test_cli_prompt_longer_than_context(quant, capsys):
    _, sess, _ = quant
    code, out, err = _cli(capsys, str(sess.path), "--prompt", "a" * 1030, "--max-new-tokens", "4")
    assert code == 2 and out == [] and len(err) == 1
    assert err[0] == "sasq-generate: error: the prompt has 1030 tokens, the model's context is 1024: shorten the prompt"


def test_cli_bad_sampling_flag(quant, capsys):
    _, sess, _ = quant
    code, out, err = _cli(capsys, str(sess.path), "--prompt", "hello", "--top-p", "0")
    assert code == 2 and len(err) == 1 and "argument --top-p: 0 must be a finite number in (0, 1]" in err[0]


def test_text_stream_is_exact_and_constant_time():
    """The pieces join to the whole text, multi-byte characters split across tokens included, and
    no call decodes more than a few tokens however long the stream grows."""
    from runtime.generate import TextStream
    from sasq_edge.models import byte_tokenizer

    tok = byte_tokenizer()
    text = "héllo wörld — ünïcode ✓ 漢字 " * 40  # 2-, 3- and 4-byte characters, one byte per token
    ids = tok(text)["input_ids"]
    pieces = TextStream(lambda t: tok.decode(t))
    out = "".join(pieces.push(t) for t in ids) + pieces.flush()
    assert out == text and len(ids) > 1000
    assert pieces.longest_decode <= 8  # one character's bytes and the one before: constant per token
