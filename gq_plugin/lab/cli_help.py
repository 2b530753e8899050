"""What the ``gq`` command says about itself: ``gq`` alone prints the help, ``gq --version``,
every sub-command's ``--help`` opens with a description and shows each option's default, and
``gq recipes show NAME`` prints the keys that ``key=value`` overrides can set.

:class:`GQArgumentParser` is the parser class of ``gq`` and of every sub-command parser (argparse
passes it down), so a sub-command added to :func:`gq_plugin.lab.cli.build_parser` gets the
defaults in its help and, if it has none of its own, its one-line ``help=`` as description.
"""

from __future__ import annotations

import argparse


def version_string() -> str:
    """``gq <version> (gq-plugin)``, read without importing torch."""
    try:
        from importlib.metadata import version

        v = version("gq-plugin")
    except Exception:  # not installed (run from a checkout with PYTHONPATH): the package's own
        import gq_plugin

        v = gq_plugin.__version__
    return f"gq {v} (gq-plugin)"


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the default is empty (None, False,
    ``[]``) or the help already names its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if (d is None or d is False or d == [] or d is argparse.SUPPRESS or "default" in text
                or action.nargs in (argparse.ZERO_OR_MORE, argparse.REMAINDER)):
            return text
        return f"{text} (default: %(default)s)"


class GQArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with :class:`DefaultsHelpFormatter` unless told otherwise."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def fill_descriptions(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give every sub-command without a description its one-line help as description (recursively)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                if not sub.description and helps.get(name):
                    h = helps[name]
                    sub.description = h[0].upper() + h[1:] + ("" if h.endswith(".") else ".")
                fill_descriptions(sub)
    return parser


def show_recipe(name: str, overrides: list[str] | None = None) -> str:
    """The resolved config of recipe ``name`` (defaults <- recipe <- overrides) as YAML: every key
    ``gq train`` / ``gq eval`` accept as ``key=value``."""
    from omegaconf import OmegaConf

    from .config import load_config, resolve_recipe

    path = resolve_recipe(name)
    cfg = load_config(path, overrides)
    head = (f"# recipe {path} resolved (defaults <- recipe{' <- overrides' if overrides else ''});\n"
            f"# every key below can be overridden: gq train {name} section.key=value\n")
    return head + OmegaConf.to_yaml(cfg)
