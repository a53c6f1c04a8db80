"""Soak: mixed traffic through a `sigv4proxy serve` process for a bounded time, with credentials
rotating, upstream GOAWAYs injected and Lattice's connection limits shortened; reports counts,
failures by reason, the simulators' connection closes (the reconnects they forced), RSS and fds.

Set-up (all on 127.0.0.1): the Lattice simulator (re-verifies every signature; keys the
credentials endpoint issues are registered with it as they are issued) with its idle close and
maximum connection age shortened (`--sim-idle-timeout`, default 5 s, and
`--sim-max-connection-age`, default 30 s, against Lattice's 60 and 600; the proxy's own idle timeout
and connection age scaled the same way below them, as its defaults of 50 and 570 s sit below
Lattice's: `--proxy-defaults` keeps the proxy's defaults instead, so the simulator closes first),
a second "quiet" simulator with the same limits, a
container-credentials endpoint handing out 2-minute keys (the proxy refreshes them on its own
schedule, about every 30-60 s), a tiny h2c upstream that verifies nothing and sends GOAWAY every N
streams per connection (requests above last_stream_id are ignored: the proxy must retry them), and
the proxy as a subprocess. Traffic: `--concurrency` workers (default 32) looping over GET, small
POST and 1 MiB POST to the simulator over h2c, GET and PUT to it over HTTP/1.1 (only idempotent
methods there: a request on a pooled HTTP/1.1 connection the simulator is closing can only be
replayed if it is idempotent, while over h2 a GOAWAY says what was not processed), and GET
through the GOAWAY upstream; plus one client per protocol to the quiet simulator, pausing about
the idle timeout between requests, so requests meet connections closed while idle and being
closed. `--tls` puts the simulator behind TLS (a throwaway trustme CA), so large uploads are read
off the client's socket instead of spliced.

Pass: no failure other than ones attributable to an injected fault, the simulators' limits met at
least once when they are on, RSS growth < 10 % and no fd growth (beyond a small pool-churn
slack) between the end of warm-up and the end of traffic. Exit status 0 on pass, 1 on fail.
`make soak` (10 min; SOAK_SECONDS or --seconds to shorten).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import pathlib
import random
import socket
import subprocess
import sys
import tempfile
import time

import aiohttp
import h2.config
import h2.connection
import h2.events
import h2.exceptions
from hyperframe.frame import GoAwayFrame

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from bench_upstream import tls_material  # noqa: E402
from support.creds_server import CredsServer  # noqa: E402

from sigv4proxy.sim.identities import identity_from_dict  # noqa: E402
from sigv4proxy.sim.server import SimConfig, start_simulator  # noqa: E402

HOST = "svc-0123456789abcdef0.7d67968.vpc-lattice-svcs.us-west-2.on.aws"
PRINCIPAL = "arn:aws:sts::111122223333:assumed-role/soak-app/sigv4proxy"
MiB = 1 << 20
FD_SLACK = 8  # upstream connections come and go (GOAWAY rotation, the simulators' limits)
INJECTED = {"upstream_refused"}  # what a GOAWAY may still surface as once retries run out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_stats(pid: int) -> tuple[int, int]:
    """(RSS in KiB, open fds) of a process, from /proc."""
    rss = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


# --- an h2c upstream that sends GOAWAY every N streams -----------------------------------------
class GoawayUpstream:
    def __init__(self, every: int) -> None:
        self.every = every
        self.port = 0
        self.goaways = 0
        self.served = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()  # the handlers see EOF and end
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        served, last_id, open_streams = 0, None, set()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                try:
                    events = conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    return
                out = b""
                for event in events:
                    if isinstance(event, h2.events.RequestReceived):
                        if last_id is not None and event.stream_id > last_id:
                            continue  # after GOAWAY: never processed; the client retries it
                        open_streams.add(event.stream_id)
                        served += 1
                        if served % self.every == 0:
                            last_id = event.stream_id
                        if event.stream_ended is not None:
                            self._answer(conn, event.stream_id, open_streams)
                    elif isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                        if event.stream_ended is not None and event.stream_id in open_streams:
                            self._answer(conn, event.stream_id, open_streams)
                out += conn.data_to_send()
                if last_id is not None and not getattr(writer, "_goaway_sent", False):
                    frame = GoAwayFrame(0)
                    frame.last_stream_id = last_id
                    out += frame.serialize()
                    writer._goaway_sent = True  # type: ignore[attr-defined]
                    self.goaways += 1
                writer.write(out)
                await writer.drain()
                if last_id is not None and not open_streams:
                    return  # every processed stream answered: close, as servers do after GOAWAY
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()
            self._writers.discard(writer)
            self._tasks.discard(task)

    def _answer(self, conn, stream_id: int, open_streams: set[int]) -> None:
        body = b'{"upstream":"goaway"}'
        try:
            conn.send_headers(stream_id, [(b":status", b"200"), (b"content-length", str(len(body)).encode())])
            conn.send_data(stream_id, body, end_stream=True)
        except h2.exceptions.ProtocolError:
            pass
        open_streams.discard(stream_id)
        self.served += 1


# --- the soak ------------------------------------------------------------------------------------
class Tally:
    def __init__(self) -> None:
        self.sent = 0
        self.ok = 0
        self.failed: collections.Counter[str] = collections.Counter()
        self.injected: collections.Counter[str] = collections.Counter()


async def one(session: aiohttp.ClientSession, base: str, method: str, path: str, body: bytes | None,
              tally: Tally) -> None:
    tally.sent += 1
    try:
        async with session.request(method, base + path, data=body, headers={"Host": HOST},
                                   timeout=aiohttp.ClientTimeout(total=30)) as resp:
            payload = await resp.read()
            if resp.status == 200:
                if body is not None and json.loads(payload)["body_length"] != len(body):
                    tally.failed["body length mismatch"] += 1
                else:
                    tally.ok += 1
                return
            kind = resp.headers.get("x-sigv4proxy-error") or f"status {resp.status}"
            bucket = tally.injected if path.startswith("/goaway/") and kind in INJECTED else tally.failed
            bucket[f"{method} {path} {kind}"] += 1
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        tally.failed[f"{method} {path} {type(exc).__name__}"] += 1


async def worker(session: aiohttp.ClientSession, base: str, deadline: float, tally: Tally, rng: random.Random,
                 big: bytes) -> None:
    small = b"s" * 1024
    while time.monotonic() < deadline:
        pick = rng.random()
        if pick < 0.4:
            method, path, body = "GET", "/get", None
        elif pick < 0.6:
            method, path, body = "POST", "/small", small
        elif pick < 0.7:
            method, path, body = "POST", "/big", big
        elif pick < 0.8:
            method, path, body = "GET", "/h1/get", None
        elif pick < 0.85:
            method, path, body = "PUT", "/h1/put", small
        else:
            method, path, body = "GET", "/goaway/x", None
        await one(session, base, method, path, body, tally)


async def quiet_worker(session: aiohttp.ClientSession, base: str, prefix: str, deadline: float, idle: float,
                       tally: Tally, rng: random.Random) -> None:
    """One request at a time, pausing about the idle timeout: before, on and after the close."""
    while time.monotonic() < deadline:
        await one(session, base, "GET", f"{prefix}/get", None, tally)
        await asyncio.sleep(min(idle * rng.uniform(0.9, 1.1), max(0.0, deadline - time.monotonic())))


async def soak(args: argparse.Namespace) -> int:
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="sigv4proxy-soak-"))
    tls_files = tls_material(workdir) if args.tls else None  # (cert, key, CA)
    if args.tls and tls_files is None:
        print("--tls needs trustme (make venv installs it)", file=sys.stderr)
        return 1
    limits = {"idle_timeout": args.sim_idle_timeout, "max_connection_age": args.sim_max_connection_age}
    sim = await start_simulator(SimConfig(host="127.0.0.1", port=0, policy=None, identities={"identities": []},
                                          tls_cert=str(tls_files[0]) if tls_files else None,
                                          tls_key=str(tls_files[1]) if tls_files else None, **limits))
    quiet = await start_simulator(SimConfig(host="127.0.0.1", port=0, policy=None, identities={"identities": []},
                                            **limits))
    sims = {"main": sim, "quiet": quiet}

    class RegisteringCreds(CredsServer):
        def _new_key(self, *, expired: bool):
            key = super()._new_key(expired=expired)
            for each in sims.values():  # the simulators learn each key as it is issued
                each.app.identities._by_key[key.access_key] = identity_from_dict({
                    "access_key_id": key.access_key, "secret_access_key": key.secret_key,
                    "session_token": key.token, "principal": PRINCIPAL}, "soak")
            return key

    creds = await RegisteringCreds(lifetime=args.key_lifetime).start()
    goaway = GoawayUpstream(args.goaway_every)
    await goaway.start()
    port, admin = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k.lower() not in ("http_proxy", "https_proxy")}
    env.update(creds.env())
    env.update({"AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": str(workdir / "none"),
                "AWS_CONFIG_FILE": str(workdir / "none"), "AWS_REGION": "us-west-2", "NO_PROXY": "127.0.0.1"})
    command = [sys.executable, "-m", "sigv4proxy", "serve", "--listen", f"127.0.0.1:{port}",
               "--admin", f"127.0.0.1:{admin}", "--upstream", f"{'https' if tls_files else 'http'}://127.0.0.1:{sim.port}",
               "--upstream-protocol", "h2", "--log-level", "warning",
               "--route", f"/goaway=http://127.0.0.1:{goaway.port},protocol=h2,sign_host={HOST},name=goaway",
               "--route", f"/h1={'https' if tls_files else 'http'}://127.0.0.1:{sim.port},protocol=http1,"
                          f"sign_host={HOST},name=h1"]
    for protocol in ("h2", "http1"):
        command += ["--route", f"/quiet-{protocol}=http://127.0.0.1:{quiet.port},protocol={protocol},"
                               f"sign_host={HOST},name=quiet-{protocol}"]
    if tls_files:
        command += ["--ca-bundle", str(tls_files[2])]
    if not args.proxy_defaults:  # ours below Lattice's, as 50 s and 570 s are below 60 s and 600 s
        if args.sim_idle_timeout > 0:
            command += ["--idle-timeout", f"{args.sim_idle_timeout * 50 / 60:.3f}"]
        if args.sim_max_connection_age > 0:
            command += ["--max-connection-age", f"{args.sim_max_connection_age * 570 / 600:.3f}"]
    log_path = workdir / "proxy.log"
    proxy = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(log_path, "w"))
    tally = Tally()
    verdict = 1
    try:
        clients = args.concurrency + 2  # the busy workers and one quiet client per protocol
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
            for _ in range(200):  # up to 20 s to become ready
                try:
                    async with session.get(f"http://127.0.0.1:{admin}/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            else:
                print("proxy never became ready; log:", log_path.read_text()[-2000:], file=sys.stderr)
                return 1
            base = f"http://127.0.0.1:{port}"
            big = os.urandom(MiB)
            started = time.monotonic()
            warmup = min(30.0, args.seconds * 0.1)
            end = started + args.seconds
            rng = random.Random(7)
            workers = [asyncio.create_task(worker(session, base, end, tally, random.Random(rng.random()), big))
                       for _ in range(args.concurrency)]
            if args.sim_idle_timeout > 0:
                workers += [asyncio.create_task(quiet_worker(session, base, f"/quiet-{protocol}", end,
                                                             args.sim_idle_timeout, tally, random.Random(rng.random())))
                            for protocol in ("h2", "http1")]
            await asyncio.sleep(warmup)
            rss0, fds0 = proc_stats(proxy.pid)
            keys0 = len(creds.issued)
            print(f"after {warmup:.0f} s warm-up: proxy RSS {rss0} KiB, fds {fds0}", flush=True)
            await asyncio.gather(*workers)
            rss1, fds1 = proc_stats(proxy.pid)
            elapsed = time.monotonic() - started
        rotations = len(creds.issued) - keys0
        growth = (rss1 - rss0) / rss0
        report = {
            "seconds": round(elapsed, 1), "concurrency": args.concurrency, "sent": tally.sent,
            "succeeded": tally.ok, "rps": round(tally.sent / elapsed, 1),
            "failed": dict(tally.failed), "injected_fault_failures": dict(tally.injected),
            "keys_issued": len(creds.issued), "rotations_after_warmup": rotations,
            "goaways_sent": goaway.goaways, "goaway_upstream_connections": goaway.connections,
            "sim_limits": limits,
            "sim_connection_closes": {name: each.close_counts() for name, each in sims.items()},
            # every connection after the first per route and protocol is a reconnect, whoever
            # closed the one before (the simulator at its limits, or the proxy retiring first)
            "sim_connections_accepted": {name: each.accepted for name, each in sims.items()},
            "sim_records_kept": len(sim.records),  # the simulator keeps the last 10 000
            "rss_kib": [rss0, rss1], "rss_growth_pct": round(100 * growth, 2), "fds": [fds0, fds1],
        }
        print(json.dumps(report, indent=2))
        problems = []
        if tally.failed:
            problems.append(f"{sum(tally.failed.values())} failures not caused by an injected fault")
        if growth >= 0.10:
            problems.append(f"RSS grew {100 * growth:.1f} % (limit 10 %)")
        if fds1 > fds0 + FD_SLACK:
            problems.append(f"open fds grew {fds0} -> {fds1}")
        if goaway.goaways == 0:
            problems.append("no GOAWAY was injected")
        if any(limits.values()) and sum(each.accepted for each in sims.values()) <= len(sims) * 2:
            problems.append("no reconnect: the connection limits were never met")
        verdict = 1 if problems else 0
        print("FAIL: " + "; ".join(problems) if problems else "PASS")
        return verdict
    finally:
        proxy.terminate()
        try:
            proxy.wait(30)
        except subprocess.TimeoutExpired:
            proxy.kill()
        await goaway.stop()
        await creds.stop()
        for each in sims.values():
            await each.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", "600")))
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--key-lifetime", type=float, default=120.0, help="seconds each issued key lives")
    parser.add_argument("--goaway-every", type=int, default=200, help="streams per upstream connection before GOAWAY")
    parser.add_argument("--sim-idle-timeout", type=float, default=5.0,
                        help="the simulators close a connection idle this long, s (Lattice: 60; 0: off)")
    parser.add_argument("--proxy-defaults", action="store_true",
                        help="keep the proxy's own idle timeout and connection age (50 s, 570 s) instead of "
                             "scaling them below the simulator's: the simulator then closes first")
    parser.add_argument("--sim-max-connection-age", type=float, default=30.0,
                        help="the simulators retire every connection this old, s (Lattice: 600; 0: off)")
    parser.add_argument("--tls", action="store_true",
                        help="the simulator over TLS (h2 by ALPN): large uploads take the read-for-TLS path")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(soak(args))


if __name__ == "__main__":
    sys.exit(main())
