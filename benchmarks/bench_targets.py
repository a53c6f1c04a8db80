"""Issue 28's round-two targets, judged from the rows of one `make bench` run.

Owns: the targets (which of our rows, against which row, in which cases, with which bounds),
what each says was measured and whether it was met, and their Markdown table. It must never
judge from a flagged row or from a figure that is not in the run: a target whose rows did not
run says "not run" and why.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench_load import GET, ONE_CPU_CASES, POST_1M, POST_4K, Case
from bench_report import (
    H2C_INBOUND,
    INBOUND_TARGET,
    ONE_CPU_MARK,
    POOLED_GO,
    SHIPPED_GO,
    TLS_GO,
    TLS_OURS,
    Row,
    inbound_comparisons,
    ms,
    num,
    ratio,
)

GET_C128, POST_4K_C128, POST_1M_C128 = (Case(w, 128).label for w in (GET, POST_4K, POST_1M))


@dataclass(frozen=True)
class AgainstGo:
    """Ours at least `rps` times a Go row's RPS in `case`, at most `cpu_us` CPU per request."""

    what: str
    ours: str
    go: str
    case: str
    rps: float
    cpu_us: float | None = None
    goal_rps: float | None = None
    goal_cpu_us: float | None = None

    @property
    def text(self) -> str:
        text = f"{self.what}, {self.case}: `{self.ours}` ≥ {self.rps:g}× `{self.go}`'s RPS"
        if self.cpu_us is not None:
            text += f", ≤ {self.cpu_us:g} µs CPU/req"
        if self.goal_rps is not None:
            text += f" (goal ≥ {self.goal_rps:g}×, ≤ {self.goal_cpu_us:g} µs)"
        return text


AGAINST_GO = (
    *(AgainstGo("HTTP/1.1 upstream", "proxy-w2-h1", POOLED_GO, c, 1.5, 50, 2.0, 40) for c in (GET_C128, POST_4K_C128)),
    # Go has no h2c client: ours over h2c against it over HTTP/1.1, as the issue measured.
    *(AgainstGo("h2c upstream", "proxy-w2-h2", POOLED_GO, c, 1.8, 45, 2.2, 45) for c in (GET_C128, POST_4K_C128)),
    *(AgainstGo("TLS h2 upstream", TLS_OURS, TLS_GO, c, 1.5) for c in (GET_C128, POST_4K_C128)),
)
ONE_CPU_OURS = ("proxy-1cpu-h1", "proxy-1cpu-h2")
ONE_CPU_GO = POOLED_GO + ONE_CPU_MARK
FIRST_ROUND = ("proxy-w2-h1", SHIPPED_GO, (GET_C128, POST_4K_C128, POST_1M_C128))


@dataclass(frozen=True)
class Verdict:
    target: str  # what the issue asks, with the rows compared
    measured: str
    met: str  # "yes", "no: what fell short", "not run: why", "not all run: why"
    goal_met: str = "—"  # the same against the goal, where the issue sets one


class _Rows:
    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows
        self.valid = {(r.target, r.case): r for r in rows if r.valid}

    def why_not(self, target: str, case: str) -> str:
        """Why `target` has no valid row for `case`: absent from the run, skipped or flagged as
        its row says (without the case when the whole target was skipped for one reason)."""
        mine = [r for r in self.rows if r.target == target]
        row = next((r for r in mine if r.case == case), None)
        if row is None:
            return f"no {target} row for {case} in this run" if mine else f"no {target} rows in this run"
        reason = row.problem if row.problem.startswith("skipped") else row.check
        if len({r.problem for r in mine}) == 1 and row.problem:
            return f"{target} {reason}"
        return f"{target} {case} {reason}"

    def pair(self, ours: str, other: str, case: str) -> tuple[Row, Row] | str:
        """Both valid rows of `case`, or why not."""
        a, b = self.valid.get((ours, case)), self.valid.get((other, case))
        if a is not None and b is not None:
            return a, b
        return "; ".join(self.why_not(t, case) for t, r in ((ours, a), (other, b)) if r is None)


def _met(measured: list[str], failures: list[str], missing: list[str]) -> str:
    """The verdict of a target with several parts: `failures` among those `measured`, and the
    reasons of those `missing`."""
    missing = list(dict.fromkeys(missing))  # a target that did not run is named once
    if not measured:
        return "not run: " + "; ".join(missing)
    if not failures:
        return "not all run: " + "; ".join(missing) if missing else "yes"
    return "no: " + ", ".join(failures) + ("; not run: " + "; ".join(missing) if missing else "")


def _bounds(rps_ratio: float, cpu: float | None, rps: float, cpu_us: float | None) -> str:
    """ "yes" when the RPS ratio reaches `rps` and the CPU per request stays within `cpu_us`."""
    failures = [] if rps_ratio >= rps else ["RPS"]
    if cpu_us is not None and (cpu is None or cpu > cpu_us):
        failures.append("CPU")
    return "no: " + ", ".join(failures) if failures else "yes"


def _against_go(t: AgainstGo, rows: _Rows) -> Verdict:
    pair = rows.pair(t.ours, t.go, t.case)
    if isinstance(pair, str):
        return Verdict(t.text, "—", f"not run: {pair}", "—" if t.goal_rps is None else "not run")
    ours, go = pair
    r = ratio(ours.rps, go.rps) or 0.0
    measured = f"RPS ×{r:.2f} ({ours.rps:,.0f} against {go.rps:,.0f})"
    if t.cpu_us is not None:
        measured += f", CPU {num(ours.cpu_us_per_req, '.0f')} µs/req"
    goal = "—" if t.goal_rps is None else _bounds(r, ours.cpu_us_per_req, t.goal_rps, t.goal_cpu_us)
    return Verdict(t.text, measured, _bounds(r, ours.cpu_us_per_req, t.rps, t.cpu_us), goal)


def _inbound(rows: _Rows) -> list[Verdict]:
    """h2c into the proxy against HTTP/1.1 into it, per set-up and streams per connection, in
    every case the h2c target ran."""
    compared = inbound_comparisons(rows.rows)
    out = []
    for target, h1_target, streams in H2C_INBOUND:
        measured, failures, missing = [], [], []
        done = {c["case"]: c for c in compared if c["target"] == target}
        for case in dict.fromkeys(r.case for r in rows.rows if r.target == target):
            c = done.get(case)
            if c is None:  # the h2c row or the HTTP/1.1 row of its case did not run
                missing.append(rows.why_not(target if (target, case) not in rows.valid else h1_target, case))
                continue
            r = c["cpu_ratio"]
            measured.append(
                f"{case} ×{num(r, '.2f')} ({num(c['h2c_cpu_us_per_req'], '.0f')} "
                f"against {c['h1_cpu_us_per_req']:.0f} µs)"
            )
            if r is None or r > INBOUND_TARGET:
                failures.append(case)
        if not measured and not missing:
            missing.append(rows.why_not(target, ""))
        where = ", one worker on one CPU" if ONE_CPU_MARK in target else ""
        text = (
            f"Inbound h2c, {streams} stream{'s' if streams > 1 else ''} per connection{where}: "
            f"`{target}` CPU/req within {INBOUND_TARGET:g}× of `{h1_target}`'s (HTTP/1.1 in)"
        )
        out.append(Verdict(text, "; ".join(measured) or "—", _met(measured, failures, missing)))
    return out


def _p99_below(
    rows: _Rows,
    ours: str,
    theirs: str,
    cases: list[tuple[str, str]],
    measured: list[str],
    failures: list[str],
    missing: list[str],
) -> None:
    """Per (case label, name): `ours`'s p99 against `theirs`'s, into the verdict's lists."""
    for label, name in cases:
        pair = rows.pair(ours, theirs, label)
        if isinstance(pair, str):
            missing.append(pair)
            continue
        a, b = pair
        measured.append(f"{name} {ms(a.p99_us)} against {ms(b.p99_us)} ms")
        if a.p99_us >= b.p99_us:
            failures.append(name)


def load_side_bound(row: Row, theirs: Row | None) -> str:
    """Why a constant-rate row of ours measured the load side rather than the server ("" when it
    did not): its control (the rate loader straight to the upstream at the same rate, on the same
    CPUs, no proxy) could not hold that rate, or was itself no faster than `theirs`'s whole path."""
    if row.offered_rps is None or row.load_side_rps is None:
        return ""  # no control ran: judged as measured
    alone = f"the load side alone (no proxy) at {row.offered_rps:,.0f} RPS"
    if not row.load_side_rps:
        return f"{alone} failed"
    if row.load_side_rps < 0.97 * row.offered_rps:
        return f"{alone} reached only {row.load_side_rps:,.0f}"
    if theirs is not None and row.load_side_p99_us is not None and row.load_side_p99_us >= theirs.p99_us:
        return f"{alone} read p99 {ms(row.load_side_p99_us)} ms"
    return ""


def _rate_p99_below(
    rows: _Rows, ours: str, case: str, name: str, measured: list[str], failures: list[str], missing: list[str]
) -> None:
    """A constant-rate case: `ours`'s p99 below the one-CPU Go row's, judged only where the load
    side could hold the rate without the proxy (else: not judged, with the control's figures)."""
    mine = next((r for r in rows.rows if r.target == ours and r.case == case), None)
    theirs = rows.valid.get((ONE_CPU_GO, case))
    pair = rows.pair(ours, ONE_CPU_GO, case)
    bound = load_side_bound(mine, theirs) if mine is not None else ""
    if isinstance(pair, str):
        missing.append(f"{name} not judged: {bound}" if bound and theirs is not None else pair)
        return
    a, b = pair
    measured.append(f"{name} {ms(a.p99_us)} against {ms(b.p99_us)} ms")
    if a.p99_us >= b.p99_us:
        if bound:
            missing.append(f"{name} not judged: {bound}")
        else:
            failures.append(name)


def _one_cpu(rows: _Rows) -> list[Verdict]:
    """One worker on one CPU against the pooled Go sidecar on one CPU: the closed-loop maximum
    above Go's, p99 at each constant rate (a share of each one's own maximum) below Go's."""
    closed, *rated = ONE_CPU_CASES
    out = []
    for ours in ONE_CPU_OURS:
        measured, failures, missing = [], [], []
        pair = rows.pair(ours, ONE_CPU_GO, closed.label)
        if isinstance(pair, str):
            missing.append(pair)
        else:
            a, b = pair
            measured.append(
                f"max ({closed.label}) {a.rps:,.0f} against {b.rps:,.0f} RPS (×{num(ratio(a.rps, b.rps), '.2f')})"
            )
            if a.rps <= b.rps:
                failures.append("max RPS")
        for case in rated:
            _rate_p99_below(rows, ours, case.label, f"p99 at {case.rate_of_max:.0%}", measured, failures, missing)
        text = (
            f"One worker on one CPU: `{ours}` max RPS above `{ONE_CPU_GO}`'s, p99 at "
            + " and ".join(f"{c.rate_of_max:.0%}" for c in rated)
            + " of each one's max below Go's"
        )
        out.append(Verdict(text, "; ".join(measured) or "—", _met(measured, failures, missing)))
    return out


def _first_round(rows: _Rows) -> Verdict:
    ours, go, cases = FIRST_ROUND
    measured: list[str] = []
    failures: list[str] = []
    missing: list[str] = []
    _p99_below(rows, ours, go, [(case, case) for case in cases], measured, failures, missing)
    text = f"First round kept: `{ours}` p99 below `{go}`'s (as shipped) at c128"
    return Verdict(text, "; ".join(measured) or "—", _met(measured, failures, missing))


def verdicts(rows: list[Row]) -> list[Verdict]:
    """One line per target of issue 28, in the issue's order."""
    index = _Rows(rows)
    return [_against_go(t, index) for t in AGAINST_GO] + _inbound(index) + _one_cpu(index) + [_first_round(index)]


def targets_table(rows: list[Row]) -> str:
    lines = ["| target | measured | met | goal met |", "|---|---|---|---|"]
    for v in verdicts(rows):
        lines.append(f"| {v.target} | {v.measured} | {v.met} | {v.goal_met} |")
    return "\n".join(lines)
