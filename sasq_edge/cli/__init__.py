"""The command line: one module per command, shared options in ``common`` (and, for the commands
that train, ``recipe``). The device commands (``sasq-ppl``, ``sasq-generate``, ``sasq-lint``)
import ``runtime`` only, so they run where torch, transformers and datasets are not installed.

Every command has ``--help`` and ``--json`` (the last line printed is one JSON object). A user
error prints one line ``<command>: error: <what and how to fix>`` and exits 2; a check that ran
and failed (parity, fusion, lint) exits 1.
"""
