"""The run folder is a boundary: the files a run opens, writes, renames or locks
inside ``out_dir`` are opened without following symlinks, and a symlink where a
run file or folder belongs is refused in one line naming it (a planted link in a
shared or restored folder must not let a run write, truncate, read or use a file
outside it).

- reads and in-place writes: ``O_NOFOLLOW`` (a symlink at the path gives ELOOP,
  turned into the refusal); a file written in place (appended) must also be a
  regular file with no other hard link (the write would reach the other name);
- atomic writes: a new temp file (``O_CREAT | O_EXCL | O_NOFOLLOW``: whatever sat
  at the temp name, a link included, is unlinked first, never followed), then
  rename(2), which replaces the directory entry at the destination, never a
  link's target; a destination that is a symlink is refused before that;
- folders: ``lstat`` before use (``O_NOFOLLOW`` guards only a path's last part).

A write that fails (the disk full, a quota, any OS error, safetensors' own error
type included) is one line naming the file (``writing``, ``write_error``), its
temp file or folder removed; the run's lock is released on the way out
(Trainer), so nothing half-written or stale stays behind.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
from pathlib import Path

from .errors import MezoError

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def link_error(path) -> MezoError:
    return MezoError(f"{path} is a symlink where a run file or folder belongs: refused (a run never follows "
                     f"a link out of its folder); remove it, or choose another out_dir=...")


def refuse_link(path) -> None:
    """A MezoError naming ``path`` when it is a symlink (dangling or not)."""
    if os.path.islink(path):
        raise link_error(path)


def open_fd(path, flags: int, mode: int = 0o666) -> int:
    """``os.open`` that never follows a symlink at ``path`` (refused in one line)."""
    try:
        return os.open(path, flags | _NOFOLLOW, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP and os.path.islink(path):
            raise link_error(path) from None
        raise


def read_bytes(path, limit: int | None = None) -> bytes:
    """The bytes of ``path`` (the first ``limit``), not through a symlink."""
    with os.fdopen(open_fd(path, os.O_RDONLY), "rb") as f:
        return f.read() if limit is None else f.read(limit)


def open_text(path):
    """``path`` for reading UTF-8 text, not through a symlink."""
    return os.fdopen(open_fd(path, os.O_RDONLY), "r", encoding="utf-8")


def utf8_lines(data: bytes) -> list[str]:
    """The lines of ``data`` that are valid UTF-8; a line that is not (damage, or bytes
    appended by something else) is dropped like a row cut short by a kill."""
    lines = []
    for raw in data.splitlines():
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            pass
    return lines


def _own_regular_file(fd: int, path) -> None:
    st = os.fstat(fd)
    problem = ("is not a regular file" if not stat.S_ISREG(st.st_mode) else
               f"has {st.st_nlink - 1} other hard link(s) (a write would reach them)" if st.st_nlink > 1 else None)
    if problem:
        os.close(fd)
        raise MezoError(f"{path} {problem}: refused as a run file; remove it, or choose another out_dir=...")


def open_own(path, flags: int, mode: int = 0o666) -> int:
    """A file of the run opened to be written in place: no symlink, a regular file
    with no other hard link."""
    fd = open_fd(path, flags, mode)
    _own_regular_file(fd, path)
    return fd


def open_append(path, newline: str | None = None):
    """``path`` for appending UTF-8 text (created if missing), see ``open_own``."""
    with writing(path):
        fd = open_own(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    return _AppendFile(os.fdopen(fd, "a", encoding="utf-8", newline=newline), path)


#: errnos of a full disk: no space, a quota, a file past RLIMIT_FSIZE
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def is_write_error(exc: BaseException) -> bool:
    """An OSError, or safetensors' SafetensorError (raised for any failed save, its I/O error inside)."""
    return isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError"


def shown_path(path) -> str:
    """A run file as the user knows it: temp names (``.step-0000004.tmp``, ``last.tmp123``,
    ``config.yaml.tmp123``) shown as the file or folder they become."""
    parts = [re.sub(r"^\.?(.+?)\.tmp\d*$", r"\1", part) for part in Path(path).parts]
    return str(Path(*parts)) if parts else str(path)


def write_error(path, exc: BaseException) -> MezoError:
    """A failed write as one line naming the file; a full disk says so, with what to do."""
    text = str(exc)
    full = getattr(exc, "errno", None) in DISK_FULL or "No space left" in text or "os error 28" in text
    if full:
        reason = ("no space left on device: free some space, then run again (a training run continues "
                  "from its last checkpoint with --resume)")
    else:
        reason = getattr(exc, "strerror", None) or (text.splitlines() or [type(exc).__name__])[0][:200]
    return MezoError(f"{shown_path(path)}: cannot write: {reason}")


def remove_tree(path) -> None:
    """Remove a folder, or unlink whatever else is at ``path`` (a symlink: never followed)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        remove_entry(path)


@contextlib.contextmanager
def writing(path, cleanup=None):
    """Writes of ``path`` inside: a failure (``is_write_error``) becomes one line naming
    it (``write_error``); on any failure ``cleanup`` (a temp file or folder) is removed."""
    try:
        yield
    except BaseException as exc:
        if cleanup is not None:
            remove_tree(cleanup)
        if isinstance(exc, MezoError) or not is_write_error(exc):
            raise
        raise write_error(path, exc) from None


class _AppendFile:
    """A text file of the run opened for appending whose failed writes name it."""

    def __init__(self, f, path):
        self._f, self.path = f, path

    def write(self, text):
        with writing(self.path):
            return self._f.write(text)

    def flush(self):
        with writing(self.path):
            self._f.flush()

    def close(self):
        with writing(self.path):
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


def remove_entry(path) -> None:
    """Unlink the file or symlink at ``path`` (a link's target is untouched)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_new(path, data: bytes | str, sync: bool = False) -> None:
    """``data`` as a new file at ``path``, a temp name of the run: whatever is there is
    unlinked first, then the file is created exclusively (never through a link)."""
    remove_entry(path)
    with writing(path, cleanup=path):   # a full disk: one line naming the file, no part left
        with os.fdopen(open_fd(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if sync:
                f.flush()
                os.fsync(f.fileno())


def replace_file(path, data: bytes | str, sync: bool = False) -> None:
    """``path`` holds ``data``, atomically: written beside (``<name>.tmp<pid>``) and
    renamed over it. A symlink at ``path`` is refused, not replaced nor followed."""
    path = Path(path)
    refuse_link(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    write_new(tmp, data, sync)
    os.replace(tmp, path)


def one_line(text: str, limit: int = 200) -> str:
    """Text the run wrote itself (e.g. the pid line of run.lock) made safe to print:
    its first line, printable characters only, at most ``limit`` of them."""
    line = (text.strip().splitlines() or [""])[0]
    line = "".join(c if c.isprintable() else "?" for c in line)
    return line[:limit] + ("..." if len(line) > limit else "")
