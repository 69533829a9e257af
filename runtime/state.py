"""``ScaleState``: the contract between training and export, and its files. Numpy only.

A run folder holds ``scales.safetensors`` (one float32 scalar per quantized layer, keyed
``<module>.act_scale`` and, with soft truncation, ``<module>.act_trunc``; with smoothing, one
float32 vector of per-channel factors per preceding op, keyed ``<op>.smooth``) and ``recipe.json``
(format version, deploy profile, the Hadamard block of each layer whose input is rotated
(``runtime.rotation``), model fingerprint and source, the method's recipe, what the training did,
and a digest of the INT8 weights the scales were trained with). Nothing is pickled.

The state says what the deployed graph computes; the method (``sasq_edge``) reads its ``method``
recipe back into a ``QuantConfig``, and the exporter lowers a model with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import ConfigError, StateError
from runtime.io import OutputFolder, atomic_path, atomic_write_text, checkpoint, file_digest, parse_json
from runtime.profiles import DeployProfile, get_profile

FORMAT = "sasq-scale-state"
FORMAT_VERSION = 3  # 3: deploy.rotation; versions 1 and 2 (no rotation) still load
SCALES_FILE = "scales.safetensors"
RECIPE_FILE = "recipe.json"
EMBEDDINGS = ("float", "int8")
_SCALE, _TRUNC, _SMOOTH = ".act_scale", ".act_trunc", ".smooth"
_KEYS = {"format", "version", "sasq_version", "deploy", "model", "modules", "smooth", "method", "training", "weights",
         "files", "digest"}
_DEPLOY_KEYS = {"profile", "embedding", "act", "weight", "rotation"}
_MODEL_KEYS = {"source", "fingerprint"}


def weights_digest(layers: Iterable[tuple[str, np.ndarray, np.ndarray]]) -> str:
    # the entries come from runtime.grids.encode_weight (exporters) or sasq_edge.state.digest_entry
    # (a prepared layer's frozen codes, the same encode)
    """sha256 of the INT8 weights of the quantized layers: ``(name, codes (N, K) int8, scales (N,)
    float32)`` in any order. The exporter and the training side compute it from the same
    ``runtime.grids.encode_weight``, so equal digests mean equal deployed weights."""
    h = hashlib.sha256()
    for name, codes, scale in sorted(layers, key=lambda t: t[0]):
        h.update(name.encode() + b"\0")
        h.update(np.ascontiguousarray(codes, dtype=np.int8).tobytes())
        h.update(np.ascontiguousarray(scale, dtype=np.float32).tobytes())
    return h.hexdigest()[:32]


def _check_value(name: str, v: float) -> None:
    if not (isinstance(v, float) and math.isfinite(v) and v > 0):
        raise StateError(f"scale of {name} is {v}: scales must be positive and finite; retrain or recalibrate")


@dataclass
class ScaleState:
    profile: str
    scales: dict[str, float]  # quantized module name -> activation scale
    fingerprint: str  # of the model's architecture config (sasq_edge.state.model_fingerprint)
    model_source: str  # what to load to get the model back
    truncation: dict[str, float] = field(default_factory=dict)  # module -> soft-truncation range (tanh)
    smooth: dict[str, np.ndarray] = field(default_factory=dict)  # preceding op -> per-channel factors
    embedding: str = "float"  # "int8": weight-only per-row INT8 embedding table
    method: dict[str, Any] = field(default_factory=dict)  # the method's recipe (QuantConfig.to_dict())
    training: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None  # weights_digest of the INT8 weights; None in version-1 folders
    version: int = FORMAT_VERSION
    # module -> Hadamard block of its online input rotation (runtime.rotation); absent: not rotated
    rotation: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            get_profile(self.profile)
        except ConfigError as e:
            raise StateError(str(e)) from None
        if not self.scales:
            raise StateError("scale state is empty: it holds no quantized module")
        self.scales = {str(k): float(v) for k, v in self.scales.items()}
        self.truncation = {str(k): float(v) for k, v in self.truncation.items()}
        for name, v in {**self.scales, **self.truncation}.items():
            _check_value(name, v)
        if self.truncation and set(self.truncation) != set(self.scales):
            raise StateError("soft-truncation state must hold one range per quantized module: retrain the scales")
        smooth = {}
        for name, t in self.smooth.items():
            t = np.asarray(t, dtype=np.float32)
            if t.ndim != 1 or not t.size or not np.isfinite(t).all() or not (t > 0).all():
                raise StateError(f"smoothing factors of {name} must be a vector of positive finite values; retrain the scales")
            smooth[name] = t
        self.smooth = smooth
        for name, b in self.rotation.items():
            if name not in self.scales:
                raise StateError(f"rotation names {name!r}, which the state does not quantize: the folder is damaged, retrain")
            if isinstance(b, bool) or not isinstance(b, int) or b < 2 or b & (b - 1):
                raise StateError(f"Hadamard block {b!r} of {name} must be a power of two, at least 2: the folder is damaged, retrain")
        if self.embedding not in EMBEDDINGS:
            raise StateError(f"unknown embedding {self.embedding!r}: choose one of {', '.join(EMBEDDINGS)}")
        if self.method.get("profile", self.profile) != self.profile:
            raise StateError(f"the recipe trains for profile {self.method['profile']!r} but deploys {self.profile!r}: "
                             "the folder is damaged, retrain")

    @property
    def deploy(self) -> DeployProfile:
        return get_profile(self.profile)

    @property
    def soft_truncation(self) -> bool:
        return bool(self.truncation)

    def with_profile(self, profile: str) -> ScaleState:
        """The same scales encoded for ``profile``. Allowed when both profiles put activations and
        weights on the same real-valued grids (only the stored integer type differs, e.g. trt
        and cpu-vnni); a different grid would make the deployed model differ from the trained one."""
        if profile == self.profile:
            return self
        new, old = get_profile(profile), self.deploy
        if not old.same_grids(new):
            raise StateError(
                f"scales were trained for profile {self.profile!r}, whose integer grids differ from {profile!r}'s "
                f"(weights [{old.weight.qmin}, {old.weight.qmax}] vs [{new.weight.qmin}, {new.weight.qmax}]): "
                f"retrain with sasq-train --profile {profile}"
            )
        method = {**self.method, "profile": profile} if "profile" in self.method else dict(self.method)
        return dataclasses.replace(self, profile=profile, method=method)

    # --- files --------------------------------------------------------------------------------

    def recipe(self) -> dict[str, Any]:
        from runtime.version import __version__

        deploy = self.deploy
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "sasq_version": __version__,
            "deploy": {
                "profile": deploy.name,
                "embedding": self.embedding,
                "act": dataclasses.asdict(deploy.act),
                "weight": dataclasses.asdict(deploy.weight),
                "rotation": dict(sorted(self.rotation.items())),
            },
            "model": {"source": self.model_source, "fingerprint": self.fingerprint},
            "modules": sorted(self.scales),
            "smooth": sorted(self.smooth),
            "weights": self.weights,
            "method": self.method,
            "training": self.training,
        }

    def tensors(self) -> dict[str, np.ndarray]:
        out = {n + _SCALE: np.array(v, dtype=np.float32) for n, v in self.scales.items()}
        out.update({n + _TRUNC: np.array(v, dtype=np.float32) for n, v in self.truncation.items()})
        out.update({n + _SMOOTH: np.ascontiguousarray(v, dtype=np.float32) for n, v in self.smooth.items()})
        return out

    def write_files(self, folder: str | os.PathLike) -> list[str]:
        """Write ``scales.safetensors`` and ``recipe.json`` into an existing ``folder`` (each file
        atomically); returns their names."""
        from safetensors.numpy import save_file

        folder = Path(folder)
        with atomic_path(folder / SCALES_FILE) as tmp:
            save_file(self.tensors(), str(tmp), metadata={"format": FORMAT, "version": str(FORMAT_VERSION)})
        recipe = {**self.recipe(), "files": {SCALES_FILE: file_digest(folder / SCALES_FILE)}}
        atomic_write_text(folder / RECIPE_FILE, json.dumps({**recipe, "digest": recipe_digest(recipe)}, indent=2) + "\n")
        return [SCALES_FILE, RECIPE_FILE]

    def save(self, run_dir: str | os.PathLike) -> Path:
        """Write the run folder as one unit (``runtime.io.OutputFolder``): a failed or killed save
        leaves the previous folder as it was."""
        run_dir = Path(run_dir)
        with OutputFolder(run_dir, own_files=(SCALES_FILE, RECIPE_FILE), last=RECIPE_FILE) as stage:
            self.write_files(stage)
            checkpoint("state-staged")
        return run_dir

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> ScaleState:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        run_dir = Path(run_dir)
        recipe_path, scales_path = run_dir / RECIPE_FILE, run_dir / SCALES_FILE
        for p in (recipe_path, scales_path):
            if not p.is_file():
                raise StateError(f"{p} not found: pass the folder written by sasq-train (it holds {RECIPE_FILE} and {SCALES_FILE})")
        try:
            recipe = parse_json(recipe_path.read_text(encoding="utf-8"))
        except PermissionError:
            raise StateError(f"no permission to read {recipe_path}: check its permissions") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StateError(f"{recipe_path} is not valid JSON ({e}): rewrite it with sasq-train") from None
        if not isinstance(recipe, dict) or recipe.get("format") != FORMAT:
            raise StateError(f"{recipe_path} is not a sasq scale recipe: pass the folder written by sasq-train")
        if recipe.get("version") == 1:
            recipe = _upgrade_v1(recipe, recipe_path)
        elif recipe.get("version") not in (2, FORMAT_VERSION):
            from runtime.version import __version__

            raise StateError(
                f"{recipe_path} has format version {recipe.get('version')}, this sasq-edge {__version__} reads "
                f"versions 1 to {FORMAT_VERSION}: retrain the scales with this version"
            )
        _check_keys(recipe, _KEYS, recipe_path, "")
        try:
            deploy, model = recipe["deploy"], recipe["model"]
            _check_keys(deploy, _DEPLOY_KEYS, recipe_path, "deploy.")
            _check_keys(model, _MODEL_KEYS, recipe_path, "model.")
            profile, fingerprint, source = deploy["profile"], model["fingerprint"], model["source"]
            embedding, method = deploy.get("embedding", "float"), recipe.get("method", {})
            rotation = deploy.get("rotation") or {}
            if not isinstance(rotation, dict):
                raise TypeError("'deploy.rotation' (an object: module -> block)")
        except (KeyError, TypeError) as e:
            raise StateError(f"{recipe_path} lacks the field {e}: rewrite it with sasq-train") from None
        try:
            with open(scales_path, "rb"):  # safetensors reports a permission error as a missing file
                pass
            tensors = load_file(str(scales_path))
        except PermissionError:
            raise StateError(f"no permission to read {scales_path}: check its permissions") from None
        except (SafetensorError, OSError, ValueError) as e:
            raise StateError(f"{scales_path} is not a readable safetensors file ({e}): rewrite it with sasq-train") from None
        unknown = sorted(k for k in tensors if not k.endswith((_SCALE, _TRUNC, _SMOOTH)))
        if unknown:
            raise StateError(f"{scales_path} holds tensor(s) sasq-edge does not write ({', '.join(unknown[:3])}): the file was "
                             "edited or comes from another tool; retrain the scales")
        for k, v in tensors.items():
            if not k.endswith(_SMOOTH) and v.size != 1:
                raise StateError(f"{scales_path}: {k} has shape {list(v.shape)}, a per-tensor scale is one number: the "
                                 "file was edited or comes from another tool; retrain the scales")
        scales = {k[: -len(_SCALE)]: float(v.reshape(())) for k, v in tensors.items() if k.endswith(_SCALE)}
        trunc = {k[: -len(_TRUNC)]: float(v.reshape(())) for k, v in tensors.items() if k.endswith(_TRUNC)}
        smooth = {k[: -len(_SMOOTH)]: v for k, v in tensors.items() if k.endswith(_SMOOTH)}
        if sorted(scales) != sorted(recipe.get("modules", [])) or sorted(smooth) != sorted(recipe.get("smooth", [])):
            raise StateError(f"{scales_path} and {recipe_path} list different modules: the folder is damaged, retrain")
        state = cls(profile, scales, fingerprint, source, trunc, smooth, embedding, dict(method),
                    dict(recipe.get("training") or {}), recipe.get("weights"), recipe["version"], dict(rotation))
        grids = {"act": dataclasses.asdict(state.deploy.act), "weight": dataclasses.asdict(state.deploy.weight)}
        for key, want in grids.items():
            if key in deploy and deploy[key] != want:
                raise StateError(f"{recipe_path}: deploy.{key} {deploy[key]} is not profile {profile!r}'s grid {want} "
                                 "in this sasq-edge: retrain the scales")
        _check_digests(recipe, run_dir, recipe_path)  # last: a named problem (a NaN scale, a key) says more
        return state


def recipe_digest(recipe: dict) -> str:
    """sha256 of a recipe's content (its ``digest`` key left out), as canonical JSON."""
    body = {k: v for k, v in recipe.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]


def _check_digests(recipe: dict, run_dir: Path, recipe_path: Path) -> None:
    """Refuse a recipe edited after it was written, or a scale file that is not the one written
    with it (recipes written before the digests carry none, and load as they are)."""
    if "digest" in recipe and recipe["digest"] != recipe_digest(recipe):
        raise StateError(f"{recipe_path} was changed after sasq-edge wrote it (its digest no longer matches): restore it or "
                         "retrain the scales")
    files = recipe.get("files")
    if files is None:
        return
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise StateError(f"{recipe_path}: 'files' is damaged: retrain the scales")
    for name, digest in sorted(files.items()):
        path = run_dir / name
        if path.is_file() and file_digest(path) != digest:
            raise StateError(f"{path} is not the file written with {recipe_path.name} (edited, or copied from another run): "
                             "restore it or retrain the scales")


def _check_keys(d: Any, known: set[str], path: Path, prefix: str) -> None:
    if not isinstance(d, dict):
        raise StateError(f"{path}: {prefix.rstrip('.') or 'the recipe'} must be a JSON object: rewrite it with sasq-train")
    extra = sorted(set(d) - known)
    if extra:
        raise StateError(f"{path}: unknown key(s) {', '.join(prefix + k for k in extra)}: this is not a recipe this "
                         f"sasq-edge wrote; remove them or retrain")


def _upgrade_v1(recipe: dict, path: Path) -> dict:
    """A version-1 recipe (the method's whole config under ``config``) as version 2."""
    _check_keys(recipe, {"format", "version", "sasq_version", "config", "deploy", "model", "modules", "smooth", "training"}, path, "")
    config = dict(recipe.get("config") or {})
    if config.pop("bits", 8) != 8 or config.pop("activations", "static") != "static":
        raise StateError(f"{path}: a version-1 recipe with non-8-bit or dynamic activations has nothing to deploy: retrain")
    deploy = dict(recipe.get("deploy") or {})
    deploy["embedding"] = config.get("embedding", "float")
    out = {k: v for k, v in recipe.items() if k != "config"}
    return {**out, "version": 1, "deploy": deploy, "method": config, "weights": None}
