"""``dcml params show``: the resolved parameters and, per key, the layer it came from.

Layers, each beating the one before: ``default`` (dcml/config_schema.py) < ``preset <name>``
< the params file < ``overrides`` (docs/parameters.md). Credentials in the tracking URI
are redacted, as everywhere dcml prints or writes params.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def _show(args: argparse.Namespace) -> None:
    from dcml.config import flatten, load_with_sources, to_dict, validate

    params, sources = load_with_sources(args.params, check=False)
    layers = ["default", f"preset {params.preset}", args.params, "overrides"]
    if params.preset == "none":
        layers.pop(1)
    if args.json:
        print(json.dumps({"params_file": args.params, "layers": layers, "params": to_dict(params), "sources": sources}))
    else:
        _table(layers, flatten(params), sources)
    validate(params)  # after printing: the table shows where conflicting values came from


def _table(layers: list[str], values: dict[str, Any], sources: dict[str, str]) -> None:
    width = max(len(key) for key in values)
    shown = {key: _format(value) for key, value in values.items()}
    value_width = min(40, max(len(text) for text in shown.values()))
    print(f"# {' < '.join(layers)}")
    for key, text in shown.items():
        print(f"{key:<{width}}  {text:<{value_width}}  {sources[key]}")


def _format(value: Any) -> str:
    if isinstance(value, str):
        return value if value else '""'
    return json.dumps(value)


def add_commands(commands: Any) -> None:
    """Register ``dcml params`` on the ``dcml`` subcommands (``flows/cli.py``)."""
    params = commands.add_parser(
        "params", help="the parameters: show the resolved values and where each came from"
    ).add_subparsers(dest="params_command", required=True)
    show = params.add_parser(
        "show",
        help="print every key's resolved value and its source (default, preset <name>, the params file, overrides)",
    )
    show.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    show.add_argument("--json", action="store_true", help="JSON: params (nested), sources (dotted key -> layer)")
    show.set_defaults(func=_show)
