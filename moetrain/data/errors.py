"""The errors of the data pipeline (a module of its own so that every data module can raise them)."""

from __future__ import annotations


class DataError(RuntimeError):
    """The data cannot be found, prepared or loaded; the message names the config key, the path and
    the fix. The command line reports it as one line with exit code 2."""

    def __init__(self, message: str):
        # One line, whatever the library errors quoted in it span.
        super().__init__(" ".join(str(message).split()))


class DataExhausted(DataError):
    """A source ran out of sequences with `data.on_exhausted=stop`; training stops cleanly."""
