"""The one place that picks the host path of the scheduler's decode bookkeeping.

    RLPT_HOST_PATH=python   the pure-Python scheduler / block manager / sequence code
    RLPT_HOST_PATH=native   the C++ extension rlpt_fast._host (csrc/host_path.cpp); an error if
                            it is not built
    RLPT_HOST_PATH=auto     native when the extension imports, else python (the default)

SchedulerConfig.host_path takes the same values (its default reads the variable), so one engine
can be pinned to a path whatever the environment. Both paths leave every Python object in the
same state (block tables, free list order, reference counts, prefix-cache hashes, finish
reasons); tests/rollout/test_host_native.py checks it.
"""
from __future__ import annotations

import os
from types import ModuleType

MODES = ("python", "native", "auto")
ENV = "RLPT_HOST_PATH"

try:
    from rlpt_fast import _host as _native
    _import_error = ""
except ImportError as e:  # no compiler at install time: the Python path serves
    _native, _import_error = None, str(e)


def default_mode() -> str:
    return os.environ.get(ENV, "auto")


def native_available() -> bool:
    return _native is not None


def native_import_error() -> str:
    return _import_error


def resolve(mode: str) -> ModuleType | None:
    """The native module for `mode`, or None for the Python path."""
    if mode not in MODES:
        raise ValueError(f"host path {mode!r} (from SchedulerConfig.host_path or ${ENV}) is not one of {MODES}")
    if mode == "python":
        return None
    if mode == "native" and _native is None:
        raise ImportError(f"host path 'native' asked for (SchedulerConfig.host_path or ${ENV}) but the "
                          f"extension rlpt_fast._host is not built ({_import_error}); reinstall with a C++ "
                          "compiler: pip install --no-build-isolation -e .")
    return _native
