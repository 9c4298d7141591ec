"""What both command lines share: the error model at the top (an uncaught :class:`NeflError` becomes one
``error:`` line and its exit code), ``--version``, and logging set-up (text or JSON lines, kept in round order)."""

from __future__ import annotations

import errno
import json
import logging
import math
import sys
import threading
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn, Optional, Union

import typer

from nefl_edge.core.errors import ExitCode, NeflError


class CliError(NeflError):
    """An error a command reports itself, with its exit code."""

    def __init__(self, message: str, code: ExitCode = ExitCode.BAD_INPUT) -> None:
        super().__init__(message)
        self.exit_code = code


def fail(message: str, code: ExitCode = ExitCode.BAD_INPUT) -> NoReturn:
    raise CliError(message, code)


def check_folder(path: Path, flag: str) -> None:
    """Exit 2 with one sentence when ``path`` (given as ``flag``) cannot be a folder: it, or the nearest of
    its parents that exists, is not a folder (a file given as ``--runs-dir`` or ``--cache``)."""
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                what = f"{existing} is a file" if existing == path else f"{existing}, a parent of it, is a file"
                fail(f"{flag} {path} must be a folder, and {what}")
            return


def run_app(app: typer.Typer, prog_name: str, args: Optional[list[str]] = None) -> NoReturn:
    """Run a typer app; a :class:`NeflError` ends it with ``error: <message>`` and the error's exit code, and
    so does a full disk (or quota) that no code of ours turned into one: ``ExitCode.DISK_FULL``."""
    try:
        app(args=args, prog_name=prog_name)
    except NeflError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(int(exc.exit_code))
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" while writing {exc.filename}" if exc.filename else ""
        typer.echo(f"error: no space left on the disk{where}: free some space and run it again", err=True)
        sys.exit(int(ExitCode.DISK_FULL))
    sys.exit(0)


def version_callback(value: bool) -> None:
    if value:
        from nefl_edge.core import __version__

        typer.echo(f"nefl-edge {__version__}")
        raise typer.Exit()


def add_version_option(app: typer.Typer) -> None:
    """``--version`` on the app itself (``nefl-coord --version``)."""

    @app.callback()
    def _root(
        version: bool = typer.Option(
            False, "--version", callback=version_callback, is_eager=True, help="Show the version and exit."
        ),
    ) -> None:
        pass


LOG_FORMATS = ("text", "json")


def event(name: str, **fields: Any) -> dict[str, Any]:
    """``extra=`` for a log call that is a named event: ``--log-format json`` writes ``name`` as the object's
    ``event`` and ``fields`` beside it (text logs show only the message)."""
    return {"event": name, "event_fields": fields}


class JsonLines(logging.Formatter):
    """One JSON object per log record: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``event`` and
    ``message``, plus the event's fields. A record is a named event when its call passed :func:`event`, or
    when its format string is one of ``templates`` (format string -> event name and the names of its
    ``%`` arguments, in order): the loggers of the round engine and the sessions keep their text and gain
    structure here, in one table per program, instead of at every call site. Other records are ``"log"``."""

    def __init__(self, templates: Optional[dict[str, tuple[str, tuple[str, ...]]]] = None) -> None:
        super().__init__()
        self.templates = templates or {}

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
        name: Optional[str] = getattr(record, "event", None)
        fields: dict[str, Any] = dict(getattr(record, "event_fields", None) or {})
        if name is None and isinstance(record.msg, str) and record.msg in self.templates:
            name, keys = self.templates[record.msg]
            args = record.args if isinstance(record.args, tuple) else ()
            fields = dict(zip(keys, args)) if len(args) == len(keys) else {}
        obj: dict[str, Any] = {
            "time": stamp,
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": name or "log",
            "message": record.getMessage(),
        }
        obj.update({k: v for k, v in fields.items() if k not in obj})
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(_strict(obj), default=str, allow_nan=False)


def _strict(value: Any) -> Any:
    """``value`` with non-finite floats as strings (``"nan"``, ``"inf"``): JSON has no NaN, and a diverged
    loss must not make a line that strict parsers (jq) refuse."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


class RoundOrder:
    """Keeps log lines in round order while rounds are evaluated in the background.

    The round loop calls :meth:`hold` when it hands round r to the evaluator and the evaluator calls
    :meth:`release` with the mark once round r's line is logged. Records of other threads (round r+1's
    selection, declines, joins) emitted after a mark wait in a queue behind it; the evaluator's own records
    (thread name ``nefl-eval``) pass at once. Releasing the oldest mark lets through what was queued behind it,
    up to the next mark. A record keeps its creation time, so a held line may show an earlier time than the
    line before it. Without :func:`setup_logging` (library use, pytest's caplog) nothing is held."""

    def __init__(self, passing_thread_prefix: str = "nefl-eval") -> None:
        self._lock = threading.RLock()
        self._queue: deque[Union[int, tuple[logging.Handler, logging.LogRecord]]] = deque()
        self._marks: set[int] = set()
        self._next = 0
        self.prefix = passing_thread_prefix

    def hold(self) -> int:
        with self._lock:
            self._next += 1
            self._marks.add(self._next)
            self._queue.append(self._next)
            return self._next

    def release(self, mark: int) -> None:
        with self._lock:
            self._marks.discard(mark)
            while self._queue:
                item = self._queue[0]
                if isinstance(item, int):
                    if item in self._marks:
                        return
                    self._queue.popleft()
                    continue
                self._queue.popleft()
                item[0].handle(item[1])

    def admit(self, handler: logging.Handler, record: logging.LogRecord) -> bool:
        """True: emit ``record`` now; False: it waits in the queue."""
        with self._lock:
            if not self._queue or threading.current_thread().name.startswith(self.prefix):
                return True
            self._queue.append((handler, record))
            return False


ROUND_ORDER = RoundOrder()


class _Ordered(logging.Handler):
    """``inner`` behind :data:`ROUND_ORDER`."""

    def __init__(self, inner: logging.Handler) -> None:
        super().__init__(inner.level)
        self.inner = inner

    def emit(self, record: logging.LogRecord) -> None:
        if ROUND_ORDER.admit(self.inner, record):
            self.inner.handle(record)


def setup_logging(
    verbose: bool,
    handler: Optional[logging.Handler] = None,
    log_format: str = "text",
    templates: Optional[dict[str, tuple[str, tuple[str, ...]]]] = None,
) -> None:
    """INFO logs (DEBUG with ``--verbose``) on stderr: timestamped lines, through ``handler`` (the coordinator
    passes rich's for a terminal), or with ``log_format="json"`` one JSON object per line (:class:`JsonLines`,
    ``templates`` naming the events). Lines stay in round order (:class:`RoundOrder`)."""
    if log_format not in LOG_FORMATS:
        fail(f"--log-format must be text or json, got {log_format!r}")
    if log_format == "json":
        handler = logging.StreamHandler()
        handler.setFormatter(JsonLines(templates))
    elif handler is None:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    else:
        handler.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[_Ordered(handler)])
    logging.getLogger("paho").setLevel(logging.WARNING)


def no_flag_metavars() -> None:
    """``--help`` without a ``<bool>`` type column after every flag (``--verbose <bool>``, ``--help <bool>``):
    typer 0.29 prints the type of flags too, which take no value. Departs from typer's own rendering."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    if getattr(shown, "__name__", "") == "_flag_free":
        return

    def _flag_free(self: TyperOption, ctx: Any) -> Any:
        return None if getattr(self, "is_flag", False) else shown(self, ctx)

    TyperOption.display_type_rich = _flag_free  # type: ignore[method-assign]


def source_commit() -> str:
    """The git commit of the source tree this package runs from (``-dirty`` with uncommitted changes), or what
    it is instead: an installed wheel has no tree. Every source root lies three folders below the tree's top."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    if not (root / ".git").exists():
        return "none (installed package)"
    try:
        git = ["git", "-C", str(root)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown (git failed)"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
