"""Routing: which upstream a request goes to and which host, service and region it is signed for.

Owns: the allow-list, route matching and `Target` construction (pure; no I/O). Everything a
request needs is precomputed into frozen `Target`s at start-up or cached per host, so the hot
path does a dict lookup. Must never: let a host outside the allow-list through (the sidecar is not
an open relay), or contact anything itself.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from sigv4proxy.aws.signing import SigV4Signer
from sigv4proxy.config import ConfigError, ProxyConfig, RouteConfig
from sigv4proxy.errors import BadRequest, HostNotAllowed
from sigv4proxy.model import Origin, Timeouts

_LATTICE_REGION = re.compile(r"\.vpc-lattice-svcs\.([a-z0-9-]+)\.on\.aws$")
# A DNS name or IPv4 literal: no userinfo, no slashes, no percent-escapes, no spaces.
_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")
_CACHE_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request goes and how it is signed. Hashable, immutable, shared by requests."""

    origin: Origin
    authority: str  # the Host / :authority that is sent and signed
    signer: SigV4Signer  # a SigV4ASigner for sigv4a targets (same interface)
    name: str  # bounded metric label: a route name, "default" or "upstream"

    @property
    def authority_bytes(self) -> bytes:
        return self.authority.encode("ascii")


def split_host(value: str) -> tuple[str, int | None]:
    """Normalize a Host header or URL authority: lowercase, no trailing dot, port split off.

    Raises BadRequest for anything that is not a plain hostname, IPv4 literal or bracketed IPv6
    literal (userinfo, escapes, zone ids, empty) so allow-list checks cannot be bypassed by odd
    spellings. An IPv6 literal comes back in brackets, in its one compressed spelling.
    """
    text = value.strip().lower()
    if "@" in text or "%" in text or "/" in text or "\\" in text:
        raise BadRequest("malformed host")
    host, sep, port = text.rpartition(":")
    if not sep or "]" in port:
        host, port = text, ""
    if host.startswith("["):
        host = _ipv6_literal(host)
    else:
        host = host[:-1] if host.endswith(".") else host
        if not host or len(host) > 253 or not _HOSTNAME.match(host):
            raise BadRequest("malformed host")
    if port:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise BadRequest("malformed port in host")
        return host, int(port)
    return host, None


def _ipv6_literal(bracketed: str) -> str:
    if not bracketed.endswith("]"):
        raise BadRequest("malformed host")
    try:
        address = ipaddress.IPv6Address(bracketed[1:-1])
    except ValueError:
        raise BadRequest("malformed host") from None
    return f"[{address.compressed}]"


def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern.lower().rstrip(".")))


def _origin_from_url(url: str, protocol: str) -> Origin:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) origin URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return Origin(parts.scheme, parts.hostname, port, protocol)


def timeouts_from_config(config: ProxyConfig) -> Timeouts:
    """The global upstream timeouts (routes may override connect/first-byte/read/max age)."""
    return Timeouts(
        connect=config.connect_timeout,
        first_byte=config.first_byte_timeout,
        read=config.read_timeout,
        idle=config.idle_timeout,
        ping=config.ping_interval,
        max_age=config.max_connection_age,
    )


class Router:
    """Resolves a request's host and path to a `Target`; built once from the config."""

    def __init__(self, config: ProxyConfig) -> None:
        self._config = config
        self._signers: dict[tuple, SigV4Signer] = {}
        self._allow = [_glob(p) for p in config.allow_host]
        self._upstream_origin = _origin_from_url(config.upstream, config.upstream_protocol) if config.upstream else None
        self._origin_timeouts: dict[Origin, Timeouts] = {}
        self._routes = [self._compile_route(i, r) for i, r in enumerate(config.route)]
        self._by_host: dict[tuple[str, int | None], Target] = {}
        self._split: dict[str, tuple[str, int | None]] = {}  # raw Host value -> split_host()

    # --- start-up ---
    def _signer(
        self, service: str, region: str, extra: tuple[str, ...], algorithm: str = "sigv4", escaping: str | None = None
    ) -> SigV4Signer:
        """One signer per (algorithm, service, region or region set, extra headers, path
        escaping): they share derived-key caches. For sigv4a, `region` is the region set. The
        path escaping is fixed here, once per route, so no request decides it."""
        double_encode = (escaping or self._config.uri_path_escaping) == "double"
        key = (algorithm, service, region, extra, double_encode)
        signer = self._signers.get(key)
        if signer is None:
            if algorithm == "sigv4a":
                from sigv4proxy.aws.sigv4a import SigV4ASigner  # cryptography's RSS only when used

                cls: type[SigV4Signer] = SigV4ASigner
            else:
                cls = SigV4Signer
            signer = self._signers[key] = cls(
                service, region, extra_signed_headers=extra, double_encode_path=double_encode
            )
        return signer

    def _default_signer(self, host: str) -> SigV4Signer:
        config = self._config
        extra = tuple(config.extra_signed_headers)
        if config.signing_algorithm == "sigv4a":  # no region needed: the region set is signed
            return self._signer(config.service, config.region_set, extra, "sigv4a")
        return self._signer(config.service, self._region_for(host, None), extra)

    def _region_for(self, host: str, explicit: str | None) -> str:
        if explicit:
            return explicit
        match = _LATTICE_REGION.search(host)
        if match:
            return match.group(1)
        if self._config.region:
            return self._config.region
        raise BadRequest("cannot tell the signing region for this host (set --region)")

    def _compile_route(self, index: int, route: RouteConfig):
        protocol = route.protocol or self._config.upstream_protocol
        origin = _origin_from_url(route.upstream, protocol)
        sign_host = route.sign_host or (origin.host if origin.port in (80, 443) else f"{origin.host}:{origin.port}")
        host_only = split_host(sign_host)[0]
        service = route.service or self._config.service
        extra = tuple(self._config.extra_signed_headers) + tuple(route.extra_signed_headers)
        escaping = route.uri_path_escaping
        if (route.signing_algorithm or self._config.signing_algorithm) == "sigv4a":
            signer = self._signer(service, route.region_set or self._config.region_set, extra, "sigv4a", escaping)
        else:
            signer = self._signer(service, self._region_for(host_only, route.region), extra, escaping=escaping)
        self._note_timeouts(index, route, origin)
        target = Target(origin, sign_host, signer, route.name or f"route{index}")
        host_re = _glob(route.host) if route.host else None
        return host_re, route.path_prefix, target

    def _note_timeouts(self, index: int, route: RouteConfig, origin: Origin) -> None:
        """Record a route's own upstream timeouts for its origin (the pool is per origin, so two
        routes to one origin must agree, and so must a route to the `--upstream` origin)."""
        defaults = timeouts_from_config(self._config)
        timeouts = dataclasses.replace(
            defaults,
            connect=route.connect_timeout or defaults.connect,
            first_byte=route.first_byte_timeout or defaults.first_byte,
            read=route.read_timeout or defaults.read,
            max_age=defaults.max_age if route.max_connection_age is None else route.max_connection_age,
        )
        known = self._origin_timeouts.get(origin, defaults if origin == self._upstream_origin else None)
        if known is not None and known != timeouts:
            raise ConfigError(f"route[{index}]: routes to one upstream origin must use the same timeouts")
        self._origin_timeouts[origin] = timeouts

    def origin_timeouts(self) -> dict[Origin, Timeouts]:
        """Upstream timeouts per route origin that differ from the global ones (start-up only)."""
        defaults = timeouts_from_config(self._config)
        return {o: t for o, t in self._origin_timeouts.items() if t != defaults}

    # --- per request ---
    def resolve(self, host_header: str | None, path: str, *, original_dst: tuple[str, int] | None = None) -> Target:
        """The target for a request with this Host (or absolute-form authority) and raw path."""
        host, port = self._split_host(host_header) if host_header else (None, None)
        for host_re, prefix, target in self._routes:
            if host_re is not None and (host is None or not host_re.match(host)):
                continue
            if prefix is not None and not path.startswith(prefix):
                continue
            return target
        if host is None:
            raise BadRequest("missing Host header")
        key: tuple = (host, port) if original_dst is None else (host, port, original_dst)
        target = self._by_host.get(key)
        if target is None:
            target = self._target_for_host(host, port, original_dst)
            if len(self._by_host) >= _CACHE_LIMIT:
                self._by_host.clear()
            self._by_host[key] = target
        return target

    def _split_host(self, host_header: str) -> tuple[str, int | None]:
        """split_host, remembered per raw Host value (bounded; a refused value is never stored)."""
        split = self._split.get(host_header)
        if split is None:
            split = split_host(host_header)
            if len(self._split) >= _CACHE_LIMIT:
                self._split.clear()
            self._split[host_header] = split
        return split

    def is_allowed(self, host: str) -> bool:
        return any(p.match(host) for p in self._allow)

    def _target_for_host(self, host: str, port: int | None, original_dst: tuple[str, int] | None) -> Target:
        if not self.is_allowed(host):
            raise HostNotAllowed("host is not in the allow-list")
        authority = host if port in (None, 80, 443) else f"{host}:{port}"
        if self._upstream_origin is not None:
            origin, name = self._upstream_origin, "upstream"
        elif original_dst is not None:
            scheme = "https" if original_dst[1] == 443 else "http"
            origin, name = (
                Origin(scheme, original_dst[0], original_dst[1], self._config.upstream_protocol, host),
                "transparent",
            )
        else:
            origin = Origin(
                "https", host.strip("[]"), port if port not in (None, 80) else 443, self._config.upstream_protocol
            )
            name = "default"
        return Target(origin, authority, self._default_signer(host), name)
