"""The exceptions the command line turns into a single readable line."""


class KitError(Exception):
    """A problem the user can fix: the message names the file, key or value and what to do."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, carrying what was and was not saved at the stage it stopped (the command line prints it)."""


class SharedError(KitError):
    """A KitError that every rank of a multi-process (torchrun) run raises together: rank 0 alone prints it."""
