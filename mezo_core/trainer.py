"""The training loop, read top to bottom: evaluate zero-shot, then MeZO steps
with metrics, periodic evaluation and atomic checkpoints, then a final
evaluation, the adapter and a plot.

Everything random is a pure function of (seed, step): the batch, the z seeds.
A checkpoint therefore needs only the adapter and the step to resume the
uninterrupted trajectory exactly.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from omegaconf import OmegaConf
from tqdm.auto import tqdm

from .adapter import replace_dir, write_json_atomic
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


class Trainer:
    def __init__(self, cfg, backend, registry):
        self.cfg, self.backend, self.registry = cfg, backend, registry
        self.out = Path(cfg.out_dir)
        self.ckpt_dir = self.out / "checkpoints"
        m = cfg.mezo
        self.eps = make_schedule(registry, "mezo.eps_schedule", m.eps_schedule, m.eps, m.eps_end, 0)
        self.lr = make_schedule(registry, "mezo.lr_schedule", m.lr_schedule, m.lr, m.lr_end, m.warmup_steps)
        self.task = Task(cfg.task, backend.tokenizer)
        self.hook = registry.hook()
        # data parallel: every rank steps alike on its shard; rank 0 alone writes files
        self.rank, self.world = rank_and_world()
        self.writes = self.rank == 0

    # -- the run ---------------------------------------------------------------
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
        self.backend.save_adapter(self.out / "adapter")
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

    # -- state and checkpoints -----------------------------------------------------
    def _fresh(self) -> dict:
        if (self.out / "checkpoints").exists():
            raise MezoError(f"out_dir {self.out} already holds a run: pass --resume to continue it, "
                            f"or choose another out_dir=...")
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()  # every rank has checked before rank 0 writes
        if not self.writes:
            return {"step": 0}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg))
        (self.out / "metrics.jsonl").write_text("")
        return {"step": 0}

    def _resume(self) -> dict:
        latest = self.ckpt_dir / "latest"
        if not latest.exists():
            raise MezoError(f"--resume: no checkpoint in {self.ckpt_dir}")
        saved = OmegaConf.load(self.out / "config.yaml")
        changed = _diff(OmegaConf.to_container(saved), OmegaConf.to_container(self.cfg))
        if changed:
            raise MezoError(f"--resume: the config differs from the run's {self.out / 'config.yaml'} "
                            f"at {', '.join(changed)}")
        ckpt = self.ckpt_dir / latest.read_text().strip()
        state = json.loads((ckpt / "state.json").read_text())
        self.backend.load_adapter(ckpt)
        if not self.writes:
            return state
        # drop metric rows written after the checkpoint: the resumed run writes them again
        rows = (self.out / "metrics.jsonl").read_text().splitlines()
        kept = [r for r in rows if r.strip() and json.loads(r)["step"] <= state["step"]]
        (self.out / "metrics.jsonl").write_text("".join(r + "\n" for r in kept))
        return state

    def _checkpoint(self, state: dict) -> None:
        """Adapter + state into a temp folder, renamed into place, then ``latest``."""
        if not self.writes:
            return
        name = f"step-{state['step']:07d}"
        tmp = self.ckpt_dir / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        self.backend.save_adapter(tmp)
        write_json_atomic(tmp / "state.json", state)
        replace_dir(tmp, self.ckpt_dir / name)
        (self.ckpt_dir / "latest.tmp").write_text(name)
        (self.ckpt_dir / "latest.tmp").replace(self.ckpt_dir / "latest")
        for old in sorted(self.ckpt_dir.glob("step-*"))[:-max(1, self.cfg.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b))
                for k in _diff(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]
