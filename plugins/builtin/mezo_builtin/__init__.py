"""mezo-run's built-in plugin: schedules and eviction policies, registered
through the ``mezo`` entry point exactly as a third-party package would."""
from mezo_core import hookimpl

from .eviction import FIFO, LFU, LRU, SizeAware
from .schedules import Constant, Cosine, Exponential, Linear


@hookimpl
def register_epsilon_schedules(register):
    register("constant", Constant)
    register("linear", Linear)
    register("cosine", Cosine)
    register("exponential", Exponential)


@hookimpl
def register_eviction_policies(register):
    register("lru", LRU)
    register("lfu", LFU)
    register("fifo", FIFO)
    register("size", SizeAware)
