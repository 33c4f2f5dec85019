"""Reading and writing PEM files, with errors that name the file and say what is wrong with it."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from certs.errors import CertError, CertReadError
from certs.layout import CERT_MODE, FOLDER_MODE, KEY_MODE

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
        raise CertReadError(f"{path}: cannot read: {exc.strerror or exc}") from None


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
    """Create `path` and its missing parents as private folders (0700, whatever the umask).

    A folder that already exists is left as it is: its mode is its owner's choice, and `write_file` refuses
    to put a private key where anyone else could write.
    """
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    try:
        for folder in reversed(missing):
            try:
                os.mkdir(folder, FOLDER_MODE)
            except FileExistsError:
                continue  # made meanwhile by someone else: not ours to change
            # mkdir's mode went through the umask; set it exactly, on the folder we made (never a symlink
            # swapped in since).
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                os.fchmod(fd, FOLDER_MODE)
            finally:
                os.close(fd)
    except OSError as exc:
        raise CertError(f"{path}: cannot create folder: {exc.strerror or exc}") from None
    if not path.is_dir():
        raise CertError(f"{path}: exists and is not a folder")


def _refuse_shared_folder(path: Path) -> None:
    """A private key goes only where nobody but the folder's owner can write: anyone who can write there
    can replace the key (or plant the file it is written through) and so own it."""
    folder = path.parent
    try:
        mode = os.stat(folder).st_mode
    except OSError as exc:
        raise CertError(f"{path}: cannot write: {folder}: {exc.strerror or exc}") from None
    writers = [who for who, bit in (("its group", stat.S_IWGRP), ("all users", stat.S_IWOTH)) if mode & bit]
    if writers:
        raise CertError(
            f"{folder}: refusing to write the private key {path.name} into a folder writable by "
            f"{' and '.join(writers)} (mode {stat.S_IMODE(mode):04o}); use a private folder or `chmod go-w {folder}`"
        )


def write_file(path: Path, data: bytes, *, private: bool = False) -> None:
    """Write atomically (temp file then rename) so a watcher never reads a half-written file.

    The temp file is created new (O_EXCL, never following a symlink, 0600) under an unpredictable name in
    the target folder, so nobody can plant it beforehand; its final mode is set on the open descriptor, so a
    private key is never readable by others, not even for an instant and not under a permissive umask.
    """
    mode = KEY_MODE if private else CERT_MODE
    if private:
        _refuse_shared_folder(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise CertError(f"{path}: cannot write: {exc.strerror or exc}") from None
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise CertError(f"{path}: cannot write: {exc.strerror or exc}") from None
