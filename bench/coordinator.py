"""Benchmark: the coordinator as the fleet grows (issue 15, "a coordinator that scales").

A real ``nefl-coord serve`` (resnet-small, Fashion-MNIST test set, ``--bn server``: evaluation and
BatchNorm re-estimation every round, the heaviest cadence) against a local Mosquitto and the load generator
(``bench.loadgen``): 50, 500 and 2000 virtual devices that speak the device protocol and upload real-sized
updates without training; fraction 1 (every device is selected every round), device ``i`` declares tier
``i % 5`` (submodels 0-4 in equal shares), each answers 5-8 s after its task (emulated training). Reported
per fleet: the round overhead (the coordinator taking in the last update of round r -> the last task of round
r+1 arriving at the devices), the coordinator's CPU seconds per round and its peak RSS; at 500 devices also
with evaluation inline (``--no-eval-background``), the way every round ran before. Also the take-in cost of
one ResNet18 update, stage by stage, in this process.

    python -m bench coordinator           # about 5 min
    python -m bench coordinator --quick   # 50 devices only, under a minute
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Optional

from bench.common import SummaryRow, interleaved, write_json, write_section
from bench.loadgen import measure

TARGET_S = 2.0
EXTRA = ("--bn", "server", "--eval-samples", "2000", "--bn-calibration", "500")
FEDERATED = ("--bn", "federated", "--eval-samples", "2000")  # the default: statistics from the devices
DELAY_S, JITTER_S = 5.0, 3.0  # emulated training: each device answers 5-8 s after its task


def fleet(
    devices: int,
    rounds: int,
    background: bool = True,
    eval_every: int = 1,
    quick: bool = False,
    extra: tuple[str, ...] = EXTRA,
) -> dict[str, Any]:
    where = "in the background" if background else "inline"
    print(f"   {devices} devices, {rounds} rounds, evaluation {where}, {' '.join(extra[:2])}")
    result = measure(
        devices,
        rounds,
        eval_every=eval_every,
        eval_background=background,
        extra=extra,
        timeout_s=600,
        delay_s=1.0 if quick else DELAY_S,
        jitter_s=1.0 if quick else JITTER_S,
    )
    lags = [r["take_in_lag_s"] for r in result["rounds"] if "take_in_lag_s" in r]
    result["take_in_lag_s"] = statistics.median(lags) if lags else None
    result["mb_per_round"] = result["mb_sent"] / rounds
    print(
        f"   overhead {result['overhead_s']:.2f} s (max {result['overhead_max_s']:.2f}), "
        f"CPU {result['coordinator_cpu_s_per_round']:.1f} s/round, peak RSS {result['peak_rss_mb']:.0f} MiB"
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


def run(quick: bool = False) -> list[SummaryRow]:
    started = time.monotonic()
    fleets: dict[str, dict[str, Any]] = {}
    if quick:
        fleets["50"] = fleet(50, 3, eval_every=3, quick=True)
    else:
        fleets["50"] = fleet(50, 3)
        fleets["500"] = fleet(500, 3)
        fleets["500-inline"] = fleet(500, 2, background=False)
        fleets["500-federated"] = fleet(500, 3, extra=FEDERATED)
        fleets["2000"] = fleet(2000, 3)
    profile = take_in_profile()
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
        "seconds": time.monotonic() - started,
    }
    write_json("coordinator-quick" if quick else "coordinator", record)
    if not quick:
        write_section("coordinator", _section(fleets, profile))
    return _rows(fleets, profile)


def _rows(fleets: dict[str, dict[str, Any]], profile: dict[str, float]) -> list[SummaryRow]:
    rows = []
    main = fleets.get("500") or fleets["50"]
    size = main["settings"]["devices"]
    rows.append(
        SummaryRow(
            "coordinator",
            f"round overhead, {size} devices (resnet-small)",
            main["overhead_s"] / TARGET_S,
            f"{TARGET_S:g} s limit",
            1.0,
            higher_is_better=False,
            note=f"{main['overhead_s']:.2f} s median; CPU {main['coordinator_cpu_s_per_round']:.1f} s/round",
        )
    )
    if "2000" in fleets:
        big = fleets["2000"]
        rows.append(
            SummaryRow(
                "coordinator",
                "round overhead, 2000 devices (resnet-small)",
                big["overhead_s"] / TARGET_S,
                f"{TARGET_S:g} s limit",
                None,
                higher_is_better=False,
                note=f"{big['overhead_s']:.2f} s; peak RSS {big['peak_rss_mb']:.0f} MiB",
            )
        )
    if "500-federated" in fleets:
        fed = fleets["500-federated"]
        rows.append(
            SummaryRow(
                "coordinator",
                "round overhead, 500 devices, default bn = federated (devices' statistics round trip)",
                fed["overhead_s"] / TARGET_S,
                f"{TARGET_S:g} s limit",
                1.0,
                higher_is_better=False,
                note=f"{fed['overhead_s']:.2f} s median",
            )
        )
    if "500-inline" in fleets:
        inline = fleets["500-inline"]
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


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _section(fleets: dict[str, dict[str, Any]], profile: dict[str, float]) -> str:
    lines = [
        "## Coordinator at scale",
        "",
        "`python -m bench coordinator` (bench/coordinator.py): a real `nefl-coord serve` (resnet-small, "
        f"`{' '.join(EXTRA)}`, evaluation every round) against a local Mosquitto and `bench/loadgen.py`'s "
        "virtual devices (the device protocol, real-sized updates of the assigned submodel, no training; "
        f"each answers {DELAY_S:g}-{DELAY_S + JITTER_S:g} s after its task). Fraction 1: every device is "
        "selected every round; tiers round-robin over the 5 submodels. Round overhead: the coordinator taking "
        "in the last update of a round -> the last task of the next round arriving at the devices (median over "
        "rounds); tasks out: the first to the last task of a round arriving; take-in lag: the broker acknowledging "
        "a round's last update -> the coordinator having taken it in. Shared 2-core machine: the coordinator, "
        "the broker and the load generator run side by side (and, during this run, other engineers' jobs).",
        "",
        "| devices | bn | evaluation | overhead s (median / max) | tasks out s | take-in lag s "
        "| coordinator CPU s / round | peak RSS MiB | MB up / round |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for f in fleets.values():
        tasks_out = [r["tasks_out_s"] for r in f["rounds"] if "tasks_out_s" in r]
        where = "background" if f["settings"]["eval_background"] else "inline"
        lines.append(
            f"| {f['settings']['devices']} | {_bn(f)} | {where} "
            f"| {_fmt(f['overhead_s'])} / {_fmt(f['overhead_max_s'])} "
            f"| {_fmt(statistics.median(tasks_out) if tasks_out else None)} | {_fmt(f['take_in_lag_s'])} "
            f"| {_fmt(f['coordinator_cpu_s_per_round'], 1)} | {f['peak_rss_mb']:.0f} | {f['mb_per_round']:.0f} |"
        )
    lines += [
        "",
        "Inline is how every round ran before evaluation moved off the critical path: evaluation and BatchNorm "
        "re-estimation of all 5 submodels sat between the last update and the next round's tasks. "
        "`bn = federated` (the default): after aggregation every device of the round gets an `evaluate` task "
        "for the statistics of the submodel it trained and answers at once (the virtual devices send "
        "statistics of the real layer shapes without computing them), so the overhead includes that round "
        "trip but not a real device's forward pass over its 512 samples.",
        "",
        f"Take-in of one ResNet18 update ({profile['update_mb']:.0f} MB, the largest submodel), in process, "
        f"ms: receive (frames -> message) {profile['receive']:.1f}, unpack {profile['unpack']:.1f}, screen "
        f"{profile['screen']:.1f}, fold {profile['fold']:.1f}; total {profile['total']:.1f} (issue 15 measured "
        "about 170).",
    ]
    return "\n".join(lines)
