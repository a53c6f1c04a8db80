"""IAM condition operators for the simulator's auth-policy evaluator.

Owns: parsing an operator name (with its `...IfExists` suffix and `ForAnyValue:`/`ForAllValues:`
qualifier) and deciding one condition block against the request context. Pure: no I/O.
Must never: treat a missing key as a match for a positive operator (IAM semantics: a missing key
fails a positive operator, passes a negated one, and passes anything with `...IfExists`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache


class PolicyError(ValueError):
    """The policy document is malformed (the message says where)."""


Context = Mapping[str, Sequence[str]]  # lowercase condition key -> values


@lru_cache(maxsize=1024)
def glob_regex(pattern: str, ignore_case: bool = False) -> re.Pattern[str]:
    """IAM wildcards: `*` any run of characters, `?` exactly one; everything else literal."""
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(body, re.DOTALL | (re.IGNORECASE if ignore_case else 0))


def glob_match(pattern: str, value: str, ignore_case: bool = False) -> bool:
    return glob_regex(pattern, ignore_case).fullmatch(value) is not None


def _arn_like(pattern: str, value: str) -> bool:
    # Each of the six colon-separated ARN parts is matched on its own, wildcards per part.
    p_parts, v_parts = pattern.split(":", 5), value.split(":", 5)
    if len(p_parts) != 6 or len(v_parts) != 6:
        return False
    return all(glob_match(p, v) for p, v in zip(p_parts, v_parts, strict=True))


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _numeric(cmp: Callable[[float, float], bool]) -> Callable[[str, str], bool]:
    def match(policy_value: str, value: str) -> bool:
        a, b = _number(value), _number(policy_value)
        return a is not None and b is not None and cmp(a, b)

    return match


def _ip_in(policy_value: str, value: str) -> bool:
    try:
        return ipaddress.ip_address(value) in ipaddress.ip_network(policy_value, strict=False)
    except ValueError:
        return False


# base operator -> (match(policy_value, request_value), negated)
_BASE: dict[str, tuple[Callable[[str, str], bool], bool]] = {
    "stringequals": (lambda p, v: p == v, False),
    "stringnotequals": (lambda p, v: p == v, True),
    "stringequalsignorecase": (lambda p, v: p.lower() == v.lower(), False),
    "stringnotequalsignorecase": (lambda p, v: p.lower() == v.lower(), True),
    "stringlike": (glob_match, False),
    "stringnotlike": (glob_match, True),
    "arnequals": (_arn_like, False),
    "arnlike": (_arn_like, False),
    "arnnotequals": (_arn_like, True),
    "arnnotlike": (_arn_like, True),
    "bool": (lambda p, v: p.lower() == v.lower(), False),
    "ipaddress": (_ip_in, False),
    "notipaddress": (_ip_in, True),
    "numericequals": (_numeric(lambda a, b: a == b), False),
    "numericnotequals": (_numeric(lambda a, b: a == b), True),
    "numericlessthan": (_numeric(lambda a, b: a < b), False),
    "numericlessthanequals": (_numeric(lambda a, b: a <= b), False),
    "numericgreaterthan": (_numeric(lambda a, b: a > b), False),
    "numericgreaterthanequals": (_numeric(lambda a, b: a >= b), False),
}


@dataclass(frozen=True)
class Operator:
    name: str  # as written in the policy
    base: str
    qualifier: str | None  # "foranyvalue" | "forallvalues" | None
    if_exists: bool

    @classmethod
    def parse(cls, name: str) -> Operator:
        prefix, _, rest = name.rpartition(":")
        qualifier = prefix.lower() or None
        if qualifier not in (None, "foranyvalue", "forallvalues"):
            raise PolicyError(f"unknown condition set qualifier in '{name}'")
        base = rest.lower()
        if_exists = base.endswith("ifexists") and base != "ifexists"
        if if_exists:
            base = base[: -len("ifexists")]
        if base != "null" and base not in _BASE:
            raise PolicyError(f"unsupported condition operator '{name}'")
        return cls(name, base, qualifier, if_exists)

    def evaluate(self, key: str, policy_values: Sequence[str], context: Context) -> bool:
        values = context.get(key.lower())
        if self.base == "null":
            want_absent = any(p.lower() == "true" for p in policy_values)
            return (not values) == want_absent
        match, negated = _BASE[self.base]
        if self.qualifier == "forallvalues":
            # Vacuously true for a missing or empty key, as IAM documents.
            if not values:
                return True
            return all(self._one(match, negated, policy_values, v) for v in values)
        if self.qualifier == "foranyvalue":
            if not values:
                return False
            return any(self._one(match, negated, policy_values, v) for v in values)
        if not values:
            return self.if_exists or negated
        return any(self._one(match, negated, policy_values, v) for v in values)

    @staticmethod
    def _one(match: Callable[[str, str], bool], negated: bool, policy_values: Sequence[str], value: str) -> bool:
        hit = any(match(p, value) for p in policy_values)
        return not hit if negated else hit


def _as_strings(raw: object, where: str) -> tuple[str, ...]:
    items = raw if isinstance(raw, list) else [raw]
    out = []
    for item in items:
        if isinstance(item, bool):
            out.append("true" if item else "false")
        elif isinstance(item, (str, int, float)):
            out.append(str(item))
        else:
            raise PolicyError(f"{where}: condition values must be strings, numbers or booleans")
    return tuple(out)


@dataclass(frozen=True)
class ConditionClause:
    operator: Operator
    key: str
    values: tuple[str, ...]

    def holds(self, context: Context) -> bool:
        return self.operator.evaluate(self.key, self.values, context)


def parse_condition_block(raw: object, where: str) -> tuple[ConditionClause, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where}: Condition must be an object")
    clauses = []
    for op_name, keys in raw.items():
        op = Operator.parse(op_name)
        if not isinstance(keys, Mapping) or not keys:
            raise PolicyError(f"{where}: Condition operator '{op_name}' needs an object of keys")
        for key, values in keys.items():
            clauses.append(ConditionClause(op, key, _as_strings(values, f"{where}.{op_name}.{key}")))
    return tuple(clauses)
