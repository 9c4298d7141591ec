"""Hardware in the loop on real boards over SSH (``NEFL_HIL_HOSTS=hosts.toml``; skipped when not configured)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.hil.boards import Boards, hosts_file, not_configured_reason
from tests.hil.fleet import assignments, read_jsonl, run_dir

pytestmark = [pytest.mark.hil, pytest.mark.integration]


@pytest.fixture
def boards(tmp_path: Path, fmnist_dir: Path):  # type: ignore[no-untyped-def]
    reason = not_configured_reason()
    if reason is not None:
        pytest.skip(reason)
    path = hosts_file()
    assert path is not None
    with Boards(path, tmp_path) as b:
        yield b


def test_real_boards_train_two_rounds_with_the_deadline_policy(boards: Boards) -> None:
    # Prepare
    deadline = 60.0
    boards.start_all("hil-boards")

    # Execute
    coord = boards.spawn_coordinator(
        "--run", "hil-boards", "--policy", "deadline", "--rounds", "2", "--min-clients", str(len(boards.boards)),
        "--deadline-s", str(deadline), "--gammas", "0.2,0.6,1.0", "--eval-samples", "500", "--wait-clients-s", "600",
    )  # fmt: skip
    assert coord.wait(1800) == 0, boards.log()[-3000:]
    boards.collect_logs()

    # Assert: every board's update was aggregated in every round, and a faster board (by the throughput it
    # measured and reported) never got a smaller submodel than a slower one.
    out = run_dir(boards.workdir / "runs", "hil-boards")
    assert out is not None
    rounds = [r for r in read_jsonl(out / "metrics.jsonl") if r["round"] > 0 and r["submodel"] == 0]
    assert len(rounds) == 2 and all(r["updates"] == r["selected"] == len(boards.boards) for r in rounds), rounds
    speed = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"client (\S+) joined \(.*?([0-9.]+) samples/s\)", boards.log())
    }
    for nodes in assignments(out, boards.log()).values():
        ranked = sorted(nodes, key=lambda n: speed.get(n, 0.0))
        given = [nodes[n] for n in ranked]
        assert given == sorted(given), (nodes, speed)
