"""mezo_core: the MeZO step, the perturbation engine, the trainer and the
interfaces that plugins implement. Read in this order: interfaces, perturb,
mezo, registry, config, data, trainer, cli."""
from .hookspecs import hookimpl
from .interfaces import Backend, BackendStats, EvictionPolicy, Example, LocalTensorsBackend, Schedule, Signals
from .errors import MezoError

__all__ = ["hookimpl", "Backend", "BackendStats", "LocalTensorsBackend", "EvictionPolicy", "Example", "Schedule", "Signals", "MezoError"]
__version__ = "0.1.0"
