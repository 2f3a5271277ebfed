"""mezo_core: the MeZO step, the perturbation engine, the trainer and the
interfaces that plugins implement. Read in this order: forwards, interfaces,
perturb, mezo, registry, config, data, trainer, cli."""
from .threads import passive_wait_for_the_cli

passive_wait_for_the_cli()  # before anything imports torch: OpenMP reads it when torch loads it

from .hookspecs import hookimpl
from .forwards import Example, objective
from .interfaces import Backend, EvictionPolicy, LocalTensorsBackend, Schedule, Signals
from .stats import BackendStats
from .errors import MezoError
from .estimator import Estimator

__all__ = ["hookimpl", "Backend", "BackendStats", "LocalTensorsBackend", "EvictionPolicy", "Example", "objective", "Schedule", "Signals", "MezoError", "Estimator"]
__version__ = "0.1.0"
