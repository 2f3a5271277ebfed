"""The lock that holds a run folder for the life of one run.

Two exclusive flocks: on the folder itself (a descriptor the run keeps open) and on
``run.lock``, which names the holder. The kernel drops both when the process dies,
so a lock left by a killed run is taken over; a live holder is named in the refusal.
"""
from __future__ import annotations

import datetime
import fcntl
import os
import socket
from pathlib import Path

from .errors import MezoError, warn
from .faults import fault
from .runfiles import one_line, open_own, read_bytes, write_error


class RunLock:
    def __init__(self, out: Path, lock_file: Path):
        self.out, self.lock_file = out, lock_file
        self._lock_fd = None
        self._dir_fd = None

    def acquire(self, check=None) -> None:
        """Hold the run folder for the life of the run: an exclusive flock on the folder
        itself (a descriptor the run keeps open; deleting or replacing ``run.lock``
        does not free it) and on ``run.lock``, which names the holder (pid, host,
        start). The kernel drops both when the process dies, so a lock left by a
        killed run is simply taken over; a live holder is named in the refusal.
        ``check()`` runs once the folder is held, before ``run.lock`` is opened (the
        run folder refuses symlinks there)."""
        if self._lock_fd is not None:
            return   # held already (a --resume that starts the run over)
        def open_folder():
            self.out.mkdir(parents=True, exist_ok=True)
            return os.open(self.out, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        # out_dir itself may be a link (followed); a file system without flock on folders
        # (NFS) leaves run.lock alone to hold the run
        dir_fd = self._flocked(self.out, open_folder, follow=True, flock_optional=True)
        self._dir_fd = dir_fd
        try:
            if check is not None:
                check()
            fd = self._lock_file()
        except BaseException:
            self._unlock()
            raise
        previous = one_line(os.read(fd, 4096).decode(errors="replace"))
        if previous:
            warn(f"taking over the lock of a run that ended without releasing it ({previous})")
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode(), 0)
            os.fsync(fd)
        except OSError as exc:   # a full disk: the lock is not left behind
            self._lock_fd = fd
            self.release()
            raise write_error(self.lock_file, exc) from None
        self._lock_fd = fd
        fault("lock")

    def _lock_file(self) -> int:
        """``run.lock`` opened (never through a symlink) and flocked."""
        return self._flocked(self.lock_file, lambda: open_own(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644),
                             follow=False)

    def _flocked(self, path: Path, open_fd, follow: bool, flock_optional: bool = False) -> int:
        """``open_fd()``, exclusively flocked and still what stands at ``path`` (a holder
        may remove or rename it while we open it: then again). A live holder is named
        in the refusal; ``flock_optional``: where flock is not supported, go on."""
        while True:
            try:
                fd = open_fd()
            except OSError as exc:
                raise MezoError(f"out_dir {self.out}: cannot create the run folder or its lock "
                                f"({exc.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._refuse_held()
            except OSError:
                if not flock_optional:
                    raise
            try:
                here, held = os.stat(path, follow_symlinks=follow), os.fstat(fd)
                if (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino):
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def _refuse_held(self):
        try:
            holder = one_line(read_bytes(self.lock_file, 4096).decode(errors="replace"))
        except (OSError, MezoError):
            holder = ""
        raise MezoError(f"out_dir {self.out} is in use by another run ({holder or 'a run'}; lock file "
                        f"{self.lock_file}): wait for it to end, or choose another out_dir=...") from None

    def _unlock(self) -> None:
        for fd in (self._lock_fd, self._dir_fd):
            if fd is not None:
                os.close(fd)
        self._lock_fd = self._dir_fd = None

    def release(self) -> None:
        if self._lock_fd is None:
            return
        self.lock_file.unlink(missing_ok=True)  # before unlocking: a waiter then sees a new inode
        self._unlock()
