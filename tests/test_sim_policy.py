"""Auth-policy evaluation, statement by statement, against the documented IAM evaluation logic:
default deny, explicit deny wins, principal forms, wildcards, each condition operator with its
IfExists / ForAnyValue / ForAllValues forms. Expected verdicts are written by hand from the docs."""

from __future__ import annotations

import pytest

from sigv4proxy.sim.conditions import PolicyError
from sigv4proxy.sim.identities import identity_from_dict
from sigv4proxy.sim.policy import Policy, RequestFacts, denial_message, evaluate

SVC = "arn:aws:vpc-lattice:us-west-2:111122223333:service/svc-0123"
ROLE = "arn:aws:iam::111122223333:role/app"
SESSION = "arn:aws:sts::111122223333:assumed-role/app/session"
CALLER = identity_from_dict({
    "access_key_id": "AKIDPOLICY0000000001", "secret_access_key": "s", "principal": SESSION,
    "org_id": "o-abc", "principal_tags": {"Team": "payments", "env": "prod"},
}, "test")
OTHER = identity_from_dict({"access_key_id": "AKIDOTHER00000000001", "secret_access_key": "s",
                            "principal": "arn:aws:sts::444455556666:assumed-role/other/s"}, "test")


def facts(method="GET", path="/items/1", headers=(), query=(), port=443, ip="10.0.1.7") -> RequestFacts:
    return RequestFacts(method=method, path=path, headers=list(headers), query=list(query), port=port,
                        service_arn=SVC, service_network_arn="arn:aws:vpc-lattice:us-west-2:111122223333:servicenetwork/sn-1",
                        source_ip=ip, source_vpc="vpc-0abc", source_vpc_owner_account="111122223333")


def stmt(effect="Allow", principal="*", action="vpc-lattice-svcs:Invoke", resource="*", condition=None, **extra):
    s = {"Effect": effect, "Principal": principal, "Action": action, "Resource": resource, **extra}
    if condition is not None:
        s["Condition"] = condition
    return s


def verdict(statements, identity=CALLER, **kw) -> bool:
    return evaluate(Policy.from_document({"Statement": statements}), identity, facts(**kw)).allowed


def cond(op, key, value) -> list[dict]:
    return [stmt(condition={op: {key: value}})]


# --- statement-level logic ---

def test_default_deny_and_no_statement_applies():
    d = evaluate(Policy.from_document({"Statement": [stmt(action="vpc-lattice-svcs:Other")]}), CALLER, facts())
    assert (d.allowed, d.reason, d.statement) == (False, "no_allow", None)


def test_explicit_deny_wins_regardless_of_order():
    for statements in ([stmt(Sid="A"), stmt("Deny", Sid="D")], [stmt("Deny", Sid="D"), stmt(Sid="A")]):
        d = evaluate(Policy.from_document({"Statement": statements}), CALLER, facts())
        assert (d.allowed, d.reason, d.statement) == (False, "explicit_deny", "D")


def test_allow_names_the_statement_by_sid_or_index():
    d = evaluate(Policy.from_document({"Statement": [stmt(action="x:y"), stmt()]}), CALLER, facts())
    assert (d.allowed, d.reason, d.statement, d.statement_index) == (True, "allow", "#1", 1)


def test_no_policy_allows_authenticated_only():
    assert evaluate(None, CALLER, facts()).allowed
    assert not evaluate(None, None, facts()).allowed


def test_denial_messages():
    deny = evaluate(Policy.from_document({"Statement": [stmt("Deny")]}), CALLER, facts())
    assert denial_message(deny, SESSION, SVC + "/x") == (
        f"User: {SESSION} is not authorized to perform: vpc-lattice-svcs:Invoke on resource: {SVC}/x "
        "with an explicit deny in a service-based policy")
    none = evaluate(Policy.from_document({"Statement": [stmt(action="x:y")]}), None, facts())
    assert denial_message(none, None, SVC + "/x") == (
        f"User: anonymous is not authorized to perform: vpc-lattice-svcs:Invoke on resource: {SVC}/x "
        "because no service-based policy allows the vpc-lattice-svcs:Invoke action")


# --- principals ---

@pytest.mark.parametrize("principal, identity, allowed", [
    ("*", CALLER, True),
    ("*", None, True),  # "*" includes anonymous callers
    ({"AWS": "*"}, None, True),
    ({"AWS": ROLE}, CALLER, True),  # a role session matches its role ARN
    ({"AWS": SESSION}, CALLER, True),
    ({"AWS": "arn:aws:iam::111122223333:role/other"}, CALLER, False),
    ({"AWS": "111122223333"}, CALLER, True),
    ({"AWS": "arn:aws:iam::111122223333:root"}, CALLER, True),
    ({"AWS": "arn:aws:iam::111122223333:root"}, OTHER, False),
    ({"AWS": ["arn:aws:iam::999999999999:root", ROLE]}, CALLER, True),
    ({"AWS": ROLE}, None, False),
    ({"Service": "lambda.amazonaws.com"}, CALLER, False),
    ({"AWS": "arn:aws:iam::111122223333:role/*"}, CALLER, False),  # no wildcards in principals
])
def test_principal_forms(principal, identity, allowed):
    assert verdict([stmt(principal=principal)], identity=identity) is allowed


def test_not_principal():
    s = {"Effect": "Allow", "NotPrincipal": {"AWS": ROLE}, "Action": "*", "Resource": "*"}
    assert not verdict([s])
    assert verdict([s], identity=OTHER)


# --- actions and resources ---

@pytest.mark.parametrize("action, allowed", [
    ("vpc-lattice-svcs:Invoke", True), ("vpc-lattice-svcs:*", True), ("*", True),
    ("VPC-LATTICE-SVCS:invoke", True),  # action names are case-insensitive
    ("vpc-lattice-svcs:Inv?ke", True), ("vpc-lattice-svcs:Connect", False), ("vpc-lattice:*", False),
    (["s3:GetObject", "vpc-lattice-svcs:Invoke"], True),
])
def test_action_wildcards(action, allowed):
    assert verdict([stmt(action=action)]) is allowed


def test_not_action():
    base = {"Effect": "Allow", "Principal": "*", "Resource": "*"}
    assert not verdict([{**base, "NotAction": "vpc-lattice-svcs:*"}])
    assert verdict([{**base, "NotAction": "s3:*"}])


@pytest.mark.parametrize("resource, path, allowed", [
    (f"{SVC}/*", "/items/1", True),
    (f"{SVC}/items/*", "/items/1", True),
    (f"{SVC}/items/*", "/other", False),
    (f"{SVC}/items/?", "/items/1", True),
    (f"{SVC}/items/?", "/items/12", False),
    (f"{SVC.upper()}/*", "/items/1", False),  # resources are case-sensitive
    ("arn:aws:vpc-lattice:us-west-2:111122223333:service/svc-9999/*", "/items/1", False),
    ("*", "/anything", True),
])
def test_resource_wildcards(resource, path, allowed):
    assert verdict([stmt(resource=resource)], path=path) is allowed


# --- condition operators ---

M = "vpc-lattice-svcs:RequestMethod"
P = "vpc-lattice-svcs:RequestPath"
H = "vpc-lattice-svcs:RequestHeader/x-tenant"
Q = "vpc-lattice-svcs:RequestQueryString/color"


@pytest.mark.parametrize("op, key, value, kw, allowed", [
    ("StringEquals", M, "GET", {}, True),
    ("StringEquals", M, ["POST", "GET"], {}, True),
    ("StringEquals", M, "get", {}, False),
    ("StringEquals", "VPC-LATTICE-SVCS:requestmethod", "GET", {}, True),  # keys are case-insensitive
    ("StringNotEquals", M, "DELETE", {}, True),
    ("StringNotEquals", M, ["DELETE", "GET"], {}, False),
    ("StringEqualsIgnoreCase", M, "get", {}, True),
    ("StringNotEqualsIgnoreCase", M, "get", {}, False),
    ("StringLike", P, "/items/*", {}, True),
    ("StringLike", P, "/it?ms/1", {}, True),
    ("StringLike", P, "/admin/*", {}, False),
    ("StringNotLike", P, "/admin/*", {}, True),
    ("StringEquals", H, "acme", {"headers": [("X-Tenant", "acme")]}, True),  # header names any case
    ("StringEquals", H, "acme", {"headers": [("x-tenant", "ACME")]}, False),
    ("StringEquals", H, "acme", {}, False),  # missing key fails a positive operator
    ("StringNotEquals", H, "acme", {}, True),  # ... and passes a negated one
    ("StringEqualsIfExists", H, "acme", {}, True),
    ("StringEqualsIfExists", H, "acme", {"headers": [("x-tenant", "other")]}, False),
    ("StringEquals", Q, "red", {"query": [("color", "red")]}, True),
    ("StringEquals", Q, "red", {"query": [("colour", "red")]}, False),
    ("StringEquals", "vpc-lattice-svcs:Port", "443", {}, True),
    ("NumericEquals", "vpc-lattice-svcs:Port", "443", {}, True),
    ("NumericNotEquals", "vpc-lattice-svcs:Port", "443", {}, False),
    ("NumericLessThan", "vpc-lattice-svcs:Port", "1024", {}, True),
    ("NumericLessThan", "vpc-lattice-svcs:Port", "443", {}, False),
    ("NumericLessThanEquals", "vpc-lattice-svcs:Port", "443", {}, True),
    ("NumericGreaterThan", "vpc-lattice-svcs:Port", "80", {}, True),
    ("NumericGreaterThanEquals", "vpc-lattice-svcs:Port", "444", {}, False),
    ("NumericEquals", "vpc-lattice-svcs:Port", "not-a-number", {}, False),
    ("ArnEquals", "vpc-lattice-svcs:ServiceArn", SVC, {}, True),
    ("ArnLike", "vpc-lattice-svcs:ServiceArn", "arn:aws:vpc-lattice:*:111122223333:service/*", {}, True),
    ("ArnLike", "vpc-lattice-svcs:ServiceArn", "arn:aws:vpc-lattice:*:999999999999:service/*", {}, False),
    ("ArnNotLike", "vpc-lattice-svcs:ServiceNetworkArn", "arn:aws:vpc-lattice:*:*:servicenetwork/sn-2", {}, True),
    ("StringEquals", "vpc-lattice-svcs:SourceVpc", "vpc-0abc", {}, True),
    ("StringEquals", "vpc-lattice-svcs:SourceVpcOwnerAccount", "111122223333", {}, True),
    ("StringEquals", "aws:PrincipalOrgID", "o-abc", {}, True),
    ("StringEquals", "aws:PrincipalOrgID", "o-other", {}, False),
    ("StringEquals", "aws:PrincipalAccount", "111122223333", {}, True),
    ("StringEquals", "aws:PrincipalTag/team", "payments", {}, True),  # tag keys are case-insensitive
    ("StringEquals", "aws:PrincipalTag/Team", "Payments", {}, False),  # values are not
    ("IpAddress", "aws:SourceIp", "10.0.0.0/16", {}, True),
    ("IpAddress", "aws:SourceIp", ["192.168.0.0/16", "10.0.1.7/32"], {}, True),
    ("IpAddress", "aws:SourceIp", "10.1.0.0/16", {}, False),
    ("NotIpAddress", "aws:SourceIp", "10.1.0.0/16", {}, True),
    ("IpAddress", "aws:SourceIp", "::1/128", {"ip": "::1"}, True),
    ("Bool", "aws:SecureTransport", "true", {}, False),  # key absent here
    ("BoolIfExists", "aws:SecureTransport", "true", {}, True),
    ("Null", H, "true", {}, True),
    ("Null", H, "false", {}, False),
    ("Null", H, "false", {"headers": [("x-tenant", "a")]}, True),
])
def test_condition_operators(op, key, value, kw, allowed):
    assert verdict(cond(op, key, value), **kw) is allowed


@pytest.mark.parametrize("op, value, query, allowed", [
    ("ForAnyValue:StringEquals", ["red"], [("color", "blue"), ("color", "red")], True),
    ("ForAnyValue:StringEquals", ["green"], [("color", "blue"), ("color", "red")], False),
    ("ForAnyValue:StringEquals", ["red"], [], False),  # missing key: ForAnyValue is false
    ("ForAllValues:StringEquals", ["red", "blue"], [("color", "blue"), ("color", "red")], True),
    ("ForAllValues:StringEquals", ["red"], [("color", "blue"), ("color", "red")], False),
    ("ForAllValues:StringEquals", ["red"], [], True),  # missing key: ForAllValues is vacuously true
    ("ForAllValues:StringLike", ["r*", "b*"], [("color", "blue"), ("color", "red")], True),
    ("ForAnyValue:StringNotEquals", ["red"], [("color", "red"), ("color", "blue")], True),
    ("ForAllValues:StringNotEquals", ["red"], [("color", "red"), ("color", "blue")], False),
])
def test_set_qualifiers(op, value, query, allowed):
    assert verdict(cond(op, Q, value), query=query) is allowed


def test_all_conditions_must_hold():
    c = {"StringEquals": {M: "GET"}, "StringLike": {P: "/admin/*"}}
    assert not verdict([stmt(condition=c)])
    assert verdict([stmt(condition=c)], path="/admin/x")


def test_deny_with_condition_only_denies_matching_requests():
    statements = [stmt(Sid="AllowAll"),
                  stmt("Deny", Sid="NoAdminDelete", resource=f"{SVC}/admin/*", condition={"StringEquals": {M: "DELETE"}})]
    assert verdict(statements, method="DELETE", path="/items/1")
    assert verdict(statements, method="GET", path="/admin/x")
    d = evaluate(Policy.from_document({"Statement": statements}), CALLER, facts(method="DELETE", path="/admin/x"))
    assert (d.allowed, d.reason, d.statement) == (False, "explicit_deny", "NoAdminDelete")


@pytest.mark.parametrize("doc, fragment", [
    ({}, "Statement"),
    ({"Statement": []}, "Statement"),
    ({"Statement": [{"Effect": "Maybe", "Principal": "*", "Action": "*", "Resource": "*"}]}, "Effect"),
    ({"Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}, "Principal"),
    ({"Statement": [{"Effect": "Allow", "Principal": "*", "Resource": "*"}]}, "Action"),
    ({"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "*", "NotAction": "*", "Resource": "*"}]}, "not both"),
    ({"Statement": [stmt(condition={"StringSorta": {M: "GET"}})]}, "StringSorta"),
    ({"Statement": [stmt(condition={"ForSomeValues:StringEquals": {M: "GET"}})]}, "qualifier"),
    ({"Statement": [stmt(condition={"StringEquals": {M: {"nested": 1}}})]}, "condition values"),
    ({"Statement": [stmt(principal="somebody")]}, "Principal"),
    ("not an object", "object"),
])
def test_malformed_policies_raise_policy_error(doc, fragment):
    with pytest.raises(PolicyError, match=fragment):
        Policy.from_document(doc)


def test_single_statement_object_is_accepted():
    assert Policy.from_document({"Statement": stmt()}).statements[0].effect == "Allow"
