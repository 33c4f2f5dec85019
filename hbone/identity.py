"""SPIFFE identities as Istio writes them: spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>."""

from __future__ import annotations

from dataclasses import dataclass

SPIFFE_PREFIX = "spiffe://"
DEFAULT_TRUST_DOMAIN = "cluster.local"


class IdentityError(ValueError):
    """A string that is not an Istio SPIFFE identity."""


@dataclass(frozen=True, slots=True)
class Identity:
    trust_domain: str
    namespace: str
    service_account: str

    @classmethod
    def parse(cls, text: str) -> Identity:
        """Parse `spiffe://td/ns/NS/sa/SA`; anything else raises IdentityError saying why."""
        if not text.startswith(SPIFFE_PREFIX):
            raise IdentityError(f"{text!r} is not a SPIFFE id: it must start with {SPIFFE_PREFIX!r}")
        parts = text[len(SPIFFE_PREFIX) :].split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
            raise IdentityError(f"{text!r} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<sa>")
        trust_domain, _, namespace, _, service_account = parts
        if not trust_domain or not namespace or not service_account:
            raise IdentityError(f"{text!r} has an empty trust domain, namespace or service account")
        return cls(trust_domain, namespace, service_account)

    @classmethod
    def of(cls, namespace: str, service_account: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> Identity:
        return cls(trust_domain or DEFAULT_TRUST_DOMAIN, namespace, service_account or "default")

    @property
    def principal(self) -> str:
        """The identity without `spiffe://`, as authorization policies match it."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return SPIFFE_PREFIX + self.principal
