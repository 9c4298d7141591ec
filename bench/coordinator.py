"""Benchmark: the coordinator as the fleet grows (issue 15, "a coordinator that scales"; issue 24, "the
coordinator at 10,000 devices").

A real ``nefl-coord serve`` (Fashion-MNIST test set, evaluation every round) against a local Mosquitto and
the load generator (``bench.loadgen``): virtual devices that speak the device protocol and upload real-sized
updates without training; fraction 1 (every device is selected every round), device ``i`` declares tier
``i % 5`` (submodels 0-4 in equal shares), each answers 5-8 s after its task (emulated training; large
fleets spread their answers wider, ``answers_per_s``, as a real fleet does). The fleets (:data:`FLEETS`):
resnet-small with 50 to 10,000 devices, with ``--bn server`` (re-estimation on the coordinator, off the
critical path) and with the default ``--bn federated`` (a statistics round trip to the devices after every
evaluated round, on the critical path), at 500 devices also with evaluation inline; ResNet18 with 1,000
devices. Reported per fleet: the round overhead (the coordinator taking in the last update of round r -> the
last task of round r+1 arriving at the devices, the statistics round trip included), the coordinator's CPU
seconds per round and its peak RSS. Also the take-in cost of one ResNet18 update, stage by stage, in this
process.

    python -m bench coordinator                          # every fleet: tens of minutes on 2 cores
    python -m bench coordinator --quick                  # 50 devices only, under a minute
    python -m bench.coordinator --only 10000-federated   # some fleets, merged into the committed record
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

from bench.common import RESULTS, SummaryRow, commit, interleaved, summary_table, write_json, write_section
from bench.loadgen import measure

TARGET_S = 2.0
EXTRA = ("--bn", "server", "--eval-samples", "2000", "--bn-calibration", "500")
FEDERATED = ("--bn", "federated", "--eval-samples", "2000")  # the default: statistics from the devices
DELAY_S, JITTER_S = 5.0, 3.0  # emulated training: each device answers 5-8 s after its task


@dataclass(frozen=True)
class Fleet:
    """One measured fleet: ``devices`` virtual devices for ``rounds`` rounds of ``model`` with serve options
    ``extra``; answers spread over at least ``devices / answers_per_s`` seconds."""

    devices: int
    rounds: int = 3
    extra: tuple[str, ...] = EXTRA
    background: bool = True
    model: str = "resnet-small"
    answers_per_s: float = 250.0
    processes: int = 1
    """Load-generator processes the devices are spread over (``bench.loadgen.measure``)."""
    bn_delay_s: float = 0.0
    """Seconds after its task a virtual device sends the statistics the task asks for (0: at once)."""


SMALL = ("--eval-samples", "500")  # the coordinator's own test evaluation, in the background, kept cheap
FLEETS: dict[str, Fleet] = {
    "50": Fleet(50),
    "500": Fleet(500),
    "500-inline": Fleet(500, 2, background=False),
    "500-federated": Fleet(500, extra=FEDERATED),
    "2000": Fleet(2000),
    "2000-federated": Fleet(2000, extra=FEDERATED),
    "5000-federated": Fleet(5000, 2, ("--bn", "federated", *SMALL), processes=2),
    "10000-federated": Fleet(10000, 2, ("--bn", "federated", *SMALL), processes=4),
    "10000-federated-bn-2s": Fleet(10000, 2, ("--bn", "federated", *SMALL), processes=4, bn_delay_s=2.0),
    "1000-resnet18-federated": Fleet(1000, 2, ("--bn", "federated", "--eval-samples", "200"), model="resnet18",
                                     answers_per_s=25.0),
}  # fmt: skip
"""Every fleet of a full run, by key (``--only`` picks some)."""


def fleet(spec: Fleet, eval_every: int = 1, quick: bool = False) -> dict[str, Any]:
    where = "in the background" if spec.background else "inline"
    jitter = 1.0 if quick else max(JITTER_S, spec.devices / spec.answers_per_s)
    print(
        f"   {spec.devices} devices of {spec.model} in {spec.processes} load-generator process(es), {spec.rounds} "
        f"rounds, evaluation {where}, {' '.join(spec.extra)}"
    )
    load_before = os.getloadavg()[0]
    result = measure(
        spec.devices,
        spec.rounds,
        spec.model,
        eval_every=eval_every,
        eval_background=spec.background,
        extra=spec.extra,
        timeout_s=900,
        delay_s=1.0 if quick else DELAY_S,
        jitter_s=jitter,
        processes=spec.processes,
        bn_delay_s=spec.bn_delay_s,
    )
    lags = [r["take_in_lag_s"] for r in result["rounds"] if "take_in_lag_s" in r]
    result["take_in_lag_s"] = statistics.median(lags) if lags else None
    result["mb_per_round"] = result["mb_sent"] / spec.rounds
    result["commit"], result["measured_at"] = commit(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result["load_average_1min"] = [load_before, os.getloadavg()[0]]
    print(
        f"   overhead {_fmt(result['overhead_s'])} s (max {_fmt(result['overhead_max_s'])}; coordinator CPU in it "
        f"{_fmt(result.get('overhead_cpu_s'))} s; statistics round trip "
        f"{_fmt(result['bn_s'])}, carried {_fmt(result.get('bn_carried_s'))}; handed out "
        f"{_fmt(result.get('handed_out_s'))}), CPU {_fmt(result['coordinator_cpu_s_per_round'], 1)} s/round, "
        f"peak RSS {result['peak_rss_mb']:.0f} MiB",
        flush=True,
    )
    return result


def take_in_profile(model: str = "resnet18", dataset: str = "cifar10", repeats: int = 5) -> dict[str, float]:
    """Milliseconds per stage for one update of ``model``'s largest submodel, as ``serve`` takes it in:
    frames -> message (``Receiver.receive``: reassembly, hashes, header), tensors (``unpack_tensors``),
    screening (``screen``) and folding (``NeFedAvg.add``)."""
    from nefl_edge.coordinator.models import initial_consistent
    from nefl_edge.coordinator.screening import screen
    from nefl_edge.coordinator.strategies import get_strategy
    from nefl_edge.core.mqtt import Receiver
    from nefl_edge.core.nefedavg import NeFedAvg
    from nefl_edge.core.nested import extract, init_global_state
    from nefl_edge.core.schemas import Metrics, Update
    from nefl_edge.core.specs import get_model_config, param_layout
    from nefl_edge.core.wire import Topics, encode, frames, pack_tensors, unpack_tensors

    config, plan = get_strategy("nefl-wd").setup(get_model_config(model, dataset), (0.2, 0.4, 0.6, 0.8, 1.0))
    state = init_global_state(config, plan.specs, initial_consistent(config, 0), 0)
    k = len(plan.specs) - 1
    reference = extract(state, k)
    shapes = {n: p.shape for n, p in param_layout(config, plan.specs[k]).items()}
    body = pack_tensors(reference)
    metrics = Metrics(loss_first=1.0, loss_last=1.0, accuracy=0.5, steps=1, seconds=1.0)
    update = Update(run="b", node="n", task_id="t", round=1, submodel=k, num_samples=600, metrics=metrics)
    parts = frames(encode(update, body), 1 << 20)
    topic = Topics("b").node("n", "update")
    receiver = Receiver("b")
    agg = NeFedAvg(state)

    def receive() -> Any:
        item = None
        for frame in parts:
            item = receiver.receive(topic, frame)
        return item

    item = receive()
    assert item is not None, receiver.last_rejection
    tensors = unpack_tensors(item[2])
    stages = {
        "receive": receive,
        "unpack": lambda: unpack_tensors(item[2]),
        "screen": lambda: screen(tensors, shapes, reference, 600, 600, 10.0),
        "fold": lambda: agg.add(k, tensors, 600),
    }
    times = interleaved(stages, repeats)
    out = {name: 1000 * t for name, t in times.items()}
    out["total"] = sum(out.values())
    out["update_mb"] = len(body) / 1e6
    return out


def statistics_profile(devices: int = 1000, repeats: int = 5) -> dict[str, float]:
    """Microseconds per device for each coordinator-side stage of the default ``bn = federated`` round trip
    with resnet-small (Fashion-MNIST, submodel ``i % 5`` for device ``i``), as ``serve`` runs it, in this
    process and without MQTT: ``tasks`` (the evaluate tasks built and framed), ``receive`` (the answer's frame
    -> message: ``Receiver.receive``), ``answer`` (``Answers.evaluation``: the rules and the tensors),
    ``read`` (``BnStats.from_tensors``: the checks) and ``fold`` (``BnStats.add`` over the fleet). Medians
    of ``repeats`` interleaved runs over ``devices`` answers."""
    import numpy as np

    from nefl_edge.coordinator.grid import EvalRequest
    from nefl_edge.coordinator.models import initial_consistent
    from nefl_edge.coordinator.session import Answers, eval_tasks
    from nefl_edge.coordinator.strategies import get_strategy
    from nefl_edge.core.evaluation import BnStats, bn_channels
    from nefl_edge.core.link import Receiver
    from nefl_edge.core.nested import extract, init_global_state
    from nefl_edge.core.schemas import BnCount, Evaluation
    from nefl_edge.core.specs import get_model_config
    from nefl_edge.core.wire import Topics, encode, frames, pack_tensors

    config, plan = get_strategy("nefl-wd").setup(get_model_config("resnet-small", "fmnist"), (0.2, 0.4, 0.6, 0.8, 1.0))
    state = init_global_state(config, plan.specs, initial_consistent(config, 0), 0)
    channels = {k: bn_channels({n: v.shape for n, v in extract(state, k).items()}) for k in range(len(plan.specs))}
    topics, nodes = Topics("b"), [f"lg-{i:05d}" for i in range(devices)]
    requests = [EvalRequest(n, (i % 5,), False, True, 0.1, 32, 16) for i, n in enumerate(nodes)]
    tasks = eval_tasks("b", 1, requests, {k: "0" * 64 for k in range(5)}, 60.0)
    bodies = {}
    for k, layers in channels.items():
        tensors = {}
        for prefix, size in layers.items():
            tensors[f"{k}/{prefix}.mean_sum"] = np.zeros(size, np.float32)
            tensors[f"{k}/{prefix}.var_sum"] = np.full(size, 16.0, np.float32)
        bodies[k] = pack_tensors(tensors)
    payloads = []
    for task in tasks.values():
        k = task.submodels[0]
        answer = Evaluation(
            run="b", node=task.node, task_id=task.task_id, round=1, results=[], bn=[BnCount(submodel=k, batches=16)]
        )
        payloads.append((topics.node(task.node, "update"), frames(encode(answer, bodies[k]))[0]))
    items = [Receiver("b").receive(t, p) for t, p in payloads]
    outcomes = [Answers().evaluation(1, item, dict(tasks), 0.0) for item in items if item is not None]
    assert all(o is not None and o.status == "evaluated" for o in outcomes), outcomes[:1]
    digests = {k: "0" * 64 for k in range(5)}

    def read() -> list[BnStats]:
        return [
            BnStats.from_tensors(o.bn_tensors[k], o.bn_batches[k], channels[k]) for o in outcomes for k in o.bn_batches
        ]

    parts = read()

    def fold() -> None:
        totals = [BnStats() for _ in channels]
        for o, part in zip(outcomes, parts):
            totals[next(iter(o.bn_batches))].add(part)

    stages = {
        "tasks": lambda: [frames(encode(t)) for t in eval_tasks("b", 1, requests, digests, 60.0).values()],
        "receive": lambda: [Receiver("b").receive(t, p) for t, p in payloads],
        "answer": lambda: [Answers().evaluation(1, item, dict(tasks), 0.0) for item in items],
        "read": read,
        "fold": fold,
    }
    out = {name: 1e6 * t / devices for name, t in interleaved(stages, repeats).items()}
    out["total"] = sum(out.values())
    out["layers"] = float(len(channels[4]))
    return out


def run(quick: bool = False, only: Optional[list[str]] = None) -> list[SummaryRow]:
    """Measure every fleet (``quick``: 50 devices), or those of ``only``, merged into the committed record
    (each fleet carries the commit and time it was measured at)."""
    started = time.monotonic()
    fleets: dict[str, dict[str, Any]] = {}
    profile: Optional[dict[str, float]] = None
    if only:
        unknown = sorted(set(only) - set(FLEETS))
        if unknown:
            raise SystemExit(f"unknown fleets {unknown}; known: {', '.join(FLEETS)}")
        path = RESULTS / "coordinator.json"
        if path.is_file():
            before = json.loads(path.read_text())
            fleets, profile = dict(before.get("fleets", {})), before.get("take_in_resnet18_ms")
    for key in ["50"] if quick else only or list(FLEETS):
        fleets[key] = fleet(FLEETS[key], eval_every=3 if quick else 1, quick=quick)
        if only:  # a fleet that finished is kept even if a later one is stopped
            _write(quick, fleets, profile or take_in_profile(), started)
    if profile is None or not only:
        profile = take_in_profile()
    _write(quick, fleets, profile, started)
    return _rows(fleets, profile)


def _recorded(key: str) -> Any:
    """``key`` of the committed record (None without one)."""
    path = RESULTS / "coordinator.json"
    return json.loads(path.read_text()).get(key) if path.is_file() else None


def measure_statistics(label: str, devices: int = 1000, code_commit: Optional[str] = None) -> dict[str, Any]:
    """:func:`statistics_profile` merged into the committed record under ``label`` (with the commit, time and
    load), and the docs section rewritten. ``PYTHONPATH`` pointing at another checkout's source roots measures
    that code with this benchmark (how the ``before`` entry was made); ``code_commit`` then names its commit."""
    load_before = os.getloadavg()[0]
    result: dict[str, Any] = dict(statistics_profile(devices))
    result.update(
        devices=devices,
        commit=code_commit or commit(),
        measured_at=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        load_average_1min=[load_before, os.getloadavg()[0]],
    )
    stats = dict(_recorded("statistics_take_in_us") or {})
    stats[label] = result
    record = json.loads((RESULTS / "coordinator.json").read_text())
    record["statistics_take_in_us"] = stats
    write_json("coordinator", record)
    write_section("coordinator", _section(record["fleets"], record["take_in_resnet18_ms"], stats))
    return result


def _write(quick: bool, fleets: dict[str, dict[str, Any]], profile: dict[str, float], started: float) -> None:
    stats = _recorded("statistics_take_in_us") or {}
    record = {
        "quick": quick,
        "settings": {
            "model": "resnet-small",
            "serve_options": list(EXTRA),
            "eval_every": 1,
            "fraction": 1.0,
            "answer_delay_s": [DELAY_S, DELAY_S + JITTER_S],
            "target_s": TARGET_S,
        },
        "fleets": fleets,
        "take_in_resnet18_ms": profile,
        "statistics_take_in_us": stats,
        "seconds": time.monotonic() - started,
    }
    write_json("coordinator-quick" if quick else "coordinator", record)
    if not quick:
        write_section("coordinator", _section(fleets, profile, stats))


MEMORY_TARGET_MB = 2048.0


def _left_at_10000(fleets: dict[str, dict[str, Any]]) -> str:
    """What still bounds the overhead at 10,000 devices, from the record: where the time goes in the
    ``10000-federated`` fleet and how much of it the statistics answered at once account for
    (``10000-federated-bn-2s``)."""
    big, late = fleets["10000-federated"], fleets.get("10000-federated-bn-2s")
    if big.get("acked_s") is None:
        return ""
    text = (
        f" Where it goes at 10,000 ({big.get('commit')}, load {big['load_average_1min'][0]:.1f}-"
        f"{big['load_average_1min'][1]:.1f}): the next round's tasks are handed to the coordinator's MQTT link "
        f"{big['handed_out_s']:.2f} s after the last update, the broker's acknowledgement of the last one is read "
        f"at {big['acked_s']:.2f} s and it reaches its device at {big['overhead_s']:.2f} s; in that window the "
        f"coordinator spends {big['overhead_cpu_s']:.2f} CPU-s, the broker {big['broker_overhead_cpu_s']:.2f} and "
        f"the load-generator processes {big['loadgen_overhead_cpu_s']:.2f} together."
    )
    if late is not None and late.get("overhead_s") is not None:
        median, _, _ = overheads(late)
        text += (
            f" With each device's statistics sent {late['settings']['statistics_delay_s']:g} s after its task (a "
            f"real device's forward pass comes first) the overhead is {median:.2f} s (acknowledged "
            f"{_fmt(late.get('acked_s'))} s, coordinator {late['overhead_cpu_s']:.2f} CPU-s): most of the rest is "
            "the coordinator's one paho network thread taking in 10,000 statistics answers while it sends the "
            "tasks (fourth pass, below)."
        )
    return text


def _window_ab() -> list[str]:
    """The fourth pass's experiment at 10,000 devices (``coordinator-window-ab.json``, written from the
    worktrees' records of ``python -m bench.coordinator --only 10000-federated``) as a table and what it shows."""
    path = RESULTS / "coordinator-window-ab.json"
    if not path.is_file():
        return []
    record = json.loads(path.read_text())
    lines = [
        "Fourth pass (issue 24): where the next round's tasks went at 10,000 devices. The session logs when the "
        "broker has acknowledged a round's last task (column 'acknowledged'), the load generator times every "
        "task's arrival and samples the broker's and its own processes' CPU. One fleet, one code change at a time, "
        f"each measured under the quiet lock ({record['command']}; the code of each row is a worktree at the "
        "commit named, patched as said):",
        "",
        "| code | overhead s | handed out s | acknowledged s | tasks out s, round 1 (no answers) / 2 (statistics "
        "answered at once) | overhead CPU s (coordinator / broker / load-gen) | peak RSS MiB | code (load) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in record["variants"].values():
        cpu = v["overhead_cpu_s"]
        load = v["load_average_1min"]
        lines.append(
            f"| {v['what']} | {v['overhead_s']:.2f} | {v['handed_out_s']:.2f} | {_fmt(v['acked_s'])} "
            f"| {v['tasks_out_s_round1']:.2f} / {v['tasks_out_s_round2']:.2f} "
            f"| {cpu['coordinator']:.2f} / {cpu['broker']:.2f} / {cpu['load_generator']:.2f} | {v['peak_rss_mb']:.0f} "
            f"| {v['code']} ({load[0]:.1f}/{load[1]:.1f}) |"
        )
    lines += [
        "",
        "What it shows. Neither the broker nor the load generator is the bound: the broker spends 0.4-0.5 CPU-s in "
        "a 3.7-7.6 s window, the 4 load-generator processes 2.4-3.4 CPU-s together, and the last task reaches its "
        "device within 0.4 s of the coordinator reading the broker's acknowledgement of it (overhead minus "
        "acknowledged; Mosquitto acknowledges a QoS 1 message once it has queued it for its subscriber). The "
        "coordinator's own sending is: behind a window of 20 (paho's default) the last task was acknowledged "
        "7.4 s after the round's last update, because its paho network thread reads each PUBACK behind the "
        "devices' statistics that the first tasks brought back (every virtual device answers its statistics "
        "request at once) and sends the next task only then. The link's own window of 1,000 "
        "(`core.mqtt.MAX_INFLIGHT`) takes that to 3.7-4.1 s. The broker's window toward its clients (20 or "
        "1,000), a thread switch interval of 0.1 ms instead of 0.5 ms, and making the coordinator's main thread "
        "wait for the acknowledgements before it takes in answers each left it within that range, so none is kept "
        "but the window (the generated broker config announces 1,000 as Receive Maximum, so that MQTT 5 links get "
        "the same window). What is left, inferred from these rows: one paho network thread does both directions. "
        "Without answers coming back (round 1's tasks) 10,000 tasks arrive over 1.3-2.1 s; with 10,000 statistics "
        "answers taken in at the same time by the same thread (frames checked and parsed in its callback), over "
        "3.3-4.2 s. The fleet whose statistics come 2 s after the task (a real device's forward pass over its "
        "batches comes first; table above, 'statistics 2 s after the task') separates that part. Not tried: "
        "taking the frames in on a thread of their own (the link's receive path and its backpressure are shared "
        "with the device side and the fairness and attack suites), or a second connection for tasks (the "
        "generated broker config makes the coordinator's account its client id).",
        "",
    ]
    return lines


def overheads(f: dict[str, Any]) -> tuple[Optional[float], Optional[float], Optional[float]]:
    """(median, max) round overhead of fleet record ``f`` with the statistics round trip included, and the
    median of that round trip alone. Records written before the load generator counted it (no ``bn_s``) had
    their overhead measured from its end: it is added back from each round's ``bn_statistics`` phase."""
    if "bn_s" in f:
        return f["overhead_s"], f["overhead_max_s"], f["bn_s"]
    rounds = [r for r in f["rounds"] if "overhead_s" in r]
    total = [r["overhead_s"] + r.get("phases", {}).get("bn_statistics", 0.0) for r in rounds]
    bns = [r["phases"]["bn_statistics"] for r in rounds if "bn_statistics" in r.get("phases", {})]
    return (
        statistics.median(total) if total else None,
        max(total) if total else None,
        statistics.median(bns) if bns else None,
    )


def _rows(fleets: dict[str, dict[str, Any]], profile: dict[str, float]) -> list[SummaryRow]:
    rows = []
    for key in ("500", "50", "2000", "500-federated", "2000-federated", "5000-federated", "10000-federated",
                "1000-resnet18-federated"):  # fmt: skip
        f = fleets.get(key)
        if f is None or (key == "50" and "500" in fleets):
            continue
        median, _, bn = overheads(f)
        if median is None:
            continue
        devices, model = f["settings"]["devices"], f["settings"].get("model", "resnet-small")
        rows.append(
            SummaryRow(
                "coordinator",
                f"round overhead, {devices} devices ({model}, bn = {_bn(f)})",
                median / TARGET_S,
                f"{TARGET_S:g} s limit",
                1.0 if devices >= 10000 or key in ("500", "500-federated") else None,
                higher_is_better=False,
                note=f"{median:.2f} s median"
                + (f", statistics round trip {bn:.2f} s" if bn is not None else "")
                + f", handed out {_fmt(f.get('handed_out_s'))} s"
                + (f", acknowledged {f['acked_s']:.2f} s" if f.get("acked_s") is not None else "")
                + (f", coordinator CPU in it {f['overhead_cpu_s']:.2f} s" if f.get("overhead_cpu_s") else "")
                + f"; CPU {_fmt(f['coordinator_cpu_s_per_round'], 1)} s/round",
            )
        )
        if devices >= 5000:
            rows.append(
                SummaryRow(
                    "coordinator",
                    f"coordinator peak RSS, {devices} devices ({model})",
                    f["peak_rss_mb"] / MEMORY_TARGET_MB,
                    "2 GiB limit",
                    1.0 if devices >= 10000 else None,
                    higher_is_better=False,
                    note=f"{f['peak_rss_mb']:.0f} MiB",
                )
            )
    if "500-inline" in fleets and "500" in fleets:
        main, inline = fleets["500"], fleets["500-inline"]
        rows.append(
            SummaryRow(
                "coordinator",
                "round overhead, evaluation in the background / inline (500 devices)",
                main["overhead_s"] / inline["overhead_s"],
                "inline evaluation, same run",
                None,
                higher_is_better=False,
                note=f"{main['overhead_s']:.2f} vs {inline['overhead_s']:.2f} s",
            )
        )
    return rows


def _bn(fleet: dict[str, Any]) -> str:
    extra = list(fleet["settings"].get("extra", []))
    return extra[extra.index("--bn") + 1] if "--bn" in extra else "federated"


def _late(fleet: dict[str, Any]) -> str:
    delay = fleet["settings"].get("statistics_delay_s")
    return f" (statistics {delay:g} s after the task)" if delay else ""


def _load(fleet: dict[str, Any]) -> str:
    load = fleet.get("load_average_1min")
    return f" ({load[0]:.1f}/{load[1]:.1f})" if load else ""


def _cpus(fleet: dict[str, Any]) -> str:
    """The CPU seconds in the overhead window of the coordinator, and of the broker and the load generator where
    the record has them (from issue 24's fourth pass; the load generator's of every process)."""
    parts = [fleet.get("overhead_cpu_s")]
    if fleet.get("broker_overhead_cpu_s") is not None:
        parts += [fleet.get("broker_overhead_cpu_s"), fleet.get("loadgen_overhead_cpu_s")]
    return " / ".join(_fmt(v) for v in parts)


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _section(
    fleets: dict[str, dict[str, Any]], profile: dict[str, float], stats: Optional[dict[str, Any]] = None
) -> str:
    lines = [
        "## Coordinator at scale",
        "",
        "`python -m bench coordinator` (bench/coordinator.py): a real `nefl-coord serve` (evaluation every "
        "round, on its own test samples in the background) against a local Mosquitto and `bench/loadgen.py`'s "
        "virtual devices (the device protocol, real-sized updates of the assigned submodel, no training; "
        f"each answers {DELAY_S:g}-{DELAY_S + JITTER_S:g} s after its task, or spread over `devices / 250` s "
        "for large fleets, `devices / 25` s for ResNet18). Fraction 1: every device is selected every round; "
        "tiers round-robin over the 5 submodels. Round overhead: the coordinator taking in the last update of "
        "a round -> the last task of the next round arriving at the devices (median over rounds; 2-round runs "
        "have one). With `bn = federated` (the default) the rows with a 'carried' figure carry a round's statistics "
        "in the next round's training tasks (column 'carried': from those tasks going out to the last statistics "
        "in, overlapping that round's training, not in the overhead); earlier rows include a statistics round "
        "trip after aggregation (column 'statistics'; rows measured before it was counted are corrected from "
        "their `bn_statistics` phase). Handed out: the same start until the coordinator has handed the next "
        "round's last task to its MQTT client (the coordinator's side: the overhead less the broker's delivery "
        "and the load generator decoding every device's task). Acknowledged: the same start until the coordinator's "
        "MQTT client has read the broker's acknowledgement of the next round's last task (Mosquitto acknowledges a "
        "QoS 1 message once it has queued it for its subscribers; the coordinator reads that behind whatever the "
        "broker sent it before, e.g. the devices' statistics; from issue 24's fourth pass). Load-gen processes: the "
        "virtual devices spread "
        "over that many processes (rows measured before issue 24's third pass: one process decoded every task). "
        "Overhead CPU: "
        "the coordinator's CPU seconds (all threads) in the overhead window (and the broker's and all load-generator "
        "processes' where three figures are given), "
        "from its `/proc` CPU time sampled every 0.1 s: on a shared host the wall times follow the load, this "
        "much less (recorded from commit eee912a on). Tasks out: the first to the last task of a round "
        "arriving; take-in lag: the broker acknowledging a "
        "round's last update -> the coordinator having taken it in. Serve options: `--bn server "
        "--eval-samples 2000 --bn-calibration 500`, or `--bn federated` with `--eval-samples` 2000 (500 at "
        "5,000 and 10,000 devices, 200 for ResNet18). Shared 2-core machine: the coordinator, the broker and "
        "the load generator run side by side (and other engineers' jobs: the 1-minute load average before and "
        "after each fleet is in the last column).",
        "",
        "| devices | load-gen processes | model | bn | evaluation | overhead s (median / max) | overhead CPU s "
        "(coordinator / broker / load-gen) | statistics s | carried s | handed out s | acknowledged s | tasks out s "
        "| take-in lag s | coordinator CPU s / round | peak RSS MiB | MB up / round | commit (load before/after) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in fleets.values():
        tasks_out = [r["tasks_out_s"] for r in f["rounds"] if "tasks_out_s" in r]
        where = "background" if f["settings"]["eval_background"] else "inline"
        median, most, bn = overheads(f)
        lines.append(
            f"| {f['settings']['devices']} | {f['settings'].get('loadgen_processes', 1)} "
            f"| {f['settings'].get('model', 'resnet-small')} | {_bn(f)}{_late(f)} | {where} "
            f"| {_fmt(median)} / {_fmt(most)} | {_cpus(f)} | {_fmt(bn)} "
            f"| {_fmt(f.get('bn_carried_s'))} | {_fmt(f.get('handed_out_s'))} | {_fmt(f.get('acked_s'))} "
            f"| {_fmt(statistics.median(tasks_out) if tasks_out else None)} | {_fmt(f['take_in_lag_s'])} "
            f"| {_fmt(f['coordinator_cpu_s_per_round'], 1)} | {f['peak_rss_mb']:.0f} | {f['mb_per_round']:.0f} "
            f"| {f.get('commit', 'earlier')}{_load(f)} |"
        )
    big = fleets.get("10000-federated")
    if big is not None:
        median, _, bn = overheads(big)
        handed, peak = big.get("handed_out_s"), big["peak_rss_mb"]
        if median is not None and handed is not None and bn is None:
            lines += [
                "",
                f"Goal (issue 24) at 10,000 devices with resnet-small, default `bn = federated`, read from the "
                f"overhead as the devices see it (the last task of the next round arriving, "
                f"{big['settings'].get('loadgen_processes', 1)} load-generator processes): round overhead < "
                f"{TARGET_S:g} s: {'met' if median < TARGET_S else 'missed'} ({median:.2f} s; on the coordinator's "
                f"side, tasks handed to its MQTT client, {handed:.2f} s: "
                f"{'met' if handed < TARGET_S else 'missed'}); coordinator memory < 2 GiB: "
                f"{'met' if peak < MEMORY_TARGET_MB else 'missed'} ({peak:.0f} MiB peak RSS)." + _left_at_10000(fleets),
            ]
    lines += [
        "",
        "Where the round trip goes now (issue 24, second pass). The coordinator's own work per answer is under a "
        "third of what it was (table at the end): a safetensors layout is checked once per distinct header (every"
        " device of a submodel sends the same one), the statistics are checked with one concatenation and one "
        "finiteness and one sign test and folded as two vectors, names are split once per name list, headers are "
        "written by pydantic and parsed by decoders built once, message ids need no system call, and an open "
        "session lowers the interpreter's switch interval to 0.5 ms. In the end-to-end runs the coordinator is "
        "then mostly waiting: 0.65-0.7 CPU seconds during a 3.6-4.6 s round trip at 2,000 devices (`bn_cpu_s` of "
        '`python -m bench.loadgen --devices 2000 --rounds 3 --delay-s 5 --jitter-s 8 --serve-options "--bn '
        'federated --eval-samples 500"`, load 17-24), 3.5 CPU seconds in a 15.3 s overhead window at 5,000 '
        "(column 'overhead CPU'), and the round trip lasts as long as its evaluate tasks take to reach the load "
        "generator. The 5,000 and 10,000 rows above were measured after this change at load 15-19; at f496b28 "
        "(load 3-6) they read 6.78 s overhead (statistics 5.12 s, coordinator CPU 25.5 s a round) and 22.34 s "
        "(16.23 s, 42.5 s a round): wall times at such different loads do not compare, the CPU a round at 5,000 "
        "devices went from 25.5 to 14.8 s. What bounds it on this host is QoS 1 delivery through paho (Python, a "
        "few system calls a packet, 20 messages in flight) and Mosquitto to one load-generator process, on 2 "
        "cores beside other jobs: with 20 in flight, that command's round trip took 4.3 s (median of 6 rounds), "
        "without a limit (paho's `max_inflight_messages_set(0)` on the coordinator's link and Mosquitto's "
        "`max_inflight_messages 0`) 3.0 s, an experiment not kept (paho does not honour an MQTT 5 broker's "
        "Receive Maximum). At 10,000 devices the next round's tasks also compete with the first updates of that "
        "round: 100 s to deliver them at load 15-18, 5.5 s at load 4-6.",
        "",
        "Third pass (issue 24): the statistics left the critical path. An evaluated round's `bn = federated` "
        "statistics now come with the next round's training tasks (`Task.bn_stats`, `nefl.wire/4`): each "
        "device first sends the statistics of the weights it received, bound to that task, then trains; the "
        "coordinator finishes the round (evaluation, records, checkpoint) once they are in, and only the last "
        "round keeps a round trip of its own (docs/protocol.md; column 'carried'). The load generator spreads "
        "large fleets over several processes (column 'load-gen processes'): one Python process decoding and "
        "acknowledging every QoS 1 task was a bench artefact a real fleet does not have. The coordinator's "
        "inbox finds the sender to evict in O(log n) (it scanned every sender per offered message when full, "
        "which is when statuses were dropped at 10,000 devices).",
        "",
        *_window_ab(),
        "Inline is how every round ran before evaluation moved off the critical path: evaluation and BatchNorm "
        "re-estimation of all 5 submodels sat between the last update and the next round's tasks. "
        "`bn = federated` (the default) in the rows without a 'carried' figure: after aggregation every device of "
        "the round gets an `evaluate` task for the statistics of the submodel it trained and answers at once "
        "(the virtual devices send statistics of the real layer shapes without computing them), so the overhead "
        "includes that round trip but not a real device's forward pass over its 512 samples. With carried "
        "statistics the virtual devices answer the request at once on receiving their task, before their "
        "update; a real device spends that forward pass inside the round's training time.",
        "",
        f"Take-in of one ResNet18 update ({profile['update_mb']:.0f} MB, the largest submodel), in process, "
        f"ms: receive (frames -> message) {profile['receive']:.1f}, unpack {profile['unpack']:.1f}, screen "
        f"{profile['screen']:.1f}, fold {profile['fold']:.1f}; total {profile['total']:.1f} (issue 15 measured "
        "about 170).",
    ]
    if stats:
        lines += [
            "",
            "The statistics round trip on the coordinator's side, per device, in process and without MQTT "
            "(`python -m bench.coordinator --statistics LABEL [--code-commit C]`: resnet-small, 1,000 "
            "answers, submodel i % 5, median of 5 interleaved runs; `before` is the code of the commit named, "
            "run by this benchmark with `PYTHONPATH` at that checkout's source roots), microseconds: tasks "
            "(built and framed), receive (frame -> message), answer (the answer rules and the tensors), read "
            "(the statistics' checks), fold (summing the fleet).",
            "",
            "| code | tasks | receive | answer | read | fold | total | commit (load before/after) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for label, s in stats.items():
            lines.append(
                f"| {label} | {s['tasks']:.0f} | {s['receive']:.0f} | {s['answer']:.0f} | {s['read']:.0f} "
                f"| {s['fold']:.0f} | {s['total']:.0f} | {s['commit']}{_load(s)} |"
            )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="50 devices only (a smoke run, not for the docs)")
    parser.add_argument("--only", nargs="+", metavar="FLEET", help=f"measure these fleets: {', '.join(FLEETS)}")
    parser.add_argument(
        "--statistics",
        metavar="LABEL",
        help="only the coordinator's per-device cost of the statistics round trip, recorded under LABEL",
    )
    parser.add_argument("--code-commit", help="with --statistics: the commit of the code measured (PYTHONPATH)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # stop the broker and serve too
    if args.statistics:
        print(json.dumps(measure_statistics(args.statistics, code_commit=args.code_commit), indent=1))
        return
    print(summary_table(run(args.quick, args.only)))


if __name__ == "__main__":
    main()
