"""User-facing errors: the CLI prints them as one line and exits non-zero, never a traceback."""


class LctrunError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""


class ConfigError(LctrunError):
    pass


class DataNotFoundError(LctrunError):
    pass


class WriteError(LctrunError):
    """An output that cannot be written: a full disk, a read-only or missing directory, a file in the way."""


def quoted(text) -> str:
    """User text inside a one-line message: as typed when printable, else escaped (no raw newlines)."""
    text = str(text)
    return f"'{text}'" if text.isprintable() else repr(text)
