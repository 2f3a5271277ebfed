"""Threads on the CPU (#26 item 5): the CLI's OpenMP threads sleep while they wait
(OMP_WAIT_POLICY=PASSIVE, set before torch loads), and a hint is printed once
when steps run slowly on shared cores."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mezo_core import threads
from mezo_core.cli import main
from mezo_core.registry import get_registry
from mezo_core.threads import SlowStepWatch, slow_step_hint
from tiny import write_run_config


def test_the_cli_sets_a_passive_wait_policy_before_torch_loads():
    env = {}
    assert threads.passive_wait_for_the_cli(env, "/venv/bin/mezo-run", torch_loaded=False)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert threads.passive_wait_for_the_cli({}, "-m", torch_loaded=False)      # python -m mezo_core.cli
    for env, argv0, loaded in (({"OMP_WAIT_POLICY": "ACTIVE"}, "mezo-run", False),   # the user's wins
                               ({"GOMP_SPINCOUNT": "10000"}, "mezo-run", False),
                               ({}, "mezo-run", True),                               # too late: left alone
                               ({}, "/usr/bin/python", False), ({}, "-c", False)):   # a library user
        before = dict(env)
        assert not threads.passive_wait_for_the_cli(env, argv0, torch_loaded=loaded)
        assert env == before


@pytest.mark.parametrize("entry", ["console-script", "-m"])
def test_libgomp_sees_the_passive_policy_in_the_cli(entry):
    """libgomp prints the policy it read when it started (OMP_DISPLAY_ENV)."""
    env = {k: v for k, v in os.environ.items() if k not in threads.WAIT_VARIABLES}
    env["OMP_DISPLAY_ENV"] = "TRUE"
    script = Path(sys.executable).with_name("mezo-run")
    if entry == "console-script" and not script.exists():
        pytest.skip("no mezo-run script beside this Python")
    cmd = [str(script), "backends"] if entry == "console-script" else [sys.executable, "-m", "mezo_core.cli", "backends"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in out.stderr
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in out.stderr


def test_slow_step_hint():
    # threads had their cores: no hint, whatever the load
    assert slow_step_hint(2, 2, load=3.5, cpu_seconds=1.9, wall_seconds=1.0) is None
    # an idle machine (load within the cores): no hint, even if a step spent time single-threaded
    assert slow_step_hint(2, 2, load=1.9, cpu_seconds=1.0, wall_seconds=1.0) is None
    # shared cores: 2 threads at 40 % of their cores -> suggest threads=1
    hint = slow_step_hint(2, 2, load=3.6, cpu_seconds=0.8, wall_seconds=1.0, passive=False)
    assert "threads=1 or OMP_WAIT_POLICY=PASSIVE" in hint and "40%" in hint
    assert "load average 3.6 on 2 usable cores" in hint
    hint = slow_step_hint(2, 2, load=3.6, cpu_seconds=0.8, wall_seconds=1.0, passive=True)
    assert "threads=1 may be faster" in hint and "OMP_WAIT_POLICY" not in hint
    # one thread on a loaded machine: said, nothing to switch
    hint = slow_step_hint(1, 2, load=3.2, cpu_seconds=0.4, wall_seconds=1.0)
    assert hint and "threads=1" not in hint and "40%" in hint
    assert slow_step_hint(1, 2, load=3.2, cpu_seconds=0.6, wall_seconds=1.0) is None   # not far slower
    assert slow_step_hint(2, 2, load=9.0, cpu_seconds=0.0, wall_seconds=0.0) is None
    # where Linux tells CPU pressure, it decides (the load average lags a minute behind)
    assert slow_step_hint(2, 2, load=1.9, cpu_seconds=0.8, wall_seconds=1.0, pressure=45.0)
    assert "waited for a core 45% of the last 10 s" in slow_step_hint(2, 2, 1.9, 0.8, 1.0, pressure=45.0)
    assert slow_step_hint(2, 2, load=3.6, cpu_seconds=0.8, wall_seconds=1.0, pressure=3.0) is None


def test_cpu_pressure(tmp_path):
    psi = tmp_path / "cpu"
    psi.write_text("some avg10=49.49 avg60=32.73 avg300=26.41 total=991909757\n"
                   "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    assert threads.cpu_pressure(psi) == 49.49
    assert threads.cpu_pressure(tmp_path / "none") is None


def test_the_watch_says_it_once(monkeypatch):
    clock = {"cpu": 0.0, "wall": 0.0}
    monkeypatch.setattr(threads.time, "process_time", lambda: clock["cpu"])
    monkeypatch.setattr(threads.time, "perf_counter", lambda: clock["wall"])
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (3.7, 3.0, 2.0))
    monkeypatch.setattr(threads, "cpu_pressure", lambda: None)
    out = io.StringIO()
    watch = SlowStepWatch(True, threads=2, cores=2, skip=2, patience=3, out=out)
    # 2 threads, 1 s a step, 0.6 s of CPU: 30 % of their cores; the 4th step had them.
    # Step 1 is skipped; 2 and 3 slow, 4 not, 5 and 6 slow: never 3 in a row yet
    for cpu in [0.6, 0.6, 0.6, 1.9, 0.6, 0.6]:
        watch.begin()
        clock["cpu"] += cpu
        clock["wall"] += 1.0
        watch.end()
    assert out.getvalue() == ""
    for _ in range(4):
        watch.begin()
        clock["cpu"] += 0.6
        clock["wall"] += 1.0
        watch.end()
    text = out.getvalue()
    assert text.count("mezo-run: note: steps run slowly") == 1 and "threads=1" in text
    quiet = io.StringIO()
    off = SlowStepWatch(False, threads=2, cores=2, out=quiet)
    for _ in range(3):
        off.begin()
        clock["wall"] += 1.0
        off.end()
    assert quiet.getvalue() == ""


def test_a_run_prints_the_hint_once(tmp_path, tiny_llama, capsys, monkeypatch):
    """The trainer watches its steps on the CPU (the hint forced: this machine's load varies)."""
    monkeypatch.setattr(threads, "slow_step_hint", lambda *args: "steps run slowly: (forced)")
    cfg = write_run_config(tmp_path, tiny_llama, {"mezo.steps": 4})
    get_registry.cache_clear()
    try:
        assert main(["train", "-c", str(cfg)]) == 0
    finally:
        get_registry.cache_clear()
    err = capsys.readouterr().err
    assert err.count("mezo-run: note: steps run slowly: (forced)") == 1
