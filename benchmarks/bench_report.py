"""Results of `make bench`: one row per (target, case), ratios, the tables, the outputs.

Owns: the Row record, ratio arithmetic (to the direct baseline, to the `nginx-proxy` floor, to
each peer, inbound h2c to inbound HTTP/1.1), the Markdown tables, bench.json and the PNG chart.
It must never present a run with errors (non-2xx, socket errors, failed preflight) as a number to
compare: such rows are flagged and their figures are kept out of every ratio and the chart.
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
    offered_rps: float | None = None  # a constant-rate run: the rate asked for
    # its control: the rate loader straight to the upstream at that rate, no proxy (0.0: failed)
    load_side_rps: float | None = None
    load_side_p99_us: float | None = None
    ratios: dict[str, float | None] = field(default_factory=dict)
    ratios_to_floor: dict[str, float | None] = field(default_factory=dict)

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
FLOOR = "nginx-proxy"  # nginx as a plain keep-alive reverse proxy: the floor of a proxy hop
POOLED_GO = "peer:go-pooled"
SHIPPED_GO = "peer:go"
TLS_GO = "peer:go-pooled-tls"  # the pooled Go sidecar over TLS (h2 by ALPN)
TLS_OURS = "proxy-w2-h2tls"
# h2c clients into the proxy (h2load), the HTTP/1.1 clients (wrk) into the same set-up with the same
# requests, and streams per connection: two workers sharing the CPUs with the load, or one worker
# on a CPU of its own (the load on the other).
H2C_INBOUND = (("proxy-w2-h2in", "proxy-w2-h2", 1), ("proxy-w2-h2in-m16", "proxy-w2-h2", 16),
               ("proxy-1cpu-h2in", "proxy-1cpu-h2", 1))
GRPC_TARGETS = ("direct-grpc", "proxy-w2-grpc")
INBOUND_TARGET = 1.2  # h2c CPU per request at most this multiple of HTTP/1.1's
ONE_CPU_MARK = "-1cpu"  # in the name of a target limited to one CPU


def is_proxy(target: str) -> bool:
    return target.startswith(("proxy-", "peer:"))


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base <= 0:
        return None
    return value / base


def ratios_between(row: Row, base: Row | None) -> dict[str, float | None]:
    """RATIO_FIELDS of `row` over `base`; {} unless both are valid measurements."""
    if base is None or not base.valid or not row.valid:
        return {}
    return {name: ratio(getattr(row, name), getattr(base, name)) for name in RATIO_FIELDS}


def compute_ratios(rows: list[Row]) -> None:
    """Fill each row's ratios against its baseline row of the same case, and each proxy's (ours
    and the peers') against the floor's row of the same case (both rows must be valid)."""
    index = {(r.target, r.case): r for r in rows}
    for row in rows:
        row.ratios = ratios_between(row, index.get((row.baseline, row.case))) if row.baseline else {}
        row.ratios_to_floor = (ratios_between(row, index.get((FLOOR, row.case)))
                               if is_proxy(row.target) else {})


def num(value: float | None, fmt: str) -> str:
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
                num(row.cpu_us_per_req, ".0f"), _times(row, "cpu_us_per_req"),
                num(None if row.peak_rss_kib is None else row.peak_rss_kib / 1024, ".1f"),
                _times(row, "peak_rss_kib"),
                num(None if row.largest_process_rss_kib is None else
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
            # Constant-rate rows ran at each target's own rate: no yardstick for each other.
            if (not row.target.startswith("proxy-") or other is None or not row.valid
                    or row.offered_rps is not None):
                continue
            if peer == TLS_GO and row.target != TLS_OURS:  # over TLS: only ours over TLS
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
                             f"RPS ×{num(c['rps'], '.2f')}, p99 ×{num(c['p99_us'], '.2f')}")
            lines.append(f"| {case} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def ms(us: float) -> str:
    return f"{us / 1000:.2f}"


def go_yardstick(target: str) -> str | None:
    """The Go row a target's RPS is divided by in the summary: the pooled Go sidecar over the
    same upstream protocol where Go has it (over TLS for ours over TLS; over HTTP/1.1 for the
    rest, Go having no h2c client); None for the yardsticks themselves."""
    if target in (POOLED_GO, TLS_GO):
        return None
    return TLS_GO if target == TLS_OURS else POOLED_GO


def summary_table(rows: list[Row], cases: list[str]) -> str:
    """The few rows that define the field, for `cases`: the floor, Go as shipped, pooled and
    pooled over TLS, ours over HTTP/1.1, h2c and TLS; each with RPS against its Go yardstick and
    CPU against the floor ('' when none of them ran)."""
    valid = {(r.target, r.case): r for r in rows if r.valid}
    order = (FLOOR, SHIPPED_GO, POOLED_GO, TLS_GO, "proxy-w2-h1", "proxy-w2-h2", TLS_OURS)
    lines = []
    for case in cases:
        for target in order:
            row = valid.get((target, case))
            if row is None:
                continue
            yardstick = go_yardstick(target)
            go = (None if yardstick is None else
                  ratios_between(row, valid.get((yardstick, case))).get("rps"))
            floor = row.ratios_to_floor.get("cpu_us_per_req")
            lines.append(f"| {target} | {case} | {row.rps:,.0f} | {ms(row.p99_us)} | "
                         f"{num(row.cpu_us_per_req, '.0f')} | "
                         f"{'—' if go is None else f'×{go:.2f}'} | "
                         f"{'—' if floor is None else f'×{floor:.2f}'} |")
    if not lines:
        return ""
    return "\n".join([f"| target | case | RPS | p99 ms | CPU µs/req | RPS vs pooled Go ({TLS_OURS}: "
                      f"vs {TLS_GO}) | CPU vs nginx-proxy |", "|---|---|---|---|---|---|---|",
                      *lines])


def floor_table(rows: list[Row]) -> str:
    """Cases down, every proxy (ours and peers) across: 'RPS ×r, CPU ×c' against nginx-proxy."""
    mine = [r for r in rows if r.ratios_to_floor]
    if not mine:
        return ""
    targets = list(dict.fromkeys(r.target for r in mine))
    cell = {(r.target, r.case): r.ratios_to_floor for r in mine}
    lines = [f"Against `{FLOOR}`, nginx as a plain keep-alive reverse proxy (no signing), the "
             "floor of a proxy hop (same run; RPS and CPU µs per request as multiples of its):", "",
             "| case | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
    for case in dict.fromkeys(r.case for r in mine):
        cells = []
        for target in targets:
            c = cell.get((target, case))
            cells.append("—" if c is None else
                         f"RPS ×{num(c['rps'], '.2f')}, CPU ×{num(c['cpu_us_per_req'], '.2f')}")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def inbound_comparisons(rows: list[Row]) -> list[dict]:
    """Per pair and case that both ran: CPU per request of h2c clients into the proxy (1 and 16
    streams per connection) over that of HTTP/1.1 clients for the same requests."""
    valid = {(r.target, r.case): r for r in rows if r.valid}
    out = []
    for target, h1_target, streams in H2C_INBOUND:
        for case in dict.fromkeys(r.case for r in rows if r.target == target):
            h1, h2c = valid.get((h1_target, case)), valid.get((target, case))
            if h1 is None or h1.cpu_us_per_req is None or h2c is None:
                continue
            out.append({"case": case, "target": target, "h1_target": h1_target,
                        "streams_per_connection": streams,
                        "h1_rps": h1.rps, "h1_cpu_us_per_req": h1.cpu_us_per_req,
                        "h2c_rps": h2c.rps, "h2c_cpu_us_per_req": h2c.cpu_us_per_req,
                        "cpu_ratio": ratio(h2c.cpu_us_per_req, h1.cpu_us_per_req)})
    return out


def inbound_table(rows: list[Row]) -> str:
    """h2c into the proxy beside HTTP/1.1 into it, and the gRPC loop ('' when neither ran)."""
    blocks = []
    comparisons = inbound_comparisons(rows)
    if comparisons:
        lines = [f"Inbound h2c against inbound HTTP/1.1 (wrk into the same proxy with an h2c upstream: "
                 f"two workers sharing the CPUs with the load, or one worker on a CPU of its own; "
                 f"the h2c rows send the same requests at the same concurrency with h2load; "
                 f"target: CPU per request within ×{INBOUND_TARGET:.1f}):", "",
                 "| case | HTTP/1.1 in | RPS | CPU µs/req | h2c in | streams/conn | RPS | CPU µs/req "
                 "| CPU vs HTTP/1.1 in | within target |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for c in comparisons:
            r = c["cpu_ratio"]
            lines.append(f"| {c['case']} | {c['h1_target']} | {c['h1_rps']:,.0f} | "
                         f"{c['h1_cpu_us_per_req']:.0f} | "
                         f"{c['target']} | {c['streams_per_connection']} | {c['h2c_rps']:,.0f} | "
                         f"{num(c['h2c_cpu_us_per_req'], '.0f')} | "
                         f"{'—' if r is None else f'×{r:.2f}'} | "
                         f"{'—' if r is None else ('yes' if r <= INBOUND_TARGET else 'no')} |")
        blocks.append("\n".join(lines))
    grpc = [r for r in rows if r.target in GRPC_TARGETS]
    if grpc:
        lines = ["gRPC unary loop (grpcio client, one channel, calls in flight as the case says; "
                 "CPU per call of the measured server: the gRPC server for direct-grpc, the proxy "
                 "for proxy-w2-grpc):", "",
                 "| target | case | calls/s | p50 ms | p99 ms | CPU µs/call | check |",
                 "|---|---|---|---|---|---|---|"]
        for r in grpc:
            figures = ([f"{r.rps:,.0f}", ms(r.p50_us), ms(r.p99_us), num(r.cpu_us_per_req, ".0f")]
                       if r.valid else ["✗", "—", "—", "—"])
            lines.append("| " + " | ".join([r.target, r.case, *figures, r.check]) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _load_side(row: Row) -> str:
    """A constant-rate row's control: what the rate loader straight to the upstream achieved."""
    if row.load_side_rps is None:
        return "—"
    if not row.load_side_rps:
        return "failed"
    return f"{row.load_side_rps:,.0f}, {ms(row.load_side_p99_us or 0.0)}"


def one_cpu_table(rows: list[Row]) -> str:
    """Per target limited to one CPU: its closed-loop maximum, then offered and achieved rate and
    p99 at each constant rate, and the load side alone at that rate ('' when none ran)."""
    mine = [r for r in rows if ONE_CPU_MARK in r.target]
    if not mine:
        return ""
    rated = list(dict.fromkeys(r.case for r in mine if r.offered_rps is not None))
    head = ["target", "max: case", "RPS", "p99 ms", "CPU µs/req"]
    for case in rated:
        head += [f"{case}: offered → achieved RPS", "p99 ms", "load side alone: RPS, p99 ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for target in dict.fromkeys(r.target for r in mine):
        closed = next((r for r in mine if r.target == target and r.offered_rps is None), None)
        if closed is None:
            continue
        cells = ([closed.case, f"{closed.rps:,.0f}", ms(closed.p99_us),
                  num(closed.cpu_us_per_req, ".0f")] if closed.valid
                 else [closed.case, "✗", closed.check, "—"])
        for case in rated:
            r = next((x for x in mine if x.target == target and x.case == case), None)
            if r is None:  # a target measured at its maximum only
                cells += ["—", "—", "—"]
                continue
            if not r.valid:
                cells += [r.check, "—"]
            else:
                cells += [f"{r.offered_rps:,.0f} → {r.rps:,.0f}", ms(r.p99_us)]
            cells.append(_load_side(r))
        lines.append("| " + " | ".join([target, *cells]) + " |")
    return "\n".join(lines)


def write_json(path: Path, meta: dict, rows: list[Row], extra: dict | None = None) -> None:
    """Every row (with its check), the peer and inbound comparisons, and `extra` sections."""
    records = []
    for row in rows:
        record = asdict(row)
        record["valid"] = row.valid
        record["check"] = row.check
        records.append(record)
    path.write_text(json.dumps({"meta": meta, "rows": records, "vs_peers": peer_comparisons(rows),
                                "inbound_h2c_vs_h1": inbound_comparisons(rows), **(extra or {})},
                               indent=2) + "\n")


def write_chart(path: Path, rows: list[Row], title: str, cases: list[str]) -> str | None:
    """RPS and p99 per case of `cases` (the matrix every main target runs), one bar per target
    that ran them; returns why no chart was drawn, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib, or the `bench` extra)"
    rows = [r for r in rows if r.case in cases]
    valid = [r for r in rows if r.valid]
    if not valid:
        return "no valid rows to chart"
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
