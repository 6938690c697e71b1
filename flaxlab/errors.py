"""Errors that are the user's to fix: the CLI prints them as one line and exits with code 2."""
import difflib


class UsageError(Exception):
    """Bad input: an unknown experiment, option or value, or a wrong shape."""


class DataError(UsageError):
    """Missing, unreachable or corrupt data."""


def did_you_mean(given, known, prefix=""):
    """' (did you mean --optimizer.lr?)' for the known name nearest a misspelt one, or ''."""
    near = difflib.get_close_matches(str(given), [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean {prefix}{near[0]}?)" if near else ""
