"""``just bench``: every performance benchmark in one run, then the summary table.

Each suite is a module of this package with ``run(quick: bool) -> list[SummaryRow]``; it writes its own
``bench/results/<name>.json`` and docs/benchmarks.md section. The summary (every figure a ratio to its peer
or limit, measured side by side in the same run) is printed last and written to the ``summary`` section.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from bench.common import SummaryRow, commit, summary_table, write_json, write_section

SUITES = ("device", "aggregation", "wire", "coordinator")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="just bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("suites", nargs="*", help=f"suites to run (default all: {', '.join(SUITES)})")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and sizes (a smoke run, not for the docs)")
    args = parser.parse_args(argv)
    rows: list[SummaryRow] = []
    started = time.monotonic()
    for name in args.suites or SUITES:
        print(f"== bench {name}", flush=True)
        t0 = time.monotonic()
        rows += importlib.import_module(f"bench.{name}").run(args.quick)
        print(f"== bench {name}: {time.monotonic() - t0:.0f} s", flush=True)
    table = summary_table(rows)
    total = time.monotonic() - started
    if not args.quick and not args.suites:
        write_json("summary", {"seconds": total, "rows": rows})
        write_section(
            "summary",
            f"## Summary of `just bench`\n\nAt commit `{commit()}`, {total / 60:.1f} min on this machine. "
            "Every figure is a ratio to the peer or limit named beside it, measured in the same run.\n\n" + table,
        )
    print(f"\nSummary ({total / 60:.1f} min):\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
