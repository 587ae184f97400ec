"""The one exception type users see: a clear, one-line message (the CLI prints it without a traceback)."""


class KCompressError(Exception):
    """A problem with the user's input or request, phrased for the user."""


class KCompressWarning(UserWarning):
    """Something was adjusted (a rank clamped, a layer skipped) and the user should know."""


def one_line(message: object) -> str:
    """``message`` as one line: its non-empty lines stripped and joined by ``"; "``."""
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


def error_line(error: BaseException) -> str:
    """One line for an exception: the message of a :class:`KCompressError`, else ``"Type: message"``."""
    text = one_line(error) or type(error).__name__
    return text if isinstance(error, KCompressError) else f"{type(error).__name__}: {text}"
