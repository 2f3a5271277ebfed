"""The ``sglang`` config section: every option of the SGLang backend, its
default, and the combinations that cannot work together, checked here and
nowhere else; plus the map from mezo-run's eviction policies to SGLang's radix
cache (``sglang.eviction_policy``).

The section is ``SGLangOptions``: the keys the backend reads and ``engine``,
the keyword arguments passed to ``sglang.Engine`` over the backend's defaults
(``sglang.engine.mem_fraction_static=0.3``). Any other key of the section
(``sglang.mem_fraction_static=0.3``) is refused when the config is read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

from mezo_core import MezoError
from mezo_core.config import setting
from mezo_core.engine_state import SlotOptions
from mezo_core.interfaces import check_option_types

#: mezo-run EvictionPolicy names -> SGLang's --radix-eviction-policy.
#: SGLang evicts leaves of its radix tree, ordered by a per-node priority:
#: last access time (lru), (hit count, last access) (lfu), creation time (fifo).
#: mezo's LFU breaks ties by oldest insertion, SGLang's by least recent access.
RADIX_EVICTION = {"lru": "lru", "lfu": "lfu", "fifo": "fifo"}

#: policies SGLang's radix cache cannot honour, with the reason.
UNSUPPORTED_EVICTION = {
    "size": "GreedyDual-Size ranks entries by (hits+1)/bytes, but SGLang's radix tree ranks "
            "nodes only by access time, hit count, creation time or request priority; "
            "a node's size plays no part",
}

#: how the engine's adapter follows the state (see ``transport.py``)
TRANSPORTS = ("auto", "in_place", "bucket", "tensors", "disk")


def radix_eviction_policy(name: str | None) -> str | None:
    """SGLang's radix eviction policy for mezo-run's eviction policy ``name``
    (None: leave SGLang's default, LRU). Raises MezoError for a policy that the
    radix cache cannot honour."""
    if name is None:
        return None
    key = str(name).lower()
    if key in RADIX_EVICTION:
        return RADIX_EVICTION[key]
    if key in UNSUPPORTED_EVICTION:
        raise MezoError(f"sglang.eviction_policy: {name!r} cannot be honoured by SGLang's radix "
                        f"cache: {UNSUPPORTED_EVICTION[key]}. Use one of "
                        f"{', '.join(sorted(RADIX_EVICTION))}")
    raise MezoError(f"sglang.eviction_policy: {name!r} has no SGLang radix-cache counterpart "
                    f"(SGLang can honour {', '.join(sorted(RADIX_EVICTION))}; its own policies "
                    f"'slru' and 'priority' can be set with sglang.radix_eviction_policy)")


@dataclass
class SGLangOptions(SlotOptions):
    eviction_policy: Optional[str] = setting(None, "a mezo-run eviction policy (lru, lfu, fifo) as SGLang's "
                                                   "radix_eviction_policy; None: SGLang's default (LRU)")
    adapter_transport: str = setting("auto", "how the engine follows the state: \"in_place\" (seeds to the "
                                             "scheduler, slots written in place), or a new adapter version "
                                             "per change: \"bucket\" (one flattened fp32 tensor), \"tensors\", "
                                             "\"disk\"; auto: in_place")
    name: str = setting("mezo", "engine-side adapter names: <name>, <name>-minus, <name>-s<k> (in_place), "
                                "<name>-v<version> (the other transports)")
    prime_min_tokens: int = setting(0, "a batch whose requests share at least this many leading tokens (up to "
                                       "their logprob_start_len) sends one request first, so that the others "
                                       "find the shared prefix in the radix cache (0: never). Requests sent "
                                       "together share nothing, and every MeZO forward runs under a new "
                                       "adapter version, so in training this is the only way the radix cache "
                                       "saves work. It costs one more engine round trip (~20-60 ms on an "
                                       "H100): at 16 x 128 tokens with a 112-token shared prefix it made a "
                                       "135M-shape step slower (280 vs 204 ms); it pays off for long shared "
                                       "contexts on large models.")
    engine: Dict[str, Any] = setting(factory=dict, help="keyword arguments for sglang.Engine, over the "
                                                        "defaults")

    def __post_init__(self):
        check_option_types(self, "sglang")
        if self.adapter_transport not in TRANSPORTS:
            raise MezoError(f"sglang.adapter_transport: {self.adapter_transport!r} "
                            f"(use {', '.join(repr(t) for t in TRANSPORTS)})")
        if self.prime_min_tokens < 0:
            raise MezoError(f"sglang.prime_min_tokens: {self.prime_min_tokens} (0 or more)")
        policy = radix_eviction_policy(self.eviction_policy)
        native = self.engine.get("radix_eviction_policy")
        if policy is not None and native is not None and native != policy:
            raise MezoError(f"sglang: eviction_policy maps to radix_eviction_policy={policy!r} "
                            f"but radix_eviction_policy={native!r} is also set")
