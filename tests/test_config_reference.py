"""The README's config reference is the schema's: every field listed, with its default and
its meaning (the field's ``metadata["help"]``, in schema.py or a plugin's options
dataclass), and nothing else."""
import dataclasses
import typing
from pathlib import Path

from mezo_core import config
from mezo_core.config_reference import all_rows, markdown, readme_section
from mezo_core.registry import get_registry

README = Path(__file__).resolve().parents[1] / "README.md"


def leaves(cls, prefix=""):
    """(dotted name, the field's metadata help) of every leaf field, walking the dataclasses."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += leaves(hints[f.name], prefix + f.name + ".")
        else:
            out.append((prefix + f.name, f.metadata.get("help")))
    return out


def test_readme_table_is_the_generated_one():
    assert readme_section(README.read_text()) == markdown(get_registry()), "run: mezo-run config --reference"


def test_every_field_is_listed_with_its_metadata_help():
    rows = all_rows(get_registry())
    # the oracle: the dataclasses themselves, plugin sections included, and their metadata
    expected = leaves(config.schema(get_registry()))
    assert [name for name, _, _ in rows] == [name for name, _ in expected]
    assert {"hf", "vllm", "sglang"} <= {name.split(".")[0] for name, _ in expected}
    missing = [name for name, help in expected if not help]
    assert not missing, f"fields without metadata help: {missing}"
    assert [note for _, _, note in rows] == [help.replace("|", "\\|") for _, help in expected]


def test_help_is_metadata_not_comments():
    """A dataclass whose fields carry comments but no metadata has no meanings: the
    reference reads field metadata alone, so comment layout is not code."""
    @dataclasses.dataclass
    class Commented:
        width: int = 4                      # a comment, not help
        depth: int = dataclasses.field(default=2, metadata={"help": "how deep | really"})

    from mezo_core.config_reference import rows
    assert rows(Commented, "x.") == [("x.width", "`4`", ""), ("x.depth", "`2`", "how deep \\| really")]
