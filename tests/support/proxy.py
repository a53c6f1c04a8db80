"""Test helpers: a running simulator and proxy on ephemeral loopback ports."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
from typing import AsyncIterator

from sigv4proxy import config as config_mod
from sigv4proxy.runtime.app import ProxyApp
from sigv4proxy.aws.credentials import CredentialStore
from sigv4proxy.observe.metrics import Metrics

LATTICE_HOST = "svc-0123456789abcdef0.7d67968.vpc-lattice-svcs.us-west-2.on.aws"
SERVICE_ARN = "arn:aws:vpc-lattice:us-west-2:111122223333:service/svc-0123456789abcdef0"
ACCESS_KEY = "AKIDTESTPROXY0000001"
SECRET_KEY = "test-secret-key-NEVER-LOGGED-0123456789ab"
SESSION_TOKEN = "test-session-token-NEVER-LOGGED-Zm9vYmFyYmF6"
PRINCIPAL = "arn:aws:sts::111122223333:assumed-role/test-app/sigv4proxy"


def write_identities(directory: pathlib.Path) -> pathlib.Path:
    path = directory / "identities.json"
    path.write_text(json.dumps({"identities": [{
        "access_key_id": ACCESS_KEY,
        "secret_access_key": SECRET_KEY,
        "session_token": SESSION_TOKEN,
        "principal": PRINCIPAL,
        "role_arn": "arn:aws:iam::111122223333:role/test-app",
        "account": "111122223333",
        "org_id": "o-test",
        "principal_tags": {"team": "payments"},
    }]}))
    return path


def static_credentials() -> CredentialStore:
    return CredentialStore.static(ACCESS_KEY, SECRET_KEY, SESSION_TOKEN)


# The inbound HTTP/1.1 server of every proxy the tests start, taken from the variable that sets it
# for the proxy itself (the config here reads no environment): `make test` runs the modules that
# exercise the inbound side under both implementations.
H1_IMPLEMENTATION = os.environ.get("SIGV4PROXY_H1_IMPLEMENTATION") or config_mod.ProxyConfig().h1_implementation
# The same for the inbound HTTP/2 server (--h2-server-implementation).
H2_SERVER_IMPLEMENTATION = (os.environ.get("SIGV4PROXY_H2_SERVER_IMPLEMENTATION")
                            or config_mod.ProxyConfig().h2_server_implementation)


def h2_server_class():
    """The inbound HTTP/2 connection class the proxies of this run use, for tests that serve
    one without a proxy."""
    if H2_SERVER_IMPLEMENTATION == "lean":
        from sigv4proxy.inbound.h2server_lean import LeanH2ServerConnection

        return LeanH2ServerConnection
    from sigv4proxy.inbound.h2server import H2ServerConnection

    return H2ServerConnection


def proxy_config(**values) -> config_mod.ProxyConfig:
    values.setdefault("h1_implementation", H1_IMPLEMENTATION)
    values.setdefault("h2_server_implementation", H2_SERVER_IMPLEMENTATION)
    values.setdefault("listen", "127.0.0.1:0")
    values.setdefault("admin", "127.0.0.1:0")
    values.setdefault("connect_timeout", 2)
    values.setdefault("first_byte_timeout", 5)
    return config_mod.from_sources({}, env={}, file_data=values)


@contextlib.asynccontextmanager
async def running_proxy(credentials: CredentialStore | None = None, **values) -> AsyncIterator[ProxyApp]:
    app = ProxyApp(proxy_config(**values), credentials=credentials or static_credentials(), metrics=Metrics())
    await app.start()
    try:
        yield app
    finally:
        await app.stop(drain_timeout=2)


class UpstreamSpy:
    """Stands between a running proxy's exchange and its pool (`watch_upstream`): `seen` gets
    each request's arguments as the exchange hands it over, signed, before it is forwarded. The
    pool's own `request` cannot be wrapped in place: the compiled build's pool is a C type."""

    def __init__(self, pool, seen):
        self._pool = pool
        self._seen = seen

    def request(self, origin, method, target, authority, headers, body=None, *rest):
        self._seen(origin, method, target, authority, headers, body)
        return self._pool.request(origin, method, target, authority, headers, body, *rest)


def watch_upstream(proxy: ProxyApp, seen) -> None:
    """Calls `seen(origin, method, target, authority, headers, body)` for every request the
    proxy sends upstream from now on."""
    proxy.exchange.upstream = UpstreamSpy(proxy.pool, seen)
