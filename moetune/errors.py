"""One exception type for every problem a user can fix; the CLI prints it as one line."""


class MoetuneError(Exception):
    """A user-facing error: the message names the problem and the fix."""


class TableError(MoetuneError):
    """A config table or sidecar that cannot be used as it is."""
