"""The command line's registration options, built from :class:`RegistrationSettings`' fields.

Nothing here names a setting: a field added to the settings becomes an option of ``register``
(and of every other command that registers) without an edit in this package.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..registration.settings import RegistrationSettings

_TYPES = {"int": int, "float": float, "str": str}
#: Where the option's name is not the field's, e.g. ``--max-memory GIB``.
_FLAGS = {"max_memory_gib": ("--max-memory", "GIB")}


def _cli_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(RegistrationSettings) if f.metadata["cli"] == "flag"]


def add_settings_arguments(group: Any) -> None:
    """``--settings FILE`` and one option per setting, with the settings' help and choices.

    An option left out keeps the value from ``--settings`` (or the default): the defaults are
    applied by :func:`settings_from_arguments`, not by argparse.
    """
    group.add_argument(
        "--settings",
        dest="settings_file",
        type=Path,
        metavar="JSON",
        help='settings from a JSON file: an earlier run\'s --report, or its "settings" object '
        "alone; options given as well override it",
    )
    for field in _cli_fields():
        help_text = field.metadata["help"].replace("%", "%%")
        kind = field.type.split(" | ")[0]
        flag, metavar = _FLAGS.get(field.name, ("--" + field.name.replace("_", "-"), None))
        if kind == "bool":
            negated = "--no-" + field.name.replace("_", "-")
            group.add_argument(
                negated if field.default else flag,
                dest=field.name,
                action="store_false" if field.default else "store_true",
                default=argparse.SUPPRESS,
                help=f"turn off {help_text}" if field.default else help_text,
            )
            continue
        # Choices are the settings' to check (device also takes cuda:N): an unknown value is
        # an InputError naming the choices, exit code 2, like any other bad option.
        choices = field.metadata["choices"]
        default = "" if field.default is None else f" (default {field.default})"
        group.add_argument(
            flag,
            dest=field.name,
            type=_TYPES[kind],
            default=argparse.SUPPRESS,
            metavar=metavar or (f"{{{','.join(choices)}}}" if choices else None),
            help=help_text + default,
        )


def settings_from_arguments(args: argparse.Namespace, **derived: Any) -> RegistrationSettings:
    """The settings file's (or the defaults), then the options given, then ``derived`` (the
    fields set from the outputs asked for)."""
    base = RegistrationSettings()
    if getattr(args, "settings_file", None) is not None:
        base = RegistrationSettings.from_dict(_read_settings_file(args.settings_file))
    given = {f.name: getattr(args, f.name) for f in _cli_fields() if hasattr(args, f.name)}
    return base.replace(**given, **derived)


def _read_settings_file(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read the settings file {path}: {error}") from None
    if isinstance(values, dict) and isinstance(values.get("settings"), dict):
        values = values["settings"]  # a report: rerun with the settings it records
    if not isinstance(values, dict):
        raise InputError(f"the settings file {path} must hold a JSON object of settings")
    return values
