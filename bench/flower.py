"""Our ``simulate`` against Flower's simulation engine on the same FedAvg job, in one run (issue 24).

The job: the full ``resnet-small`` trained with FedAvg on Fashion-MNIST split IID over 100 clients, 10 of them a
round, 1 local epoch (SGD with our defaults: lr 0.1, no momentum, weight decay 5e-4, batches of 32, the last
partial batch dropped), 10 rounds, the global model evaluated on the same 2,000 held-out test samples before
training and after every round.

Contenders, each at the same concurrency (clients training at once on this machine's cores):

- ``flower``: a minimal Flower app (``flwr[simulation]``, pinned below) on Flower's Ray simulation engine:
  ``ServerApp`` with the message API's ``FedAvg`` and a centralised ``evaluate_fn``, ``ClientApp`` with a
  plain PyTorch training loop; ``client_resources.num_cpus`` = cores / concurrency. It runs in a virtual
  environment of its own (``.bench-venvs/flower``, made on first use: Flower pins its own Ray) with
  ``PYTHONPATH`` on our source roots, so that the network is our ``SubmodelNet`` of the full model from the
  same initial weights, and the data our IDX loader, IID partition and held-out test split. Flower's FedAvg
  averages every entry of the state dict, BatchNorm running statistics included: our ``--bn tracked``.
- ``ours``: ``nefl-coord simulate --method fedavg-full --gammas 1.0`` at concurrency 1 (this process) or
  ``--workers c``, and ``--engine ray`` with ``--client-cpus cores / c``; each with our default
  ``--bn federated`` and with ``--bn tracked`` (Flower's way).

Each contender is one command, timed from start to exit (process start, data loading, Ray start-up, every
round and evaluation). Contenders run interleaved (one of each, then the next repeat), so load on this shared
machine hits them alike; the figure is the median over ``--repeats``. Writes ``bench/results/flower.json``
and a table (printed, and the ``flower`` section of docs/benchmarks.md with ``--docs``).

    python -m bench.flower                        # the full matrix, 1 repeat (about 25 min on 2 idle cores)
    python -m bench.flower --repeats 3 --docs     # the issue's figure: median of 3
    python -m bench.flower --rounds 2 --only flower-c2,ours-workers-c2-tracked   # a quick look

This file is also the Flower app: ``.bench-venvs/flower/bin/python bench/flower.py --flower-app JOB_JSON``
runs the Flower side alone (only the standard library is imported at the top, for both environments).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".bench-venvs" / "flower"
FLWR = "1.42.0"
"""Flower's release; ``flwr[simulation]`` pins its Ray (2.55.1 for this one)."""
TORCH = "2.13.0"
"""Our .venv's torch: the same kernels on both sides (and no CUDA packages: the machine's CPU wheel)."""
SOURCE_ROOTS = ("core", "coordinator")
SUMMARY_PREFIX = "FLOWER_RESULT "


def job(rounds: int, clients: int, per_round: int) -> dict[str, Any]:
    """The job's settings, from our run configuration's defaults (what ``simulate`` uses unless told)."""
    from nefl_edge.coordinator.config import load_config

    cfg = load_config(None, {"method": "fedavg-full", "gammas": [1.0]})
    return {
        "rounds": rounds,
        "clients": clients,
        "per_round": per_round,
        "epochs": 1,
        "lr": cfg.train.lr,
        "momentum": cfg.train.momentum,
        "weight_decay": cfg.train.weight_decay,
        "batch_size": cfg.train.batch_size,
        "eval_samples": cfg.eval_samples,
        "seed": cfg.seed,
        "data_dir": str(cfg.data_dir) if cfg.data_dir else None,
    }


# ---------------------------------------------------------------- the Flower app (runs in .bench-venvs/flower)


def flower_app(spec: dict[str, Any]) -> None:
    """Run the job on Flower's simulation engine and print one ``FLOWER_RESULT {...}`` line."""
    import numpy as np
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from nefl_edge.coordinator.evaluation import held_out
    from nefl_edge.coordinator.models import initial_consistent
    from nefl_edge.coordinator.partition import make_partitioner
    from nefl_edge.coordinator.strategies import get_strategy
    from nefl_edge.core.data import FASHION_MNIST_DIR, load_dataset
    from nefl_edge.core.nested import init_global_state

    start = time.perf_counter()
    cores = os.cpu_count() or 1
    concurrency = int(spec["concurrency"])
    threads = max(1, cores // concurrency)
    data_dir = Path(spec["data_dir"]) if spec["data_dir"] else FASHION_MNIST_DIR

    def network() -> torch.nn.Module:
        """Our full model for fedavg-full with its initial weights (simulate's at this seed)."""
        from nefl_edge.coordinator.config import load_config
        from nefl_edge.coordinator.models import build_submodel

        train = load_dataset(data_dir, "train")
        cfg = load_config(None, {"method": "fedavg-full", "gammas": [1.0]}).with_input_stats(train.x)
        config, plan = get_strategy("fedavg-full").setup(cfg.network(), (1.0,))
        state = init_global_state(config, plan.specs, initial_consistent(config, spec["seed"]), spec["seed"])
        return build_submodel(state, 0)

    cache: dict[str, Any] = {}

    def client_side() -> dict[str, Any]:
        """What each Ray worker process loads once: the model, and the clients' shards."""
        if not cache:
            torch.set_num_threads(threads)
            train = load_dataset(data_dir, "train")
            parts = make_partitioner("iid", spec["clients"], 0.5, spec["seed"]).split(train.y)
            cache.update(net=network(), x=train.x, y=train.y, parts=parts)
        return cache

    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        side = client_side()
        net: torch.nn.Module = side["net"]
        net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        net.train()
        part = side["parts"][int(context.node_config["partition-id"])]
        x, y = side["x"][part], side["y"][part]
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=spec["lr"], momentum=spec["momentum"], weight_decay=spec["weight_decay"])
        rng = np.random.default_rng(int(msg.content["config"]["seed"]) + int(context.node_config["partition-id"]))
        batch = spec["batch_size"]
        for _ in range(spec["epochs"]):
            order = rng.permutation(len(y))
            for lo in range(0, len(order) - batch + 1, batch):  # the last partial batch dropped, as ours
                idx = order[lo : lo + batch]
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x[idx])), torch.from_numpy(y[idx]))
                loss.backward()
                opt.step()
        reply = RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": MetricRecord({"num-examples": len(y)})})
        return Message(content=reply, reply_to=msg)

    server = ServerApp()
    accuracy: list[float] = []

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        net = network()
        initial = {k: v.clone() for k, v in net.state_dict().items()}
        test = held_out(load_dataset(data_dir, "test"), spec["eval_samples"], 0)[0]
        torch.set_num_threads(cores)

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            net.load_state_dict(arrays.to_torch_state_dict())
            net.eval()
            correct = 0
            with torch.no_grad():
                for lo in range(0, len(test), 500):
                    logits = net(torch.from_numpy(test.x[lo : lo + 500]))
                    correct += int((logits.argmax(1) == torch.from_numpy(test.y[lo : lo + 500])).sum())
            accuracy.append(correct / len(test))
            return MetricRecord({"accuracy": accuracy[-1]})

        strategy = FedAvg(
            fraction_train=spec["per_round"] / spec["clients"],
            fraction_evaluate=0.0,
            min_train_nodes=spec["per_round"],
            min_evaluate_nodes=0,
            min_available_nodes=spec["clients"],
        )
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(initial),
            num_rounds=spec["rounds"],
            train_config=ConfigRecord({"seed": spec["seed"]}),
            evaluate_fn=evaluate,
        )

    backend = {
        "client_resources": {"num_cpus": cores / concurrency, "num_gpus": 0.0},
        "init_args": {"num_cpus": cores, "num_gpus": 0, "include_dashboard": False, "logging_level": "ERROR"},
    }
    run_simulation(server_app=server, client_app=client, num_supernodes=spec["clients"], backend_config=backend)
    result = {"seconds": time.perf_counter() - start, "accuracy": accuracy, "threads": threads}
    print(SUMMARY_PREFIX + json.dumps(result), flush=True)


# ---------------------------------------------------------------- the harness (runs in our .venv)


def ensure_venv() -> Path:
    """``.bench-venvs/flower`` with ``flwr[simulation]==FLWR``, ``torch==TORCH`` and numpy (made if missing
    or if its versions differ); returns its Python."""
    python = VENV / "bin" / "python"
    probe = "import importlib.metadata as m; print(m.version('flwr'), m.version('torch').split('+')[0])"
    if python.exists():
        found = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
        if found.returncode == 0 and found.stdout.split() == [FLWR, TORCH]:
            return python
    print(f"making {VENV} (flwr[simulation]=={FLWR}, torch=={TORCH}, numpy)", flush=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", f"flwr[simulation]=={FLWR}", f"torch=={TORCH}", "numpy<3"]
    subprocess.run(pip, check=True)
    return python


def contenders(concurrencies: list[int], cores: int) -> dict[str, dict[str, Any]]:
    """Name -> how to run it: ``kind`` flower, or ours with its simulate options."""
    out: dict[str, dict[str, Any]] = {}
    for c in concurrencies:
        out[f"flower-c{c}"] = {"kind": "flower", "concurrency": c}
        for bn in ("federated", "tracked"):
            local = [] if c == 1 else ["--workers", str(c)]
            out[f"ours-{'serial' if c == 1 else 'workers'}-c{c}-{bn}"] = {
                "kind": "ours",
                "concurrency": c,
                "bn": bn,
                "options": [*local, "--bn", bn],
            }
            ray = ["--engine", "ray", "--client-cpus", f"{cores / c:g}", "--bn", bn]
            out[f"ours-ray-c{c}-{bn}"] = {"kind": "ours", "concurrency": c, "bn": bn, "options": ray}
    return out


def run_one(name: str, how: dict[str, Any], spec: dict[str, Any], python: Path, scratch: Path) -> dict[str, Any]:
    """Run one contender once; its wall time from start to exit, and what it reported."""
    if how["kind"] == "flower":
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / r) for r in SOURCE_ROOTS)}
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        command = [str(python), str(Path(__file__).resolve()), "--flower-app", json.dumps({**spec, **how})]
    else:
        env = dict(os.environ)
        out = scratch / f"{name}.json"
        command = [
            sys.executable, "-m", "nefl_edge.coordinator", "simulate", "--method", "fedavg-full", "--gammas", "1.0",
            "--clients", str(spec["clients"]), "--fraction", f"{spec['per_round'] / spec['clients']:g}",
            "--rounds", str(spec["rounds"]), "--epochs", str(spec["epochs"]), "--eval-every", "1",
            "--scheme", "iid", "--seed", str(spec["seed"]), "--device", "cpu", "--out", str(out), *how["options"],
        ]  # fmt: skip
        if spec["data_dir"]:
            command += ["--data-dir", spec["data_dir"]]
    # Ray starts its workers at nice 15 by default; on a shared host that puts the Ray contenders (Flower's and
    # ours) behind every other job. Every contender runs at the caller's priority.
    env["RAY_worker_niceness"] = "0"
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed ({done.returncode}): {done.stderr[-3000:]}")
    if how["kind"] == "flower":
        line = [x for x in done.stdout.splitlines() if x.startswith(SUMMARY_PREFIX)][-1]
        reported = json.loads(line.removeprefix(SUMMARY_PREFIX))
        accuracy = reported["accuracy"][-1]
    else:
        reported = json.loads(out.read_text())
        accuracy = reported["accuracy"][-1][-1]
    return {"wall_s": round(wall, 2), "load": round(load, 2), "final_accuracy": round(accuracy, 4)}


def table(record: dict[str, Any]) -> str:
    """The results as a markdown table: per contender its median wall time and Flower's over it."""
    rows = ["| contender | concurrency | BatchNorm | wall (s), median | runs (s) | vs Flower | final accuracy |"]
    rows.append("|---|---|---|---|---|---|---|")
    medians = {name: statistics.median(r["wall_s"] for r in runs) for name, runs in record["runs"].items()}
    for name, runs in record["runs"].items():
        how = record["contenders"][name]
        flower = medians.get(f"flower-c{how['concurrency']}")
        ratio = f"{flower / medians[name]:.2f}x" if flower and how["kind"] == "ours" else "-"
        bn = how.get("bn", "tracked (state dict averaged)")
        rows.append(
            f"| {name} | {how['concurrency']} | {bn} | {medians[name]:.1f} | "
            f"{', '.join(str(r['wall_s']) for r in runs)} | {ratio} | {runs[-1]['final_accuracy']:.3f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flower-app", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--concurrency", default="1,2", help="comma-separated (default 1,2)")
    parser.add_argument("--only", default="", help="comma-separated contender names (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "flower.json")
    parser.add_argument("--docs", action="store_true", help="also write the flower section of docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.flower_app:
        flower_app(json.loads(args.flower_app))
        return

    import tempfile

    from bench.common import environment, write_section

    cores = os.cpu_count() or 1
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    if any(c < 1 or cores % c for c in concurrencies):
        parser.error(f"--concurrency: each must divide this machine's {cores} cores")
    every = contenders(concurrencies, cores)
    chosen = {n: h for n, h in every.items() if not args.only or n in args.only.split(",")}
    if not chosen:
        parser.error(f"--only matches none of: {', '.join(every)}")
    spec = job(args.rounds, args.clients, args.per_round)
    python = ensure_venv() if any(h["kind"] == "flower" for h in chosen.values()) else Path(sys.executable)
    record: dict[str, Any] = {
        "environment": environment(),
        "job": spec,
        "flwr": FLWR,
        "torch": TORCH,
        "repeats": args.repeats,
        "command": "python -m bench.flower " + " ".join(argv if argv is not None else sys.argv[1:]),
        "contenders": chosen,
        "runs": {name: [] for name in chosen},
    }
    with tempfile.TemporaryDirectory(prefix="nefl-bench-flower-") as scratch:
        for repeat in range(args.repeats):
            for name, how in chosen.items():
                result = run_one(name, how, spec, python, Path(scratch))
                record["runs"][name].append(result)
                print(f"repeat {repeat + 1}/{args.repeats} {name}: {result}", flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(record, indent=1) + "\n")  # what is done so far survives a stop
    text = table(record)
    print(text)
    if args.docs:
        write_section(
            "flower", f"## Our simulate against Flower's simulation engine\n\n`{record['command']}`\n\n{text}"
        )


if __name__ == "__main__":
    main()
