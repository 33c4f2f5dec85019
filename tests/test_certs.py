"""The mesh PKI: CLI and library, checked with real crypto, real files and real TLS handshakes."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from certs import (
    CertError,
    CertificateAuthority,
    CertProvider,
    FileProvider,
    MintingProvider,
    NoCertificateError,
    StaticProvider,
    WorkloadCert,
    make_mesh_pki,
    parse_duration,
    unrelated_ca,
)
from hbone.identity import Identity
from tests.support.pki import TestPki

REPO = Path(__file__).resolve().parents[1]
PRODUCTPAGE = Identity.parse("spiffe://cluster.local/ns/default/sa/productpage")
REVIEWS = Identity.parse("spiffe://cluster.local/ns/default/sa/reviews")


# --- helpers ----------------------------------------------------------------------------------------


def run_cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "certs", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=30
    )


def load_certs(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def mode_of(path: Path) -> int:
    return path.stat().st_mode & 0o777


def mtls_context(folder: Path, *, server: bool) -> ssl.SSLContext:
    """Roughly what hbone builds: TLS 1.3 only, peer cert required, identity checked by the caller."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    # Python 3.13 turns strict X.509 checking on by default; our certificates must pass it.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_cert_chain(folder / "cert-chain.pem", folder / "key.pem")
    ctx.load_verify_locations(cafile=folder / "root-cert.pem")
    return ctx


class HandshakeFailed(Exception):
    def __init__(self, client_error: BaseException | None, server_error: BaseException | None) -> None:
        super().__init__(f"client: {client_error!r}; server: {server_error!r}")
        self.client_error = client_error
        self.server_error = server_error


def tls_exchange(server_dir: Path, client_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A real TLS 1.3 handshake plus one echoed message on loopback; returns (client's peer, server's peer).

    The echo matters: in TLS 1.3 the client finishes its handshake before the server has judged the
    client certificate, so a refusal by the server only surfaces on the client's first read.
    """
    server_ctx, client_ctx = mtls_context(server_dir, server=True), mtls_context(client_dir, server=False)
    outcome: dict[str, Any] = {}

    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    outcome["server_peer"] = tls.getpeercert()
                    outcome["version"] = tls.version()
                    tls.sendall(tls.recv(16))
            except OSError as exc:  # ssl.SSLError is an OSError
                outcome["server_error"] = exc

        thread = threading.Thread(target=serve)
        thread.start()
        client_error: OSError | None = None
        try:
            with (
                socket.create_connection(listener.getsockname(), timeout=5) as raw,
                client_ctx.wrap_socket(raw) as tls,
            ):
                client_peer = tls.getpeercert()
                tls.sendall(b"ping")
                assert tls.recv(16) == b"ping"
        except OSError as exc:
            client_error = exc
        finally:
            thread.join(10)
    if client_error or "server_error" in outcome:
        raise HandshakeFailed(client_error, outcome.get("server_error"))
    assert outcome["version"] == "TLSv1.3"
    return client_peer, outcome["server_peer"]


def refused_by(failure: pytest.ExceptionInfo[HandshakeFailed], side: str, reason: str) -> bool:
    """True if `side` ("client" or "server") rejected its peer's certificate for `reason`."""
    error = getattr(failure.value, f"{side}_error")
    return isinstance(error, ssl.SSLCertVerificationError) and reason in str(error)


def uri_sans_of(peer: dict[str, Any]) -> list[str]:
    return [value for kind, value in peer["subjectAltName"] if kind == "URI"]


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mesh built only with the CLI: one root, two clusters, one workload in each."""
    base = tmp_path_factory.mktemp("cli-pki")
    root = base / "root"
    steps: list[tuple[object, ...]] = [
        ("root", "--out", root, "--ttl", "87600h"),
        ("cluster", "--root", root, "--name", "cluster1", "--out", base / "cluster1"),
        ("cluster", "--root", root, "--name", "cluster2", "--out", base / "cluster2", "--ttl", "365d"),
        ("workload", "--ca", base / "cluster1", "--spiffe", PRODUCTPAGE, "--out", base / "w1"),
        ("workload", "--ca", base / "cluster2", "--spiffe", REVIEWS, "--out", base / "w2", "--ttl", "90s"),
    ]
    for step in steps:
        result = run_cli(*step)
        assert result.returncode == 0, result.stderr
    return base


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_mesh_pki(tmp_path_factory.mktemp("lib-pki"))


@pytest.fixture(scope="module")
def ca1(pki: dict[str, Path]) -> CertificateAuthority:
    return CertificateAuthority.load(pki["cluster1"])


@pytest.fixture(scope="module")
def ca2(pki: dict[str, Path]) -> CertificateAuthority:
    return CertificateAuthority.load(pki["cluster2"])


# --- the CLI's files --------------------------------------------------------------------------------


def test_cli_writes_the_istio_layouts_with_private_keys_0600(cli_pki: Path) -> None:
    root = load_certs(cli_pki / "root" / "root-cert.pem")
    assert len(root) == 1
    for cluster in ("cluster1", "cluster2"):
        folder = cli_pki / cluster
        ca_cert = load_certs(folder / "ca-cert.pem")
        assert load_certs(folder / "cert-chain.pem") == [*ca_cert, *root]
        assert load_certs(folder / "root-cert.pem") == root
        assert mode_of(folder / "ca-key.pem") == 0o600
        assert mode_of(folder / "ca-cert.pem") == 0o644
    for workload, cluster in (("w1", "cluster1"), ("w2", "cluster2")):
        chain = load_certs(cli_pki / workload / "cert-chain.pem")
        assert chain[1:] == load_certs(cli_pki / cluster / "ca-cert.pem"), "leaf then intermediate, no root"
        assert load_certs(cli_pki / workload / "root-cert.pem") == root
        assert mode_of(cli_pki / workload / "key.pem") == 0o600
    assert mode_of(cli_pki / "root" / "root-key.pem") == 0o600


def test_cli_certificates_have_the_right_shape(cli_pki: Path) -> None:
    root = load_certs(cli_pki / "root" / "root-cert.pem")[0]
    inter = load_certs(cli_pki / "cluster1" / "ca-cert.pem")[0]
    leaf = load_certs(cli_pki / "w1" / "cert-chain.pem")[0]

    for ca in (root, inter):
        assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
        assert usage.key_cert_sign and usage.crl_sign
        assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert root.subject == root.issuer
    assert root.not_valid_after_utc - root.not_valid_before_utc == timedelta(hours=87600, minutes=1)

    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert leaf.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment and not usage.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(str(PRODUCTPAGE))], "exactly one SAN, the SPIFFE id"
    # Backdated a minute for clock skew; lifetime counted from issue time.
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(hours=24, minutes=1)
    short = load_certs(cli_pki / "w2" / "cert-chain.pem")[0]
    assert short.not_valid_after_utc - short.not_valid_before_utc == timedelta(seconds=150)


def test_cli_chains_verify_with_cryptography(cli_pki: Path) -> None:
    root = load_certs(cli_pki / "root" / "root-cert.pem")[0]
    store = Store([root])
    for workload, identity in (("w1", PRODUCTPAGE), ("w2", REVIEWS)):
        leaf, inter = load_certs(cli_pki / workload / "cert-chain.pem")
        # Signature by signature...
        leaf.verify_directly_issued_by(inter)
        inter.verify_directly_issued_by(root)
        root.verify_directly_issued_by(root)
        # ...and as a whole, by cryptography's RFC 5280 path validation.
        verifier = PolicyBuilder().store(store).time(datetime.now(UTC)).build_client_verifier()
        verified = verifier.verify(leaf, [inter])
        assert verified.subjects == [x509.UniformResourceIdentifier(str(identity))]
        assert verified.chain == [leaf, inter, root]


def test_two_clusters_under_one_root_complete_mutual_tls(cli_pki: Path) -> None:
    client_peer, server_peer = tls_exchange(server_dir=cli_pki / "w1", client_dir=cli_pki / "w2")
    assert uri_sans_of(client_peer) == [str(PRODUCTPAGE)]
    assert uri_sans_of(server_peer) == [str(REVIEWS)]
    # And the other way round.
    client_peer, server_peer = tls_exchange(server_dir=cli_pki / "w2", client_dir=cli_pki / "w1")
    assert uri_sans_of(client_peer) == [str(REVIEWS)]


# --- refusals in the handshake ----------------------------------------------------------------------


def test_a_certificate_from_an_unrelated_root_is_refused(tmp_path: Path, pki: dict[str, Path]) -> None:
    server = tmp_path / "server"
    CertificateAuthority.load(pki["cluster1"]).issue(PRODUCTPAGE).write(server)
    rogue = unrelated_ca().issue(REVIEWS)
    # The rogue trusts our root, so each test below fails only on the check of the rogue's certificate.
    our_root = (pki["root"] / "root-cert.pem").read_bytes()
    dataclasses.replace(rogue, root_pem=our_root).write(tmp_path / "rogue")
    with pytest.raises(HandshakeFailed) as failure:
        tls_exchange(server_dir=server, client_dir=tmp_path / "rogue")
    assert refused_by(failure, "server", "unable to get local issuer certificate")
    with pytest.raises(HandshakeFailed) as failure:
        tls_exchange(server_dir=tmp_path / "rogue", client_dir=server)
    assert refused_by(failure, "client", "unable to get local issuer certificate")


def test_an_expired_certificate_is_refused(tmp_path: Path, ca1: CertificateAuthority) -> None:
    now = datetime.now(UTC)
    expired = ca1.issue(REVIEWS, not_before=now - timedelta(days=2), not_after=now - timedelta(days=1))
    assert expired.expired(now)
    expired.write(tmp_path / "expired")
    ca1.issue(PRODUCTPAGE).write(tmp_path / "good")
    with pytest.raises(HandshakeFailed) as failure:
        tls_exchange(server_dir=tmp_path / "good", client_dir=tmp_path / "expired")
    assert refused_by(failure, "server", "certificate has expired")
    with pytest.raises(HandshakeFailed) as failure:
        tls_exchange(server_dir=tmp_path / "expired", client_dir=tmp_path / "good")
    assert refused_by(failure, "client", "certificate has expired")


# --- library ------------------------------------------------------------------------------------------


def test_library_issue_matches_the_cli(ca1: CertificateAuthority, ca2: CertificateAuthority) -> None:
    cert = ca2.issue(REVIEWS, timedelta(hours=1))
    assert cert.identity == REVIEWS
    chain = x509.load_pem_x509_certificates(cert.chain_pem)
    assert len(chain) == 2 and chain[1] == ca2.cert
    assert x509.load_pem_x509_certificates(cert.root_pem) == list(ca1.roots) == list(ca2.roots)
    assert cert.not_before == chain[0].not_valid_before_utc and cert.not_before.tzinfo is not None
    assert cert.refresh_at == cert.not_before + (cert.not_after - cert.not_before) / 2
    assert WorkloadCert.from_pem(cert.chain_pem, cert.key_pem, cert.root_pem) == cert


def test_repr_never_shows_the_private_key(ca1: CertificateAuthority) -> None:
    cert = ca1.issue(PRODUCTPAGE)
    assert str(PRODUCTPAGE) in repr(cert)
    assert "PRIVATE" not in repr(cert) and cert.key_pem.decode() not in repr(cert)
    assert "PRIVATE" not in repr(ca1)


def test_make_mesh_pki_lays_out_root_and_clusters(tmp_path: Path) -> None:
    paths = make_mesh_pki(tmp_path, clusters=["east", "west", "north"])
    assert set(paths) == {"root", "east", "west", "north"}
    for name in ("east", "west", "north"):
        ca = CertificateAuthority.load(paths[name])
        assert ca.roots == CertificateAuthority.load_root(paths["root"]).roots
        assert ca.cert.subject.rfc4514_string() == f"L={name},CN=Intermediate CA,O=ambient-py"
    with pytest.raises(CertError, match="root"):
        make_mesh_pki(tmp_path / "again", clusters=["root"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [("90s", timedelta(seconds=90)), ("30m", timedelta(minutes=30)), ("24h", timedelta(hours=24)),
     ("365d", timedelta(days=365)), ("1h30m", timedelta(minutes=90)), ("87600h", timedelta(days=3650))],
)  # fmt: skip
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "24", "h", "1.5h", "-5m", "0s", "5x", "1h 30m"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_a_leaf_may_not_outlive_its_ca(ca1: CertificateAuthority) -> None:
    with pytest.raises(CertError, match="outlive"):
        ca1.issue(PRODUCTPAGE, timedelta(days=3650))


# --- providers ----------------------------------------------------------------------------------------


def test_minting_provider_caches_and_renews_at_half_life() -> None:
    clock = FakeClock(datetime(2030, 1, 1, tzinfo=UTC))
    ca = CertificateAuthority.create_root(now=clock.now).create_intermediate("c", now=clock.now)
    provider: CertProvider = MintingProvider(ca, ttl=timedelta(hours=2), clock=clock)
    assert provider.generation(PRODUCTPAGE) == 0
    first = provider.get(PRODUCTPAGE)
    assert first.not_before == clock.now - timedelta(minutes=1)
    assert provider.get(PRODUCTPAGE) is first and provider.generation(PRODUCTPAGE) == 1
    assert provider.get(REVIEWS).identity == REVIEWS, "one certificate per identity"

    clock.now = first.refresh_at - timedelta(seconds=1)
    assert provider.get(PRODUCTPAGE) is first
    clock.now = first.refresh_at
    second = provider.get(PRODUCTPAGE)
    assert second is not first and second.not_before == clock.now - timedelta(minutes=1)
    assert provider.generation(PRODUCTPAGE) == 2 and provider.generation(REVIEWS) == 1


def test_minting_provider_keeps_a_valid_cert_when_renewal_fails(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(datetime(2030, 1, 1, tzinfo=UTC))
    # The CA expires 2.5 h in: the first 2 h certificate fits, its renewal at half-life does not.
    ca = CertificateAuthority.create_root(now=clock.now).create_intermediate(
        "c", timedelta(hours=2, minutes=30), now=clock.now
    )
    provider = MintingProvider(ca, ttl=timedelta(hours=2), clock=clock)
    first = provider.get(PRODUCTPAGE)
    clock.now = first.refresh_at
    with caplog.at_level(logging.WARNING, logger="certs"):
        assert provider.get(PRODUCTPAGE) is first
    assert "outlive" in caplog.text
    clock.now = first.not_after
    with pytest.raises(CertError, match="outlive"):
        provider.get(PRODUCTPAGE)


def test_file_provider_follows_replacements_and_keeps_the_last_good(
    tmp_path: Path, ca1: CertificateAuthority, ca2: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "mounted"
    first = ca1.issue(PRODUCTPAGE)
    first.write(folder)
    tick = FakeMonotonic()
    provider: CertProvider = FileProvider(folder, monotonic=tick)
    assert provider.get(PRODUCTPAGE) == first and provider.generation(PRODUCTPAGE) == 1

    # A rotated certificate (here from the other cluster's CA) is noticed, but at most once a second.
    second = ca2.issue(PRODUCTPAGE)
    second.write(folder)
    assert provider.get(PRODUCTPAGE) == first
    tick.now += 1.0
    assert provider.get(PRODUCTPAGE) == second and provider.generation(PRODUCTPAGE) == 2

    # A broken replacement is reported, naming the file, and the last good certificate stays.
    (folder / "cert-chain.pem").write_text("not a certificate\n")
    tick.now += 1.0
    with caplog.at_level(logging.WARNING, logger="certs"):
        assert provider.get(PRODUCTPAGE) == second
    assert str(folder / "cert-chain.pem") in caplog.text
    assert provider.generation(PRODUCTPAGE) == 2

    # A key that does not match the certificate is just as bad.
    third = ca1.issue(PRODUCTPAGE)
    third.write(folder)
    (folder / "key.pem").write_bytes(ca1.issue(PRODUCTPAGE).key_pem)
    tick.now += 1.0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="certs"):
        assert provider.get(PRODUCTPAGE) == second
    assert "does not belong" in caplog.text and "key.pem" in caplog.text

    # Fixing the files recovers; rewriting identical content is not a new generation.
    third.write(folder)
    tick.now += 1.0
    assert provider.get(PRODUCTPAGE) == third and provider.generation(PRODUCTPAGE) == 3
    third.write(folder)
    tick.now += 1.0
    assert provider.get(PRODUCTPAGE) == third and provider.generation(PRODUCTPAGE) == 3


def test_file_provider_serves_only_its_identity(tmp_path: Path, ca1: CertificateAuthority) -> None:
    ca1.issue(PRODUCTPAGE).write(tmp_path)
    provider = FileProvider(tmp_path)
    assert provider.identity == PRODUCTPAGE
    with pytest.raises(
        NoCertificateError, match=r"productpage.*not of spiffe://cluster.local/ns/default/sa/reviews"
    ):
        provider.get(REVIEWS)
    assert provider.generation(REVIEWS) == 0


def test_static_provider(ca1: CertificateAuthority) -> None:
    cert = ca1.issue(PRODUCTPAGE)
    provider: CertProvider = StaticProvider(cert)
    assert provider.get(PRODUCTPAGE) is cert and provider.generation(PRODUCTPAGE) == 1
    with pytest.raises(NoCertificateError):
        provider.get(REVIEWS)


# --- bad inputs ---------------------------------------------------------------------------------------


def test_file_provider_initial_errors_name_the_file(tmp_path: Path, ca1: CertificateAuthority) -> None:
    with pytest.raises(CertError, match=r"missing: workload certificate folder not found"):
        FileProvider(tmp_path / "missing")
    tmp_path.joinpath("w").mkdir()
    with pytest.raises(CertError, match=r"w/cert-chain\.pem: file not found"):
        FileProvider(tmp_path / "w")
    ca1.issue(PRODUCTPAGE).write(tmp_path / "w")
    (tmp_path / "w" / "root-cert.pem").write_bytes(unrelated_ca().root_pem)
    with pytest.raises(CertError, match=r"cert-chain\.pem: .*not signed by any trusted root.*root-cert\.pem"):
        FileProvider(tmp_path / "w")


def corrupt_key(folder: Path) -> None:
    (folder / "ca-key.pem").write_text("-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")


def swap_key(folder: Path) -> None:
    (folder / "ca-key.pem").write_bytes(unrelated_ca().issue(PRODUCTPAGE).key_pem)


def foreign_root(folder: Path) -> None:
    (folder / "root-cert.pem").write_bytes(unrelated_ca().root_pem)


def leaf_as_ca(folder: Path) -> None:
    leaf = CertificateAuthority.load(folder).issue(PRODUCTPAGE)
    (folder / "ca-cert.pem").write_bytes(leaf.chain_pem)


def drop_chain(folder: Path) -> None:
    (folder / "cert-chain.pem").unlink()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (corrupt_key, r"ca-key\.pem: no valid PEM private key"),
        (swap_key, r"ca-key\.pem: the private key does not belong to the certificate in .*ca-cert\.pem"),
        (foreign_root, r"cert-chain\.pem: .*not signed by any trusted root"),
        (leaf_as_ca, r"ca-cert\.pem: .* is not a CA certificate"),
        (drop_chain, r"cert-chain\.pem: file not found"),
    ],
)
def test_bad_cacerts_folders_are_refused_naming_the_file(
    tmp_path: Path, pki: dict[str, Path], damage: Any, message: str
) -> None:
    folder = tmp_path / "cacerts"
    CertificateAuthority.load(pki["cluster1"]).write_cacerts(folder)
    damage(folder)
    with pytest.raises(CertError, match=message):
        CertificateAuthority.load(folder)


def test_cli_errors_name_the_file_and_exit_2(tmp_path: Path, pki: dict[str, Path]) -> None:
    missing = run_cli("cluster", "--root", tmp_path / "nope", "--name", "c", "--out", tmp_path / "out")
    assert missing.returncode == 2
    assert f"{tmp_path / 'nope'}: root CA folder not found" in missing.stderr

    broken = tmp_path / "broken"
    CertificateAuthority.load(pki["cluster1"]).write_cacerts(broken)
    corrupt_key(broken)
    bad_key = run_cli("workload", "--ca", broken, "--spiffe", str(PRODUCTPAGE), "--out", tmp_path / "w")
    assert bad_key.returncode == 2
    assert str(broken / "ca-key.pem") in bad_key.stderr
    assert not (tmp_path / "w").exists()

    not_spiffe = "spiffe://td/reviews"
    bad_id = run_cli("workload", "--ca", pki["cluster1"], "--spiffe", not_spiffe, "--out", tmp_path / "w")
    assert bad_id.returncode == 2 and "--spiffe" in bad_id.stderr

    bad_ttl = run_cli("root", "--out", tmp_path / "r", "--ttl", "1y")
    assert bad_ttl.returncode == 2 and "invalid duration '1y'" in bad_ttl.stderr


def test_chain_verification_rejects_the_unrelated_root(cli_pki: Path) -> None:
    leaf, inter = load_certs(cli_pki / "w1" / "cert-chain.pem")
    verifier = PolicyBuilder().store(Store([unrelated_ca().roots[0]])).build_client_verifier()
    with pytest.raises(VerificationError):
        verifier.verify(leaf, [inter])


# --- writing keys safely --------------------------------------------------------------------------------


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o277], ids=oct)
def test_new_folders_are_private_whatever_the_umask(tmp_path: Path, mask: int) -> None:
    out = tmp_path / "mesh" / "pki" / "root"
    with umask(mask):
        CertificateAuthority.create_root().write_root(out)
    for folder in (tmp_path / "mesh", tmp_path / "mesh" / "pki", out):
        assert mode_of(folder) == 0o700, folder
    assert mode_of(out / "root-key.pem") == 0o600 and mode_of(out / "root-cert.pem") == 0o644


def test_an_existing_folder_keeps_its_mode(tmp_path: Path, ca1: CertificateAuthority) -> None:
    out = tmp_path / "w"
    out.mkdir()
    out.chmod(0o755)
    ca1.issue(PRODUCTPAGE).write(out)
    assert mode_of(out) == 0o755
    assert WorkloadCert.load(out).identity == PRODUCTPAGE


@pytest.mark.parametrize(("mode", "who"), [(0o777, "its group and all users"), (0o1777, "its group and all users"),
                                           (0o775, "its group"), (0o757, "all users")],
                         ids=["0777", "1777", "0775", "0757"])  # fmt: skip
def test_a_private_key_is_never_written_into_a_folder_others_can_write(
    tmp_path: Path, ca1: CertificateAuthority, mode: int, who: str
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    for write in (CertificateAuthority.create_root().write_root, ca1.write_cacerts, ca1.issue(PRODUCTPAGE).write):
        with pytest.raises(CertError, match=rf"^{re.escape(str(shared))}: refusing to write the private key .*{who}"):
            write(shared)
    assert sorted(p.name for p in shared.iterdir()) == [], "nothing written, not even a certificate"
    assert mode_of(shared) == mode & 0o777, "the folder itself is left alone"


def test_a_planted_temporary_file_is_not_used(tmp_path: Path) -> None:
    """The old writer opened `.<name>.<pid>.tmp` with O_CREAT|O_TRUNC: whoever planted that name (a symlink
    to a file they own, say) received the key. The temporary file must be a fresh, unguessable one."""
    out = tmp_path / "root"
    out.mkdir(mode=0o700)
    bait = tmp_path / "attacker-owned"
    bait.touch(mode=0o666)
    planted = out / f".root-key.pem.{os.getpid()}.tmp"
    planted.symlink_to(bait)
    CertificateAuthority.create_root().write_root(out)
    assert bait.stat().st_size == 0, "the key went through the planted file"
    key = out / "root-key.pem"
    assert not key.is_symlink() and key.is_file() and mode_of(key) == 0o600
    assert planted.is_symlink(), "the planted name is not ours to touch"
    assert CertificateAuthority.load_root(out).is_root
    assert sorted(p.name for p in out.iterdir()) == sorted([planted.name, "root-cert.pem", "root-key.pem"])


# --- one rule for a workload certificate's identity ---------------------------------------------------------


def test_our_own_workload_certificate_follows_the_peer_rule(tmp_path: Path, ca1: CertificateAuthority) -> None:
    """Loading our certificate and checking a peer's use one definition (hbone.identity.certificate_identity):
    exactly one URI SAN, a strict SPIFFE id, not a CA."""
    percent = ca1.issue(Identity("cluster.local", "def%61ult", "productpage"))
    with pytest.raises(CertError, match="no percent-encoding"):
        WorkloadCert.from_pem(percent.chain_pem, percent.key_pem, percent.root_pem)
    forger = TestPki(paths={}, cas={"cluster1": ca1})
    two = forger.forged([str(PRODUCTPAGE), str(REVIEWS)])
    with pytest.raises(CertError, match="exactly one URI SAN"):
        WorkloadCert.from_pem(two.chain_pem, two.key_pem, two.root_pem)
    ca_leaf = forger.forged([str(PRODUCTPAGE)], ca=True)
    with pytest.raises(CertError, match=r"^certificate chain: the first certificate, the workload's own, is refused: "
                                        r"the certificate is a CA \(basicConstraints CA:TRUE\)"):  # fmt: skip
        WorkloadCert.from_pem(ca_leaf.chain_pem, ca_leaf.key_pem, ca_leaf.root_pem)
