"""Eviction policies for byte-budgeted caches."""
import itertools
from collections import OrderedDict

from mezo_core import EvictionPolicy


class LRU(EvictionPolicy):
    """Least recently used first."""
    name = "lru"

    def __init__(self):
        self.order = OrderedDict()

    def insert(self, key, nbytes):
        self.order[key] = nbytes
        self.order.move_to_end(key)

    def touch(self, key):
        self.order.move_to_end(key)

    def remove(self, key):
        self.order.pop(key, None)

    def victim(self):
        return next(iter(self.order))


class FIFO(LRU):
    """Oldest insertion first; hits do not refresh."""
    name = "fifo"

    def touch(self, key):
        pass


class LFU(EvictionPolicy):
    """Fewest hits first; ties go to the oldest insertion."""
    name = "lfu"

    def __init__(self):
        self.counts = {}
        self.clock = itertools.count()

    def insert(self, key, nbytes):
        self.counts[key] = [0, next(self.clock)]

    def touch(self, key):
        self.counts[key][0] += 1

    def remove(self, key):
        self.counts.pop(key, None)

    def victim(self):
        return min(self.counts, key=lambda k: self.counts[k])


class SizeAware(EvictionPolicy):
    """GreedyDual-Size: evicts the entry with the least (hits+1)/bytes, aged so
    that old large entries eventually go even if they were popular once."""
    name = "size"

    def __init__(self):
        self.entries = {}  # key -> [priority, nbytes, hits]
        self.age = 0.0

    def _priority(self, nbytes, hits):
        return self.age + (hits + 1) / max(1, nbytes)

    def insert(self, key, nbytes):
        self.entries[key] = [self._priority(nbytes, 0), nbytes, 0]

    def touch(self, key):
        entry = self.entries[key]
        entry[2] += 1
        entry[0] = self._priority(entry[1], entry[2])

    def remove(self, key):
        self.entries.pop(key, None)

    def victim(self):
        key = min(self.entries, key=lambda k: self.entries[k][0])
        self.age = self.entries[key][0]
        return key
