"""``--data`` (docs/DATA.md): every source format, chat templates, text sampled from the float
model and its cache, weighted mixes, BOS-aware windows on both sides, and each refused input
with its one-line message and exit code. Tiny fixtures written to tmp_path; nothing reaches the
network (``datasets`` reads local folders, or is replaced by a stand-in for hub ids)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.data import bos_id, load_text, make_windows, text_windows, tokenize
from runtime.errors import DataError
from runtime.folder import load_tokenizer, tokenizer_config
from runtime.sources import (
    CALIBRATION,
    EVALUATION,
    interleave,
    load_windows,
    mix_counts,
    parse_data_spec,
    read_source,
)
from sasq_edge.cli.ppl import main as ppl_main
from sasq_edge.cli.train import main as train_main
from sasq_edge.data import bos_of, chat_renderer, selfgen_dir
from sasq_edge.data import load_windows as method_windows
from sasq_edge.models import LoadedModel, byte_tokenizer, load_model, tiny_random_llama

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
WORDS = "the cat sat on a mat while dogs ran in the park and birds sang songs of old".split()


def _prose(n: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n)) + "."


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def _bos_tokenizer():
    """The byte tokenizer plus ``<s>`` (id 257), which its post-processor prepends, as Llama's does."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(byte_tokenizer().backend_tokenizer.to_str())
    tok.add_special_tokens(["<s>"])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>")
    fast.model_max_length = 1 << 30
    return fast


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """Caches (sampled text, datasets' arrow files) under tmp_path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    return tmp_path / "xdg"


def _tiny_model(vocab: int):
    """The tiny preset's architecture with another vocabulary size (seeded)."""
    from transformers import LlamaForCausalLM

    config = tiny_random_llama().model.config
    config.vocab_size, config.bos_token_id = vocab, 257
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def bos_export(tmp_path_factory) -> Path:
    """A float export of a tiny model whose tokenizer adds BOS (no KV cache: quick to trace)."""
    from exporters import export_onnx

    out = tmp_path_factory.mktemp("bos") / "out" / "model.onnx"
    export_onnx(_tiny_model(vocab=258), out, tokenizer=_bos_tokenizer(), kv_cache=False)
    return out


def _error(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert [line for line in err if "error:" in line] == err[-1:], err
    return err[-1]


# --- the spec -------------------------------------------------------------------------------------


def test_parse_sources(tmp_path):
    f = _jsonl(tmp_path / "rows.jsonl", [{"text": "a"}])
    spec = parse_data_spec(f"0.25*wikitext2, 0.75*hf:c4:en:train[:1%]:body,{f}:text,self:16:temperature=0.7:top_k=5:seed=3")
    wt, hf, file, me = spec.sources
    assert (wt.kind, wt.weight) == ("wikitext2", 0.25)
    assert (hf.kind, hf.path, hf.config, hf.split, hf.column, hf.weight) == ("hf", "c4", "en", "train[:1%]", "body", 0.75)
    assert (file.kind, file.path, file.column, file.weight) == ("file", str(f), "text", 1.0)
    assert (me.kind, me.count, me.temperature, me.top_k, me.seed) == ("self", 16, 0.7, 5, 3)
    assert parse_data_spec("hf:roneneldan/TinyStories::validation").sources[0].config is None


@pytest.mark.parametrize("spec, message", [
    ("wikitext", "unknown data source 'wikitext': use wikitext2, hf:NAME:CONFIG:SPLIT[:COLUMN], self:N"),
    ("s3:bucket/data", "unknown data source kind 's3:'"),
    ("abc*wikitext2", "bad weight 'abc' in --data part 'abc*wikitext2': a weight is a positive number"),
    ("0*wikitext2", "bad weight '0'"),
    ("-1*wikitext2", "bad weight '-1'"),
    ("nan*wikitext2,1*self:4", "bad weight 'nan'"),
    ("inf*wikitext2", "bad weight 'inf'"),
    ("hf:wikitext:wikitext-2-raw-v1", "the split is required"),
    ("self:0", "N='0' must be an integer of at least 1"),
    ("self:4:temp=1", "unknown self option 'temp=1'"),
    ("self:4:temperature=0", "temperature='0' must be a positive number"),
    ("missing.jsonl", "no such file or folder 'missing.jsonl'"),
    ("missing.jsonl:text", "no such file or folder 'missing.jsonl'"),
    ("wikitext2,,self:4", "has an empty part"),
    ("", "--data is empty"),
])
def test_parse_errors(spec, message):
    with pytest.raises(DataError) as e:
        parse_data_spec(spec)
    assert message in str(e.value)


def test_parse_file_errors(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(DataError, match="is read as plain text, which has no columns: drop ':text'"):
        parse_data_spec(f"{txt}:text")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .txt, .jsonl, .json, .parquet file"):
        parse_data_spec(str(tmp_path / "empty"))


# --- each format ----------------------------------------------------------------------------------


def test_txt_file(tmp_path):
    text = _prose(300)
    f = tmp_path / "mine.txt"
    f.write_text(text)
    tok = byte_tokenizer()
    got = load_windows(str(f), tok, 32, EVALUATION, bos=None)
    assert np.array_equal(got.windows, make_windows(tokenize(text, tok), 32))
    src = got.record["sources"][0]
    assert src["tokens"] == len(text.encode()) and src["windows"] == len(text.encode()) // 32 and got.record["bos"] is False
    # any suffix but .jsonl/.json/.parquet is text: WikiText's raw file, read whole
    raw = tmp_path / "wiki.test.raw"
    raw.write_text(text)
    assert read_source(parse_data_spec(str(raw)).sources[0], EVALUATION).items == [text]


def test_jsonl_default_and_named_column(tmp_path):
    rows = [{"text": "first row", "body": "alpha"}, {"text": None, "body": "beta"}, {"text": "", "body": "gamma"},
            {"text": "last row", "n": 3}]
    f = _jsonl(tmp_path / "rows.jsonl", rows)
    docs = read_source(parse_data_spec(str(f)).sources[0], CALIBRATION)
    assert docs.items == ["first row", "", "last row"]  # None skipped, "" kept (as datasets' WikiText rows)
    assert docs.text(None, "x") == "first row\n\n\n\nlast row"
    assert "3 rows, column 'text'" in docs.read
    named = read_source(parse_data_spec(f"{f}:body").sources[0], CALIBRATION)
    assert named.items == ["alpha", "beta", "gamma"]


def test_json_list_and_json_lines(tmp_path):
    a = tmp_path / "list.json"
    a.write_text(json.dumps([{"text": "one"}, {"text": "two"}]))
    b = tmp_path / "lines.json"
    b.write_text('{"text": "one"}\n{"text": "two"}\n')
    for f in (a, b):
        assert read_source(parse_data_spec(str(f)).sources[0], EVALUATION).items == ["one", "two"]


def test_parquet(tmp_path, cache):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": ["p one", "p two"], "other": [1, 2]}), f)
    assert read_source(parse_data_spec(str(f)).sources[0], EVALUATION).items == ["p one", "p two"]
    with pytest.raises(DataError, match=r"column 'other' of .*rows.parquet holds int values \(row 0\), not text"):
        read_source(parse_data_spec(f"{f}:other").sources[0], EVALUATION)


def test_folder_of_files_in_path_order(tmp_path, cache):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("from a")
    _jsonl(d / "b.jsonl", [{"text": "from b1"}, {"text": "from b2"}])
    pq.write_table(pa.table({"text": ["from c"]}), d / "sub" / "c.parquet")
    (d / "notes.md").write_text("not read")
    (d / ".hidden.txt").write_text("not read")
    docs = read_source(parse_data_spec(str(d)).sources[0], CALIBRATION)
    assert docs.items == ["from a", "from b1", "from b2", "from c"]
    assert docs.read.startswith(f"3 files in {d}")


def test_hf_local_dataset_folder(tmp_path, cache):
    """A ``datasets`` id that is a local dataset folder (offline): the named split only."""
    d = tmp_path / "my_dataset"
    d.mkdir()
    _jsonl(d / "train.jsonl", [{"text": f"train {i}", "story": ""} for i in range(3)])  # datasets wants one schema
    _jsonl(d / "validation.jsonl", [{"text": f"valid {i}", "story": f"story {i}"} for i in range(2)])
    docs = read_source(parse_data_spec(f"hf:{d}::validation").sources[0], CALIBRATION)
    assert docs.items == ["valid 0", "valid 1"]
    assert read_source(parse_data_spec(f"hf:{d}::train[:2]:text").sources[0], CALIBRATION).items == ["train 0", "train 1"]
    assert read_source(parse_data_spec(f"hf:{d}::validation:story").sources[0], CALIBRATION).items == ["story 0", "story 1"]
    with pytest.raises(DataError, match=r"datasets could not load .* split 'test'.*save the rows as a local .jsonl"):
        read_source(parse_data_spec(f"hf:{d}::test").sources[0], EVALUATION)


def test_hf_hub_id_is_passed_to_datasets(monkeypatch):
    """A hub id goes to ``datasets.load_dataset(name, config, split=...)`` as given (a stand-in here)."""
    import datasets

    calls = []

    def fake(name, config=None, split=None, **kw):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": ["= Title =", "", "body"], "id": [1, 2, 3]})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    docs = read_source(parse_data_spec("hf:wikitext:wikitext-2-raw-v1:validation:text").sources[0], CALIBRATION)
    assert calls == [("wikitext", "wikitext-2-raw-v1", "validation")] and docs.items == ["= Title =", "", "body"]
    read_source(parse_data_spec("hf:org/name::train[:100]").sources[0], CALIBRATION)
    assert calls[-1] == ("org/name", None, "train[:100]")

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach the hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="ConnectionError: Couldn't reach the hub; check the id, config and split, or, offline"):
        read_source(parse_data_spec("hf:org/name::train").sources[0], CALIBRATION)


# --- chat rows --------------------------------------------------------------------------------------


def test_chat_rows_rendered_with_the_template(tmp_path):
    tok = byte_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    lm = LoadedModel(tiny_random_llama().model, tok, "tiny-chat")
    chats = [[{"role": "user", "content": "Hi " + _prose(20, i)}, {"role": "assistant", "content": _prose(30, i + 9)}]
             for i in range(4)]
    f = _jsonl(tmp_path / "chat.jsonl", [{"messages": m, "id": i} for i, m in enumerate(chats)])
    got = method_windows(lm, str(f), 32, CALIBRATION)
    text = "\n\n".join(tok.apply_chat_template(m, tokenize=False) for m in chats)
    assert text.startswith("<|user|>Hi ") and "\n<|assistant|>" in text
    assert np.array_equal(got.windows, text_windows(text, tok, 32))
    assert got.record["sources"][0]["chats"] == 4 and "4 chats, column 'messages'" in got.text
    # prompt/response columns become a user/assistant chat (auto-detected, or named A+B)
    pairs = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": m[0]["content"], "response": m[1]["content"]} for m in chats])
    for spec in (str(pairs), f"{pairs}:prompt+response"):
        assert np.array_equal(method_windows(lm, spec, 32, CALIBRATION).windows, got.windows)
    # the device side has no chat template: one line
    with pytest.raises(DataError, match="holds chat rows, which are rendered with the model's chat template: the device side"):
        load_windows(str(f), tok, 32, EVALUATION, bos=None)


def test_chat_rows_without_a_template(tmp_path):
    f = _jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match="the tokenizer of tiny-random-llama has no chat template: use an instruct model"):
        method_windows(tiny_random_llama(), str(f), 8, CALIBRATION)
    bad = _jsonl(tmp_path / "bad.jsonl", [{"messages": [{"who": "user", "text": "hi"}]}])
    with pytest.raises(DataError, match="holds a list that is not chat messages"):
        read_source(parse_data_spec(str(bad)).sources[0], CALIBRATION)
    render = chat_renderer(byte_tokenizer(), "m")
    with pytest.raises(DataError, match="no chat template"):
        render([{"role": "user", "content": "x"}])


# --- text sampled from the float model ------------------------------------------------------------------


def test_self_generation_is_cached_and_reused(cache):
    lm = tiny_random_llama()
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    logs: list[str] = []
    first = method_windows(lm, "self:5", 24, CALIBRATION, progress=False, log=logs.append)
    assert first.windows.shape == (5, 24) and first.windows.dtype == np.int64
    assert all(int(t) != lm.tokenizer.eos_token_id for t in first.windows[:, 0])  # first tokens: no special token
    files = sorted(p.name for p in (selfgen_dir()).iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".npy")
    assert selfgen_dir().parent.parent == cache
    assert "self:5: sampled 5 sequences of 24 tokens" in logs[0] and "later runs reuse it" in logs[0]
    info = first.record["sources"][0]
    assert info["reused"] is False and info["windows"] == 5 and info["read"].startswith("5 sequences sampled from the float")
    again = method_windows(lm, "self:5", 24, CALIBRATION, progress=False, log=logs.append)
    assert np.array_equal(again.windows, first.windows) and again.record["sources"][0]["reused"] is True
    assert logs[1].startswith("self:5: reused 5 sampled sequences of 24 tokens from the cache")
    assert sorted(p.name for p in selfgen_dir().iterdir()) == files  # generated once
    # the same settings sample the same tokens (seeded); other settings are another entry
    for p in selfgen_dir().iterdir():
        p.unlink()
    assert np.array_equal(method_windows(lm, "self:5", 24, CALIBRATION, progress=False, log=logs.append).windows, first.windows)
    other = method_windows(lm, "self:5:seed=1", 24, CALIBRATION, progress=False, log=logs.append)
    assert not np.array_equal(other.windows, first.windows) and len(list(selfgen_dir().glob("*.npy"))) == 2
    texts = json.loads(next(p for p in selfgen_dir().glob("*.json")).read_text())["texts"]
    assert len(texts) == 5 and all(isinstance(t, str) for t in texts)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())  # the float model is untouched


def test_self_generation_with_bos_and_top_k(cache):
    """BOS first, then a first token that is no special token, then sampling that never draws an
    id the tokenizer lacks (the model's embedding is padded to 300 rows here)."""
    lm = LoadedModel(_tiny_model(vocab=300), _bos_tokenizer(), "bos-tiny")
    got = method_windows(lm, "self:6:top_k=3", 16, CALIBRATION, progress=False, log=lambda _: None)
    assert got.bos == 257 and (got.windows[:, 0] == 257).all()
    # ids 0-255 are bytes, 256 EOS, 257 BOS: the tokenizer's 258 ids, of the embedding's 300 rows
    assert (got.windows[:, 1] < 256).all() and (got.windows[:, 1:] < 258).all()


def test_self_refused_for_evaluation_and_on_the_device(tmp_path):
    with pytest.raises(DataError, match="self:4 is text the model wrote itself, for calibration and training"):
        method_windows(tiny_random_llama(), "self:4", 16, EVALUATION)
    with pytest.raises(DataError, match="self:4 samples text from the float torch model: use it with sasq-train"):
        load_windows("self:4", byte_tokenizer(), 16, CALIBRATION, bos=None)


# --- mixes --------------------------------------------------------------------------------------------


def test_mix_counts_and_interleaving():
    assert mix_counts([0.5, 0.5], [100, 8], ["a", "b"]) == [8, 8]  # the scarcest source gives all its windows
    assert mix_counts([0.75, 0.25], [100, 8], ["a", "b"]) == [24, 8]  # T = min(100/0.75, 8/0.25) = 32
    assert mix_counts([3, 1], [100, 8], ["a", "b"]) == [24, 8]  # weights are normalised
    assert mix_counts([0.2, 0.3, 0.5], [50, 50, 50], ["a", "b", "c"]) == [20, 30, 50]
    order = interleave([24, 8])
    assert order[:4] == [0, 0, 1, 0] and order.count(0) == 24 and order.count(1) == 8
    for k in range(1, len(order) + 1):  # every prefix holds each share to within one window
        assert abs(order[:k].count(1) - k * 8 / 32) < 1
    with pytest.raises(DataError, match="the mix gives a no window at weight 0.01: b has only 50 windows"):
        mix_counts([0.01, 0.99], [100, 50], ["a", "b"])


def test_mix_of_two_files(tmp_path):
    tok = byte_tokenizer()
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("a" * (16 * 40))  # 40 windows of 16 bytes, every token 'a'
    b.write_text("b" * (16 * 10))  # 10 windows
    got = load_windows(f"0.5*{a},0.5*{b}", tok, 16, CALIBRATION, bos=None, seed=3)
    kinds = ["a" if (w == tok.convert_tokens_to_ids("a")).all() else "b" for w in got.windows]
    assert kinds.count("a") == 10 and kinds.count("b") == 10 and kinds[:4] == ["a", "b", "a", "b"]
    assert [s["windows"] for s in got.record["sources"]] == [10, 10]
    assert [s["windows_available"] for s in got.record["sources"]] == [40, 10]
    assert got.record["sources"][0]["weight"] == 0.5 and "[10 windows]" in got.text
    third = load_windows(f"3*{a},1*{b}", tok, 16, EVALUATION, bos=None, max_windows=8)
    assert [s["windows"] for s in third.record["sources"]] == [6, 2] and third.windows.shape == (8, 16)


def test_mix_with_self_calibration(tmp_path, data_dir, cache):
    lm = tiny_random_llama()
    got = method_windows(lm, "0.5*wikitext2,0.5*self:4", 32, CALIBRATION, data_dir=data_dir, progress=False,
                         log=lambda _: None)
    wt, me = got.record["sources"]
    assert (wt["read"], wt["windows"], me["windows"], got.windows.shape) == ("wikitext2 validation", 4, 4, (8, 32))
    valid = make_windows(tokenize(load_text("validation", data_dir), lm.tokenizer), 32)
    from_wt = [w for w in got.windows if any(np.array_equal(w, v) for v in valid)]
    assert len(from_wt) == 4  # never the test split: every WikiText window is a validation window


# --- BOS-aware windows ----------------------------------------------------------------------------------


def test_bos_windows_predict_seq_len_minus_one_tokens():
    tok = _bos_tokenizer()
    assert tok("x")["input_ids"][0] == 257 and bos_id(tok) == 257
    text = _prose(200)
    w = text_windows(text, tok, 32, bos=257)
    body = tokenize(text, tok, special_tokens=False)
    assert (w[:, 0] == 257).all() and w.shape == (len(body) // 31, 32)
    assert np.array_equal(w[:, 1:].reshape(-1), body[: w.shape[0] * 31])
    plain = byte_tokenizer()
    assert bos_id(plain) is None
    assert np.array_equal(text_windows(text, plain, 32, bos=bos_id(plain)), make_windows(tokenize(text, plain), 32))


def test_bos_from_tokenizer_config_only(tmp_path):
    """A tokenizer.json that adds nothing, with ``add_bos_token: true`` in tokenizer_config.json:
    both sides start windows with BOS; ``load_model`` makes the tokenizer add it too, so the
    tokenizer an export writes says so by itself."""
    lm = tiny_random_llama()
    folder = tmp_path / "model"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": True, "bos_token": "<|endoftext|>"}))
    device = load_tokenizer(folder)
    assert len(device.encode("x").ids) == 1  # tokenizer.json adds nothing
    assert bos_id(device, tokenizer_config(folder)) == 256
    from transformers import AutoTokenizer

    assert bos_of(AutoTokenizer.from_pretrained(folder)) == 256  # read from the source folder's file
    loaded = load_model(str(folder))
    assert loaded.tokenizer("x")["input_ids"][0] == 256
    saved = tmp_path / "saved"
    loaded.tokenizer.save_pretrained(saved)
    assert bos_id(load_tokenizer(saved)) == 256  # no config needed: the post-processor adds it


@pytest.mark.parametrize("make", [_bos_tokenizer, byte_tokenizer], ids=["bos", "no-bos"])
def test_device_and_torch_windows_are_equal(tmp_path, make, data_dir):
    from transformers import AutoTokenizer

    folder = tmp_path / "tok"
    make().save_pretrained(folder)
    method, device = AutoTokenizer.from_pretrained(folder), load_tokenizer(folder)
    f = _jsonl(tmp_path / "rows.jsonl", [{"text": _prose(80, i)} for i in range(6)])
    for spec, role in ((str(f), EVALUATION), ("wikitext2", EVALUATION), ("wikitext2", CALIBRATION)):
        m = load_windows(spec, method, 48, role, bos=bos_of(method), data_dir=data_dir)
        d = load_windows(spec, device, 48, role, bos=bos_id(device, tokenizer_config(folder)), data_dir=data_dir)
        assert np.array_equal(m.windows, d.windows) and m.record == d.record
        assert m.record["bos"] == (make is _bos_tokenizer) and (m.windows[:, 0] == 257).all() == (make is _bos_tokenizer)


def test_default_windows_unchanged(data_dir):
    """``wikitext2`` with a tokenizer that adds no BOS: today's windows, test split for evaluation."""
    tok = byte_tokenizer()
    got = load_windows("wikitext2", tok, 64, EVALUATION, bos=bos_id(tok), data_dir=data_dir, max_windows=5)
    assert np.array_equal(got.windows, make_windows(tokenize(load_text("test", data_dir), tok), 64, 5))
    assert got.text == "wikitext2 test" and got.record["sources"][0]["from"] == str(data_dir / "wiki.test.raw")


# --- the command line ---------------------------------------------------------------------------------


def test_ppl_on_a_bos_export(bos_export, tmp_path, capsys):
    f = tmp_path / "mine.txt"
    f.write_text(_prose(400))
    assert ppl_main([str(bos_export), "--data", str(f), "--seq-len", "32", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    n = len(_prose(400).encode()) // 31
    assert (res["bos"], res["windows"], res["tokens"], res["seq_len"]) == (True, n, n * 31, 32)
    assert res["data"]["spec"] == str(f) and res["data"]["bos_id"] == 257
    assert "windows start with BOS" in out[-2] and f"data: {f}" in out[-2]


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    cols = _jsonl(tmp_path / "cols.jsonl", [{"body": "x", "title": "y"}])
    empty = _jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": "  "}])
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\x00\x01\x02" * 50)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9 " * 40)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"text": \n')
    return {"cols": cols, "empty": empty, "binary": binary, "latin": latin, "bad_json": bad_json}


@pytest.mark.parametrize("key, message", [
    ("cols", "has no 'text' column: its columns are body, title; name the text (or chat 'messages') column as FILE:COLUMN"),
    ("cols:nope", "has no column 'nope': its columns are body, title"),
    ("empty", "gives no text"),
    ("binary", "holds NUL bytes: it is a binary file, not text"),
    ("latin", "is not UTF-8 text (byte 0xe9 at offset 3)"),
    ("bad_json", "line 2 of"),
])
def test_data_errors_through_ppl(bos_export, tmp_path, capsys, key, message):
    name, _, column = key.partition(":")
    spec = str(_bad_files(tmp_path)[name]) + (f":{column}" if column else "")
    assert message in _error(capsys, ppl_main([str(bos_export), "--data", spec, "--seq-len", "16"]))


@pytest.mark.parametrize("spec, message", [
    ("parquet:rows", "unknown data source kind 'parquet:'"),
    ("0.5*wikitext2,x*self:3", "bad weight 'x'"),
    ("self:3", "self:3 is text the model wrote itself"),
])
def test_spec_errors_through_the_commands(bos_export, tmp_path, capsys, spec, message):
    assert message in _error(capsys, ppl_main([str(bos_export), "--data", spec]))
    if spec != "self:3":  # refused before the model loads
        assert message in _error(capsys, train_main([str(tmp_path / "run"), "--model", "tiny-random-llama", "--data", spec]))
        assert not (tmp_path / "run").exists()
    code = ppl_main([str(bos_export), "--data", spec, "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 2 and json.loads(out[-1])["code"] == 2 and message in json.loads(out[-1])["error"]


def test_train_records_the_data(tmp_path, capsys):
    f = _jsonl(tmp_path / "mine.jsonl", [{"text": _prose(100, i)} for i in range(10)])
    run = tmp_path / "run"
    assert train_main([str(run), "--model", "tiny-random-llama", "--data", f"{f}:text", "--seq-len", "32",
                       "--calib-batches", "1", "--train-steps", "1", "--json"]) == 0
    cap = capsys.readouterr()
    res = json.loads(cap.out.strip().splitlines()[-1])
    training = json.loads((run / "recipe.json").read_text())["training"]
    assert res["data"] == training["data"]
    assert training["data"]["spec"] == f"{f}:text" and training["data"]["bos"] is False
    assert training["text"] == f"{f} (10 rows, column 'text')"
    assert training["train_windows"] + training["heldout"]["windows"] == training["data"]["windows"]
    assert f"data: {f} (10 rows, column 'text'): {training['data']['windows']} windows of 32 tokens" in cap.err


def test_run_sasq_data_keyword_and_explicit_windows(tmp_path):
    from sasq_edge.config import QuantConfig
    from sasq_edge.pipeline import run_sasq

    f = tmp_path / "mine.txt"
    f.write_text(_prose(300))
    cfg = QuantConfig.plain(seq_len=32, calib_batches=1, train_steps=1)
    state = run_sasq(tiny_random_llama(), cfg, data=str(f), progress=False).state
    assert state.training["data"]["spec"] == str(f) and state.training["text"] == str(f)
    windows = np.random.default_rng(0).integers(0, 256, (3, 32))
    state = run_sasq(tiny_random_llama(), cfg, data="no-such-source", windows=windows, progress=False).state  # windows win
    assert state.training["text"] == "windows given to run_sasq" and state.training["data"]["windows"] == 3


@pytest.mark.parametrize("module", ["train", "export", "ppl", "validate", "baseline"])
def test_help_documents_data(module, capsys):
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"sasq_edge.cli.{module}").main([*(["ort-minmax"] if module == "baseline" else []), "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--data SPEC" in out and "hf:NAME:CONFIG:SPLIT[:COLUMN]" in out and "0.5*wikitext2,0.5*self:64" in out
    assert ("--calib-data SPEC" in out) == (module == "baseline")


# --- the real model -----------------------------------------------------------------------------------


@pytest.mark.real_model
def test_smollm2_chat_template_and_unchanged_wikitext_windows(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    wikitext = Path(__file__).resolve().parents[1].parent / "shared" / "assets" / "wikitext2"
    if not (wikitext / "wiki.test.raw").is_file():
        pytest.skip("WikiText-2 assets not found")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert bos_of(tok) is None  # SmolLM2 adds no BOS
    chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]
    f = _jsonl(tmp_path / "chat.jsonl", [{"messages": chat}] * 40)
    lm = LoadedModel(None, tok, "smollm2")
    got = method_windows(lm, str(f), 64, CALIBRATION)
    rendered = tok.apply_chat_template(chat, tokenize=False)
    assert rendered.startswith("<|im_start|>system\n") and "<|im_start|>user\nWhat is 2+2?<|im_end|>" in rendered
    assert tok.convert_tokens_to_ids("<|im_start|>") in got.windows[0]  # special tokens of the template map to their ids
    old = make_windows(tokenize(load_text("test", wikitext), tok), 512)
    new = load_windows("wikitext2", tok, 512, EVALUATION, bos=bos_of(tok), data_dir=wikitext)
    device = load_tokenizer(smollm2_dir)
    dev = load_windows("wikitext2", device, 512, EVALUATION, bos=bos_id(device, tokenizer_config(smollm2_dir)), data_dir=wikitext)
    assert new.record["sources"][0]["tokens"] == 304_986 and np.array_equal(old, new.windows)
    assert np.array_equal(dev.windows, new.windows)

