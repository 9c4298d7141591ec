"""Durable file writes, the one implementation for both sides (keys, enrolment, broker files, kept weights,
checkpoints): readers see the old content or the new one, never a part, and a crash after return loses
nothing."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Union


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` durable (a no-op where folders cannot be fsynced)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: Union[bytes, str], mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: a temporary file created with ``mode`` (never wider, whatever the umask),
    fsynced, renamed over ``path``, and the folder fsynced."""
    raw = data.encode() if isinstance(data, str) else data
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            if hasattr(os, "fchmod"):
                os.fchmod(out.fileno(), mode)
            out.write(raw)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
