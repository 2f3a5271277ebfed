"""Plugins: the built-ins come through the ``mezo`` entry points with their
distribution names; an outside plugin distribution (simulated with a
``*.dist-info`` folder on sys.path) is listed by ``mezo-run backends`` and used
for training; the on_step_end hook; the built-in schedules and eviction policies."""
from __future__ import annotations

import dataclasses
import json
import math
import re
import sys

import pytest
import yaml

from mezo_core import EvictionPolicy, MezoError, Schedule, hookimpl
from mezo_core.registry import Registry, get_registry, make_plugin_manager
from tiny import write_run_config

TOY_DIST, TOY_VERSION, TOY_MODULE = "mezo-toy-plugin", "9.8.7", "mezo_toy_plugin"


TOY_SOURCE = '''
"""An outside mezo-run plugin: a backend (the hf one, instrumented) with options
of its own, an unavailable backend and a schedule."""
from dataclasses import dataclass, field, replace
from typing import ClassVar

from mezo_core import EvictionPolicy, Schedule, hookimpl
from mezo_core.config import plugin_options, setting
from mezo_backend_hf.backend import HFBackend

CALLS = {"init": 0, "losses": 0}


@dataclass
class ToyOptions:
    width: int = field(default=4, metadata={"help": "how wide the toy is"})
    label: str = setting("plain", "what it is called")


class ToyBackend(HFBackend):
    name = "toy"
    capabilities = ("cpu", "toy-capability")
    options: ClassVar[type] = ToyOptions

    def __init__(self, cfg, registry=None):
        CALLS["init"] += 1
        CALLS["options"] = plugin_options(cfg, type(self))
        CALLS["registry"] = registry
        super().__init__(cfg, registry)

    def losses(self, batch, *args, **kwargs):
        CALLS["losses"] += 1
        return super().losses(batch, *args, **kwargs)

    def stats(self):
        return replace(super().stats(), requests=CALLS["losses"])  # its own counter, logged per step


class OffBackend(ToyBackend):
    name = "toy-off"
    options = None      # not an identifier: no config section

    @classmethod
    def unavailable_reason(cls):
        return "needs the frobnicator engine"


@dataclass
class StingyOptions:
    spare: int = setting(0, "entries it never evicts first")


class Stingy(EvictionPolicy):
    """LRU that records the options it was built with."""
    name = "stingy"
    options: ClassVar[type] = StingyOptions

    def __init__(self, options):
        CALLS["policy_options"] = options
        self.order = []

    def insert(self, key, nbytes):
        self.order.append(key)

    def touch(self, key):
        self.order.remove(key)
        self.order.append(key)

    def remove(self, key):
        self.order.remove(key)

    def victim(self):
        return self.order[0]


class Half(Schedule):
    name = "toy-half"

    def value(self, progress):
        return self.start / 2


@hookimpl
def register_backends(register):
    register(ToyBackend)
    register(OffBackend)


@hookimpl
def register_epsilon_schedules(register):
    register(Half)


@hookimpl
def register_eviction_policies(register):
    register(Stingy)
'''


@pytest.fixture
def toy_plugin(install_plugin):
    return install_plugin(TOY_MODULE, TOY_DIST, TOY_VERSION, TOY_SOURCE, "toyplugin")


def write_config(tmp_path, model):
    return write_run_config(tmp_path, model, {"mezo.steps": 3, "task.k_per_class": 2,
                                              "mezo.lr": 1.0e-3, "mezo.eps": 1.0e-3})


# -- built-ins ---------------------------------------------------------------------
def test_builtins_are_registered_with_their_distributions():
    reg = Registry(make_plugin_manager())
    hf = reg.items["backends"]["hf"]
    assert (hf.distribution, hf.version, hf.plugin) == ("mezo-run", "0.1.0", "hf")
    from mezo_backend_hf.backend import HFBackend
    assert reg.get("backends", "hf") is HFBackend
    for name in ("constant", "linear", "cosine", "exponential"):
        entry = reg.items["epsilon_schedules"][name]
        assert entry.distribution == "mezo-run" and entry.plugin == "builtin"
        assert issubclass(entry.obj, Schedule)
    for name in ("lru", "lfu", "fifo", "size"):
        entry = reg.items["eviction_policies"][name]
        assert entry.distribution == "mezo-run"
        assert issubclass(entry.obj, EvictionPolicy)


def test_unknown_name_is_a_mezo_error_listing_the_known_ones():
    reg = Registry(make_plugin_manager())
    with pytest.raises(MezoError, match=r"unknown backend 'nope' \(registered: .*hf"):
        reg.get("backends", "nope")
    with pytest.raises(MezoError, match="unknown epsilon schedule 'zigzag'.*constant"):
        reg.get("epsilon_schedules", "zigzag")


def test_plugin_registered_in_code():
    class Plugin:
        @hookimpl
        def register_epsilon_schedules(self, register):
            register(type("Flat", (Schedule,), {"name": "flat", "value": lambda self, p: 1.0}))

    reg = Registry(make_plugin_manager([Plugin()]))
    entry = reg.items["epsilon_schedules"]["flat"]
    assert entry.distribution == "(not from a distribution)"
    assert reg.get("epsilon_schedules", "flat")(3.0)(0, 10) == 1.0
    assert "constant" in reg.items["epsilon_schedules"]   # built-ins still there


# -- an outside plugin distribution -----------------------------------------------
def test_outside_plugin_is_discovered_through_entry_points(toy_plugin):
    reg = Registry(make_plugin_manager())
    toy = reg.items["backends"]["toy"]
    assert (toy.distribution, toy.version, toy.plugin) == (TOY_DIST, TOY_VERSION, "toyplugin")
    assert reg.get("backends", "toy").__module__ == TOY_MODULE
    assert reg.items["epsilon_schedules"]["toy-half"].distribution == TOY_DIST
    assert "hf" in reg.items["backends"] and "constant" in reg.items["epsilon_schedules"]


def test_backends_command_lists_the_outside_plugin(toy_plugin, capsys):
    from mezo_core.cli import main
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    toy_line = next(line for line in out.splitlines() if line.startswith("toy "))
    assert "available" in toy_line and TOY_DIST in toy_line and TOY_VERSION in toy_line
    assert "toy-capability" in toy_line
    off_line = next(line for line in out.splitlines() if line.startswith("toy-off"))
    assert "unavailable" in off_line
    assert "-> needs the frobnicator engine" in out
    hf_line = next(line for line in out.splitlines() if line.startswith("hf "))
    assert "mezo-run" in hf_line and "0.1.0" in hf_line
    assert f"toy-half ({TOY_DIST})" in out
    assert "constant (mezo-run)" in out and "lru (mezo-run)" in out


def test_training_uses_the_outside_backend_and_schedule(toy_plugin, tmp_path, tiny_llama, capsys):
    from mezo_core.cli import main
    cfg = write_config(tmp_path, tiny_llama)
    rc = main(["train", "-c", str(cfg), "backend=toy", "mezo.eps_schedule=toy-half"])
    assert rc == 0, capsys.readouterr().err
    calls = sys.modules[TOY_MODULE].CALLS
    assert calls["init"] == 1 and calls["losses"] > 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["requests"] > 0 for r in rows)
    assert all(r["eps"] == pytest.approx(0.5e-3) for r in rows)
    assert "(toy backend)" in capsys.readouterr().out


def test_outside_backend_gets_its_typed_options_and_the_registry(toy_plugin, tmp_path, tiny_llama, capsys):
    from mezo_core.cli import main
    cfg = write_config(tmp_path, tiny_llama)
    rc = main(["train", "-c", str(cfg), "backend=toy", "toy.width=7", "mezo.steps=1"])
    assert rc == 0, capsys.readouterr().err
    calls = sys.modules[TOY_MODULE].CALLS
    assert calls["options"] == sys.modules[TOY_MODULE].ToyOptions(width=7, label="plain")
    assert isinstance(calls["registry"], Registry) and "toy" in calls["registry"].items["backends"]


def test_outside_eviction_policy_is_built_with_its_options(toy_plugin, tmp_path, tiny_llama, capsys):
    from mezo_core.cli import main
    cfg = write_config(tmp_path, tiny_llama)
    rc = main(["train", "-c", str(cfg), "hf.trunk_cache=true", "hf.cache_policy=stingy", "stingy.spare=3",
               "lora.layers=[2,3]", "mezo.steps=1"])
    assert rc == 0, capsys.readouterr().err
    assert sys.modules[TOY_MODULE].CALLS["policy_options"] == sys.modules[TOY_MODULE].StingyOptions(spare=3)


@pytest.mark.parametrize("override, message", [
    ("toy.nope=1", r"override 'toy.nope=1': field 'toy.nope': Key 'nope' not in 'ToyOptions' "
                   r"\(its keys: width, label\)"),
    ("toy.width=wide", r"override 'toy.width=wide': field 'toy.width': Value 'wide' .*could not be converted"),
    ("elsewhere.x=1", r"field 'elsewhere': .*neither a core field nor the section of an installed plugin"),
])
def test_outside_backend_options_are_checked_like_the_core_config(toy_plugin, tmp_path, tiny_llama, capsys,
                                                                  override, message):
    from mezo_core.cli import main
    cfg = write_config(tmp_path, tiny_llama)
    assert main(["train", "-c", str(cfg), "backend=toy", override]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_outside_backend_options_in_a_file_name_the_line(toy_plugin, tmp_path, tiny_llama, capsys):
    from mezo_core.cli import main
    cfg = write_config(tmp_path, tiny_llama)
    text = cfg.read_text() + "toy:\n  label: round\n  width: [1, 2]\n"
    cfg.write_text(text)
    line = text.splitlines().index("  width: [1, 2]") + 1
    assert main(["config", "-c", str(cfg)]) == 2
    assert re.search(rf"{re.escape(str(cfg))}, line {line}: field 'toy.width': ", capsys.readouterr().err)


def test_outside_backend_options_show_with_defaults(toy_plugin, capsys):
    from mezo_core.cli import main
    assert main(["config", "toy.label=round"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["toy"] == {"width": 4, "label": "round"} and "toy-off" not in shown
    assert main(["config", "--reference"]) == 0
    table = capsys.readouterr().out
    assert "| `toy.width` | `4` |  | how wide the toy is |" in table   # no recipe value: the empty column
    assert "| `toy.label` | `'plain'` |  | what it is called |" in table


def test_options_of_other_kinds_and_section_clashes(tmp_path):
    from mezo_core.config import load_config

    @dataclasses.dataclass
    class LoudOptions:
        volume: float = 0.5

    class Loud:
        name, options = "loud", LoudOptions

    class Model:   # a logger whose section would hide the core's `model`
        name, options = "model", LoudOptions

    def plugin(*classes):
        class Plugin:
            @hookimpl
            def register_loggers(self, register):
                for cls in classes:
                    register(cls)
        return Registry(make_plugin_manager([Plugin()]))

    cfg = load_config(None, ["loud.volume=2"], plugin(Loud))
    assert cfg.loud.volume == 2.0 and "lru" not in cfg   # plugins without options: no section
    with pytest.raises(MezoError, match=r"field 'loud.volume': Value 'x'"):
        load_config(None, ["loud.volume=x"], plugin(Loud))
    with pytest.raises(MezoError, match=r"logger 'model' .*: its options section 'model' is taken by the core config"):
        load_config(None, [], plugin(Model))


def test_registration_takes_the_class_alone():
    class Plugin:
        @hookimpl
        def register_eviction_policies(self, register):
            register("old", EvictionPolicy)

    with pytest.raises(MezoError, match=r"register takes one class, named by its `name` attribute"):
        Registry(make_plugin_manager([Plugin()]))


def test_unavailable_outside_backend_is_refused(toy_plugin, tmp_path, tiny_llama, capsys):
    from mezo_core.cli import main
    cfg = write_config(tmp_path, tiny_llama)
    assert main(["train", "-c", str(cfg), "backend=toy-off"]) == 2
    err = capsys.readouterr().err
    assert "toy-off" in err and "frobnicator" in err
    assert not (tmp_path / "run").exists()


# -- the step-end hook ---------------------------------------------------------------
def test_on_step_end_hook_is_called_every_step(tmp_path, tiny_llama):
    from mezo_backend_hf.backend import HFBackend
    from mezo_core.config import load_config
    from mezo_core.trainer import Trainer

    class Recorder:
        def __init__(self):
            self.calls = []

        @hookimpl
        def on_step_end(self, step, metrics):
            self.calls.append((step, dict(metrics)))

    rec = Recorder()
    registry = Registry(make_plugin_manager([rec]))
    cfg = load_config(write_config(tmp_path, tiny_llama), ["mezo.steps=4", "zero_shot=false"])
    backend = HFBackend(cfg, registry)
    try:
        Trainer(cfg, backend, registry).train()
    finally:
        backend.close()
    assert [s for s, _ in rec.calls] == [1, 2, 3, 4]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m for _, m in rec.calls] == rows   # the same dict that goes to metrics.jsonl
    assert {"loss", "eps", "lr", "grads", "seeds"} <= set(rows[0])


# -- schedules -----------------------------------------------------------------------
def schedule(name, *args):
    return get_registry().get("epsilon_schedules", name)(*args)


def test_schedule_values():
    total = 101   # progress = step / 101
    c = schedule("constant", 1e-3)
    assert [c(s, total) for s in (0, 50, 100)] == [1e-3] * 3
    lin = schedule("linear", 1e-2, 1e-4)
    assert lin.value(0.0) == pytest.approx(1e-2)
    assert lin.value(0.5) == pytest.approx(0.5 * (1e-2 + 1e-4))
    assert lin.value(1.0) == pytest.approx(1e-4)
    assert lin(50, 100) == pytest.approx(lin.value(0.5))
    cos = schedule("cosine", 1e-2, 1e-4)
    assert cos.value(0.0) == pytest.approx(1e-2)
    assert cos.value(0.5) == pytest.approx(0.5 * (1e-2 + 1e-4))
    assert cos.value(0.25) == pytest.approx(1e-4 + 0.5 * (1e-2 - 1e-4) * (1 + math.cos(math.pi / 4)))
    assert cos.value(1.0) == pytest.approx(1e-4)
    exp = schedule("exponential", 1e-2, 1e-4)
    assert exp.value(0.0) == pytest.approx(1e-2)
    assert exp.value(0.5) == pytest.approx(1e-3)
    assert exp.value(1.0) == pytest.approx(1e-4)
    values = [exp(s, 100) for s in range(100)]
    assert values[0] == pytest.approx(1e-2)
    assert all(a > b for a, b in zip(values, values[1:]))
    assert 1e-4 < values[-1] < 1.1e-4
    # geometric: constant ratio between steps
    ratios = [b / a for a, b in zip(values, values[1:])]
    assert max(ratios) == pytest.approx(min(ratios))
    # end defaults to start: every shape is then constant
    for name in ("linear", "cosine", "exponential"):
        s = schedule(name, 2e-3)
        assert [s(k, 10) for k in range(10)] == pytest.approx([2e-3] * 10)


def test_schedule_warmup():
    s = schedule("linear", 1.0, 0.0, 4)
    assert [s(k, 14) for k in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert s(4, 14) == pytest.approx(1.0)          # the shape starts after warm-up
    assert s(9, 14) == pytest.approx(0.5)
    assert s(13, 14) == pytest.approx(0.1)
    assert s(14, 14) == pytest.approx(0.0)
    w = schedule("constant", 3.0, None, 2)
    assert [w(k, 5) for k in range(5)] == pytest.approx([1.5, 3.0, 3.0, 3.0, 3.0])


def test_exponential_needs_positive_ends():
    with pytest.raises(ValueError):
        schedule("exponential", 1e-2, 0.0).value(0.5)


# -- eviction policies ----------------------------------------------------------------
def policy(name):
    return get_registry().get("eviction_policies", name)()


def fill(p, sizes):
    for key, nbytes in sizes.items():
        p.insert(key, nbytes)
    return p


EVICTION_SCRIPTS = {   # case: (policy, steps "insert KEY BYTES", "touch KEY [TIMES]", "remove KEY", "victim KEY")
    "lru": ("lru", "insert a 10; insert b 10; insert c 10; victim a; touch a; victim b; remove b; victim c; "
                   "touch c; victim a"),
    "fifo ignores hits": ("fifo", "insert a 10; insert b 10; insert c 10; touch a 2; victim a; remove a; victim b"),
    # least hits first; a new entry has none
    "lfu": ("lfu", "insert a 10; insert b 10; insert c 10; touch a 3; touch b; touch c 2; victim b; remove b; "
                   "victim c; insert d 10; victim d"),
    "lfu tie: oldest insertion": ("lfu", "insert x 1; insert y 1; victim x"),
}


@pytest.mark.parametrize("case", list(EVICTION_SCRIPTS))
def test_eviction_order(case):
    name, script = EVICTION_SCRIPTS[case]
    p = policy(name)
    for n, step in enumerate(script.split("; ")):
        op, key, *arg = step.split()
        if op == "insert":
            p.insert(key, int(arg[0]))
        elif op == "touch":
            for _ in range(int(arg[0]) if arg else 1):
                p.touch(key)
        elif op == "remove":
            p.remove(key)
        else:
            assert (op, p.victim()) == ("victim", key), (n, step)


def test_size_aware():
    p = fill(policy("size"), {"small": 10, "big": 10_000, "mid": 1_000})
    assert p.victim() == "big"           # least (hits+1)/bytes
    p.remove("big")
    for _ in range(20):
        p.touch("mid")                   # (hits+1)/bytes = 21/1000 < 1/10: still first
    assert p.victim() == "mid"
    for _ in range(200):
        p.touch("mid")                   # 221/1000 > 1/10: small goes first
    assert p.victim() == "small"
    p.remove("small")
    # aging: after an eviction at priority L, new entries start from L
    p.insert("new-big", 10_000)
    assert p.entries["new-big"][0] >= 1 / 10
