"""Real boards over SSH: the same runs as the emulated fleet, on Raspberry Pis / Jetsons given in a hosts file.

``NEFL_HIL_HOSTS=hosts.toml`` (see tests/hil/README.md)::

    broker_host = "192.168.1.20"   # this machine's address as the boards reach it
    remote_dir = "nefl-hil"        # on each board, relative to the user's home
    [[host]]
    host = "pi5.local"
    user = "pi"
    python = "python3"             # Python 3.9 or newer on the board
    class = "pi5"                  # a class of device_classes.toml (for the record; speed is the board's own)
    samples = 384                  # optional

SSH runs in batch mode (key authentication; no passwords anywhere). The project's wheel is copied to each
board and installed into a virtual environment there (``pip install`` pulls only the device dependencies);
the agent runs against this machine's broker; logs are copied back into the work folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import tomllib

from tests.hil.fleet import read_jsonl, run_dir, start_coordinator

HOSTS_ENV = "NEFL_HIL_HOSTS"


@dataclass
class Board:
    host: str
    user: str
    python: str
    cls: str
    node: str
    samples: int = 384
    ssh_options: list[str] = field(default_factory=list)
    pid: Optional[int] = None
    shard: Optional[Path] = None

    @property
    def target(self) -> str:
        return f"{self.user}@{self.host}"


def hosts_file() -> Optional[Path]:
    value = os.environ.get(HOSTS_ENV)
    return Path(value) if value else None


def not_configured_reason() -> Optional[str]:
    path = hosts_file()
    if path is None:
        return f"no real boards configured: set {HOSTS_ENV}=hosts.toml (see tests/hil/README.md)"
    if not path.is_file():
        return f"{HOSTS_ENV}={path} does not exist"
    return None


class Boards:
    """Boards from a hosts file, with a broker of our own listening on ``broker_host`` for them."""

    def __init__(self, path: Path, workdir: Path) -> None:
        data = tomllib.loads(Path(path).read_text())
        self.broker_host = str(data["broker_host"])
        self.remote_dir = str(data.get("remote_dir", "nefl-hil"))
        self.workdir = Path(workdir)
        self.boards: dict[str, Board] = {}
        for i, h in enumerate(data["host"]):
            node = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{h.get('class', 'board')}-{i}")
            self.boards[node] = Board(
                host=h["host"], user=h.get("user", os.environ.get("USER", "pi")), python=h.get("python", "python3"),
                cls=h.get("class", "board"), node=node, samples=int(h.get("samples", 384)),
                ssh_options=list(h.get("ssh_options", [])),
            )  # fmt: skip
        self.broker: Any = None
        self.coordinators: list[subprocess.Popen[bytes]] = []

    # --- ssh -----------------------------------------------------------------------------------------------

    def ssh(self, b: Board, command: str, timeout: float = 600) -> str:
        argv = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=15", *b.ssh_options, b.target, command]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"ssh {b.target} {command!r} failed: {proc.stderr.strip()[-500:]}")
        return proc.stdout

    def scp(self, b: Board, sources: list[str], dest: str) -> None:
        argv = ["scp", "-q", "-o", "BatchMode=yes", *b.ssh_options, *sources, dest]
        subprocess.run(argv, check=True, capture_output=True, timeout=600)

    # --- set-up and tear-down ------------------------------------------------------------------------------

    def __enter__(self) -> Boards:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        from nefl_edge.coordinator.broker import LocalBroker
        from tests.helpers import build_wheel, make_shards

        self.workdir.mkdir(parents=True, exist_ok=True)
        self.broker = LocalBroker("mosquitto", self.workdir / "broker")
        self.broker.extra_config = (f"listener {self.broker.port} {self.broker_host}", "allow_anonymous true")
        self.broker.start()
        wheel = build_wheel(self.workdir / "wheel")
        shards = make_shards(self.workdir, [b.samples for b in self.boards.values()])
        rd = self.remote_dir
        for b, shard in zip(self.boards.values(), shards):
            b.shard = shard
            self.ssh(b, f"mkdir -p {rd}")
            self.scp(b, [str(wheel), str(shard)], f"{b.target}:{rd}/")
            self.ssh(
                b,
                f"cd {rd} && {shlex.quote(b.python)} -m venv venv && venv/bin/pip install -q --upgrade pip && "
                f"venv/bin/pip install -q --force-reinstall --no-cache-dir {shlex.quote(wheel.name)}",
                timeout=1800,
            )

    @property
    def device_broker(self) -> str:
        return f"{self.broker_host}:{self.broker.port}"

    @property
    def local_broker(self) -> str:
        return f"127.0.0.1:{self.broker.port}"

    def start_all(self, run: str, *extra: str) -> None:
        """Start ``nefl-edge join`` on every board (in the background there; its pid is kept)."""
        for b in self.boards.values():
            assert b.shard is not None
            args = [
                "venv/bin/nefl-edge", "join", "--broker", self.device_broker, "--data", b.shard.name,
                "--node-id", b.node, "--run", run, "--cache", "cache", *extra,
            ]  # fmt: skip
            line = f"cd {self.remote_dir} && (nohup {shlex.join(args)} > agent.log 2>&1 & echo $!)"
            b.pid = int(self.ssh(b, line).strip().splitlines()[-1])

    def spawn_coordinator(self, *args: str) -> subprocess.Popen[bytes]:
        proc = start_coordinator(self.workdir, self.local_broker, *args)
        self.coordinators.append(proc)
        return proc

    def collect_logs(self) -> None:
        for b in self.boards.values():
            with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
                self.scp(b, [f"{b.target}:{self.remote_dir}/agent.log"], str(self.workdir / f"{b.node}.log"))

    def log(self, node: str = "coordinator") -> str:
        path = self.workdir / f"{node}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        from tests.helpers import stop as stop_process

        for b in self.boards.values():
            if b.pid is not None:
                with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                    self.ssh(b, f"kill {b.pid} 2>/dev/null; true", timeout=60)
        self.collect_logs()
        for proc in self.coordinators:
            stop_process(proc)
        if self.broker is not None:
            self.broker.stop()


__all__ = ["Board", "Boards", "not_configured_reason", "read_jsonl", "run_dir"]
