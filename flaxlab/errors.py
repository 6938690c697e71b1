"""Errors that are the user's to fix: the CLI prints them as one line and exits with code 2."""


class UsageError(Exception):
    """Bad input: an unknown experiment, option or value, or a wrong shape."""


class DataError(UsageError):
    """Missing, unreachable or corrupt data."""
