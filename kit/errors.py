"""The exceptions the command line turns into a single readable line."""


class KitError(Exception):
    """A problem the user can fix: the message names the file, key or value and what to do."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, carrying what was and was not saved at the stage it stopped (the command line prints it)."""


class SharedError(KitError):
    """A KitError that every rank of a multi-process (torchrun) run raises together: rank 0 alone prints it."""


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
