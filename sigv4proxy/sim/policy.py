"""VPC Lattice auth-policy evaluation (the IAM document users attach with put-auth-policy).

Owns: parsing a policy once into typed statements, building the request context (condition keys)
for a request, and the decision: default deny, an applicable explicit Deny wins, otherwise an
applicable Allow allows. Pure: no network, no clock, no logging.
Must never: let a malformed policy through silently (it raises PolicyError when loaded).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sigv4proxy.sim import read_json_file
from sigv4proxy.sim.conditions import ConditionClause, Context, PolicyError, glob_match, parse_condition_block
from sigv4proxy.sim.identities import Identity

INVOKE_ACTION = "vpc-lattice-svcs:Invoke"
ANONYMOUS = "anonymous"

__all__ = [
    "Decision",
    "Policy",
    "PolicyError",
    "RequestFacts",
    "Statement",
    "build_context",
    "evaluate",
    "denial_message",
]


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str  # "allow" | "explicit_deny" | "no_allow"
    statement: str | None = None  # Sid, or "#<index>" when the statement has none
    statement_index: int | None = None


@dataclass(frozen=True)
class PrincipalSpec:
    any: bool = False
    aws: tuple[str, ...] = ()  # ARNs or account ids

    def matches(self, identity: Identity | None) -> bool:
        if self.any:
            return True
        if identity is None:
            return False
        for entry in self.aws:
            if entry == identity.principal or (identity.role_arn and entry == identity.role_arn):
                return True
            account = entry if entry.isdigit() else _root_account(entry)
            if account and account == identity.account:
                return True
        return False


def _root_account(arn: str) -> str | None:
    parts = arn.split(":")
    if len(parts) == 6 and parts[2] == "iam" and parts[5] == "root":
        return parts[4]
    return None


def _parse_principal(raw: Any, where: str) -> PrincipalSpec:
    if raw == "*":
        return PrincipalSpec(any=True)
    if not isinstance(raw, Mapping):
        raise PolicyError(f'{where}: Principal must be "*" or an object like {{"AWS": ...}}')
    aws = raw.get("AWS")
    entries = aws if isinstance(aws, list) else ([] if aws is None else [aws])
    if not all(isinstance(e, str) for e in entries):
        raise PolicyError(f"{where}: Principal AWS entries must be strings")
    if "*" in entries:
        return PrincipalSpec(any=True)
    return PrincipalSpec(aws=tuple(entries))  # Service/Federated principals never match a caller here


def _strings(raw: Any, where: str) -> tuple[str, ...]:
    items = raw if isinstance(raw, list) else [raw]
    if not items or not all(isinstance(i, str) for i in items):
        raise PolicyError(f"{where} must be a string or a list of strings")
    return tuple(items)


@dataclass(frozen=True)
class Statement:
    index: int
    sid: str | None
    effect: str  # "Allow" | "Deny"
    principal: PrincipalSpec | None
    not_principal: PrincipalSpec | None
    actions: tuple[str, ...] | None
    not_actions: tuple[str, ...] | None
    resources: tuple[str, ...] | None
    not_resources: tuple[str, ...] | None
    conditions: tuple[ConditionClause, ...] = field(default=())

    @property
    def label(self) -> str:
        return self.sid or f"#{self.index}"

    def applies(self, identity: Identity | None, action: str, resource: str, context: Context) -> bool:
        if self.principal is not None and not self.principal.matches(identity):
            return False
        if self.not_principal is not None and self.not_principal.matches(identity):
            return False
        if self.actions is not None and not any(glob_match(a, action, True) for a in self.actions):
            return False
        if self.not_actions is not None and any(glob_match(a, action, True) for a in self.not_actions):
            return False
        if self.resources is not None and not any(glob_match(r, resource) for r in self.resources):
            return False
        if self.not_resources is not None and any(glob_match(r, resource) for r in self.not_resources):
            return False
        return all(c.holds(context) for c in self.conditions)


def _pair(raw: Mapping[str, Any], pos: str, neg: str, where: str, required: bool) -> tuple[Any, Any]:
    has_pos, has_neg = pos in raw, neg in raw
    if has_pos and has_neg:
        raise PolicyError(f"{where}: use either {pos} or {neg}, not both")
    if required and not (has_pos or has_neg):
        raise PolicyError(f"{where}: needs {pos} or {neg}")
    return raw.get(pos), raw.get(neg)


def parse_statement(raw: Any, index: int) -> Statement:
    where = f"Statement[{index}]"
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where} must be an object")
    effect = raw.get("Effect")
    if effect not in ("Allow", "Deny"):
        raise PolicyError(f'{where}: Effect must be "Allow" or "Deny"')
    principal, not_principal = _pair(raw, "Principal", "NotPrincipal", where, True)
    actions, not_actions = _pair(raw, "Action", "NotAction", where, True)
    resources, not_resources = _pair(raw, "Resource", "NotResource", where, True)
    sid = raw.get("Sid")
    if sid is not None and not isinstance(sid, str):
        raise PolicyError(f"{where}: Sid must be a string")
    return Statement(
        index=index,
        sid=sid or None,
        effect=effect,
        principal=_parse_principal(principal, where) if "Principal" in raw else None,
        not_principal=_parse_principal(not_principal, where) if "NotPrincipal" in raw else None,
        actions=_strings(actions, f"{where}.Action") if "Action" in raw else None,
        not_actions=_strings(not_actions, f"{where}.NotAction") if "NotAction" in raw else None,
        resources=_strings(resources, f"{where}.Resource") if "Resource" in raw else None,
        not_resources=_strings(not_resources, f"{where}.NotResource") if "NotResource" in raw else None,
        conditions=parse_condition_block(raw.get("Condition"), where),
    )


@dataclass(frozen=True)
class Policy:
    statements: tuple[Statement, ...]

    @classmethod
    def from_document(cls, doc: Any) -> Policy:
        if not isinstance(doc, Mapping):
            raise PolicyError("policy must be a JSON object")
        raw = doc.get("Statement")
        items = raw if isinstance(raw, list) else ([raw] if isinstance(raw, Mapping) else None)
        if not items:
            raise PolicyError("policy needs a non-empty Statement")
        return cls(tuple(parse_statement(s, i) for i, s in enumerate(items)))

    @classmethod
    def load(cls, source: str | pathlib.Path | Mapping[str, Any] | Policy) -> Policy:
        if isinstance(source, Policy):
            return source
        if isinstance(source, Mapping):
            return cls.from_document(source)
        return cls.from_document(read_json_file(source, "policy", PolicyError))


@dataclass(frozen=True)
class RequestFacts:
    """What Lattice knows about a request when it authorizes it."""

    method: str
    path: str  # raw path, without the query
    headers: Sequence[tuple[str, str]] = ()  # (name, value); names compared case-insensitively
    query: Sequence[tuple[str, str]] = ()
    port: int | None = None
    service_arn: str = ""
    service_network_arn: str | None = None
    source_ip: str | None = None
    source_vpc: str | None = None
    source_vpc_owner_account: str | None = None


def build_context(facts: RequestFacts, identity: Identity | None) -> dict[str, list[str]]:
    """The condition keys, lowercased (IAM keys are case-insensitive; values are not)."""
    ctx: dict[str, list[str]] = {
        "vpc-lattice-svcs:requestmethod": [facts.method],
        "vpc-lattice-svcs:requestpath": [facts.path],
        "vpc-lattice-svcs:servicearn": [facts.service_arn],
    }
    for name, value in facts.headers:
        ctx.setdefault(f"vpc-lattice-svcs:requestheader/{name.lower()}", []).append(value)
    for key, value in facts.query:
        ctx.setdefault(f"vpc-lattice-svcs:requestquerystring/{key.lower()}", []).append(value)
    optional: dict[str, str | None] = {
        "vpc-lattice-svcs:port": str(facts.port) if facts.port is not None else None,
        "vpc-lattice-svcs:servicenetworkarn": facts.service_network_arn,
        "vpc-lattice-svcs:sourcevpc": facts.source_vpc,
        "vpc-lattice-svcs:sourcevpcowneraccount": facts.source_vpc_owner_account,
        "aws:sourceip": facts.source_ip,
    }
    if identity is not None:
        optional.update(
            {
                "aws:principalarn": identity.role_arn or identity.principal,
                "aws:principalaccount": identity.account,
                "aws:principalorgid": identity.org_id,
            }
        )
        for tag, value in identity.principal_tags.items():
            ctx[f"aws:principaltag/{tag.lower()}"] = [value]
    for key, known in optional.items():
        if known is not None:
            ctx[key] = [known]
    return ctx


def evaluate(
    policy: Policy | None, identity: Identity | None, facts: RequestFacts, action: str = INVOKE_ACTION
) -> Decision:
    """IAM logic: an applicable Deny wins; else the first applicable Allow; else default deny.

    `policy=None` means no auth policy: every authenticated caller is allowed, anonymous is not.
    """
    if policy is None:
        return Decision(True, "allow") if identity is not None else Decision(False, "no_allow")
    resource = facts.service_arn + facts.path
    context = build_context(facts, identity)
    allow: Statement | None = None
    for stmt in policy.statements:
        if not stmt.applies(identity, action, resource, context):
            continue
        if stmt.effect == "Deny":
            return Decision(False, "explicit_deny", stmt.label, stmt.index)
        if allow is None:
            allow = stmt
    if allow is not None:
        return Decision(True, "allow", allow.label, allow.index)
    return Decision(False, "no_allow")


def denial_message(decision: Decision, principal: str | None, resource: str) -> str:
    # IAM's wording: "... with an explicit deny in ..." has no "because".
    why = (
        "with an explicit deny in a service-based policy"
        if decision.reason == "explicit_deny"
        else "because no service-based policy allows the vpc-lattice-svcs:Invoke action"
    )
    return f"User: {principal or ANONYMOUS} is not authorized to perform: {INVOKE_ACTION} on resource: {resource} {why}"
