"""Everything on disk about a run folder, written so that a crash at any point
leaves a folder that resumes to the uninterrupted trajectory.

    out_dir/run.lock                 pid, host, start time of the run holding the folder
    out_dir/config.yaml              the resolved config (rewritten by an accepted --resume)
    out_dir/metrics.jsonl            one row per step
    out_dir/checkpoints/step-NNNNNNN/  adapter + state.json [+ <extra>.safetensors] + manifest.json
    out_dir/checkpoints/latest       the name of the newest checkpoint
    out_dir/last/                    the trained adapter at the last step (always)
    out_dir/best/                    the adapter selected on validation (with eval_every)
    out_dir/adapter/                 the run's result: a copy of best/ or of last/ (summary.json 'result')

A checkpoint is written to ``.step-NNNNNNN.tmp``, checked (every tensor finite),
given a manifest (size and sha256 of every file) and renamed into place; only
then does ``latest`` move. A checkpoint counts as intact when its manifest
matches its files, its JSON parses and its tensors are finite; loading falls
back from a damaged one to the newest intact one. Rotation deletes only
checkpoints older than the one just written, so the newest intact one is
never deleted.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from .adapter import check_finite, replace_dir
from .errors import MezoError, warn  # noqa: F401 (warn: re-exported, the trainer and tests import it here)
from .runfiles import open_fd, open_text, read_bytes, refuse_link, replace_file, write_new, writing
from .faults import fault
from .runlock import RunLock

STEP = re.compile(r"step-(\d{7,})")
LEFTOVER = re.compile(r".+\.tmp\d*")          # .step-N.tmp, latest.tmp, adapter.tmp<pid>, x.json.tmp<pid>
TENSOR_FILES = ("adapter_model.safetensors", "mezo_params.safetensors")  # what backends write
RESERVED = {"adapter_model", "mezo_params", "state", "manifest", "adapter_config"}
#: What a run keeps in out_dir (and ``checkpoints/``, all of it): a symlink at any of these
#: names, or at its ``.old`` swap, is refused (runfiles.py: the run folder is a boundary).
RUN_ENTRIES = ("run.lock", "config.yaml", "metrics.jsonl", "evals.jsonl", "metrics.csv", "evals.csv",
               "summary.json", "training.png", "wandb-run-id", "checkpoints", "adapter", "best", "last",
               "tensorboard", "wandb")
ADAPTER_FOLDERS = ("adapter", "best", "last")   # their files are checked too (best/ is copied, read back)



def step_name(step: int) -> str:
    return f"step-{step:07d}"


def _step_of(path: Path) -> int:
    return int(STEP.fullmatch(path.name)[1])


# -- finite tensors -------------------------------------------------------------------
def check_finite_folder(folder: Path, what: str) -> None:
    """Every tensor of every ``*.safetensors`` in ``folder``, one tensor in memory at a time."""
    from safetensors import safe_open
    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as reader:
                for key in reader.keys():
                    check_finite({key: reader.get_tensor(key)}, f"{what}, {f.name}")
        except MezoError:
            raise
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise MezoError(f"{f}: not a readable safetensors file ({exc})") from None


def write_adapter(backend, path: str | Path) -> Path:
    """The final (or best) adapter: written beside ``path``, checked finite, renamed
    into place. A non-finite adapter is refused and the old ``path`` kept."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    _remove(tmp)
    with writing(path, cleanup=tmp):   # a full disk: one line naming the file, no temp folder left
        backend.save_adapter(tmp)
    try:
        check_finite_folder(tmp, f"adapter {path}")
    except MezoError as exc:
        _remove(tmp)
        raise MezoError(f"{exc}: not written (the training diverged)") from None
    with writing(path, cleanup=tmp):
        _sync_tree(tmp)
    fault("adapter-written")
    replace_dir(tmp, path)
    return path


# -- the folder -----------------------------------------------------------------------
class _Damaged(Exception):
    pass


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _sync_tree(folder: Path) -> None:
    """Flush a folder's files and the folder itself: renamed into place, it survives a power cut too."""
    for f in [*folder.iterdir(), folder]:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sha256(path: Path) -> str:
    with os.fdopen(open_fd(path, os.O_RDONLY), "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class RunFolder:
    """One run's ``out_dir``: its lock, its checkpoints and the files around them."""

    def __init__(self, out_dir: str | Path):
        self.out = Path(out_dir)
        self.ckpts = self.out / "checkpoints"
        self.lock_file = self.out / "run.lock"
        self._lock = RunLock(self.out, self.lock_file)

    # -- the lock ---------------------------------------------------------------------
    def lock(self) -> None:
        """Hold the folder for the life of the run (``runlock.RunLock``); the folder is
        then checked for symlinks where run files belong (refused)."""
        self._lock.acquire(self.refuse_links)

    def release(self) -> None:
        self._lock.release()

    def refuse_links(self) -> None:
        """A MezoError naming the first symlink where a run file or folder belongs: a
        name of RUN_ENTRIES (or its ``.old``), anything in ``checkpoints/`` or in a
        checkpoint, a file of adapter/, best/ or last/. (A link at a temp name is only
        ever unlinked: RunFolder.clean, runfiles.write_new.)"""
        for name in RUN_ENTRIES:
            refuse_link(self.out / name)
            refuse_link(self.out / f"{name}.old")
        folders = [self.out / name for name in ADAPTER_FOLDERS]
        if self.ckpts.is_dir():
            for p in sorted(self.ckpts.iterdir()):
                if not LEFTOVER.fullmatch(p.name):
                    refuse_link(p)
                    folders.append(p)
        for folder in folders:
            if folder.is_dir():
                for p in sorted(folder.iterdir()):
                    refuse_link(p)

    # -- start ------------------------------------------------------------------------
    def clean(self) -> None:
        """Remove what a killed run left half-written (temp files and folders); a
        ``X.old`` whose ``X`` is missing (a kill inside a folder swap) goes back to ``X``.
        Before config.yaml exists only the temp files of run entries (``config.yaml.tmp<pid>``:
        a kill inside the first write) are removed: other files may not be the run's."""
        for folder in (self.out, self.ckpts):
            ours = (self.out / "config.yaml").exists()
            if not folder.is_dir() or not (ours or folder == self.out):
                continue  # not a run folder (yet): nothing of ours to clean
            for p in sorted(folder.iterdir()):
                if LEFTOVER.fullmatch(p.name) and (ours or re.sub(r"\.tmp\d*$", "", p.name) in RUN_ENTRIES):
                    _remove(p)
                elif not ours:
                    continue
                elif p.name.endswith(".old"):
                    live = p.with_name(p.name[:-4])
                    if live.exists():
                        _remove(p)
                    else:
                        p.rename(live)

    def holds_checkpoints(self) -> bool:
        return self.ckpts.is_dir() and any(p.name == "latest" or STEP.fullmatch(p.name)
                                           for p in self.ckpts.iterdir())

    def start(self, cfg) -> None:
        """A fresh run: the folder is locked and cleaned; a folder that holds a
        checkpoint is refused, one where a run stopped before its first is reused."""
        self.lock()
        self.clean()
        if self.holds_checkpoints():
            raise MezoError(f"out_dir {self.out} already holds a run: pass --resume to continue it, "
                            f"or choose another out_dir=...")
        self.write_config(cfg)
        replace_file(self.out / "metrics.jsonl", "")

    def write_config(self, cfg) -> None:
        replace_file(self.out / "config.yaml", OmegaConf.to_yaml(cfg))

    def saved_config(self):
        path = self.out / "config.yaml"
        try:
            with open_text(path) as f:
                return OmegaConf.load(f)
        except MezoError:
            raise
        except Exception as exc:
            raise MezoError(f"--resume: cannot read the run's config {path}: {exc}") from None

    def write_checkpoint(self, backend, state: dict, keep: int, extra: dict | None = None) -> Path:
        """Adapter, ``extra`` tensors (name -> {tensor name: tensor}, as
        ``<name>.safetensors``), state.json and a manifest into a temp folder;
        renamed into place, then ``latest``; then older checkpoints beyond ``keep``
        are deleted."""
        from safetensors.torch import save_file
        name = step_name(state["step"])
        tmp = self.ckpts / f".{name}.tmp"
        _remove(tmp)
        with writing(self.ckpts):
            self.ckpts.mkdir(parents=True, exist_ok=True)
        refuse_link(self.ckpts)
        # a failed write (a full disk) is one line naming the file; the temp folder goes, the
        # last checkpoint stays
        with writing(tmp, cleanup=tmp):
            backend.save_adapter(tmp)
        fault("ckpt-tmp")
        for key, tensors in (extra or {}).items():
            if not re.fullmatch(r"[A-Za-z0-9_-]+", key) or key in RESERVED:
                raise ValueError(f"checkpoint extra {key!r}: not a plain name, or a reserved one")
            with writing(tmp / f"{key}.safetensors", cleanup=tmp):
                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / f"{key}.safetensors")
        try:
            check_finite_folder(tmp, f"checkpoint {name}")
        except MezoError as exc:
            _remove(tmp)
            raise MezoError(f"{exc}: not written (the training diverged; the last checkpoint stays)") from None
        fault("ckpt-files")
        with writing(tmp, cleanup=tmp):
            write_new(tmp / "state.json", json.dumps(state, indent=1))
            files = {f.name: {"size": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(tmp.iterdir())}
            write_new(tmp / "manifest.json", json.dumps({"files": files}, indent=1))
            _sync_tree(tmp)
        replace_dir(tmp, self.ckpts / name)
        _sync_tree(self.ckpts)
        fault("ckpt-renamed")
        self._point_latest(name)
        fault("ckpt-latest")
        older = sorted((p for p in self.ckpts.iterdir() if STEP.fullmatch(p.name) and _step_of(p) < state["step"]),
                       key=_step_of)
        for old in older[:max(0, len(older) - (max(1, keep) - 1))]:
            shutil.rmtree(old, ignore_errors=True)
        return self.ckpts / name

    def _point_latest(self, name: str) -> None:
        refuse_link(self.ckpts / "latest")
        tmp = self.ckpts / "latest.tmp"
        write_new(tmp, name, sync=True)
        tmp.replace(self.ckpts / "latest")

    def verify(self, folder: Path) -> dict:
        """The state of an intact checkpoint; _Damaged(reason) otherwise (a symlink in
        it: a MezoError naming it)."""
        for f in folder.iterdir():
            refuse_link(f)
        try:
            manifest = json.loads(read_bytes(folder / "manifest.json"))["files"]
        except FileNotFoundError:
            raise _Damaged("no manifest.json") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise _Damaged(f"manifest.json is not valid ({exc.__class__.__name__})") from None
        if not isinstance(manifest, dict) or not all(
                isinstance(w, dict) and re.fullmatch(r"[A-Za-z0-9_.-]{1,200}", n) for n, w in manifest.items()):
            raise _Damaged("manifest.json is not valid (its files are not plain names with a size and sha256)")
        if "state.json" not in manifest or not any(f in manifest for f in TENSOR_FILES):
            raise _Damaged("manifest.json does not list state.json and the adapter")
        for fname, want in manifest.items():
            f = folder / fname
            if not f.is_file():
                raise _Damaged(f"{fname} is missing")
            if f.stat().st_size != want.get("size"):
                raise _Damaged(f"{fname} has {f.stat().st_size} bytes, the manifest says {want.get('size')}")
            if _sha256(f) != want.get("sha256"):
                raise _Damaged(f"{fname} does not match its sha256 in the manifest")
            if fname.endswith(".json"):
                try:
                    json.loads(read_bytes(f))
                except ValueError:
                    raise _Damaged(f"{fname} is not valid JSON") from None
        state = json.loads(read_bytes(folder / "state.json"))
        if not isinstance(state, dict) or state.get("step") != _step_of(folder):
            raise _Damaged("state.json does not hold this checkpoint's step")
        try:
            check_finite_folder(folder, folder.name)
        except MezoError as exc:
            raise _Damaged(str(exc)) from None
        return state

    def _latest(self) -> tuple[str | None, str | None]:
        """(the checkpoint ``latest`` names, or None; what is wrong with it, or None)."""
        path = self.ckpts / "latest"
        refuse_link(path)
        if not path.exists():
            return None, None
        try:
            name = read_bytes(path, 64).decode("ascii", errors="replace").strip()
        except OSError:
            return None, "checkpoints/latest is unreadable"
        if not STEP.fullmatch(name):   # its content is never echoed: it may not be the run's
            return None, "checkpoints/latest holds text that is not a checkpoint name (not shown)"
        if not (self.ckpts / name).is_dir():
            return name, f"checkpoints/latest names {name}, which is missing"
        return name, None

    def find(self, repair: bool) -> tuple[Path, dict] | None:
        """The newest intact checkpoint and its state (None: no checkpoint was ever
        completed). Damage is reported on stderr (``repair``: and ``latest`` is
        pointed at the checkpoint found); nothing intact is a MezoError."""
        if not self.ckpts.is_dir():
            return None
        latest, problem = self._latest()
        problems = [problem] if problem else []
        for p in self.ckpts.iterdir():
            refuse_link(p)   # e.g. a step folder linked to another run's checkpoint
        folders = sorted((p for p in self.ckpts.iterdir() if p.is_dir() and STEP.fullmatch(p.name)),
                         key=_step_of, reverse=True)
        for folder in folders:
            try:
                state = self.verify(folder)
            except _Damaged as exc:
                problems.append(f"{folder.name}: {exc}")
                continue
            if repair:
                if problems:
                    warn(f"checkpoint damage in {self.ckpts} ({'; '.join(problems)}): "
                         f"resuming from the newest intact checkpoint, {folder.name}")
                elif latest != folder.name:
                    warn(f"{folder.name} was completed after checkpoints/latest was last moved "
                         f"(a run stopped in between): resuming from it")
                if latest != folder.name:
                    self._point_latest(folder.name)
            return folder, state
        if folders or (self.ckpts / "latest").exists():
            raise MezoError(f"--resume: no intact checkpoint in {self.ckpts} ({'; '.join(problems)}): "
                            f"start a new run in another out_dir, or delete this one")
        return None
