"""The admin server: /metrics, /healthz and /readyz on their own port.

Owns: those three endpoints only; never mixed with proxied paths. Must never: reveal a secret
(readiness reasons are fixed short strings).
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from sigv4proxy.observe.metrics import CONTENT_TYPE, Metrics


class AdminHandler:
    def __init__(
        self, metrics: Metrics, readiness: Callable[[], tuple[bool, str]], refresh_gauges: Callable[[], None]
    ) -> None:
        self._metrics = metrics
        self._readiness = readiness
        self._refresh_gauges = refresh_gauges

    async def __call__(self, request: web.BaseRequest) -> web.Response:
        response = self._answer(request)
        response.headers["Server"] = "sigv4proxy"  # not aiohttp's default, with its versions
        return response

    def _answer(self, request: web.BaseRequest) -> web.Response:
        path = request.path
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405, text="method not allowed\n")
        if path == "/healthz":
            return web.Response(text="ok\n")
        if path == "/readyz":
            ready, reason = self._readiness()
            if ready:
                return web.Response(text="ready\n")
            return web.Response(status=503, text=f"not ready: {reason}\n")
        if path == "/metrics":
            self._refresh_gauges()
            body = self._metrics.exposition()
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
        return web.Response(status=404, text="not found: /metrics, /healthz, /readyz\n")
