"""The one exception type users see: a clear, one-line message (the CLI prints it without a traceback)."""


class KCompressError(Exception):
    """A problem with the user's input or request, phrased for the user."""


class KCompressWarning(UserWarning):
    """Something was adjusted (a rank clamped, a layer skipped) and the user should know."""
