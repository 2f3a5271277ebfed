"""A run's state on disk, as the trainer sees it: a fresh start or a resume from the
newest intact checkpoint (checked to continue the same trajectory), checkpoints that
hold everything a bitwise resume needs, and the lock released however the run ends.
The folder's files themselves are ``checkpoints.RunFolder``'s."""
from __future__ import annotations

from pathlib import Path

from .checkpoints import RunFolder, check_resume, fingerprints
from .errors import MezoError, warn


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
        if self.writes:
            self.folder.keep_metrics_until(state["step"])
            if changed:
                self.folder.write_config(self.cfg)
        return state

    def save(self, state: dict, lr, eps, guard, average) -> None:
        """A checkpoint with everything a bitwise resume needs: the adapter, the state,
        the schedules' and the guard's state, and the guard's anchor and the weight
        average as tensors of their own (written atomically: RunFolder.write_checkpoint)."""
        state["schedules"] = {"lr": lr.state_dict(), "eps": eps.state_dict()}
        state["guard"] = guard.state_dict()
        extra = {"guard_anchor": guard.anchor} if guard.anchor else {}
        if average.tensors is not None:
            state["average"] = average.state_dict()
            extra["weight_average"] = average.tensors
        if self.writes:
            self.folder.write_checkpoint(self.backend, state, self.cfg.keep_checkpoints, extra or None)

    def restore(self, state: dict, lr, eps, guard, average) -> None:
        """The schedules, guard and average as the checkpoint left them (a fresh run: as built)."""
        if "schedules" in state:
            lr.load_state_dict(state["schedules"]["lr"])
            eps.load_state_dict(state["schedules"]["eps"])
        if "guard" in state:
            guard.load_state_dict(state["guard"])
            guard.anchor = self.load_extra("guard_anchor")
        if "average" in state:
            average.load_state_dict(state["average"], self.load_extra("weight_average"))

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
