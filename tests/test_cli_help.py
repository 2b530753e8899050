"""`gq` says what it does: the help without arguments, `--version`, a description and the defaults
in every sub-command's `--help`, and `gq recipes show NAME` for the keys `key=value` can set."""

import argparse

import pytest
import yaml

import gq_plugin
from gq_plugin.lab.cli import build_parser
from gq_plugin.lab.cli import main as gq_main
from gq_plugin.lab.config import DEFAULTS


def _subparsers(p, prefix=""):
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield f"{prefix}{name}", sp
                yield from _subparsers(sp, f"{prefix}{name} ")


def test_gq_alone_prints_the_help(capsys):
    assert gq_main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: gq") and "COMMAND" in out and "--version" in out
    for cmd in ("train", "eval", "diagnose", "encode", "decode", "tokenize", "recipes", "demo"):
        assert f"\n    {cmd} " in out, cmd


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        gq_main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"gq {gq_plugin.__version__} (gq-plugin)"


def test_every_subcommand_has_a_description_and_shows_its_defaults():
    subs = dict(_subparsers(build_parser()))
    assert {"train", "eval", "encode", "decode", "recipes", "recipes show"} <= set(subs)
    for name, sp in subs.items():
        assert sp.description and len(sp.description) > 20, f"gq {name}: no description"
        text = sp.format_help()
        assert sp.description.split()[0] in text
        for a in sp._actions:
            shown = a.default not in (None, False, [], argparse.SUPPRESS) and a.nargs != "*"
            if shown and a.help:
                assert "default" in sp._get_formatter()._get_help_string(a), f"gq {name} {a.dest}: default not shown"
    assert "(default: 256)" in " ".join(subs["encode"].format_help().split())
    assert "gq recipes show RECIPE" in " ".join(subs["train"].format_help().split())


def test_recipes_show_prints_every_key_overrides_can_set(capsys):
    assert gq_main(["recipes", "show", "tiny_cpu", "train.steps=5"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert set(DEFAULTS) <= set(cfg)
    for section, keys in DEFAULTS.items():
        if isinstance(keys, dict) and section != "quantizer":
            assert set(keys) <= set(cfg[section]), section
    assert cfg["train"]["steps"] == 5 and cfg["quantizer"]["codebook_size"] == 1024  # override + recipe value
    assert gq_main(["recipes"]) == 0 and "tiny_cpu" in capsys.readouterr().out
    assert gq_main(["recipes", "show", "no_such_recipe"]) == 2
    assert "recipe 'no_such_recipe' not found" in capsys.readouterr().err
