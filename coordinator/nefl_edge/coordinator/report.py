"""Metrics on disk (``metrics.jsonl``) and the run report: a PNG of per-submodel accuracy over rounds and
an HTML page that shows it with the final table."""

from __future__ import annotations

import html
from collections import defaultdict
from pathlib import Path
from typing import Any

from nefl_edge.coordinator.records import Records, final_rows, summary


def write_report(run_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Records(run_dir)
    records = run.metrics()
    curves: dict[int, list[tuple[int, float]]] = defaultdict(list)
    federated: dict[int, list[tuple[int, float]]] = defaultdict(list)  # beside the test set's numbers
    gammas: dict[int, float] = {}
    for r in records:
        curves[r["submodel"]].append((r["round"], r["accuracy"]))
        if r.get("evaluated_by") == "test" and r.get("fed_accuracy") is not None:
            federated[r["submodel"]].append((r["round"], r["fed_accuracy"]))
        gammas[r["submodel"]] = r["gamma"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for sub, points in sorted(curves.items()):
        points.sort()
        ax.plot(
            [p[0] for p in points],
            [100 * p[1] for p in points],
            marker="o",
            label=f"submodel {sub} (gamma {gammas[sub]:.2f})",
        )
    for sub, points in sorted(federated.items()):
        points.sort()
        ax.plot([p[0] for p in points], [100 * p[1] for p in points], ls="--", lw=1, label=f"submodel {sub}, devices")
    ax.set_xlabel("round (0 = before training)")
    by_devices = any(r.get("evaluated_by") == "federated" for r in records)
    ax.set_ylabel("accuracy on the devices' held-out data (%)" if by_devices else "test accuracy (%)")
    ax.set_title(f"NeFL run {run_dir.name}: accuracy of every submodel")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    png = run_dir / "report.png"
    fig.savefig(png)
    plt.close(fig)

    rows = final_rows(records)
    stats = summary(rows)
    table = "".join(
        f"<tr><td>{r['submodel']}</td><td>{r['gamma']:.2f}</td><td>{100 * r['accuracy']:.2f}</td>"
        f"<td>{r.get('evaluated_by', 'test')}</td><td>{_federated_cell(r)}</td></tr>"
        for r in rows
    )
    stat_rows = "".join(f"<tr><th colspan=2>{k}</th><td>{100 * v:.2f}</td></tr>" for k, v in stats.items())
    rounds = _rounds_section(records, run.clients())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>NeFL run {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:4px 12px;text-align:right}}</style></head><body>
<h1>NeFL run {html.escape(run_dir.name)}</h1><img src="report.png" alt="per-submodel accuracy over rounds">
<h2>Accuracy after the last round</h2><table><tr><th>submodel</th><th>gamma</th><th>accuracy (%)</th>
<th>evaluated by</th><th>devices' held-out data: accuracy (%), samples, devices</th></tr>
{table}{stat_rows}</table>{rounds}
<p>Per-round numbers: <code>metrics.jsonl</code>, per client: <code>clients.jsonl</code>;
configuration: <code>config.json</code>.</p>
</body></html>"""
    out = run_dir / "report.html"
    out.write_text(page)
    return out


def _federated_cell(row: dict[str, Any]) -> str:
    if row.get("fed_accuracy") is None:
        return "-"
    return f"{100 * row['fed_accuracy']:.2f}, {row['fed_samples']}, {row['fed_devices']}"


def _rounds_section(records: list[dict[str, Any]], clients: list[dict[str, Any]]) -> str:
    """Per round: which client trained which submodel (and how it ended), untrained submodels, durations."""
    by_round: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for c in clients:
        by_round[c["round"]].append(c)
    first = {r["round"]: r for r in records if r["submodel"] == 0}
    untrained: dict[int, list[int]] = defaultdict(list)
    for r in records:
        if r.get("untrained"):
            untrained[r["round"]].append(r["submodel"])
    lines = []
    for rnd in sorted(k for k in first if k > 0):
        row = first[rnd]
        who = ", ".join(
            f"{html.escape(c['node'])}&rarr;{c['submodel']}" + ("" if c["status"] == "updated" else f" ({c['status']})")
            for c in sorted(by_round[rnd], key=lambda c: c["node"])
        )
        phases = ", ".join(f"{k} {v:.1f}" for k, v in row.get("phases", {}).items())
        lines.append(
            f"<tr><td>{rnd}</td><td style='text-align:left'>{who}</td><td>{row.get('declined', 0)}</td>"
            f"<td>{row.get('dropped', 0)}</td><td>{sum(row.get('rejected', {}).values())}</td>"
            f"<td>{' '.join(map(str, untrained[rnd])) or '-'}</td><td>{row.get('seconds', 0):.1f}</td>"
            f"<td style='text-align:left'>{phases}</td></tr>"
        )
    if not lines:
        return ""
    head = (
        "<h2>Rounds</h2><table><tr><th>round</th><th>client &rarr; submodel</th><th>declined</th><th>dropped</th>"
        "<th>rejected</th><th>untrained submodels</th><th>seconds</th><th>where the time went (s)</th></tr>"
    )
    return head + "".join(lines) + "</table>"
