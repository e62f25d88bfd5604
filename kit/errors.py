"""The one exception type the command line turns into a single readable line."""


class KitError(Exception):
    """A problem the user can fix: the message names the file, key or value and what to do."""
