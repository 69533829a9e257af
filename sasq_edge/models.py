"""Loading the float model and its tokenizer from a hub id, a local folder, a ``.gguf`` file or
the built-in ``tiny-random-llama`` preset (seeded, offline, for tests and quick tries).

The config is read first (``config.json``, or a GGUF file's metadata), and a model that is not a
causal LM or whose architecture has no entry in ``runtime.families`` is refused before any weight
is read."""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from runtime.families import ARCHITECTURES, unsupported
from sasq_edge.data import honour_add_bos
from sasq_edge.errors import ModelLoadError

TINY_PRESET = "tiny-random-llama"


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str  # what to pass to load_model() to get the same model back

    @property
    def max_positions(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + ``<|endoftext|>``), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.model_max_length = 1 << 30
    return fast


def tiny_config(vocab_size: int = 257):
    """The ``LlamaConfig`` of ``tiny_random_llama`` (its byte tokenizer has 257 tokens)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=vocab_size - 1,
        bos_token_id=None,
        pad_token_id=None,
    )


def tiny_random_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """2 layers, hidden 64, GQA 4/2 heads, byte vocabulary; same weights for the same seed
    (drawn in float32, then cast to ``dtype``)."""
    from transformers import LlamaForCausalLM

    tokenizer = byte_tokenizer()
    config = tiny_config(len(tokenizer))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return LoadedModel(model.to(dtype).eval(), tokenizer, TINY_PRESET)


def _check_config(config, spec: str) -> None:
    """Refuse a model that has no causal-LM head or whose architecture the registry lacks, from
    its config alone: before any weight is read."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ModelLoadError(
            f"{spec!r} is a {config.model_type!r} model with no causal-LM head: sasq-edge quantizes "
            f"decoder-only causal LMs ({', '.join(sorted(ARCHITECTURES))})"
        )
    if config.model_type not in ARCHITECTURES:
        raise ModelLoadError(f"{spec!r}: {unsupported(config.model_type)}")


def check_gguf(path: Path) -> None:
    """Refuse a file that is not a whole GGUF file (a cut download) before transformers reads it."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror}") from None
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (it does not start with 'GGUF'): pass a .gguf model file")
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except Exception as e:  # the reader fails with ValueError/IndexError/... on a cut file
        raise ModelLoadError(f"{path} is not a complete GGUF file ({type(e).__name__} while reading its tensor table): "
                             "it is truncated or damaged; download it again") from None
    size = path.stat().st_size
    if end > size:
        raise ModelLoadError(f"{path} is truncated: its tensors end at byte {end}, the file has {size}: download it again")


def _locate(spec: str, trust_remote_code: bool) -> tuple[str, str, dict, Path]:
    """``(source for from_pretrained, the spec to record, its keyword arguments, the path)`` of a
    hub id, a local folder or a ``.gguf`` file; a path that is not there fails here."""
    path = Path(spec).expanduser()
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} not found: check the path")
        check_gguf(path)
        source, kwargs["gguf_file"] = str(path.resolve().parent), path.name
        spec = str(path.resolve())
    elif path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json: pass a Hugging Face model folder, a .gguf file or a hub id")
        source = spec = str(path.resolve())
    elif (spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep + os.sep in spec
          or ("/" in spec and Path(spec.split("/")[0]).is_dir())):  # "runs/model" with runs/ here: a path
        raise ModelLoadError(f"model folder {path} not found: check the path, or pass a hub id such as HuggingFaceTB/SmolLM2-135M")
    else:
        source = spec  # a hub id
    return source, spec, kwargs, path


@contextlib.contextmanager
def _load_errors(spec: str, source: str, path: Path) -> Iterator[None]:
    """What transformers raises on a model it cannot read, as one ``ModelLoadError`` line."""
    try:
        yield
    except pickle.UnpicklingError:
        raise ModelLoadError(f"refused to unpickle the weights of {spec!r}: the pickle holds objects other than tensors, and "
                             "sasq-edge loads pickled checkpoints only with weights_only=True; convert it to safetensors") from None
    except (OSError, ValueError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if source == spec and not path.exists():  # neither a local folder nor a model the hub gave us
            raise ModelLoadError(f"{spec!r} is not a local folder or file (nothing at {path.absolute()}), and loading it "
                                 f"as a hub id failed ({first[:160]}): check the path, or the hub id and the network") from None
        raise ModelLoadError(f"could not load model {spec!r}: {first}") from None


def load_config(spec: str, *, trust_remote_code: bool = False):
    """The transformers config of ``spec`` (``config.json``, or a GGUF file's metadata), checked
    like ``load_model`` checks it, without reading any weight: what memory estimates start from."""
    if spec == TINY_PRESET:
        return tiny_config()
    from transformers import AutoConfig

    source, spec, kwargs, path = _locate(spec, trust_remote_code)
    with _load_errors(spec, source, path):
        config = AutoConfig.from_pretrained(source, **kwargs)
    _check_config(config, spec)
    return config


# checkpoint tensors that are not parameters and that models of some transformers versions saved
BENIGN_EXTRA = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


def check_tensor_names(spec: str, missing, unexpected, mismatched) -> None:
    """Refuse, in one line naming the first tensor, a checkpoint that lacks a weight the config's
    model has (transformers would initialise it at random), holds one it has no place for (a layer
    the config lacks), or holds one of another shape. ``mismatched``: (name, checkpoint shape,
    model shape) triples."""
    unexpected = sorted(k for k in unexpected if not k.endswith(BENIGN_EXTRA))
    if missing:
        first = sorted(missing)[0]
        raise ModelLoadError(f"{spec}: the checkpoint lacks {first}" + (f" and {len(missing) - 1} more tensor(s)" if len(missing) > 1
                             else "") + ", which its config.json's model has: the download is incomplete or the config is "
                             "another model's; download it again")
    if unexpected:
        raise ModelLoadError(f"{spec}: the checkpoint holds {unexpected[0]}" + (f" and {len(unexpected) - 1} more tensor(s)"
                             if len(unexpected) > 1 else "") + ", for which its config.json's model has no place (a layer "
                             "the config lacks?): the config is another model's; fix config.json or download both again")
    if mismatched:
        name, got, want = sorted(mismatched, key=lambda m: m[0])[0]
        raise ModelLoadError(f"{spec}: {name} has shape {list(got)} in the checkpoint, the config's model needs {list(want)}: "
                             "the config is another model's; fix config.json or download both again")


def check_finite(spec: str, name: str, tensor: torch.Tensor) -> None:
    """Refuse a weight holding NaN or Inf (a corrupt download or a broken conversion)."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ModelLoadError(f"{spec}: {name} holds {bad} NaN or infinite value(s): the checkpoint is corrupt; download or "
                             "convert it again")


def load_model(spec: str, *, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load ``spec`` in eval mode, with its tokenizer, its weights in ``dtype`` (float32 by
    default; ``torch.bfloat16`` halves their memory for GPU training, see ``QuantLinear``)."""
    if spec == TINY_PRESET:
        return tiny_random_llama(dtype=dtype)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source, spec, kwargs, path = _locate(spec, trust_remote_code)
    with _load_errors(spec, source, path):
        # config.json, or a GGUF file's metadata (transformers reads no tensor data for it)
        config = AutoConfig.from_pretrained(source, **kwargs)
        _check_config(config, spec)
        model, info = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, output_loading_info=True,
                                                           ignore_mismatched_sizes=True, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    mismatched = [(m[0], m[1], m[2]) for m in info.get("mismatched_keys") or ()]
    check_tensor_names(spec, info.get("missing_keys") or (), info.get("unexpected_keys") or (), mismatched)
    for name, p in model.named_parameters():
        check_finite(spec, name, p)
    honour_add_bos(tokenizer)
    return LoadedModel(model.eval(), tokenizer, spec)
