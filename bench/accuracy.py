"""Benchmark: accuracy of every method of ``coordinator.strategies`` in the same harness (``simulate``).

Paper-style setup (Kang et al., arXiv 2308.07761, Sec. 5): 100 devices, 10 % per round, the five gammas
assigned to equal fractions of devices, IID and Dirichlet(0.5) partitions of Fashion-MNIST's training set,
several seeds. Runs are spread over a process pool (one torch thread each). Writes
bench/results/accuracy-<preset>.json and the accuracy section of docs/benchmarks.md.

    python -m bench.accuracy --preset quick      # about 30 minutes on 2 cores
    python -m bench.accuracy --preset full       # for bigger machines
    python -m bench.accuracy --preset paper --workers 1   # the paper's protocol, scaled down (~45 min)
    python -m bench.accuracy --encodings float16,int8 --methods nefl-wd --schemes iid --workers 2
    python -m bench.accuracy --methods heterofl,fedrolex --schemes iid --seeds 0 --out /tmp/rolex.json

``--encodings`` runs the same protocol (default preset ``paper``) with devices sending their updates as
float16 or int8 (``train.update_encoding``, edge_client/encoding.py) and compares each with float32: the
committed ``accuracy-<preset>.json`` runs where their settings match, else float32 runs side by side. It
writes bench/results/accuracy-encoding.json and the accuracy-encoding section of docs/benchmarks.md.

The ``paper`` preset runs every method under the NeFL paper's protocol (``RunConfig`` preset ``paper``: lr
0.1 decayed x0.1 at T/2 and 3T/4, 5 local epochs, no momentum or weight decay, uniform NeFedAvg weights,
tier-window assignment, step sizes from 1, max-pool stem, tracked per-submodel BatchNorm), scaled to a
2-core machine: a seeded training subset, fewer rounds. Every setting applies to every method.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Optional

from nefl_edge.coordinator.config import METHODS

ROOT = Path(__file__).resolve().parents[1]
GAMMAS = (0.2, 0.4, 0.6, 0.8, 1.0)
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"rounds": 8, "seeds": [0, 1], "test_samples": 2000, "epochs": 1},
    "full": {"rounds": 100, "seeds": [0, 1, 2], "test_samples": 10000, "epochs": 5},
    # Does the quick preset's ranking hold with more rounds? (one seed; pick methods with --methods)
    "long": {"rounds": 40, "seeds": [0], "test_samples": 2000, "epochs": 1, "eval_every": 8},
    "smoke": {"rounds": 1, "seeds": [0], "test_samples": 500, "epochs": 1},  # for trying the harness
    # The paper's protocol: 100 clients, 10 a round, 5 local epochs; scaled by a 5000-sample training subset
    # (50 per client) and 40 rounds.
    "paper": {
        "protocol": "paper",
        "rounds": 40,
        "seeds": [0, 1, 2],
        "test_samples": 2000,
        "epochs": 5,
        "eval_every": 8,
        "train_samples": 5000,
        "methods": "nefl-wd,nefl-w,nefl-d,heterofl,fjord,fjord-paper,depthfl,scalefl,fedavg-smallest",
    },
    "paper-smoke": {
        "protocol": "paper",
        "rounds": 2,
        "seeds": [0],
        "test_samples": 300,
        "epochs": 1,
        "eval_every": 1,
        "train_samples": 1000,
        "methods": "nefl-wd,fjord-paper,scalefl",
    },
    # Issue 23, the regime users live in: all 60,000 training samples over 100 clients (600 each), the paper's
    # protocol (its specs, normalised inputs, partial batches, lr decay at T/2 and 3T/4), 3 seeds. Tracked
    # BatchNorm statistics (the paper's); full-data-federated: the default federated statistics. Prepared, not
    # yet run: the cost estimate is in docs/benchmarks.md (full-data section).
    "full-data": {
        "protocol": "paper",
        "rounds": 100,
        "seeds": [0, 1, 2],
        "test_samples": 10000,
        "epochs": 1,
        "eval_every": 10,
        "methods": "nefl-wd,heterofl,fjord-paper,fedavg-smallest,fedavg-full",
        "bn": "tracked",
    },
}
PRESETS["full-data-federated"] = {**PRESETS["full-data"], "bn": "federated"}


def paper_config(
    method: str, seed: int, preset: dict[str, Any], encoding: str = "float32", aggregation: str = "exact"
) -> Any:
    """The run configuration of one run under the paper's protocol (``--preset paper``), with the preset's
    rounds and epochs, the paper's tracked BatchNorm (or the preset's ``bn``), the devices' update ``encoding``
    and the coordinator's ``aggregation`` (exact or robust NeFedAvg, with the robust options' defaults)."""
    from nefl_edge.coordinator.config import RunConfig, load_config

    overrides: dict[str, Any] = {
        "preset": "paper",
        "method": method,
        "rounds": preset["rounds"],
        "seed": seed,
        "policy": "static",
        "train.epochs": preset["epochs"],
        "train.update_encoding": encoding,
        "aggregation": aggregation,
        "eval_every": preset.get("eval_every") or preset["rounds"],  # no eval_every: the last round only
    }
    # One core per run (no evaluation thread beside the training), evaluation on the test set only.
    for key, value in (("bn", preset.get("bn", "tracked")), ("eval_background", False), ("evaluation", "test")):
        if key in RunConfig.model_fields:
            overrides[key] = value
    return load_config(None, overrides)


def run_jobs(
    jobs: Sequence[tuple[str, str, int, str, Optional[str]]],
    partial: Path,
    preset: dict[str, Any],
    data_dir: Optional[str],
    workers: int,
) -> list[dict[str, Any]]:
    """Every (method, scheme, seed, encoding, aggregation) run of ``jobs`` (aggregation None: exact, not named
    in the record): those already in ``partial`` (JSON lines of finished runs) are read back, the others run
    in ``workers`` processes and are appended there as they end, so that an interrupted benchmark resumes.
    Prints a line per finished run."""
    runs = [json.loads(line) for line in partial.read_text().splitlines() if line.strip()] if partial.exists() else []
    finished = {(r["method"], r["scheme"], r["seed"], r.get("encoding", "float32"), r.get("aggregation")) for r in runs}
    todo = [job for job in jobs if job not in finished]
    done = len(jobs) - len(todo)
    partial.parent.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(workers) as pool:
        futures = [pool.submit(run_one, m, s, seed, preset, data_dir, e, a) for m, s, seed, e, a in todo]
        for future in as_completed(futures):
            run = future.result()
            runs.append(run)
            done += 1
            with partial.open("a") as fh:
                fh.write(json.dumps(run) + "\n")
            accs = " ".join("—" if a is None else f"{100 * a:.1f}" for a in run["tier_accuracy"])
            encoding = run.get("encoding", "float32")
            print(
                f"[{done}/{len(jobs)}] {run['method']:<16} {run['scheme']:<9} seed {run['seed']}"
                + ("" if encoding == "float32" else f" {encoding}")
                + (f" {run['aggregation']}" if "aggregation" in run else "")
                + f": {accs} ({run['seconds']:.0f} s)",
                flush=True,
            )
    return runs


def run_one(
    method: str,
    scheme: str,
    seed: int,
    preset: dict[str, Any],
    data_dir: Optional[str],
    encoding: str = "float32",
    aggregation: Optional[str] = None,
) -> dict[str, Any]:
    """One run; ``encoding`` is how devices send their updates (the in-process grid applies its round trip),
    ``aggregation`` the coordinator's NeFedAvg (paper protocol only; None: exact, and the record does not
    name it, as the committed ones do not)."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from nefl_edge.coordinator.config import RunConfig
    from nefl_edge.coordinator.partition import make_partitioner, split_dataset
    from nefl_edge.coordinator.simulate import simulate
    from nefl_edge.core.data import Dataset, load_dataset
    from nefl_edge.core.schemas import TrainConfig

    train = load_dataset(Path(data_dir) if data_dir else None, "train")
    test_all = load_dataset(Path(data_dir) if data_dir else None, "test")
    if preset.get("train_samples"):
        keep = np.sort(np.random.default_rng(seed).permutation(len(train))[: preset["train_samples"]])
        train = Dataset(train.x[keep], train.y[keep], train.name)
    clients = 100
    parts = make_partitioner(scheme, clients, alpha=0.5, seed=seed).split(train.y)
    shards = split_dataset(train, parts)
    n = preset["test_samples"]
    test = Dataset(test_all.x[:n], test_all.y[:n], "test")
    calibration = test_all.x[-500:]  # held out from the evaluated part
    tiers = [i % len(GAMMAS) for i in range(clients)]
    if preset.get("protocol") == "paper":
        cfg = paper_config(method, seed, preset, encoding, aggregation or "exact")
        result = simulate(cfg, shards, tiers, test, threads=1)
        return _record(method, scheme, seed, result, encoding, aggregation)
    if aggregation not in (None, "exact"):
        raise ValueError("robust aggregation is benchmarked under the paper protocol only")
    # Every device on the submodel of its tier, statistics re-estimated on the coordinator's held-out images.
    cfg = RunConfig(
        method=method, gammas=list(GAMMAS), rounds=preset["rounds"], fraction=0.1, seed=seed, policy="static",
        cover_submodels=False, bn="server", eval_every=preset.get("eval_every") or preset["rounds"],
        train=TrainConfig(epochs=preset["epochs"], update_encoding=encoding),
    )  # fmt: skip
    result = simulate(cfg, shards, tiers, test, calibration, threads=1)
    return _record(method, scheme, seed, result, encoding)


def _record(
    method: str, scheme: str, seed: int, result: Any, encoding: str = "float32", aggregation: Optional[str] = None
) -> dict[str, Any]:
    record = {
        "method": method,
        "scheme": scheme,
        "seed": seed,
        "tier_accuracy": result.tier_accuracy(),
        "submodel_gammas": result.submodel_gammas,
        "tier_submodel": result.tier_submodel,
        "seconds": round(result.seconds, 1),
        "curve": {str(r): result.tier_accuracy(i) for i, r in enumerate(result.rounds)},
    }
    if encoding != "float32":  # float32 records keep the shape of the committed ones
        record["encoding"] = encoding
    if aggregation is not None:
        record["aggregation"] = aggregation
    return record


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    keys = sorted({(r["scheme"], r["method"]) for r in runs}, key=lambda k: (k[0], METHOD_ORDER.index(k[1])))
    for scheme, method in keys:
        group = [r for r in runs if r["scheme"] == scheme and r["method"] == method]
        tiers = []
        for t in range(len(GAMMAS)):
            values = [r["tier_accuracy"][t] for r in group if r["tier_accuracy"][t] is not None]
            tiers.append(_stat(values) if values else None)
        served = [[a for a in r["tier_accuracy"] if a is not None] for r in group]
        rows.append(
            {
                "scheme": scheme,
                "method": method,
                "tiers": tiers,
                "worst": _stat([min(s) for s in served]),
                "average": _stat([sum(s) / len(s) for s in served]),
                "served_tiers": sum(a is not None for a in group[0]["tier_accuracy"]),
                "seeds": len(group),
            }
        )
    return rows


def _stat(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0}


def _fmt(stat: Optional[dict[str, float]]) -> str:
    if stat is None:
        return "—"
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def render(rows: list[dict[str, Any]], preset_name: str, preset: dict[str, Any], commit: str, command: str) -> str:
    lines = [
        f"## Methods compared: accuracy, preset `{preset_name}`",
        "",
        f"Accuracy (%) on Fashion-MNIST test samples, `resnet-small`, preset `{preset_name}` "
        f"({preset['rounds']} rounds, {preset['epochs']} local epoch(s), 100 devices, 10 % per round, "
        f"seeds {preset['seeds']}: mean ± spread over seeds). Columns are device tiers: the model a device "
        "that affords gamma g runs; — means the method gives that tier no model (it cannot afford any of "
        "the method's models), and worst/average then cover the served tiers only.",
        "",
        f"Produced by `{command}` at commit `{commit}`.",
        "",
    ]
    if preset.get("protocol") == "paper":
        lines[2:2] = [
            "Protocol: the NeFL paper's (`--preset paper`: SGD lr 0.1 decayed x0.1 after T/2 and 3T/4, "
            f"{preset['epochs']} local epochs of batch 32, no momentum, no weight decay, uniform NeFedAvg "
            "weights, each client draws its submodel from tiers t-2..t+2 every round, step sizes from 1, "
            "max-pool stem, tracked per-submodel BatchNorm statistics and no server-side re-estimation), "
            f"scaled down: a seeded {preset['train_samples']}-sample subset of the training set split over "
            f"100 devices ({preset['train_samples'] // 100} samples each), {preset['rounds']} rounds, "
            f"{preset['test_samples']} test samples. The same settings for every method.",
            "",
        ]
    for scheme in sorted({r["scheme"] for r in rows}):
        lines += [f"**{scheme}**", ""]
        lines.append("| method | " + " | ".join(f"g={g}" for g in GAMMAS) + " | worst | average | tiers served |")
        lines.append("|---|" + "---|" * (len(GAMMAS) + 3))
        for r in (r for r in rows if r["scheme"] == scheme):
            cells = [_fmt(t) for t in r["tiers"]]
            lines.append(
                f"| {r['method']} | " + " | ".join(cells) + f" | {_fmt(r['worst'])} | {_fmt(r['average'])} | "
                f"{r['served_tiers']}/{len(GAMMAS)} |"
            )
        group = [r for r in rows if r["scheme"] == scheme]
        lines += ["", *verdict(group), ""]
        if preset.get("protocol") == "paper":
            lines += [*evidence(group), ""]
    return "\n".join(lines)


def curves(runs: list[dict[str, Any]]) -> str:
    """Accuracy of the worst served tier after each evaluated round, mean over the seeds that recorded it."""
    runs = [r for r in runs if len(r.get("curve", {})) > 2]
    if not runs:
        return ""
    seeds = sorted({r["seed"] for r in runs})
    lines = ["", f"Worst served tier over rounds (the weakest tier's model where it has one), mean over seeds {seeds}:"]
    lines.append("")
    for scheme in sorted({r["scheme"] for r in runs}):
        group = [r for r in runs if r["scheme"] == scheme]
        points = sorted({int(k) for r in group for k in r["curve"]})
        lines += [f"**{scheme}**", "", "| method | " + " | ".join(f"round {p}" for p in points) + " |"]
        lines.append("|---|" + "---|" * len(points))
        for method in [m for m in METHOD_ORDER if any(r["method"] == m for r in group)]:
            cells = []
            for p in points:
                values = [
                    min(a for a in r["curve"][str(p)] if a is not None)
                    for r in group
                    if r["method"] == method and str(p) in r["curve"]
                ]
                cells.append(f"{100 * statistics.fmean(values):.1f}" if values else "—")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def verdict(rows: list[dict[str, Any]], ours: str = "nefl-wd") -> list[str]:
    """Where NeFL-WD does not beat a baseline (mean over seeds), said plainly."""
    mine = next((r for r in rows if r["method"] == ours), None)
    if mine is None:
        return []
    losses, wins = [], []
    for r in rows:
        if r["method"] == ours:
            continue
        for key in ("worst", "average"):
            if r[key]["mean"] >= mine[key]["mean"]:
                partial = "" if r["served_tiers"] == len(GAMMAS) else f" (over its {r['served_tiers']} served tiers)"
                losses.append(f"{r['method']} {key} {_fmt(r[key])}{partial} vs {_fmt(mine[key])}")
            else:
                wins.append(f"{r['method']} {key}")
    beats = f"{ours} beats (mean over seeds): " + (", ".join(wins) if wins else "none") + "."
    if not losses:
        return [f"{ours} beats every baseline here on both worst and average accuracy."]
    return [beats, "", f"{ours} does not beat: " + "; ".join(losses) + "."]


def evidence(rows: list[dict[str, Any]], ours: str = "nefl-wd") -> list[str]:
    """How far apart the smallest and the full model are on this data set, and what sharing costs the
    smallest: the gamma-0.2 model inside ``ours`` vs the same-size model trained alone by every client."""
    by = {r["method"]: r for r in rows}
    if ours not in by or "fedavg-smallest" not in by:
        return []
    mine, alone = by[ours]["tiers"], by["fedavg-smallest"]["tiers"][0]
    full = max((r["tiers"][-1]["mean"], r["method"]) for r in rows if r["tiers"][-1] is not None)
    return [
        f"Evidence: the full model of {ours} scores {_fmt(mine[-1])}, its gamma-0.2 submodel {_fmt(mine[0])} "
        f"(gap {100 * (mine[-1]['mean'] - mine[0]['mean']):.1f} points); the best full-size model here "
        f"({full[1]}) {100 * full[0]:.1f}; a gamma-0.2 model trained alone by every selected client "
        f"(fedavg-smallest) {_fmt(alone)}, {100 * (alone['mean'] - mine[0]['mean']):+.1f} points against the "
        f"same-size submodel inside {ours}."
    ]


METHOD_ORDER = list(METHODS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default=None, help="default: quick (paper with --encodings)"
    )
    parser.add_argument("--methods", default=None, help="comma-separated; default: the preset's, or all")
    parser.add_argument("--schemes", "--partitions", dest="schemes", default="iid,dirichlet")
    parser.add_argument("--seeds", default=None, help="comma-separated; default: the preset's")
    parser.add_argument("--rounds", type=int, default=None, help="override the preset's rounds (to try the harness)")
    parser.add_argument(
        "--encodings",
        default=None,
        help="comma-separated update encodings (float16, int8) to compare with float32; writes accuracy-encoding",
    )
    parser.add_argument(
        "--aggregations",
        default=None,
        help="comma-separated NeFedAvg modes (exact, robust) run side by side under the paper protocol; writes "
        "--out (default bench/results/accuracy-<preset>-robust.json) and the accuracy-robust section",
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--data-dir", default=None, help="IDX/CIFAR folder; default Debian's Fashion-MNIST")
    parser.add_argument("--render-only", action="store_true", help="re-render docs/benchmarks.md from the JSON")
    parser.add_argument(
        "--partial",
        type=Path,
        default=None,
        help="JSON-lines file of finished runs: each run is appended as it ends, and runs already in it are "
        "not run again (an interrupted benchmark continues); default bench/results/accuracy-<preset>.partial.jsonl",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write the record here and leave docs/benchmarks.md alone (a comparison of a few methods, e.g. "
        "--methods heterofl,fedrolex --seeds 0, that must not replace the preset's committed results)",
    )
    args = parser.parse_args()
    args.preset = args.preset or ("paper" if args.encodings else "quick")
    preset = dict(PRESETS[args.preset])
    if args.seeds:
        preset["seeds"] = [int(x) for x in args.seeds.split(",")]
    if args.rounds:
        preset["rounds"] = args.rounds
    if args.encodings:
        encoding_main(args, preset)
        return
    if args.aggregations:
        aggregation_main(args, preset)
        return
    if args.rounds is not None:
        parser.error("--rounds is for trying --encodings (it would overwrite the preset's results)")
    default_methods = preset.get("methods", ",".join(METHOD_ORDER))
    args.methods = args.methods or default_methods
    if args.render_only:
        record = json.loads((ROOT / "bench" / "results" / f"accuracy-{args.preset}.json").read_text())
        publish(record, args.workers)
        return
    jobs = [(m, s, seed) for seed in preset["seeds"] for s in args.schemes.split(",") for m in args.methods.split(",")]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    out = args.out or ROOT / "bench" / "results" / f"accuracy-{args.preset}.json"
    partial = args.partial or out.with_name(out.stem + ".partial.jsonl")
    start = time.perf_counter()
    runs = run_jobs(
        [(m, s, seed, "float32", None) for m, s, seed in jobs], partial, preset, args.data_dir, args.workers
    )
    rows = summarize(runs)
    command = f"just bench-accuracy --preset {args.preset}"
    if args.methods != default_methods:
        command += f" --methods {args.methods}"
    if args.schemes != "iid,dirichlet":
        command += f" --schemes {args.schemes}"
    if args.seeds:
        command += f" --seeds {args.seeds}"
    if args.out:
        command += f" --out {args.out}"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "preset": args.preset,
        "settings": preset,
        "commit": commit,
        "command": command,
        "minutes": round((time.perf_counter() - start) / 60, 1),
        "workers": args.workers,
        "runs": sorted(runs, key=lambda r: (r["seed"], r["scheme"], METHOD_ORDER.index(r["method"]))),
        "summary": rows,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    partial.unlink()  # the record holds every run now; a next run starts afresh
    publish(record, args.workers, write_docs=args.out is None)


AGGREGATIONS = ("exact", "robust")


def aggregation_main(args: argparse.Namespace, preset: dict[str, Any]) -> None:
    """``--aggregations``: the preset's protocol with each NeFedAvg mode, side by side (same data, partition,
    initial weights and client draws per seed). Runs are interleaved mode by mode, so that an interrupted
    benchmark leaves pairs; ``--render-only`` renders what the record, or else the partial file, holds."""
    from bench.common import write_section

    modes = [a for a in args.aggregations.split(",") if a]
    if not modes or any(a not in AGGREGATIONS for a in modes):
        raise SystemExit(f"--aggregations takes a comma-separated subset of {', '.join(AGGREGATIONS)}")
    if preset.get("protocol") != "paper":
        raise SystemExit("--aggregations runs under the paper protocol: use --preset paper (or paper-smoke)")
    methods = (args.methods or "nefl-wd").split(",")
    schemes = args.schemes.split(",")
    out = args.out or ROOT / "bench" / "results" / f"accuracy-{args.preset}-robust.json"
    partial = args.partial or out.with_name(out.stem + ".partial.jsonl")
    command = (
        f"python -m bench.accuracy --preset {args.preset} --aggregations {','.join(modes)} "
        f"--methods {','.join(methods)} --schemes {args.schemes} --seeds {','.join(map(str, preset['seeds']))} "
        f"--workers {args.workers} --out {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}"
    )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    if args.render_only:  # the partial file while the benchmark runs (its runs are written to --out), else --out
        if not partial.exists():
            record = json.loads(out.read_text())
        else:
            runs = [json.loads(line) for line in partial.read_text().splitlines() if line.strip()]
            record = {"preset": args.preset, "settings": preset, "commit": commit, "command": command}
            record |= {"minutes": None, "workers": args.workers, "aggregations": modes, "runs": runs}
            total = len(modes) * len(methods) * len(schemes) * len(preset["seeds"])
            record["note"] = f"Partial: {len(runs)} of {total} runs finished."
    else:
        jobs = [(m, s, seed, "float32", a) for seed in preset["seeds"] for s in schemes for m in methods for a in modes]
        start = time.perf_counter()
        runs = run_jobs(jobs, partial, preset, args.data_dir, args.workers)
        record = {"preset": args.preset, "settings": preset, "commit": commit, "command": command}
        record |= {"minutes": round((time.perf_counter() - start) / 60, 1), "workers": args.workers}
        record |= {"aggregations": modes, "runs": runs}
    record["runs"] = sorted(
        record["runs"],
        key=lambda r: (r["seed"], r["scheme"], METHOD_ORDER.index(r["method"]), AGGREGATIONS.index(r["aggregation"])),
    )
    record["summary"] = summarize_aggregations(record["runs"])
    if not args.render_only or partial.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
    if not args.render_only:
        partial.unlink(missing_ok=True)
    text = render_aggregations(record)
    if out.resolve().parent == (ROOT / "bench" / "results").resolve():  # a trial elsewhere leaves the docs alone
        write_section("accuracy-robust", text)
    print(text)


def _scores(run: dict[str, Any]) -> tuple[float, float]:
    served = [a for a in run["tier_accuracy"] if a is not None]
    return min(served), sum(served) / len(served)


def summarize_aggregations(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (scheme, method, aggregation): worst and average tier accuracy per seed and over seeds, and for a
    mode other than exact the per-seed difference to the exact run of the same seed (only seeds that have
    both)."""
    by = {(r["scheme"], r["method"], r["aggregation"], r["seed"]): r for r in runs}
    rows = []
    for scheme, method, mode in sorted(
        {(r["scheme"], r["method"], r["aggregation"]) for r in runs},
        key=lambda k: (k[0], METHOD_ORDER.index(k[1]), AGGREGATIONS.index(k[2])),
    ):
        seeds = sorted(seed for (sc, m, a, seed) in by if (sc, m, a) == (scheme, method, mode))
        scores = {seed: _scores(by[scheme, method, mode, seed]) for seed in seeds}
        row: dict[str, Any] = {"scheme": scheme, "method": method, "aggregation": mode, "seeds": seeds}
        row["per_seed"] = {str(seed): {"worst": w, "average": a} for seed, (w, a) in scores.items()}
        row["worst"] = _stat([w for w, _ in scores.values()])
        row["average"] = _stat([a for _, a in scores.values()])
        paired = [seed for seed in seeds if (scheme, method, "exact", seed) in by]
        if mode != "exact" and paired:
            exact = {seed: _scores(by[scheme, method, "exact", seed]) for seed in paired}
            row["delta_worst"] = _stat([scores[s][0] - exact[s][0] for s in paired])
            row["delta_average"] = _stat([scores[s][1] - exact[s][1] for s in paired])
            row["paired_seeds"] = paired
        rows.append(row)
    return rows


def render_aggregations(record: dict[str, Any]) -> str:
    preset, rows = record["settings"], record["summary"]
    seeds = sorted({seed for r in rows for seed in r["seeds"]})
    lines = [
        f"## Robust vs exact NeFedAvg on honest runs: accuracy, preset `{record['preset']}`",
        "",
        "Every client honest; the coordinator aggregates with exact NeFedAvg or with robust NeFedAvg "
        '(`aggregation = "robust"`, core/robust.py, its default options: clip at 2x the median update norm, '
        "agreement with the median of the others (an update below 0 and a 3-MAD outlier left out), weights "
        "capped at 2x the median, trimmed mean of 25 % per side). Everything else is the accuracy benchmark's "
        "paper protocol: "
        f"{preset['rounds']} rounds, {preset['epochs']} local epochs, 100 devices, 10 a round, a seeded "
        f"{preset.get('train_samples')}-sample training subset, {preset['test_samples']} test samples; the two "
        "modes of a seed share data, partition, initial weights and client draws.",
        "",
        "Accuracy (%) of the worst and the average served tier: per seed, then mean ± spread (population "
        "standard deviation) over the seeds that finished. Δ: robust minus exact, per seed, mean ± spread.",
        "",
        f"Produced by `{record['command']}` at commit `{record['commit']}`"
        + (f", {record['minutes']} min with {record['workers']} worker(s)." if record.get("minutes") else "."),
        "",
    ]
    for scheme in sorted({r["scheme"] for r in rows}):
        lines += [f"**{scheme}**", ""]
        lines.append(
            "| method | aggregation | "
            + " | ".join(f"seed {s} worst / avg" for s in seeds)
            + " | worst | average | Δ worst | Δ average |"
        )
        lines.append("|---|---|" + "---|" * (len(seeds) + 4))
        for r in (r for r in rows if r["scheme"] == scheme):
            cells = [
                f"{100 * r['per_seed'][str(s)]['worst']:.1f} / {100 * r['per_seed'][str(s)]['average']:.1f}"
                if str(s) in r["per_seed"]
                else "not run"
                for s in seeds
            ]
            lines.append(
                f"| {r['method']} | {r['aggregation']} | "
                + " | ".join(cells)
                + f" | {_fmt(r['worst'])} | {_fmt(r['average'])} | {_delta(r.get('delta_worst'))} | "
                f"{_delta(r.get('delta_average'))} |"
            )
        lines.append("")
    if record.get("note"):
        lines += [record["note"], ""]
    return "\n".join(lines)


def publish(record: dict[str, Any], workers: int, write_docs: bool = True) -> None:
    from bench.common import write_section

    rows = summarize(record["runs"])
    text = render(rows, record["preset"], record["settings"], record["commit"], record["command"])
    text += curves(record["runs"])
    text += f"\nWall time: {record['minutes']} min with {record.get('workers', workers)} worker process(es).\n"
    if record.get("note"):
        text += f"\n{record['note']}\n"
    if write_docs:
        write_section(f"accuracy-{record['preset']}", text)
    print(text)


def update_bytes(method: str, preset: dict[str, Any], encodings: list[str]) -> dict[str, list[int]]:
    """Bytes of one update of each submodel of ``method`` as a device publishes it (the safetensors body of
    ``encode_update``'s tensors), per encoding. The sizes depend on the tensors' shapes only."""
    from nefl_edge.coordinator.models import initial_consistent
    from nefl_edge.coordinator.strategies import get_strategy
    from nefl_edge.core.encoding import encode_update
    from nefl_edge.core.nested import extract, init_global_state
    from nefl_edge.core.specs import get_model_config
    from nefl_edge.core.wire import pack_tensors

    network = (
        paper_config(method, 0, preset).network()
        if preset.get("protocol") == "paper"
        else get_model_config("resnet-small", "fmnist")
    )
    config, plan = get_strategy(method).setup(network, GAMMAS)
    state = init_global_state(config, plan.specs, initial_consistent(config, 0), 0)
    sizes: dict[str, list[int]] = {e: [] for e in encodings}
    for k in range(len(plan.specs)):
        sent = extract(state, k)
        for e in encodings:
            sizes[e].append(len(pack_tensors(encode_update(sent, e, sent), keep_dtype=True)))
    return sizes


def _with_float32(encodings: list[str]) -> list[str]:
    return ["float32", *[e for e in encodings if e != "float32"]]


def _reference(
    args: argparse.Namespace, preset: dict[str, Any], jobs: set[tuple[str, str, int]]
) -> Optional[dict[str, Any]]:
    """The committed float32 record of ``args.preset`` if it ran these jobs with these settings, else None."""
    path = ROOT / "bench" / "results" / f"accuracy-{args.preset}.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    same = {k: v for k, v in record["settings"].items() if k not in ("methods", "seeds")} == {
        k: v for k, v in preset.items() if k not in ("methods", "seeds")
    }
    runs = [r for r in record["runs"] if (r["method"], r["scheme"], r["seed"]) in jobs]
    if not same or len(runs) != len(jobs):
        return None
    return {"source": f"bench/results/accuracy-{args.preset}.json", "commit": record["commit"], "runs": runs}


def encoding_main(args: argparse.Namespace, preset: dict[str, Any]) -> None:
    """``--encodings``: the preset's protocol with each update encoding, against float32."""
    from bench.common import RESULTS, write_json
    from nefl_edge.core.encoding import ENCODINGS

    encodings = [e for e in args.encodings.split(",") if e]
    unknown = [e for e in encodings if e not in ENCODINGS]
    if unknown:
        raise SystemExit(f"unknown encoding(s) {unknown}; use {', '.join(ENCODINGS)}")
    methods = (args.methods or preset.get("methods", "nefl-wd")).split(",")
    schemes = args.schemes.split(",")
    base = {(m, s, seed) for seed in preset["seeds"] for s in schemes for m in methods}
    trial = args.preset != "paper" or args.rounds is not None
    name = "accuracy-encoding" + (f"-{args.preset}-r{preset['rounds']}" if trial else "")
    if args.render_only:  # sizes and summary are derived: computed afresh
        record = json.loads((RESULTS / f"{name}.json").read_text())
        record["update_bytes"] = {m: update_bytes(m, preset, _with_float32(record["encodings"])) for m in methods}
        record["summary"] = summarize_encodings(record)
        (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=1))  # keeps the run's environment
        publish_encoding(record, write_docs=not trial)
        return
    reference = None if "float32" in encodings else _reference(args, preset, base)
    run_encodings = encodings if reference else _with_float32(encodings)
    jobs = [(m, s, seed, e, None) for seed in preset["seeds"] for s in schemes for e in run_encodings for m in methods]
    partial = args.partial or RESULTS / f"{name}.partial.jsonl"
    start = time.perf_counter()
    runs = run_jobs(jobs, partial, preset, args.data_dir, args.workers)
    command = (
        f"python -m bench.accuracy --encodings {args.encodings} --methods {','.join(methods)} --schemes {args.schemes}"
    )
    command += f" --seeds {','.join(map(str, preset['seeds']))} --workers {args.workers}"
    if args.preset != "paper":
        command += f" --preset {args.preset}"
    if args.rounds is not None:
        command += f" --rounds {args.rounds}"
    ref_runs = reference["runs"] if reference else [r for r in runs if r.get("encoding", "float32") == "float32"]
    record = {
        "preset": args.preset,
        "settings": preset,
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
        "command": command,
        "minutes": round((time.perf_counter() - start) / 60, 1),
        "workers": args.workers,
        "encodings": encodings,
        "reference": (
            {"source": reference["source"], "commit": reference["commit"]}
            if reference
            else {"source": "float32 runs of this benchmark, side by side"}
        ),
        "update_bytes": {m: update_bytes(m, preset, _with_float32(encodings)) for m in methods},
        "runs": sorted(
            (r for r in runs if r.get("encoding", "float32") != "float32"),
            key=lambda r: (r["seed"], r["scheme"], METHOD_ORDER.index(r["method"]), r["encoding"]),
        ),
        "reference_runs": sorted(ref_runs, key=lambda r: (r["seed"], r["scheme"], METHOD_ORDER.index(r["method"]))),
    }
    record["summary"] = summarize_encodings(record)
    committed = _reference(args, preset, base) if not reference else None
    if committed:  # float32 ran here although a committed record has these runs: how far apart are they?
        record["committed_float32"] = {
            "source": committed["source"],
            "commit": committed["commit"],
            "summary": [
                {k: r[k] for k in ("scheme", "method", "worst", "average")} for r in summarize(committed["runs"])
            ],
        }
    write_json(name, record)
    partial.unlink(missing_ok=True)
    publish_encoding(record, write_docs=not trial)


def summarize_encodings(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (scheme, method, encoding): tier/worst/average accuracy over seeds, the per-seed difference to the
    float32 run of the same seed (mean ± spread), and bytes per update against float32."""
    reference = {(r["scheme"], r["method"], r["seed"]): r for r in record["reference_runs"]}
    runs = [{**r, "encoding": "float32"} for r in record["reference_runs"]] + record["runs"]
    rows = []
    for row in summarize([r for r in runs if r["encoding"] == "float32"]):
        rows.append({**row, "encoding": "float32"})
    for encoding in [e for e in record["encodings"] if e != "float32"]:
        for row in summarize([r for r in runs if r["encoding"] == encoding]):
            group = [
                r
                for r in runs
                if r["encoding"] == encoding and (r["scheme"], r["method"]) == (row["scheme"], row["method"])
            ]
            deltas: dict[str, list[float]] = {"worst": [], "average": []}
            for r in group:
                ref = reference.get((r["scheme"], r["method"], r["seed"]))
                if ref is None:
                    continue
                mine = [a for a in r["tier_accuracy"] if a is not None]
                theirs = [a for a in ref["tier_accuracy"] if a is not None]
                deltas["worst"].append(min(mine) - min(theirs))
                deltas["average"].append(sum(mine) / len(mine) - sum(theirs) / len(theirs))
            rows.append(
                {
                    **row,
                    "encoding": encoding,
                    "delta_worst": _stat(deltas["worst"]) if deltas["worst"] else None,
                    "delta_average": _stat(deltas["average"]) if deltas["average"] else None,
                }
            )
    for row in rows:
        sizes = record["update_bytes"][row["method"]]
        row["bytes_ratio"] = sum(sizes[row["encoding"]]) / sum(sizes["float32"])
    order = ["float32", *ENCODING_ORDER]
    return sorted(rows, key=lambda r: (r["scheme"], METHOD_ORDER.index(r["method"]), order.index(r["encoding"])))


ENCODING_ORDER = ["float16", "int8"]


def _delta(stat: Optional[dict[str, float]]) -> str:
    if stat is None:
        return "—"
    return f"{100 * stat['mean']:+.1f} ± {100 * stat['std']:.1f}"


def render_encodings(record: dict[str, Any]) -> str:
    preset, rows = record["settings"], record["summary"]
    reference = record["reference"]
    ref_text = (
        f"float32 is the committed `{reference['source']}` (commit `{reference['commit']}`, the same settings and "
        "seeds; the float32 path is unchanged by this option)"
        if "commit" in reference
        else "float32 ran side by side in this benchmark"
    )
    sizes = {m: v for m, v in record["update_bytes"].items()}
    lines = [
        f"## Update encodings: accuracy cost, preset `{record['preset']}`",
        "",
        "Devices send their trained tensors as float32, float16, or int8 deltas against the weights they "
        "received (`train.update_encoding`, edge_client/encoding.py); the in-process grid applies the same "
        "encode -> decode round trip to every update, so everything else is the run of the accuracy "
        f"benchmark: {preset['rounds']} rounds, {preset['epochs']} local epochs, 100 devices, 10 a round"
        + (
            f", a seeded {preset['train_samples']}-sample training subset, the paper's protocol"
            if preset.get("train_samples")
            else ""
        )
        + f", {preset['test_samples']} test samples, seeds {preset['seeds']}. {ref_text}.",
        "",
        "Accuracy (%) of each tier's model, worst and average over tiers: mean ± spread over seeds. Δ: the "
        "per-seed difference to the float32 run of the same seed (same data, partition and initial weights), "
        "mean ± spread, in points. Bytes/update: the published update body (safetensors of the encoded "
        "tensors) summed over the submodels, against float32 ("
        + "; ".join(
            f"{m}: float32 {sum(v['float32']) / 5 / 1e3:.0f} kB per update on average" for m, v in sizes.items()
        )
        + "; the ratios exceed 0.5 and 0.25 by the body's header of tensor names and shapes, which int8's "
        "per-tensor scales double).",
        "",
        f"Produced by `{record['command']}` at commit `{record['commit']}`.",
        "",
    ]
    for scheme in sorted({r["scheme"] for r in rows}):
        lines += [f"**{scheme}**", ""]
        lines.append(
            "| method | encoding | bytes/update vs float32 | "
            + " | ".join(f"g={g}" for g in GAMMAS)
            + " | worst | average | Δ worst | Δ average |"
        )
        lines.append("|---|---|---|" + "---|" * (len(GAMMAS) + 4))
        for r in (r for r in rows if r["scheme"] == scheme):
            cells = [_fmt(t) for t in r["tiers"]]
            lines.append(
                f"| {r['method']} | {r['encoding']} | {r['bytes_ratio']:.3f} | "
                + " | ".join(cells)
                + f" | {_fmt(r['worst'])} | {_fmt(r['average'])} | {_delta(r.get('delta_worst'))} | "
                f"{_delta(r.get('delta_average'))} |"
            )
        lines.append("")
    committed = record.get("committed_float32")
    if committed:
        here = {(r["scheme"], r["method"]): r for r in rows if r["encoding"] == "float32"}
        lines.append(
            f"float32 runs against the committed `{committed['source']}` (commit `{committed['commit']}`), "
            "worst / average: "
            + "; ".join(
                f"{c['method']} {c['scheme']} {_fmt(here[c['scheme'], c['method']]['worst'])} / "
                f"{_fmt(here[c['scheme'], c['method']]['average'])} here, "
                f"{_fmt(c['worst'])} / {_fmt(c['average'])} there"
                for c in committed["summary"]
            )
            + "."
        )
        lines.append("")
    lines.append(
        f"Wall time: {record['minutes']} min with {record['workers']} worker process(es) for "
        f"{len(record['runs']) + (0 if 'commit' in reference else len(record['reference_runs']))} runs."
    )
    return "\n".join(lines)


def publish_encoding(record: dict[str, Any], write_docs: bool = True) -> None:
    from bench.common import write_section

    text = render_encodings(record)
    if write_docs:
        write_section("accuracy-encoding", text)
    print(text)


if __name__ == "__main__":
    main()
