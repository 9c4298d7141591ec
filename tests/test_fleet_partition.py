"""The fleet benchmark's device-correlated partition (bench/fleet.py, docs/benchmarks.md "Data that follows
the device"): seeded, disjoint, and the slow class holds the footwear, on the real Fashion-MNIST labels."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest

from bench.fleet import (
    FAST_SHARE,
    HELD_LABELS,
    POLICIES,
    SLOW_CLASSES,
    SLOW_SHARE,
    class_table,
    device_correlated_split,
    fleet_partition,
    goal_lines,
    merge_records,
    policy_args,
    reuse_rows,
    round_ends,
    serve_args,
    summarize,
)
from nefl_edge.core.data import load_dataset
from tests.hil.fleet import load_fleet


def test_the_device_correlated_split_is_seeded_disjoint_and_puts_the_footwear_on_the_slow_class(
    fmnist_dir: Path,
) -> None:
    labels = load_dataset(fmnist_dir, "train").y
    spec = load_fleet("bench-device")
    devices = spec.devices()
    split = fleet_partition("device-correlated", spec.seed)

    parts = split(labels, devices)
    again = split(labels, devices)
    other = fleet_partition("device-correlated", spec.seed + 1)(labels, devices)

    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True)), "same seed, different shards"
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True)), "the seed changes nothing"
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined), "a training image is on two devices"
    slow = [d.cls.name in SLOW_CLASSES for d in devices]
    assert any(slow) and not all(slow), "the bench-device fleet needs slow and fast devices"
    held_by_slow = held_by_fast = 0
    for d, part, is_slow in zip(devices, parts, slow, strict=True):
        assert len(part) == d.samples, f"{d.node}: {len(part)} images, expected {d.samples}"
        held = int(np.isin(labels[part], HELD_LABELS).sum())
        share = SLOW_SHARE if is_slow else FAST_SHARE
        assert held == round(share * d.samples), f"{d.node}: {held} footwear images of {d.samples}"
        if is_slow:
            assert set(np.unique(labels[part])) >= set(HELD_LABELS), f"{d.node} lacks a held class"
            held_by_slow += held
        else:
            held_by_fast += held
    assert held_by_slow > 9 * held_by_fast, f"slow devices hold {held_by_slow} footwear images, fast {held_by_fast}"


def test_the_split_refuses_more_than_a_pool_holds() -> None:
    labels = np.array([5, 7, 0, 1, 2, 3])
    try:
        device_correlated_split(labels, [True], [6], seed=0)
    except ValueError as exc:
        assert "pool" in str(exc)
    else:
        raise AssertionError("a split that needs 5 footwear images of 2 did not fail")


def test_the_per_class_table_gives_the_held_classes_mean_beside_the_others() -> None:
    acc = [0.5] * 10
    for c in HELD_LABELS:
        acc[c] = 0.2
    record = {
        "held_labels": list(HELD_LABELS),
        "partition": "device-correlated",
        "policies": [{"policy": "p", "class_accuracy": {"round": 3, "per_submodel": [acc]}}],
    }

    row = [line for line in class_table(record) if line.startswith("| p |")]

    assert row == ["| p | 0 (3) | " + " | ".join(f"{100 * a:.1f}" for a in acc) + " | 20.0 | 50.0 |"], row


@pytest.mark.slow  # 10,000 test images through resnet-small: ~50 s on the loaded 2-core host
def test_per_class_accuracy_of_a_checkpoint_adds_up_to_the_coordinators_accuracy(
    fmnist_dir: Path, tmp_path: Path
) -> None:
    from nefl_edge.coordinator import checkpoint
    from nefl_edge.coordinator.config import RunConfig
    from nefl_edge.coordinator.evaluation import evaluate
    from nefl_edge.coordinator.models import initial_consistent
    from nefl_edge.coordinator.strategies import get_strategy
    from nefl_edge.core.nested import init_global_state

    cfg = RunConfig(method="fedavg-smallest", data_dir=fmnist_dir, normalize=False)
    config, plan = get_strategy(cfg.method).setup(cfg.network(), tuple(cfg.gammas))
    state = init_global_state(config, plan.specs, initial_consistent(config, seed=2), 2)
    (tmp_path / "config.json").write_text(cfg.model_dump_json())
    checkpoint.save(tmp_path, checkpoint.Checkpoint(7, state.flat(), {}, {}))

    from bench.fleet import class_accuracy

    result = class_accuracy(tmp_path)

    test = load_dataset(fmnist_dir, "test")
    counts = np.bincount(test.y, minlength=10)
    assert result is not None and result["round"] == 7 and len(result["per_submodel"]) == 1
    overall = float(np.dot(result["per_submodel"][0], counts) / counts.sum())
    expected = evaluate(state, 0, test)[0]
    assert abs(overall - expected) < 1e-9, f"per-class accuracies weigh up to {overall}, evaluate says {expected}"
    assert class_accuracy(tmp_path / "missing") is None


def _options(**changes: object) -> argparse.Namespace:
    base = dict(
        max_rounds=500, eval_samples=1000, seed=0, deadline_s=15.0, wait_deadline_s=300.0, serve_args="",
        budget_s=100.0, target=0.75,
    )  # fmt: skip
    base.update(changes)
    return argparse.Namespace(**base)


def test_every_policy_evaluates_every_round_and_differs_from_the_others_only_in_its_policy_options() -> None:
    args = _options()
    runs = {name: serve_args(name, "r", 6, args) for name in POLICIES}

    for name, argv in runs.items():
        every = [argv[i + 1] for i, a in enumerate(argv) if a == "--eval-every"]
        assert every == ["1"], f"{name}: --eval-every {every}; the curve needs every round evaluated"
        own = policy_args(name, args.deadline_s, args.wait_deadline_s)
        shared = argv[: len(argv) - len(own)]
        assert argv[len(shared) :] == own, f"{name}: its policy options are not the last ones: {argv}"
        assert shared == runs["nefl-deadline"][: len(shared)], f"{name} shares other settings than nefl-deadline"
    dropping = [name for name, argv in runs.items() if "--no-fit-steps" in argv]
    assert dropping == ["fedavg-full-drop"], f"policies that give a slow device no shorter task: {dropping}"
    override = serve_args("nefl-deadline", "r", 6, _options(serve_args="--eval-every 5"))
    assert override[-2:] == ["--eval-every", "5"], "--serve-args must come last, to override the defaults"


def test_the_summary_counts_rounds_in_the_budget_times_to_target_and_evaluation_seconds_apart() -> None:
    # (round, started at s, ended at s, accuracies of three submodels, coordinator evaluation s, device stats s)
    plan = [
        (1, 5.0, 20.0, [0.5, 0.6, 0.7], 1.0, 0.5),
        (2, 20.5, 45.0, [0.6, 0.74, 0.76], 1.5, 0.25),
        (3, 47.0, 70.0, [0.76, 0.8, 0.81], 2.0, 0.5),
        (4, 70.0, 101.0, [0.9, 0.9, 0.9], 4.0, 1.0),  # ends past the 100 s budget: not counted
    ]
    t0 = 1.7e9
    rows = [
        {"round": r, "submodel": k, "accuracy": a, "updates": 3, "seconds": end - start,
         "started_at": t0 + start, "ended_at": t0 + end,
         "phases": {"evaluation": ev, "bn_statistics": dev, "training": 9.0}}
        for r, start, end, accs, ev, dev in plan for k, a in enumerate(accs)
    ]  # fmt: skip
    rows += [{"round": 0, "submodel": k, "accuracy": 0.1, "ended_at": 0.0} for k in range(3)]

    ends = round_ends(rows, t0)
    clients = [
        {"round": 1, "node": "a", "submodel": 0, "status": "updated", "steps": 4},
        {"round": 2, "node": "a", "submodel": 1, "status": "updated", "steps": 7},
        {"round": 2, "node": "b", "submodel": 2, "status": "updated", "steps": 15},
        {"round": 3, "node": "b", "submodel": 2, "status": "declined"},
        {"round": 4, "node": "b", "submodel": 2, "status": "updated", "steps": 15},  # past the budget
    ]
    out = summarize("p", rows, ends, _options(), clients, {"a": "pi4", "b": "pi5"})

    assert ends == {r: end for r, _, end, *_ in plan}, ends

    counted = [p for p in plan if p[2] <= 100.0]
    assert out["rounds"] == len(counted) == 3, out["rounds"]
    assert out["time_to_target_best_s"] == next(t for _, _, t, a, *_ in counted if max(a) >= 0.75) == 45.0
    assert out["time_to_target_worst_s"] == next(t for _, _, t, a, *_ in counted if min(a) >= 0.75) == 70.0
    assert out["coordinator_eval_s"] == round(sum(p[4] for p in counted), 1), out["coordinator_eval_s"]
    assert out["device_eval_s"] == round(sum(p[5] for p in counted), 1), out["device_eval_s"]
    between = sum(now[1] - before[2] for before, now in zip(counted, counted[1:]))
    assert out["between_rounds_s"] == round(between, 1) == 2.5, out["between_rounds_s"]
    assert out["final"]["worst"] == 0.76 and out["final"]["best"] == 0.81, out["final"]
    assert out["participation"] == 9 / (3 * 2), out["participation"]
    assert out["submodels_by_class"] == {"pi4": [0, 1], "pi5": [2]}, out["submodels_by_class"]
    assert out["updates_by_class"] == {"pi4": 2, "pi5": 1}, out["updates_by_class"]
    assert out["mean_steps_by_class"] == {"pi4": (4 + 7) / 2, "pi5": 15}, out["mean_steps_by_class"]


def test_the_goal_lines_give_the_speed_up_to_target_and_the_held_classes_against_fedavg_full_drop() -> None:
    def acc(held: float) -> list[float]:
        return [held if c in HELD_LABELS else 0.9 for c in range(10)]

    def policy(name: str, worst: Optional[float], best: Optional[float], held: list[float]) -> dict[str, object]:
        per = [acc(h) for h in held]
        return {"policy": name, "time_to_target_worst_s": worst, "time_to_target_best_s": best,
                "class_accuracy": {"round": 9, "per_submodel": per}}  # fmt: skip

    record: dict[str, Any] = {
        "options": {"budget_s": 300.0},
        "held_labels": list(HELD_LABELS),
        "policies": [
            policy("nefl-deadline", 50.0, 20.0, [0.6, 0.65, 0.8]),
            policy("fedavg-full-wait", None, 100.0, [0.9]),
            policy("fedavg-full-drop", 30.0, 30.0, [0.65]),
        ],
    }

    text = "\n".join(goal_lines(record))

    assert "at least 6.0x" in text, text  # fedavg-full-wait never reaches it: a bound, 300 / 50
    assert "100 s vs 20 s, 5.0x" in text, text
    assert "60.0, 65.0, 80.0 % against fedavg-full-drop's 65.0 %: 1 of 3" in text, text
    assert goal_lines({**record, "policies": record["policies"][:2]}) == [], "a goal without fedavg-full-drop"
    distill = policy("nefl-distill-deadline", 25.0, 10.0, [0.7, 0.7, 0.7])
    both = "\n".join(goal_lines({**record, "policies": [*record["policies"], distill]}))
    assert "`nefl-deadline`, time to target" in both and "`nefl-distill-deadline`, time to target" in both, both
    assert "at least 12.0x" in both and "70.0, 70.0, 70.0 % against fedavg-full-drop's 65.0 %: 3 of 3" in both, both


def test_appending_policies_keeps_the_record_and_refuses_other_settings() -> None:
    def record(policies: list[str], **options: object) -> dict[str, Any]:
        opts = {"fleet": "bench-device", "budget_s": 300.0, "policies": ",".join(policies), "append": False}
        opts.update(options)
        return {
            "options": opts, "fleet": [{"node": "a"}], "partition": "device-correlated", "command": "c",
            "commit": "abc", "date": "d", "wall_s": 1,
            "policies": [{"policy": p, "rounds": i} for i, p in enumerate(policies)],
        }  # fmt: skip

    old = record(["nefl-deadline", "fedavg-full-wait"])
    new = record(["nefl-distill-deadline", "fedavg-full-wait"], append=True)
    new["commit"], new["policies"][1]["rounds"] = "def", 9

    merged = merge_records(old, new)

    assert [p["policy"] for p in merged["policies"]] == ["nefl-deadline", "nefl-distill-deadline", "fedavg-full-wait"]
    assert merged["policies"][2]["rounds"] == 9, "a policy run again must replace its row"
    assert merged["commit"] == "abc" and merged["appended"][0]["commit"] == "def", merged
    assert merged["appended"][0]["policies"] == ["fedavg-full-wait", "nefl-distill-deadline"], merged["appended"]
    with pytest.raises(ValueError, match="budget_s"):
        merge_records(old, record(["nefl-distill-deadline"], budget_s=60.0))
    with pytest.raises(ValueError):
        merge_records(old, {**new, "partition": "fleet"})


def test_reusing_rows_keeps_the_new_record_and_names_where_the_reused_rows_came_from() -> None:
    def record(policies: list[str], commit: str, **options: object) -> dict[str, Any]:
        opts = {"fleet": "bench-device", "budget_s": 300.0, "policies": ",".join(policies), "out": None}
        opts.update(options)
        return {
            "options": opts, "fleet": [{"node": "a"}], "partition": "device-correlated", "command": f"c-{commit}",
            "commit": commit, "date": "d", "wall_s": 1,
            "policies": [{"policy": p, "rounds": i} for i, p in enumerate(policies)],
        }  # fmt: skip

    old = record(["nefl-deadline", "fedavg-full-wait", "fedavg-full-drop", "fedavg-smallest"], "old")
    new = record(["nefl-distill-deadline", "nefl-deadline"], "new", out="x.json", reuse="y.json")

    merged = reuse_rows(old, new, "y.json")

    names = [p["policy"] for p in merged["policies"]]
    assert names == ["nefl-deadline", "fedavg-full-wait", "fedavg-full-drop", "fedavg-smallest",
                     "nefl-distill-deadline"], f"rows or their order: {names}"  # fmt: skip
    assert merged["policies"][0]["rounds"] == 1, "a policy run now must keep its new row, not the reused one"
    assert merged["commit"] == "new", f"the record's commit is the reused one: {merged['commit']}"
    assert merged["reused"]["policies"] == ["fedavg-full-wait", "fedavg-full-drop", "fedavg-smallest"], merged
    assert (merged["reused"]["commit"], merged["reused"]["file"]) == ("old", "y.json"), merged["reused"]
    with pytest.raises(ValueError, match="budget_s"):
        reuse_rows(old, record(["nefl-deadline"], "new", budget_s=60.0), "y.json")
