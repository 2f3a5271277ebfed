"""A run's state on disk, as the trainer sees it: a fresh start or a resume from the
newest intact checkpoint (checked to continue the same trajectory), checkpoints that
hold everything a bitwise resume needs, and the lock released however the run ends.
The folder's files themselves are ``checkpoints.RunFolder``'s; the data and model a run
started from are fingerprinted here, and a resume's config checked against its own."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
from omegaconf import OmegaConf

from .checkpoints import RunFolder
from .errors import MezoError, warn

#: Config fields that cannot change the trajectory: a --resume may change them freely.
#: (the data and model paths are compared by content instead: FINGERPRINTED)
TRAJECTORY_NEUTRAL = ("out_dir", "assets", "progress", "plot", "eval_batch_size", "keep_checkpoints",
                      "report_to", "threads")
#: Files whose size + sha256 a run records and a --resume checks, by config field.
FINGERPRINTED = ("task.train", "task.dev", "model.path")
SAMPLE = 16 << 20   # a file above 2 x SAMPLE bytes is fingerprinted by size + its first and last SAMPLE bytes


# -- fingerprints ---------------------------------------------------------------------
def _file_digest(path: Path, h) -> int:
    size = path.stat().st_size
    with path.open("rb") as f:
        if size <= 2 * SAMPLE:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:  # big files (models): size + both ends, enough to tell another file apart
            h.update(f.read(SAMPLE))
            f.seek(size - SAMPLE)
            h.update(f.read(SAMPLE))
    return size


def fingerprint(path: str | Path) -> dict:
    """Size and sha256 of a file (of its first and last 16 MiB when it is larger
    than 32 MiB), or of every file under a folder (names, sizes, digests)."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        size = 0
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            sub = hashlib.sha256()
            n = _file_digest(f, sub)
            size += n
            h.update(f"{f.relative_to(path).as_posix()}\0{n}\0{sub.hexdigest()}\n".encode())
    elif path.is_file():
        size = _file_digest(path, h)
    else:
        return {"path": str(path), "missing": True}
    return {"path": str(path), "size": size, "sha256": h.hexdigest()}


def fingerprints(cfg) -> dict:
    return {key: fingerprint(OmegaConf.select(cfg, key)) for key in FINGERPRINTED}


def _same_content(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k != "path"} == {k: v for k, v in b.items() if k != "path"}


# -- what a --resume may change ---------------------------------------------------------
def config_diff(a, b, prefix="") -> list[str]:
    """Dotted keys at which two plain config dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b))
                for k in config_diff(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


def check_resume(saved, cfg, state: dict, schedules: dict, config_file: Path) -> list[str]:
    """Refuse a --resume that would not continue the recorded trajectory: a changed
    field other than the neutral ones, a changed data or model file, or a new
    ``mezo.steps`` that changes a schedule's value at a step already taken.
    ``schedules``: config field -> schedule(step, total). Returns the fields that changed."""
    changed = config_diff(OmegaConf.to_container(saved), OmegaConf.to_container(cfg))
    blocking = [k for k in changed if k not in TRAJECTORY_NEUTRAL and k not in FINGERPRINTED
                and k != "mezo.steps"]
    if blocking:
        raise MezoError(f"--resume: the config differs from the run's {config_file} at {', '.join(blocking)} "
                        f"(only {', '.join(TRAJECTORY_NEUTRAL)} and mezo.steps may change)")
    if "mezo.steps" in changed:
        _check_steps(saved.mezo.steps, cfg.mezo.steps, state["step"], schedules)
    for key, recorded in (state.get("fingerprints") or {}).items():
        now = fingerprint(OmegaConf.select(cfg, key))
        if not _same_content(recorded, now):
            what = ("it is missing" if now.get("missing") else
                    f"size {recorded.get('size')} -> {now['size']} bytes" if recorded.get("size") != now["size"]
                    else "same size, other sha256")
            raise MezoError(f"--resume: {key} {now['path']} is not the file this run started with "
                            f"({what}; recorded from {recorded['path']}): restore it, or start a new run "
                            f"in another out_dir")
    return changed


def _check_steps(old: int, new: int, taken: int, schedules: dict) -> None:
    if new < taken:
        raise MezoError(f"--resume: mezo.steps={new} is below the {taken} steps this run has taken")
    for field, schedule in schedules.items():
        for step in range(taken):
            a, b = schedule(step, old), schedule(step, new)
            if a != b and not (math.isnan(a) and math.isnan(b)):
                raise MezoError(f"--resume: mezo.steps {old} -> {new} changes {field} at a step already "
                                f"taken (step {step + 1}: {a:.6g} -> {b:.6g}); only runs whose schedules "
                                f"do not depend on mezo.steps (constant, or a warm-up alone) can be "
                                f"extended: start a new run")


# -- the run's state ---------------------------------------------------------------------


class RunState:
    def __init__(self, cfg, backend, writes: bool = True, world: int = 1):
        """``writes``: this process writes the folder (rank 0 of a data-parallel run);
        ``world``: the number of ranks, which wait for each other where rank 0 writes."""
        self.cfg, self.backend, self.writes, self.world = cfg, backend, writes, world
        self.out = Path(cfg.out_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.folder: RunFolder | None = None
        self.resumed_from: Path | None = None   # the checkpoint a resume loaded

    def start(self, resume: bool, schedules: dict) -> dict:
        """The run's state dict at its first step: new, or resumed (``schedules``: config
        field -> schedule, to check that a changed config continues their trajectory)."""
        return self._resume(schedules) if resume else self._fresh()

    def _fresh(self, folder: RunFolder | None = None) -> dict:
        """A new run: out_dir locked and cleaned of leftovers, config written, the data
        and model fingerprinted (a --resume checks them). ``folder``: already locked."""
        self.folder = folder or RunFolder(self.out)
        if self.writes:
            self.folder.start(self.cfg)
        self.barrier()  # every rank starts after rank 0 has checked and written
        return {"step": 0, "fingerprints": fingerprints(self.cfg)} if self.writes else {"step": 0}

    def _resume(self, schedules: dict) -> dict:
        """The newest intact checkpoint (falling back past damaged ones), after checking
        that the config, data and model continue its trajectory."""
        self.folder = RunFolder(self.out)
        if not self.out.is_dir():
            raise MezoError(f"--resume: no checkpoint in {self.ckpt_dir}")
        if self.writes:
            self.folder.lock()
            self.folder.clean()
        if not (self.out / "config.yaml").exists():
            if self.folder.holds_checkpoints():
                raise MezoError(f"--resume: {self.out / 'config.yaml'} is missing beside the checkpoints in "
                                f"{self.ckpt_dir}: restore it, or start a new run in another out_dir")
            if self.writes:  # stopped before its config was written: nothing was lost, the run starts
                warn(f"--resume: {self.out} holds no run yet (stopped before its config.yaml): starting it")
            return self._fresh(self.folder)
        self.barrier()  # rank 0 has cleaned and repaired ``latest``: every rank finds the same
        found = self.folder.find(repair=self.writes)
        if found is None:  # stopped before its first checkpoint: the run starts over
            state = {"step": 0, "fingerprints": fingerprints(self.cfg)}
            if self.writes:
                warn(f"--resume: {self.out} holds no checkpoint yet: starting from step 0")
        else:
            self.resumed_from, state = found
        changed = check_resume(self.folder.saved_config(), self.cfg, state, schedules, self.out / "config.yaml")
        if self.cfg.mezo.steps > state["step"]:
            state.pop("final", None)  # mezo.steps was extended: the run goes on
        if found is not None:
            self.backend.load_adapter(found[0])
        if self.writes and changed:   # the logs past the checkpoint are trimmed as they open (runlog)
            self.folder.write_config(self.cfg)
        return state

    def save(self, state: dict, lr, eps, guard, average, estimator=None) -> None:
        """A checkpoint with everything a bitwise resume needs: the adapter, the state,
        the schedules', the guard's and the estimator's state, and the guard's anchor,
        the weight average and the estimator's tensors as files of their own (written
        atomically: RunFolder.write_checkpoint)."""
        state["schedules"] = {"lr": lr.state_dict(), "eps": eps.state_dict()}
        kept = estimator.state_dict() if estimator is not None else {}
        tensors = {k: v for k, v in kept.items() if isinstance(v, torch.Tensor)}
        state["estimator"] = {k: v for k, v in kept.items() if k not in tensors}
        state["guard"] = guard.state_dict()
        extra = {"guard_anchor": guard.anchor} if guard.anchor else {}
        if average.tensors is not None:
            state["average"] = average.state_dict()
            extra["weight_average"] = average.tensors
        if tensors:
            extra["estimator"] = tensors
        if self.writes:
            self.folder.write_checkpoint(self.backend, state, self.cfg.keep_checkpoints, extra or None)

    def restore(self, state: dict, lr, eps, guard, average, estimator=None) -> None:
        """The schedules, guard, average and estimator as the checkpoint left them (a fresh
        run: as built)."""
        if "schedules" in state:
            lr.load_state_dict(state["schedules"]["lr"])
            eps.load_state_dict(state["schedules"]["eps"])
        if "guard" in state:
            guard.load_state_dict(state["guard"])
            guard.anchor = self.load_extra("guard_anchor")
        if "average" in state:
            average.load_state_dict(state["average"], self.load_extra("weight_average"))
        if estimator is not None and "estimator" in state:
            estimator.load_state_dict({**state["estimator"], **(self.load_extra("estimator") or {})})

    def load_extra(self, name: str):
        """The extra tensors ``name`` of the checkpoint this run resumed from (None if
        it started fresh or that checkpoint holds none)."""
        path = self.resumed_from
        if path is None or not (path / f"{name}.safetensors").exists():
            return None
        from safetensors.torch import load_file
        return load_file(str(path / f"{name}.safetensors"))

    def release(self) -> None:
        if self.folder is not None:
            self.folder.release()

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()
