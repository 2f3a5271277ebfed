"""``key=value`` overrides from the command line, applied to a config as a user
means them: a string field takes the value as written (with the escapes of a
double-quoted YAML string), other fields parse it as YAML, a list or mapping is
replaced rather than merged, and a moved field's old name is refused naming the new.
"""
from __future__ import annotations

import re
from dataclasses import fields, is_dataclass

import yaml
from omegaconf import DictConfig, OmegaConf, StringNode
from omegaconf.errors import OmegaConfBaseException

from .errors import MezoError
from .schema import MOVED


def describe(exc: OmegaConfBaseException) -> tuple[str, str]:
    """(the dotted key, a one-line message) of an OmegaConf error, naming the keys a
    section has where an unknown one was given."""
    key = getattr(exc, "full_key", None) or ""
    msg = str(exc).splitlines()[0]
    kind = getattr(exc, "object_type", None)
    if "." not in key and msg.endswith("not in 'RunConfig'"):
        msg += " (neither a core field nor the section of an installed plugin: see mezo-run backends)"
    elif msg.startswith("Key '") and "not in" in msg and is_dataclass(kind):
        msg += f" (its keys: {', '.join(f.name for f in fields(kind))})"
    return key, msg


def apply_override(cfg: DictConfig, item: str) -> DictConfig:
    """``key=value`` split at the first '='. The value of a string field is taken
    as written (``task.template={text} It was`` is not YAML); other values are
    YAML, as in OmegaConf's dotlist."""
    key, eq, raw = item.partition("=")
    key = key.strip()
    if not eq or not key:
        raise MezoError(f"override {item!r}: expected key=value")
    if not re.fullmatch(r"\w+(\.\w+)*", key):
        raise MezoError(f"override {item!r}: {key!r} is not a dotted field name like mezo.lr")
    if key in MOVED:
        raise MezoError(f"override {item!r}: field {key!r} is now {MOVED[key]!r}")
    node = _schema_node(cfg, key)
    try:
        if isinstance(node, StringNode):
            patch = OmegaConf.create()
            OmegaConf.update(patch, key, None if raw == "null" and node._is_optional() else _unquote(raw))
        else:
            patch = OmegaConf.from_dotlist([f"{key}={raw}"])
        return OmegaConf.merge(replaceable(cfg, patch), patch)
    except yaml.YAMLError as exc:
        raise MezoError(f"override {item!r}: field {key!r}: cannot parse {raw!r}: "
                        f"{getattr(exc, 'problem', None) or 'invalid YAML'}") from None
    except OmegaConfBaseException as exc:
        found, msg = describe(exc)
        raise MezoError(f"override {item!r}: field {found or key!r}: {msg}") from None
    except (TypeError, ValueError) as exc:  # OmegaConf's own, for shapes it cannot merge
        raise MezoError(f"override {item!r}: field {key!r}: {exc}") from None


#: fields that may be a list or a mapping: a new value replaces the old one, never merges into it
REPLACED = ("task.verbalizer", "task.hf_dataset")


def replaceable(cfg: DictConfig, incoming) -> DictConfig:
    """``cfg`` with the REPLACED fields that ``incoming`` sets emptied, so that a
    mapping can replace a list (OmegaConf cannot merge one into the other)."""
    for key in REPLACED:
        node = incoming
        for part in key.split("."):
            node = node.get(part) if hasattr(node, "get") else None
        if node is not None:
            cfg = cfg.copy()
            OmegaConf.update(cfg, key, None, merge=False)
    return cfg


def _schema_node(cfg: DictConfig, key: str):
    """The node at dotted ``key``, or None where the schema has none (the free-form backend sections)."""
    node = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return None
        node = node._get_node(part)
    return node


#: the escapes a string value on the command line understands, as in a double-quoted YAML string
ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def _unquote(raw: str) -> str:
    """``'a b'`` or ``"a b"`` -> ``a b`` (quoted strings were YAML before); anything else
    as written, except the escapes ``\\n``, ``\\t`` and ``\\\\``: a newline, a tab and a
    backslash, so that ``'task.template=Review: {text}\\nSentiment:'`` on the command
    line is the template a recipe writes as ``"Review: {text}\\nSentiment:"`` (other
    backslashes stay as written)."""
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            return raw
        if isinstance(value, str):
            return value
    return re.sub(r"\\([nt\\])", lambda m: ESCAPES[m.group(1)], raw)


def literal_escapes(cfg) -> list[str]:
    """Text fields holding a backslash followed by n or t as two characters: almost always
    a newline or tab meant in a YAML string written without double quotes."""
    words = cfg.task.verbalizer
    words = list(words.values()) if isinstance(words, DictConfig) else list(words or [])
    found = [("task.template", cfg.task.template)] + [("task.verbalizer", w) for w in words]
    return [key for key, text in found if isinstance(text, str) and re.search(r"\\[nt]", text)]
