"""Errors raised by graph passes: one line saying what is wrong and what to do."""


class GraphPassError(ValueError):
    """A graph that a pass cannot handle (no recognisable layers, a bad layer path, ...)."""
