"""Building the three kinds of certificate in the mesh: root, per-cluster intermediate, workload leaf.

Pure crypto, no files: the authority decides validity and who signs, this module decides what the
certificates contain. The extensions are chosen so OpenSSL's strict mode (Python 3.13's default) and
cryptography's RFC 5280 verifier both accept the chain: key identifiers everywhere, critical basic
constraints, and a critical SAN on leaves, whose subject is empty as in Istio.
"""

from __future__ import annotations

from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs.pem import PrivateKey
from hbone.identity import Identity

DEFAULT_ORGANIZATION = "ambient-py"


def new_key() -> ec.EllipticCurvePrivateKey:
    """Every key we generate is ECDSA P-256 (SPEC §3.1): small, fast, what Istio uses for workloads."""
    return ec.generate_private_key(ec.SECP256R1())


def _key_usage(*, signature: bool = False, encipherment: bool = False, ca: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=signature,
        content_commitment=False,
        key_encipherment=encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _base(
    subject: x509.Name, public_key: ec.EllipticCurvePublicKey, not_before: datetime, not_after: datetime
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _authority_key_id(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        # A CA made by another tool may lack an SKI; derive the same value from its public key.
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _sign(builder: x509.CertificateBuilder, key: PrivateKey) -> x509.Certificate:
    return builder.sign(key, hashes.SHA256())


def build_root(
    key: ec.EllipticCurvePrivateKey, not_before: datetime, not_after: datetime, organization: str
) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, "Root CA"),
        ]
    )
    builder = (
        _base(name, key.public_key(), not_before, not_after)
        .issuer_name(name)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
    )
    return _sign(builder, key)


def build_intermediate(
    public_key: ec.EllipticCurvePublicKey,
    cluster: str,
    issuer: x509.Certificate,
    issuer_key: PrivateKey,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    organization = issuer.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    org = str(organization[0].value) if organization else DEFAULT_ORGANIZATION
    # The cluster goes in the locality, as in Istio's plug-in CA examples, so `openssl x509 -subject`
    # tells the intermediates apart.
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, "Intermediate CA"),
            x509.NameAttribute(NameOID.LOCALITY_NAME, cluster),
        ]
    )
    builder = (
        _base(name, public_key, not_before, not_after)
        .issuer_name(issuer.subject)
        # path_length 0: a cluster CA signs workloads only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(_authority_key_id(issuer), critical=False)
    )
    return _sign(builder, issuer_key)


def build_leaf(
    public_key: ec.EllipticCurvePublicKey,
    identity: Identity,
    issuer: x509.Certificate,
    issuer_key: PrivateKey,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    builder = (
        _base(x509.Name([]), public_key, not_before, not_after)
        .issuer_name(issuer.subject)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signature=True, encipherment=True), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        # The SAN is the whole identity, and RFC 5280 requires it critical when the subject is empty.
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]), critical=True
        )
        .add_extension(_authority_key_id(issuer), critical=False)
    )
    return _sign(builder, issuer_key)
