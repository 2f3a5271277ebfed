"""The training loop, read top to bottom: evaluate zero-shot, then MeZO steps
with metrics, periodic evaluation and atomic checkpoints, then a final
evaluation, the adapter and a plot.

Everything random is a pure function of (seed, step): the batch, the z seeds.
A checkpoint therefore needs only the adapter and the step to resume the
uninterrupted trajectory exactly.
"""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from .adapter import write_json_atomic
from .checkpoints import (RunFolder, check_resume, config_diff, fingerprints, warn,
                          write_adapter)
from .data import Task
from .distributed import rank_and_world, shard, sum_over_ranks
from .errors import MezoError
from .mezo import direction_seeds, mezo_step


def make_schedule(registry, field, name, start, end, warmup):
    """A schedule plugin, tried at both ends before anything is written."""
    schedule = registry.get("epsilon_schedules", name)(start, end, warmup)
    try:
        schedule(0, 1)
        schedule.value(1.0)
    except (ValueError, ZeroDivisionError) as exc:
        raise MezoError(f"config field {field!r}: schedule {name!r} cannot run: {exc}") from None
    return schedule


def _releases_the_lock(train):
    """However the run ends (finished, error, Ctrl-C), out_dir's lock is released."""
    @functools.wraps(train)
    def run(self, *args, **kwargs):
        try:
            return train(self, *args, **kwargs)
        finally:
            self._release()
    return run


class Trainer:
    def __init__(self, cfg, backend, registry):
        self.cfg, self.backend, self.registry = cfg, backend, registry
        self.out = Path(cfg.out_dir)
        self.ckpt_dir = self.out / "checkpoints"
        m = cfg.mezo
        self.eps = make_schedule(registry, "mezo.eps_schedule", m.eps_schedule, m.eps, m.eps_end, 0)
        self.lr = make_schedule(registry, "mezo.lr_schedule", m.lr_schedule, m.lr, m.lr_end, m.warmup_steps)
        self.task = Task(cfg.task, backend.tokenizer, batch_size=cfg.mezo.batch_size)
        self.hook = registry.hook()
        # data parallel: every rank steps alike on its shard; rank 0 alone writes files
        self.rank, self.world = rank_and_world()
        self.writes = self.rank == 0

    # -- the run ---------------------------------------------------------------
    @_releases_the_lock
    def train(self, resume: bool = False) -> dict:
        cfg, m = self.cfg, self.cfg.mezo
        state = self._resume() if resume else self._fresh()
        if cfg.zero_shot and "zero_shot" not in state:
            state["zero_shot"] = self.evaluate("zero-shot")
            self._checkpoint(state)
        metrics_file = (self.out / "metrics.jsonl").open("a") if self.writes else None
        bar = tqdm(total=m.steps, initial=state["step"], desc="mezo", dynamic_ncols=True,
                   disable=not (cfg.progress and self.writes))
        applied = 0.0  # multiple of this step's first z already on the weights
        for step in range(state["step"], m.steps):
            batch = shard(self.task.train_batch(cfg.seed, step, m.batch_size), self.rank, self.world)
            eps, lr = self.eps(step, m.steps), self.lr(step, m.steps)
            seeds = direction_seeds(cfg.seed, step, m.q)
            next_direction = None
            if m.fuse_steps and not self._pauses_after(step + 1):  # the next step's +eps z rides along
                next_direction = (direction_seeds(cfg.seed, step + 1, m.q)[0], self.eps(step + 1, m.steps))
            start = time.perf_counter()
            result = mezo_step(self.backend, batch, seeds, eps, lr, m.weight_decay, reduce=sum_over_ranks,
                               applied=applied, next_direction=next_direction)
            seconds = time.perf_counter() - start
            applied = result.applied
            tokens = 2 * m.q * sum(e.num_tokens for e in batch)
            row = {"step": step + 1, "loss": result.loss, "loss_plus": result.loss_plus,
                   "loss_minus": result.loss_minus, "grads": result.grads, "seeds": result.seeds,
                   "eps": eps, "lr": lr, "step_seconds": seconds, "tokens_per_second": tokens / seconds,
                   **self.backend.get_stats()}  # backend counters count since process start
            state["step"] = step + 1
            if cfg.eval_every and state["step"] % cfg.eval_every == 0 and state["step"] < m.steps:
                row.update(self.evaluate(f"step {state['step']}"))
                state.setdefault("evals", []).append({"step": state["step"], **row})
            if self.writes:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
                self.hook.on_step_end(step=state["step"], metrics=row)
            bar.set_postfix(loss=f"{result.loss:.4f}", eps=f"{eps:.1e}", lr=f"{lr:.1e}",
                            tok_s=f"{tokens / seconds:.0f}")
            bar.update(1)
            if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0:
                self._checkpoint(state)
        bar.close()
        if metrics_file:
            metrics_file.close()
        if "final" not in state:
            state["final"] = self.evaluate("fine-tuned")
            self._checkpoint(state)
        summary = {k: state.get(k) for k in ("zero_shot", "final", "step")}
        if not self.writes:
            return summary
        write_adapter(self.backend, self.out / "adapter")  # checked finite, atomic
        write_json_atomic(self.out / "summary.json", summary)
        if cfg.plot:
            from .plot import plot_run
            plot_run(self.out / "metrics.jsonl", state, self.out / "training.png")
        return summary

    def _pauses_after(self, step: int) -> bool:
        """Whether the weights must be clean (theta itself) after ``step`` steps: the
        run ends, evaluates or checkpoints there."""
        cfg = self.cfg
        return (step >= cfg.mezo.steps or bool(cfg.eval_every and step % cfg.eval_every == 0)
                or bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0))

    def evaluate(self, label: str) -> dict:
        bar = tqdm(total=len(self.task.dev), desc=f"eval {label}", leave=False,
                   disable=not (self.cfg.progress and self.writes), dynamic_ncols=True)
        result = self.task.evaluate(self.backend, self.cfg.eval_batch_size, bar)
        bar.close()
        return result

    # -- state and checkpoints (the files: mezo_core/checkpoints.py) ------------------
    def _fresh(self) -> dict:
        """A new run: out_dir locked and cleaned of leftovers, config written, the data
        and model fingerprinted (a --resume checks them)."""
        self.folder = RunFolder(self.out)
        if self.writes:
            self.folder.start(self.cfg)
        self._barrier()  # every rank starts after rank 0 has checked and written
        return {"step": 0, "fingerprints": fingerprints(self.cfg)} if self.writes else {"step": 0}

    def _resume(self) -> dict:
        """The newest intact checkpoint (falling back past damaged ones), after checking
        that the config, data and model continue its trajectory."""
        self.folder = RunFolder(self.out)
        if not self.out.is_dir():
            raise MezoError(f"--resume: no checkpoint in {self.ckpt_dir}")
        if self.writes:
            self.folder.lock()
            self.folder.clean()
        if not (self.out / "config.yaml").exists():
            raise MezoError(f"--resume: no checkpoint in {self.ckpt_dir}")
        self._barrier()  # rank 0 has cleaned and repaired ``latest``: every rank finds the same
        found = self.folder.find(repair=self.writes)
        if found is None:  # stopped before its first checkpoint: the run starts over
            state = {"step": 0, "fingerprints": fingerprints(self.cfg)}
            if self.writes:
                warn(f"--resume: {self.out} holds no checkpoint yet: starting from step 0")
        else:
            self._resumed_from, state = found
        changed = check_resume(self.folder.saved_config(), self.cfg, state,
                               {"mezo.eps_schedule": self.eps, "mezo.lr_schedule": self.lr},
                               self.out / "config.yaml")
        if self.cfg.mezo.steps > state["step"]:
            state.pop("final", None)  # mezo.steps was extended: the run goes on
        if found is not None:
            self.backend.load_adapter(found[0])
        if self.writes:
            self.folder.keep_metrics_until(state["step"])
            if changed:
                self.folder.write_config(self.cfg)
        return state

    def _checkpoint(self, state: dict, extra: dict | None = None) -> None:
        """Adapter + state (+ ``extra``: name -> {tensor name: tensor}, written as
        ``<name>.safetensors``; read back after a resume with ``load_extra(name)``),
        atomically (checkpoints.RunFolder.write_checkpoint)."""
        if self.writes:
            self.folder.write_checkpoint(self.backend, state, self.cfg.keep_checkpoints, extra)

    def load_extra(self, name: str):
        """The ``extra`` tensors ``name`` of the checkpoint this run resumed from (None
        if it started fresh or that checkpoint holds none)."""
        path = getattr(self, "_resumed_from", None)
        if path is None or not (path / f"{name}.safetensors").exists():
            return None
        from safetensors.torch import load_file
        return load_file(str(path / f"{name}.safetensors"))

    def _release(self) -> None:
        folder = getattr(self, "folder", None)
        if folder is not None:
            folder.release()

    def _barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()


def _diff(a, b, prefix="") -> list[str]:
    return config_diff(a, b, prefix)
