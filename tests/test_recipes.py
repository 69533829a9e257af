"""The command a user types first runs the documented default recipe: the presets in
sasq_edge/config.py, the README's recipe table and the parsed command line agree field by field."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from runtime.profiles import resolve_profile
from sasq_edge.cli import recipe
from sasq_edge.config import RECIPES, QuantConfig

README = Path(__file__).resolve().parents[1] / "README.md"
# README column -> QuantConfig field
COLUMNS = {"initialiser": "calibration", "smoothing alpha": "smooth_alpha", "learned factors": "smooth_learn",
           "schedule": "lr_schedule", "lr": "lr", "objective": "objective", "rotation block": "rotate_block",
           "block by block: windows x steps": None, "then end to end: tokens x steps": None}


def _table() -> dict[str, dict[str, str]]:
    text = README.read_text()
    section = text.split("### Recipes", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    header = [c.strip() for c in next(line for line in section.splitlines() if line.startswith("| recipe")).strip("|").split("|")]
    out = {}
    for line in rows:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        out[cells[0].strip("`")] = dict(zip(header, cells, strict=True))
    return out


def test_readme_documents_every_recipe_as_configured():
    table = _table()
    assert set(table) == set(RECIPES)
    for name, preset in RECIPES.items():
        cfg, row = QuantConfig.from_recipe(name), table[name]
        assert row["block by block: windows x steps"] == f"{cfg.block_windows} x {cfg.block_steps}", name
        assert row["then end to end: tokens x steps"] == (f"{cfg.seq_len} x {cfg.train_steps}" if cfg.train_steps else "—"), name
        for column, field in COLUMNS.items():
            if field is None:
                continue
            value = getattr(cfg, field)
            shown = {True: "yes", False: "no"}.get(value, str(value)) if isinstance(value, bool) else str(value)
            assert row[column] == shown, (name, column, row[column], shown)
        assert cfg.blockwise, name
        assert set(preset) <= {*COLUMNS.values(), "seq_len", "train_steps", "blockwise", "block_windows", "block_steps"}, \
            "a preset field the table does not show"


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    recipe.add_train_args(p)
    return p.parse_args(argv)


@pytest.mark.parametrize("name", [None, *RECIPES])
def test_command_line_runs_the_preset(name):
    """No flag but the model gives the ``default`` preset on the profile ``auto`` picks; each
    ``--recipe`` gives its own; a flag the user sets wins over the preset."""
    argv = ["--model", "m"] + ([] if name is None else ["--recipe", name])
    cfg = recipe.config(_parse(argv))
    assert cfg == QuantConfig.from_recipe(name or "default", profile=resolve_profile("auto")[0])
    cfg = recipe.config(_parse([*argv, "--train-steps", "7", "--objective", "ce"]))
    assert (cfg.train_steps, cfg.objective) == (7, "ce")


def test_bare_config_is_the_default_recipe():
    """A library caller who names nothing gets what the command runs: the ``default`` preset on the
    profile this CPU runs exactly; ``plain`` is the method alone, the same on every CPU."""
    assert QuantConfig() == QuantConfig.from_recipe("default") == recipe.config(_parse(["--model", "m"]))
    assert QuantConfig().profile == resolve_profile("auto")[0]
    plain = QuantConfig.plain()
    assert (plain.profile, plain.calibration, plain.smooth_alpha, plain.rotate_block, plain.blockwise) == \
        ("trt", "absmax", None, 0, False)


def test_state_written_before_a_key_existed_reads_as_the_plain_method():
    """A state's method recipe lacking a later key (here the block-wise ones) means the method as it
    ran then, not today's default recipe."""
    d = QuantConfig.plain(train_steps=3).to_dict()
    for key in ("blockwise", "block_steps", "block_windows", "rotate_block"):
        d.pop(key)
    assert QuantConfig.from_dict(d) == QuantConfig.plain(train_steps=3)


def test_default_fits_the_cpu_budget():
    """The default budget stays the one measured on this 2-core CPU (bench/results/blockwise.md):
    block by block on 16 windows of 512 tokens, 20 steps a block, no end-to-end steps."""
    cfg = QuantConfig.from_recipe("default")
    assert (cfg.block_windows, cfg.seq_len, cfg.block_steps, cfg.train_steps) == (16, 512, 20, 0)
    assert re.search(r"default.*minutes", README.read_text().split("### Recipes", 1)[1].split("\n#", 1)[0], re.S)


def test_main_job_block_is_what_bench_runs():
    """bench/main_job.py runs the README's main job as written: its parser finds every command,
    each sasq command is an installed console script, and the first export is the plain one."""
    import importlib.util

    import tomllib

    spec = importlib.util.spec_from_file_location("main_job", README.parent / "bench" / "main_job.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    commands = mod.readme_commands()
    scripts = set(tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]["scripts"])
    tools = [c.split()[0] for c in commands if c.startswith("sasq-")]
    assert set(tools) <= scripts and {"sasq-export", "sasq-ppl", "sasq-validate", "sasq-generate", "sasq-lint"} <= set(tools)
    first = next(c for c in commands if c.startswith("sasq-export"))
    assert first == "sasq-export out/smollm2/model.onnx --model $MODEL"


def test_default_data_is_the_documented_mix():
    """Calibration commands default to the mix that measured best on held-out text of unseen
    domains; evaluation commands keep the WikiText-2 protocol; the README says both."""
    from runtime.sources import DEFAULT_CALIBRATION_SPEC, DEFAULT_SPEC, parse_data_spec
    from sasq_edge.cli.common import add_data_args

    calib, evaluation = argparse.ArgumentParser(), argparse.ArgumentParser()
    add_data_args(calib, "calibration")
    add_data_args(evaluation)
    assert calib.parse_args([]).data == DEFAULT_CALIBRATION_SPEC == "0.5*wikitext2,0.5*self:32"
    assert evaluation.parse_args([]).data == DEFAULT_SPEC == "wikitext2"
    assert sorted(s.kind for s in parse_data_spec(DEFAULT_CALIBRATION_SPEC).sources) == ["self", "wikitext2"]
    assert f"on the default data `{DEFAULT_CALIBRATION_SPEC}`" in README.read_text()
