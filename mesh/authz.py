"""L4 authorization as ztunnel applies it to inbound connections (SPEC §8, reference §9).

Order: any matching DENY rejects; otherwise no ALLOW policy means allow; otherwise one ALLOW must match.
Dry-run policies never change the outcome; the decision reports what they would have done so the caller
can log it (istiod's AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY behaviour).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from hbone.identity import Identity
from mesh.model import (
    Action,
    Authorization,
    IPAddress,
    IPNetwork,
    RbacMatch,
    ServiceAccountMatch,
    StringMatch,
    canonical_ip,
)

T = TypeVar("T")

_EMPTY_MATCH = RbacMatch()


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """What a policy can see of a connection. The destination is the resolved target (target port)."""

    source_identity: Identity | None  # only from an mTLS peer certificate
    source_ip: IPAddress
    destination_ip: IPAddress
    destination_port: int


@dataclass(frozen=True, slots=True)
class DryRunResult:
    policy: str  # <namespace>/<name>
    action: Action
    matched: bool


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    policy: str | None  # the deciding policy, when one decided
    reason: str
    dry_run: tuple[DryRunResult, ...] = ()
    # The outcome had the dry-run policies been enforced too; None when no dry-run policy applies.
    dry_run_allowed: bool | None = None


def _passes(positive: tuple[T, ...], negative: tuple[T, ...], test: Callable[[T], bool]) -> bool:
    return (not positive or any(test(x) for x in positive)) and not any(test(x) for x in negative)


def _in(ip: IPAddress, net: IPNetwork) -> bool:
    return ip.version == net.version and ip in net


def match_matches(m: RbacMatch, conn: ConnectionInfo) -> bool:
    """One match: every non-empty field must pass. An all-empty match never matches (ztunnel skips it)."""
    if m == _EMPTY_MATCH:
        return False
    peer = conn.source_identity
    src = canonical_ip(conn.source_ip)
    dst = canonical_ip(conn.destination_ip)

    # Without an mTLS identity no principal, namespace or service account entry can match.
    def principal(s: StringMatch) -> bool:
        return peer is not None and s.matches(peer.principal)

    def namespace(s: StringMatch) -> bool:
        return peer is not None and s.matches(peer.namespace)

    def service_account(sa: ServiceAccountMatch) -> bool:
        if peer is None:
            return False
        return peer.namespace == sa.namespace and peer.service_account == sa.service_account

    return (
        _passes(m.destination_ports, m.not_destination_ports, lambda p: p == conn.destination_port)
        and _passes(m.source_ips, m.not_source_ips, lambda n: _in(src, n))
        and _passes(m.destination_ips, m.not_destination_ips, lambda n: _in(dst, n))
        and _passes(m.principals, m.not_principals, principal)
        and _passes(m.namespaces, m.not_namespaces, namespace)
        and _passes(m.service_accounts, m.not_service_accounts, service_account)
    )


def policy_matches(policy: Authorization, conn: ConnectionInfo) -> bool:
    """Any rule; a rule needs all its clauses; a clause needs any of its matches, or has none."""
    return any(
        all(not clause or any(match_matches(m, conn) for m in clause) for clause in rule) for rule in policy.rules
    )


def _enforce(policies: list[Authorization], conn: ConnectionInfo) -> Decision:
    allows: list[Authorization] = []
    for p in policies:
        if p.action is Action.DENY:
            if policy_matches(p, conn):
                return Decision(False, p.key, f"denied by policy {p.key}")
        else:
            allows.append(p)
    if not allows:
        return Decision(True, None, "allowed: no ALLOW policy applies")
    for p in allows:
        if policy_matches(p, conn):
            return Decision(True, p.key, f"allowed by policy {p.key}")
    return Decision(False, None, "denied: no ALLOW policy matched")


def decide(policies: Iterable[Authorization], conn: ConnectionInfo) -> Decision:
    """Whether `conn` may reach a workload that `policies` (see MeshState.policies_for) apply to."""
    all_policies = list(policies)
    enforced = [p for p in all_policies if not p.dry_run]
    decision = _enforce(enforced, conn)
    dry = [p for p in all_policies if p.dry_run]
    if not dry:
        return decision
    results = tuple(DryRunResult(p.key, p.action, policy_matches(p, conn)) for p in dry)
    shadow = _enforce(all_policies, conn)
    return Decision(decision.allowed, decision.policy, decision.reason, results, shadow.allowed)
