"""`sigv4proxy serve`: run the proxy (one worker, or a supervised group sharing the port).

Owns: turning parsed flags into a `ProxyConfig` and running `ProxyApp` until SIGTERM/SIGINT,
then draining. Must never: keep running with a config it could not parse (exit 2 with the key).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys

from sigv4proxy import config as config_mod
from sigv4proxy.logs import setup_logging

log = logging.getLogger("sigv4proxy")


def config_from_args(args: argparse.Namespace) -> config_mod.ProxyConfig:
    flags = {name: getattr(args, name) for name in config_mod.FIELDS if hasattr(args, name)}
    return config_mod.from_sources(flags)


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep running without it
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve_until_signalled(config: config_mod.ProxyConfig, *, reuse_port: bool = False) -> int:
    from sigv4proxy.app import ProxyApp

    app = ProxyApp(config, reuse_port=reuse_port)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await app.start()
    freeze_startup_objects()
    log.debug("start-up objects frozen out of cyclic GC",
              extra={"objects": gc.get_freeze_count(), "gen0_threshold": gc.get_threshold()[0]})
    await stop.wait()
    log.info("draining", extra={"inflight": app.handler.inflight, "drain_timeout": config.drain_timeout})
    await app.stop()
    # Stopping already: a repeated SIGTERM/SIGINT (kubelet, docker stop, Ctrl-C twice) during
    # the remaining teardown must not turn a clean exit into death by signal. Removing ours
    # first keeps the loop from restoring the default handlers when it closes.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
    log.info("stopped")
    return 0


GEN0_THRESHOLD = 20_000


def freeze_startup_objects() -> None:
    """What start-up built (modules, botocore's endpoint tables, config, the running app) lives
    until exit: take it out of the cyclic collector's view. Otherwise every full collection walks
    all of it (~55,000 objects): 22-38 ms stalls every couple of seconds under load, which were
    the p99 at c128."""
    gc.collect()
    gc.freeze()
    # CPython counts tracked allocations minus deallocations and collects generation 0 when the
    # count passes 700: 64-128 requests in flight hold more than that, so under load a young
    # collection ran every few milliseconds, walked live requests and promoted them (2.7 % of the
    # CPU at c64, measured with gc.callbacks). At 20,000, steady load never gets there; cyclic
    # garbage is still collected once that much piles up.
    gc.set_threshold(GEN0_THRESHOLD, *gc.get_threshold()[1:])


def run(args: argparse.Namespace) -> int:
    return run_with_flags({name: getattr(args, name) for name in config_mod.FIELDS if hasattr(args, name)})


def run_with_flags(flags: dict) -> int:
    try:
        config = config_mod.from_sources(flags)
    except config_mod.ConfigError as exc:
        print(f"sigv4proxy: bad config: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    install_uvloop()
    if config.workers > 1 and not os.environ.get("SIGV4PROXY_WORKER_ID"):
        from sigv4proxy.workers import supervise

        return supervise(config, sys.argv[1:])
    return asyncio.run(serve_until_signalled(config, reuse_port=bool(os.environ.get("SIGV4PROXY_WORKER_ID"))))


def check_config(args: argparse.Namespace) -> int:
    """Validate flags/env/file and print the effective config (secrets redacted) as YAML."""
    import yaml

    try:
        config = config_from_args(args)
    except config_mod.ConfigError as exc:
        print(f"sigv4proxy: bad config: {exc}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(config.redacted(), sort_keys=False), end="")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="run the signing proxy")
    config_mod.add_arguments(parser)
    parser.set_defaults(func=run)
    checker = subparsers.add_parser("check-config", help="validate config and print the effective settings")
    config_mod.add_arguments(checker)
    checker.set_defaults(func=check_config)
