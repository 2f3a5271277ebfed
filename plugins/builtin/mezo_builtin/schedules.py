"""Schedules from ``start`` to ``end`` over the steps after warm-up."""
import math

from mezo_core import Schedule


class Constant(Schedule):
    def value(self, progress):
        return self.start


class Linear(Schedule):
    def value(self, progress):
        return self.start + (self.end - self.start) * progress


class Cosine(Schedule):
    def value(self, progress):
        return self.end + 0.5 * (self.start - self.end) * (1 + math.cos(math.pi * progress))


class Exponential(Schedule):
    """Geometric decay: start * (end/start)**progress (e.g. eps 1e-2 -> 1e-4)."""

    def value(self, progress):
        if self.start <= 0 or self.end <= 0:
            raise ValueError("exponential schedule needs start > 0 and end > 0")
        return self.start * (self.end / self.start) ** progress
