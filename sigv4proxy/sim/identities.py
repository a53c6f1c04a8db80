"""The simulator's identities: which access key belongs to which principal.

Owns: loading and validating the identities JSON file, lookup by access key id, and the facts
about a principal that policies and Lattice headers use (role ARN, account, session name, org,
tags). Must never: show a secret or a session token in a repr, an error or a log.
"""

from __future__ import annotations

import hmac
import pathlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sigv4proxy.sim import read_json_file

_ASSUMED_ROLE = re.compile(r"^arn:(aws[\w-]*):sts::(\d{12}):assumed-role/([^/]+)/(.+)$")
_ARN_ACCOUNT = re.compile(r"^arn:aws[\w-]*:(?:iam|sts)::(\d{12}):")


class IdentitiesError(ValueError):
    """The identities file is missing, unreadable or malformed (message names the field)."""


@dataclass(frozen=True)
class Identity:
    access_key_id: str
    secret_access_key: str = field(repr=False)
    principal: str
    session_token: str | None = field(default=None, repr=False)
    role_arn: str | None = None
    account: str | None = None
    org_id: str | None = None
    principal_tags: Mapping[str, str] = field(default_factory=dict)

    @property
    def session_name(self) -> str | None:
        m = _ASSUMED_ROLE.match(self.principal)
        return m.group(4) if m else None

    def token_matches(self, presented: str | None) -> bool:
        """True when the presented token is exactly what this identity needs (none if it has none)."""
        if self.session_token is None:
            return presented is None
        if presented is None:
            return False
        return hmac.compare_digest(presented.encode(), self.session_token.encode())


def _derive_role_arn(principal: str) -> str | None:
    m = _ASSUMED_ROLE.match(principal)
    return f"arn:{m.group(1)}:iam::{m.group(2)}:role/{m.group(3)}" if m else None


def _derive_account(principal: str) -> str | None:
    m = _ARN_ACCOUNT.match(principal)
    return m.group(1) if m else None


def identity_from_dict(raw: Mapping[str, Any], where: str) -> Identity:
    if not isinstance(raw, Mapping):
        raise IdentitiesError(f"{where}: an identity must be an object")
    for key in ("access_key_id", "secret_access_key", "principal"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise IdentitiesError(f"{where}: '{key}' must be a non-empty string")
    tags = raw.get("principal_tags") or {}
    if not isinstance(tags, Mapping) or not all(isinstance(v, str) for v in tags.values()):
        raise IdentitiesError(f"{where}: 'principal_tags' must map strings to strings")
    for key in ("session_token", "role_arn", "account", "org_id"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise IdentitiesError(f"{where}: '{key}' must be a string")
    principal = raw["principal"]
    return Identity(
        access_key_id=raw["access_key_id"],
        secret_access_key=raw["secret_access_key"],
        principal=principal,
        session_token=raw.get("session_token") or None,
        role_arn=raw.get("role_arn") or _derive_role_arn(principal),
        account=raw.get("account") or _derive_account(principal),
        org_id=raw.get("org_id"),
        principal_tags=dict(tags),
    )


class IdentityStore:
    """Access key id → Identity. Built once; lookups are a dict get."""

    def __init__(self, identities: list[Identity]) -> None:
        self._by_key: dict[str, Identity] = {}
        for ident in identities:
            if ident.access_key_id in self._by_key:
                raise IdentitiesError(f"duplicate access_key_id {ident.access_key_id}")
            self._by_key[ident.access_key_id] = ident

    def get(self, access_key_id: str) -> Identity | None:
        return self._by_key.get(access_key_id)

    def by_principal(self, principal: str) -> Identity | None:
        return next((i for i in self._by_key.values() if i.principal == principal), None)

    def __len__(self) -> int:
        return len(self._by_key)

    def __repr__(self) -> str:
        return f"IdentityStore({len(self)} identities)"

    @classmethod
    def from_document(cls, doc: Any) -> IdentityStore:
        if not isinstance(doc, Mapping) or not isinstance(doc.get("identities"), list):
            raise IdentitiesError("identities document must be an object with an 'identities' list")
        return cls([identity_from_dict(raw, f"identities[{i}]") for i, raw in enumerate(doc["identities"])])

    @classmethod
    def load(cls, source: str | pathlib.Path | Mapping[str, Any] | IdentityStore | None) -> IdentityStore:
        """Accepts a path, an already-parsed document, a store, or None (no identities)."""
        if source is None:
            return cls([])
        if isinstance(source, IdentityStore):
            return source
        if isinstance(source, Mapping):
            return cls.from_document(source)
        return cls.from_document(read_json_file(source, "identities", IdentitiesError))
