"""Imports point one way (docs/ARCHITECTURE.md): command line -> method (``sasq_edge``) ->
``exporters`` -> ``runtime``. Every import statement of every module is read, at module level and
inside functions, so a lazy import against the direction fails too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "exporters", "sasq_edge")
DEVICE_CLI = ("sasq_edge/cli/common.py", "sasq_edge/cli/ppl.py", "sasq_edge/cli/generate.py", "sasq_edge/cli/lint.py")
TRAINING_ONLY = ("torch", "transformers", "datasets", "onnxscript", "gguf", "accelerate", "optimum")


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every import in the file; ``from x import y`` counts as x.y
    too, so ``from sasq_edge import cli`` is seen as an import of ``sasq_edge.cli``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return sorted(out)


def _hits(path: Path, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{path.name}:{line} imports {name}" for line, name in _imports(path)
            if any(name == f or name.startswith(f + ".") for f in forbidden)]


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _forbidden(path: Path) -> tuple[str, ...]:
    rel = _rel(path)
    if rel.startswith("runtime/"):
        # the device side: no torch, no transformers, nothing above it (datasets only lazily, for
        # WikiText, hub datasets and parquet files, in runtime/data.py and runtime/readers.py)
        extra = () if rel in ("runtime/data.py", "runtime/readers.py") else ("datasets",)
        return ("exporters", "sasq_edge", "torch", "transformers", "onnxscript", "gguf", *extra)
    if rel.startswith("exporters/"):
        return ("sasq_edge",)
    if rel in DEVICE_CLI:
        return ("exporters", *TRAINING_ONLY, *(f"sasq_edge.{m}" for m in _method_modules()), "sasq_edge.cli.recipe",
                "sasq_edge.baselines")
    if rel.startswith("sasq_edge/cli/"):
        return ()
    if rel == "sasq_edge/baselines.py":
        return ("sasq_edge.cli",)
    return ("sasq_edge.cli", "sasq_edge.baselines")  # the method


def _method_modules() -> list[str]:
    return [p.stem for p in (ROOT / "sasq_edge").glob("*.py") if p.stem not in ("__init__", "baselines")]


def test_every_module_is_checked():
    mods = [_rel(p) for p in _modules()]
    assert "runtime/state.py" in mods and "exporters/lowering.py" in mods and "sasq_edge/cli/ppl.py" in mods
    assert all(m.startswith(("runtime/", "exporters/", "sasq_edge/")) for m in mods)
    assert all((ROOT / m).is_file() for m in DEVICE_CLI)


@pytest.mark.parametrize("path", _modules(), ids=_rel)
def test_imports_point_one_way(path):
    assert _hits(path, _forbidden(path)) == []


def test_the_checker_sees_violations(tmp_path):
    """The rule above fails on the imports it forbids, wherever they stand in the file."""
    bad = tmp_path / "bad.py"
    bad.write_text("import numpy\n\ndef f():\n    from sasq_edge.cli import common\n    import torch.nn\n"
                   "from exporters import export_onnx\n")
    hits = _hits(bad, ("sasq_edge.cli", "torch", "exporters"))
    assert [h.split(" imports ")[1] for h in hits] == ["sasq_edge.cli", "sasq_edge.cli.common", "torch.nn", "exporters",
                                                        "exporters.export_onnx"]
