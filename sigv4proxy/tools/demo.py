"""`sigv4proxy demo` (what `make run` runs): the proxy in front of a local Lattice simulator.

Owns: wiring the embedded default — simulator on 127.0.0.1:8081 (HTTP/1.1 and h2c) with the demo
identities and auth policy shipped in `sigv4proxy/demo/`, the proxy on 127.0.0.1:8080 (admin on
127.0.0.1:9901) with the demo identity's credentials and a route to the simulator over h2c.
Must never: reach beyond loopback, or use real AWS credentials (the demo keys are fake).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from importlib import resources

from sigv4proxy import config as config_mod
from sigv4proxy.runtime.logs import setup_logging

DEMO_HOST = "demo-svc-0123456789abcdef0.7d67968.vpc-lattice-svcs.us-west-2.on.aws"
DEMO_SERVICE_ARN = "arn:aws:vpc-lattice:us-west-2:111122223333:service/svc-0123456789abcdef0"
log = logging.getLogger("sigv4proxy.tools.demo")


def demo_file(name: str) -> str:
    return str(resources.files("sigv4proxy") / "demo" / name)


def demo_identity() -> dict:
    with open(demo_file("identities.json"), encoding="utf-8") as fh:
        return json.load(fh)["identities"][0]


def demo_config(listen: str, admin: str, sim_port: int, protocol: str = "h2") -> config_mod.ProxyConfig:
    route = f"/=http://127.0.0.1:{sim_port},sign_host={DEMO_HOST},protocol={protocol},name=demo"
    return config_mod.from_sources({"listen": listen, "admin": admin, "route": [route]}, env={}, file_data={})


async def run_demo(args: argparse.Namespace, stop: asyncio.Event | None = None) -> int:
    from sigv4proxy.aws.credentials import CredentialStore
    from sigv4proxy.runtime.app import ProxyApp
    from sigv4proxy.sim.server import SimConfig, start_simulator

    sim_host, _, sim_port = args.sim_listen.rpartition(":")
    sim = await start_simulator(
        SimConfig(
            host=sim_host,
            port=int(sim_port),
            identities=demo_file("identities.json"),
            policy=demo_file("auth-policy.json"),
            service_arn=DEMO_SERVICE_ARN,
            access_log=sys.stdout if args.access_log else None,
        )
    )
    identity = demo_identity()
    credentials = CredentialStore.static(
        identity["access_key_id"], identity["secret_access_key"], identity.get("session_token")
    )
    app = ProxyApp(demo_config(args.listen, args.admin, sim.port, args.protocol), credentials=credentials)
    try:
        await app.start()
        proxy = f"http://127.0.0.1:{app.port}" if args.listen.startswith(("127.", "0.0.0.0")) else args.listen
        hello = f"{proxy}/hello" if proxy.startswith("http") else f"'http://{proxy}/hello'"  # [::1] globs
        print(
            "sigv4proxy demo is running (Ctrl-C to stop):\n"
            f"  proxy      {args.listen}  -> simulator {sim.host}:{sim.port} over {args.protocol}, signing for "
            f"{DEMO_HOST}\n"
            f"  admin      http://127.0.0.1:{app.admin_port}/metrics  /healthz  /readyz\n"
            "Try:\n"
            f"  curl {hello}                       # signed by the proxy: 200 with what the simulator verified\n"
            f"  curl http://127.0.0.1:{sim.port}/hello   # bypassing the proxy: 403 from the Lattice simulator\n",
            flush=True,
        )
        if stop is None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("stopping", flush=True)
    finally:
        await app.stop(drain_timeout=5)
        await sim.aclose()
    return 0


def run(args: argparse.Namespace) -> int:
    from sigv4proxy.runtime.serve import install_uvloop

    setup_logging(args.log_level)
    install_uvloop()
    try:
        return asyncio.run(run_demo(args))
    except OSError as exc:
        print(
            f"sigv4proxy demo: cannot start: {exc.strerror or exc} (is something already on the port?)", file=sys.stderr
        )
        return 1


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run the proxy in front of a local Lattice simulator")
    parser.add_argument("--listen", default="127.0.0.1:8080")
    parser.add_argument("--admin", default="127.0.0.1:9901")
    parser.add_argument("--sim-listen", default="127.0.0.1:8081")
    parser.add_argument(
        "--protocol", choices=config_mod.PROTOCOLS, default="h2", help="proxy to simulator protocol (default h2c)"
    )
    parser.add_argument("--access-log", action="store_true", help="print the simulator's access log")
    parser.add_argument("--log-level", default="warning")
    parser.set_defaults(func=run)
