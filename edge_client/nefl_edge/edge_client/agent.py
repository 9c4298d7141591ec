"""The long-lived device agent (``nefl-edge agent``): waits for the broker, serves run after run.

- **Broker**: connection attempts with exponential backoff (1 s, 2 s, 4 s, ... capped at 60 s, each logged)
  until the broker answers; forever unless ``broker_wait_s`` is set. Once connected, paho reconnects by itself
  (1-30 s) and the device re-announces itself.
- **Runs**: pinned to one run name (``--run``), the agent serves it, and after the run's ``control end`` waits
  for the next run of that name (a manifest sent after the end). Without ``--run`` it follows announcements:
  the coordinator's retained manifest lives on ``nefl/<run>/manifest/chunk/<i>``, so a subscription to
  ``nefl/+/manifest/#`` sees every run that is open (a non-empty chunk 0) and every run that closes (the
  coordinator clears its retained messages: an empty chunk 0). The agent serves one run at a time, the
  earliest announced first; it subscribes to discovery only between runs, so that it holds one broker
  connection at a time. A run whose announcement it has served (or that gave no manifest within
  ``manifest_wait_s``) is not served again until it is announced anew.
- **Dead runs**: a run whose coordinator sent nothing, not even its heartbeat, for 60 s is left
  (``edge_client.session.SILENT_S``); its manifest counts as stale from then on (pinned: the agent waits for
  a newer one; discovering: that announcement is served, and the agent moves to another announced run).
- **Runs it cannot take part in** (``edge_client.session.Admission``: not enrolled in a signed run, a
  manifest its coordinator did not sign, a model its data does not fit): pinned, the agent stops with
  ``CannotTakePart`` (``join`` and ``agent --run`` exit 2 with its sentence); discovering, it logs why and
  waits for another run (that announcement is not served again).
- After a run it unsubscribes (so its persistent session queues nothing), keeps the artifact cache and the
  latest weights, and waits for the next run; ``once`` exits after one run instead (``nefl-edge join``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Literal, Optional, Tuple

from nefl_edge.core.data import Dataset
from nefl_edge.core.link import Link
from nefl_edge.core.mqtt import BrokerError, MqttLink
from nefl_edge.core.schemas import NAME_PATTERN
from nefl_edge.core.wire import Buffer
from nefl_edge.edge_client.client import ClientOptions, EdgeClient, RunOutcome
from nefl_edge.edge_client.session import CannotTakePart
from nefl_edge.edge_client.settings import device_flag

log = logging.getLogger(__name__)

DISCOVERY_TOPIC = "nefl/+/manifest/#"
MAX_KNOWN_RUNS = 256


class Backoff:
    """Delays between connection attempts: ``initial_s``, doubling, capped at ``max_s``."""

    def __init__(self, initial_s: float = 1.0, max_s: float = 60.0, factor: float = 2.0) -> None:
        if initial_s <= 0 or max_s < initial_s or factor < 1:
            raise ValueError("backoff needs 0 < initial_s <= max_s and factor >= 1")
        self.initial_s, self.max_s, self.factor = initial_s, max_s, factor
        self.attempt = 0

    def next(self) -> float:
        delay = min(self.max_s, self.initial_s * self.factor**self.attempt)
        self.attempt += 1
        return delay


def connect_with_backoff(
    attempt: Callable[[float], None],
    what: str,
    stop: threading.Event,
    backoff: Optional[Backoff] = None,
    give_up_s: Optional[float] = None,
    attempt_timeout_s: float = 5.0,
) -> bool:
    """Call ``attempt(timeout)`` until it does not raise ``BrokerError``; wait with ``backoff`` in between and
    log each wait. Returns ``False`` if ``stop`` was set first; re-raises the last error after ``give_up_s``."""
    backoff = backoff or Backoff()
    started = time.monotonic()
    while not stop.is_set():
        timeout = attempt_timeout_s
        if give_up_s is not None:
            timeout = max(1.0, min(timeout, give_up_s - (time.monotonic() - started)))
        try:
            attempt(timeout)
            if backoff.attempt:
                log.info("reached %s after %d failed attempts", what, backoff.attempt)
            return True
        except BrokerError as exc:
            waited = time.monotonic() - started
            if give_up_s is not None and waited >= give_up_s:
                raise
            delay = backoff.next()
            if give_up_s is not None:
                delay = min(delay, max(0.0, give_up_s - waited))
            log.warning("%s; attempt %d failed, retrying in %.0f s", exc, backoff.attempt, delay)
            stop.wait(delay)
    return False


class RunDiscovery:
    """Which runs are open, from the coordinators' retained manifests (``nefl/+/manifest/#``), over a link of
    its own (an :class:`core.mqtt.MqttLink` with a clean session, or ``link_factory``'s).

    Only topics are read (a run is open while chunk 0 of its manifest is retained), through the link's raw
    ``on_payload`` tap; the manifest itself is validated by the run's own :class:`EdgeClient`, so a forged
    announcement costs a join attempt at most."""

    def __init__(
        self, options: ClientOptions, client_id: str, link_factory: Optional[Callable[[], Link]] = None
    ) -> None:
        self.opts = options
        self._client_id = client_id
        self._new_link = link_factory or self._mqtt_link
        self._open: Dict[str, Tuple[float, str]] = {}  # run -> (first seen (monotonic), sha256 of chunk 0)
        self._lock = threading.Lock()
        self.changed = threading.Event()
        self.link: Optional[Link] = None

    def _mqtt_link(self) -> Link:
        opts = self.opts
        protocol: Literal["3.1.1", "5"] = "5" if opts.protocol == "5" else "3.1.1"
        return MqttLink(self._client_id, opts.broker, opts.run, opts.security, protocol=protocol, clean=True)

    def connect(self, timeout_s: float) -> None:
        """One attempt (a fresh link each time); raises ``BrokerError``."""
        self.close()
        with self._lock:
            self._open.clear()  # the broker delivers the retained manifests again on subscribing
        link = self._new_link()
        link.on_payload = self._on_payload
        link.subscribe(DISCOVERY_TOPIC)
        link.connect(timeout_s)
        self.link = link

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None

    def _on_payload(self, topic: str, payload: Buffer) -> bool:
        """Note an announcement (chunk 0 of a run's manifest) or a withdrawal (an empty one); take every payload."""
        parts = topic.split("/")
        if len(parts) != 5 or parts[0] != "nefl" or parts[2:4] != ["manifest", "chunk"] or parts[4] != "0":
            return True
        run = parts[1]
        if not re.match(NAME_PATTERN, run):
            return True
        digest = hashlib.sha256(bytes(payload)).hexdigest()
        with self._lock:
            if payload:
                if run in self._open:
                    self._open[run] = (self._open[run][0], digest)
                elif len(self._open) < MAX_KNOWN_RUNS:
                    self._open[run] = (time.monotonic(), digest)
                    log.info("run %s is announced", run)
            elif self._open.pop(run, None) is not None:
                log.info("run %s is withdrawn (its manifest was cleared)", run)
        self.changed.set()
        return True

    def open_runs(self) -> List[Tuple[str, str]]:
        """Open runs with the sha256 of their announcement (chunk 0 of the manifest), earliest first. The same
        retained message delivered again has the same digest; a new announcement of a run has a new one."""
        with self._lock:
            return [(r, self._open[r][1]) for r in sorted(self._open, key=lambda r: self._open[r][0])]

    def wait_for_run(self, stop: threading.Event, skip: Callable[[str, str], bool]) -> Optional[Tuple[str, str]]:
        """Block until an open run that ``skip(run, digest)`` does not exclude exists; return it with its digest
        (``None`` if ``stop`` is set)."""
        logged = False
        while not stop.is_set():
            self.changed.clear()
            for run, digest in self.open_runs():
                if not skip(run, digest):
                    return run, digest
            if not logged:
                log.info("waiting for a run to be announced on %s", DISCOVERY_TOPIC)
                logged = True
            self.changed.wait(1.0)
        return None


@dataclass
class AgentOptions:
    """How the agent lives: ``once`` exits after one run; ``broker_wait_s`` gives up on the broker after that
    long (``None``: never); ``manifest_wait_s`` leaves a discovered run whose manifest does not arrive."""

    once: bool = False
    broker_wait_s: Optional[float] = None
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    manifest_wait_s: float = 60.0
    attempt_timeout_s: float = 5.0


class Agent:
    """Serves runs until ``stop()``: pinned to ``options.run`` when ``pinned``, else any announced run."""

    def __init__(self, options: ClientOptions, data: Dataset, agent: AgentOptions, pinned: bool = True) -> None:
        self.opts, self.data, self.agent, self.pinned = options, data, agent, pinned
        self._stop = threading.Event()
        self._client: Optional[EdgeClient] = None
        self._lock = threading.Lock()
        self.outcomes: List[RunOutcome] = []
        self.discovery: Optional[RunDiscovery] = None
        # run -> sent_at of its last end (coordinator clock): manifests of that run sent earlier are stale
        self._ended: Dict[str, float] = {}
        # run -> digests of its announcements already served (or that failed): not served again
        self._done: Dict[str, List[str]] = {}

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            if self._client is not None:
                self._client.stop()

    def _backoff(self) -> Backoff:
        return Backoff(self.agent.backoff_initial_s, self.agent.backoff_max_s)

    def run(self) -> int:
        """Serve runs; return how many ended normally. Raises ``BrokerError`` only with ``broker_wait_s``, and
        ``CannotTakePart`` when pinned to a run this device cannot take part in."""
        served = 0
        try:
            while not self._stop.is_set():
                digest = ""
                if self.pinned:
                    run = self.opts.run
                else:
                    found = self._discover()
                    if found is None:
                        break
                    run, digest = found
                outcome = self._serve(run)
                if outcome is None:
                    break
                self.outcomes.append(outcome)
                if outcome.state == "refused":
                    if self.pinned:
                        raise CannotTakePart(outcome.reason)
                    log.warning("cannot take part in run %s: %s", run, outcome.reason)
                if outcome.state == "ended":
                    served += 1
                    self._ended[run] = outcome.ended_at
                elif outcome.state == "silent":  # its manifest is stale: only a later one is a new run
                    self._ended[run] = math.nextafter(outcome.ended_at, math.inf)
                if digest:
                    self._done[run] = [*self._done.get(run, [])[-7:], digest]
                if self.agent.once or outcome.state == "stopped":
                    break
                log.info("served %d run(s); waiting for the next run", served)
        finally:
            if self.discovery is not None:
                self.discovery.close()
        return served

    def _connect(self, connect: Callable[[float], None]) -> bool:
        """``connect`` with this agent's backoff; False when stopped or ``--broker-wait`` ran out."""
        return connect_with_backoff(
            connect,
            f"broker {self.opts.broker}",
            self._stop,
            self._backoff(),
            self.agent.broker_wait_s,
            self.agent.attempt_timeout_s,
        )

    def _discover(self) -> Optional[Tuple[str, str]]:
        """Connect the discovery subscription, wait for a run to serve, disconnect. One connection at a time:
        a broker that makes the user name the client id (the generated config does) allows no more."""
        if self.discovery is None:
            self.discovery = RunDiscovery(self.opts, f"nefl-agent-{self.opts.node}")
        discovery = self.discovery
        if not self._connect(discovery.connect):
            return None
        try:
            return discovery.wait_for_run(self._stop, lambda run, digest: digest in self._done.get(run, []))
        finally:
            discovery.close()

    def _serve(self, run: str) -> Optional[RunOutcome]:
        client = EdgeClient(replace(self.opts, run=run), self.data, not_before=self._ended.get(run, 0.0))
        with self._lock:
            if self._stop.is_set():
                return None
            self._client = client
        try:
            if not self._connect(client.connect):
                return None
            log.info("serving run %s", run)
            return client.serve(None if self.pinned else self.agent.manifest_wait_s)
        finally:
            with self._lock:
                self._client = None


# --- systemd -----------------------------------------------------------------------------------------------

SERVICE_NAME = "nefl-edge.service"


def systemd_unit(
    exec_path: str,
    broker: Optional[str],
    data: Path,
    user: str = "nefl-edge",
    run: Optional[str] = None,
    extra_args: Optional[List[str]] = None,
    password_file: Optional[Path] = None,
) -> str:
    """A systemd unit for the agent: restarts always, runs as ``user`` with its own state and cache folders
    (``/var/lib/nefl-edge``, ``/var/cache/nefl-edge``), no secrets inline: a broker password is handed over
    as a systemd credential (``LoadCredential``) read from ``password_file``, readable by root only. Without
    ``broker`` the agent takes broker, account and keys from the identity enrolled in its state directory. The
    flags are the declared ones (``edge_client.settings.device_flag``)."""
    args = [exec_path, "agent", *((device_flag("broker"), broker) if broker else ()), device_flag("data"), str(data)]
    args += [device_flag("cache"), "/var/cache/nefl-edge"]
    if run is not None:
        args += [device_flag("run"), run]
    if password_file is not None:
        args += [device_flag("password_file"), "%d/broker-password"]
    args += list(extra_args or [])
    credential = f"LoadCredential=broker-password:{password_file}\n" if password_file is not None else ""
    return f"""[Unit]
Description=nefl-edge device agent (nested federated learning)
Documentation=https://arxiv.org/abs/2308.07761
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User={user}
Group={user}
ExecStart={" ".join(_quote(a) for a in args)}
{credential}StateDirectory=nefl-edge
StateDirectoryMode=0700
CacheDirectory=nefl-edge
WorkingDirectory=/var/lib/nefl-edge
Environment=PYTHONUNBUFFERED=1 NEFL_STATE_DIR=/var/lib/nefl-edge
Restart=always
RestartSec=10
KillSignal=SIGTERM
SuccessExitStatus=130
TimeoutStopSec=30
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes

[Install]
WantedBy=multi-user.target
"""


def _quote(arg: str) -> str:
    """systemd's ExecStart quoting: double quotes around arguments with spaces, quotes or backslashes."""
    if arg and not any(c in arg for c in " \"\\'\t"):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
