"""Durable run state: the checkpoint a restarted coordinator resumes from, and durable file writes.

``checkpoint.json`` names the state file (``state-RRRRR.safetensors``, the flat global state), its sha256,
the round, the engine's random generator, the registry and the quarantine. Every write goes to a temporary
file that is fsynced, renamed over the old one, and the folder fsynced (``edge_client.files.write_atomic``);
the previous state file is deleted only after the new checkpoint that no longer names it is safe on disk.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nefl_edge.core.errors import BadInput, ExitCode, NeflError
from nefl_edge.core.files import write_atomic

CHECKPOINT = "checkpoint.json"


class CheckpointError(BadInput):
    """A run directory that cannot be resumed; the message names the file and what to do."""


class DiskFull(NeflError):
    """The run directory's disk is full (or over quota): the message names the file and how to go on; the
    command exits with :attr:`ExitCode.DISK_FULL`."""

    exit_code = ExitCode.DISK_FULL


@contextmanager
def _disk(path: Path, what: str) -> Iterator[None]:
    """Turn a full disk while writing ``path`` into :class:`DiskFull` with one sentence."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiskFull(
            f"no space left on the disk of {path.parent} while writing {what} ({path.name}): free some space, "
            f"then continue the run with --resume {path.parent} (it restarts after the last complete checkpoint)"
        ) from None


def durable_append(path: Path, lines: list[str]) -> None:
    """Append lines and fsync (metrics and client records survive a crash once a round is recorded)."""
    with _disk(path, "the run's records"), path.open("a") as fh:
        fh.write("".join(line + "\n" for line in lines))
        fh.flush()
        os.fsync(fh.fileno())


@dataclass
class Checkpoint:
    round: int
    state: dict[str, Any]  # flat tensors
    engine: dict[str, Any]  # rng state, quarantine
    registry: dict[str, Any]


def save(run_dir: Path, checkpoint: Checkpoint) -> None:
    from safetensors.numpy import save as save_tensors

    name = f"state-{checkpoint.round:05d}.safetensors"
    blob = save_tensors(checkpoint.state)
    with _disk(run_dir / name, "a checkpoint"):
        write_atomic(run_dir / name, blob, 0o644)
    meta = {
        "round": checkpoint.round,
        "state": name,
        "state_sha256": hashlib.sha256(blob).hexdigest(),
        "engine": checkpoint.engine,
        "registry": checkpoint.registry,
        "saved_at": time.time(),
    }
    with _disk(run_dir / CHECKPOINT, "a checkpoint"):
        write_atomic(run_dir / CHECKPOINT, json.dumps(meta).encode(), 0o644)
    for old in run_dir.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink()


def load(run_dir: Path, purpose: str = "resume") -> Checkpoint:
    """Read and verify the checkpoint of ``run_dir``; raise :class:`CheckpointError` naming what is wrong and
    what it stops (``purpose``: resume, export)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load as load_tensors

    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(
            f"cannot {purpose} {run_dir}: {path} is missing (the run never completed a round, or this is not a "
            "run directory)" + ("; start a new run without --resume" if purpose == "resume" else "")
        )
    try:
        meta = json.loads(path.read_text())
        name, digest, round_ = str(meta["state"]), str(meta["state_sha256"]), int(meta["round"])
        engine, registry = dict(meta["engine"]), dict(meta["registry"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"cannot {purpose} {run_dir}: {path} is damaged ({exc})"
            + ("; start a new run" if purpose == "resume" else "")
        ) from None
    state_path = run_dir / Path(name).name
    try:
        blob = state_path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(
            f"cannot {purpose} {run_dir}: the state file {state_path} named in {path} is missing"
        ) from None
    if hashlib.sha256(blob).hexdigest() != digest:
        raise CheckpointError(
            f"cannot {purpose} {run_dir}: {state_path} does not match the sha256 in {path} (truncated or altered)"
        )
    try:
        state = load_tensors(blob)
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(f"cannot {purpose} {run_dir}: {state_path} is not a valid state file ({exc})") from None
    return Checkpoint(round_, state, engine, registry)
