"""The project's one error model: every error we raise on purpose derives from :class:`NeflError` and
carries the process exit code that a command line ends with when it is not handled (:class:`ExitCode`)."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes of ``nefl-coord`` and ``nefl-edge`` (documented in the README)."""

    OK = 0
    FAILURE = 1  # an unexpected error: a bug, with a traceback
    BAD_INPUT = 2  # a wrong option, configuration, data set or run directory; the message says what to fix
    BROKER = 3  # the MQTT broker cannot be reached or refused the connection
    NO_CLIENTS = 4  # too few devices joined the run in time
    DISK_FULL = 5  # the disk of the run directory (or the device's cache) is full; free space, then resume
    INTERRUPTED = 130  # stopped by SIGINT / SIGTERM after a clean shutdown


class NeflError(Exception):
    """Base of the errors nefl-edge raises on purpose; ``exit_code`` is what a command line exits with."""

    exit_code: ExitCode = ExitCode.BAD_INPUT


class BadInput(NeflError, ValueError):
    """Input that a user can fix: an option, a file, a configuration value."""
