"""Fleet emulator: real ``nefl-edge`` processes, each in its own network namespace behind a rate-limited
veth link and held to a CPU quota, talking to a real Mosquitto in the root namespace.

Topology (one fleet)::

    root namespace: Mosquitto on 127.0.0.1:P (coordinator) and on 10.231.N.1:P (devices), bridge nh<tag>b
       |-- veth nh<tag>h<i> (tbf: download rate) ==== eth0 in netns nefl-hil-<pid>-<node> (tbf: upload rate)
                                                       `-- nefl-edge join ... (cgroup nefl-hil-<pid>/<node>)

Rate limits are ``tc qdisc ... tbf rate R burst B limit L`` on both ends of each veth; the queue limit is the
class's ``queue_ms`` of traffic (what tbf's ``latency`` option would set: a bound on queueing delay). tbf adds
no propagation delay (netem is not available here), so round-trip latency is not emulated. CPU quotas use the
cgroup v1 ``cpu`` controller (``cpu.cfs_quota_us``/``cpu.cfs_period_us``) or cgroup v2 ``cpu.max``, whichever
is mounted.

Everything created is named after the owning process id (netns ``nefl-hil-<pid>-*``, cgroups
``nefl-hil-<pid>``, links ``nh<pid as 6 hex digits>*``) and removed by ``Fleet.close`` (also from ``atexit``);
objects whose owner is dead are removed by ``cleanup_stale`` at the start of every fleet.

    with Fleet(load_fleet("tests/hil/fleets/small.toml"), workdir) as fleet:
        fleet.start_all(run="r1")
        coord = fleet.spawn_coordinator("--run", "r1", "--policy", "deadline")
        fleet.link_down("pi4-0"); fleet.link_up("pi4-0")
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import tomllib

from tests.helpers import stop as stop_process

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CLASSES_FILE = HERE / "device_classes.toml"
FLEETS_DIR = HERE / "fleets"
PREFIX = "nefl-hil-"
SUBNET = "10.231"
CFS_PERIOD_US = 100_000
OS_ALLOWANCE_MB = 200


class HilUnavailable(RuntimeError):
    """This machine does not allow what the emulator needs (namespaces, tc, cgroups); the message says what."""


# --- device classes and fleet files ------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceClass:
    name: str
    title: str
    speed: float
    rate_mbit: float
    queue_ms: float = 50.0
    rtt_ms: float = 0.0
    memory_mb: Optional[int] = None


@dataclass(frozen=True)
class Group:
    cls: DeviceClass
    count: int
    samples: int
    rate_mbit: Optional[float] = None  # overrides the class's link rate (e.g. a slow link for a fault test)


@dataclass(frozen=True)
class FleetSpec:
    """A fleet file: how many devices of each class, their shards, the CPU scale and the seed."""

    name: str
    groups: list[Group]
    core_per_speed: float = 0.05
    scheme: str = "iid"
    alpha: float = 0.5
    seed: int = 0
    limit_memory: bool = False

    def devices(self) -> list[Device]:
        out, counters = [], {}  # type: ignore[var-annotated]
        for g in self.groups:
            for _ in range(g.count):
                k = counters.get(g.cls.name, 0)
                counters[g.cls.name] = k + 1
                rate = g.rate_mbit if g.rate_mbit is not None else g.cls.rate_mbit
                cores = g.cls.speed * self.core_per_speed
                out.append(Device(f"{g.cls.name}-{k}", g.cls, g.samples, cores, rate, len(out)))
        return out


@dataclass
class Device:
    node: str
    cls: DeviceClass
    samples: int
    cores: float
    rate_mbit: float
    index: int
    netns: str = ""
    veth: str = ""
    address: str = ""
    shard: Optional[Path] = None
    cgroups: list[Path] = field(default_factory=list)
    proc: Optional[subprocess.Popen[bytes]] = None


def load_classes(path: Path = CLASSES_FILE) -> dict[str, DeviceClass]:
    data = tomllib.loads(Path(path).read_text())
    return {name: DeviceClass(name=name, **values) for name, values in data.items()}


def load_fleet(path: Path | str, classes: Optional[dict[str, DeviceClass]] = None) -> FleetSpec:
    """Read a fleet file (TOML; see tests/hil/fleets/*.toml). A bare name means tests/hil/fleets/<name>.toml."""
    path = Path(path)
    if not path.suffix and not path.is_file():
        path = FLEETS_DIR / f"{path}.toml"
    classes = classes or load_classes()
    data = tomllib.loads(path.read_text())
    default_samples = int(data.get("samples", 600))
    groups = []
    for g in data["group"]:
        if g["class"] not in classes:
            raise ValueError(f"{path}: unknown device class {g['class']!r}; known: {sorted(classes)}")
        groups.append(
            Group(
                classes[g["class"]], int(g.get("count", 1)), int(g.get("samples", default_samples)), g.get("rate_mbit")
            )
        )
    return FleetSpec(
        name=str(data.get("name", path.stem)),
        groups=groups,
        core_per_speed=float(data.get("core_per_speed", 0.05)),
        scheme=str(data.get("scheme", "iid")),
        alpha=float(data.get("alpha", 0.5)),
        seed=int(data.get("seed", 0)),
        limit_memory=bool(data.get("limit_memory", False)),
    )


# --- small system helpers ----------------------------------------------------------------------------------


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise HilUnavailable(f"`{' '.join(args)}` failed: {(proc.stderr or proc.stdout).strip()}")
    return proc


def in_ns(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *args, check=check)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tag_of(pid: int) -> str:
    return f"{pid:06x}"[-6:]


def tbf(rate_mbit: float, queue_ms: float) -> list[str]:
    """tbf arguments: the bucket holds 4 ms of traffic but at least a few full-size frames; the queue holds
    ``queue_ms`` of traffic but at least 64 KiB (a shallower queue at a low rate drops so much that TCP stalls;
    Wi-Fi drivers buffer deeply)."""
    rate = rate_mbit * 1e6 / 8
    burst = max(8192, int(rate * 0.004))
    limit = max(64 * 1024, int(rate * queue_ms / 1000))
    return ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "limit", str(limit)]


@dataclass(frozen=True)
class CgroupLayout:
    """Where CPU (and memory) limits go: cgroup v1 controllers or the v2 unified hierarchy."""

    version: int
    cpu_root: Path
    memory_root: Optional[Path]

    def make(self, root: Path, rel: str) -> Path:
        path = root / rel
        if self.version == 2:
            for parent in [root, *[root / p for p in _prefixes(rel)]]:
                with contextlib.suppress(OSError):
                    (parent / "cgroup.subtree_control").write_text("+cpu +memory" if self.memory_root else "+cpu")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def set_cpu(self, group: Path, cores: float) -> None:
        quota = max(1000, int(cores * CFS_PERIOD_US))
        if self.version == 1:
            (group / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            (group / "cpu.max").write_text(f"{quota} {CFS_PERIOD_US}")

    def set_memory(self, group: Path, mb: int) -> None:
        name = "memory.limit_in_bytes" if self.version == 1 else "memory.max"
        (group / name).write_text(str(mb * 2**20))

    def roots(self) -> list[Path]:
        return [r for r in (self.cpu_root, self.memory_root) if r is not None and r != self.cpu_root] + [self.cpu_root]


def _prefixes(rel: str) -> list[str]:
    parts = rel.split("/")
    return ["/".join(parts[: i + 1]) for i in range(len(parts) - 1)]


def cgroup_layout() -> CgroupLayout:
    base = Path("/sys/fs/cgroup")
    if (base / "cpu" / "cpu.cfs_quota_us").exists():
        memory = base / "memory" if (base / "memory" / "memory.limit_in_bytes").exists() else None
        return CgroupLayout(1, base / "cpu", memory)
    for v2 in (base, base / "unified"):
        controllers = v2 / "cgroup.controllers"
        if controllers.exists() and "cpu" in controllers.read_text().split():
            return CgroupLayout(2, v2, v2 if "memory" in controllers.read_text().split() else None)
    raise HilUnavailable("no cgroup cpu controller is mounted (neither v1 cpu.cfs_quota_us nor v2 cpu.max)")


def _kill_cgroup(group: Path) -> None:
    for child in sorted((p for p in group.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _kill_cgroup_procs(child)
        with contextlib.suppress(OSError):
            child.rmdir()
    _kill_cgroup_procs(group)
    with contextlib.suppress(OSError):
        group.rmdir()


def _kill_cgroup_procs(group: Path) -> None:
    procs = group / "cgroup.procs"
    for _ in range(50):
        try:
            pids = [int(p) for p in procs.read_text().split()]
        except OSError:
            return
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def cleanup_stale() -> list[str]:
    """Remove emulator objects whose owning process is gone (a run that was killed); return what was removed."""
    removed: list[str] = []
    for name in sh("ip", "netns", "list", check=False).stdout.split("\n"):
        name = name.split(" ")[0]
        m = re.match(rf"{PREFIX}(\d+)-", name)
        if m and not alive(int(m.group(1))):
            for pid in sh("ip", "netns", "pids", name, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", name, check=False)
            removed.append(f"netns {name}")
    for line in sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        m = re.match(r"\d+: (nh([0-9a-f]{6})[bhp][0-9a-f]*)[@:]", line)
        if m and not alive(int(m.group(2), 16)):
            sh("ip", "link", "del", m.group(1), check=False)
            removed.append(f"link {m.group(1)}")
    with contextlib.suppress(HilUnavailable):
        layout = cgroup_layout()
        for root in layout.roots():
            for group in root.glob(f"{PREFIX}*"):
                m = re.match(rf"{PREFIX}(\d+)$", group.name)
                if m and group.is_dir() and not alive(int(m.group(1))):
                    _kill_cgroup(group)
                    removed.append(f"cgroup {group}")
    return removed


@functools.cache
def unavailable_reason() -> Optional[str]:
    """Why the emulator cannot run here (``None`` when it can). Probes once: a namespace, a veth pair with
    tbf on it, and a cgroup with a CPU quota are created and removed again."""
    if sys.platform != "linux":
        return "the fleet emulator needs Linux (network namespaces, tc, cgroups)"
    if os.geteuid() != 0:
        return "the fleet emulator needs root (ip netns, tc, cgroups); run the HIL tests as root"
    for tool in ("ip", "tc", "mosquitto"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not on the PATH (apt-get install iproute2 mosquitto)"
    pid = os.getpid()
    ns, veth = f"{PREFIX}{pid}-probe", f"nh{tag_of(pid)}p0"
    try:
        cleanup_stale()
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", veth + "x")
        sh("ip", "link", "set", veth + "x", "netns", ns)
        sh("tc", "qdisc", "add", "dev", veth, "root", *tbf(1.0, 50))
        layout = cgroup_layout()
        group = layout.make(layout.cpu_root, f"{PREFIX}{pid}/probe")
        layout.set_cpu(group, 0.5)
    except (HilUnavailable, OSError) as exc:
        return f"the fleet emulator cannot run here: {exc}"
    finally:
        sh("ip", "link", "del", veth, check=False)
        sh("ip", "netns", "del", ns, check=False)
        with contextlib.suppress(HilUnavailable):
            for root in cgroup_layout().roots():
                _kill_cgroup(root / f"{PREFIX}{pid}")
    return None


def environment_summary() -> dict[str, Any]:
    """What the emulator uses on this machine (for reports and benchmark records)."""
    reason = unavailable_reason()
    out: dict[str, Any] = {"available": reason is None, "reason": reason, "cpus": os.cpu_count()}
    with contextlib.suppress(HilUnavailable):
        layout = cgroup_layout()
        out["cgroup"] = f"v{layout.version} ({layout.cpu_root})"
    return out


def free_subnet() -> str:
    used = sh("ip", "-4", "-o", "addr", "show", check=False).stdout
    for n in range(256):
        prefix = f"{SUBNET}.{n}."
        if prefix not in used:
            return prefix
    raise HilUnavailable(f"no free /24 left in {SUBNET}.0.0/16")


# --- the fleet ---------------------------------------------------------------------------------------------


class Fleet:
    """An emulated fleet with its own broker. Use as a context manager; ``close`` removes everything."""

    def __init__(
        self,
        spec: FleetSpec,
        workdir: Path,
        data_dir: Optional[Path] = None,
        partition: Optional[Callable[[Any, list[Device]], list[Any]]] = None,
        device_cpus: Optional[set[int]] = None,
    ) -> None:
        """``partition`` (labels, devices) -> sample indices per device replaces the fleet file's scheme;
        ``device_cpus``: the host cores every device process is pinned to (``taskset``), none: all."""
        self.spec = spec
        self.partition = partition
        self.device_cpus = device_cpus
        self.workdir = Path(workdir)
        self.data_dir = data_dir
        self.devices = {d.node: d for d in spec.devices()}
        self.pid = os.getpid()
        self.tag = tag_of(self.pid)
        self.bridge = f"nh{self.tag}b"
        self.gateway = ""
        self.broker: Any = None
        self.port = 0
        self.layout: Optional[CgroupLayout] = None
        self.others: list[subprocess.Popen[bytes]] = []
        self._closed = False

    # --- set-up and tear-down ------------------------------------------------------------------------------

    def __enter__(self) -> Fleet:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise HilUnavailable(reason)
        cleanup_stale()
        atexit.register(self.close)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.layout = cgroup_layout()
        self._network()
        self._cgroups()
        self._shards()
        self._broker()

    def _network(self) -> None:
        prefix = free_subnet()
        self.gateway = prefix + "1"
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for d in self.devices.values():
            d.netns = f"{PREFIX}{self.pid}-{d.node}"
            d.veth = f"nh{self.tag}h{d.index:02x}"
            d.address = f"{prefix}{d.index + 2}"
            peer = f"nh{self.tag}p{d.index:02x}"
            sh("ip", "netns", "add", d.netns)
            sh("ip", "link", "add", d.veth, "type", "veth", "peer", "name", peer)
            sh("ip", "link", "set", peer, "netns", d.netns)
            sh("ip", "link", "set", d.veth, "master", self.bridge)
            sh("ip", "link", "set", d.veth, "up")
            in_ns(d.netns, "ip", "link", "set", peer, "name", "eth0")
            in_ns(d.netns, "ip", "addr", "add", f"{d.address}/24", "dev", "eth0")
            in_ns(d.netns, "ip", "link", "set", "lo", "up")
            in_ns(d.netns, "ip", "link", "set", "eth0", "up")
            self.set_rate(d.node, d.rate_mbit)

    def _cgroups(self) -> None:
        assert self.layout is not None
        for d in self.devices.values():
            cpu = self.layout.make(self.layout.cpu_root, f"{PREFIX}{self.pid}/{d.node}")
            self.layout.set_cpu(cpu, d.cores)
            d.cgroups = [cpu]
            if self.spec.limit_memory and d.cls.memory_mb and self.layout.memory_root is not None:
                mem = cpu
                if self.layout.memory_root != self.layout.cpu_root:
                    mem = self.layout.make(self.layout.memory_root, f"{PREFIX}{self.pid}/{d.node}")
                    d.cgroups.append(mem)
                self.layout.set_memory(mem, max(128, d.cls.memory_mb - OS_ALLOWANCE_MB))
        self.service_group = self.layout.make(self.layout.cpu_root, f"{PREFIX}{self.pid}/services")

    def _shards(self) -> None:
        import numpy as np

        from nefl_edge.coordinator.partition import make_partitioner
        from nefl_edge.core.data import load_dataset

        train = load_dataset(self.data_dir, "train")
        devices = list(self.devices.values())
        if self.partition is not None:
            parts = self.partition(train.y, devices)
        else:
            parts = make_partitioner(self.spec.scheme, len(devices), self.spec.alpha, self.spec.seed).split(train.y)
        out = self.workdir / "shards"
        out.mkdir(exist_ok=True)
        for d, part in zip(devices, parts):
            idx = part[: d.samples]
            d.shard = out / f"{d.node}.npz"
            np.savez(d.shard, x=np.round(train.x[idx] * 255).astype(np.uint8), y=train.y[idx])

    def _broker(self) -> None:
        from nefl_edge.coordinator.broker import LocalBroker

        self.broker = LocalBroker("mosquitto", self.workdir / "broker")
        self.port = self.broker.port
        # A second listener on the bridge (same port, other address) for the devices.
        self.broker.extra_config = (f"listener {self.port} {self.gateway}", "allow_anonymous true")
        self.broker.start()
        self._adopt(self.broker.proc)

    def _adopt(self, proc: Optional[subprocess.Popen[bytes]]) -> None:
        """Put a service process into the fleet's (unlimited) cgroup so a stale clean-up also ends it."""
        if proc is not None:
            with contextlib.suppress(OSError):
                (self.service_group / "cgroup.procs").write_text(str(proc.pid))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for d in self.devices.values():
            self.stop(d.node)
        for proc in self.others:
            stop_process(proc)
        if self.broker is not None:
            self.broker.stop()
        for d in self.devices.values():
            if d.netns:
                sh("ip", "netns", "del", d.netns, check=False)
        sh("ip", "link", "del", self.bridge, check=False)
        if self.layout is not None:
            for root in self.layout.roots():
                _kill_cgroup(root / f"{PREFIX}{self.pid}")
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)

    # --- addresses -----------------------------------------------------------------------------------------

    @property
    def device_broker(self) -> str:
        """The broker as the devices reach it (over their links)."""
        return f"{self.gateway}:{self.port}"

    @property
    def local_broker(self) -> str:
        """The broker as the coordinator reaches it (root namespace, loopback)."""
        return f"127.0.0.1:{self.port}"

    # --- processes -----------------------------------------------------------------------------------------

    def device_command(self, d: Device, run: str, *extra: str) -> list[str]:
        """The default device command: ``nefl-edge join`` (``python -m nefl_edge.edge_client join``)."""
        assert d.shard is not None
        return [
            sys.executable, "-m", "nefl_edge.edge_client", "join",
            "--broker", self.device_broker, "--data", str(d.shard), "--node-id", d.node, "--run", run,
            "--cache", str(self.workdir / "cache" / d.node), "--threads", "1", *extra,
        ]  # fmt: skip

    def start(self, node: str, run: str = "default", *extra: str, command: Optional[list[str]] = None) -> None:
        """Start device ``node``: inside its namespace and cgroup, logging to ``<workdir>/<node>.log``.
        ``command`` replaces the default ``nefl-edge join`` command line (``extra`` is appended to either)."""
        from tests.helpers import device_env

        d = self.devices[node]
        argv = [*command, *extra] if command is not None else self.device_command(d, run, *extra)
        if self.device_cpus:
            argv = ["taskset", "-c", ",".join(map(str, sorted(self.device_cpus))), *argv]
        procs = " ".join(str(g / "cgroup.procs") for g in d.cgroups)
        wrapper = 'for f in $NEFL_HIL_PROCS; do echo $$ > "$f"; done; exec ip netns exec "$0" "$@"'
        env = dict(device_env(self.workdir), NEFL_HIL_PROCS=procs)
        with (self.workdir / f"{node}.log").open("ab") as log:
            d.proc = subprocess.Popen(
                ["sh", "-c", wrapper, d.netns, *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                cwd=REPO,
            )

    def start_all(self, run: str = "default", *extra: str) -> None:
        for node in self.devices:
            self.start(node, run, *extra)

    def stop(self, node: str, sig: int = signal.SIGTERM) -> Optional[int]:
        d = self.devices[node]
        if d.proc is None:
            return None
        return stop_process(d.proc, sig)

    def spawn_coordinator(
        self, *args: str, command: str = "serve", cpus: Optional[set[int]] = None
    ) -> subprocess.Popen[bytes]:
        """``nefl-coord <command> --broker 127.0.0.1:P --runs-dir <workdir>/runs ARGS`` in the root namespace,
        unlimited (pinned to ``cpus`` when given), logging to ``<workdir>/coordinator.log``."""
        proc = start_coordinator(self.workdir, self.local_broker, *args, command=command, cpus=cpus)
        self._adopt(proc)
        self.others.append(proc)
        return proc

    def log(self, node: str = "coordinator") -> str:
        path = self.workdir / f"{node}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # --- links ---------------------------------------------------------------------------------------------

    def link_down(self, node: str) -> None:
        """Cut the device's link (both ends of its veth go down): packets are dropped, sockets stay open."""
        d = self.devices[node]
        sh("ip", "link", "set", d.veth, "down")
        in_ns(d.netns, "ip", "link", "set", "eth0", "down")

    def link_up(self, node: str) -> None:
        d = self.devices[node]
        in_ns(d.netns, "ip", "link", "set", "eth0", "up")
        sh("ip", "link", "set", d.veth, "up")

    def set_rate(self, node: str, rate_mbit: Optional[float] = None, *, up: Optional[float] = None,
                 down: Optional[float] = None) -> None:  # fmt: skip
        """Change the device's link rate in Mbit/s while it runs: ``rate_mbit`` both ways, or ``up``
        (device -> broker) / ``down`` (broker -> device) alone."""
        d = self.devices[node]
        up, down = up or rate_mbit, down or rate_mbit
        if down is not None:
            sh("tc", "qdisc", "replace", "dev", d.veth, "root", *tbf(down, d.cls.queue_ms))
        if up is not None:
            in_ns(d.netns, "tc", "qdisc", "replace", "dev", "eth0", "root", *tbf(up, d.cls.queue_ms))

    def link_stats(self, node: str) -> dict[str, int]:
        """Bytes the shaper passed: ``up`` (device -> broker) and ``down`` (broker -> device)."""
        d = self.devices[node]

        def sent(text: str) -> int:
            m = re.search(r"Sent (\d+) bytes", text)
            return int(m.group(1)) if m else 0

        up = sent(in_ns(d.netns, "tc", "-s", "qdisc", "show", "dev", "eth0").stdout)
        down = sent(sh("tc", "-s", "qdisc", "show", "dev", d.veth).stdout)
        return {"up": up, "down": down}

    def describe(self) -> list[dict[str, Any]]:
        return [
            {"node": d.node, "class": d.cls.name, "samples": d.samples, "cpu_cores": round(d.cores, 4),
             "rate_mbit": d.rate_mbit, "queue_ms": d.cls.queue_ms, "address": d.address}
            for d in self.devices.values()
        ]  # fmt: skip


def start_coordinator(
    workdir: Path, broker: str, *args: str, command: str = "serve", cpus: Optional[set[int]] = None
) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "nefl_edge.coordinator", command, "--broker", broker]
    if cpus:
        argv = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *argv]
    argv += ["--runs-dir", str(workdir / "runs"), *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="160")
    with (workdir / "coordinator.log").open("ab") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


# --- reading a run ----------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


def run_dir(runs: Path, run: str) -> Optional[Path]:
    found = sorted(runs.glob(f"{run}-*")) if runs.exists() else []
    return found[-1] if found else None


ASSIGNMENT = re.compile(r"round (\d+): \d+ clients, submodels (\{[^}]*\})")


def assignments(run_directory: Optional[Path], coordinator_log: str) -> dict[int, dict[str, int]]:
    """Which submodel each device was given per round: from ``clients.jsonl`` in the run directory when the
    coordinator writes it, else from the coordinator's log line ``round R: N clients, submodels {...}``."""
    out: dict[int, dict[str, int]] = {}
    rows = read_jsonl(run_directory / "clients.jsonl") if run_directory else []
    for row in rows:
        if "round" in row and "node" in row and row.get("submodel") is not None:
            out.setdefault(int(row["round"]), {})[str(row["node"])] = int(row["submodel"])
    if out:
        return out
    import ast

    for m in ASSIGNMENT.finditer(coordinator_log):
        out[int(m.group(1))] = {str(k): int(v) for k, v in ast.literal_eval(m.group(2)).items()}
    return out
