"""``nefl-coord demo``: a real federated run on this machine, start to finish.

A broker of our own (or ``--broker``), Fashion-MNIST partitioned over N devices, N real ``nefl-edge join``
processes with device tiers 0..K-1, the coordinator in this process; everything it started is stopped
again, also on Ctrl-C or an error.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from nefl_edge.coordinator.broker import BrokerKind, LocalBroker
from nefl_edge.coordinator.config import DEMO_DEFAULTS, RunConfig, load_config
from nefl_edge.coordinator.partition import label_histogram, make_partitioner, plot_histogram, write_shards
from nefl_edge.coordinator.render import serve_with_progress
from nefl_edge.coordinator.run import ServeRun, coordinator_link
from nefl_edge.coordinator.runs import running_marker
from nefl_edge.core.data import load_dataset
from nefl_edge.core.mqtt import Security


def demo_config(clients: int, overrides: dict[str, Any]) -> RunConfig:
    """The demo's run configuration: the options given (``None``: not given; keyed as ``load_config``
    expects), :data:`DEMO_DEFAULTS` where not given, the run name ``demo`` and every device awaited."""
    given = {**DEMO_DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}}
    return load_config(None, {**given, "run": "demo", "min_clients": clients, "min_updates": 1})


@dataclass
class DemoOptions:
    """What only the demo has: its devices, their data and the broker; every run setting is ``cfg``'s."""

    cfg: RunConfig = field(default_factory=lambda: demo_config(5, {}))
    clients: int = 5
    broker: Optional[str] = None
    broker_kind: BrokerKind = "auto"
    samples_per_client: int = 2000
    scheme: str = "iid"
    alpha: float = 0.5
    log_format: str = "text"  # the coordinator's and the devices' (json: one object per event)


def spawn_clients(
    address: str, shards: list[Path], tiers: list[int], run: str, logs: Path, cache: Path, log_format: str = "text"
) -> list[subprocess.Popen[bytes]]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", NEFL_THREADS="1")
    procs = []
    logs.mkdir(parents=True, exist_ok=True)
    for i, (shard, tier) in enumerate(zip(shards, tiers)):
        args = [
            sys.executable,
            "-m",
            "nefl_edge.edge_client",
            "join",
            "--broker",
            address,
            "--data",
            str(shard),
            "--node-id",
            f"device-{i:02d}",
            "--run",
            run,
            "--tier",
            str(tier),
            "--cache",
            str(cache / f"device-{i:02d}"),
            "--threads",
            "1",
            "--log-format",
            log_format,
        ]
        with (logs / f"device-{i:02d}.log").open("ab") as log:
            procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env))
    return procs


def stop_all(procs: list[subprocess.Popen[bytes]], grace_s: float = 15.0) -> None:
    """Let devices leave on the run's end message, then SIGTERM, then SIGKILL: no orphans."""
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def run_demo(opts: DemoOptions) -> Optional[Path]:
    """The whole demo; the run directory, or None when it was interrupted (SIGINT / SIGTERM)."""
    cfg = opts.cfg
    run_dir = cfg.runs_dir / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    train = load_dataset(cfg.data_dir, "train")
    parts = make_partitioner(opts.scheme, opts.clients, opts.alpha, cfg.seed).split(train.y)
    shards = write_shards(train, parts, run_dir / "shards", opts.samples_per_client)
    hist = label_histogram(train.y, [p[: opts.samples_per_client] for p in parts], 10)
    plot_histogram(hist, run_dir / "shards" / "labels.png", f"{opts.scheme} partition, {opts.clients} devices")
    print(
        f"{opts.clients} devices, up to {opts.samples_per_client} samples each ({opts.scheme}); "
        f"shards in {run_dir / 'shards'}"
    )
    tiers = [i % len(cfg.gammas) for i in range(opts.clients)]
    run = ServeRun(cfg, run_dir)
    run.prepare()
    with ExitStack() as stack:
        if opts.broker is None:
            broker = stack.enter_context(LocalBroker(opts.broker_kind, run_dir / "broker"))
            address = broker.address
            print(f"broker: {broker.kind} on {address}")
        else:
            address = opts.broker
        procs = spawn_clients(address, shards, tiers, cfg.run, run_dir / "logs", run_dir / "cache", opts.log_format)
        stack.callback(stop_all, procs)
        stack.enter_context(running_marker(run_dir))
        out = serve_with_progress(run, coordinator_link(cfg, address, Security()), json_lines=opts.log_format == "json")
    return None if run.stopped_by else out
