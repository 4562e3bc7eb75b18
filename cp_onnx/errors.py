"""The one error type users see: its message is a single line saying what is wrong and what to do."""


class CpOnnxError(Exception):
    """A problem with the user's input or environment; the CLI prints it and exits with code 2."""
