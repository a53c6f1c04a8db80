"""A secrets scanner for tests: register secrets, feed every text a session produced, fail on a hit.

Owns: the list of secrets (secret keys, session tokens, signatures, derived signing keys) and of
captured texts (logs, bodies, reprs, metrics), and the check. Any test file can use it: build a
`SecretScanner`, `add_secret`/`add_signatures_from` while it runs, `add_text` whatever it saw,
then `assert_clean()`. `capture_logs()` captures the root logger (so also botocore, h2, hpack) as
the proxy's JSON lines. Must never: print a secret in its own failure message (hits name the
secret's label and the source, and show a masked excerpt).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import logging
import re
from dataclasses import dataclass, field
from typing import Iterator

from sigv4proxy.runtime.logs import JsonFormatter, setup_logging

_SIGNATURE = re.compile(r"Signature=([0-9a-f]{64})")
MIN_SECRET_LENGTH = 8  # shorter strings would match by accident


def signing_key_hex(secret_key: str, datestamp: str, region: str, service: str) -> str:
    """The SigV4 derived signing key for a day, as hex (a secret too)."""
    key = ("AWS4" + secret_key).encode()
    for part in (datestamp, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key.hex()


@dataclass
class Hit:
    source: str
    label: str
    excerpt: str  # masked


@dataclass
class SecretScanner:
    secrets: dict[str, str] = field(default_factory=dict)  # value -> label
    texts: list[tuple[str, str]] = field(default_factory=list)  # (source, text)

    def add_secret(self, label: str, value: str | bytes | None) -> None:
        if value is None:
            return
        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        if len(text) < MIN_SECRET_LENGTH:
            raise ValueError(f"secret {label!r} is too short to scan for")
        self.secrets.setdefault(text, label)

    def add_signatures_from(self, authorization: str | bytes) -> int:
        """Registers every `Signature=<hex>` in an Authorization value; returns how many."""
        text = authorization.decode("latin-1") if isinstance(authorization, bytes) else authorization
        found = _SIGNATURE.findall(text)
        for signature in found:
            self.add_secret("signature", signature)
        return len(found)

    def add_text(self, source: str, text: str | bytes | None) -> None:
        if text is None:
            return
        if isinstance(text, bytes):
            text = text.decode("latin-1")
        self.texts.append((source, text))

    def hits(self) -> list[Hit]:
        out: list[Hit] = []
        for source, text in self.texts:
            lowered = text.lower()
            for secret, label in self.secrets.items():
                # Hex secrets may be printed in either case; other secrets are case-sensitive.
                at = lowered.find(secret.lower()) if re.fullmatch(r"[0-9a-f]+", secret) else text.find(secret)
                if at >= 0:
                    start = max(0, at - 30)
                    excerpt = text[start:at] + "<" + label + ">" + text[at + len(secret):at + len(secret) + 30]
                    out.append(Hit(source, label, excerpt))
        return out

    def assert_clean(self) -> None:
        assert self.secrets, "no secrets registered: the scan would prove nothing"
        assert self.texts, "no texts captured: the scan would prove nothing"
        hits = self.hits()
        assert not hits, "secrets leaked:\n" + "\n".join(f"  {h.source}: {h.label}: {h.excerpt!r}" for h in hits)


@contextlib.contextmanager
def capture_logs(level: str = "debug") -> Iterator[io.StringIO]:
    """The proxy's own logging set-up at `level` (as `serve --log-level`), writing JSON lines into
    the yielded buffer; the root logger's handlers and every logger's level are restored after."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_levels = {name: logger.level for name, logger in logging.root.manager.loggerDict.items()
                    if isinstance(logger, logging.Logger)}
    buffer = io.StringIO()
    setup_logging(level, stream=buffer)
    # Also what pytest's caplog would see: everything that reaches the root handlers.
    assert isinstance(root.handlers[0].formatter, JsonFormatter)
    try:
        yield buffer
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for name, lvl in saved_levels.items():
            logging.getLogger(name).setLevel(lvl)
