"""Errors that are the user's to fix: the CLI prints them as one line and exits with code 2."""
import difflib
import os
import re


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


def device_count_setting_problem(environ=os.environ):
    """Why JAX_NUM_CPU_DEVICES or XLA_FLAGS' device count cannot be used, or None: read before jax is imported,
    which raised a ValueError's traceback on `abc` (XLA: a 94-line flag dump) and, on 0, blamed a plugin."""
    settings = [("JAX_NUM_CPU_DEVICES", environ.get("JAX_NUM_CPU_DEVICES"))]
    settings += [("XLA_FLAGS --xla_force_host_platform_device_count", value) for value in
                 re.findall(r"--xla_force_host_platform_device_count=(\S*)", environ.get("XLA_FLAGS", ""))]
    for name, value in settings:
        if value is not None and value.strip() and not (value.strip().isdigit() and int(value) > 0):
            return f"{name}={value}: give a whole number of CPU devices, 1 or more"
    return None
