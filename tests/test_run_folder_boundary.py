"""The run folder is a boundary (#31): a symlink planted where a run file or folder
belongs (a folder shared with other users, or restored from an archive) is refused
in one line naming it, and no file outside ``out_dir`` is created, changed, read
into the output or used. Every case plants the link in a real run folder and runs
real ``mezo-run train`` (in this process, or a child for the lock), then checks
the outside file byte for byte, the exit code, the one-line message, and that the
outside content appears nowhere in stdout/stderr.

Also: the lock cannot be bypassed by deleting ``run.lock``; a folder killed before
its config.yaml resumes by starting the run; a malformed manifest falls back past
its checkpoint; bytes that are not UTF-8 appended to a log are dropped on --resume.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from mezo_core.errors import MezoError
from test_faults import (ADAPTER, lock_holder, FolderBackend, assert_clean, assert_same_run, config, error_text,
                         start_child, train)

SECRET = "root:x:0:0:SECRET-OUTSIDE-CONTENT:/root:/bin/bash\ndaemon:x:1:1:another secret line\n"
LOGS = {"report_to": ["jsonl", "csv"], "plot": True}    # every file a run writes


def tree(path: Path) -> dict:
    """Every entry under ``path`` (itself a file or a folder): name -> sha256 or 'dir'."""
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


def outside(tmp_path: Path, folder=False) -> Path:
    """A file (or a folder holding one) outside the run folder, holding SECRET."""
    target = tmp_path / "outside" / ("folder" if folder else "secret.txt")
    target.parent.mkdir(exist_ok=True)
    if folder:
        target.mkdir()
        (target / ADAPTER).write_text(SECRET)
        (target / "state.json").write_text(json.dumps({"step": 6, "secret": SECRET}))
    else:
        target.write_text(SECRET)
    return target


def refused(rc: int, out: str, err: str, link: Path) -> None:
    """rc 2, one line naming the link; no outside content in the output."""
    assert rc == 2, err
    assert "SECRET" not in out + err and "root:x" not in out + err
    line = error_text(err)
    assert line == f"mezo-run: error: {link} is a symlink where a run file or folder belongs: refused (a run " \
                   f"never follows a link out of its folder); remove it, or choose another out_dir=...\n", line


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_llama):
    """A finished 6-step run (checkpoints step-4 and step-6), every logger and the plot: (config, run)."""
    tmp = tmp_path_factory.mktemp("finished")
    cfg = config(tmp, tiny_llama, **LOGS)
    assert train(cfg) == 0
    assert_clean(tmp / "run")
    assert sorted(p.name for p in (tmp / "run/checkpoints").iterdir()) == ["latest", "step-0000004", "step-0000006"]
    return cfg, tmp / "run"


def copy_of(finished, tmp_path, stopped=False) -> Path:
    """A copy of the finished run; ``stopped``: as if stopped after step 5 (step-6 gone, latest at step-4)."""
    run = tmp_path / "run"
    shutil.copytree(finished[1], run, symlinks=True)
    if stopped:
        shutil.rmtree(run / "checkpoints/step-0000006")
        (run / "checkpoints/latest").write_text("step-0000004")
    return run


# -- a symlink where a run file or folder belongs ---------------------------------------
FILES = ["run.lock", "config.yaml", "metrics.jsonl", "evals.jsonl", "metrics.csv", "evals.csv", "summary.json",
         "training.png", "wandb-run-id"]
FOLDERS = ["checkpoints", "adapter", "best", "last", "tensorboard"]


@pytest.mark.parametrize("name", FILES + FOLDERS)
def test_a_fresh_run_refuses_a_symlinked_run_entry(name, tiny_llama, tmp_path, capsys):
    target = outside(tmp_path, folder=name in FOLDERS)
    before = tree(target)
    cfg = config(tmp_path, tiny_llama, **LOGS)
    run = tmp_path / "run"
    run.mkdir()
    (run / name).symlink_to(target)
    rc = train(cfg)
    refused(rc, *capsys.readouterr(), run / name)
    assert tree(target) == before
    assert sorted(p.name for p in run.iterdir()) == [name]            # nothing written, the link left alone


@pytest.mark.parametrize("name", FILES + FOLDERS + ["checkpoints/latest", "checkpoints/step-0000004",
                                                    "checkpoints/step-0000004/state.json", f"adapter/{ADAPTER}",
                                                    "best.old", "checkpoints/step-0000004.old"])
def test_a_resume_refuses_a_symlinked_run_entry(name, finished, tmp_path, capsys):
    run = copy_of(finished, tmp_path, stopped=True)
    target = outside(tmp_path, folder=(run / name).is_dir() or name.endswith(("tmp", "old")))
    before, ours = tree(target), tree(run)
    _remove(run / name)
    (run / name).symlink_to(target)
    rc = train(finished[0], "--resume", f"out_dir={run}")
    refused(rc, *capsys.readouterr(), run / name)
    assert tree(target) == before
    ours.pop(name, None)
    assert {k: v for k, v in tree(run).items() if not k.startswith(name + "/") and k != name} == \
        {k: v for k, v in ours.items() if not k.startswith(name + "/")}   # the run folder unchanged too


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def test_latest_linked_to_a_system_file_is_refused_without_its_content(finished, tmp_path, capsys):
    run = copy_of(finished, tmp_path)
    (run / "checkpoints/latest").unlink()
    (run / "checkpoints/latest").symlink_to("/etc/passwd")
    rc = train(finished[0], "--resume", f"out_dir={run}")
    out, err = capsys.readouterr()
    refused(rc, out, err, run / "checkpoints/latest")
    first = Path("/etc/passwd").read_text().splitlines()[0]
    assert first[:12] not in out + err and "/bin/" not in out + err


def test_latest_holding_foreign_text_is_not_echoed(finished, reference_adapter, tmp_path, capsys):
    """A regular ``latest`` holding anything but a checkpoint name: the fallback warning
    says so without showing the text (it may not be the run's)."""
    run = copy_of(finished, tmp_path)
    (run / "checkpoints/latest").write_text(SECRET)
    assert train(finished[0], "--resume", f"out_dir={run}") == 0
    out, err = capsys.readouterr()
    assert "SECRET" not in out + err and "root:x" not in out + err
    assert "checkpoints/latest holds text that is not a checkpoint name (not shown)" in err, err
    assert (run / "checkpoints/latest").read_text() == "step-0000006"   # repaired
    assert reference_adapter == tree(run / "adapter")


@pytest.fixture(scope="module")
def reference_adapter(finished):
    return tree(finished[1] / "adapter")


def test_a_step_folder_linked_to_another_runs_checkpoint_is_refused(finished, tiny_llama, tmp_path, capsys):
    """The other run's checkpoint is intact and one step newer: before, it was used silently."""
    other = tmp_path / "other"
    assert train(config(other, tiny_llama, seed=5)) == 0
    capsys.readouterr()
    theirs = tree(other / "run")
    run = copy_of(finished, tmp_path, stopped=True)
    ours = tree(run)
    (run / "checkpoints/step-0000006").symlink_to(other / "run/checkpoints/step-0000006")
    rc = train(finished[0], "--resume", f"out_dir={run}")
    refused(rc, *capsys.readouterr(), run / "checkpoints/step-0000006")
    assert tree(other / "run") == theirs
    assert {k: v for k, v in tree(run).items() if k != "checkpoints/step-0000006"} == ours


def test_temp_names_linked_outside_are_replaced_not_followed(tiny_llama, tmp_path, capsys, monkeypatch):
    """Links at the temp names the run writes (this process's pid) are unlinked, never
    written through; the run ends normally and the outside files are unchanged."""
    target, folder = outside(tmp_path), outside(tmp_path, folder=True)
    before = tree(target.parent)
    cfg = config(tmp_path, tiny_llama, **LOGS)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    pid = os.getpid()
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "metrics.csv", "training.png"):
        (run / f"{name}.tmp{pid}").symlink_to(target)
    (run / "checkpoints/latest.tmp").symlink_to(target)
    for name in ("adapter", "last", "checkpoints/.step-0000002.tmp"):
        (run / f"{name}.tmp{pid}" if not name.endswith(".tmp") else run / name).symlink_to(folder)
    assert train(cfg) == 0
    out, err = capsys.readouterr()
    assert "SECRET" not in out + err
    assert tree(target.parent) == before
    assert not [p for p in run.rglob("*") if p.is_symlink()]


# -- the lock -----------------------------------------------------------------------------
def test_deleting_run_lock_does_not_free_the_folder(tiny_llama, tmp_path, capsys):
    """A run holds the folder itself (flock on a descriptor of out_dir): with run.lock
    deleted or replaced, a second run or --resume is still refused while it lives."""
    cfg = config(tmp_path, tiny_llama)
    run = tmp_path / "run"
    holder = lock_holder(cfg, run)
    try:
        (run / "run.lock").unlink()
        for args, holder_named in ((["--resume"], "a run"), ([], "a run"),
                                   (["--resume"], "pid 1 on elsewhere, started then")):
            if holder_named != "a run":
                (run / "run.lock").write_text(holder_named + "\n")   # a new file in its place
            assert train(cfg, *args) == 2
            err = error_text(capsys.readouterr().err)
            assert f"in use by another run ({holder_named}; lock file" in err, err
            assert len(err.strip().splitlines()) == 1
        assert sorted(p.name for p in run.iterdir()) == ["run.lock"]   # the refused runs wrote nothing
    finally:
        holder.kill()
        holder.communicate()
    assert train(cfg) == 0                             # the holder is gone: the folder is free
    assert "taking over the lock of a run that ended without releasing it (pid 1 on elsewhere" \
        in capsys.readouterr().err
    assert_same_run(run, _plain_reference(tiny_llama, tmp_path))


def _plain_reference(tiny_llama, tmp_path):
    ref = tmp_path / "ref"
    assert train(config(ref, tiny_llama)) == 0
    return ref / "run"


def test_a_run_killed_before_its_config_resumes_by_starting(tiny_llama, tmp_path, capsys):
    """Killed right after taking the lock: only run.lock exists. --resume starts the
    run (before: "no checkpoint"), and ends as an uninterrupted run does."""
    cfg = config(tmp_path, tiny_llama)
    run = tmp_path / "run"
    child = start_child(cfg, "lock")
    _, err = child.communicate(timeout=600)
    assert child.returncode == -signal.SIGKILL, err
    assert sorted(p.name for p in run.iterdir()) == ["run.lock"]
    (run / "config.yaml.tmp1").write_text("seed: 1")   # as if killed inside the first write of the config
    (run / "notes.tmp1").write_text("not the run's")   # not a run entry's temp name: kept
    assert train(cfg, "--resume") == 0
    err = capsys.readouterr().err
    assert f"--resume: {run} holds no run yet (stopped before its config.yaml): starting it" in err, err
    assert (run / "notes.tmp1").read_text() == "not the run's"
    (run / "notes.tmp1").unlink()
    assert_same_run(run, _plain_reference(tiny_llama, tmp_path))


def test_checkpoints_without_config_are_one_line(finished, tmp_path, capsys):
    run = copy_of(finished, tmp_path)
    (run / "config.yaml").unlink()
    assert train(finished[0], "--resume", f"out_dir={run}") == 2
    err = error_text(capsys.readouterr().err)
    assert f"{run / 'config.yaml'} is missing beside the checkpoints" in err and len(err.splitlines()) == 1


# -- damage that gave tracebacks ------------------------------------------------------------
def _manifest(run, files):
    path = run / "checkpoints/step-0000006/manifest.json"
    real = json.loads(path.read_text())["files"]
    path.write_text(json.dumps({"files": files(real)}))


@pytest.mark.parametrize("files", [lambda real: 5, lambda real: {"state.json": 5},
                                   lambda real: {**real, "state.json": 5}, lambda real: [],
                                   lambda real: {**real, "../../config.yaml": real["state.json"]}],
                         ids=["files-int", "state-int", "state-int-with-adapter", "files-list", "path-name"])
def test_a_malformed_manifest_falls_back_past_its_checkpoint(files, finished, tmp_path, capsys):
    run = copy_of(finished, tmp_path)
    _manifest(run, files)
    assert train(finished[0], "--resume", f"out_dir={run}") == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    warning = [line for line in err.splitlines() if line.startswith("mezo-run: warning: checkpoint damage")]
    assert len(warning) == 1 and "step-0000006: manifest.json" in warning[0], err
    assert warning[0].endswith("resuming from the newest intact checkpoint, step-0000004")
    assert_same_run(run, finished[1])


@pytest.mark.parametrize("log", ["metrics.jsonl", "evals.jsonl", "metrics.csv"])
def test_non_utf8_bytes_in_a_log_are_dropped_on_resume(log, finished, tmp_path, capsys):
    run = copy_of(finished, tmp_path, stopped=True)
    with (run / log).open("ab") as f:
        f.write(b"\xff\xfe\x80 not utf-8 \xc3\x28\n")
    assert train(finished[0], "--resume", f"out_dir={run}") == 0
    assert "Traceback" not in capsys.readouterr().err
    for name in ("metrics.jsonl", "evals.jsonl", "metrics.csv"):   # valid UTF-8 again, the same rows
        text, want = ((r / name).read_bytes().decode() for r in (run, finished[1]))
        assert len(text.splitlines()) == len(want.splitlines()), name
        assert [line.split(",")[0] for line in text.splitlines()] == [line.split(",")[0] for line in want.splitlines()]
    assert [(r["step"], r["label"]) for r in map(json.loads, (run / "evals.jsonl").read_text().splitlines())] == \
        [(r["step"], r["label"]) for r in map(json.loads, (finished[1] / "evals.jsonl").read_text().splitlines())]
    assert_same_run(run, finished[1])   # the trajectory (metrics.jsonl) and the adapter, bit for bit


# -- the primitives, on the real RunFolder -----------------------------------------------------
def test_rename_over_a_symlink_replaces_the_link_and_replace_file_refuses_one(tmp_path):
    """What the atomic writes rest on: rename(2) onto a symlink replaces the link, the
    target is untouched; runfiles.replace_file refuses a link at its destination."""
    from mezo_core.runfiles import open_append, replace_file
    target = outside(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(target)
    tmp = tmp_path / "new"
    tmp.write_text("ours")
    os.replace(tmp, link)
    assert not link.is_symlink() and link.read_text() == "ours" and target.read_text() == SECRET
    link.unlink()
    link.symlink_to(target)
    for write in (lambda: replace_file(link, "ours"), lambda: open_append(link)):
        with pytest.raises(MezoError, match="is a symlink where a run file or folder belongs"):
            write()
    assert target.read_text() == SECRET and link.is_symlink()
    hard = tmp_path / "hard"
    os.link(target, hard)                                # an append would write through a hard link
    with pytest.raises(MezoError, match="other hard link"):
        open_append(hard)
    assert target.read_text() == SECRET


def test_run_folder_checkpoints_never_write_through_links(tmp_path, capsys):
    """The real RunFolder: a link planted at ``latest`` after the lock is refused at the
    next checkpoint (nothing written through it), and find() refuses a linked step."""
    import torch

    from mezo_core.checkpoints import RunFolder
    from tiny import seeded
    gen = seeded(31)
    adapter = {"a": torch.randn(3, 4, generator=gen)}
    target = outside(tmp_path)
    folder = RunFolder(tmp_path / "run")
    folder.lock()
    try:
        folder.write_checkpoint(FolderBackend(adapter), {"step": 1}, keep=2)
        (folder.ckpts / "latest").unlink()
        (folder.ckpts / "latest").symlink_to(target)
        with pytest.raises(MezoError, match="latest is a symlink"):
            folder.write_checkpoint(FolderBackend(adapter), {"step": 2}, keep=2)
        with pytest.raises(MezoError, match="latest is a symlink"):
            folder.find(repair=True)
        (folder.ckpts / "latest").unlink()
        other = tmp_path / "other-step"
        shutil.copytree(folder.ckpts / "step-0000001", other)
        (folder.ckpts / "step-0000003").symlink_to(other)
        with pytest.raises(MezoError, match="step-0000003 is a symlink"):
            folder.find(repair=True)
    finally:
        folder.release()
    assert target.read_text() == SECRET
    assert "SECRET" not in "".join(capsys.readouterr())
