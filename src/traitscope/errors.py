"""The one exception type the command line turns into a single clear error line."""


class TraitscopeError(Exception):
    """A problem with the user's input or environment, explained in one line (no traceback)."""
