"""The proxy's one typed configuration, parsed once: flags > environment > file > defaults.

Owns: the settings, their defaults, parsing and validation. Every setting is a field of
`ProxyConfig`; the same field is a flag (`--upstream-protocol`), an environment variable
(`SIGV4PROXY_UPSTREAM_PROTOCOL`) and a config-file key (`upstream_protocol` or `upstream-protocol`).
Must never: be read on the hot path by name (derive what the hot path needs at start-up), or
print a secret (`redacted()` is what `check-config` shows).
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sigv4proxy.fields import NOT_ADDABLE

ENV_PREFIX = "SIGV4PROXY_"
LATTICE_SERVICE = "vpc-lattice-svcs"
DEFAULT_ALLOW_HOSTS = ("*.vpc-lattice-svcs.*.on.aws",)
PROTOCOLS = ("auto", "h2", "http1")
SIGNING_ALGORITHMS = ("sigv4", "sigv4a")
URI_PATH_ESCAPINGS = ("double", "single")
# Options a `--route` flag may carry after the URL (the file form takes every RouteConfig key).
_ROUTE_FLAG_OPTIONS = (
    "sign_host",
    "service",
    "region",
    "protocol",
    "name",
    "extra_signed_headers",
    "uri_path_escaping",
    "signing_algorithm",
    "region_set",
    "connect_timeout",
    "first_byte_timeout",
    "read_timeout",
    "max_connection_age",
)
_ROUTE_TIMEOUTS = ("connect_timeout", "first_byte_timeout", "read_timeout", "max_connection_age")
_REGION_SET_ENTRY = re.compile(r"^[a-z0-9*-]+$")


class ConfigError(ValueError):
    """Bad configuration: the message names the key."""


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """Requests whose Host matches `host` (glob) and whose path starts with `path_prefix` go to
    `upstream`, signed for `sign_host` (default: the upstream's host)."""

    upstream: str
    host: str | None = None
    path_prefix: str | None = None
    sign_host: str | None = None
    service: str | None = None
    region: str | None = None
    protocol: str | None = None
    extra_signed_headers: tuple[str, ...] = ()
    name: str | None = None
    signing_algorithm: str | None = None  # "sigv4" | "sigv4a"; default: the global setting
    region_set: str | None = None  # SigV4A only, e.g. "*" or "us-east-1,us-west-2"
    uri_path_escaping: str | None = None  # "double" | "single"; default: the global setting
    # Upstream timeouts for this route's origin; default: the global settings.
    connect_timeout: float | None = None
    first_byte_timeout: float | None = None
    read_timeout: float | None = None
    max_connection_age: float | None = None


def _split_hostport(value: str, key: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:  # a bare port listens on loopback only: never expose by accident
        host, port = "127.0.0.1", value
    host = host.strip("[]") or "0.0.0.0"  # ":8005" (the Go sidecar's form) means every interface
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"{key}: expected HOST:PORT, got {value!r}") from None
    if not 0 <= number <= 65535:
        raise ConfigError(f"{key}: port out of range in {value!r}")
    return host, number


def hostport(host: str, port: int) -> str:
    """HOST:PORT as the listen setting writes it (IPv6 in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_LOOPBACKS: tuple[str, ...] = ("127.0.0.1", "::1")
_EVERY_INTERFACE: tuple[str, ...] = ("0.0.0.0", "::")


def _listen(value: Any, key: str) -> tuple[str, ...]:
    """Listen addresses, each `HOST:PORT` with IPv6 literals in brackets. A bare `PORT` is loopback
    in both families and `:PORT` (the Go sidecar's form) every interface in both; each becomes
    two entries, so what `check-config` prints is what is bound."""
    out: list[str] = []
    for entry in _parse_list(value, key):
        host, port = _split_hostport(entry, key)
        bracketed = entry.startswith("[")
        if bracketed:
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ConfigError(f"{key}: {entry!r}: brackets hold an IPv6 address") from None
        elif ":" in host:
            raise ConfigError(f"{key}: an IPv6 address goes in brackets, e.g. [::1]:8080; got {entry!r}")
        if ":" not in entry:  # a bare port
            hosts = _LOOPBACKS
        elif entry.startswith(":"):
            hosts = _EVERY_INTERFACE
        else:
            hosts = (host,)
        for name in hosts:
            text = hostport(name, port)
            if text in out:
                raise ConfigError(f"{key}: {text} is listed twice")
            out.append(text)
    if not out:
        raise ConfigError(f"{key}: expected at least one HOST:PORT")
    return tuple(out)


def _parse_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{key}: expected a boolean, got {value!r}")


def _parse_list(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, (list, tuple)):
        out: list[str] = []
        for item in value:
            out.extend(_parse_list(item, key))
        return tuple(out)
    raise ConfigError(f"{key}: expected a list of strings")


def _region_set(value: Any, key: str) -> str:
    """A SigV4A region set: '*' or a comma list (a YAML list works too) of names with '*'."""
    entries = _parse_list(value, key)
    if not entries or not all(_REGION_SET_ENTRY.match(e) for e in entries):
        raise ConfigError(f"{key}: expected '*' or a comma list of regions (wildcard '*'), got {value!r}")
    return ",".join(entries)


def _parse_route(value: Any, key: str) -> RouteConfig:
    """A route from the file (a mapping) or from `--route PATTERN=URL[,opt=val...]`."""
    if isinstance(value, RouteConfig):
        return value
    if isinstance(value, Mapping):
        data = {k.replace("-", "_"): v for k, v in value.items()}
        match = data.pop("match", None) or {}
        if isinstance(match, Mapping):
            for mk, mv in match.items():
                data.setdefault(mk.replace("-", "_"), mv)
        names = {f.name for f in dataclasses.fields(RouteConfig)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"{key}: unknown route key(s) {sorted(unknown)}")
        if "upstream" not in data:
            raise ConfigError(f"{key}: a route needs 'upstream'")
        data["extra_signed_headers"] = _parse_list(data.get("extra_signed_headers"), key)
        route = RouteConfig(**_parse_route_options(data, key))
    else:
        text = str(value)
        pattern, sep, rest = text.partition("=")
        if not sep or not rest:
            raise ConfigError(f"{key}: expected PATTERN=URL[,option=value...], got {text!r}")
        upstream, *options = rest.split(",")
        host, slash, prefix = pattern.partition("/")
        kwargs: dict[str, Any] = {
            "upstream": upstream,
            "host": host or None,
            "path_prefix": ("/" + prefix) if slash else None,
        }
        for option in options:
            ok, _, ov = option.partition("=")
            ok = ok.strip().replace("-", "_")
            if ok not in _ROUTE_FLAG_OPTIONS:
                raise ConfigError(f"{key}: unknown route option {ok!r}")
            # ',' separates options, so list values use ';' (extra_signed_headers, region_set).
            kwargs[ok] = (
                _parse_list(ov.replace(";", ","), key) if ok == "extra_signed_headers" else ov.replace(";", ",")
            )
        route = RouteConfig(**_parse_route_options(kwargs, key))
    if not route.upstream.startswith(("http://", "https://")):
        raise ConfigError(f"{key}: route upstream must be an http:// or https:// URL")
    if route.protocol is not None and route.protocol not in PROTOCOLS:
        raise ConfigError(f"{key}: route protocol must be one of {PROTOCOLS}")
    return route


def _parse_route_options(values: dict[str, Any], key: str) -> dict[str, Any]:
    """Typed route option values (the file gives numbers, the flag gives strings)."""
    out = dict(values)
    if out.get("signing_algorithm") is not None:
        out["signing_algorithm"] = _choice(*SIGNING_ALGORITHMS)(out["signing_algorithm"], f"{key}: signing_algorithm")
    if out.get("region_set") is not None:
        out["region_set"] = _region_set(out["region_set"], f"{key}: region_set")
    if out.get("uri_path_escaping") is not None:
        out["uri_path_escaping"] = _choice(*URI_PATH_ESCAPINGS)(out["uri_path_escaping"], f"{key}: uri_path_escaping")
    for name in _ROUTE_TIMEOUTS:
        if out.get(name) is not None:
            parse = _non_negative if name == "max_connection_age" else _positive(float)  # 0: no limit
            out[name] = parse(out[name], f"{key}: {name}")
    return out


def _parse_routes(value: Any, key: str) -> tuple[RouteConfig, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, Mapping, RouteConfig)):
        value = [value]
    return tuple(_parse_route(v, key) for v in value)


def _choice(*choices: str) -> Callable[[Any, str], str]:
    def parse(value: Any, key: str) -> str:
        text = str(value)
        if text not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(choices)}; got {text!r}")
        return text

    return parse


def _positive(kind: type) -> Callable[[Any, str], Any]:
    def parse(value: Any, key: str) -> Any:
        try:
            number = kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if number <= 0:
            raise ConfigError(f"{key}: must be positive, got {value!r}")
        return number

    return parse


def _non_negative(value: Any, key: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if number < 0:
        raise ConfigError(f"{key}: must be zero or positive, got {value!r}")
    return number


def _optional(parse: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    def inner(value: Any, key: str) -> Any:
        if (
            value is None
            or (isinstance(value, int) and value == 0)
            or (isinstance(value, str) and value.strip().lower() in ("", "none", "0"))
        ):
            return None
        return parse(value, key)

    return inner


def _workers(value: Any, key: str) -> int:
    if str(value).strip().lower() == "auto":
        return os.cpu_count() or 1
    return _positive(int)(value, key)


def _str(value: Any, key: str) -> str:
    return str(value)


def _opt_str(value: Any, key: str) -> str | None:
    return None if value in (None, "") else str(value)


def setting(
    default: Any,
    parse: Callable[[Any, str], Any],
    help: str,
    *,
    repeat: bool = False,
    flag: bool = True,
    secret: bool = False,
    metavar: str | None = None,
) -> Any:
    meta = {"parse": parse, "help": help, "repeat": repeat, "flag": flag, "secret": secret, "metavar": metavar}
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for defaults")
    return field(default=default, metadata=meta)


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    listen: tuple[str, ...] = setting(
        ("127.0.0.1:8080", "[::1]:8080"),
        _listen,
        "HOST:PORT the app talks to (repeatable; IPv6 in brackets: [::1]:8080); a bare PORT is both loopbacks, :PORT "
        "every interface of both families; an IPv6 listener is skipped with a warning on a host without IPv6",
        repeat=True,
        metavar="HOST:PORT",
    )
    admin: str = setting("127.0.0.1:9901", _str, "HOST:PORT for /metrics, /healthz, /readyz", metavar="HOST:PORT")
    region: str | None = setting(None, _opt_str, "signing region (default: from a Lattice host, else AWS_REGION)")
    service: str = setting(LATTICE_SERVICE, _str, "signing service name")
    signing_algorithm: str = setting(
        "sigv4", _choice(*SIGNING_ALGORITHMS), "sigv4 (one region) or sigv4a (ECDSA, signed for --region-set)"
    )
    region_set: str = setting(
        "*", _region_set, "SigV4A region set: '*' or a comma list such as us-west-2,us-east-1", metavar="REGIONS"
    )
    uri_path_escaping: str = setting(
        "double",
        _choice(*URI_PATH_ESCAPINGS),
        "canonical URI: double (the signed path is the wire path encoded again: the SigV4 rule, botocore, awscrt) or "
        "single (the wire path as sent: AWS's Go example for Lattice); they differ only for paths with "
        "percent-escapes or non-ASCII",
    )
    upstream: str | None = setting(
        None,
        _opt_str,
        "connect every request to this origin URL; the app's Host is still sent and signed",
        metavar="URL",
    )
    upstream_protocol: str = setting("auto", _choice(*PROTOCOLS), "auto (ALPN over TLS), h2 (h2c over http://), http1")
    h2_implementation: str = setting(
        "lean", _choice("lean", "h2"), "HTTP/2 client: lean (fast, default) or h2 (the reference library)"
    )
    h1_implementation: str = setting(
        "lean",
        _choice("lean", "aiohttp"),
        "inbound HTTP/1.1 server: lean (llhttp through httptools, driven by the proxy's own protocol: less CPU a "
        "request, forwards request trailers; default) or aiohttp (the reference)",
    )
    h2_server_implementation: str = setting(
        "lean",
        _choice("lean", "h2"),
        "inbound HTTP/2 (h2c, gRPC) server: lean (the proxy's own frames and HPACK: less CPU a request; default) "
        "or h2 (the reference library)",
    )
    ca_bundle: str | None = setting(None, _opt_str, "CA bundle for upstream TLS (also AWS_CA_BUNDLE)", metavar="FILE")
    verify_tls: bool = setting(True, _parse_bool, "verify upstream certificates")
    allow_host: tuple[str, ...] = setting(
        DEFAULT_ALLOW_HOSTS, _parse_list, "host glob the proxy may sign for (repeatable)", repeat=True, metavar="GLOB"
    )
    route: tuple[RouteConfig, ...] = setting(
        (),
        _parse_routes,
        "PATTERN=URL[,sign_host=H,service=S,region=R,protocol=P,signing_algorithm=sigv4a,region_set=A;B,uri_path_escaping=single,connect_timeout=S,...];"
        " PATTERN is HOST, /PREFIX or HOST/PREFIX (repeatable)",
        repeat=True,
    )
    extra_signed_headers: tuple[str, ...] = setting(
        (), _parse_list, "extra header names to sign when present (repeatable)", repeat=True
    )
    strip_header: tuple[str, ...] = setting(
        (), _parse_list, "drop this request header before signing (repeatable)", repeat=True, metavar="NAME"
    )
    add_header: tuple[str, ...] = setting(
        (), _parse_list, "add 'Name=value' to every upstream request (repeatable)", repeat=True, metavar="NAME=VALUE"
    )
    duplicate_header: tuple[str, ...] = setting(
        (), _parse_list, "copy this request header to X-Original-<Name> (repeatable)", repeat=True, metavar="NAME"
    )
    role_arn: str | None = setting(None, _opt_str, "assume this role on top of the default credential chain")
    role_session_name: str = setting("sigv4proxy", _str, "AssumeRole session name")
    external_id: str | None = setting(None, _opt_str, "AssumeRole external id")
    role_duration: int = setting(3600, _positive(int), "AssumeRole duration in seconds")
    profile: str | None = setting(None, _opt_str, "botocore profile for the default chain")
    connect_timeout: float = setting(5.0, _positive(float), "upstream connect timeout (s)")
    first_byte_timeout: float = setting(30.0, _positive(float), "request sent to response headers (s)")
    read_timeout: float = setting(
        60.0,
        _positive(float),
        "max gap between response body chunks, between request body chunks from the client, "
        "and in the client taking its answer (s)",
    )
    idle_timeout: float = setting(
        50.0,
        _positive(float),
        "close pooled upstream connections idle this long (s); below VPC Lattice's idle close (60 s by default), so a"
        " connection Lattice already closed is never picked",
    )
    max_connection_age: float = setting(
        570.0,
        _non_negative,
        "an upstream connection this old (s) takes no new requests and closes once its last one ends, each at a "
        "random 90-100 %% of it, before VPC Lattice's 10-minute cut (0: no limit)",
    )
    stream_idle_timeout: float = setting(
        300.0,
        _positive(float),
        "inbound HTTP/2 stream with no bytes either way for this long is cut (s); long RPCs are not cut by request "
        "timeouts",
    )
    ping_interval: float = setting(
        30.0,
        _non_negative,
        "PING idle upstream HTTP/2 connections this often; no answer within --connect-timeout drops one (0: off)",
    )
    header_timeout: float = setting(
        30.0, _positive(float), "close a new client connection without a complete request head after this (s)"
    )
    max_connections: int = setting(
        128,
        _positive(int),
        "upstream connections per origin and worker; over HTTP/1.1 also the cap on concurrent upstream requests",
    )
    recv_buffer: int | None = setting(
        65536,
        _optional(_positive(int)),
        "inbound socket receive buffer (bytes): bounds what one read takes in, so memory per upload stays flat (0: "
        "kernel default)",
    )
    splice: bool = setting(
        True,
        _parse_bool,
        "take HTTP/1.1 request bodies over 64 KiB of declared length straight off the client's socket: to a cleartext"
        " upstream (HTTP/1.1, or h2c with the lean client) moved inside the kernel (Linux splice), never through the "
        "process; to a TLS upstream read without aiohttp's parser and stream buffer",
    )
    max_body_size: int | None = setting(
        None, _optional(_positive(int)), "reject request bodies larger than this (bytes)"
    )
    max_inflight: int | None = setting(
        None, _optional(_positive(int)), "answer 503 beyond this many in-flight requests per worker"
    )
    workers: int = setting(1, _workers, "worker processes sharing the port (N or auto)")
    drain_timeout: float = setting(20.0, _positive(float), "on SIGTERM, wait this long for in-flight requests (s)")
    transparent: bool = setting(False, _parse_bool, "accept iptables-redirected connections (SO_ORIGINAL_DST)")
    access_log: bool = setting(False, _parse_bool, "write one JSON access-log line per request")
    log_level: str = setting("info", _choice("debug", "info", "warning", "error"), "log level")
    config: str | None = setting(None, _opt_str, "YAML config file", flag=True, metavar="FILE")

    def redacted(self) -> dict[str, Any]:
        """The effective config as plain data, secrets hidden (nothing here is secret today)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret") and value:
                value = "***"
            elif isinstance(value, tuple) and value and isinstance(value[0], RouteConfig):
                value = [{k: v for k, v in dataclasses.asdict(r).items() if v not in (None, ())} for r in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @property
    def listen_addrs(self) -> tuple[tuple[str, int], ...]:
        return tuple(_split_hostport(address, "listen") for address in self.listen)

    @property
    def admin_addr(self) -> tuple[str, int]:
        return _split_hostport(self.admin, "admin")


FIELDS = {f.name: f for f in dataclasses.fields(ProxyConfig)}


def add_arguments(parser: argparse.ArgumentParser, names: Iterable[str] | None = None) -> None:
    """Add settings (all, or `names`) as flags; defaults are suppressed so only given flags are seen."""
    for name in names if names is not None else FIELDS:
        f = FIELDS[name]
        if not f.metadata.get("flag", True):
            continue
        flag = "--" + name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": f.metadata["help"]}
        if f.metadata.get("metavar"):
            kwargs["metavar"] = f.metadata["metavar"]
        if f.metadata["repeat"]:
            kwargs["action"] = "append"
        elif f.type in ("bool", bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        parser.add_argument(flag, **kwargs)


def load_file(path: str) -> dict[str, Any]:
    import yaml  # only with a config file: a worker run from flags never loads it

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: {path} is not valid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"config: {path} must be a mapping of settings")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def from_sources(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    file_data: Mapping[str, Any] | None = None,
) -> ProxyConfig:
    """Merge flags > environment > file > defaults into a validated `ProxyConfig`."""
    flags = dict(flags or {})
    env = os.environ if env is None else env
    config_path = flags.get("config") or env.get(ENV_PREFIX + "CONFIG")
    if file_data is None:
        file_data = load_file(config_path) if config_path else {}
    unknown = set(file_data) - set(FIELDS)
    if unknown:
        raise ConfigError(f"config: unknown key(s) {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for name, f in FIELDS.items():
        parse = f.metadata["parse"]
        env_key = ENV_PREFIX + name.upper()
        if name in flags:
            raw, key = flags[name], "--" + name.replace("_", "-")
        elif env_key in env:
            raw, key = env[env_key], env_key
        elif name in file_data:
            raw, key = file_data[name], name
        else:
            continue
        values[name] = parse(raw, key)
    if "ca_bundle" not in values and env.get("AWS_CA_BUNDLE"):
        values["ca_bundle"] = env["AWS_CA_BUNDLE"]
    if "region" not in values and (env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")):
        values["region"] = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    config = ProxyConfig(**values)
    _validate(config)
    return config


def _validate(config: ProxyConfig) -> None:
    config.listen_addrs  # noqa: B018 - parsing them raises ConfigError for a bad value
    config.admin_addr  # noqa: B018
    for item in config.add_header:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"add_header: expected NAME=VALUE, got {item!r}")
        if name.strip().lower() in NOT_ADDABLE:
            raise ConfigError(f"add_header: {name.strip()!r} is set by the proxy or per hop; it cannot be added")
        try:
            (name + value).encode("latin-1")
        except UnicodeEncodeError:
            raise ConfigError(f"add_header: {name.strip()!r} is not Latin-1 text") from None
    if config.upstream is not None and not config.upstream.startswith(("http://", "https://")):
        raise ConfigError("upstream: must be an http:// or https:// URL")
    if config.ca_bundle is not None and not os.path.isfile(config.ca_bundle):
        raise ConfigError(f"ca_bundle: no such file {config.ca_bundle!r}")
    for index, route in enumerate(config.route):
        algorithm = route.signing_algorithm or config.signing_algorithm
        if route.region_set is not None and algorithm != "sigv4a":
            raise ConfigError(f"route[{index}]: region_set applies to signing_algorithm sigv4a only")
        if route.region is not None and algorithm == "sigv4a":
            raise ConfigError(f"route[{index}]: a sigv4a route signs for region_set, not region")
