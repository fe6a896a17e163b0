"""User-facing errors: the CLI prints them as one line and exits non-zero, never a traceback."""


class LctrunError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""


class ConfigError(LctrunError):
    pass


class DataNotFoundError(LctrunError):
    pass
