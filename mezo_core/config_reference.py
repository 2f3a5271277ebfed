"""The reference table of every config field, generated from the schema itself
(``mezo_core/schema.py``: the dataclasses, their defaults and the comment on
each field's line; then each plugin's ``options`` dataclass, read the same way
from its own module), so the README's table cannot drift: a test compares them.

    mezo-run config --reference      # prints the Markdown table
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import tokenize
import typing
from pathlib import Path

from . import config

BEGIN, END = "<!-- config-reference: begin -->", "<!-- config-reference: end -->"


@functools.lru_cache(maxsize=None)
def _comments(path: str) -> dict[int, str]:
    """Line number of a field -> its comment in the module at ``path``: the comment
    at the end of its line (with comment lines below it aligned to it: a
    continuation), or the comment lines right above it."""
    source = Path(path).read_text()
    out, above, trailing = {}, [], None   # trailing: (field line, comment column)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text, line, col = tok.string.lstrip("#").lstrip(":").strip(), tok.start[0], tok.start[1]
            if not tok.line.strip().startswith("#"):
                out[line], trailing = text, (line, col)
            elif trailing and col == trailing[1]:
                out[trailing[0]] += " " + text
            else:
                above.append(text)
                trailing = None
        elif tok.type == tokenize.NAME and above and tok.start[1] == 4:
            out[tok.start[0]] = " ".join(above)
            above = []
        elif tok.type == tokenize.NAME and tok.start[1] == 4:
            trailing = None if trailing and tok.start[0] != trailing[0] else trailing
    return out


def _field_lines(cls) -> dict[str, int]:
    lines, start = inspect.getsourcelines(cls)
    found = {}
    for offset, text in enumerate(lines):
        name = text.strip().split(":", 1)[0]
        if name.isidentifier() and ":" in text and not text.strip().startswith(("def ", "class ", "@")):
            found.setdefault(name, start + offset)
    return found


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


def rows(cls=config.RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, meaning) of every leaf field of ``cls``."""
    comments, lines = _comments(inspect.getsourcefile(cls)), _field_lines(cls)
    hints = typing.get_type_hints(cls)
    out = []
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        name = prefix + field.name
        if dataclasses.is_dataclass(kind):
            out += rows(kind, name + ".")
            continue
        note = comments.get(lines.get(field.name, -1), "")
        out.append((name, _default(field), note.replace("|", "\\|")))
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
