"""Shared helpers for the test suite: the mesh PKI, small apps, raw HTTP/2 clients."""
