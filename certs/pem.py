"""Reading and writing PEM files, with errors that name the file and say what is wrong with it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from certs.errors import CertError
from certs.layout import CERT_MODE, KEY_MODE

# Keys we can sign with: our own are ECDSA P-256, but Istio's sample plug-in CAs use RSA, and loading
# those lets our daemons join a mesh whose CA was made with Istio's tools.
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise CertError(f"{path}: is a folder, expected a PEM file") from None
    except OSError as exc:
        raise CertError(f"{path}: cannot read: {exc.strerror or exc}") from None


def parse_certificates(data: bytes, source: str) -> list[x509.Certificate]:
    """Every certificate in a PEM blob, in order; at least one. `source` names the blob in errors."""
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CertError(f"{source}: no valid PEM certificate ({exc})") from None


def parse_private_key(data: bytes, source: str) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        # cryptography signals "encrypted but no password" with TypeError.
        raise CertError(
            f"{source}: the private key is encrypted; only unencrypted keys are supported"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CertError(f"{source}: no valid PEM private key ({exc})") from None
    if not isinstance(key, PrivateKey):
        raise CertError(f"{source}: unsupported key type {type(key).__name__}; expected ECDSA or RSA")
    return key


def read_certificates(path: Path) -> list[x509.Certificate]:
    return parse_certificates(read_bytes(path), str(path))


def read_private_key(path: Path) -> PrivateKey:
    return parse_private_key(read_bytes(path), str(path))


def certificates_pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


def private_key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_der(key_or_cert: PrivateKey | x509.Certificate) -> bytes:
    """The SubjectPublicKeyInfo, the simplest way to ask "is this the key of that certificate?"."""
    public = key_or_cert.public_key()
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_matches(key: PrivateKey, cert: x509.Certificate) -> bool:
    return public_key_der(key) == public_key_der(cert)


def ensure_folder(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise CertError(f"{path}: exists and is not a folder") from None
    except OSError as exc:
        raise CertError(f"{path}: cannot create folder: {exc.strerror or exc}") from None


def write_file(path: Path, data: bytes, *, private: bool = False) -> None:
    """Write atomically (temp file then rename) so a watcher never reads a half-written file.

    The mode is set on the open descriptor, so a private key is never readable by others, not even
    for an instant and not under a permissive umask.
    """
    mode = KEY_MODE if private else CERT_MODE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(fd, mode)
            handle.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise CertError(f"{path}: cannot write: {exc.strerror or exc}") from None
