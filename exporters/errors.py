"""Errors raised while resolving or exporting a model: one line saying what is wrong and what to do."""


class ExportError(Exception):
    """A source that cannot be exported (missing file, unsupported architecture, missing tokenizer...)."""
