"""The embedded default backend: transformers + peft, CPU or CUDA."""
from mezo_core import hookimpl


@hookimpl
def register_backends(register):
    from .backend import HFBackend
    register(HFBackend)
