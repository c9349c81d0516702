"""The one exception type the CLI turns into a one-line message instead of a traceback."""


class DynascopeError(Exception):
    """Bad input or state the user can fix; the message names the file or option and what to do."""
