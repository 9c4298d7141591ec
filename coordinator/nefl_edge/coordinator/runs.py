"""Run management read from disk and from the broker: ``nefl-coord runs`` (the runs in a folder) and
``nefl-coord status RUN`` (one run now). Nothing here writes to a run except what ``serve`` and ``demo`` call
while they run: :func:`running_marker` and :func:`write_progress`.

A run's state comes from its directory: ``coordinator.pid`` names the serving process while it runs,
``checkpoint.json`` the last recorded round, ``config.json`` the rounds planned, ``metrics.jsonl`` the
accuracy, ``security.json`` how it was secured, ``progress.json`` (rewritten every ``PROGRESS_EVERY_S`` by
the running coordinator) the round's answers and every device's last status as the coordinator's registry
holds it. Who is online: for a running run, that registry (the coordinator reads the broker itself); for a
run that is not running, the devices' retained status messages on the broker (``nefl/<run>/node/+/status``),
read with the run's recorded security, but only on a broker without accounts: the generated broker takes
the user name as client id (``use_username_as_clientid``), so a second session with the coordinator's
account would take over the connection of any coordinator using it now. What each device trains is its
task of the last recorded round (``clients.jsonl``): tasks are not retained, so the task of the round in
progress shows once that round is recorded."""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from nefl_edge.coordinator.records import CLIENTS, METRICS, final_rows, read_jsonl
from nefl_edge.core.errors import BadInput
from nefl_edge.core.files import write_atomic

PID_FILE, PROGRESS_FILE = "coordinator.pid", "progress.json"
PROGRESS_EVERY_S = 2.0
STATUS_WAIT_S = 2.0  # the broker sends retained messages right after the subscription; quiet this long: done


@contextlib.contextmanager
def running_marker(run_dir: Path) -> Iterator[None]:
    """``coordinator.pid`` in ``run_dir`` while the block runs (removed after, also on an error)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / PID_FILE
    write_atomic(path, f"{os.getpid()}\n", 0o644)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


def write_progress(run_dir: Path, text: str, devices: dict[str, str]) -> None:
    """The live round's progress line (``round 3: 2/5 clients answered``) and every device's last status
    (``online``, ``training``, ``offline``, ``lost``) for ``nefl-coord status``."""
    body = {"text": text, "devices": devices, "time": time.time()}
    with contextlib.suppress(OSError):
        write_atomic(run_dir / PROGRESS_FILE, json.dumps(body) + "\n", 0o644)


def _json(path: Path) -> Optional[dict[str, Any]]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def coordinator_pid(run_dir: Path) -> Optional[int]:
    """The pid of the coordinator serving ``run_dir`` now, or None."""
    try:
        pid = int((run_dir / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 0 and _alive(pid) else None


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def secured(run_dir: Path) -> str:
    """How the run was secured, from ``security.json``: ``signed+tls``, ``signed``, ``tls``, ``no`` or
    ``unknown`` (a run from before runs recorded it)."""
    record = _json(run_dir / "security.json")
    if record is None:
        return "unknown"
    signed, tls = record.get("enrolment_dir") is not None, record.get("tls_ca") is not None
    return {(True, True): "signed+tls", (True, False): "signed", (False, True): "tls"}.get((signed, tls), "no")


def summarise(run_dir: Path) -> dict[str, Any]:
    """One run as ``nefl-coord runs`` shows it."""
    config = _json(run_dir / "config.json") or {}
    rounds = int(config.get("rounds", 0))
    recorded = _json(run_dir / "checkpoint.json")
    last = int(recorded["round"]) if recorded and isinstance(recorded.get("round"), int) else None
    pid = coordinator_pid(run_dir)
    if pid is not None:
        state = "running"
    elif last is None:
        state = "not started"
    else:
        state = "finished" if last >= rounds else "stopped"
    rows = final_rows(read_jsonl(run_dir / METRICS))
    return {
        "run_dir": str(run_dir),
        "run": config.get("run"),
        "method": config.get("method"),
        "state": state,
        "pid": pid,
        "round": last,
        "rounds": rounds,
        "evaluated_round": rows[0]["round"] if rows else None,
        "accuracy": [round(float(r["accuracy"]), 4) for r in rows],
        "secured": secured(run_dir),
    }


def list_runs(runs_dir: Path) -> list[dict[str, Any]]:
    """Every run directory directly in ``runs_dir``, oldest first (by name: ``<run>-<date>-<time>``)."""
    if not runs_dir.is_dir():
        raise BadInput(f"--runs-dir {runs_dir}: no such folder")
    return [summarise(p) for p in sorted(runs_dir.iterdir(), key=lambda p: p.name) if is_run_dir(p)]


def find_run(run: str, runs_dir: Path) -> Path:
    """``run`` as a run directory, or the newest run directory of that run name in ``runs_dir``."""
    path = Path(run)
    if is_run_dir(path):
        return path
    named = [
        p
        for p in sorted(runs_dir.glob(f"{run}-*"))
        if is_run_dir(p) and (_json(p / "config.json") or {}).get("run") == run
    ]
    if not named:
        raise BadInput(f"{run} is neither a run directory nor the name of a run in {runs_dir}")
    return named[-1]


def broker_states(run_dir: Path, run: str, wait_s: float = STATUS_WAIT_S) -> dict[str, str]:
    """Each device's retained status on the run's broker (``online``, ``training``, ``offline``, ``lost``),
    read with the security ``security.json`` records (verified with the enrolment's keys in a signed run)."""
    from nefl_edge.coordinator.run import RunSecurity
    from nefl_edge.core.mqtt import BrokerAddress, MqttLink
    from nefl_edge.core.schemas import Status
    from nefl_edge.core.wire import Topics

    sec = RunSecurity.load(run_dir)
    if sec is None:
        raise BadInput(f"{run_dir} records no broker (security.json); it was started before runs recorded it")
    keyring = sender_of = None
    if sec.enrolment_dir is not None:
        from nefl_edge.coordinator.enrolment import COORDINATOR_KEY_ID, coordinator_keyring
        from nefl_edge.core.signing import signer_policy

        keyring, sender_of = coordinator_keyring(Path(sec.enrolment_dir)), signer_policy(COORDINATOR_KEY_ID)
    security = sec.security()
    link = MqttLink(
        f"nefl-status-{run}-{uuid.uuid4().hex[:6]}",
        BrokerAddress.parse(sec.broker, 8883 if security.tls_ca else 1883),
        run,
        security,
        sec.mqtt_version,  # type: ignore[arg-type]
        clean=True,
        keyring=keyring,
        sender_of=sender_of,
    )
    topics = Topics(run)
    states: dict[str, str] = {}
    link.connect(10.0)
    try:
        link.subscribe(topics.all_nodes("status"))
        while True:
            item = link.next(wait_s)
            if item is None:
                break
            topic, message, _ = item
            if isinstance(message, Status) and message.node == Topics.node_of(topic):
                states[message.node] = message.state
    finally:
        link.close()
    return states


def run_status(run_dir: Path, from_broker: bool = True) -> dict[str, Any]:
    """``nefl-coord status``: the run's summary, the live round's progress, and every device seen (in the
    run's records, the running coordinator's registry or on the broker) with its state and its last
    recorded task; ``source`` says where the states come from."""
    summary = summarise(run_dir)
    config = _json(run_dir / "config.json") or {}
    progress = _json(run_dir / PROGRESS_FILE) if summary["state"] == "running" else None
    last_task: dict[str, dict[str, Any]] = {}
    for row in read_jsonl(run_dir / CLIENTS):
        node = row.get("node")
        if isinstance(node, str):
            last_task[node] = row
    states: dict[str, str] = {}
    source, note = "none", None
    if progress is not None and isinstance(progress.get("devices"), dict):
        states, source = {str(k): str(v) for k, v in progress["devices"].items()}, "coordinator"
    elif summary["state"] == "running":
        note = "the coordinator has not written progress.json yet"
    elif not from_broker:
        note = "not read (--no-broker)"
    elif (_json(run_dir / "security.json") or {}).get("username"):
        note = (
            "not read: the run's broker account is the coordinator's, and a second session with it would take "
            "over the connection of a coordinator using it now (the broker takes the user name as client id)"
        )
    else:
        try:
            states, source = broker_states(run_dir, str(config.get("run", ""))), "broker"
        except Exception as exc:  # the broker may be gone with the run: say so, show what the disk holds
            note = f"not read: {type(exc).__name__}: {exc}"
    devices = []
    for node in sorted(set(last_task) | set(states)):
        task = last_task.get(node, {})
        devices.append(
            {
                "node": node,
                "state": states.get(node, "not seen" if source != "none" else "unknown"),
                "last_round": task.get("round"),
                "submodel": task.get("submodel"),
                "outcome": task.get("status"),
            }
        )
    return {
        **summary,
        "progress": progress.get("text") if progress else None,
        "source": source,
        "source_note": note,
        "online": sorted(n for n, s in states.items() if s in ("online", "training")),
        "devices": devices,
    }
