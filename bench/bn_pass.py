"""Benchmark: one round's ``bn = federated`` statistics pass in simulation, the part of an evaluation round
that ``simulate`` spends on the clients' BatchNorm statistics (``RoundEngine.evaluation_step``).

The round of the issue-24 job: ``fedavg-full``'s full ``resnet-small``, 10 clients of 600 Fashion-MNIST samples
(an IID split over 100), each on up to ``bn_device_samples`` = 512 of them in batches of 32 (16 batches). The
pass runs through the grid ``simulate`` uses: ``InProcessGrid`` (the coordinator's process, 1 PyTorch thread)
and, with ``--workers N``, ``ParallelGrid`` (N worker processes, 1 thread each; started and warmed up before
timing). Prints one JSON line per measurement: CPU seconds of this process (serial only: a pool's work is in
its workers) and wall seconds.

    python -m bench.bn_pass --repeats 3 --workers 2

To compare with an older tree: ``git archive <commit> | tar -x -C DIR`` and run this file with
``PYTHONPATH=DIR/core:DIR/coordinator:DIR/edge_client:DIR/export`` (an older ``ParallelGrid`` without an
``evaluate`` of its own runs the pass in the coordinator's process).
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="also time ParallelGrid with this many processes")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from nefl_edge.coordinator.grid import EvalRequest, InProcessGrid
    from nefl_edge.coordinator.models import initial_consistent
    from nefl_edge.coordinator.partition import make_partitioner, split_dataset
    from nefl_edge.coordinator.strategies import get_strategy
    from nefl_edge.core.data import load_dataset
    from nefl_edge.core.nested import init_global_state
    from nefl_edge.core.specs import get_model_config

    strategy = get_strategy("fedavg-full")
    config, plan = strategy.setup(get_model_config("resnet-small"), (1.0,))
    state = init_global_state(config, plan.specs, initial_consistent(config, 0), 0)
    train = load_dataset(None, "train")
    shards = split_dataset(train, make_partitioner("iid", 100, 0.5, 0).split(train.y))[:10]
    names = [f"client-{i:03d}" for i in range(10)]
    grids = {"serial": InProcessGrid(dict(zip(names, shards)), {n: 0 for n in names}, strategy.local_train)}
    if args.workers:
        from nefl_edge.coordinator.simulate import ParallelGrid
        from nefl_edge.coordinator.training_options import TorchOptions

        pool = ParallelGrid(
            dict(zip(names, shards)), {n: 0 for n in names}, strategy.name, TorchOptions(), args.workers, 1
        )
        grids[f"pool-{args.workers}"] = pool
    requests = [EvalRequest(n, (0,), False, True, 0.0, 32, 16) for n in names]
    for grid in grids.values():  # warm-up: worker start, imports, first model build
        list(grid.evaluate(1, state, requests[: max(1, args.workers)]))
    for repeat in range(args.repeats):
        for name, grid in grids.items():
            cpu, wall = time.process_time(), time.perf_counter()
            batches = sum(o.bn_batches.get(0, 0) for o in grid.evaluate(1, state, requests))
            row = {"grid": name, "repeat": repeat, "wall_s": round(time.perf_counter() - wall, 2), "batches": batches}
            if name == "serial":
                row["cpu_s"] = round(time.process_time() - cpu, 2)
            print(json.dumps(row), flush=True)
    for grid in grids.values():
        getattr(grid, "close", lambda: None)()


if __name__ == "__main__":
    main()
