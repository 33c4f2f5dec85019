"""The one exception type the PKI raises, so callers (and the CLI) can catch a single thing."""

from __future__ import annotations


class CertError(ValueError):
    """A certificate, key or PKI folder that cannot be used; the message names the file and the problem."""


class NoCertificateError(CertError, LookupError):
    """A provider was asked for an identity it does not hold a certificate for."""


class CertReadError(CertError):
    """A file that could not be read for a reason outside it (an I/O error, such as running out of file
    descriptors): reading it again later may work, so a reload tries again."""
