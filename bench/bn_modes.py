"""Benchmark: the three BatchNorm modes (``--bn tracked | federated | server``) on short runs.

Same harness as ``nefl-coord simulate``: NeFL-WD, resnet-small, 100 devices holding an IID split of
Fashion-MNIST's training set, 10 % a round, the five gammas on equal shares of the devices, 1 local epoch;
every submodel is evaluated on 2000 test samples every ``eval_every`` rounds. Only ``bn`` differs between
the arms (``server`` re-estimates on 500 further held-out test images; ``federated`` on up to 512 training
samples of each of the round's devices). Runs go to a process pool (one torch thread each). Writes
bench/results/bn-modes.json and the bn-modes section of docs/benchmarks.md.

    python -m bench.bn_modes                      # 10 rounds, seed 0 (~30 min on 2 busy cores)
    python -m bench.bn_modes --rounds 2 --seeds 0 # a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

MODES = ("tracked", "federated", "server")
GAMMAS = (0.2, 0.4, 0.6, 0.8, 1.0)


def one_run(mode: str, seed: int, rounds: int, eval_every: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from nefl_edge.coordinator.config import RunConfig
    from nefl_edge.coordinator.evaluation import held_out
    from nefl_edge.coordinator.partition import make_partitioner, split_dataset
    from nefl_edge.coordinator.simulate import simulate
    from nefl_edge.core.data import load_dataset

    cfg = RunConfig(
        gammas=list(GAMMAS), rounds=rounds, fraction=0.1, seed=seed, policy="static", min_clients=1,
        bn=mode, evaluation="test", eval_every=eval_every, eval_background=False,
    )  # fmt: skip
    train, test_all = load_dataset(None, "train"), load_dataset(None, "test")
    shards = split_dataset(train, make_partitioner("iid", 100, 0.5, seed).split(train.y))
    test, calibration = held_out(test_all, 2000, cfg.bn_calibration if mode == "server" else 0)
    started = time.perf_counter()
    result = simulate(cfg, shards, [i % 5 for i in range(100)], test, calibration, threads=1)
    return {
        "mode": mode,
        "seed": seed,
        "rounds": result.rounds,
        "accuracy": result.accuracy,
        "seconds": time.perf_counter() - started,
    }


def section(runs: list[dict[str, Any]], rounds: int, eval_every: int, command: str) -> str:
    lines = [
        "## BatchNorm modes (bn-modes)",
        "",
        f"`{command}`: NeFL-WD, resnet-small, Fashion-MNIST IID over 100 devices, 10 a round, 1 local epoch, "
        f"{rounds} rounds, gammas {', '.join(map(str, GAMMAS))}; accuracy (%) of every submodel on 2000 test "
        "samples. Mean over seeds (each seed's value in brackets). Seconds per run are on a 2-core machine "
        "shared with other jobs (loaded); federated re-estimation here ran on the round's 10 devices, each on "
        "the submodel it trained (up to 512 samples), so a submodel none of them could run keeps its statistics.",
        "",
        "| bn | needs coordinator data | worst | average | worst over the rounds (" + f"every {eval_every}) | s/run |",
        "|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        if not mine:
            continue
        worst = [100 * min(r["accuracy"][-1]) for r in mine]
        avg = [100 * statistics.mean(r["accuracy"][-1]) for r in mine]
        curve = [statistics.mean(100 * min(r["accuracy"][i]) for r in mine) for i in range(len(mine[0]["rounds"]))]
        points = " ".join(f"{rnd}: {w:.1f}" for rnd, w in zip(mine[0]["rounds"], curve))
        lines.append(
            f"| {mode} | {'yes' if mode == 'server' else 'no'} | {statistics.mean(worst):.1f} "
            f"({' / '.join(f'{w:.1f}' for w in worst)}) | {statistics.mean(avg):.1f} "
            f"({' / '.join(f'{a:.1f}' for a in avg)}) | {points} | "
            f"{statistics.mean(r['seconds'] for r in mine):.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    from bench.common import RESULTS, write_json, write_section

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--append", action="store_true", help="keep the runs of bench/results/bn-modes.json")
    parser.add_argument("--redo", default="", help="with --append: modes to run again even where recorded")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(m, s) for s in seeds for m in args.modes.split(",")]
    runs: list[dict[str, Any]] = []
    if args.append and (RESULTS / "bn-modes.json").is_file():
        previous = json.loads((RESULTS / "bn-modes.json").read_text())
        redo = set(args.redo.split(","))
        runs = [r for r in previous["runs"] if r["mode"] not in redo and r["rounds"][-1] == args.rounds]
        jobs = [j for j in jobs if j not in {(r["mode"], r["seed"]) for r in runs}]
    with ProcessPoolExecutor(args.workers) as pool:
        futures = [pool.submit(one_run, mode, seed, args.rounds, args.eval_every) for mode, seed in jobs]
        for future in as_completed(futures):
            r = future.result()
            runs.append(r)
            accuracy = [round(100 * a, 1) for a in r["accuracy"][-1]]
            print(r["mode"], r["seed"], r["rounds"], accuracy, f"{r['seconds']:.0f} s", flush=True)
    runs.sort(key=lambda r: (r["seed"], MODES.index(r["mode"])))
    seeds_run = ",".join(str(s) for s in sorted({r["seed"] for r in runs}))
    command = f"python -m bench.bn_modes --rounds {args.rounds} --eval-every {args.eval_every} --seeds {seeds_run}"
    write_json("bn-modes", {"command": command, "runs": runs})
    if args.rounds >= 5:
        write_section("bn-modes", section(runs, args.rounds, args.eval_every, command))


if __name__ == "__main__":
    main()
