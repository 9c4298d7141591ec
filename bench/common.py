"""What every benchmark shares: where results go, the docs section writer, the summary row that ``just
bench`` prints last, and side-by-side timing (interleaved runs, medians)."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs" / "benchmarks.md"


@dataclass(frozen=True)
class SummaryRow:
    """One figure of the summary table: ``value`` is a ratio to ``peer`` (or a limit) measured in the same
    run; ``target`` is the issue's target for that ratio (None: reported only); ``higher_is_better`` says
    which side of the target passes."""

    area: str
    figure: str
    value: float
    peer: str
    target: Optional[float] = None
    higher_is_better: bool = True
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "-"
        ok = self.value >= self.target if self.higher_is_better else self.value <= self.target
        return "met" if ok else "missed"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def environment() -> dict[str, Any]:
    import os

    return {
        "commit": commit(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def write_json(name: str, record: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` (with the environment and commit) and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **record}, indent=1, default=_jsonable))
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_section(name: str, text: str, path: Path = DOCS) -> None:
    """Replace the section between ``<!-- name:begin -->`` and ``<!-- name:end -->`` of docs/benchmarks.md
    (or append it)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    old = (
        path.read_text()
        if path.exists()
        else "# Benchmarks\n\nEvery number here was written by the command it names.\n"
    )
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)


def interleaved(contenders: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each callable, run A B C A B C ... ``repeats`` times after ``warmup`` rounds, so
    that load on this shared machine hits every contender alike."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def summary_table(rows: Sequence[SummaryRow]) -> str:
    """The Markdown table ``just bench`` prints last and writes to the summary section."""
    lines = ["| area | figure | ratio | measured against | target | verdict | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        target = "-" if r.target is None else ("≥ " if r.higher_is_better else "≤ ") + f"{r.target:g}"
        lines.append(f"| {r.area} | {r.figure} | {r.value:.3g} | {r.peer} | {target} | {r.verdict} | {r.note} |")
    return "\n".join(lines)
