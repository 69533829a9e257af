"""Evaluation text from domains no calibration or training text comes from, rebuilt offline from
files that ship with Python or Debian. Deterministic for a given Python and OS:

- ``code``: CPython's standard-library sources (``*.py`` of the stdlib folder, tests and
  ``pydoc_data`` left out), files in a seeded shuffled order;
- ``docs``: the Python reference documentation that ships inside the stdlib
  (``pydoc_data/topics.py``: the text of ``help()`` topics), topics in sorted order;
- ``legal``: the licence texts of ``/usr/share/common-licenses`` (Debian), in sorted order
  (symlinks skipped).

``text(name)`` returns the whole text (documents joined with ``"\\n\\n"``); windows are cut from it
as for WikiText-2. ``python bench/domains.py`` prints each domain's size and sha256.
"""

from __future__ import annotations

import ast
import hashlib
import random
import sysconfig
from pathlib import Path

DOMAINS = ("code", "docs", "legal")
LICENSES = Path("/usr/share/common-licenses")


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _code() -> list[str]:
    root = _stdlib()
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    files += sorted(p for p in root.glob("*/*.py") if p.is_file() and p.parent.name not in ("test", "pydoc_data", "idlelib",
                                                                                            "lib2to3", "site-packages"))
    random.Random(0).shuffle(files)
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def _docs() -> list[str]:
    source = (_stdlib() / "pydoc_data" / "topics.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    topics = next(n.value for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "topics")
    pairs = {k.value: v.value for k, v in zip(topics.keys, topics.values, strict=True)}
    return [pairs[k] for k in sorted(pairs)]


def _legal() -> list[str]:
    if not LICENSES.is_dir():
        raise FileNotFoundError(f"{LICENSES} not found: the legal domain needs Debian's common-licenses")
    return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(LICENSES.iterdir())
            if p.is_file() and not p.is_symlink()]


def text(name: str) -> str:
    builders = {"code": _code, "docs": _docs, "legal": _legal}
    if name not in builders:
        raise ValueError(f"unknown domain {name!r}: choose one of {', '.join(DOMAINS)}")
    return "\n\n".join(builders[name]())


if __name__ == "__main__":
    for d in DOMAINS:
        t = text(d)
        print(f"{d}: {len(t):,} characters, sha256 {hashlib.sha256(t.encode()).hexdigest()[:16]}")
