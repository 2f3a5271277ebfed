"""The README's config reference is the schema's: every field listed, with its default and a
meaning (the comment on its line in config.py, or in a plugin's options dataclass), and
nothing else."""
import dataclasses
import typing
from pathlib import Path

from mezo_core import config
from mezo_core.config_reference import all_rows, markdown, readme_section
from mezo_core.registry import get_registry

README = Path(__file__).resolve().parents[1] / "README.md"


def leaves(cls, prefix=""):
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += leaves(hints[f.name], prefix + f.name + ".")
        else:
            out.append(prefix + f.name)
    return out


def test_readme_table_is_the_generated_one():
    assert readme_section(README.read_text()) == markdown(get_registry()), "run: mezo-run config --reference"


def test_every_field_is_listed_with_a_meaning():
    rows = all_rows(get_registry())
    listed = [name for name, _, _ in rows]
    # the oracle: the dataclasses themselves, plugin sections included
    assert listed == leaves(config.schema(get_registry()))
    assert {"hf", "vllm", "sglang"} <= {name.split(".")[0] for name in listed}
    assert all(note for _, _, note in rows), [name for name, _, note in rows if not note]
