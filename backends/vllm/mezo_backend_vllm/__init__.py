"""The vLLM backend plugin (offline ``vllm.LLM``: LoRA, prefix caching, in-place
seeded perturbation in the worker). vLLM is imported only when a backend is built,
so this plugin loads -- and ``mezo-run backends`` lists it as unavailable, with
the reason -- where vLLM is not installed."""
from mezo_core import hookimpl


@hookimpl
def register_backends(register):
    from .backend import VLLMBackend
    register(VLLMBackend)
