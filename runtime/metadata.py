"""The ``metadata_props`` keys a sasq-edge ONNX file carries, defined once: the exporter writes
them (``exporters.passes.set_metadata``), the runtime reads them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx

from runtime.errors import RuntimeSetupError
from runtime.profiles import PROFILES, DeployProfile

META_FORMAT = "sasq.format"
META_VERSION = "sasq.version"
META_PROFILE = "sasq.profile"
META_SESSION_OPTIONS = "sasq.session_options"
META_FILES = "sasq.files"  # JSON {file name: sha256} of the files exported beside the model
META_GRAPH = "sasq.graph"  # "fused" (ONNX Runtime contrib ops) or "traced" (standard ops)
META_WEIGHTS = "sasq.weights"  # runtime.state.weights_digest of the INT8 weights in the graph
FORMAT_TAG = "sasq-edge-onnx-1"


def deploy_metadata(profile: DeployProfile, version: str) -> dict[str, str]:
    """The entries of a quantized export: format, producer version, profile and the ONNX Runtime
    session options the profile needs."""
    return {
        META_FORMAT: FORMAT_TAG,
        META_VERSION: version,
        META_PROFILE: profile.name,
        META_SESSION_OPTIONS: json.dumps(dict(profile.session_options)),
    }


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The model's ``metadata_props``; fails clearly on a missing or non-ONNX file."""
    path = Path(path)
    if not path.is_file():
        raise RuntimeSetupError(f"{path} not found: pass the model.onnx written by sasq-export")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError / RuntimeWarning-like errors on junk
        raise RuntimeSetupError(f"{path} is not a readable ONNX file ({type(e).__name__}): re-export it with sasq-export") from None
    if not model.graph.node:
        raise RuntimeSetupError(f"{path} holds no ONNX graph: re-export it with sasq-export")
    return {p.key: p.value for p in model.metadata_props}


def session_config(meta: dict[str, str], path: str | os.PathLike) -> dict[str, str]:
    """The session config entries recorded in ``meta`` (``{}`` for a float or foreign model)."""
    try:
        options = json.loads(meta.get(META_SESSION_OPTIONS, "{}"))
    except json.JSONDecodeError:
        options = None
    if not isinstance(options, dict):
        raise RuntimeSetupError(f"{path}: metadata {META_SESSION_OPTIONS} is not a JSON object: re-export the model")
    return {str(k): str(v) for k, v in options.items()}


def session_options_problem(meta: dict[str, str], path: str | os.PathLike) -> str | None:
    """What is wrong with the session options ``meta`` records for its deploy profile (None when
    they are exactly the ones the profile needs, ``runtime.profiles``)."""
    profile = meta.get(META_PROFILE)
    if profile not in PROFILES:
        return f"the metadata names no known deploy profile ({profile!r})"
    want, have = dict(PROFILES[profile].session_options), session_config(meta, path)
    if have == want:
        return None
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    changed = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    parts = [f"lacks {', '.join(missing)}" if missing else "", f"adds {', '.join(extra)}" if extra else "",
             f"changes {', '.join(changed)}" if changed else ""]
    return f"profile {profile} needs session options {json.dumps(want)}; the metadata records {json.dumps(have)} (" + \
        "; ".join(p for p in parts if p) + ")"
