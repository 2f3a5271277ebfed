"""mezo-run's built-in plugin: estimators, rewards, schedules, eviction policies and loggers, registered
through the ``mezo`` entry point exactly as a third-party package would: ``register(cls)``,
named by ``cls.name``."""
from mezo_core import hookimpl

from .directional import LOZO, HiZOO, Sparse
from .estimators import ES, FZOO as FZOOEstimator, SPSA
from .eviction import FIFO, LFU, LRU, SizeAware
from .loggers import CsvLogger, JsonlLogger, TensorBoardLogger, WandbLogger
from .rewards import ExactMatch, LabelWord, Numeric, Regex
from .schedules import FZOO, RMS, Constant, Cosine, Exponential, Linear, NoiseFloor, Spall, SpallEps


@hookimpl
def register_epsilon_schedules(register):
    register(Constant)
    register(Linear)
    register(Cosine)
    register(Exponential)
    # adaptive: they read the run's signals (losses, projected gradients, noise)
    register(Spall)
    register(SpallEps)
    register(NoiseFloor)
    register(FZOO)
    register(RMS)


@hookimpl
def register_eviction_policies(register):
    register(LRU)
    register(LFU)
    register(FIFO)
    register(SizeAware)


@hookimpl
def register_loggers(register):
    register(JsonlLogger)
    register(CsvLogger)
    register(TensorBoardLogger)
    register(WandbLogger)


@hookimpl
def register_estimators(register):
    register(SPSA)
    register(FZOOEstimator)
    register(ES)
    register(HiZOO)
    register(Sparse)
    register(LOZO)


@hookimpl
def register_rewards(register):
    register(LabelWord)
    register(ExactMatch)
    register(Regex)
    register(Numeric)
