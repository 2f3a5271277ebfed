"""The architecture's goals hold (``benchmarks/architecture.py`` measures them from the
source): file and class sizes, a short ``Trainer.train``, a narrow ``Backend``, no import
circle in the core, and a batch that flows one way through the hf backend."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import architecture  # noqa: E402


def test_the_goals_hold():
    measured = architecture.measure(with_hf=True)
    assert architecture.missed(measured) == [], measured


def test_the_measures_can_fail(tmp_path, monkeypatch):
    """The measures see what they claim to: a circle, a wide Backend and a callback."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert architecture.circles(graph) == [["a", "b", "c"]]
    wide = "class Backend:\n" + "".join(f"    def m{i}(self): pass\n" for i in range(11))
    tree = ast.parse(wide)
    assert len([n for n in tree.body[0].body if isinstance(n, ast.FunctionDef)]) == 11
    m = {"files_over_limit": {"x.py": 401}, "core_classes_over_limit": {}, "trainer_train_lines": 51,
         "backend_methods": [f"m{i}" for i in range(11)], "core_import_circles": [["a", "b"]],
         "core_imports_of_plugins": [], "hf_batch_returns": 3, "hf_batch_callbacks": ["x -> y:f"] * 3}
    assert len(architecture.missed(m)) == 5
