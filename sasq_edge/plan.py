"""How a run trains, chosen from the model's config and the memory free, before any weight is read:
block by block on the whole model in memory (then the end-to-end steps where they fit), block by
block reading one decoder layer at a time from the checkpoint, or a refusal with the numbers where
not even one block fits. ``sasq-export`` and ``sasq-train`` print the one line it returns."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from sasq_edge import memory
from sasq_edge.config import QuantConfig
from sasq_edge.errors import ConfigError

GIB = memory.GIB
FIT_FRACTION = 0.85  # the share of the free memory an estimate may take (the estimates leave out allocator slack)


@dataclass(frozen=True)
class Plan:
    config: QuantConfig  # train_steps 0 where the end-to-end pass does not fit or cannot run
    layerwise: Path | None  # the checkpoint folder read one decoder layer at a time, or None: the whole model
    line: str  # what runs and why, one line


def _local_folder(spec: str) -> Path | None:
    from sasq_edge.layerwise import INDEX_FILE, SINGLE_FILE

    path = Path(spec).expanduser()
    return path if path.is_dir() and ((path / SINGLE_FILE).is_file() or (path / INDEX_FILE).is_file()) else None


def blockwise_plan(spec: str, cfg: QuantConfig, *, forced_layerwise: bool = False, trust_remote_code: bool = False,
                   free: int | None = None, check: bool = True, whole_export: bool = False, config=None) -> Plan:
    """The plan of a block-wise run of ``cfg`` on the model ``spec`` with ``free`` bytes of memory
    (``MemAvailable`` when None). A local safetensors folder is read one decoder layer at a time
    unless end-to-end steps follow (they need the whole model) or ``whole_export`` (an export only
    the whole model can write: the traced graph); otherwise, and for a hub id or a GGUF file, the
    whole model loads when it fits. ``check=False`` (``--no-memory-check``) never refuses.
    ``config``: the model's transformers config, when the caller has read it already."""
    from sasq_edge.models import load_config

    config = config if config is not None else load_config(spec, trust_remote_code=trust_remote_code)
    free = memory.host_available() if free is None else free
    budget = None if free is None else int(FIT_FRACTION * free)
    whole = memory.estimate_blockwise(config, cfg, whole=True)
    one = memory.estimate_blockwise(config, cfg, whole=False)
    layers = memory.Sizes.of(config).layers
    what = f"{layers} blocks x {cfg.block_steps} steps on {cfg.block_windows} windows of {cfg.seq_len} tokens"
    have = "" if free is None else f" of {free / GIB:.1f} GiB free"
    local = _local_folder(spec)
    if forced_layerwise and local is None:
        raise ConfigError(f"--layerwise reads a local folder of safetensors weights; {spec!r} is not one: download it first")
    too_big = budget is not None and whole.peak > budget
    gguf = Path(spec).expanduser().suffix == ".gguf"
    by_layer = (local is not None or gguf) and not whole_export and (not cfg.train_steps or too_big)
    if by_layer and local is None:  # a GGUF file: its safetensors folder, converted once and cached
        from sasq_edge.gguf import materialize

        local = materialize(spec, log=lambda line: print(f"sasq: {line}", file=sys.stderr, flush=True))
    if forced_layerwise or by_layer:
        if check and budget is not None and one.peak > budget:
            raise ConfigError(f"even one decoder block does not fit: block-wise training needs about {one.peak / GIB:.1f} GiB "
                              f"({one.summary()}), this machine has {free / GIB:.1f} GiB free: use fewer --block-windows "
                              f"(now {cfg.block_windows}) or a shorter --seq-len (now {cfg.seq_len}), or a machine with more "
                              "memory (--no-memory-check trains anyway)")
        why = "--layerwise" if forced_layerwise else f"the whole model needs about {whole.peak / GIB:.1f} GiB{have}" \
            if too_big else "one block at a time is all the pass needs"
        skipped = f", no end-to-end steps (they need the whole model; {cfg.train_steps} asked)" if cfg.train_steps else ""
        return Plan(dataclasses.replace(cfg, train_steps=0), local,
                    f"training block by block, one layer read at a time ({what}; the pass needs about {one.peak / GIB:.1f} GiB, the "
                    f"export more){skipped}: {why}")
    if check and budget is not None and whole.peak > budget:
        raise ConfigError(f"block-wise training of {spec} in memory needs about {whole.peak / GIB:.1f} GiB ({whole.summary()}), "
                          f"this machine has {free / GIB:.1f} GiB free: save it as a safetensors folder "
                          "(save_pretrained) and pass the folder, which is read one decoder layer at a time "
                          "(--no-memory-check trains anyway)")
    line = f"training block by block ({what}; the whole model and the pass need about {whole.peak / GIB:.1f} GiB{have})"
    if not cfg.train_steps:
        return Plan(cfg, None, line)
    e2e = memory.estimate(config, dataclasses.replace(cfg, smooth_alpha=None, smooth_learn=False))  # scales alone train
    if check and budget is not None and e2e.peak > budget:
        return Plan(dataclasses.replace(cfg, train_steps=0), None,
                    f"{line}; no end-to-end steps: they need about {e2e.peak / GIB:.1f} GiB{have}")
    return Plan(cfg, None, f"{line}, then {cfg.train_steps} end-to-end steps (about {e2e.peak / GIB:.1f} GiB)")


def block_progress(quiet: bool = False):
    """An ``on_block`` callback that prints one line a block (stderr): the block and the total,
    its seconds, the time left at the mean pace so far, and its reconstruction error."""
    import sys

    from tqdm.auto import tqdm

    spent = []

    def show(rec, total: int) -> None:
        spent.append(rec.seconds)
        if quiet:
            return
        done = rec.index + 1
        left = sum(spent) / len(spent) * (total - done)  # the blocks' own pace (the capture and search are done)
        alpha = "" if rec.alpha is None else f", alpha {rec.alpha:g}"
        tqdm.write(f"block {done}/{total}: {rec.seconds:.1f} s, about {left / 60:.1f} min left; reconstruction error "
                   f"{rec.trained_error:.3e} (calibrated {rec.ptq_error:.3e}){alpha}", file=sys.stderr)

    return show


def model_source(spec: str, folder: Path) -> str:
    """What a state trained on ``folder`` records as its model: the folder itself, also for a
    ``.gguf`` file read through its converted folder (its config, saved from the GGUF metadata,
    fingerprints differently from the one transformers parses from the file, while every tensor is
    the same: ``sasq-validate`` rebuilds the twin from the folder)."""
    return str(Path(folder).resolve())


def alpha_summary(state) -> str | None:
    """``smooth alpha auto -> A (...)``: what the block-wise search chose, from the state's record."""
    search = (state.training.get("blockwise") or {}).get("alpha_search")
    if not search:
        return None
    alpha = state.method["smooth_alpha"]
    tried = ", ".join(f"{float(a):g}: {kl:.4f}" for a, kl in search.items())
    return f"smooth alpha auto -> {alpha:g} (mean KL from the float model on the search window: {tried})"
