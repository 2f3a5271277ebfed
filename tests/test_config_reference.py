"""The README's config reference is the schema's: every field listed, with its default and a
meaning (the comment on its line in config.py), and nothing else."""
import dataclasses
from pathlib import Path

from mezo_core import config
from mezo_core.config_reference import markdown, readme_section, rows

README = Path(__file__).resolve().parents[1] / "README.md"


def leaves(cls, prefix=""):
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type if not isinstance(f.type, str) else getattr(config, f.type, None)):
            out += leaves(getattr(config, f.type) if isinstance(f.type, str) else f.type, prefix + f.name + ".")
        else:
            out.append(prefix + f.name)
    return out


def test_readme_table_is_the_generated_one():
    assert readme_section(README.read_text()) == markdown(), "run: mezo-run config --reference"


def test_every_field_is_listed_with_a_meaning():
    listed = [name for name, _, _ in rows()]
    assert listed == leaves(config.RunConfig)        # the oracle: the dataclasses themselves
    assert all(note for _, _, note in rows()), [name for name, _, note in rows() if not note]
