"""The exceptions the command line turns into a single readable line."""


class KitError(Exception):
    """A problem the user can fix: the message names the file, key or value and what to do."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, carrying what was and was not saved at the stage it stopped (the command line prints it)."""


class SharedError(KitError):
    """A KitError that every rank of a multi-process (torchrun) run raises together: rank 0 alone prints it."""


def first_line(err: Exception, when_empty: str | None = None) -> str:
    """An exception's first line (at most 200 characters), for a one-line message; `when_empty` (default: its
    type's name) when it has no text."""
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else (when_empty or type(err).__name__)


def killed_by(returncode: int) -> str | None:
    """A child process's end in words when a signal ended it (a negative return code): "killed by SIGKILL (the
    out-of-memory killer, or kill -9)"; None when it exited by itself."""
    if returncode >= 0:
        return None
    import signal

    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"killed by {name}" + (" (the out-of-memory killer, or kill -9)" if name == "SIGKILL" else "")
