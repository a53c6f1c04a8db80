"""Results of `make bench`: one row per (target, case), ratios to the direct baseline, outputs.

Owns: the Row record, ratio arithmetic, the Markdown table, bench.json and the PNG chart. It must
never present a run with errors (non-2xx, socket errors, failed preflight) as a number to compare:
such rows are flagged and their figures are kept out of the table's ratios and the chart.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Row:
    target: str  # e.g. "direct-h1", "proxy-w2-h2", "peer:go"
    case: str  # e.g. "POST 4KiB c32"
    tool: str  # "wrk" or "h2load"
    baseline: str | None  # target whose same-case row the ratios divide by (None: is a baseline)
    requests: int = 0
    rps: float = 0.0
    p50_us: float = 0.0
    p99_us: float = 0.0
    non_2xx: int = 0
    socket_errors: int = 0
    cpu_us_per_req: float | None = None
    peak_rss_kib: int | None = None  # the process tree's, summed
    largest_process_rss_kib: int | None = None  # one process's (the fullest worker)
    problem: str = ""  # why this row is not a valid measurement ("" when it is)
    ratios: dict[str, float | None] = field(default_factory=dict)

    @property
    def valid(self) -> bool:
        return not self.problem and self.requests > 0 and self.non_2xx == 0 and self.socket_errors == 0

    @property
    def check(self) -> str:
        if self.problem:
            return f"FLAGGED: {self.problem}"
        if self.non_2xx or self.socket_errors:
            return (f"FLAGGED: {self.non_2xx} non-2xx, {self.socket_errors} socket errors "
                    f"of {self.requests}")
        if self.requests == 0:
            return "FLAGGED: no requests completed"
        return "ok"


RATIO_FIELDS = ("rps", "p99_us", "cpu_us_per_req", "peak_rss_kib")


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base <= 0:
        return None
    return value / base


def compute_ratios(rows: list[Row]) -> None:
    """Fill each row's ratios against its baseline row of the same case (both must be valid)."""
    index = {(r.target, r.case): r for r in rows}
    for row in rows:
        row.ratios = {}
        base = index.get((row.baseline, row.case)) if row.baseline else None
        if base is None or not base.valid or not row.valid:
            continue
        for name in RATIO_FIELDS:
            row.ratios[name] = ratio(getattr(row, name), getattr(base, name))


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _times(row: Row, name: str) -> str:
    if row.baseline is None:
        return "base" if row.valid else "—"
    value = row.ratios.get(name)
    return "—" if value is None else f"×{value:.2f}"


HEADER = ("| target | case | RPS | RPS vs direct | p50 ms | p99 ms | p99 vs direct | CPU µs/req "
          "| CPU vs direct | peak RSS MiB | RSS vs direct | largest process MiB | check |")


def markdown_table(rows: list[Row]) -> str:
    """One Markdown table. Flagged rows show no figures: a failing run is never 'fast'."""
    lines = [HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"]
    for row in rows:
        if row.valid:
            cells = [
                f"{row.rps:,.0f}", _times(row, "rps"),
                f"{row.p50_us / 1000:.2f}", f"{row.p99_us / 1000:.2f}", _times(row, "p99_us"),
                _num(row.cpu_us_per_req, ".0f"), _times(row, "cpu_us_per_req"),
                _num(None if row.peak_rss_kib is None else row.peak_rss_kib / 1024, ".1f"),
                _times(row, "peak_rss_kib"),
                _num(None if row.largest_process_rss_kib is None else
                     row.largest_process_rss_kib / 1024, ".1f"),
            ]
        else:
            cells = ["✗"] + ["—"] * 9
        lines.append("| " + " | ".join([row.target, row.case, *cells, row.check]) + " |")
    return "\n".join(lines)


def peer_comparisons(rows: list[Row]) -> list[dict]:
    """Each proxy row against each peer's row of the same case, from the same run: how many times
    the peer's RPS, and its p99, CPU per request and peak RSS (both rows must be valid)."""
    valid = {(r.target, r.case): r for r in rows if r.valid}
    peers = list(dict.fromkeys(r.target for r in rows if r.target.startswith("peer:")))
    out = []
    for peer in peers:
        for row in rows:
            other = valid.get((peer, row.case))
            if not row.target.startswith("proxy-") or other is None or not row.valid:
                continue
            ratios = {name: ratio(getattr(row, name), getattr(other, name))
                      for name in RATIO_FIELDS}
            out.append({"peer": peer, "target": row.target, "case": row.case, **ratios})
    return out


def peer_table(rows: list[Row]) -> str:
    """Per peer: cases down, our proxy targets across; a cell is 'RPS ×r, p99 ×q' against the peer
    ('' when no peer ran)."""
    comparisons = peer_comparisons(rows)
    if not comparisons:
        return ""
    blocks = []
    for peer in dict.fromkeys(c["peer"] for c in comparisons):
        mine = [c for c in comparisons if c["peer"] == peer]
        targets = list(dict.fromkeys(c["target"] for c in mine))
        cell = {(c["target"], c["case"]): c for c in mine}
        lines = [f"Against `{peer}` (same run; RPS and p99 as multiples of the peer's):", "",
                 "| case | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
        for case in dict.fromkeys(c["case"] for c in mine):
            cells = []
            for target in targets:
                c = cell.get((target, case))
                cells.append("—" if c is None else
                             f"RPS ×{_num(c['rps'], '.2f')}, p99 ×{_num(c['p99_us'], '.2f')}")
            lines.append(f"| {case} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def write_json(path: Path, meta: dict, rows: list[Row]) -> None:
    records = []
    for row in rows:
        record = asdict(row)
        record["valid"] = row.valid
        record["check"] = row.check
        records.append(record)
    path.write_text(json.dumps({"meta": meta, "rows": records, "vs_peers": peer_comparisons(rows)},
                               indent=2) + "\n")


def write_chart(path: Path, rows: list[Row], title: str) -> str | None:
    """RPS and p99 per case, one bar per target; returns why no chart was drawn, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib, or the `bench` extra)"
    valid = [r for r in rows if r.valid]
    if not valid:
        return "no valid rows to chart"
    cases = list(dict.fromkeys(r.case for r in rows))
    targets = list(dict.fromkeys(r.target for r in rows))
    index = {(r.target, r.case): r for r in valid}
    width = 0.8 / max(1, len(targets))
    fig, (ax_rps, ax_p99) = plt.subplots(2, 1, figsize=(max(8, 1.3 * len(cases)), 8), sharex=True)
    for i, target in enumerate(targets):
        xs = [c + i * width for c in range(len(cases))]
        rps = [index[(target, case)].rps if (target, case) in index else 0 for case in cases]
        p99 = [index[(target, case)].p99_us / 1000 if (target, case) in index else 0 for case in cases]
        ax_rps.bar(xs, rps, width, label=target)
        ax_p99.bar(xs, p99, width, label=target)
    ax_rps.set_ylabel("requests/s (log)")
    ax_rps.set_yscale("log")  # direct and proxied rates differ by 10x or more
    ax_p99.set_ylabel("p99 latency (ms, log)")
    ax_p99.set_yscale("log")
    ax_p99.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))], cases, rotation=30, ha="right")
    ax_rps.legend(fontsize="small", ncol=2)
    ax_rps.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
