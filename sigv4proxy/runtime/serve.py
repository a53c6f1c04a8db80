"""`sigv4proxy serve`: run the proxy (one worker, or a supervised group sharing the port).

Owns: turning parsed flags into a `ProxyConfig` and running `ProxyApp` until SIGTERM/SIGINT,
then draining. Must never: keep running with a config it could not parse (exit 2 with the key),
or load the data plane (asyncio, aiohttp, botocore) in the supervisor of `--workers N`: it only
starts and watches processes, and stays a few MiB.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from sigv4proxy import config as config_mod
from sigv4proxy.runtime.logs import setup_logging

log = logging.getLogger("sigv4proxy")


def config_from_args(args: argparse.Namespace) -> config_mod.ProxyConfig:
    flags = {name: getattr(args, name) for name in config_mod.FIELDS if hasattr(args, name)}
    return config_mod.from_sources(flags)


def install_uvloop() -> None:
    import asyncio

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep running without it
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve_until_signalled(config: config_mod.ProxyConfig, *, reuse_port: bool = False, credentials=None) -> int:
    import asyncio
    import gc

    from sigv4proxy.runtime import gc_policy
    from sigv4proxy.runtime.app import ProxyApp

    app = ProxyApp(config, reuse_port=reuse_port, credentials=credentials)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await app.start()
    gc_policy.freeze_startup_objects()
    gc.enable()  # off while start-up imported (see run_with_flags)
    collector = loop.create_task(gc_policy.collect_periodically())
    log.debug(
        "start-up objects frozen out of cyclic GC",
        extra={
            "objects": gc.get_freeze_count(),
            "gen0_threshold": gc.get_threshold()[0],
            "collect_every_s": gc_policy.YOUNG_EVERY_S,
        },
    )
    await stop.wait()
    log.info("draining", extra={"inflight": app.exchange.inflight, "drain_timeout": config.drain_timeout})
    collector.cancel()
    await app.stop()
    # Stopping already: a repeated SIGTERM/SIGINT (kubelet, docker stop, Ctrl-C twice) during
    # the remaining teardown must not turn a clean exit into death by signal. Removing ours
    # first keeps the loop from restoring the default handlers when it closes.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
    log.info("stopped")
    return 0


def run(args: argparse.Namespace) -> int:
    return run_with_flags({name: getattr(args, name) for name in config_mod.FIELDS if hasattr(args, name)})


def run_with_flags(flags: dict) -> int:
    try:
        config = config_mod.from_sources(flags)
    except config_mod.ConfigError as exc:
        print(f"sigv4proxy: bad config: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    if config.workers > 1 and not os.environ.get("SIGV4PROXY_WORKER_ID"):
        from sigv4proxy.runtime.workers import supervise

        return supervise(config, sys.argv[1:])
    import asyncio
    import gc

    from sigv4proxy.aws.credentials import CredentialStore
    from sigv4proxy.compat import botocore as botocore_compat
    from sigv4proxy.compat.aiohttp_import import import_without_client_trust

    # Start-up only allocates what lives until exit, and freeze_startup_objects() collects once
    # it is built: no cyclic collection while modules load (less start-up CPU).
    gc.disable()
    botocore_compat.keep_awscrt_unloaded()
    # botocore's chain runs in a child interpreter, started before the imports below so the two
    # overlap on two cores; this process never imports botocore (its memory stays out of workers).
    credentials = CredentialStore.from_config(config, in_child_process=True)
    import_without_client_trust()  # aiohttp's client contexts, never used, cost start-up time
    install_uvloop()
    from sigv4proxy.runtime.app import ListenError

    try:
        return asyncio.run(
            serve_until_signalled(
                config, reuse_port=bool(os.environ.get("SIGV4PROXY_WORKER_ID")), credentials=credentials
            )
        )
    except ListenError as exc:
        print(f"sigv4proxy: {exc.strerror}", file=sys.stderr)
        return 1


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
