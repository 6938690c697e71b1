"""Errors that are the user's to fix: the CLI prints them as one line and exits with code 2."""
import difflib


class UsageError(Exception):
    """Bad input: an unknown experiment, option or value, or a wrong shape."""


class DataError(UsageError):
    """Missing, unreachable or corrupt data."""


def did_you_mean(given, known, prefix=""):
    """' (did you mean --optimizer.lr?)' for the known name nearest a misspelt one, or ''."""
    given, known = str(given), [str(k) for k in known]
    leaf = lambda name: name.rpartition(".")[2]  # noqa: E731
    # a dotted name's last part must be near too: optimizer.learning_rate is not optimizer.name
    known = [k for k in known if difflib.SequenceMatcher(None, leaf(given), leaf(k)).ratio() >= 0.6]
    near = difflib.get_close_matches(given, known, n=1, cutoff=0.6)
    return f" (did you mean {prefix}{near[0]}?)" if near else ""
