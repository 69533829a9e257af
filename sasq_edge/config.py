"""The one frozen configuration of a SASQ run, and the deploy profiles (integer grids)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from sasq_edge.errors import ConfigError
from sasq_edge.quant_math import IntGrid


@dataclass(frozen=True)
class DeployProfile:
    """How one set of trained scales is encoded for a target (DESIGN.md, "Deploy grids").

    Training and calibration fake-quantize on exactly these grids, so the PyTorch model and the
    deployed integer model compute the same values. ``session_options`` are the ONNX Runtime
    session config entries the deployed file needs; the exporter writes them into the model's
    metadata and the runtime applies them.
    """

    name: str
    act: IntGrid
    weight: IntGrid
    session_options: tuple[tuple[str, str], ...] = ()
    description: str = ""


# uint8 carrying the int8 grid: the same real values as int8 with zero point 0
_U8_ACT = IntGrid(-128, 127, zero_point=128, dtype="uint8")

PROFILES: dict[str, DeployProfile] = {
    "trt": DeployProfile(
        name="trt",
        act=IntGrid(-128, 127, zero_point=0, dtype="int8"),
        weight=IntGrid(-127, 127, zero_point=0, dtype="int8"),
        # ORT CPU only fuses int8-activation QDQ into integer kernels with this switch.
        session_options=(("session.qdqisint8allowed", "1"),),
        description="TensorRT explicit quantization: int8 activations per tensor (zero point 0), "
        "int8 weights in [-127, 127] per output channel",
    ),
    "cpu-avx2": DeployProfile(
        name="cpu-avx2",
        act=_U8_ACT,
        # 7-bit weights: AVX2's u8 x s8 pair-add (vpmaddubsw) saturates 16-bit sums with 8-bit
        # weights (255 * 127 * 2 > 32767); with |w| <= 64 it cannot (255 * 64 * 2 = 32640).
        weight=IntGrid(-64, 63, zero_point=0, dtype="int8"),
        description="x86 CPUs with AVX2 and no VNNI: uint8 activations (zero point 128), "
        "7-bit weights in [-64, 63] per output channel, so ORT's fast u8s8 kernel is exact",
    ),
}

# the same grids as trt with uint8 activations: one training serves all three (ScaleState.with_profile)
for _name, _hardware in (("cpu-vnni", "x86 CPUs with AVX-VNNI or AVX512-VNNI (vpdpbusd accumulates in 32 bits)"),
                         ("arm64", "64-bit ARM (NEON dot product)")):
    PROFILES[_name] = DeployProfile(
        name=_name,
        act=_U8_ACT,
        weight=PROFILES["trt"].weight,
        description=f"{_hardware}: uint8 activations (zero point 128), int8 weights in [-127, 127] per output channel",
    )
del _name, _hardware

CALIBRATIONS = ("absmax", "percentile", "mse")
EMBEDDINGS = ("float", "int8")
TRUNCATIONS = ("clip", "tanh")
ACTIVATIONS = ("static", "dynamic")
LR_SCHEDULES = ("constant", "cosine")


AUTO = "auto"


def cpu_features(cpuinfo: str | None = None, machine: str | None = None) -> tuple[str, frozenset[str]]:
    """``(machine, flags)`` of this CPU: ``platform.machine()`` and, on Linux, the ``flags`` line
    of ``/proc/cpuinfo`` (empty elsewhere). Arguments override both, for tests."""
    import platform

    machine = (machine or platform.machine()).lower()
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
            break
    return machine, frozenset(flags)


def detect_profile(cpuinfo: str | None = None, machine: str | None = None) -> tuple[str, str]:
    """The CPU profile for the machine this runs on, and why: ``(profile, reason)``."""
    machine, flags = cpu_features(cpuinfo, machine)
    if machine in ("aarch64", "arm64"):
        return "arm64", f"{machine} CPU"
    if machine in ("x86_64", "amd64", "i686", "x86"):
        vnni = sorted(flags & {"avx_vnni", "avx512_vnni", "amx_int8"})
        if vnni:
            return "cpu-vnni", f"x86 CPU with {', '.join(vnni)}"
        if "avx2" in flags:
            return "cpu-avx2", "x86 CPU with AVX2 and no VNNI"
        if not flags:
            raise ConfigError(f"cannot read the CPU flags of this {machine} machine: pass --profile cpu-avx2 or cpu-vnni")
        raise ConfigError("this x86 CPU has no AVX2: no profile runs fast here; pass --profile cpu-avx2 to export anyway")
    raise ConfigError(f"no CPU profile for machine type {machine!r}: pass --profile {', '.join(PROFILES)}")


def resolve_profile(name: str) -> tuple[str, str | None]:
    """``name`` itself, or for ``auto`` the detected profile and the reason it was picked."""
    if name != AUTO:
        get_profile(name)
        return name, None
    return detect_profile()


def get_profile(name: str) -> DeployProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError(f"unknown deploy profile {name!r}: choose one of {', '.join(PROFILES)} or auto") from None


@dataclass(frozen=True)
class QuantConfig:
    """Everything that decides what a SASQ run computes. Validated on construction.

    ``targets`` are leaf module names inside the decoder blocks (``q_proj``, ...); ``None`` means
    the architecture's default set from the registry in ``sasq_edge.arch``.
    """

    bits: int = 8
    profile: str = "trt"
    targets: tuple[str, ...] | None = None
    calibration: str = "absmax"
    percentile: float = 99.99
    calib_batches: int = 8
    truncation: str = "clip"
    train_steps: int = 100
    lr: float = 5e-3
    batch_size: int = 1
    seq_len: int = 512
    seed: int = 0
    lm_head: bool = False  # quantize the output head like the decoder linears (trained activation scale)
    embedding: str = "float"  # "int8": weight-only per-row INT8 embedding table
    # per-input-channel factors folded SmoothQuant-style into the preceding RMSNorm / linear
    # (x / s, W * s) before quantization; None = off. The deployed graph keeps per-tensor scales.
    smooth_alpha: float | None = None
    # train the smoothing factors too (on top of SmoothQuant's), folded into the weights after training
    smooth_learn: bool = False
    lr_schedule: str = "constant"
    # "dynamic": per-token absmax scales computed at run time (accuracy reference; not exportable)
    activations: str = "static"

    def __post_init__(self) -> None:
        get_profile(self.profile)
        if self.bits != 8:
            raise ConfigError(f"bits={self.bits}: every deploy profile is 8-bit; use bits=8")
        if self.calibration not in CALIBRATIONS:
            raise ConfigError(f"unknown calibration {self.calibration!r}: choose one of {', '.join(CALIBRATIONS)}")
        if self.embedding not in EMBEDDINGS:
            raise ConfigError(f"unknown embedding {self.embedding!r}: choose one of {', '.join(EMBEDDINGS)}")
        if self.embedding == "int8" and self.profile == "trt":
            # its DequantizeLinear takes per-row scales gathered at run time; TensorRT wants constant scales
            raise ConfigError("an INT8 embedding is for the CPU profiles (TensorRT needs constant Q/DQ scales): "
                              "drop --int8-embedding, or pick --profile cpu-avx2, cpu-vnni or arm64")
        if self.truncation not in TRUNCATIONS:
            raise ConfigError(f"unknown truncation {self.truncation!r}: choose one of {', '.join(TRUNCATIONS)}")
        if self.activations not in ACTIVATIONS:
            raise ConfigError(f"unknown activations {self.activations!r}: choose one of {', '.join(ACTIVATIONS)}")
        if self.activations == "dynamic" and self.train_steps:
            raise ConfigError("dynamic per-token activations have no scales to train: use train_steps=0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"unknown lr schedule {self.lr_schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise ConfigError(f"smooth_alpha={self.smooth_alpha} must lie in [0, 1] (SmoothQuant's migration strength)")
        if self.smooth_learn and self.smooth_alpha is None:
            raise ConfigError("smooth_learn trains the smoothing factors SmoothQuant starts: set smooth_alpha too")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile={self.percentile} must lie in (50, 100]")
        for name in ("calib_batches", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        if self.train_steps < 0:
            raise ConfigError(f"train_steps={self.train_steps} must be 0 (calibration only) or more")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr} must be positive")
        if self.targets is not None:
            if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
                raise ConfigError("targets must be a non-empty list of module names such as 'q_proj'")
            object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def deploy(self) -> DeployProfile:
        return get_profile(self.profile)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets) if self.targets is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        """Strict: an unknown key is an error, never silently ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise ConfigError(f"unknown config key(s) {', '.join(extra)}: valid keys are {', '.join(sorted(known))}")
        d = dict(d)
        if d.get("targets") is not None:
            d["targets"] = tuple(d["targets"])
        return cls(**d)
