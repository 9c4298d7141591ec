"""A broker of our own on a free loopback port: Mosquitto when it is on the PATH, otherwise the embedded
``amqtt`` broker (pure Python, MQTT 3.1.1 only), each in a child process that ``stop`` always ends."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal, Optional

BrokerKind = Literal["auto", "mosquitto", "amqtt"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (held open together while chosen: two calls of :func:`free_port`
    can return the same port)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


class LocalBroker:
    """``with LocalBroker() as broker: ... broker.address``. ``extra_config`` adds Mosquitto config lines."""

    def __init__(
        self,
        kind: BrokerKind = "auto",
        folder: Optional[Path] = None,
        port: Optional[int] = None,
        extra_config: tuple[str, ...] = (),
    ) -> None:
        if kind == "auto":
            kind = "mosquitto" if shutil.which("mosquitto") else "amqtt"
        if kind == "mosquitto" and shutil.which("mosquitto") is None:
            raise RuntimeError(
                "mosquitto is not on the PATH: `sudo apt-get install mosquitto`, or use the embedded broker"
            )
        self.kind = kind
        self.folder = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="nefl-broker-"))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra_config = extra_config
        self.proc: Optional[subprocess.Popen[bytes]] = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        if self.kind == "mosquitto":
            # As root, mosquitto drops to user "mosquitto", who may not read our private folders.
            lines = ["user root"] if os.geteuid() == 0 else []
            lines += [
                "per_listener_settings true",
                "persistence false",
                "max_queued_messages 10000",
                f"listener {self.port} 127.0.0.1",
                "allow_anonymous true",
                *self.extra_config,
            ]
            conf = self.folder / "mosquitto.conf"
            conf.write_text("\n".join(lines) + "\n")
            return ["mosquitto", "-c", str(conf)]
        conf = self.folder / "amqtt.yaml"
        conf.write_text(
            f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{self.port}\n"
            "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n"
        )
        return [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(conf)]

    def start(self) -> LocalBroker:
        log = (self.folder / f"{self.kind}.log").open("ab")
        self.proc = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if port_open(self.port):
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.kind} did not start on port {self.port}; see {self.folder / (self.kind + '.log')}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
