"""One exception type for everything a user can get wrong: the CLI prints its
message and exits non-zero, without a traceback; and ``warn``, the one-line
warning every part of a run prints the same way."""
import sys


class MezoError(Exception):
    """A user-facing error: the message names the file, line or field at fault."""


class DivergedError(MezoError):
    """Training diverged and the convergence guard could not recover it (exit 3)."""


def warn(message: str) -> None:
    print(f"mezo-run: warning: {message}", file=sys.stderr, flush=True)
