"""``python -m benchmarks``: named suites run as processes and recorded as one JSON
(device, versions, command, each step's result); ``list`` shows them all."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import suites  # noqa: E402
from benchmarks.__main__ import MODULES, main  # noqa: E402

FAKE = '''
import argparse, json, sys
p = argparse.ArgumentParser()
p.add_argument("--value", type=int)
p.add_argument("--out")
args = p.parse_args()
print("measured", args.value)
json.dump({"value": args.value}, open(args.out, "w"))
open(args.out[:-5] + ".png", "w").write("a chart")
sys.exit(0 if args.value else 3)
'''


def test_list_names_every_suite_and_harness(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name, suite in suites.SUITES.items():
        assert f"{name} " in out and suite.about in out
    assert all(m in out for m in MODULES)
    assert "python -m benchmarks.bench_perturb --device cuda --shape llama-6.7b --sweep" in out


def test_every_step_names_a_harness_or_a_tool():
    for suite in suites.SUITES.values():
        for step in suite.steps:
            module = step.argv[0]
            if module == "torch.distributed.run":
                module = step.argv[step.argv.index("-m") + 1]
            assert module == "pytest" or module.removeprefix("benchmarks.") in MODULES, step
            assert module == "pytest" or (ROOT / "benchmarks" / f"{module.split('.')[1]}.py").exists()


def test_run_records_device_versions_command_and_each_result(tmp_path, monkeypatch):
    (tmp_path / "fakebench.py").write_text(FAKE)
    monkeypatch.setitem(suites.SUITES, "fake", suites.Suite("a fake suite", "cpu", (
        suites.Step("one", ("fakebench", "--value", "7")),
        suites.Step("failing", ("fakebench", "--value", "0")),
    )))
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    record = suites.run("fake", tmp_path / "results", env, command="python -m benchmarks run fake")
    files = list((tmp_path / "results").glob("fake-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text()) == record
    assert record["command"] == "python -m benchmarks run fake"
    assert {"device", "python", "torch", "mezo-run"} <= set(record)
    one, failing = record["steps"]
    assert one["rc"] == 0 and one["result"] == {"value": 7} and "measured 7" in one["log_tail"]
    assert one["command"] == "python -m fakebench --value 7"
    assert failing["rc"] == 3 and record["all_ok"] is False
    assert one["files"] == [f"{files[0].stem}-one.png"]    # a chart beside the JSON is kept, named
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == sorted(
        [files[0].name, *one["files"], *failing["files"]])
