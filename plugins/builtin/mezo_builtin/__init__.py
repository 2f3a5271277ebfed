"""mezo-run's built-in plugin: schedules, eviction policies and loggers, registered
through the ``mezo`` entry point exactly as a third-party package would."""
from mezo_core import hookimpl

from .eviction import FIFO, LFU, LRU, SizeAware
from .loggers import CsvLogger, JsonlLogger, TensorBoardLogger
from .schedules import FZOO, RMS, Constant, Cosine, Exponential, Linear, NoiseFloor, Spall, SpallEps


@hookimpl
def register_epsilon_schedules(register):
    register("constant", Constant)
    register("linear", Linear)
    register("cosine", Cosine)
    register("exponential", Exponential)
    # adaptive: they read the run's signals (losses, projected gradients, noise)
    register("spall", Spall)
    register("spall_eps", SpallEps)
    register("noise_floor", NoiseFloor)
    register("fzoo", FZOO)
    register("rms", RMS)


@hookimpl
def register_eviction_policies(register):
    register("lru", LRU)
    register("lfu", LFU)
    register("fifo", FIFO)
    register("size", SizeAware)


@hookimpl
def register_loggers(register):
    register("jsonl", JsonlLogger)
    register("csv", CsvLogger)
    register("tensorboard", TensorBoardLogger)
