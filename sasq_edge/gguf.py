"""A GGUF file as a safetensors checkpoint folder, converted one tensor at a time, so that a model
given as ``.gguf`` can be read one decoder layer at a time like any other checkpoint.

transformers loads a GGUF file whole: every tensor is dequantized to float32 and the model built
from them, which for a 1.5B model peaks near 9 GB. ``materialize`` runs the same dequantization and
the same name mapping (transformers' ``TensorProcessor`` for the architecture and its GGUF-to-HF
weights map, gguf-py's ``dequantize``) tensor by tensor and writes float32 safetensors shards, the
config, the tokenizer and the generation config; the folder is cached (keyed by the file's path,
size and modification time) and reused by later runs. Its tensors are the ones
``from_pretrained(..., gguf_file=...)`` puts in the model, bit for bit (``tests/test_gguf.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from sasq_edge.errors import ModelLoadError

SHARD_BYTES = 2 * 2**30
CACHE_ENV = "SASQ_GGUF_CACHE"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "sasq-edge" / "gguf"))


def _key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]


def materialized(path: str | os.PathLike) -> Path:
    """Where ``materialize`` puts (or has put) the folder of the GGUF file ``path``."""
    path = Path(path).expanduser()
    return cache_root() / f"{path.stem}-{_key(path)}"


def materialize(path: str | os.PathLike, *, progress: bool = True, log=None) -> Path:
    """The safetensors folder of the GGUF file ``path`` (module docstring), made once and cached."""
    from gguf import GGUFReader, dequantize
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map, read_field

    from sasq_edge.models import check_gguf

    path = Path(path).expanduser()
    out = materialized(path)
    if (out / "config.json").is_file():
        if log:
            log(f"reusing {out} (the safetensors folder of {path.name}, made by an earlier run)")
        return out
    check_gguf(path)
    source, name = str(path.resolve().parent), path.name
    config = AutoConfig.from_pretrained(source, gguf_file=name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    reader = GGUFReader(str(path))
    architecture = read_field(reader, "general.architecture")[0]
    parsed = {"config": config.to_dict(), "tensors": {}}
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
    mapping = get_gguf_hf_weights_map(skeleton, processor)
    wanted = set(skeleton.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        from safetensors.torch import save_file

        shard, size, index, seen = {}, 0, {}, set()

        def flush() -> None:
            nonlocal shard, size
            if shard:
                file = f"model-{len(set(index.values())):05d}.safetensors"
                save_file(shard, str(stage / file), metadata={"format": "pt"})
                index.update({k: file for k in shard})
                shard, size = {}, 0

        for tensor in tqdm(reader.tensors, desc=f"convert {path.name}", unit="tensor", disable=not progress):
            weights = dequantize(tensor.data, tensor.tensor_type)
            result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping=mapping, parsed_parameters=parsed)
            if result.name not in mapping:
                continue
            key = mapping[result.name]
            t = torch.from_numpy(np.copy(result.weights)).to(torch.float32)
            if not torch.isfinite(t).all():
                raise ModelLoadError(f"{path}: tensor {tensor.name} ({key}) holds NaN or Inf: the file is damaged")
            shard[key] = t
            seen.add(key)
            size += t.numel() * 4
            if size >= SHARD_BYTES:
                flush()
        flush()
        tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
        missing = sorted(k for k in wanted - seen - tied if not k.endswith("rotary_emb.inv_freq"))
        if missing:
            raise ModelLoadError(f"{path}: no tensor for {missing[0]} ({len(missing)} missing): the GGUF file does not hold "
                                 "the whole model")
        (stage / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=1))
        config.save_pretrained(stage)
        AutoTokenizer.from_pretrained(source, gguf_file=name).save_pretrained(stage)
        try:
            GenerationConfig.from_pretrained(source, gguf_file=name).save_pretrained(stage)
        except (OSError, ValueError):
            pass
        (stage / "gguf_source.json").write_text(json.dumps({"gguf": str(path.resolve()), "size": path.stat().st_size}))
        os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if log:
        log(f"converted {path.name} to a safetensors folder {out} (once: later runs reuse it)")
    return out
