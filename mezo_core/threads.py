"""torch's intra-op threads on the CPU: OpenMP's wait policy for the CLI, and a
hint when steps run slowly because other jobs hold the cores.

Measured on a 2-core machine shared with other jobs (``python -m
benchmarks.bench_threads``, its threads-cpu-*.json under benchmarks/results/; a
forward of the demo's shape, 4 rounds): with 2 busy processes beside it, 2 threads
under OpenMP's default wait policy (threads spin while they wait for one another)
took up to 4.2x as long as 1 thread in the same round (medians 1600 vs 537 ms); 2
threads that sleep instead (OMP_WAIT_POLICY=PASSIVE) took 0.68-1.55x as long as 1
thread with 1 or 2 busy processes beside them, and with none kept 2 threads' gain
(152 vs 267 ms at best, as fast as spinning).
The wait policy does not change a single bit of a forward; the thread count does
(MKL splits some small matrices by thread), so the default count stays a function
of the usable cores alone (cli.set_threads), never of the load, which changes from
run to run and would break bit-for-bit --resume.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

#: the variables through which OpenMP runtimes (libgomp, Intel's libiomp5) are told how threads wait
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def is_cli(argv0: str) -> bool:
    """Whether this process is ``mezo-run`` (the console script, or ``python -m
    mezo_core.cli``: while Python locates the module, argv[0] is "-m")."""
    return Path(argv0).name in ("mezo-run", "mezo-run.exe") or argv0 == "-m"


def passive_wait_for_the_cli(environ=None, argv0=None, torch_loaded=None) -> bool:
    """In the ``mezo-run`` process, OMP_WAIT_POLICY=PASSIVE unless the user set how
    OpenMP threads wait; set before torch is imported (libgomp reads it when torch
    loads it) -- else too late, and left alone. Returns whether it set it."""
    environ = os.environ if environ is None else environ
    argv0 = (sys.argv[0] if sys.argv else "") if argv0 is None else argv0
    torch_loaded = "torch" in sys.modules if torch_loaded is None else torch_loaded
    if torch_loaded or not is_cli(argv0) or any(v in environ for v in WAIT_VARIABLES):
        return False
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def slow_step_hint(threads: int, cores: int, load: float, cpu_seconds: float, wall_seconds: float,
                   passive: bool = True, pressure: float | None = None) -> str | None:
    """A one-line hint when a step ran far slower than its threads could: they had
    their cores less than 3/4 of the time (one thread: half; ``cpu_seconds`` of the process over
    ``wall_seconds`` x ``threads``) while other work competes for the cores: Linux's
    CPU ``pressure`` (the share of the last 10 s in which some task waited for a core,
    in %) at least 20, or where it is not known, the 1-minute ``load`` average above the
    ``cores``. ``passive``: OpenMP threads sleep while they wait (OMP_WAIT_POLICY=PASSIVE).
    None when nothing suggests that."""
    if wall_seconds <= 0 or threads < 1:
        return None
    share = cpu_seconds / (wall_seconds * threads)
    contended = pressure >= 20 if pressure is not None else load > cores
    if share >= (0.75 if threads > 1 else 0.5) or not contended:  # one thread: said at half speed or worse
        return None
    where = f"load average {load:.1f} on {cores} usable core{'s' if cores != 1 else ''}"
    if pressure is not None:
        where += f", tasks waited for a core {pressure:.0f}% of the last 10 s"
    where += ": other jobs compete for them"
    if threads == 1:
        return f"steps run slowly: the step had its core {share:.0%} of the time ({where})"
    said = f"steps run slowly: the {threads} torch threads had their cores {share:.0%} of the time ({where}); "
    if passive:
        return said + "threads=1 may be faster here (README: Threads; the thread count can change a run's last bits)"
    return said + ("OpenMP threads spin while they wait for one another: threads=1 or OMP_WAIT_POLICY=PASSIVE "
                   "was up to 4x faster on a loaded 2-core machine (README: Threads)")


def cpu_pressure(path="/proc/pressure/cpu") -> float | None:
    """Linux's PSI "some avg10" for the CPU (%), None where the kernel has none."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("some "):
                    return float(dict(kv.split("=") for kv in line.split()[1:])["avg10"])
    except (OSError, ValueError, KeyError):
        pass
    return None


class SlowStepWatch:
    """Around each training step on the CPU: process CPU time against wall time,
    and ``slow_step_hint``'s line printed once (stderr), when it holds for
    ``patience`` steps in a row, from the ``skip``-th step on (the first ones fill caches)."""

    def __init__(self, enabled: bool, threads: int | None = None, cores: int | None = None, skip: int = 2,
                 patience: int = 3, out=None):
        self.enabled, self.skip, self.patience, self.out = enabled, skip, patience, out
        self.steps = self.streak = 0
        self.said = None
        self.threads, self.cores = threads, cores
        if enabled and threads is None:
            import torch
            self.threads = torch.get_num_threads()
        if enabled and cores is None:
            self.cores = usable_cores()
        self.passive = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
        self._cpu = self._wall = None

    def begin(self):
        if self.enabled and self.said is None:
            self._cpu, self._wall = time.process_time(), time.perf_counter()

    def end(self):
        if not self.enabled or self.said is not None or self._cpu is None:
            return
        cpu, wall = time.process_time() - self._cpu, time.perf_counter() - self._wall
        self.steps += 1
        if self.steps < self.skip:
            return
        try:
            load = os.getloadavg()[0]
        except OSError:
            return
        hint = slow_step_hint(self.threads, self.cores, load, cpu, wall, self.passive, cpu_pressure())
        self.streak = self.streak + 1 if hint else 0
        if hint and self.streak >= self.patience:
            self.said = hint
            print(f"mezo-run: note: {hint}", file=self.out or sys.stderr, flush=True)


def usable_cores() -> int:
    """The cores this process may run on: CPU affinity and the cgroup quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:  # cgroup v2 quota: "max 100000" or "200000 100000"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores
