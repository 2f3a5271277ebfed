"""The SGLang backend: MeZO's forward passes on SGLang's offline Engine, with
LoRA and the radix (prefix) cache. SGLang is imported only when the backend is
constructed, so this plugin loads (and ``mezo-run backends`` lists it) where
SGLang is not installed."""
from mezo_core import hookimpl


@hookimpl
def register_backends(register):
    from .backend import SGLangBackend
    register(SGLangBackend)
