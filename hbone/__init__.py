"""HBONE: HTTP/2 CONNECT inside mutual TLS. The protocol only; nothing here knows about the mesh."""
