"""The command line's registration options, built from :class:`RegistrationSettings`' fields.

Nothing here names a setting: a field added to the settings becomes an option of ``register``
(and of every other command that registers) without an edit in this package.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ..registration.settings import RegistrationSettings

_TYPES = {"int": int, "float": float, "str": str}
#: Where the option's name is not the field's, e.g. ``--max-memory GIB``.
_FLAGS = {"max_memory_gib": ("--max-memory", "GIB")}


def _cli_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(RegistrationSettings) if f.metadata["cli"] == "flag"]


def add_settings_arguments(group: Any) -> None:
    """One option per setting, with the settings' help, choices and defaults."""
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
                help=f"do not {help_text}" if field.default else help_text,
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
            default=field.default,
            metavar=metavar or (f"{{{','.join(choices)}}}" if choices else None),
            help=help_text + default,
        )


def settings_from_arguments(args: argparse.Namespace, **derived: Any) -> RegistrationSettings:
    """The settings the options ask for; ``derived`` fills the fields set from the outputs."""
    return RegistrationSettings(**{f.name: getattr(args, f.name) for f in _cli_fields()}, **derived)
