"""L4 authorization semantics (reference §9), table-driven from YAML policies as users write them."""

from __future__ import annotations

import itertools
from ipaddress import ip_address

import pytest

from hbone.identity import Identity
from mesh.authz import ConnectionInfo, decide, policy_matches
from mesh.config import parse_config
from mesh.model import Action, Authorization

_names = itertools.count()
CLIENT = Identity("cluster.local", "default", "client")
ADMIN = Identity("cluster.local", "ops", "admin")


def conn(
    identity: Identity | None = CLIENT, src: str = "10.0.0.1", dst: str = "10.0.0.2", port: int = 8080
) -> ConnectionInfo:
    return ConnectionInfo(identity, ip_address(src), ip_address(dst), port)


def policies(text: str) -> tuple[Authorization, ...]:
    return parse_config(text, "authz.yaml").policies


def one(action: str, match: str, dry_run: bool = False) -> str:
    """One policy with a single rule/clause/match, as YAML."""
    return (
        f"- {{name: {action.lower()}-{next(_names)}, namespace: default, scope: Namespace, "
        f"action: {action}, dryRun: {str(dry_run).lower()}, rules: [[[{{{match}}}]]]}}\n"
    )


MATCH_CASES = [
    # (match fields, connection, matches?)
    ('principals: [{Exact: "cluster.local/ns/default/sa/client"}]', conn(), True),
    ('principals: [{Exact: "cluster.local/ns/default/sa/client"}]', conn(ADMIN), False),
    ('principals: [{Exact: "cluster.local/ns/default/sa/client"}]', conn(None), False),
    ('principals: [{Prefix: "cluster.local/ns/default/"}]', conn(), True),
    ('principals: [{Suffix: "/sa/admin"}]', conn(ADMIN), True),
    ('principals: [{Suffix: "/sa/admin"}]', conn(), False),
    ("principals: [{Presence: []}]", conn(), True),
    ("principals: [{Presence: []}]", conn(None), False),
    ('notPrincipals: [{Exact: "cluster.local/ns/ops/sa/admin"}]', conn(), True),
    ('notPrincipals: [{Exact: "cluster.local/ns/ops/sa/admin"}]', conn(ADMIN), False),
    # No identity: no entry matches, so a negative list passes (as in ztunnel).
    ('notPrincipals: [{Exact: "cluster.local/ns/ops/sa/admin"}]', conn(None), True),
    ('principals: [!Prefix "cluster.local/ns/"], notPrincipals: [!Suffix /sa/admin]', conn(ADMIN), False),
    ("namespaces: [{Exact: ops}]", conn(ADMIN), True),
    ("namespaces: [{Exact: ops}]", conn(), False),
    ("namespaces: [{Exact: ops}]", conn(None), False),
    ("notNamespaces: [{Exact: ops}]", conn(), True),
    ("serviceAccounts: [{namespace: default, serviceAccount: client}]", conn(), True),
    ("serviceAccounts: [{namespace: ops, serviceAccount: client}]", conn(), False),
    ("serviceAccounts: [{namespace: default, serviceAccount: client}]", conn(None), False),
    ("notServiceAccounts: [{namespace: default, serviceAccount: client}]", conn(), False),
    ("sourceIps: [10.0.0.0/24]", conn(), True),
    ("sourceIps: [10.0.1.0/24]", conn(), False),
    ("sourceIps: [10.0.0.1]", conn(src="::ffff:10.0.0.1"), True),  # mapped IPv4 from a dual-stack socket
    ('sourceIps: ["fd00::/8"]', conn(), False),  # another family never matches
    ('sourceIps: ["fd00::/8"]', conn(src="fd00::1"), True),
    ("notSourceIps: [10.0.0.0/8]", conn(), False),
    ("destinationIps: [10.0.0.2/32]", conn(), True),
    ("notDestinationIps: [10.0.0.2/32]", conn(), False),
    ("destinationPorts: [8080, 9090]", conn(), True),
    ("destinationPorts: [9090]", conn(), False),
    ("notDestinationPorts: [8080]", conn(), False),
    ("notDestinationPorts: [9090]", conn(), True),
    # Every non-empty field must pass.
    ("namespaces: [{Exact: default}], destinationPorts: [9090]", conn(), False),
    ("namespaces: [{Exact: default}], destinationPorts: [8080], sourceIps: [10.0.0.0/8]", conn(), True),
    # An all-empty match never matches.
    ("", conn(), False),
]


@pytest.mark.parametrize(("match", "c", "expected"), MATCH_CASES)
def test_match_fields(match: str, c: ConnectionInfo, expected: bool) -> None:
    (policy,) = policies("policies:\n" + one("Allow", match))
    assert policy_matches(policy, c) is expected


def test_rule_clause_structure() -> None:
    text = """\
policies:
- name: p
  namespace: default
  scope: Namespace
  action: Allow
  rules:
  - - - {namespaces: [{Exact: ops}]}
      - {destinationPorts: [8080]}          # clause 1: either match
    - - {sourceIps: [10.0.0.0/8]}           # clause 2: and this
  - []                                      # a rule with no clauses: all (none) of them match
- {name: norules, namespace: default, scope: Namespace, action: Allow}
- name: emptyclause
  namespace: default
  scope: Namespace
  action: Allow
  rules: [[[], [{destinationPorts: [1]}]]]
"""
    p, norules, emptyclause = policies(text)
    assert policy_matches(p, conn(port=9999))  # via the empty rule
    (first_rule_only,) = policies(text.replace("  - []", "  # -"))[:1]
    assert policy_matches(first_rule_only, conn())
    assert policy_matches(first_rule_only, conn(ADMIN, port=1))
    assert not policy_matches(first_rule_only, conn(port=1))
    assert not policy_matches(first_rule_only, conn(src="192.168.0.1"))
    assert not policy_matches(norules, conn())  # a policy with no rules never matches
    assert policy_matches(emptyclause, conn(port=1))  # an empty clause matches; the other must too
    assert not policy_matches(emptyclause, conn(port=2))


ALLOW_CLIENT = one("Allow", 'principals: [{Exact: "cluster.local/ns/default/sa/client"}]')
ALLOW_ADMIN = one("Allow", "namespaces: [{Exact: ops}]")
DENY_PORT = one("Deny", "destinationPorts: [8080]")
DENY_OTHER_PORT = one("Deny", "destinationPorts: [1]")

DECISIONS = [
    # (policies, connection, allowed?, deciding policy kind)
    ("", conn(), True, None),
    (DENY_OTHER_PORT, conn(), True, None),  # no ALLOW policy → allow
    (DENY_PORT, conn(), False, "deny"),
    (ALLOW_CLIENT, conn(), True, "allow"),
    (ALLOW_CLIENT, conn(ADMIN), False, None),  # an ALLOW exists, none matches
    (ALLOW_CLIENT, conn(None), False, None),
    (ALLOW_CLIENT + ALLOW_ADMIN, conn(ADMIN), True, "allow"),  # one ALLOW suffices
    (ALLOW_CLIENT + DENY_PORT, conn(), False, "deny"),  # DENY wins over a matching ALLOW
    (DENY_PORT + ALLOW_CLIENT, conn(port=9090), True, "allow"),
]


@pytest.mark.parametrize(("text", "c", "allowed", "kind"), DECISIONS)
def test_decision_order(text: str, c: ConnectionInfo, allowed: bool, kind: str | None) -> None:
    d = decide(policies("policies:\n" + text), c)
    assert d.allowed is allowed, d.reason
    if kind is None:
        assert d.policy is None
    else:
        assert d.policy is not None and d.policy.startswith(f"default/{kind}-")
    assert d.reason
    assert d.dry_run == () and d.dry_run_allowed is None


def test_dry_run_is_reported_not_enforced() -> None:
    dry_deny = one("Deny", "destinationPorts: [8080]", dry_run=True)
    d = decide(policies("policies:\n" + dry_deny), conn())
    assert d.allowed
    assert [(r.action, r.matched) for r in d.dry_run] == [(Action.DENY, True)]
    assert d.dry_run_allowed is False  # it would have denied

    dry_allow = one("Allow", "namespaces: [{Exact: ops}]", dry_run=True)
    # A dry-run ALLOW does not turn "no ALLOW policy" into "no ALLOW matched".
    d = decide(policies("policies:\n" + dry_allow), conn())
    assert d.allowed and d.policy is None
    assert [(r.action, r.matched) for r in d.dry_run] == [(Action.ALLOW, False)]
    assert d.dry_run_allowed is False

    # Nor does a dry-run DENY stop an enforced DENY.
    d = decide(policies("policies:\n" + DENY_PORT + dry_allow), conn())
    assert not d.allowed and d.dry_run_allowed is False
