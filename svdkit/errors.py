"""The base of every error svdkit raises for something its user can fix: bad input (unknown model, bad ratio,
missing data, a corrupt folder), or numerics the data makes impossible. The CLI prints these as one line and
exits with status 2; any other exception is a bug and keeps its traceback."""

from __future__ import annotations


class SvdkitError(Exception):
    """Something the user can fix; the message names the input and what is wrong with it."""


class ConfigError(SvdkitError, ValueError):
    """A method, allocation or quantizer option out of range, or of the wrong type."""


class OutputError(SvdkitError, FileExistsError):
    """An output location that exists and may not be replaced, or cannot be written."""
