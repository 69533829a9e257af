"""Deploy profiles: how one set of trained scales is encoded for a target
(the README's deploy profiles), and picking one from the CPU this runs on. Plain data; no torch.

Training and calibration fake-quantize on exactly these grids, so the PyTorch model and the
deployed integer model compute the same values. ``session_options`` are the ONNX Runtime session
config entries the deployed file needs; the exporter writes them into the model's metadata and
``runtime.session`` applies them.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

from runtime.errors import ConfigError
from runtime.grids import IntGrid

AUTO = "auto"


@dataclass(frozen=True)
class DeployProfile:
    name: str
    act: IntGrid
    weight: IntGrid
    session_options: tuple[tuple[str, str], ...] = ()
    description: str = ""

    def same_grids(self, other: DeployProfile) -> bool:
        """Whether both put activations and weights on the same real-valued grids (only the stored
        integer type may differ), so scales trained for one serve the other exactly."""
        return (self.act.qmin, self.act.qmax, self.weight.qmin, self.weight.qmax) == (
            other.act.qmin, other.act.qmax, other.weight.qmin, other.weight.qmax)


# uint8 carrying the int8 grid: the same real values as int8 with zero point 0
_U8_ACT = IntGrid(-128, 127, zero_point=128, dtype="uint8")
_S8_WEIGHT = IntGrid(-127, 127, zero_point=0, dtype="int8")

PROFILES: dict[str, DeployProfile] = {
    "trt": DeployProfile(
        name="trt",
        act=IntGrid(-128, 127, zero_point=0, dtype="int8"),
        weight=_S8_WEIGHT,
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
    # the same grids as trt with uint8 activations: one training serves all three
    "cpu-vnni": DeployProfile(
        name="cpu-vnni",
        act=_U8_ACT,
        weight=_S8_WEIGHT,
        description="x86 CPUs with AVX-VNNI or AVX512-VNNI (vpdpbusd accumulates in 32 bits): uint8 "
        "activations (zero point 128), int8 weights in [-127, 127] per output channel",
    ),
    "arm64": DeployProfile(
        name="arm64",
        act=_U8_ACT,
        weight=_S8_WEIGHT,
        description="64-bit ARM (NEON dot product): uint8 activations (zero point 128), int8 weights "
        "in [-127, 127] per output channel",
    ),
}


def get_profile(name: str) -> DeployProfile:
    try:
        return PROFILES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown deploy profile {name!r}: choose one of {', '.join(PROFILES)} or {AUTO}") from None


def cpu_features(cpuinfo: str | None = None, machine: str | None = None) -> tuple[str, frozenset[str]]:
    """``(machine, flags)`` of this CPU: ``platform.machine()`` and, on Linux, the ``flags`` line
    of ``/proc/cpuinfo`` (empty elsewhere). Arguments override both, for tests."""
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
        vnni = sorted(flags & set(VNNI_FLAGS))
        if vnni:
            return "cpu-vnni", f"x86 CPU with {', '.join(vnni)}"
        if "avx2" in flags:
            return "cpu-avx2", "x86 CPU with AVX2 and no VNNI"
        if not flags:
            raise ConfigError(f"cannot read the CPU flags of this {machine} machine: pass --profile cpu-avx2 or cpu-vnni")
        raise ConfigError("this x86 CPU has no AVX2: no profile runs fast here; pass --profile cpu-avx2 to export anyway")
    raise ConfigError(f"no CPU profile for machine type {machine!r}: pass --profile {', '.join(PROFILES)}")


VNNI_FLAGS = ("avx_vnni", "avx512_vnni", "amx_int8")  # x86 flags of 32-bit-accumulating u8 x s8 dot products


def inexact_here(profile: str, cpuinfo: str | None = None, machine: str | None = None) -> str | None:
    """Why ONNX Runtime's integer kernels on this CPU do not compute ``profile``'s products exactly,
    or None where they do. On x86 without VNNI the uint8 x int8 kernel adds pairs of products in
    16 bits (vpmaddubsw), which saturates with weights beyond 7 bits (255 * 127 * 2 > 32767):
    ``cpu-vnni`` and ``arm64`` exports compute other numbers there than their twin."""
    prof = get_profile(profile)
    machine, flags = cpu_features(cpuinfo, machine)
    x86 = machine in ("x86_64", "amd64", "i686", "x86")
    if not x86 or not flags or flags & set(VNNI_FLAGS) or prof.act.dtype != "uint8":
        return None
    if 2 * 255 * max(abs(prof.weight.qmin), prof.weight.qmax) <= 32767:
        return None
    return (f"profile {profile} needs VNNI: this x86 CPU has none, and ONNX Runtime's uint8 x int8 kernel here adds "
            f"product pairs in 16 bits, which saturate with its 8-bit weights (the results are not the trained "
            f"model's); export with --profile cpu-avx2 for this CPU, or run on one with AVX-VNNI/AVX512-VNNI")


def resolve_profile(name: str) -> tuple[str, str | None]:
    """``name`` itself, or for ``auto`` the detected profile and the reason it was picked."""
    if name != AUTO:
        get_profile(name)
        return name, None
    return detect_profile()
