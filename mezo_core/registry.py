"""Plugin discovery: every distribution with a ``mezo`` entry point is loaded,
the built-in ones included, and its ``register_*`` hooks fill the registry."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import pluggy

from . import hookspecs
from .errors import MezoError


@dataclass(frozen=True)
class Registered:
    name: str
    obj: Any            # a Backend/EvictionPolicy/Schedule/Estimator/Reward subclass
    plugin: str         # the plugin (entry point) that registered it
    distribution: str   # its distribution ("builtin" when added in code)
    version: str


class Registry:
    """What the loaded plugins registered, by kind and name."""

    KINDS = {"backends": "register_backends",
             "eviction_policies": "register_eviction_policies",
             "epsilon_schedules": "register_epsilon_schedules",
             "loggers": "register_loggers",
             "estimators": "register_estimators",
             "rewards": "register_rewards"}
    SINGULAR = {"backends": "backend", "eviction_policies": "eviction policy",
                "epsilon_schedules": "epsilon schedule", "loggers": "logger", "estimators": "estimator",
                "rewards": "reward"}

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm
        self.items: dict[str, dict[str, Registered]] = {k: {} for k in self.KINDS}
        dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
        for kind, hook_name in self.KINDS.items():
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                dist = dists.get(id(impl.plugin))
                source = (impl.plugin_name,
                          dist.project_name if dist else "(not from a distribution)",
                          dist.version if dist else "")
                impl.function(register=functools.partial(self._add, kind, source))

    def _add(self, kind, source, cls, *extra):
        """``register(cls)``: one shape for every kind, the name is the class's own."""
        name = getattr(cls, "name", None)
        if extra or not isinstance(name, str) or not name:
            raise MezoError(f"plugin {source[0]!r}: register({cls!r}{', ...' if extra else ''}): "
                            f"register takes one class, named by its `name` attribute")
        self.items[kind][name] = Registered(name, cls, *source)

    def get(self, kind: str, name: str) -> Any:
        try:
            return self.items[kind][name].obj
        except KeyError:
            known = ", ".join(sorted(self.items[kind])) or "none"
            raise MezoError(f"unknown {self.SINGULAR[kind]} {name!r} (registered: {known})") from None

    def hook(self):
        return self.pm.hook

    def plugins(self) -> list[tuple[str, str, str, list[str]]]:
        """Every loaded plugin -- those that only implement hooks (``on_step_end``)
        too: (name, distribution and version, hooks it implements)."""
        dists = {id(plugin): dist for plugin, dist in self.pm.list_plugin_distinfo()}
        out = []
        for name, plugin in sorted(self.pm.list_name_plugin(), key=lambda item: str(item[0])):
            dist = dists.get(id(plugin))
            where = f"{dist.project_name} {dist.version}" if dist else "(not from a distribution)"
            hooks = sorted(h.name for h in (self.pm.get_hookcallers(plugin) or []))
            out.append((str(name), plugin, where, hooks))
        return out


def make_plugin_manager(extra_plugins=()) -> pluggy.PluginManager:
    """Hooks of every ``mezo`` entry point, plus ``extra_plugins`` (objects)."""
    pm = pluggy.PluginManager("mezo")
    pm.add_hookspecs(hookspecs)
    pm.load_setuptools_entrypoints("mezo")
    for plugin in extra_plugins:
        pm.register(plugin)
    return pm


@functools.lru_cache(maxsize=1)
def get_registry() -> Registry:
    """The installed plugins, loaded once: for tests and interactive use. The CLI builds
    its own registry and hands it to what needs one (config, backend, trainer)."""
    return Registry(make_plugin_manager())


def or_installed(registry: Registry | None) -> Registry:
    """``registry``, or the registry of this process's installed plugins: for a config
    or backend made outside a run (tests, notebooks). The one global lookup."""
    return registry if registry is not None else get_registry()
