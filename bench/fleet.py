"""Benchmark: stragglers on an emulated mixed fleet (tests/hil/fleet.py), four policies side by side.

Each policy is one real run of ``nefl-coord serve`` with the same emulated devices (real ``nefl-edge``
processes in network namespaces, rate-limited links, CPU quotas 10x apart from the slowest to the fastest
class), one after the other on the same fleet:

- ``nefl-deadline``: NeFL-WD with the deadline policy (each device gets the largest submodel it can finish);
- ``fedavg-full-wait``: FedAvg of the full model, a deadline long enough to wait for every device;
- ``fedavg-full-drop``: FedAvg of the full model with the NeFL deadline: devices that cannot finish in time
  decline or miss it and are dropped from the round (``--no-fit-steps``: they are not given fewer local steps);
- ``fedavg-smallest``: FedAvg of the smallest submodel (every device can train it).

Every deadline policy but ``fedavg-full-drop`` runs with serve's default ``--fit-steps``: a device whose
projection cannot fit even the planned local steps of the submodel it gets trains as many steps as fit
(``coordinator.assignment.affordable_steps``, FedProx's partial work) instead of declining every round.

The clock of a run starts when every device has said hello (observed on the broker), so device start-up is
not counted; each round ends at the engine's ``ended_at`` in the run's ``metrics.jsonl`` (after aggregation
and the devices' part of evaluation, before the coordinator's own test-set evaluation, which is therefore
not counted). A run is stopped after ``--budget-s``. Reported: wall-clock time until the worst / best
submodel reaches ``--target`` accuracy, the worst / average / best submodel accuracy at the end of the
budget, the coordinator's evaluation seconds (accounted apart), and per submodel the accuracy on every
class of the full 10,000-image test set, from the run's last checkpoint (evaluated after the policy's run,
off its clock).

The coordinator's own work is kept off the devices' CPU budget: with ``--coordinator-core C`` (default: the
host's last core, when it has two or more) the coordinator and the broker are pinned to core ``C`` and every
device process to the other cores (``taskset``); the devices' cgroup quotas should then add up to at most
the cores left (the ``bench-device`` fleet: 28 x 0.035 = 0.98 of one core).

``--partition device-correlated``: data that follows the device (docs/benchmarks.md, "Data that follows the
device", defined before any run): the slow class (``SLOW_CLASSES``) holds most of the footwear images
(``HELD_LABELS``: sandal, sneaker, ankle boot), which the faster classes rarely see
(:func:`device_correlated_split`).

    sudo python -m bench.fleet                    # about 4 x (budget + 30 s): 14 min
    python -m bench.fleet --budget-s 60 --policies nefl-deadline   # a quick look
    sudo python -m bench.fleet --fleet bench-device --partition device-correlated   # data that follows the device
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.hil.fleet is imported from the source tree

from tests.hil.fleet import Fleet, environment_summary, load_fleet, read_jsonl, run_dir  # noqa: E402

GAMMAS = "0.2,0.4,0.6,0.8,1.0"
PARTITIONS = ("fleet", "device-correlated")
HELD_LABELS = (5, 7, 9)
"""Fashion-MNIST sandal, sneaker, ankle boot: the images of the sites whose devices are old boards."""
SLOW_CLASSES = ("pi-zero-2w",)
"""The device classes that hold the footwear (the slowest of tests/hil/device_classes.toml)."""
SLOW_SHARE, FAST_SHARE = 0.8, 0.02
"""Share of held-label images in a slow device's shard, and in any other device's (IID would be 0.3)."""
CLASS_NAMES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot")


def device_correlated_split(
    labels: np.ndarray,
    slow: list[bool],
    samples: list[int],
    seed: int,
    held: tuple[int, ...] = HELD_LABELS,
    slow_share: float = SLOW_SHARE,
    fast_share: float = FAST_SHARE,
) -> list[np.ndarray]:
    """Sample indices per device, disjoint: device ``i`` gets ``samples[i]`` images, of which
    ``round(share * samples[i])`` have a label in ``held`` (``slow_share`` for a slow device, ``fast_share``
    otherwise), drawn without replacement from a seeded shuffle of each pool; the rest from the other labels.
    ValueError when a pool runs out."""
    rng = np.random.default_rng(seed)
    in_held = np.isin(labels, held)
    pools = [rng.permutation(np.flatnonzero(in_held)), rng.permutation(np.flatnonzero(~in_held))]
    taken = [0, 0]
    out = []
    for is_slow, n in zip(slow, samples, strict=True):
        n_held = round((slow_share if is_slow else fast_share) * n)
        part = []
        for pool, (k, want) in enumerate(((0, n_held), (1, n - n_held))):
            if taken[k] + want > len(pools[k]):
                raise ValueError(f"device-correlated split: pool {pool} has {len(pools[k])} images, {want} more asked")
            part.append(pools[k][taken[k] : taken[k] + want])
            taken[k] += want
        out.append(rng.permutation(np.concatenate(part)))
    return out


def fleet_partition(name: str, seed: int) -> Any:
    """The ``Fleet`` partition for ``--partition``: None keeps the fleet file's scheme."""
    if name == "fleet":
        return None
    if name != "device-correlated":
        raise ValueError(f"unknown partition {name!r}; choose from {', '.join(PARTITIONS)}")

    def split(labels: np.ndarray, devices: list[Any]) -> list[np.ndarray]:
        slow = [d.cls.name in SLOW_CLASSES for d in devices]
        return device_correlated_split(labels, slow, [d.samples for d in devices], seed)

    return split


def class_accuracy(run_directory: Path) -> Optional[dict[str, Any]]:
    """Per submodel, the accuracy on each class of the full test set, of the run's last checkpoint (None when
    the run has none)."""
    import torch

    from nefl_edge.coordinator import checkpoint
    from nefl_edge.coordinator.config import RunConfig
    from nefl_edge.coordinator.models import build_submodel
    from nefl_edge.coordinator.strategies import get_strategy
    from nefl_edge.core.data import load_dataset
    from nefl_edge.core.nested import GlobalState

    try:
        saved = checkpoint.load(run_directory, "evaluate")
    except checkpoint.CheckpointError as exc:  # a run stopped before its first checkpoint: say so, go on
        print(f"no per-class accuracy for {run_directory}: {exc}")
        return None
    cfg = RunConfig.model_validate_json((run_directory / "config.json").read_text())
    config, plan = get_strategy(cfg.method).setup(cfg.network(), tuple(cfg.gammas))
    state = GlobalState.from_flat(config, plan.specs, saved.state)
    test = load_dataset(cfg.data_dir, "test")
    out = []
    for k in range(len(plan.specs)):
        net = build_submodel(state, k).eval()
        with torch.no_grad():
            pred = np.concatenate(
                [net(torch.from_numpy(test.x[i : i + 500])).argmax(1).numpy() for i in range(0, len(test), 500)]
            )
        out.append([float((pred[test.y == c] == c).mean()) for c in range(config.num_classes)])
    return {"round": saved.round, "per_submodel": out}


DEFAULT_POLICIES = ("nefl-deadline", "fedavg-full-wait", "fedavg-full-drop", "fedavg-smallest")
POLICIES = (*DEFAULT_POLICIES, "nefl-distill-deadline")
"""``nefl-distill-deadline``: ``nefl-wd-distill`` (in-place distillation into the smallest submodel) with the
deadline policy, every other setting as ``nefl-deadline``; not in the default set (run it with
``--policies nefl-distill-deadline --append``)."""
DEVICE_EVAL_PHASES = ("bn_statistics", "federated_evaluation")
"""The engine's phases in which devices work for the evaluation (inside the round, so inside the times)."""


def held_means(accuracy: list[float], held: list[int]) -> tuple[Optional[float], float]:
    """The mean accuracy over the ``held`` classes (None without any) and over the other classes."""
    h = [a for c, a in enumerate(accuracy) if c in held]
    return (statistics.fmean(h) if h else None), statistics.fmean(a for c, a in enumerate(accuracy) if c not in held)


def policy_args(name: str, deadline_s: float, wait_deadline_s: float) -> list[str]:
    """The ``serve`` options that make up a policy (``--method`` takes the names of ``simulate --method``)."""
    if name == "nefl-deadline":
        return ["--method", "nefl-wd", "--policy", "deadline", "--deadline-s", str(deadline_s)]
    if name == "nefl-distill-deadline":
        return ["--method", "nefl-wd-distill", "--policy", "deadline", "--deadline-s", str(deadline_s)]
    if name == "fedavg-full-wait":
        return ["--method", "fedavg-full", "--policy", "deadline", "--deadline-s", str(wait_deadline_s)]
    if name == "fedavg-full-drop":  # dropped, by definition: no shorter task for a device that cannot finish
        return ["--method", "fedavg-full", "--policy", "deadline", "--deadline-s", str(deadline_s), "--no-fit-steps"]
    if name == "fedavg-smallest":
        return ["--method", "fedavg-smallest", "--policy", "deadline", "--deadline-s", str(deadline_s)]
    raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")


def serve_args(name: str, run: str, devices: int, args: argparse.Namespace) -> list[str]:
    """Every ``serve`` option of policy ``name``'s run: the same for every policy but :func:`policy_args`.
    Every round is evaluated (``--eval-every 1``): serve's default since 6040267 is every
    ``max(1, rounds // 20)`` rounds, 25 with ``--max-rounds 500``, which would leave a 300 s run one point or
    none on its accuracy curve and no time to target. ``--serve-args`` come last and override these."""
    return [
        "--run", run, "--rounds", str(args.max_rounds), "--min-clients", str(devices),
        "--gammas", GAMMAS, "--eval-samples", str(args.eval_samples), "--eval-every", "1",
        "--wait-clients-s", "300", "--seed", str(args.seed),
        *policy_args(name, args.deadline_s, args.wait_deadline_s), *shlex.split(args.serve_args),
    ]  # fmt: skip


class HelloWatch:
    """Records when each device's hello reaches the broker."""

    def __init__(self, broker: str, run: str) -> None:
        import paho.mqtt.client as mqtt

        self.seen: dict[str, float] = {}
        self.lock = threading.Lock()
        host, port = broker.rsplit(":", 1)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-watch-{run}")
        self.client.on_message = self._on_message
        self.client.connect(host, int(port))
        self.client.subscribe(f"nefl/{run}/node/+/hello/#", qos=1)
        self.client.subscribe(f"nefl/{run}/node/+/hello", qos=1)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        node = msg.topic.split("/")[3]
        with self.lock:
            self.seen.setdefault(node, time.time())

    def all_seen(self, nodes: set[str]) -> Optional[float]:
        with self.lock:
            if nodes <= set(self.seen):
                return max(self.seen[n] for n in nodes)
        return None

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def run_policy(
    fleet: Fleet, name: str, args: argparse.Namespace, index: int, service_cpus: Optional[set[int]] = None
) -> dict[str, Any]:
    run = f"bench-{index}-{name}"
    watch = HelloWatch(fleet.local_broker, run)
    fleet.start_all(run, *shlex.split(args.device_args))
    coord = fleet.spawn_coordinator(*serve_args(name, run, len(fleet.devices), args), cpus=service_cpus)
    t0: Optional[float] = None
    started = time.time()
    try:
        while coord.poll() is None:
            now = time.time()
            if t0 is None:
                t0 = watch.all_seen(set(fleet.devices))
                if t0 is None and now - started > 600:
                    raise RuntimeError(f"{name}: the devices did not all join within 600 s; see {fleet.workdir}")
            if t0 is not None and now - t0 > args.budget_s:
                coord.send_signal(signal.SIGINT)
                break
            time.sleep(0.2)
        try:  # it evaluates the rounds still queued (up to 4) before it exits: minutes on a loaded host
            coord.wait(600)
        except subprocess.TimeoutExpired:
            coord.kill()
    finally:
        watch.close()
        for node in fleet.devices:
            fleet.stop(node)
    out = run_dir(fleet.workdir / "runs", run)
    rows = read_jsonl(out / "metrics.jsonl") if out else []
    if coord.returncode not in (0, -signal.SIGINT, 130):
        print(f"{name}: coordinator exited with {coord.returncode}; see {fleet.workdir / 'coordinator.log'}")
    clients = read_jsonl(out / "clients.jsonl") if out else []
    classes = {node: d.cls.name for node, d in fleet.devices.items()}
    result = summarize(name, rows, {} if t0 is None else round_ends(rows, t0), args, clients, classes)
    ca = class_accuracy(out) if out is not None else None
    if ca is not None:
        held = list(HELD_LABELS) if args.partition == "device-correlated" else []
        means = [held_means(acc, held) for acc in ca["per_submodel"]]
        ca["held_mean"] = [h for h, _ in means]
        ca["other_mean"] = [o for _, o in means]
        # the checkpoint is the last finished round; one that ended just past the budget is not on the curve
        ca["last_curve_round"] = result["curve"][-1]["round"] if result["curve"] else None
    result["class_accuracy"] = ca
    return result


def round_ends(rows: list[dict[str, Any]], t0: float) -> dict[int, float]:
    """Per trained round, the seconds from ``t0`` to the engine's ``ended_at``, read from every metrics row of
    the run once the coordinator has exited: a row is written after the coordinator's evaluation of its round,
    so the last rounds in the budget may be written after the run was stopped."""
    return {int(r["round"]): float(r["ended_at"]) - t0 for r in rows if r["round"] > 0 and r.get("ended_at")}


def summarize(
    name: str,
    rows: list[dict[str, Any]],
    ends: dict[int, float],
    args: argparse.Namespace,
    clients: list[dict[str, Any]],
    classes: dict[str, str],
) -> dict[str, Any]:
    by_round: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_round.setdefault(int(row["round"]), []).append(row)
    curve: list[dict[str, Any]] = []

    def gap(r: int, row: dict[str, Any]) -> float:
        """Seconds between round ``r - 1``'s end and round ``r``'s start: the coordinator's work between
        rounds (snapshot, and waiting for its evaluation when 4 evaluations are already queued)."""
        before = by_round.get(r - 1)
        if r < 2 or not before or not row.get("started_at") or not before[0].get("ended_at"):
            return 0.0
        return max(0.0, float(row["started_at"]) - float(before[0]["ended_at"]))

    for r in sorted(by_round):
        if r == 0 or r not in ends or ends[r] > args.budget_s:
            continue
        acc = [float(x["accuracy"]) for x in sorted(by_round[r], key=lambda x: x["submodel"])]
        first = by_round[r][0]
        curve.append({
            "round": r, "wall_s": round(ends[r], 1), "accuracy": acc,
            "worst": min(acc), "average": statistics.fmean(acc), "best": max(acc),
            "selected": first.get("selected"), "updates": first.get("updates"),
            "declined": first.get("declined"), "dropped": first.get("dropped"), "round_s": first.get("seconds"),
            "eval_s": float((first.get("phases") or {}).get("evaluation", 0.0)),
            "device_eval_s": sum(float((first.get("phases") or {}).get(k, 0.0)) for k in DEVICE_EVAL_PHASES),
            "before_s": gap(r, first),
        })  # fmt: skip

    def reach(key: str) -> Optional[float]:
        return next((p["wall_s"] for p in curve if p[key] >= args.target), None)

    last = curve[-1] if curve else None
    counted = {p["round"] for p in curve}
    trained: dict[str, set[int]] = {}  # class -> submodels its devices trained (per-device records)
    steps: dict[str, list[int]] = {}  # class -> local steps of each of its updates
    for c in clients:
        if c.get("round") in counted and c.get("status") == "updated" and c.get("node") in classes:
            trained.setdefault(classes[c["node"]], set()).add(int(c["submodel"]))
            steps.setdefault(classes[c["node"]], []).append(int(c.get("steps") or 0))
    device_rounds = len(curve) * len(classes)
    return {
        "policy": name,
        "rounds": len(curve),
        "time_to_target_worst_s": reach("worst"),
        "time_to_target_best_s": reach("best"),
        "final": None if last is None else {k: last[k] for k in ("worst", "average", "best", "accuracy")},
        "participation": None if not device_rounds else sum(p["updates"] or 0 for p in curve) / device_rounds,
        "submodels_by_class": {k: sorted(v) for k, v in trained.items()},
        "updates_by_class": {k: len(v) for k, v in steps.items()},
        "mean_steps_by_class": {k: round(statistics.fmean(v), 1) for k, v in steps.items()},
        "mean_round_s": None if not curve else statistics.fmean(p["round_s"] or 0 for p in curve),
        "coordinator_eval_s": round(sum(p["eval_s"] for p in curve), 1),
        "device_eval_s": round(sum(p["device_eval_s"] for p in curve), 1),
        "between_rounds_s": round(sum(p["before_s"] for p in curve), 1),
        "curve": curve,
    }


def _pct(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _sec(value: Optional[float], budget: float) -> str:
    return f"> {budget:.0f}" if value is None else f"{value:.0f}"


def _share(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:.0f} %"


def _by_class(trained: dict[str, list[int]]) -> str:
    return ", ".join(f"{c}: {'/'.join(map(str, subs))}" for c, subs in trained.items()) or "—"


def _steps(policy: dict[str, Any]) -> str:
    updates, steps = policy.get("updates_by_class") or {}, policy.get("mean_steps_by_class") or {}
    return ", ".join(f"{c}: {n} ({steps.get(c, 0):.1f})" for c, n in updates.items()) or "—"


def render(record: dict[str, Any]) -> str:
    opts = record["options"]
    lines = [
        f"## Stragglers on an emulated fleet: NeFL vs FedAvg ({record['scheme']} shards)"
        + (f", `{record['run_label']}`" if record.get("run_label") else ""),
        "",
        f"`{record['command']}` at commit `{record['commit']}`. Fleet `{opts['fleet']}` "
        f"({', '.join(f'{n} x {c}' for c, n in record['classes_count'].items())}; CPU quota per device = class "
        f"speed x {record['core_per_speed']} of one host core, so the fastest class is "
        f"{record['speed_spread']:.0f}x the slowest; tbf links at the classes' Wi-Fi rates), Fashion-MNIST "
        f"{record['scheme']} shards, resnet-small, gammas {GAMMAS}. Deadline {opts['deadline_s']:.0f} s "
        f"(wait policy: {opts['wait_deadline_s']:.0f} s); budget {opts['budget_s']:.0f} s of wall-clock per "
        f"policy, counted from the moment every device has joined; target accuracy {_pct(opts['target'])} %. "
        f"Host: {record['environment'].get('cpus')} CPUs, cgroup {record['environment'].get('cgroup')}. "
        "Raw numbers and curves: `"
        + record.get("results_file", f"bench/results/fleet-{record.get('results_name', opts['fleet'])}.json")
        + "`.",
        "",
        "| policy | rounds in budget | time to target, worst submodel (s) | time to target, best (s) | "
        "worst % | average % | best % | updates / device-rounds | mean round (s) | submodels trained, by class | "
        "updates (mean local steps), by class |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    reused = record.get("reused") or {}
    for p in record["policies"]:
        final = p["final"] or {}
        mark = f" (reused from `{reused['commit']}`)" if p["policy"] in reused.get("policies", []) else ""
        lines.append(
            f"| {p['policy']}{mark} | {p['rounds']} | {_sec(p['time_to_target_worst_s'], opts['budget_s'])} | "
            f"{_sec(p['time_to_target_best_s'], opts['budget_s'])} | {_pct(final.get('worst'))} | "
            f"{_pct(final.get('average'))} | {_pct(final.get('best'))} | "
            f"{_share(p['participation'])} | {'—' if p['mean_round_s'] is None else round(p['mean_round_s'], 1)} | "
            f"{_by_class(p['submodels_by_class'])} | {_steps(p)} |"
        )
    lines += [
        "",
        "Worst / average / best are over the submodels the method trains and evaluates (one model for the FedAvg "
        "policies). Updates / device-rounds counts every device of the fleet in every round, so devices a method "
        "leaves out (cannot afford its model) count as missing; submodel indices are those of the method. "
        "The emulation keeps the classes' speed ratios, not a board's absolute speed "
        "(tests/hil/device_classes.toml says where the figures come from); tbf adds no propagation delay. "
        f"Coordinator: {record.get('pinning', 'not pinned')}. Every round is evaluated; the coordinator's "
        "test-set evaluation runs on a copy of the model after the round's `ended_at`, while the next round runs, "
        "and is not counted in the times (its seconds per policy: "
        + ", ".join(f"{p['policy']} {p.get('coordinator_eval_s', '—')} s" for p in record["policies"])
        + "). The devices' part of each evaluation is counted: the federated BatchNorm statistics of round r's "
        "model are computed by round r+1's devices before they train (the tasks carry the request), inside round "
        "r+1's time; only a run's last round has a statistics round trip of its own (those seconds per policy: "
        + ", ".join(f"{p['policy']} {p.get('device_eval_s', '—')} s" for p in record["policies"])
        + "). Time between one round's end and the next one's start (counted; it would grow if the coordinator's "
        "evaluation fell 4 rounds behind): "
        + ", ".join(f"{p['policy']} {p.get('between_rounds_s', '—')} s" for p in record["policies"])
        + ".",
    ]
    for extra in record.get("appended", []):
        lines.append(
            f"Appended: {', '.join(extra['policies'])} by `{extra['command']}` at commit `{extra['commit']}` "
            f"({extra['date']}), same fleet, partition and options."
        )
    if reused:
        lines.append(
            f"Reused, not re-run: {', '.join(reused['policies'])}, from `{reused['file']}` (commit "
            f"`{reused['commit']}`, {reused['date']}, `{reused['command']}`), same fleet, partition and options; "
            "the commits between touched neither FedAvg policy's assignment (one submodel) but may shift timings."
        )
    lines += class_table(record)
    lines += goal_lines(record)
    return "\n".join(lines)


NEFL_POLICIES = ("nefl-deadline", "nefl-distill-deadline")
"""The NeFL policies the goal is read for (each that ran, on its own lines)."""


def goal_lines(record: dict[str, Any]) -> list[str]:
    """Issue 23's fleet goal read off the record, for each NeFL policy that ran (:data:`NEFL_POLICIES`): it
    reaches the target at least 2x sooner than ``fedavg-full-wait``, and ends above ``fedavg-full-drop`` on the
    held classes. Empty unless a NeFL policy and both FedAvg-full policies ran; the held-class part only under a
    partition with held classes."""
    by = {p["policy"]: p for p in record["policies"]}
    nefls = [n for n in NEFL_POLICIES if n in by]
    if not nefls or not {"fedavg-full-wait", "fedavg-full-drop"} <= set(by):
        return []
    budget = record["options"]["budget_s"]
    wait, drop = by["fedavg-full-wait"], by["fedavg-full-drop"]
    lines = ["", "**The issue's goal, read off this run.**"]
    for name in nefls:
        nefl = by[name]
        parts = []
        for key, what in (("time_to_target_worst_s", "worst"), ("time_to_target_best_s", "best")):
            t_nefl, t_wait = nefl[key], wait[key]
            if t_nefl is None:
                ratio = "NeFL does not reach it in the budget"
            elif t_wait is None:
                ratio = f"fedavg-full-wait does not reach it in {budget:.0f} s, so at least {budget / t_nefl:.1f}x"
            else:
                ratio = f"{t_wait:.0f} s vs {t_nefl:.0f} s, {t_wait / t_nefl:.1f}x"
            parts.append(f"NeFL's {what} submodel against fedavg-full-wait's model: {ratio}")
        lines.append(f"`{name}`, time to target: " + "; ".join(parts) + ".")
        held = record.get("held_labels") or []
        ca_nefl, ca_drop = nefl.get("class_accuracy"), drop.get("class_accuracy")
        if held and ca_nefl and ca_drop:
            mine = [h for h, _ in (held_means(a, held) for a in ca_nefl["per_submodel"])]
            theirs = held_means(ca_drop["per_submodel"][0], held)[0]
            above = sum(1 for h in mine if h is not None and theirs is not None and h > theirs)
            lines.append(
                f"`{name}`, held classes' mean at the end: NeFL's submodels {', '.join(_pct(h) for h in mine)} % "
                f"against fedavg-full-drop's {_pct(theirs)} %: {above} of {len(mine)} NeFL submodels above it."
            )
    return lines


def class_table(record: dict[str, Any]) -> list[str]:
    """Per policy and submodel, the accuracy (%) on every class of the full test set at the run's last
    checkpoint; the held labels' mean beside the others'."""
    held = record.get("held_labels") or []
    lines = [
        "",
        f"Per-class accuracy (%) on the 10,000 test images at each policy's last checkpoint (partition "
        f"`{record.get('partition', 'fleet')}`"
        + (f"; held by the slow class: {', '.join(CLASS_NAMES[c] for c in held)}" if held else "")
        + "):",
        "",
        "| policy | submodel (round) | " + " | ".join(CLASS_NAMES) + " | held classes | other classes |",
        "|---|---|" + "---|" * (len(CLASS_NAMES) + 2),
    ]
    for p in record["policies"]:
        ca = p.get("class_accuracy")
        if not ca:
            lines.append(f"| {p['policy']} | — |" + " — |" * (len(CLASS_NAMES) + 2))
            continue
        for k, acc in enumerate(ca["per_submodel"]):
            h, o = held_means(acc, held)
            lines.append(
                f"| {p['policy']} | {k} ({ca['round']}) | "
                + " | ".join(_pct(a) for a in acc)
                + f" | {_pct(h)} | {_pct(o)} |"
            )
    late = [
        f"{p['policy']} (checkpoint round {p['class_accuracy']['round']}, last round in the budget "
        f"{p['class_accuracy']['last_curve_round']})"
        for p in record["policies"]
        if p.get("class_accuracy")
        and p["class_accuracy"].get("last_curve_round") not in (None, p["class_accuracy"]["round"])
    ]
    if late:
        lines += ["", "The last checkpoint is a round that ended just past the budget for: " + "; ".join(late) + "."]
    return lines


SAME_RUN_OPTIONS = ("policies", "append", "no_publish", "out", "reuse")
"""Options that may differ between a record and the policies appended to it."""


def merge_records(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``old`` with ``new``'s policies added (a policy in both: ``new``'s row), and ``new``'s command, commit,
    date and seconds listed under ``appended``. ValueError when the two ran with other options, another fleet
    or partition (their numbers would not be comparable)."""
    mine = {k: v for k, v in old["options"].items() if k not in SAME_RUN_OPTIONS}
    theirs = {k: v for k, v in new["options"].items() if k not in SAME_RUN_OPTIONS}
    if mine != theirs or old["fleet"] != new["fleet"] or old.get("partition") != new.get("partition"):
        changed = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        raise ValueError(f"cannot append to a record run with other settings ({', '.join(changed) or 'the fleet'})")
    added = {p["policy"] for p in new["policies"]}
    merged = dict(old)
    merged["policies"] = [p for p in old["policies"] if p["policy"] not in added] + new["policies"]
    merged["appended"] = [
        *old.get("appended", []),
        {"policies": sorted(added), **{k: new[k] for k in ("command", "commit", "date", "wall_s")}},
    ]
    return merged


def reuse_rows(old: dict[str, Any], new: dict[str, Any], source: str) -> dict[str, Any]:
    """``new`` with the rows of ``old``'s policies that ``new`` did not run, in :data:`POLICIES` order, and
    where they came from under ``reused``. ValueError as :func:`merge_records` when the settings differ."""
    mine = {k: v for k, v in old["options"].items() if k not in SAME_RUN_OPTIONS}
    theirs = {k: v for k, v in new["options"].items() if k not in SAME_RUN_OPTIONS}
    if mine != theirs or old["fleet"] != new["fleet"] or old.get("partition") != new.get("partition"):
        changed = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        raise ValueError(f"cannot reuse rows of a record run with other settings ({', '.join(changed) or 'fleet'})")
    ran = {p["policy"] for p in new["policies"]}
    taken = [p for p in old["policies"] if p["policy"] not in ran]
    order = {name: i for i, name in enumerate(POLICIES)}
    merged = dict(new)
    merged["policies"] = sorted([*new["policies"], *taken], key=lambda p: order.get(p["policy"], len(order)))
    merged["reused"] = {
        "policies": [p["policy"] for p in taken],
        "file": source,
        **{k: old[k] for k in ("commit", "command", "date")},
    }
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fleet", default="bench", help="fleet file or name under tests/hil/fleets/")
    parser.add_argument(
        "--policies", default=",".join(DEFAULT_POLICIES), help="comma-separated subset of " + ", ".join(POLICIES)
    )
    parser.add_argument("--budget-s", type=float, default=180.0, help="wall-clock budget per policy")
    parser.add_argument("--deadline-s", type=float, default=15.0, help="round deadline of the deadline policies")
    parser.add_argument("--wait-deadline-s", type=float, default=300.0, help="deadline of fedavg-full-wait")
    parser.add_argument("--target", type=float, default=0.75, help="target accuracy (0..1)")
    parser.add_argument("--max-rounds", type=int, default=500)
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serve-args", default="", help="extra options for every `nefl-coord serve`")
    parser.add_argument("--device-args", default="", help="extra options for every `nefl-edge join`")
    parser.add_argument("--workdir", type=Path, default=None, help="where logs and run directories go")
    parser.add_argument("--no-publish", action="store_true", help="do not write bench/results and docs")
    parser.add_argument(
        "--append", action="store_true",
        help="add these policies to the published record of the same fleet, partition and options (a policy "
        "run again replaces its row) instead of replacing the record",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=None,
        help="record file (default bench/results/fleet-<fleet>[-correlated].json); its stem names the docs section",
    )  # fmt: skip
    parser.add_argument(
        "--reuse", type=Path, default=None,
        help="a record of the same fleet, partition and options whose rows of the policies not run now are kept "
        "(marked as reused, with their commit)",
    )  # fmt: skip
    parser.add_argument(
        "--partition", default="fleet", choices=PARTITIONS,
        help="fleet: the fleet file's scheme; device-correlated: the slow class holds the footwear (see docstring)",
    )  # fmt: skip
    parser.add_argument(
        "--coordinator-core", type=int, default=(os.cpu_count() or 1) - 1,
        help="host core for the coordinator and broker (devices get the others); -1: no pinning",
    )  # fmt: skip
    args = parser.parse_args()
    names = [p.strip() for p in args.policies.split(",") if p.strip()]
    for name in names:
        policy_args(name, 1, 1)

    spec = load_fleet(args.fleet)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="nefl-bench-fleet-"))
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    command = "just bench-fleet" + ("" if len(sys.argv) == 1 else " " + shlex.join(sys.argv[1:]))
    print(f"fleet {spec.name}: {len(spec.devices())} devices; work folder {workdir}")
    results = []
    started = time.time()
    cores = set(range(os.cpu_count() or 1))
    service = {args.coordinator_core} if 0 <= args.coordinator_core < len(cores) and len(cores) > 1 else None
    device_cpus = cores - service if service else None
    pinning = "not pinned"
    if service and device_cpus:
        quota = sum(d.cores for d in spec.devices())
        pinning = (
            f"coordinator and broker pinned to core {args.coordinator_core}, devices to cores "
            f"{','.join(map(str, sorted(device_cpus)))} (their quotas add up to {quota:.2f} cores)"
        )
        if quota > len(device_cpus) + 1e-9:
            print(f"warning: the devices' quotas ({quota:.2f} cores) exceed the {len(device_cpus)} cores left to them")
    print(pinning)
    partition = fleet_partition(args.partition, spec.seed)
    with Fleet(spec, workdir, partition=partition, device_cpus=device_cpus) as fleet:
        if service and fleet.broker is not None and fleet.broker.proc is not None:
            os.sched_setaffinity(fleet.broker.proc.pid, service)
        for d in fleet.describe():
            print(f"  {d['node']}: {d['cpu_cores']} core, {d['rate_mbit']} Mbit/s, {d['samples']} samples")
        for i, name in enumerate(names):
            t = time.monotonic()
            result = run_policy(fleet, name, args, i, service)
            results.append(result)
            final = result["final"] or {}
            print(
                f"{name}: {result['rounds']} rounds, worst {_pct(final.get('worst'))} %, best "
                f"{_pct(final.get('best'))} %, target (worst) at {result['time_to_target_worst_s']} s "
                f"[{time.monotonic() - t:.0f} s]"
            )
        described = fleet.describe()
    counts: dict[str, int] = {}
    for d in described:
        counts[d["class"]] = counts.get(d["class"], 0) + 1
    speeds = [g.cls.speed for g in spec.groups]
    record = {
        "commit": commit,
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "wall_s": round(time.time() - started),
        "options": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "workdir"},
            "fleet": spec.name,
        },
        "fleet": described,
        "classes_count": counts,
        "core_per_speed": spec.core_per_speed,
        "speed_spread": max(speeds) / min(speeds),
        "scheme": (
            "device-correlated"
            if args.partition == "device-correlated"
            else spec.scheme
            if spec.scheme != "dirichlet"
            else f"dirichlet({spec.alpha})"
        ),
        "partition": args.partition,
        "held_labels": list(HELD_LABELS) if args.partition == "device-correlated" else [],
        "pinning": pinning,
        "results_name": spec.name + ("-correlated" if args.partition == "device-correlated" else ""),
        "environment": environment_summary(),
        "policies": results,
    }
    out = args.out or ROOT / "bench" / "results" / f"fleet-{record['results_name']}.json"
    out = out if out.is_absolute() else Path.cwd() / out
    if args.out is not None:
        record["run_label"] = out.stem
        record["results_file"] = str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out)
    if args.reuse is not None:
        record = reuse_rows(json.loads(args.reuse.read_text()), record, args.reuse.name)
    print(render(record))
    if not args.no_publish:
        from bench.common import write_section

        out.parent.mkdir(parents=True, exist_ok=True)
        if args.append and out.exists():
            record = merge_records(json.loads(out.read_text()), record)
        out.write_text(json.dumps(record, indent=1) + "\n")
        write_section(out.stem, render(record))
        print(f"wrote {out} and the {out.stem} section of docs/benchmarks.md")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
