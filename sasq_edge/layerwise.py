"""Models bigger than memory, one decoder layer at a time.

``LayerwiseModel`` is the model's skeleton on the meta device (no memory) whose modules are filled
from the checkpoint's safetensors files on demand, one decoder layer (or the embedding, the final
norm, the head) at a time, in float32, with the scale state's smoothing factors folded in exactly
as ``apply_state`` folds them into a whole model; ``release`` empties a layer again. The fused
exporter (``exporters.fused``) reads it like a model and streams the INT8 weights to the data file,
so exporting holds one layer, not the model: the codes are bit-identical to the whole-model path's
(the weights digest of the scale state checks it).

``calibrate_layerwise`` is PTQ the same way: the calibration windows' hidden states go through
the model one layer at a time (the model's own forward, each decoder layer materialised just
before it runs and emptied right after), with SmoothQuant factors computed and folded and the
activation observers fed per layer. Training the scales of such a model needs the whole model:
a GPU.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from runtime.families import arch_spec
from runtime.io import parse_json
from runtime.state import ScaleState
from sasq_edge.errors import ModelLoadError
from sasq_edge.models import check_finite
from sasq_edge.state import digest_entry

INDEX_FILE, SINGLE_FILE = "model.safetensors.index.json", "model.safetensors"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
           "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own bound on a header's size


class Checkpoint:
    """The tensors of a Hugging Face checkpoint folder, read one at a time from its safetensors."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._headers: dict[str, tuple[dict, int]] = {}
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.folder / SINGLE_FILE).is_file():
            weight_map = {k: SINGLE_FILE for k in self._header(SINGLE_FILE)[0] if k != "__metadata__"}
        else:
            raise ModelLoadError(f"{self.folder} holds no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}): "
                                 "layer-by-layer loading reads safetensors checkpoints only")
        self.weight_map: dict[str, str] = weight_map

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _header(self, file: str) -> tuple[dict, int]:
        """The safetensors header of ``file`` (name -> dtype, shape, data offsets) and where its
        data starts."""
        if file not in self._headers:
            path = self.folder / file
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                if size > HEADER_LIMIT or size > path.stat().st_size - 8:
                    raise ModelLoadError(f"{path} is not a safetensors file (its header claims {size} bytes): download it again")
                try:
                    header = parse_json(f.read(size))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    header = None
            if not isinstance(header, dict):
                raise ModelLoadError(f"{path} has a damaged safetensors header: download it again")
            self._headers[file] = (header, 8 + size)
        return self._headers[file]

    def shape(self, name: str) -> list[int]:
        """The shape of ``name`` from its file's header (no data read)."""
        file = self.weight_map[name]
        return list(self._header(file)[0][name]["shape"])

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name``, read with plain file reads into memory of its own. Not through a
        memory map: mapped checkpoint pages, once read, count in the process's resident memory
        until the mapping closes, so a layer-by-layer pass over a 13 GB checkpoint would look
        (and, under memory pressure, behave) like a 13 GB process."""
        file = self.weight_map[name]
        header, base = self._header(file)
        info = header[name]
        if info["dtype"] not in _DTYPES:
            raise ModelLoadError(f"{name} in {file} is {info['dtype']}: layer-by-layer loading reads float and integer tensors")
        dtype, shape = _DTYPES[info["dtype"]], info["shape"]
        start, end = info["data_offsets"]
        if end == start:
            return torch.empty(shape, dtype=dtype)
        with open(self.folder / file, "rb") as f:
            f.seek(base + start)
            data = bytearray(f.read(end - start))
        if len(data) != end - start:
            raise ModelLoadError(f"{self.folder / file} is truncated at {name}: download it again")
        return torch.frombuffer(data, dtype=dtype).reshape(shape)


class LayerwiseModel:
    """A model read from ``folder`` one piece at a time (see the module docstring). It offers the
    methods the fused exporter's weight source has (``module``, ``embedding``, ``head``, ``tied``,
    ``rotary``, ``release``), plus ``config`` and ``generation_config``."""

    def __init__(self, folder: str | os.PathLike, smooth: dict[str, np.ndarray] | None = None, *,
                 trust_remote_code: bool = False) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

        self.folder = Path(folder)
        config = AutoConfig.from_pretrained(str(self.folder), trust_remote_code=trust_remote_code)
        spec = arch_spec(config.model_type)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
        self.model.eval()
        self.config = self.model.config
        try:
            self.generation_config = GenerationConfig.from_pretrained(str(self.folder))
        except OSError:
            self.generation_config = None
        self.ckpt = Checkpoint(self.folder)
        self._check_names()
        self.blocks = spec.blocks
        self.smooth = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in (smooth or {}).items()}
        self.loaded: set[str] = set()
        self.peak_loaded = 0  # the most pieces held at once (1 while exporting: the current layer)

    def _check_names(self) -> None:
        """The checkpoint's tensor names and shapes (its headers; no data read) against the
        config's model: ``models.check_tensor_names``."""
        from sasq_edge.models import check_tensor_names

        params = dict(self.model.named_parameters())
        buffers = {n for n, _ in self.model.named_buffers()}
        tied = {"lm_head.weight"} if self.config.tie_word_embeddings else set()
        missing = [n for n in params if n not in self.ckpt and n not in tied]
        unexpected = [n for n in self.ckpt.weight_map if n not in params and n not in buffers and n not in tied]
        mismatched = [(n, shape, list(params[n].shape)) for n in params if n in self.ckpt
                      and (shape := self.ckpt.shape(n)) != list(params[n].shape)]
        check_tensor_names(str(self.folder), missing, unexpected, mismatched)

    # --- loading and emptying pieces ---------------------------------------------------------

    def _piece(self, name: str) -> str:
        """The unit ``name`` belongs to: a decoder layer (``model.layers.3``) or a top-level module."""
        prefix = self.blocks + "."
        if name.startswith(prefix):
            return prefix + name[len(prefix):].split(".", 1)[0]
        return name

    def _tensor(self, name: str) -> torch.Tensor:
        if name in self.ckpt:
            return self.ckpt.get(name)
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return self.ckpt.get(self._embedding_name() + ".weight")
        raise ModelLoadError(f"{self.folder} has no tensor {name!r}: the checkpoint does not match its config.json")

    def _embedding_name(self) -> str:
        emb = self.model.get_input_embeddings()
        return next(n for n, m in self.model.named_modules() if m is emb)

    def load(self, piece: str) -> nn.Module:
        """Fill ``piece`` with its float32 weights (smoothing factors of its groups folded in)."""
        module = self.model.get_submodule(piece)
        if piece in self.loaded:
            return module
        module.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in module.named_parameters():
                t = self._tensor(f"{piece}.{name}")
                check_finite(str(self.folder), f"{piece}.{name}", t)
                p.copy_(t.to(torch.float32))
        self.loaded.add(piece)
        self.peak_loaded = max(self.peak_loaded, len(self.loaded))
        mine = {k: v for k, v in self.smooth.items() if k.startswith(piece + ".")}
        if mine:
            from sasq_edge.smooth import fold_factors

            fold_factors(self.model, mine)  # sorted order, as apply_state folds: the same float32 weights
        return module

    def release(self, piece: str) -> None:
        piece = self._piece(piece)
        if piece in self.loaded:
            self.model.get_submodule(piece).to("meta")
            self.loaded.discard(piece)

    @property
    def layers(self) -> int:
        return len(self.model.get_submodule(self.blocks))

    # --- the weight source of the fused exporter ----------------------------------------------

    def module(self, name: str) -> nn.Module:
        self.load(self._piece(name))
        return self.model.get_submodule(name)

    def embedding(self) -> nn.Module:
        return self.load(self._embedding_name())

    def head(self) -> tuple[str, nn.Module]:
        head = self.model.get_output_embeddings()
        name = next(n for n, m in self.model.named_modules() if m is head)
        return name, self.load(name)

    def tied(self) -> bool:
        return bool(self.config.tie_word_embeddings)

    def stem(self) -> None:
        """Make the model's own forward runnable around the blocks: the embedding and the final
        norm read from the checkpoint, the rotary tables computed from the config."""
        self.model.model.rotary_emb = self.rotary()
        self.embedding()
        norm = getattr(self.model.model, "norm", None)
        if norm is not None:
            self.load(next(n for n, m in self.model.named_modules() if m is norm))

    def rotary(self) -> nn.Module:
        rot = self.model.model.rotary_emb
        return type(rot)(config=self.config)  # its tables computed from the config, on the CPU

    def parameter_bytes_fp32(self) -> int:
        return 4 * sum(p.numel() for p in self.model.parameters())

    def fingerprint(self) -> str:
        from sasq_edge.state import model_fingerprint

        return model_fingerprint(self.model)


def estimate_fp32_bytes(config) -> int:
    """float32 bytes of a model from its config alone (a meta-device skeleton: no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return 4 * sum(p.numel() for p in model.parameters())


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def fits_in_memory(config, fraction: float = 0.6) -> bool:
    """Whether the whole model in float32 takes less than ``fraction`` of the available memory
    (export and evaluation need a few copies of pieces of it on top)."""
    avail = available_bytes()
    return avail is None or estimate_fp32_bytes(config) < fraction * avail


def check_state_matches(lm: LayerwiseModel, state: ScaleState) -> None:
    """The fingerprint check of ``apply_state``, on the skeleton (the weights digest is checked
    by the exporter as it writes the weights)."""
    from sasq_edge.errors import StateError

    fp = lm.fingerprint()
    if fp != state.fingerprint:
        raise StateError(f"scales were trained on a different model (fingerprint {state.fingerprint}, this model {fp}, "
                         f"trained on {state.model_source!r}): train scales for this model with sasq-train")


# --- calibration, one layer at a time -------------------------------------------------------------

LAYERWISE_ALPHA = 0.5  # "auto" cannot search on the whole model here: SmoothQuant's own default


def _slice(value, j: int, n: int):
    """Window ``j`` of a forward argument batched over ``n`` windows (other values unchanged)."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
        return value[j:j + 1]
    if isinstance(value, tuple):
        return tuple(_slice(v, j, n) for v in value)
    return value


class _LayerwiseCalibration:
    def __init__(self, lm: LayerwiseModel, config) -> None:
        self.lm, self.config = lm, config
        self.scales: dict[str, float] = {}
        self.trunc: dict[str, float] = {}
        self.factors: dict[str, torch.Tensor] = {}
        self.digest_items: list = []
        self.rotation: dict[str, int] = {}

    def _windows(self, layer: nn.Module, hidden: torch.Tensor, args, kwargs) -> None:
        """Run the layer on every window, one window at a time (the in-memory path calibrates
        window by window: its observers average one scale per window). ``layer.forward``, not
        ``layer(...)``: this runs inside the layer's own hooks."""
        n = hidden.shape[0]
        for j in range(n):
            layer.forward(hidden[j:j + 1], *[_slice(a, j, n) for a in args], **{k: _slice(v, j, n) for k, v in kwargs.items()})

    @torch.no_grad()
    def pre(self, piece: str, layer: nn.Module, args, kwargs) -> None:
        """Before the layer runs on the whole batch: fill it, fold its SmoothQuant factors, swap
        in its quantizers and calibrate them; the layer then runs in float mode."""
        hidden = args[0] if args else kwargs.pop("hidden_states")
        args = args[1:] if args else args
        if "hidden_states" in kwargs:
            kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        from sasq_edge.calibrate import observing, set_observed
        from sasq_edge.modules import prepare_block, set_mode
        from sasq_edge.smooth import fold_factors, recording_absmax, smooth_groups, smoothquant_factors

        lm, config, model = self.lm, self.config, self.lm.model
        lm.load(piece)
        if config.smooth_alpha is not None:
            groups = {k: g for k, g in smooth_groups(model, config.targets).items() if k.startswith(piece + ".")}
            with recording_absmax(model, groups) as stats:
                self._windows(layer, hidden, args, kwargs)
            factors = smoothquant_factors(model, groups, stats, float(config.smooth_alpha))
            fold_factors(model, factors)
            self.factors.update(factors)
        layers = {name: model.get_submodule(name) for name in prepare_block(model, piece, config)}
        set_mode(layer, "float")
        with observing(layers, config) as observers:
            self._windows(layer, hidden, args, kwargs)
        self.scales.update(set_observed(layers, observers))
        for name, q in layers.items():
            self.digest_items.append(digest_entry(name, q))
            if q.rotation > 1:
                self.rotation[name] = q.rotation
            if q.act_quant.trunc is not None:  # soft truncation
                self.trunc[name] = float(q.act_quant.trunc)


def calibrate_layerwise(lm: LayerwiseModel, config, windows: np.ndarray, model_source: str,
                        progress: bool = True) -> ScaleState:
    """PTQ of a model read layer by layer: SmoothQuant factors (``config.smooth_alpha``; ``auto``
    becomes ``LAYERWISE_ALPHA``), then the activation scales, from the calibration ``windows``
    (``(n, T)`` token ids, ``config.calib_batches`` of them). Holds one decoder layer and the
    windows' hidden states at a time. Returns the state; no training (that needs the whole model)."""
    import dataclasses

    from tqdm.auto import tqdm

    from runtime.state import weights_digest
    from sasq_edge.state import model_fingerprint

    if config.train_steps:
        raise ValueError("layer-by-layer calibration does not train: use train_steps=0")
    if config.smooth_alpha == "auto":
        config = dataclasses.replace(config, smooth_alpha=LAYERWISE_ALPHA, smooth_learn=False)
    config = dataclasses.replace(config, smooth_learn=False)
    cal = _LayerwiseCalibration(lm, config)
    model = lm.model
    model.model.rotary_emb = lm.rotary()
    lm.embedding()
    norm_name = next(n for n, m in model.named_modules() if m is getattr(model.model, "norm", None))
    lm.load(norm_name)
    blocks = model.get_submodule(lm.blocks)
    bar = tqdm(total=len(blocks), desc="calibrate layer by layer", unit="layer", disable=not progress)
    handles = []
    for i, layer in enumerate(blocks):
        piece = f"{lm.blocks}.{i}"

        def pre(module, args, kwargs, piece=piece):
            cal.pre(piece, module, args, dict(kwargs))

        def post(module, args, kwargs, output, piece=piece):
            lm.release(piece)  # the layer's output is computed: empty it
            bar.update(1)

        handles += [layer.register_forward_pre_hook(pre, with_kwargs=True), layer.register_forward_hook(post, with_kwargs=True)]
    try:
        with torch.no_grad():
            hidden = model.model(input_ids=torch.from_numpy(np.ascontiguousarray(windows)), use_cache=False).last_hidden_state
            if config.lm_head:
                from sasq_edge.calibrate import make_observer, set_observed
                from sasq_edge.modules import QuantLinear

                name, head = lm.head()
                q = QuantLinear(head, config.deploy.act, config.deploy.weight, config.truncation)
                obs = make_observer(config, config.deploy.act)
                for j in range(hidden.shape[0]):
                    obs.update(hidden[j:j + 1])
                cal.scales.update(set_observed({name: q}, {name: obs}))
                if q.act_quant.trunc is not None:
                    cal.trunc[name] = float(q.act_quant.trunc)
                cal.digest_items.append(digest_entry(name, q))
    finally:
        for h in handles:
            h.remove()
        bar.close()
    training = {"steps": 0, "layerwise": True, "calib_windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
                "peak_pieces_loaded": lm.peak_loaded}
    factors = {k: v.numpy() for k, v in cal.factors.items()}
    return ScaleState(config.profile, cal.scales, model_fingerprint(model), model_source, cal.trunc, factors,
                      config.embedding, config.to_dict(), training, weights_digest(cal.digest_items), rotation=cal.rotation)


LAYERWISE_ABOVE = 2 * 2**30  # float32 bytes above which a run that trains nothing reads layer by layer


def should_go_layerwise(spec: str, forced: bool, trust_remote_code: bool = False, training: bool = True) -> Path | None:
    """The checkpoint folder to read layer by layer: when asked (``forced``), or when ``spec`` is a
    local folder of safetensors whose float32 model would not fit in memory, or, for a run that
    trains nothing (export with scales, PTQ), is over ``LAYERWISE_ABOVE``; else None (load the
    whole model)."""
    from transformers import AutoConfig

    path = Path(spec).expanduser()
    local = path.is_dir() and ((path / SINGLE_FILE).is_file() or (path / INDEX_FILE).is_file())
    if forced and not local:
        raise ModelLoadError(f"--layerwise reads a local folder of safetensors weights; {spec!r} is not one: download it first")
    if not local:
        return None
    if forced:
        return path
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if not fits_in_memory(config) or (not training and estimate_fp32_bytes(config) > LAYERWISE_ABOVE):
        return path
    return None


def wants_samples(data: str | None) -> bool:
    """Whether the ``--data`` spec has a ``self`` source (text sampled from the float model)."""
    from runtime.sources import parse_data_spec

    return data is not None and any(s.kind == "self" for s in parse_data_spec(data).sources)


def layerwise_data(data: str | None) -> str | None:
    """``data`` for a layer-by-layer run that cannot hold the whole float model even to sample text
    from it: the default mix (``DEFAULT_CALIBRATION_SPEC``) falls back to WikiText-2 alone, said on
    stderr; any other spec with a ``self`` source is refused."""
    import sys

    from runtime.sources import DEFAULT_CALIBRATION_SPEC, DEFAULT_SPEC
    from sasq_edge.errors import ConfigError

    if not wants_samples(data):
        return data
    if data == DEFAULT_CALIBRATION_SPEC:
        print(f"sasq: the whole float model does not fit in memory to sample text from: calibrating on {DEFAULT_SPEC} "
              "instead of the default mix (--data chooses other text)", file=sys.stderr, flush=True)
        return DEFAULT_SPEC
    raise ConfigError(f"--data {data}: self: samples text from the whole float model, which does not fit in this machine's "
                      "memory: give text (a file, a hub dataset, wikitext2), or run on a machine it fits")


SAMPLER_FRACTION = 0.7  # the share of the free memory the sampler's weights may take (its KV cache and slack beside)
# float32 weights above which the sampled text comes from a bf16 copy (``bf16_sampler``) where the CPU
# computes bf16 natively: the float32 model was the run's peak (6 GB of Qwen2.5-Coder-1.5B's 8.8 GB)
SAMPLER_BF16_ABOVE = 2 * 2**30


def native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX512-BF16 or AMX-BF16 on x86, the
    BF16 extension on ARM). Elsewhere torch emulates them: measured with oneDNN held to AVX2, a
    decode-shaped bf16 product took 2.1x, a prefill-shaped one 8.8x the float32 time."""
    from runtime.profiles import cpu_features

    machine, flags = cpu_features()
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def bf16_sampler(folder: Path, *, trust_remote_code: bool = False) -> nn.Module:
    """The model of ``folder`` in bf16 for sampling text, built one decoder layer at a time (each
    read in float32, then cast), so the float32 model is never whole in memory: half its weights.
    Measured on Qwen2.5-Coder-1.5B: 2.6 GB instead of 6.2, next-token KL from the float32 model
    0.0006 nats, top-1 agreement 98 %, WikiText-2 perplexity 19.70 against 19.70 (dynamic INT8
    linears, tried first: KL 0.59, perplexity 32.9; bench/results/blockwise.md)."""
    lw = LayerwiseModel(folder, trust_remote_code=trust_remote_code)
    lw.stem()
    if lw.tied():
        lw.model.tie_weights()  # the head reads the embedding table just loaded
    else:
        lw.head()
    for name in list(lw.loaded):
        lw.model.get_submodule(name).to(torch.bfloat16)
    for i in range(lw.layers):
        lw.load(f"{lw.blocks}.{i}").to(torch.bfloat16)
    return lw.model.to(torch.bfloat16).eval()


def sampler_model(folder: Path, tokenizer, source: str, *, trust_remote_code: bool = False, free: int | None = None,
                  log=None):
    """The model of ``folder`` as a ``LoadedModel``, loaded only to sample the ``self`` text of the
    calibration mix (the layer-by-layer pass then reads it one layer at a time again): above
    ``SAMPLER_BF16_ABOVE`` float32 bytes on a CPU with native bf16, or where the float32 model
    does not fit, the bf16 sampler (``bf16_sampler``); else the whole float32 model. None where
    the chosen one's weights take more than ``SAMPLER_FRACTION`` of the memory free. ``log`` is
    told when it is the bf16 one."""
    from transformers import AutoConfig

    from sasq_edge import memory
    from sasq_edge.models import LoadedModel, load_model

    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    need = 4 * memory.Sizes.of(config).params
    free = memory.host_available() if free is None else free
    fits = free is None or need <= SAMPLER_FRACTION * free
    if (need > SAMPLER_BF16_ABOVE and native_bf16()) or not fits:
        if free is not None and need / 2 > SAMPLER_FRACTION * free:
            return None
        if log is not None:
            log(f"sampling the mix's text from the model in bf16, read one layer at a time (float32 would take "
                f"{need / 2**30:.1f} GiB" + ("" if fits else f" of {free / 2**30:.1f} GiB free") + ")")
        return LoadedModel(bf16_sampler(folder, trust_remote_code=trust_remote_code), tokenizer, source)
    lm = load_model(str(folder), trust_remote_code=trust_remote_code)  # the checkpoint's checks included
    return LoadedModel(lm.model, tokenizer, source)


def run_layerwise(folder: Path, config, data_dir=None, data=None, *, trust_remote_code: bool = False,
                  progress: bool = True, on_block=None, source: str | None = None) -> ScaleState:
    """The model in ``folder`` one decoder layer at a time, on the calibration windows of ``data``
    (``layerwise_data``: no text sampled from the model): the block-wise pass when
    ``config.blockwise`` (its end-to-end steps need the whole model and are not run), else PTQ.
    ``source``: the model as the user named it, recorded in the state (a ``.gguf`` file whose
    converted folder this is); the folder itself by default."""
    import dataclasses

    from transformers import AutoTokenizer

    from runtime.data import sample_windows
    from runtime.sources import DEFAULT_CALIBRATION_SPEC, default_spec_for
    from sasq_edge.errors import ConfigError
    from sasq_edge.models import LoadedModel
    from sasq_edge.pipeline import training_data

    if config.train_steps and not config.blockwise:
        raise ConfigError(f"{folder} does not fit in memory as a float32 model, and training its scales end to end needs the "
                          "whole model: train block by block (--blockwise, the default recipes), on a GPU "
                          "(sasq-train --device cuda), or calibrate only (--train-steps 0)")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    source = source or str(folder.resolve())
    got, sampler = None, sampler_model(folder, tokenizer, source, trust_remote_code=trust_remote_code,
                                       log=lambda line: print(f"sasq: {line}", file=sys.stderr, flush=True)) \
        if wants_samples(data) else None
    if sampler is not None:  # the mix's sampled text, cached; the float model is let go before the pass
        if config.blockwise and data == DEFAULT_CALIBRATION_SPEC:  # the pass reads block_windows windows of it
            data = default_spec_for(config.block_windows)
        got = training_data(sampler, config, data_dir, data, progress=progress)
        del sampler
        gc.collect()
    lw = LayerwiseModel(folder, trust_remote_code=trust_remote_code)
    lm = LoadedModel(lw.model, tokenizer, source)
    if got is None:
        got = training_data(lm, config, data_dir, layerwise_data(data), progress=progress)
    if config.blockwise:
        from sasq_edge.blockwise import train_blockwise

        windows = sample_windows(got.windows, config.block_windows, config.seed)
        record = {"calib_windows": int(min(config.calib_batches, windows.shape[0])), "seq_len": int(windows.shape[1]),
                  "layerwise": True, "text": got.text, "data": got.record, "objective": "blockwise", "steps": 0}
        result = train_blockwise(lw, dataclasses.replace(config, train_steps=0), windows, lm.source, progress=progress,
                                 on_block=on_block, training=record)
        result.state.training["peak_pieces_loaded"] = lw.peak_loaded
        return result.state
    return calibrate_layerwise(lw, config, sample_windows(got.windows, config.calib_batches, config.seed), lm.source,
                               progress=progress)
