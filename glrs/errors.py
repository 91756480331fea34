"""One exception type for problems the user can fix; the CLI prints it without a traceback."""


class GlrsError(Exception):
    """Bad input or state: the message names the problem and the fix."""
