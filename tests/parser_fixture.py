"""The CLI parser as data (tests/test_cli.py compares it against tests/data/parser.json): every
action's flags, destination, default, type, choices, help and argument group, in help order.

Regenerate only when a flag is meant to change: python -m tests.parser_fixture > tests/data/parser.json
"""
from __future__ import annotations

import argparse
import json


def _plain(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return repr(value)


def describe_parser(parser: argparse.ArgumentParser) -> list[dict]:
    """One dict per action, grouped by argument group in the order --help prints them."""
    described = []
    for group in parser._action_groups:
        for action in group._group_actions:
            described.append({
                "group": group.title, "option_strings": list(action.option_strings), "dest": action.dest,
                "action": type(action).__name__, "default": _plain(action.default),
                "type": getattr(action.type, "__name__", None) if action.type is not None else None,
                "choices": _plain(list(action.choices)) if action.choices is not None else None,
                "nargs": _plain(action.nargs), "const": _plain(action.const), "metavar": _plain(action.metavar),
                "required": action.required, "help": action.help})
    return described


if __name__ == "__main__":
    import compress
    print(json.dumps(describe_parser(compress.build_parser()), indent=1))
