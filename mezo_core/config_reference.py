"""The reference table of every config field, generated from the schema itself
(``mezo_core/schema.py``: the dataclasses, their defaults and each field's
``metadata["help"]``; then each plugin's ``options`` dataclass, read the same
way), so the README's table cannot drift: a test compares them.

    mezo-run config --reference      # prints the Markdown table
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from . import config

BEGIN, END = "<!-- config-reference: begin -->", "<!-- config-reference: end -->"


def _default(field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return ""
    if dataclasses.is_dataclass(value):
        return ""
    return "`null`" if value is None else f"`{value!r}`".replace("|", "\\|")


def help_of(field: dataclasses.Field) -> str:
    """A field's meaning: its ``metadata["help"]`` (``schema.setting`` puts it there)."""
    return field.metadata.get("help", "")


def rows(cls=config.RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, meaning) of every leaf field of ``cls``."""
    hints = typing.get_type_hints(cls)
    out = []
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        name = prefix + field.name
        if dataclasses.is_dataclass(kind):
            out += rows(kind, name + ".")
            continue
        out.append((name, _default(field), help_of(field).replace("|", "\\|")))
    return out


def all_rows(registry) -> list[tuple[str, str, str]]:
    """The core's fields, then each plugin section's (``config.plugin_sections``)."""
    out = rows()
    for name, options in config.plugin_sections(registry).items():
        if dataclasses.is_dataclass(options):
            out += rows(options, name + ".")
        else:
            out.append((name, "`{}`", f"settings of the {name} backend, free-form (it declares no "
                                      "options schema): the backend checks them"))
    return out


def recipe_values(path=None) -> dict[str, str]:
    """Dotted field -> the value the packaged default recipe sets (what a plain
    ``mezo-run train`` runs with), formatted as the defaults are."""
    import yaml
    path = path or config.recipes_dir() / f"{config.DEFAULT_RECIPE}.yaml"
    out = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                out[prefix + key] = "`null`" if value is None else f"`{value!r}`".replace("|", "\\|")
    walk(yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}, "")
    return out


def markdown(registry) -> str:
    recipe = recipe_values()
    lines = [f"| field | default | `mezo-run train` ({config.DEFAULT_RECIPE} recipe) | meaning |",
             "| --- | --- | --- | --- |"]
    lines += [f"| `{name}` | {default} | {recipe.get(name, '') if recipe.get(name) != default else ''} | {note} |"
              for name, default, note in all_rows(registry)]
    return "\n".join(lines)


def readme_section(text: str) -> str:
    """The table between the markers of a README."""
    return text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip()
