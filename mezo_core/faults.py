"""Fault injection for the crash tests: the points where a run may be killed.

A run calls ``fault(point)`` at each place where a crash must leave a folder that
resumes exactly (after the lock, inside a checkpoint write, after the adapter).
It costs one environment lookup and does nothing unless ``MEZO_FAULT`` is set: the
fault suite (tests/test_faults.py) sets it to kill a real process at that point.
"""
from __future__ import annotations

import collections
import os
import signal

_reached = collections.Counter()


def fault(point: str) -> None:
    """Test hook for the fault suite: with ``MEZO_FAULT=<point>[@n]`` in the
    environment the process sends itself SIGKILL (or ``MEZO_FAULT_SIGNAL``,
    e.g. SIGSTOP) the n-th time (default: the first) it reaches ``point`` -- a
    crash exactly there. Points: lock, ckpt-tmp, ckpt-files, ckpt-renamed,
    ckpt-latest, adapter-written. Without the variable this does nothing."""
    spec = os.environ.get("MEZO_FAULT")
    if not spec:
        return
    name, _, n = spec.partition("@")
    if name == point:
        _reached[point] += 1
        if _reached[point] == int(n or 1):
            os.kill(os.getpid(), getattr(signal, os.environ.get("MEZO_FAULT_SIGNAL", "SIGKILL")))
